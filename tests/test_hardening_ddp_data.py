"""Issue 10, hardening: ranks that stay in step, epoch metrics that are whole, and awkward files.

* DDP: a rank whose batch holds only unreadable files still joins every step (a zero-weight step),
  in training and validation, through the real `train.py --gpus 2` (torchrun + gloo on CPU).
* The epoch's metrics count every step (a final sync), the TensorBoard grid survives an unreadable
  first batch, and a mid-epoch resume's metrics row covers the whole epoch (sums carried in last.pt).
* 16-bit images are scaled to 8 bits; symlink loops and empty class folders do not break the scan.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, subprocess_env
from PIL import Image
from test_train import common_cli_args, train_cli

from vgg.core.checkpoint import load_checkpoint
from vgg.data.batches.decode import Unreadable
from vgg.data.batches.loaders import EpochSampler
from vgg.data.datasets import folders as vfolders
from vgg.data.datasets.folders import ImageFolder
from vgg.data.datasets.stats import IMAGENET_STATS
from vgg.models.vgg import build_vgg
from vgg.training.logs import log_augmented_images
from vgg.training.loop import train_one_epoch
from vgg.training.step import BatchAugment


class LogLines:
    """Collect the messages of a 'vgg.*' logger (the 'vgg' logger may not propagate to caplog), INFO and up
    as the CLIs show them. The level is set here: until a run's setup_logging sets the 'vgg' logger to INFO,
    it inherits the root's WARNING, so a test run alone would miss the INFO lines it sees after other tests."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)
        self.lines = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.lines.append(record.getMessage())

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        return self.lines

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


def metrics_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- Distributed: every rank in every step --------------------------------------------------------

def hostile_dataset(sample_root, root, *, seed: int = 0) -> dict:
    """8 train and 4 val JPEGs of two sample classes, an empty third class, symlink loops, and
    unreadable files placed where EpochSampler deals them (batch 2 over 2 processes: 1 per rank):
    rank 0's first training batch and rank 1's third, and rank 0's first validation batch."""
    for split, count in (("train", 4), ("val", 2)):
        for wnid in ("n00000000", "n00000001"):
            (root / split / wnid).mkdir(parents=True)
            for k in range(count):
                shutil.copy(sample_root / "train" / wnid / f"{wnid}_{k}.JPEG", root / split / wnid)
        (root / split / "n00000002").mkdir()  # an empty class folder, in both splits
    os.symlink("loop.JPEG", root / "train" / "n00000000" / "loop.JPEG")  # a file linking to itself
    os.symlink("..", root / "train" / "up")  # a folder linking to its parent
    os.symlink("self", root / "val" / "self")  # a folder linking to itself

    train = ImageFolder(root / "train").samples
    order = list(EpochSampler(len(train), seed=seed, rank=0, world_size=1))
    assert list(EpochSampler(len(train), seed=seed, rank=0, world_size=2)) == order[0::2]
    # Rank r's step s takes order[2 * s + r]: empty rank 0's first file, truncate rank 1's third.
    Path(train[order[0]][0]).write_bytes(b"")
    third_rank1 = Path(train[order[5]][0])
    third_rank1.write_bytes(third_rank1.read_bytes()[:1000])
    # Validation shards with shard_indices (rank 0 takes items 0, 2): empty rank 0's first file.
    Path(ImageFolder(root / "val").samples[0][0]).write_bytes(b"")
    return {"train_images": 6, "train_skipped": 2, "val_images": 3, "val_skipped": 1}


def test_two_processes_finish_when_a_rank_has_only_unreadable_files(sample_root, tmp_path):
    root = tmp_path / "hostile"
    expected = hostile_dataset(sample_root, root)
    args = [*common_cli_args(sample_root, tmp_path), "--data", str(root), "--stats", "imagenet", "--gpus", "2",
            "--epochs", "1", "--batch-size", "2", "--workers", "0", "--log-every", "3", "--seed", "0",
            "--run-name", "ddp-hostile"]
    result = train_cli(*args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 x cpu" in result.stderr and "Traceback" not in result.stderr
    run_dir = tmp_path / "checkpoints" / "ddp-hostile"
    (row,) = metrics_rows(run_dir)
    # Every step's sums reached the row (the last steps came after the last log_every sync).
    assert {k: row[k] for k in expected} == expected
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    # The scan skipped and counted the loops, and named the empty class (once per process).
    assert "skipped 2 symlink loop(s)" in result.stderr and "n00000000/loop.JPEG" in result.stderr
    assert "skipped 1 symlink loop(s)" in result.stderr  # val/self
    empty_warnings = [l for l in result.stderr.splitlines() if "hold no images" in l and "n00000002" in l]
    assert len(empty_warnings) == 2 * 2  # train and val, on each of the 2 ranks
    assert load_checkpoint(run_dir / "last.pt")["classes"] == ["n00000000", "n00000001", "n00000002"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "ddp-hostile"))
    events.Reload()
    # Rank 0's first batch was unreadable: the grid comes from the next one.
    assert "train/augmented_images" in events.Tags()["images"]


