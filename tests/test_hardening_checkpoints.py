"""Issue 10, checkpoints and the run folder, through the real CLIs: hostile and odd checkpoint files,
resume with changed flags, stale temp files of a killed save, a full disk."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, assert_one_line_error, error_line, subprocess_env
from test_train import common_cli_args, train_cli

from vgg.config import Config
from vgg.core.checkpoint import load_checkpoint, save_checkpoint, strip_wrapper_prefixes
from vgg.core.errors import UserError
from vgg.models.vgg import build_vgg
from vgg.training.resume import resume_changes

FAST = ["--steps-per-epoch", "2", "--batch-size", "16", "--stats-images", "50", "--workers", "0"]


def evaluate_cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True,
                          env=env or subprocess_env(), timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def base(sample_root, tmp_path_factory):
    """One finished epoch of the demo net, trained through train.py: checkpoints/base/{last,best}.pt."""
    tmp = tmp_path_factory.mktemp("base")
    result = train_cli(*common_cli_args(sample_root, tmp), *FAST, "--epochs", "1", "--run-name", "base")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "checkpoints" / "base"


def copy_run(base_dir: Path, tmp_path: Path, name: str) -> Path:
    """A private copy of the base run folder under tmp_path's checkpoints/, to resume or to spoil."""
    target = tmp_path / "checkpoints" / name
    shutil.copytree(base_dir, target)
    return target


def modified(source: Path, target: Path, **changes) -> Path:
    """A copy of a real checkpoint with some entries replaced (None: removed)."""
    ckpt = load_checkpoint(source)
    for key, value in changes.items():
        if value is None:
            del ckpt[key]
        else:
            ckpt[key] = value
    save_checkpoint(target, **ckpt)
    return target


# --- 1. No checkpoint runs code --------------------------------------------------------------------

