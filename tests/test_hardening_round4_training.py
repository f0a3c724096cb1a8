"""Issue 34, round 4, the training run: a stop or a crash at any step leaves a last.pt that --resume
continues from to the uninterrupted run's end, bit for bit (an epoch's last step and a --checkpoint-every
save there included); no diverged weights saved; a finished run resumed changes nothing; a training set
with no readable image refused; a crafted momentum buffer's layout checked; the run lock covers the log
folder. In-process runs of the tiny net (test_train.tiny_config), real checkpoints and real signals.
"""

import collections
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, snapshot, subprocess_env
from test_bit_exact import assert_same_run, finished
from test_hardening_ddp_data import LogLines, metrics_rows
from test_hardening_round3_signals import STOPPED, Train, assert_saved_at_the_stop_step, cli_args
from test_train import tiny_config
from test_training_loop import solid_jpegs

from vgg.core.checkpoint import load_checkpoint, save_checkpoint
from vgg.core.errors import UserError
from vgg.core.launch import STOP_SIGNALS
from vgg.core.runlock import RUN_LOCK
from vgg.training import epochs as vepochs
from vgg.training import run as vrun
from vgg.training.step import NonFiniteLossError

EPOCHS, STEPS = 2, 2  # test_bit_exact.assert_same_run's two epochs; a stop at step 2 is an epoch's last


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Three classes of noisy solid-colour JPEGs: 9 training images (two batches of 4 an epoch), 6 to validate."""
    root, rng = tmp_path_factory.mktemp("small"), np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        for split, count in (("train", 3), ("val", 2)):
            solid_jpegs(root / split / f"n0000000{c}", colour, count, rng)
    return root


def property_config(root, tmp_path, run_name: str, **overrides):
    """Every step a sync point (--log-every 1) and a --checkpoint-every save, the last steps included."""
    values = dict(epochs=EPOCHS, steps_per_epoch=STEPS, batch_size=4, log_every=1, checkpoint_every=1, workers=0,
                  stats="imagenet")
    return tiny_config(root, tmp_path, run_name=run_name, **{**values, **overrides})


class Crash(BaseException):
    """A kill -9 at a sync point, in-process: nothing of the run's own stop path runs."""


@pytest.fixture
def own_signal_handlers():
    """A stopped run keeps its StopFlag's handlers (its process exits next); pytest's come back here."""
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def interrupt_at(monkeypatch, global_step: int, how: str) -> None:
    """At the sync point after optimizer step `global_step` (counted from the run's start): a real SIGTERM
    to this process ("stop": the run's StopFlag asks for a stop there), or a Crash ("crash")."""
    real = vepochs.train_one_epoch

    def interrupting(*args, epoch, num_steps, start_step, stop_requested, **kwargs):
        steps = iter(range(epoch * num_steps + start_step + 1, 10**9))  # one sync a step (--log-every 1)

        def requested():
            if next(steps) == global_step:
                if how == "crash":
                    raise Crash
                signal.raise_signal(signal.SIGTERM)
            return stop_requested()

        return real(*args, epoch=epoch, num_steps=num_steps, start_step=start_step, stop_requested=requested,
                    **kwargs)

    monkeypatch.setattr(vepochs, "train_one_epoch", interrupting)