# --- The engine: zero-weight steps, a final sync, carried sums ------------------------------------

def tiny_net():
    torch.manual_seed(0)
    return build_vgg("A", num_classes=4, width=1 / 16, fc_width=32, image_size=32, init="xavier")


def batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 4, (n,), generator=g), [])


UNREADABLE = (torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
              [Unreadable(f"{k}.JPEG", "empty file") for k in range(3)])


def test_an_unreadable_batch_is_a_counted_zero_weight_step():
    net = tiny_net()
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)  # no momentum/decay: only the gradient moves it
    augment = BatchAugment(IMAGENET_STATS, torch.device("cpu"))
    metrics = train_one_epoch(net, [UNREADABLE], optimizer, augment, epoch=0, num_steps=1)
    assert metrics["step"] == 1 and metrics["images"] == 0 and metrics["skipped"] == 3
    assert all(p.grad is not None for p in net.parameters())  # the backward pass ran (DDP's all-reduce)
    for old, new in zip(before, net.parameters()):
        assert torch.equal(old, new)  # ... with weight 0


def test_steps_after_the_last_sync_are_counted_and_sums_carried():
    net = tiny_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    augment = BatchAugment(IMAGENET_STATS, torch.device("cpu"))
    # Four batches, one unreadable, for num_steps=6: the loader runs out after the sync at step 3.
    loader = [batch(4, 1), UNREADABLE, batch(3, 2), batch(2, 3)]
    carried = [20.0, 5.0, 9.0, 10.0, 1.0]  # an interrupted first part: 10 images, 1 skipped
    checkpoints = []
    metrics = train_one_epoch(net, loader, optimizer, augment, epoch=0, num_steps=6, log_every=100,
                              checkpoint_every=3, carried_sums=carried,
                              on_checkpoint=lambda step, sums: checkpoints.append((step, sums)))
    assert metrics["step"] == 4
    assert metrics["images"] == 10 + 4 + 3 + 2 and metrics["skipped"] == 1 + 3
    assert metrics["sums"][3:] == [19.0, 4.0]
    assert metrics["loss"] == pytest.approx(metrics["sums"][0] / 19)
    assert metrics["top1_err"] == pytest.approx(100 * (1 - metrics["sums"][1] / 19))
    assert metrics["top5_err"] == pytest.approx(100 * (1 - metrics["sums"][2] / 19))
    assert all(m >= c for m, c in zip(metrics["sums"], carried))
    # The checkpoint at step 3 got the epoch's sums so far, the carried part included.
    ((step, sums),) = checkpoints
    assert step == 3 and sums[3:] == [17.0, 4.0] and 20.0 < sums[0] < metrics["sums"][0]


class ImageRecorder:
    def __init__(self):
        self.images = []

    def add_images(self, tag, images, step):
        self.images.append((tag, images))


def test_image_grid_uses_the_first_readable_batch():
    augment = BatchAugment(IMAGENET_STATS, torch.device("cpu"))
    writer = ImageRecorder()
    log_augmented_images(writer, [UNREADABLE, batch(5, 3)], augment)
    ((tag, images),) = writer.images
    assert tag == "train/augmented_images" and images.shape == (5, 3, 32, 32)
    with LogLines("vgg") as lines:
        log_augmented_images(writer, [UNREADABLE, UNREADABLE], augment)
    assert len(writer.images) == 1 and any("no readable training image" in line for line in lines)


# --- Mid-epoch resume: the epoch's row covers the whole epoch -------------------------------------