class RunsCode:
    """What an attacker puts in a .pt: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoint_runs_no_code_in_any_entry_point(base, sample_root, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": RunsCode(marker), "arch": {"name": "A"}}, evil)
    # The file really is hostile: a plain unpickling runs its command.
    proof = tmp_path / "proof"
    torch.save({"model": RunsCode(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.exists()

    cli = common_cli_args(sample_root, tmp_path)
    dropped = tmp_path / "work" / "checkpoints" / "x" / "best.pt"  # picked up by a bare evaluate.py
    dropped.parent.mkdir(parents=True)
    shutil.copy(evil, dropped)
    results = {
        "--resume": train_cli(*cli, *FAST, "--resume", str(evil)),
        "--init-from": train_cli(*cli, *FAST, "--init-from", str(evil), "--run-name", "init"),
        "evaluate --checkpoint": evaluate_cli("--checkpoint", str(evil), "--device", "cpu"),
        "bare evaluate": evaluate_cli("--device", "cpu", cwd=dropped.parent.parent.parent),
    }
    for entry, result in results.items():
        assert_one_line_error(result, "refused", "(not a plain-tensor checkpoint: it imports posix.system")
        assert ("checkpoints/x/best.pt" if entry == "bare evaluate" else str(evil)) in error_line(result), entry
    assert not marker.exists()


def test_our_checkpoints_load_with_weights_only_and_hold_plain_rng_states(base):
    ckpt = torch.load(base / "last.pt", weights_only=True)
    numpy_state = ckpt["rng"]["numpy"]
    assert isinstance(numpy_state["keys"], list) and len(numpy_state["keys"]) == 624
    assert ckpt["lr_drops"] == 0 and ckpt["world_size"] == 1
    assert isinstance(ckpt["config"], dict) and isinstance(ckpt["stats"]["mean_rgb"][0], float)


# --- 2. DDP / torch.compile prefixes ---------------------------------------------------------------

def test_strip_wrapper_prefixes():
    state = {"module._orig_mod.features.0.weight": 1, "_orig_mod.module.classifier.0.bias": 2, "features.3.bias": 3}
    assert strip_wrapper_prefixes(state) == {"features.0.weight": 1, "classifier.0.bias": 2, "features.3.bias": 3}


def test_prefixed_weights_work_in_resume_init_from_and_evaluate(base, sample_root, tmp_path):
    weights = load_checkpoint(base / "last.pt")["model"]
    files = {}
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        files[prefix] = modified(base / "last.pt", tmp_path / f"{prefix}pt",
                                 model={prefix + name: t for name, t in weights.items()})
    cli = common_cli_args(sample_root, tmp_path)
    resumed = train_cli(*cli, *FAST, "--resume", str(files["module."]), "--run-name", "base", "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(tmp_path / "checkpoints" / "base" / "last.pt")["epoch"] == 2
    init = train_cli(*cli, *FAST, "--init-from", str(files["_orig_mod."]), "--run-name", "init", "--epochs", "1")
    assert init.returncode == 0, init.stderr[-3000:]
    assert "copied 22 tensors" in init.stderr  # all of net A's 11 weight layers
    evaluated = evaluate_cli("--checkpoint", str(files["module._orig_mod."]), "--device", "cpu",
                             "--workers", "0", "--scales", "36", "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (tmp_path / "eval.json").is_file()


# --- 3. Incomplete, misfit and unreadable checkpoints ----------------------------------------------

def spoiled_files(base: Path, tmp_path: Path) -> dict[str, Path]:
    ckpt = load_checkpoint(base / "last.pt")
    wider = build_vgg("A", num_classes=len(ckpt["classes"]), width=0.25, fc_width=256, image_size=32)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((base / "last.pt").read_bytes()[:5000])
    return {
        "no optimizer": modified(base / "last.pt", tmp_path / "no_optimizer.pt", optimizer=None),
        "no stats": modified(base / "last.pt", tmp_path / "no_stats.pt", stats=None),
        "no model": modified(base / "last.pt", tmp_path / "no_model.pt", model=None),
        "wrong shape": modified(base / "last.pt", tmp_path / "wrong_shape.pt", model=wider.state_dict()),
        "scheduler not a dict": modified(base / "last.pt", tmp_path / "bad_scheduler.pt", scheduler=[1, 2]),
        "truncated": truncated,
    }


@pytest.mark.parametrize("entry, spoil, message", [
    ("--resume", "no optimizer", "has no optimizer entry"),
    ("--resume", "wrong shape", "its weights do not fit net A"),
    ("--resume", "scheduler not a dict", "its 'scheduler' entry is a list"),
    ("--init-from", "no model", "has no model entry"),
    ("--init-from", "wrong shape", "its weights do not fit net A"),
    ("evaluate", "no stats", "has no stats entry"),
    ("evaluate", "wrong shape", "its weights do not fit net A"),
    ("evaluate", "truncated", "cannot read checkpoint"),
])
def test_incomplete_or_misfit_checkpoint_is_one_line(base, sample_root, tmp_path, entry, spoil, message):
    path = spoiled_files(base, tmp_path)[spoil]
    if entry == "evaluate":
        result = evaluate_cli("--checkpoint", str(path), "--device", "cpu", "--workers", "0")
    else:
        result = train_cli(*common_cli_args(sample_root, tmp_path), *FAST, entry, str(path), "--run-name", "new")
    assert_one_line_error(result, str(path), message)


# --- 4. Resume with changed flags ------------------------------------------------------------------

def test_resume_refuses_changed_run_defining_fields_listing_all(base, sample_root, tmp_path):
    run_dir = copy_run(base, tmp_path, "base")
    result = train_cli(*common_cli_args(sample_root, tmp_path), *FAST, "--resume", "--run-name", "base",
                       "--width", "0.25", "--seed", "3", "--color-shift-std", "0")
    assert_one_line_error(result, f"cannot resume {run_dir / 'last.pt'}", "width 0.125 -> 0.25", "seed 0 -> 3",
                          "color_shift_std 0.1 -> 0.0", "new --run-name")
    assert "out_dir" not in error_line(result).split("may change")[0]  # a field that may change is not listed
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1  # nothing trained, nothing written


def test_mid_epoch_resume_refuses_another_batch_size(base, sample_root, tmp_path):
    run_dir = copy_run(base, tmp_path, "base")
    modified(run_dir / "last.pt", run_dir / "last.pt", epoch=0, step=1)  # as if stopped after step 1
    result = train_cli(*common_cli_args(sample_root, tmp_path), *FAST, "--resume", "--run-name", "base",
                       "--batch-size", "8")
    assert_one_line_error(result, "batch_size 16 -> 8", "only at an epoch boundary", "epoch 0, step 1")


def test_resume_policy_for_the_number_of_processes():
    """torchrun may change the world size with --gpus unchanged: a mid-epoch shard would differ."""
    config = Config(batch_size=16)
    ckpt = {"config": config.to_dict(), "world_size": 2, "epoch": 3, "step": 5}
    with pytest.raises(UserError, match=r"world_size 2 -> 1.*only at an epoch boundary \(it is at epoch 3, step 5\)"):
        resume_changes(config, ckpt, Path("x.pt"), world_size=1)
    ckpt["step"] = 0
    assert resume_changes(config, ckpt, Path("x.pt"), world_size=1) == [("world_size", 2, 1)]


def test_resume_applies_changed_lr_and_schedule_visibly_without_phantom_drops(base, sample_root, tmp_path):
    """The old code kept the checkpoint's lr and counted lr/config.lr as drops: --lr 0.05 (5x) read as one
    drop, more than --max-lr-drops 0, so the run ended after one epoch."""
    run_dir = copy_run(base, tmp_path, "base")
    stale = [run_dir / "last.pt.k2x9a1.tmp", run_dir / "best.pt.q7w3e0.tmp"]  # names save_checkpoint uses
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (run_dir / "notes.tmp").write_text("not ours")
    result = train_cli(*common_cli_args(sample_root, tmp_path), *FAST, "--resume", "--run-name", "base",
                       "--lr", "0.05", "--max-lr-drops", "0", "--patience", "5", "--epochs", "3",
                       "--batch-size", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("lr 0.01 -> 0.05 on resume", "batch_size 16 -> 8 on resume", "epochs 1 -> 3 on resume",
                 "patience 1 -> 5 on resume", "max_lr_drops 3 -> 0 on resume",
                 "removed 2 stale temp file(s)"):
        assert line in result.stderr, line
    assert not any(path.exists() for path in stale) and (run_dir / "notes.tmp").exists()
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["epoch"] == 3 and ckpt["lr_drops"] == 0  # trained on to --epochs: no phantom drop
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [0.05] * len(ckpt["optimizer"]["param_groups"])
    assert ckpt["scheduler"]["patience"] == 5
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["lr"] == ckpt["config"]["lr"] == 0.05 and saved["batch_size"] == ckpt["config"]["batch_size"] == 8


# --- 5. Temp files of a killed save, on a fresh start ----------------------------------------------

def test_fresh_start_removes_stale_temp_files(sample_root, tmp_path):
    run_dir = tmp_path / "checkpoints" / "fresh"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt.a8d2k1.tmp").write_bytes(b"killed during the first save")
    result = train_cli(*common_cli_args(sample_root, tmp_path), *FAST, "--steps-per-epoch", "1", "--epochs", "1",
                       "--run-name", "fresh")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removed 1 stale temp file(s)" in result.stderr
    assert not list(run_dir.glob("*.tmp")) and (run_dir / "last.pt").is_file()


# --- 6. A full disk ----------------------------------------------------------------------------------

FULL_DISK = textwrap.dedent("""
    # Test fault injection: after VGG_GOOD_SAVES successful torch.save calls, write to /dev/full (ENOSPC).
    import os
    import torch

    _save, _calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        _calls[0] += 1
        if _calls[0] <= int(os.environ["VGG_GOOD_SAVES"]):
            return _save(obj, f, *args, **kwargs)
        with open("/dev/full", "wb") as full:
            return _save(obj, full, *args, **kwargs)

    torch.save = save
""")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) to produce ENOSPC")
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(sample_root, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_DISK)
    env = dict(subprocess_env(), VGG_GOOD_SAVES="1")
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
    args = [*common_cli_args(sample_root, tmp_path), *FAST, "--steps-per-epoch", "3", "--epochs", "1",
            "--checkpoint-every", "1", "--log-every", "1", "--run-name", "full"]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                            env=env, timeout=600, cwd=ROOT)
    run_dir = tmp_path / "checkpoints" / "full"
    assert_one_line_error(result, f"no space left on device while writing {run_dir / 'last.pt'}")
    ckpt = load_checkpoint(run_dir / "last.pt")  # the save at step 1 went through, the one at step 2 did not
    assert (ckpt["epoch"], ckpt["step"]) == (0, 1)
    assert not list(run_dir.glob("*.tmp"))
