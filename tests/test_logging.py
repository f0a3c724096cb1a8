"""What a person sees of a run: threads, progress lines and bars, warnings, signals, the numbers of the
console, metrics.jsonl and TensorBoard, and the dashboard layout (issue 13)."""

import collections
import itertools
import fcntl
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios

import pytest
import torch
from conftest import ROOT, subprocess_env, wait_for_the_next_second
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from test_hardening_ddp_data import LogLines, metrics_rows
from test_train import common_cli_args, tiny_config

from vgg.core import distributed as vdistributed
from vgg.core.checkpoint import load_checkpoint
from vgg.core.distributed import set_cpu_threads, usable_cpus
from vgg.data.datasets.folders import ImageFolder
from vgg.training import epochs as vepochs
from vgg.training.logs import DASHBOARD_LAYOUT, SKIPPED_LIST
from vgg.training.run import run

FAST = ["--epochs", "2", "--steps-per-epoch", "3", "--progress-every-s", "0"]


def env_without_thread_settings() -> dict:
    env = subprocess_env()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
    return env


def unreadable_files(split_dir) -> set[str]:
    """The files of a split that ImageFolder cannot decode, found the slow, sure way."""
    ds = ImageFolder(split_dir, None)
    return {path for i, (path, _) in enumerate(ds.samples) if ds[i][0] is None}


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


# --- Threads on CPU runs ---------------------------------------------------------------------------

@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_threads_are_the_cores_the_workers_leave(monkeypatch, restore_threads):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with LogLines("vgg") as lines:
        set_cpu_threads("cpu", workers=1)
    assert torch.get_num_threads() == max(1, usable_cpus() - 1)
    assert lines == [f"CPU run: {max(1, usable_cpus() - 1)} torch thread(s) = {usable_cpus()} usable core(s) - "
                     "1 data-loading worker(s) (set OMP_NUM_THREADS to choose)"]
    with LogLines("vgg") as lines:
        set_cpu_threads("cpu", workers=usable_cpus() + 3)  # more workers than cores: still one thread
    assert torch.get_num_threads() == 1 and lines[0].startswith("CPU run: 1 torch thread(s)")


def test_an_explicit_thread_setting_is_kept_and_cuda_runs_are_left_alone(monkeypatch, restore_threads):
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with LogLines("vgg") as lines:
        set_cpu_threads("cpu", workers=2)
    assert torch.get_num_threads() == 3
    assert lines == ["CPU run: 3 torch thread(s), as OMP_NUM_THREADS=3 in the environment says"]
    monkeypatch.delenv("OMP_NUM_THREADS")
    with LogLines("vgg") as lines:
        set_cpu_threads("cuda", workers=2)
    assert torch.get_num_threads() == 3 and lines == []