def interrupt_at_start(args, wait_for: str) -> dict:
    """Start train.py, send SIGTERM once stderr shows `wait_for` (training is about to begin), and
    return the mid-epoch checkpoint it saves at its first sync point."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if wait_for in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    stderr = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    return stderr


def test_mid_epoch_resume_writes_a_row_for_the_whole_epoch(sample_root, tmp_path):
    steps, batch_size = 6, 16
    common = [*common_cli_args(sample_root, tmp_path), "--epochs", "1", "--steps-per-epoch", str(steps),
              "--batch-size", str(batch_size), "--log-every", "1", "--seed", "0"]
    straight = train_cli(*common, "--run-name", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    (whole,) = metrics_rows(tmp_path / "checkpoints" / "straight")
    assert whole["train_images"] + whole["train_skipped"] == steps * batch_size

    # Interrupted twice (the second part's save must carry the first part's sums on), then finished.
    args = [*common, "--run-name", "split"]
    run_dir = tmp_path / "checkpoints" / "split"
    interrupt_at_start(args, wait_for="steps/epoch")  # the banner, logged just before training
    first = load_checkpoint(run_dir / "last.pt")
    interrupt_at_start([*args, "--resume"], wait_for="steps/epoch")
    second = load_checkpoint(run_dir / "last.pt")
    assert first["epoch"] == second["epoch"] == 0 and 0 < first["step"] < second["step"] < steps
    assert first["epoch_sums"][3] + first["epoch_sums"][4] == first["step"] * batch_size
    assert second["epoch_sums"][3] + second["epoch_sums"][4] == second["step"] * batch_size
    result = train_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(run_dir / "last.pt")["epoch_sums"] is None  # an epoch boundary

    (row,) = metrics_rows(run_dir)
    # The same images were dealt as in the straight run, so the same ones were seen and skipped.
    assert (row["train_images"], row["train_skipped"]) == (whole["train_images"], whole["train_skipped"])


# --- Awkward files --------------------------------------------------------------------------------

def test_16_bit_grey_images_scale_to_8_bits(tmp_path):
    known = np.arange(256, dtype=np.uint8).reshape(16, 16)  # the 8-bit image
    wide = known.astype(np.uint16) * 257  # 0..65535: what a 16-bit scan of it holds
    folder = tmp_path / "n01"
    folder.mkdir()
    Image.fromarray(wide).save(folder / "a.png")  # a 16-bit PNG
    Image.fromarray(wide).save(folder / "b.pgm")  # a 16-bit PGM
    Image.frombytes("I;16B", (16, 16), wide.astype(">u2").tobytes()).save(folder / "c.tif")
    modes = [Image.open(folder / name).mode for name in ("a.png", "b.pgm", "c.tif")]
    assert set(modes) & {"I;16", "I;16B"} and "I" in modes  # the modes Pillow opens them as
    ds = ImageFolder(tmp_path)
    assert len(ds) == 3
    for i in range(3):
        image, _ = ds[i]
        assert image.mode == "RGB"
        pixels = np.asarray(image)
        for channel in range(3):
            np.testing.assert_array_equal(pixels[..., channel], known)
    # Values between the 257-steps round to the nearest 8-bit value.
    Image.fromarray(np.array([[128, 129, 65406, 65535]], dtype=np.uint16)).save(folder / "a.png")
    assert np.asarray(ImageFolder(tmp_path)[0][0])[0, :, 0].tolist() == [0, 1, 254, 255]


def test_symlink_loops_are_skipped_and_counted_once(tmp_path):
    train = tmp_path / "train"
    (train / "n01").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(train / "n01" / "red.JPEG")
    os.symlink("self.JPEG", train / "n01" / "self.JPEG")  # a file link to itself
    os.symlink("b.JPEG", train / "n01" / "a.JPEG")  # two links round a circle
    os.symlink("a.JPEG", train / "n01" / "b.JPEG")
    os.symlink(".", train / "here")  # folder links back to the split and above
    os.symlink("../..", train / "grandparent")
    os.symlink("loop", train / "loop")  # a folder link to itself
    (tmp_path / "elsewhere" / "n02").mkdir(parents=True)  # a real folder linked in: a normal class
    Image.new("RGB", (40, 40), (10, 200, 10)).save(tmp_path / "elsewhere" / "n02" / "green.JPEG")
    os.symlink(tmp_path / "elsewhere" / "n02", train / "n02")
    for _ in range(2):  # the second time from the file-list cache
        with LogLines("vgg.data") as lines:
            ds = ImageFolder(train)
        assert ds.classes == ["n01", "n02"]
        assert sorted(p.split("/")[-1] for p, _ in ds.samples) == ["green.JPEG", "red.JPEG"]
        assert [np.asarray(ds[i][0])[0, 0].argmax() for i in range(2)] == [0, 1]
        vfolders._warned.clear()
        (line,) = [l for l in lines if "symlink" in l]
        assert "skipped 6 symlink loop(s)" in line
        names = ("n01/self.JPEG", "n01/a.JPEG", "n01/b.JPEG", "here", "grandparent", "loop")
        assert sum(name in line for name in names) == 5 and line.endswith(" ...")  # the first 5 named
    with LogLines("vgg.data") as lines:
        ImageFolder(train)
        ImageFolder(train)
    assert len(lines) == 1  # once per process


def test_an_empty_class_folder_stays_a_class_with_one_warning(tmp_path):
    for split in ("train", "val"):
        for wnid in ("n01", "n03"):
            (tmp_path / split / wnid).mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(tmp_path / split / wnid / "x.JPEG")
    (tmp_path / "train" / "n02").mkdir()  # empty in train
    (tmp_path / "val" / "n02").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "val" / "n02" / "x.JPEG")
    with LogLines("vgg.data") as lines:
        train = ImageFolder(tmp_path / "train")
        again = ImageFolder(tmp_path / "train")
        val = ImageFolder(tmp_path / "val", classes=train.classes)
    assert train.classes == again.classes == ["n01", "n02", "n03"]
    assert [label for _, label in val.samples] == [0, 1, 2]  # the indices still match val's
    assert len(lines) == 1 and "n02" in lines[0] and "n01" not in lines[0] and "hold no images" in lines[0]
