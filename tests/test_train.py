"""Real training runs on the generated sample dataset with a scaled-down net: CLI, resume, signals."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, subprocess_env

from vgg.config import Config
from vgg.core.checkpoint import load_checkpoint, save_checkpoint
from vgg.models.vgg import build_vgg
from vgg.training.run import run


def tiny_config(sample_root, tmp_path, **overrides) -> Config:
    """The demo's net and data, cut to a few steps an epoch."""
    values = dict(arch="A", width=0.125, fc_width=64, init="xavier", data=str(sample_root), crop_size=32,
                  scale_min=36, scale_max=48, stats_images=50, workers=1, batch_size=16, steps_per_epoch=4,
                  epochs=2, log_every=2, checkpoint_every=0, run_name="tiny",
                  out_dir=str(tmp_path / "checkpoints"), log_dir=str(tmp_path / "runs"), device="cpu")
    values.update(overrides)
    return Config(**values)


def train_cli(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout, cwd=ROOT)


def common_cli_args(sample_root, tmp_path):
    return ["--config", "demo", "--data", str(sample_root), "--out-dir", str(tmp_path / "checkpoints"),
            "--log-dir", str(tmp_path / "runs"), "--workers", "1", "--device", "cpu"]


def test_resume_at_epoch_boundary_gives_identical_weights(sample_root, tmp_path):
    run(tiny_config(sample_root, tmp_path, run_name="straight"))
    run(tiny_config(sample_root, tmp_path, run_name="split", epochs=1))
    after_one = load_checkpoint(tmp_path / "checkpoints" / "split" / "last.pt")
    run(tiny_config(sample_root, tmp_path, run_name="split"), resume="auto")
    straight = load_checkpoint(tmp_path / "checkpoints" / "straight" / "last.pt")
    split = load_checkpoint(tmp_path / "checkpoints" / "split" / "last.pt")
    assert straight["epoch"] == split["epoch"] == 2
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    assert straight["optimizer"]["state"].keys() == split["optimizer"]["state"].keys()
    assert after_one["epoch"] == 1  # the second epoch really trained after the resume:
    assert not all(torch.equal(after_one["model"][k], v) for k, v in straight["model"].items())


def test_checkpoint_holds_everything_to_resume_and_evaluate(sample_root, tmp_path):
    run(tiny_config(sample_root, tmp_path, epochs=1, checkpoint_every=2))
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "tiny" / "last.pt")
    for key in ("model", "arch", "optimizer", "scheduler", "epoch", "step", "rng", "config", "stats",
                "classes", "best_top1"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 1 and ckpt["step"] == 0
    assert ckpt["config"]["crop_size"] == 32 and len(ckpt["classes"]) >= 10
    assert len(ckpt["stats"]["mean_rgb"]) == 3
    rows = [json.loads(line) for line in (tmp_path / "checkpoints" / "tiny" / "metrics.jsonl").open()]
    assert len(rows) == 1 and 0 <= rows[0]["val_top1_err"] <= 100


def test_warm_start_and_wrong_init_from(sample_root, tmp_path):
    from test_hardening_ddp_data import LogLines  # (that module imports this one)

    run(tiny_config(sample_root, tmp_path, run_name="a", epochs=1))
    a_ckpt = tmp_path / "checkpoints" / "a" / "best.pt"
    with LogLines("vgg") as lines:
        run(tiny_config(sample_root, tmp_path, run_name="d", arch="D", epochs=1, steps_per_epoch=1,
                        init_from=str(a_ckpt)))
    (copied,) = [line for line in lines if line.startswith(f"initialised from {a_ckpt}: copied ")]
    assert "tensors: features.0.weight, features.0.bias, " in copied  # §3.1: A's first convs and the FCs
    a_model = load_checkpoint(a_ckpt)["model"]
    # The D run started from A's first conv; after one small step it is still close to it, while a
    # layer A does not have (stage 1 conv 2) started fresh.
    d_model = load_checkpoint(tmp_path / "checkpoints" / "d" / "last.pt")["model"]
    assert torch.allclose(d_model["features.0.weight"], a_model["features.0.weight"], atol=0.05)

    # A checkpoint of net B is no warm start for net D: one clear line, non-zero exit.
    b = build_vgg("B", num_classes=10, width=0.125, fc_width=64, image_size=32)
    b_path = tmp_path / "b.pt"
    save_checkpoint(b_path, model=b.state_dict(), arch=b.arch_kwargs(), classes=load_checkpoint(a_ckpt)["classes"])
    result = train_cli(*common_cli_args(sample_root, tmp_path), "--arch", "D", "--init-from", str(b_path),
                       "--run-name", "bad", "--epochs", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --init-from {b_path}")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--config", "nope"], "unknown config 'nope'"),
    (["--config", "demo", "--data", "/does/not/exist"], "not found"),
    (["--config", "demo", "--resume", "/does/not/exist.pt"], "nothing to resume"),
    (["--config", "D", "--init-from", "/does/not/exist.pt"], "train that first"),
])
def test_bad_input_gives_one_clear_line(args, message, tmp_path):
    result = train_cli(*args, "--out-dir", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_cli_demo_writes_checkpoints_and_tensorboard(sample_root, tmp_path):
    result = train_cli(*common_cli_args(sample_root, tmp_path), "--epochs", "2", "--steps-per-epoch", "6",
                       "--run-name", "cli")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "checkpoints" / "cli"
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.tmp"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "cli"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/top1_err", "train/top5_err", "train/lr", "speed/images_per_s",
                "speed/data_wait_fraction", "val/top1_err", "val/top5_err", "epoch/time_s"):
        assert tag in scalars, tag
    assert "train/augmented_images" in events.Tags()["images"]
    assert len(events.Scalars("val/top1_err")) == 2