def crash_in_validation(monkeypatch) -> None:
    """A kill -9 during the first validation: after epoch 0's last step and its --checkpoint-every save."""
    def crashing(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(vepochs, "validate", crashing)


def test_a_stop_or_a_crash_at_any_step_resumes_to_the_same_run(small_root, tmp_path, own_signal_handlers):
    """#34.1, #34.2 and the property test: stop (SIGTERM) or crash after every step k of a 2 x 2-step run
    whose every step is a sync point and a --checkpoint-every save, or crash in the first validation, then
    --resume: last.pt always resumes, and the run ends bit-identical to the uninterrupted one (weights,
    momentum, schedule, rows)."""
    vrun.run(property_config(small_root, tmp_path, "straight"))
    reference = finished(tmp_path, "straight")
    # Each stop; a crash before the last step's save is confirmed, and one in the first validation after a
    # confirmed --checkpoint-every save (a crash earlier leaves nothing, or the epoch's own save: a resume
    # from either is a case above).
    cases = [*(("stop", k) for k in range(1, EPOCHS * STEPS + 1)), ("crash", EPOCHS * STEPS), ("validation", 0)]
    for how, k in cases:
        name = f"{how}{k}"
        config = property_config(small_root, tmp_path, name)
        with pytest.MonkeyPatch.context() as mp:
            if how == "validation":
                crash_in_validation(mp)
            else:
                interrupt_at(mp, k, how)
            with pytest.raises(SystemExit if how == "stop" else Crash) as stopped:
                vrun.run(config)
        saved = load_checkpoint(tmp_path / "checkpoints" / name / "last.pt")
        expected = {"stop": ((k - 1) // STEPS, (k - 1) % STEPS + 1), "crash": (1, 0), "validation": (0, 1)}[how]
        assert (saved["epoch"], saved["step"]) == expected, (name, saved["epoch"], saved["step"])
        if how == "stop":  # saved where it stopped: after step k, an epoch's last step too
            assert stopped.value.code == 128 + signal.SIGTERM
        with LogLines("vgg") as lines:
            vrun.run(config, resume="auto")
        assert_same_run(finished(tmp_path, name), reference)
        if how == "stop" and k % STEPS == 0:  # resumed after the epoch's last step: no speed to show for it
            row = metrics_rows(tmp_path / "checkpoints" / name)[k // STEPS - 1]
            assert row["train_images_per_s"] is None, row
            assert [line for line in lines if line.startswith(f"epoch {k // STEPS - 1}:")
                    and "| trained before the resume |" in line and "img/s" not in line], lines


# --- #34.3: no diverged weights saved ------------------------------------------------------------------

def test_a_diverging_run_keeps_the_last_good_checkpoint(small_root, tmp_path):
    """#34.3: lr 1e4 after a trained epoch: step 1's loss (computed before its update) is finite, the update
    blows the weights up, step 2's loss is NaN. Its --checkpoint-every save held the blown-up weights, so
    "The last good checkpoint is untouched; try a lower --lr" was false; now last.pt stays the epoch's and
    --resume at the run's own lr trains on. The same for a blow-up in an epoch's last step, which only its
    validation sees: no best.pt or last.pt of it."""
    config = property_config(small_root, tmp_path, "diverge", epochs=1)
    vrun.run(config)
    run_dir = tmp_path / "checkpoints" / "diverge"
    good = {name: (run_dir / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    for steps, message in ((STEPS, "the training loss became NaN/inf in epoch 1 before step 2; stopping. The last "
                                   "good checkpoint is untouched; try a lower --lr"),
                           (1, "the validation loss after epoch 1 is NaN/inf")):
        with pytest.raises(NonFiniteLossError, match=re.escape(message)):
            vrun.run(dataclasses.replace(config, epochs=2, lr=1e4, steps_per_epoch=steps), resume="auto")
        assert {name: (run_dir / name).read_bytes() for name in good} == good
        assert not list(run_dir.glob("*.tmp"))  # the unconfirmed save dropped
    vrun.run(dataclasses.replace(config, epochs=2), resume="auto")
    trained = load_checkpoint(run_dir / "last.pt")
    assert (trained["epoch"], trained["step"]) == (2, 0)
    assert all(torch.isfinite(t).all() for t in trained["model"].values())


# --- #34.4: a finished run resumed ---------------------------------------------------------------------

def test_a_finished_run_resumed_says_so_and_changes_nothing(small_root, tmp_path, monkeypatch):
    """#34.4: the plateau schedule ends a run of 5 epochs after epoch 1 (validation scripted flat, patience 0,
    no lr drop allowed). --resume trained one more epoch ("lr drop 2 of 0") and rewrote last.pt, best.pt,
    metrics.jsonl; now one line says the run is finished, and no file of its folders changes."""
    def flat_validate(*args, **kwargs):
        return {"loss": 1.0, "top1": 10.0, "top1_err": 90.0, "top5_err": 50.0, "images": 6, "skipped": 0,
                "unreadable": []}

    monkeypatch.setattr(vepochs, "validate", flat_validate)
    config = property_config(small_root, tmp_path, "plateau", epochs=5, patience=0, max_lr_drops=0)
    vrun.run(config)
    run_dir, log_dir = tmp_path / "checkpoints" / "plateau", tmp_path / "runs" / "plateau"
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2
    before = snapshot(run_dir, log_dir)
    for resume in ("auto", "if-exists"):
        with LogLines("vgg") as lines:
            assert vrun.run(config, resume=resume) == {}
        assert lines[-1] == (f"{run_dir / 'last.pt'} is a finished run (val top-1 plateaued after 0 lr drops (§3.1); "
                             "best val top-1 err 90.0% (epoch 0)): nothing to train, nothing changed; to train on, "
                             "pass --max-lr-drops 1")
        assert snapshot(run_dir, log_dir) == before


# --- #34.5: nothing readable to train on ---------------------------------------------------------------

def test_a_training_set_or_an_epoch_with_no_readable_image_is_refused(small_root, tmp_path, monkeypatch):
    """#34.5: a training set of unreadable files trained on nothing (loss nan, exit 0, best.pt at chance):
    refused before training, like an unreadable validation set. Files that become unreadable during a run
    (a file system gone): the epoch that read none is refused, and no checkpoint or row comes from it."""
    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    train_files = sorted((root / "train").rglob("*.JPEG"))
    saved = {path: path.read_bytes() for path in train_files}
    for path in train_files:
        path.write_bytes(b"not a JPEG")
    with pytest.raises(UserError, match=f"^no readable image in {re.escape(str(root / 'train'))} "
                                        r"\(9 unreadable, e\.g\. "):
        vrun.run(property_config(root, tmp_path, "nothing"))
    assert not (tmp_path / "checkpoints" / "nothing" / "last.pt").exists()
    for path, data in saved.items():
        path.write_bytes(data)

    real_epoch_loader = vepochs.epoch_loader

    def losing_the_files(parts, loader, epoch):
        if epoch == 1:  # made before epoch 0 validates; read (--workers 0) when epoch 1 trains
            for path in train_files:
                path.write_bytes(b"")
        return real_epoch_loader(parts, loader, epoch)

    monkeypatch.setattr(vepochs, "epoch_loader", losing_the_files)
    with pytest.raises(UserError, match=r"^no training image of epoch 1 could be read \(8 unreadable, e\.g\. "):
        vrun.run(property_config(root, tmp_path, "lost"))
    run_dir = tmp_path / "checkpoints" / "lost"
    saved = load_checkpoint(run_dir / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 0) and load_checkpoint(run_dir / "best.pt")["epoch"] == 1
    assert [row["epoch"] for row in metrics_rows(run_dir)] == [0]


# --- #34.6: a crafted momentum buffer -------------------------------------------------------------------

class TooSmall:
    """Pickles as a float tensor of `shape` over a storage of one element (torch.save writes no such tensor)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __reduce__(self):
        storage = torch.storage.TypedStorage(wrap_storage=torch.zeros(1).untyped_storage(), dtype=torch.float32,
                                             _internal=True)
        return torch._utils._rebuild_tensor_v2, (storage, 0, self.shape, torch.empty(self.shape).stride(), False,
                                                 collections.OrderedDict())


def test_a_momentum_buffer_sharing_its_memory_resumes_safely(small_root, tmp_path):
    """#34.6: momentum buffers of the right shapes, expanded from one element (stride 0): --resume died of
    SIGSEGV in the fused SGD kernel; now they load as tensors of their own (zeros: training goes on). One
    over too small a storage is refused in one line (by torch.load)."""
    config = property_config(small_root, tmp_path, "crafted", epochs=1)
    vrun.run(config)
    last = tmp_path / "checkpoints" / "crafted" / "last.pt"
    ckpt = load_checkpoint(last)
    state = ckpt["optimizer"]["state"]
    shapes = {index: entry["momentum_buffer"].shape for index, entry in state.items()}
    save_checkpoint(last, **{**ckpt, "optimizer": {**ckpt["optimizer"], "state": {
        index: {"momentum_buffer": torch.zeros(1).expand(shape)} for index, shape in shapes.items()}}})
    loaded = load_checkpoint(last)["optimizer"]["state"]
    assert all(entry["momentum_buffer"].is_contiguous() for entry in loaded.values())
    script = ("import json, sys; from vgg.config import Config; from vgg.training.run import run; "
              "run(Config(**json.loads(sys.argv[1])), resume='auto')")
    longer = dataclasses.replace(config, epochs=2).to_dict()
    result = subprocess.run([sys.executable, "-c", script, json.dumps(longer)], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert load_checkpoint(last)["epoch"] == 2

    torch.save({"m": TooSmall((16, 3))}, tmp_path / "small.pt")
    with pytest.raises(UserError, match=f"^cannot read checkpoint {re.escape(str(tmp_path / 'small.pt'))}: "):
        load_checkpoint(tmp_path / "small.pt", require=())


# --- #34.14: a lock that is a folder ------------------------------------------------------------------

def test_a_run_lock_that_is_a_folder_is_one_line(small_root, tmp_path):
    """#34.14: `.run.lock` a folder (of the run folder, or of its TensorBoard folder) gave an IsADirectoryError
    traceback; now one line that names it."""
    for folder in ("checkpoints", "runs"):
        lock = tmp_path / folder / f"in-{folder}" / RUN_LOCK
        lock.mkdir(parents=True)
        with pytest.raises(UserError, match=f"^{re.escape(str(lock))} is a folder, not the run's lock file: "):
            vrun.run(property_config(small_root, tmp_path, f"in-{folder}"))


# --- #34.1 through --gpus 2 and a real signal; #34.9: the lock of the TensorBoard folder ----------------

def test_a_stop_at_an_epochs_last_step_under_gpus_2_resumes(sample_root, tmp_path):
    """#34.1: train.py --gpus 2, two steps an epoch and --log-every 20: the epoch's last step is its only sync
    point, so a SIGTERM at any moment is agreed there. last.pt is saved at step 2 of the epoch (it was
    refused: "'step' entry is 2, outside 0..1"), and --resume validates that epoch and goes on. #34.9: while
    it lives, a run with another --out-dir but its --log-dir and --run-name is refused in one line."""
    args = [*cli_args(sample_root, tmp_path, "last", "--gpus", "2", "--workers", "0", "--batch-size", "16",
                      "--steps-per-epoch", "2", "--log-every", "20", "--stats", "imagenet")]
    run = Train(tmp_path, [*args, "--epochs", "1000"])
    run.wait_for("epoch 0: ")
    other = property_config(sample_root, tmp_path, "last", out_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'runs' / 'last'))} is in use by a live run"):
        vrun.run(other)
    assert not (tmp_path / "elsewhere" / "last" / "config.yaml").exists()
    run.signal_group(signal.SIGTERM)
    code, output = run.finish()
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert_saved_at_the_stop_step(tmp_path / "checkpoints" / "last", output)
    epoch, step = map(int, STOPPED.search(output).groups())
    assert step == 2, output[-3000:]

    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--resume", "--epochs", str(epoch + 1)],
                             cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch {epoch}, step 2 " in resumed.stderr
    run_dir = tmp_path / "checkpoints" / "last"
    saved = load_checkpoint(run_dir / "last.pt")
    assert (saved["epoch"], saved["step"], saved["world_size"]) == (epoch + 1, 0, 2)
    assert [row["epoch"] for row in metrics_rows(run_dir)] == list(range(epoch + 1))