def test_batches_run_side_by_side_on_the_cores_torch_leaves(monkeypatch, restore_threads):
    """The evaluator's last batches, once the loader's workers idle: as many at once as this process's
    cores hold at torch's thread count; one on a GPU or where the environment sets the threads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(vdistributed, "usable_cpus", lambda: 8)
    torch.set_num_threads(1)
    assert vdistributed.batches_side_by_side("cpu") == 8
    torch.set_num_threads(3)
    assert vdistributed.batches_side_by_side("cpu") == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on the machine: 4 cores each
    torch.set_num_threads(1)
    assert vdistributed.batches_side_by_side("cpu") == 4
    torch.set_num_threads(6)
    assert vdistributed.batches_side_by_side("cpu") == 1
    torch.set_num_threads(1)
    assert vdistributed.batches_side_by_side("cuda") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert vdistributed.batches_side_by_side("cpu") == 1


# --- Logs that are files: plain lines; warnings once, a summary per epoch -------------------------

def test_redirected_stderr_gets_plain_lines_and_one_warning_per_file(sample_root, tmp_path):
    stats_images = 997  # a count no other test uses: the statistics are computed (not cached) here
    with open(tmp_path / "log.txt", "w") as log:  # `python train.py 2> log.txt`
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *common_cli_args(sample_root, tmp_path),
                               *FAST, "--stats-images", str(stats_images), "--run-name", "plain"],
                              cwd=ROOT, env=env_without_thread_settings(), stdout=subprocess.DEVNULL, stderr=log,
                              timeout=600)
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "Traceback" not in text
    lines = text.splitlines()
    threads = max(1, usable_cpus() - 1)  # --workers 1
    assert lines[0].startswith(f"CPU run: {threads} torch thread(s) = {usable_cpus()} usable core(s) - 1 ")
    for epoch in range(2):  # --progress-every-s 0: a line per step, then one per validation batch
        assert [f"epoch {epoch}: {k}/3 steps" in text for k in (1, 2, 3)] == [True] * 3
        assert f"epoch {epoch}: 3/3 steps" in text and "val: 1/" in text

    # Each unreadable file: one warning in the run (the val ones are met every epoch), from the main
    # process, in lines of their own; a summary line only for an epoch that met new ones (issue 30: not
    # the same count again after every epoch); all of them listed in skipped.txt.
    warned = [re.search(r"skipping unreadable image (\S+) \(", line).group(1) for line in lines
              if "skipping unreadable image" in line]
    assert all(line.startswith("warning: skipping") for line in lines if "skipping unreadable image" in line)
    assert len(warned) == len(set(warned))
    bad_train, bad_val = unreadable_files(sample_root / "train"), unreadable_files(sample_root / "val")
    run_dir = tmp_path / "checkpoints" / "plain"
    listed = {line.split("\t")[0] for line in (run_dir / SKIPPED_LIST).read_text().splitlines()}
    rows = metrics_rows(run_dir)
    summaries = [line for line in lines if f"in all; list in {run_dir / SKIPPED_LIST}" in line]
    new_counts = [int(line.split()[0]) for line in summaries]
    assert 1 <= len(summaries) <= len(rows) and all(n > 0 for n in new_counts)
    assert [int(line.split(", ")[1].split()[0]) for line in summaries] == list(itertools.accumulate(new_counts))
    assert sum(new_counts) == len(listed)
    assert rows[0]["val_skipped"] == rows[1]["val_skipped"] > 0  # met again each epoch, said once
    assert set(warned) == bad_train | bad_val  # the statistics read every train file, validation every val file
    assert bad_val <= listed < set(warned)  # the 3 steps of training met only some of the train files

    # The statistics line counts the images used: all the folder holds (fewer than asked), less the unreadable.
    used = len(ImageFolder(sample_root / "train", None)) - len(bad_train)
    assert used < stats_images
    assert f"dataset statistics from {used} images of {sample_root / 'train'} ({len(bad_train)} unreadable skipped)" in text


def read_pty(master: int, proc: subprocess.Popen, timeout: float = 600) -> bytes:
    """Everything the child writes to the terminal until it exits."""
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            proc.kill()
            raise AssertionError(f"no output for {timeout} s: {out[-2000:]!r}")
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    return out


def test_a_terminal_gets_live_bars_and_warnings_on_lines_of_their_own(sample_root, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 160 columns
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common_cli_args(sample_root, tmp_path),
                             *FAST, "--run-name", "tty"], cwd=ROOT, env=subprocess_env(),
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    try:
        text = read_pty(master, proc).decode(errors="replace")
    finally:
        os.close(master)
    assert proc.returncode == 0, text[-3000:]
    lines = text.replace("\r\n", "\n").split("\n")
    assert "\r" in text and re.search(r"epoch 0:\s+\d+%\|", text)  # tqdm's bar, redrawn in place
    assert not re.search(r"epoch 0: \d+/3 steps", text)  # no plain progress lines on a terminal
    assert lines[0] == "CPU run: 1 torch thread(s), as OMP_NUM_THREADS=1 in the environment says"
    # tqdm.write clears the bar (a '\r') and prints the line: after its last '\r' a warning starts
    # the visible line, rather than following a half-drawn bar.
    warnings = [line for line in lines if "skipping unreadable image" in line]
    assert warnings and all(line.split("\r")[-1].startswith("warning: skipping") for line in warnings), warnings
    epoch_lines = [line.split("\r")[-1] for line in lines if "| val top-1 err" in line]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 0", "epoch 1"]


# --- Ctrl-C -----------------------------------------------------------------------------------------

def test_ctrl_c_is_reported_once_though_workers_share_the_terminal(sample_root, tmp_path):
    args = [*common_cli_args(sample_root, tmp_path), "--workers", "2", "--epochs", "1000", "--log-every", "1",
            "--progress-every-s", "0", "--run-name", "ctrl-c"]
    # A session of its own: the signal goes to its process group, as a terminal's Ctrl-C does.
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("epoch 0: 1/"):  # the workers are loading the epoch's batches
            os.killpg(proc.pid, signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=300)
    stderr = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert stderr.count("SIGINT received") == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "continue with --resume" in stderr


# --- The numbers agree: lr, drops, best epoch, final line -------------------------------------------

def test_console_metrics_and_tensorboard_agree_on_lr_drops_and_the_best_epoch(sample_root, tmp_path, monkeypatch):
    """Validation is scripted (top-1 accuracy 40, 60, 50, 55 %), so the plateau schedule (patience 0)
    drops the lr after epochs 2 and 3, and the best epoch (1) is neither the first nor the last."""
    accuracies = iter([40.0, 60.0, 50.0, 55.0])

    def scripted_validate(model, loader, augment, **kwargs):
        top1 = next(accuracies)
        return {"loss": 1.0, "top1": top1, "top1_err": 100 - top1, "top5_err": (100 - top1) / 2,
                "images": 10, "skipped": 0, "unreadable": []}

    monkeypatch.setattr(vepochs, "validate", scripted_validate)
    config = tiny_config(sample_root, tmp_path, epochs=4, patience=0, lr=0.01, workers=0, run_name="numbers")
    with LogLines("vgg") as lines:
        run(config)
    run_dir = tmp_path / "checkpoints" / "numbers"
    rows = metrics_rows(run_dir)
    assert [(r["lr"], r["lr_drops"]) for r in rows] == [(0.01, 0), (0.01, 0), (0.01, 1), (pytest.approx(0.001), 2)]
    # Each row's lr is the one its epoch trained with, as logged at every training step.
    tb = events(tmp_path / "runs" / "numbers")
    steps_per_epoch = config.steps_per_epoch
    for row in rows:
        lrs = {e.value for e in tb.Scalars("train/lr") if (e.step - 1) // steps_per_epoch == row["epoch"]}
        assert sorted(lrs) == pytest.approx([row["lr"]])
    epoch_lines = [line for line in lines if "| val top-1 err" in line]
    assert [line.split(" | lr ")[1] for line in epoch_lines] == [
        "0.01", "0.01", "0.01, dropped to 0.001 (lr drop 1 of 3)", "0.001, dropped to 0.0001 (lr drop 2 of 3)"]
    # Best: epoch 1 (40 % error), in best.pt, in the hparams and in the final line, all as errors.
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == 2  # saved after epoch 1
    hparams = {tag: tb.Scalars(tag)[-1].value for tag in ("hparam/val_top1_err", "hparam/val_top5_err",
                                                            "hparam/best_epoch")}
    assert hparams == {"hparam/val_top1_err": 40.0, "hparam/val_top5_err": 20.0, "hparam/best_epoch": 1.0}
    assert lines[-1] == f"done: best val top-1 err 40.0% (epoch 1); checkpoints in {run_dir}"


# --- TensorBoard: resume without doubled steps; the dashboard layout -------------------------------

def test_resume_from_an_earlier_checkpoint_logs_no_step_twice(sample_root, tmp_path):
    config = tiny_config(sample_root, tmp_path, workers=0, run_name="twice")
    run_dir = tmp_path / "checkpoints" / "twice"
    run(tiny_config(sample_root, tmp_path, workers=0, run_name="twice", epochs=1))
    shutil.copy(run_dir / "last.pt", tmp_path / "after-epoch-0.pt")
    run(config, resume="auto")  # epoch 1 logged ...
    wait_for_the_next_second()  # (an in-process resume: see conftest)
    run(config, resume=str(tmp_path / "after-epoch-0.pt"))  # ... and logged again, from the older checkpoint
    tb = events(tmp_path / "runs" / "twice")
    per_epoch = config.steps_per_epoch
    all_steps = list(range(config.log_every, config.epochs * per_epoch + 1, config.log_every))
    for tag in tb.Tags()["scalars"]:
        steps = [e.step for e in tb.Scalars(tag)]
        assert not [s for s, n in collections.Counter(steps).items() if n > 1], (tag, steps)
    assert [e.step for e in tb.Scalars("train/loss")] == all_steps
    assert [e.step for e in tb.Scalars("val/top1_err")] == [per_epoch, 2 * per_epoch]  # each epoch's end


def test_dashboard_layout_is_in_the_event_file_and_names_logged_tags(sample_root, tmp_path):
    run(tiny_config(sample_root, tmp_path, workers=0, run_name="dash", epochs=1))
    tb = events(tmp_path / "runs" / "dash")
    (event,) = tb.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    first = layout.category[0]
    assert first.title == "1. training"
    charts = {chart.title: list(chart.multiline.tag) for chart in first.chart}
    assert charts["top-1 error (%): train vs val"] == ["^epoch/train_top1_err$", "^val/top1_err$"]
    assert len(charts) == 5 and {"learning rate", "images/s", "fraction of time waiting for data"} <= set(charts)
    assert [c.title for c in layout.category] == list(DASHBOARD_LAYOUT)
    # Every chart of the first screen shows tags the run logged (a typo would leave it empty).
    logged = tb.Tags()["scalars"]
    for title, patterns in charts.items():
        for pattern in patterns:
            assert any(re.search(pattern, tag) for tag in logged), (title, pattern)


def test_evaluate_writes_an_evaluation_section_beside_the_curves(sample_root, tmp_path, restore_threads):
    import evaluate

    run(tiny_config(sample_root, tmp_path, workers=0, run_name="judged", epochs=1))
    checkpoint = tmp_path / "checkpoints" / "judged" / "best.pt"
    assert evaluate.main(["--checkpoint", str(checkpoint), "--dense", "--single-scale", "--workers", "0",
                          "--device", "cpu", "--out", str(tmp_path / "eval" / "first")]) == 0
    tb = events(tmp_path / "runs" / "judged")  # the folder the run's curves are in
    (text,) = [t for t in tb.Tags()["tensors"] if t.startswith("evaluation/first/table")]
    table = tb.Tensors(text)[-1].tensor_proto.string_val[0].decode()
    assert "top-1 err (%)" in table and "| A (judged) |" in table and "dense" in table
    (histogram_tag,) = [t for t in tb.Tags()["histograms"] if t.startswith("evaluation/first/")]
    assert histogram_tag == "evaluation/first/per_class_top1_acc/A_judged_dense"
    histogram = tb.Histograms(histogram_tag)[-1].histogram_value
    assert histogram.num == len(load_checkpoint(checkpoint)["classes"])  # one value per class
    assert 0 <= histogram.min <= histogram.max <= 100
