"""The WebDataset shard format (timm/imagenet-1k-wds's layout) and reading it: a shard folder's split, the
samples of one tar, an image's bytes decoded. vgg.data.datasets.shard_writer writes shards;
vgg.data.datasets.shards trains and evaluates from them.

A shard folder holds `imagenet1k-train-{0000..NNNN}.tar`, `imagenet1k-validation-{00..NN}.tar` and
`_info.json` (per split: filenames, num_samples, shard_lengths; and `classes`, the sorted wnids).
Each sample is three tar members sharing a key: `<key>.jpg` (the file's bytes, as they were),
`<key>.cls` (the class index as text) and `<key>.json` ({"filename", "wnid", "label"}); shards written
here add a fourth, `<key>.vgg_check`, the image's damage check (vgg.data.datasets.checks) made once when
the shard was written, so that reading it does not check the image again on every read (a shard without
it, timm's say, is checked as it is read). Shards are plain tar files, written here with the standard
library's tarfile (the `webdataset` package is not needed to write or read them, and reads them as they
are; other readers pass over the member they do not know).
"""

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vgg.core.errors import UserError
from vgg.core.progress import get_logger
from vgg.data.batches.decode import Unreadable, load_rgb, mark_checked
from vgg.data.batches.jpeg import DECODE_ERRORS, Check, Verdict
from vgg.data.datasets.labels import read_lines
from vgg.data.datasets.prepare import check_class_order

log = get_logger()

INFO_NAME = "_info.json"
CLASSES_NAME = "classes.txt"  # for shards whose _info.json lists no classes: one wnid per line, sorted
PREFIX = "imagenet1k"
SPLITS = {"train": "train", "val": "validation"}  # class-folder split -> shard split name (timm's)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CHECK_KEY = "vgg_check"  # the member holding a sample's check: "<Check value>\t<image size>\t<note>"
UNCHECKED = Verdict(Check.UNCHECKED)


