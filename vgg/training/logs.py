"""What a run leaves for people to read: the skipped-files list, the TensorBoard dashboard and its
per-epoch scalars and image grid.
"""

import os
import re
import threading
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from vgg.core.errors import is_disk_full
from vgg.core.progress import get_logger
from vgg.data.batches.transforms import TrainCrop
from vgg.training.step import BatchAugment

log = get_logger()


# Per-epoch metrics that are no numbers for metrics.jsonl: loop state and the unreadable files' list.
NOT_IN_ROW = ("interrupted", "step", "sums", "unreadable")
SKIPPED_LIST = "skipped.txt"


# skipped.txt holds one `path<TAB>reason` line a file, UTF-8. A path (or reason) may hold any byte but
# "/" and NUL: bytes that are not UTF-8 (a name from another system's encoding, which Python keeps as
# surrogates), a backslash, a tab, a newline or a carriage return are written as \xNN, \\, \t, \n, \r,
# so that every line stays one file and the list reads back exactly (issue 29).
_ESCAPES = {b"\\": b"\\\\", b"\t": b"\\t", b"\n": b"\\n", b"\r": b"\\r"}
_UNESCAPES = {b"\\": b"\\", b"t": b"\t", b"n": b"\n", b"r": b"\r"}
_ESCAPED = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)", re.DOTALL)


def escape_name(text: str) -> str:
    raw = os.fsencode(text) if isinstance(text, str) else text
    raw = re.sub(rb"[\\\t\n\r]", lambda m: _ESCAPES[m.group()], raw)
    return raw.decode("utf-8", "backslashreplace")


def unescape_name(text: str) -> str:
    def one(match):
        code = match.group(1)
        return bytes([int(code[1:], 16)]) if code[:1] == b"x" and len(code) == 3 else _UNESCAPES.get(code, code)
    return os.fsdecode(_ESCAPED.sub(one, text.encode("utf-8", "surrogateescape")))


def read_skipped_list(path: Path) -> dict[str, str]:
    """skipped.txt -> {path: reason}, as write_skipped_list wrote them."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")  # (older lists could hold raw bytes)
    lines = [line.split("\t", 1) for line in text.split("\n") if line.strip()]
    return {unescape_name(parts[0]): unescape_name(parts[1]) if len(parts) > 1 else "" for parts in lines}


def write_skipped_list(path: Path, files: dict[str, str]) -> None:
    """The run's unreadable files, one `path<TAB>reason` line each, sorted, awkward bytes escaped."""
    text = "".join(f"{escape_name(name)}\t{escape_name(reason)}\n" for name, reason in sorted(files.items()))
    path.write_text(text, encoding="utf-8")


# The TensorBoard custom-scalars page ("CUSTOM SCALARS"): the charts to look at first, then the rest.
# Every scalar is logged against the global optimizer step, so a chart can overlay per-step tags
# and per-epoch ones. (The layout cannot set a log scale: each chart has a log-scale toggle.)
DASHBOARD_LAYOUT = {
    "1. training": {
        "top-1 error (%): train vs val": ["Multiline", ["^epoch/train_top1_err$", "^val/top1_err$"]],
        "loss: train (running) vs val": ["Multiline", ["^train/loss$", "^val/loss$"]],
        "learning rate": ["Multiline", ["^train/lr$"]],
        "images/s": ["Multiline", ["^speed/images_per_s$"]],
        "fraction of time waiting for data": ["Multiline", ["^speed/data_wait_fraction$"]],
    },
    "2. more": {
        "top-5 error (%): train vs val": ["Multiline", ["^epoch/train_top5_err$", "^val/top5_err$"]],
        "running train error (%)": ["Multiline", [r"^train/top\d_err$"]],
        "epoch time (s)": ["Multiline", ["^epoch/time_s$"]],
        "GPU memory (GB)": ["Multiline", ["^epoch/gpu_memory_gb$"]],
    },
}


def hide_writer_thread_disk_full() -> None:
    """TensorBoard writes its event file on a thread of its own: a write that fails there (a full disk)
    prints the thread's traceback, then the writer's next call raises the same error on the training
    thread, where the run turns it into one line (vgg.training.run.run). So that error, from that thread,
    is not printed twice; any other goes to the hook as before. Installed once a process."""
    previous = threading.excepthook
    if getattr(previous, "hides_writer_disk_full", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and is_disk_full(args.exc_value):
            return
        previous(args)

    hook.hides_writer_disk_full = True
    threading.excepthook = hook


def log_augmented_images(writer: SummaryWriter, loader, augment: BatchAugment, count: int = 32) -> None:
    """A grid of training images as the net sees them (after every augmentation), for a sanity look."""
    for images, labels, _ in loader:  # the first batch with a readable image
        if labels.numel():
            break
    else:
        log.warning("warning: no readable training image for the TensorBoard image grid; none logged")
        return
    images = TrainCrop(*(part[:count] for part in images)) if isinstance(images, TrainCrop) else images[:count]
    batch = augment(images, train=True).float().cpu()
    mean = torch.tensor(augment.stats.mean_rgb).view(1, 3, 1, 1)
    writer.add_images("train/augmented_images", ((batch + mean) / 255).clamp(0, 1), 0)


def log_epoch(writer: SummaryWriter, step: int, row: dict, device: torch.device) -> None:
    """An epoch's row, at `step`: the global optimizer step at the end of the epoch (the per-step
    tags' axis, so both kinds can share a chart)."""
    writer.add_scalar("val/top1_err", row["val_top1_err"], step)
    writer.add_scalar("val/top5_err", row["val_top5_err"], step)
    writer.add_scalar("val/loss", row["val_loss"], step)
    writer.add_scalar("epoch/train_top1_err", row["train_top1_err"], step)
    writer.add_scalar("epoch/train_top5_err", row["train_top5_err"], step)
    writer.add_scalar("epoch/lr", row["lr"], step)
    writer.add_scalar("epoch/time_s", row["train_epoch_time_s"], step)
    if row["train_images_per_s"] is not None:  # (None: the epoch's steps were trained before a resume)
        writer.add_scalar("epoch/images_per_s", row["train_images_per_s"], step)
    writer.add_scalar("epoch/data_wait_fraction", row["train_data_wait_fraction"], step)
    if device.type == "cuda":
        writer.add_scalar("epoch/gpu_memory_gb", torch.cuda.max_memory_allocated(device) / 2**30, step)
    writer.flush()