def test_sigterm_saves_and_resume_finishes(sample_root, tmp_path):
    # Many epochs, so the run is still going when the signal comes however fast the machine is.
    args = [*common_cli_args(sample_root, tmp_path), "--run-name", "sig", "--log-every", "1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--epochs", "1000"],
                            env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "checkpoints" / "sig"
    deadline = time.time() + 120
    while not (run_dir / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # some training steps
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) > (0, 0)

    result = train_cli(*args, "--resume", "--epochs", str(ckpt["epoch"] + 1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == ckpt["epoch"] + 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(sample_root, tmp_path):
    result = train_cli(*common_cli_args(sample_root, tmp_path), "--lr", "10", "--checkpoint-every", "1",
                       "--log-every", "1", "--run-name", "nan")
    assert result.returncode == 2
    assert "NaN/inf" in result.stderr and "Traceback" not in result.stderr
    # Step 1's loss is computed before any update, so it is finite; with this lr a later one is not. A
    # --checkpoint-every save replaces last.pt only once the next step's loss, the first its weights gave,
    # is seen finite (issue 34): the save of the step before the NaN is dropped, with nothing after it.
    nan_step = int(re.search(r"NaN/inf in epoch 0 before step (\d+)", result.stderr).group(1))
    run_dir = tmp_path / "checkpoints" / "nan"
    assert nan_step >= 2 and not list(run_dir.glob("*.tmp"))
    if nan_step == 2:
        assert not (run_dir / "last.pt").exists()
    else:
        ckpt = load_checkpoint(run_dir / "last.pt")
        assert ckpt["epoch"] == 0 and ckpt["step"] == nan_step - 2
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_gpu_data_path_switch_trains_on_cpu(sample_root, tmp_path, monkeypatch):
    """`data_path: gpu` swaps in the TorchCodec loader; on a machine without a GPU it runs on the CPU.
    Built once for the run, it is told each epoch (its samples' draws depend on it, issue 17)."""
    from vgg.data.batches import gpu as vgpu

    epochs_told, build = [], vgpu.build_gpu_train_loader

    def recording_build(*args, **kwargs):
        loader = build(*args, **kwargs)
        real_set_epoch = loader.set_epoch
        loader.set_epoch = lambda epoch: (epochs_told.append(epoch), real_set_epoch(epoch))[1]
        return loader

    monkeypatch.setattr(vgpu, "build_gpu_train_loader", recording_build)
    metrics = run(tiny_config(sample_root, tmp_path, run_name="gpu-path", data_path="gpu", epochs=2))
    assert metrics["images"] > 0 and 0 <= metrics["top1_err"] <= 100
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "gpu-path" / "last.pt")
    assert ckpt["config"]["data_path"] == "gpu" and ckpt["epoch"] == 2
    assert epochs_told == [0, 1]


def test_gpus_flag_launches_ddp_processes(sample_root, tmp_path):
    """--gpus 2 re-runs train.py under torchrun; on CPU the processes use gloo. Rank 0 alone writes."""
    result = train_cli(*common_cli_args(sample_root, tmp_path), "--gpus", "2", "--epochs", "1",
                       "--steps-per-epoch", "3", "--batch-size", "16", "--workers", "0", "--run-name", "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "ddp" / "last.pt")
    assert ckpt["epoch"] == 1
    assert "2 x cpu" in result.stderr  # the run's banner counts both processes


def test_kill_9_keeps_a_loadable_checkpoint_and_resume_goes_on(sample_root, tmp_path):
    """Checkpoints are written atomically: a SIGKILL at any moment leaves the last one whole."""
    args = [*common_cli_args(sample_root, tmp_path), "--run-name", "kill", "--log-every", "1",
            "--checkpoint-every", "2"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--epochs", "1000"],
                            env=subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "checkpoints" / "kill" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # likely mid-way through another save or step
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    ckpt = load_checkpoint(last)
    assert (ckpt["epoch"], ckpt["step"]) >= (0, 2)
    result = train_cli(*args, "--resume", "--epochs", str(ckpt["epoch"] + 1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(last)["epoch"] == ckpt["epoch"] + 1