class ShardError(UserError):
    """A damaged or truncated shard, met in a DataLoader worker. The DataLoader raises it again in the main
    process as ShardError("Caught ShardError in DataLoader worker process 0.\nOriginal Traceback ..."):
    that is cut back here to the one line it was raised with, so the command lines print one line."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if last.startswith(f"{__name__}.ShardError: ") else last
        super().__init__(message)


# What reading a damaged tar raises: bad headers and data cut short (TarError, EOFError), a .cls that is
# no number (ValueError, UnicodeDecodeError), a sample without its members (UserError), I/O errors.
SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, UserError)


def damaged(path: Path, error: BaseException) -> ShardError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return ShardError(f"shard {path} is damaged or cut short ({reason[:200]}): write it again or download it again")


def check_count(path: Path, count: int, expected: int) -> None:
    if count != expected:
        raise ShardError(f"shard {path} holds {count} samples where {INFO_NAME} says {expected}: it is damaged "
                         "or cut short; write it again or download it again")


def is_shard_dir(path) -> bool:
    """A folder of WebDataset shards (it holds _info.json) rather than class folders."""
    return bool(path) and (Path(path) / INFO_NAME).is_file()


_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand(pattern: str) -> list[str]:
    """`imagenet1k-train-{0000..1023}.tar` -> the 1024 names (one numeric brace range at most)."""
    match = _BRACES.search(pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    return [pattern[:match.start()] + f"{i:0{len(first)}d}" + pattern[match.end():]
            for i in range(int(first), int(last) + 1)]


@dataclass(frozen=True)
class ShardSplit:
    """One split's shards (in _info.json's order), their sample counts, and the class list."""

    paths: tuple[Path, ...]
    lengths: tuple[int, ...]
    classes: tuple[str, ...]

    @property
    def offsets(self) -> list[int]:
        """The position of each shard's first sample in the split (the samples' indices)."""
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(int).tolist()


def iter_samples(path: Path, skip: int = 0):
    """(key, {extension: member}) of each sample in a tar, in order, from sample `skip` on; `tar` must
    stay open while members are read, so this yields inside it: ((key, parts), tar)."""
    with tarfile.open(path, "r:") as tar:  # random access: skipped members are seeked over, not read
        key, parts, index = None, {}, 0
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            member_key, _, ext = base.partition(".")
            if member_key != key and parts:
                if index >= skip:
                    yield key, parts, tar
                index += 1
                parts = {}
            key = member_key
            parts[ext.lower()] = member
        if parts and index >= skip:
            yield key, parts, tar


def _count_samples(path: Path) -> int:
    return sum(1 for _ in iter_samples(path))


def open_split(root, split: str) -> ShardSplit:
    """A split ("train" or "validation") of the shard folder `root`, checked."""
    root = Path(root)
    try:
        info = json.loads((root / INFO_NAME).read_text())
        entry = info["splits"][split]
        names = [n for pattern in entry["filenames"] for n in _expand(pattern)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{root / INFO_NAME} has no usable split {split!r} (expected splits.{split}.filenames, "
                        f"as timm/imagenet-1k-wds writes it): {type(e).__name__}: {e}") from None
    paths = tuple(root / n for n in names)
    missing = [p.name for p in paths if not p.is_file()]
    if missing or not paths:
        raise UserError(f"{root}: {len(missing)} of the {len(paths)} {split} shards in {INFO_NAME} are missing "
                        f"(first: {missing[0] if missing else 'none listed'})")
    lengths = entry.get("shard_lengths")
    if isinstance(lengths, list) and not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
        raise UserError(f"{root / INFO_NAME}: {split} shard_lengths must be whole numbers >= 0, got {lengths[:5]!r}")
    if not (isinstance(lengths, list) and len(lengths) == len(paths)):
        log.info(f"{root / INFO_NAME} gives no shard_lengths for {split}: counting the samples of {len(paths)} shards")
        lengths = [_count_samples(p) for p in paths]
    if "num_samples" in entry and entry["num_samples"] != sum(lengths):
        raise UserError(f"{root / INFO_NAME}: {split} num_samples {entry['num_samples']} is not the sum of its "
                        f"shard_lengths ({sum(lengths)})")
    classes = info.get("classes")
    if classes is None and (root / CLASSES_NAME).is_file():
        classes = [line.split()[0] for line in read_lines(root / CLASSES_NAME) if line.strip()]
    if classes and not (isinstance(classes, list) and all(isinstance(c, str) and c for c in classes)):
        raise UserError(f"{root / INFO_NAME}: \"classes\" must be a list of wnids, got {str(classes)[:100]}")
    if not classes:
        raise UserError(f"{root}: no class list: add \"classes\" (the sorted wnids) to {INFO_NAME}, or a "
                        f"{CLASSES_NAME} with one wnid per line in sorted order (e.g. Kaggle's LOC_synset_mapping.txt)")
    check_class_order(classes, root / INFO_NAME)
    return ShardSplit(paths, tuple(int(n) for n in lengths), tuple(classes))


def verdict_bytes(verdict: Verdict, size: int) -> bytes:
    """A sample's CHECK_KEY member: its image's verdict, for an image of `size` bytes."""
    return f"{int(verdict.check)}\t{size}\t{' '.join(verdict.note.split())}".encode()


def read_verdict(parts: dict, tar: tarfile.TarFile, image: tarfile.TarInfo) -> Verdict:
    """The verdict a shard holds on a sample's image; UNCHECKED where it holds none, or one made for an image
    of another size (a hand-edited shard: the image is checked as it is read)."""
    if CHECK_KEY not in parts:
        return UNCHECKED
    try:
        kind, size, note = tar.extractfile(parts[CHECK_KEY]).read().decode().split("\t", 2)
        return Verdict(Check(int(kind)), note) if int(size) == image.size else UNCHECKED
    except ValueError:  # not three fields, not numbers, not a Check, not UTF-8
        return UNCHECKED


def decode_sample(data: bytes, label: int, where: str, transform, index: int, verdict: Verdict = UNCHECKED):
    """(transform(image), label), or (None, label, Unreadable) as vgg.data.datasets.folders.ImageFolder gives them.
    verdict: the image's check where the shard holds it (read_verdict); unchecked, the transform checks it."""
    if verdict.check == Check.DAMAGED:
        return None, label, Unreadable(where, verdict.note)
    try:
        if transform is not None and index is not None:  # the training transform: it opens the bytes itself
            return transform(data, index, verdict.check), label
        with Image.open(io.BytesIO(data)) as image:
            mark_checked(image, verdict.check)
            if transform is None:
                return load_rgb(image), label
            return transform(image), label
    except DECODE_ERRORS as e:
        return None, label, Unreadable(where, " ".join(f"{type(e).__name__}: {e}".split()))


def image_and_label(key: str, parts: dict, tar: tarfile.TarFile, path: Path) -> tuple[tarfile.TarInfo, int]:
    """A sample's image member and its class index (read from its .cls member)."""
    image = next((parts[ext] for ext in IMAGE_KEYS if ext in parts), None)
    if image is None or "cls" not in parts:
        raise UserError(f"{path}: sample {key} lacks a .jpg or .cls member (has: {', '.join(sorted(parts))})")
    return image, int(tar.extractfile(parts["cls"]).read().decode().strip())

