"""WebDataset shards in the layout of timm/imagenet-1k-wds: write them from class folders, train and
evaluate from them (`--data SHARD_DIR`), for runs that outgrow one machine's disk.

    python -m vgg.data shards /data/imagenet /data/imagenet-wds     # once
    python train.py --config A --data /data/imagenet-wds --gpus 8   # streams the shards

A shard folder holds `imagenet1k-train-{0000..NNNN}.tar`, `imagenet1k-validation-{00..NN}.tar` and
`_info.json` (per split: filenames, num_samples, shard_lengths; and `classes`, the sorted wnids).
Each sample is three tar members sharing a key: `<key>.jpg` (the file's bytes, as they were),
`<key>.cls` (the class index as text) and `<key>.json` ({"filename", "wnid", "label"}). Shards are
plain tar files, written here with the standard library's tarfile (the `webdataset` package is not
needed to write or read them, and reads them as they are).

Training streams (`ShardStream`). Each epoch the shards are put in an order drawn from (seed, epoch)
and read as one sequence of all N training images; rank r of W takes its contiguous part, N/W images
(give or take one), and each of its DataLoader workers a contiguous run of whole batches of that: a
rank opens only the shards its part overlaps, skipping at most one shard's leading samples (tar headers
only). A worker shuffles its run through a buffer of SHUFFLE_BUFFER images and makes batches. Every
rank makes the same number of steps (`num_steps`), full batches only, whatever the shard sizes and the
number of workers: as the class folders' loader drops a last short batch, the last images of each
rank's part (fewer than a batch, and other images each epoch as the shard order changes) wait for
another epoch. So no image is trained twice in an epoch, no step is short or empty (an empty one would
still move the weights through momentum and weight decay), and no DDP hang on uneven shards. A
sample's augmentation draws come from sample_generator(seed, epoch, its position in `_info.json`'s
order), as for class folders.

Resume. The order is a pure function of (seed, epoch, number of processes, workers): resuming at an
epoch boundary is exact. A mid-epoch resume skips the batches already trained (their images are read
past, not decoded), and is exact with the same number of processes (the trainer insists) and the same
`--workers`; with another worker count the rest of that epoch is cut differently, so some images
of that one epoch are trained twice and others not at all.

Validation and evaluation read the validation shards by position (`ShardImages`: tar headers scanned
once per process, each image read at its offset), as evaluation files each image's result by position.
"""

import hashlib
import io
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vgg.core.errors import UserError
from vgg.core.progress import get_logger, progress_bar
from vgg.data import cache as vcache
from vgg.data import folders as vfolders
from vgg.data import loaders as vloaders
from vgg.data import stats as vstats
from vgg.data.labels import read_lines
from vgg.data.prepare import check_class_order
from vgg.data.transforms import EvalTransform

log = get_logger()

INFO_NAME = "_info.json"
CLASSES_NAME = "classes.txt"  # for shards whose _info.json lists no classes: one wnid per line, sorted
PREFIX = "imagenet1k"
SPLITS = {"train": "train", "val": "validation"}  # class-folder split -> shard split name (timm's)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000  # images (their JPEG bytes, ~110 kB each on ImageNet) per DataLoader worker


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


def _damaged(path: Path, error: BaseException) -> ShardError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return ShardError(f"shard {path} is damaged or cut short ({reason[:200]}): write it again or download it again")


def _check_count(path: Path, count: int, expected: int) -> None:
    if count != expected:
        raise ShardError(f"shard {path} holds {count} samples where {INFO_NAME} says {expected}: it is damaged "
                         "or cut short; write it again or download it again")


def is_shard_dir(path) -> bool:
    """A folder of WebDataset shards (it holds _info.json) rather than class folders."""
    return bool(path) and (Path(path) / INFO_NAME).is_file()


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # the same bytes on every run
    tar.addfile(info, io.BytesIO(data))


def _key(wnid: str, name: str) -> str:
    """The sample key: the file name without extension (dots replaced: a key holds none), led by the
    wnid unless it already is (ImageNet's training names are), so that keys are unique in a shard."""
    stem = os.path.splitext(name)[0].replace(".", "_")
    return stem if stem.startswith(wnid) else f"{wnid}_{stem}"


def write_shards(src, dest, *, images_per_shard: int = 1252, seed: int = 0) -> dict:
    """Class folders SRC/{train,val}/<wnid>/* -> shards in DEST (see the module docstring); returns _info.json.

    The training images are dealt over the shards in an order drawn from `seed`, so each shard holds
    every class and a stream needs only a small shuffle buffer; the validation images stay in order.
    _info.json is written last: a folder without it is no finished shard folder.
    """
    src, dest = Path(src), Path(dest)
    if isinstance(images_per_shard, bool) or not isinstance(images_per_shard, int) or images_per_shard < 1:
        raise UserError(f"--images-per-shard must be a positive integer, got {images_per_shard!r}")
    files = {}
    for split in SPLITS:
        if not (src / split).is_dir():
            raise UserError(f"{src / split} not found: SRC must hold train/<wnid>/* and val/<wnid>/* "
                            "(see `python -m vgg.data prepare`)")
        files[split] = vfolders.list_files(src / split)
    classes = sorted(files["train"])
    check_class_order(classes, src / "train")
    unknown = sorted(set(files["val"]) - set(classes))
    if unknown:
        raise UserError(f"{src / 'val'} has classes not in train/: {', '.join(unknown[:5])}")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / INFO_NAME).unlink(missing_ok=True)
    info = {"name": "imagenet-1k", "classes": classes, "splits": {}}
    class_index = {wnid: i for i, wnid in enumerate(classes)}
    for split, shard_split in SPLITS.items():
        items = [(wnid, name) for wnid in sorted(files[split]) for name in files[split][wnid]]
        if split == "train":
            items = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
        count = max(1, math.ceil(len(items) / images_per_shard))
        width = max(4 if split == "train" else 2, len(str(count - 1)))
        names, lengths = [], []
        with progress_bar(total=len(items), desc=f"{shard_split} shards", unit="img") as bar:
            for s in range(count):
                part = items[s * images_per_shard:(s + 1) * images_per_shard]
                name = f"{PREFIX}-{shard_split}-{s:0{width}d}.tar"
                tmp = dest / f".{name}.{os.getpid()}.tmp"
                with tarfile.open(tmp, "w") as tar:
                    for wnid, file_name in part:
                        key, label = _key(wnid, file_name), class_index[wnid]
                        _add(tar, f"{key}.jpg", (src / split / wnid / file_name).read_bytes())
                        _add(tar, f"{key}.cls", str(label).encode())
                        _add(tar, f"{key}.json", json.dumps({"filename": f"{wnid}/{file_name}", "wnid": wnid,
                                                             "label": label}).encode())
                        bar.update(1)
                os.replace(tmp, dest / name)
                names.append(name)
                lengths.append(len(part))
        info["splits"][shard_split] = {"name": shard_split, "num_samples": len(items), "filenames": names,
                                       "shard_lengths": lengths}
    (dest / INFO_NAME).write_text(json.dumps(info, indent=1))
    return info


# --------------------------------------------------------------------------------------------------
# Reading: the shard list and its samples
# --------------------------------------------------------------------------------------------------

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


def _iter_samples(path: Path, skip: int = 0):
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
    return sum(1 for _ in _iter_samples(path))


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


def _decode(data: bytes, label: int, where: str, transform, index: int):
    """(transform(image), label), or (None, label, Unreadable) as vgg.data.folders.ImageFolder gives them."""
    try:
        if transform is not None and index is not None:  # the training transform: it opens the bytes itself
            return transform(data, index), label
        with Image.open(io.BytesIO(data)) as image:
            if transform is None:
                return vfolders.load_rgb(image), label
            return transform(image), label
    except vfolders.DECODE_ERRORS as e:
        return None, label, vfolders.Unreadable(where, " ".join(f"{type(e).__name__}: {e}".split()))


def _image_and_label(key: str, parts: dict, tar: tarfile.TarFile, path: Path) -> tuple[tarfile.TarInfo, int]:
    """A sample's image member and its class index (read from its .cls member)."""
    image = next((parts[ext] for ext in IMAGE_KEYS if ext in parts), None)
    if image is None or "cls" not in parts:
        raise UserError(f"{path}: sample {key} lacks a .jpg or .cls member (has: {', '.join(sorted(parts))})")
    return image, int(tar.extractfile(parts["cls"]).read().decode().strip())


# --------------------------------------------------------------------------------------------------
# Training: the stream
# --------------------------------------------------------------------------------------------------

def _read_shard(path: Path, skip: int, take: int, offset: int):
    """(bytes, label, index, where) of samples skip..take-1 of a training shard; ShardError if it is damaged
    or holds fewer samples than _info.json says (tarfile ends a cut tar without a word)."""
    count = skip
    try:
        for i, (key, parts, tar) in enumerate(_iter_samples(path, skip), start=skip):
            if i >= take:
                break
            image, label = _image_and_label(key, parts, tar, path)
            data = tar.extractfile(image).read()
            if len(data) != image.size:
                raise EOFError(f"sample {key} cut short")
            count += 1
            yield data, label, offset + i, f"{path.name}:{key}"
    except SHARD_ERRORS as e:
        raise _damaged(path, e) from None
    _check_count(path, count, take)


def _parts(total: int, n: int) -> list[int]:
    """`total` items dealt into n contiguous parts, the first ones one larger: [7, 7, 6] for (20, 3)."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def _share(steps: int, worker: int, workers: int) -> int:
    """How many of the batches 0..steps-1 a DataLoader with `workers` workers takes from `worker`:
    it asks them in turn (batch j from worker j % workers)."""
    return steps // workers + (1 if worker < steps % workers else 0)


class ShardStream(IterableDataset):
    """This rank's training batches of one epoch, streamed from shards (see the module docstring).

    Yields lists of (TrainCrop, label) / (None, label, Unreadable) items, a batch each: build the
    DataLoader with batch_size=None and vgg.data.loaders.collate_batch (`loader`). `len()` is the number of
    training images (all ranks), as for an ImageFolder.
    """

    def __init__(self, split: ShardSplit, transform, *, batch_size: int, workers: int, seed: int,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = SHUFFLE_BUFFER):
        self.split, self.transform = split, transform
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.classes = list(split.classes)
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return sum(self.split.lengths)

    def fingerprint(self) -> dict:
        """What an epoch's order is built from (as ImageFolder.fingerprint): the shards' names and lengths."""
        listing = "\n".join(f"{path.name}\t{length}" for path, length in zip(self.split.paths, self.split.lengths))
        return {"count": len(self), "sha256": hashlib.sha256(listing.encode()).hexdigest()}

    @property
    def num_steps(self) -> int:
        """Full batches per epoch on every rank: those of the smallest rank's part (any worker count)."""
        return len(self) // self.world_size // self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch to stream, from batch `start_step` on (a mid-epoch resume); before iterating."""
        self.epoch, self.start_step = epoch, start_step
        self.transform.set_epoch(epoch)

    def _range(self, worker: int) -> tuple[int, int]:
        """This rank's worker's [first, stop) in the epoch's sequence of all images: whole batches, as many as
        the DataLoader asks that worker for (it asks the workers in turn)."""
        workers = max(1, self.workers)
        first = sum(_parts(len(self), self.world_size)[:self.rank])
        first += sum(_share(self.num_steps, w, workers) for w in range(worker)) * self.batch_size
        return first, first + _share(self.num_steps, worker, workers) * self.batch_size

    def _samples(self, first: int, stop: int):
        """(bytes, label, index, where) of the epoch's images first..stop-1: the shards in the epoch's order."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.split.paths))
        offsets, position = self.split.offsets, 0
        for shard in order.tolist():
            length, path = self.split.lengths[shard], self.split.paths[shard]
            if position + length > first and position < stop:
                skip, take = max(0, first - position), min(length, stop - position)
                yield from _read_shard(path, skip, take, offsets[shard])
            position += length
            if position >= stop:
                return

    def _shuffled(self, samples, rng):
        buffer = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        stream = self._shuffled(self._samples(*self._range(worker)), rng)
        skip = _share(self.start_step, worker, workers)
        total = _share(self.num_steps, worker, workers)
        for b in range(total):
            batch = [sample for sample in (next(stream, None) for _ in range(self.batch_size)) if sample is not None]
            if b >= skip:
                yield [_decode(data, label, where, self.transform, index) for data, label, index, where in batch]

    def loader(self, *, epoch: int, start_step: int = 0, seed: int = 0):
        """The epoch's DataLoader: `workers` processes (the count num_steps was planned for)."""
        self.set_epoch(epoch, start_step)  # before the loader copies the stream into its workers
        return vloaders.build_loader(self, batch_size=None, workers=self.workers, collate_fn=vloaders.collate_batch,
                                  seed=seed)


# --------------------------------------------------------------------------------------------------
# Validation and evaluation: by position
# --------------------------------------------------------------------------------------------------

class ShardImages(Dataset):
    """A split's images by position: i -> (transform(image), label), or (None, label, Unreadable),
    like vgg.data.folders.ImageFolder. Indexes the tar headers of the split's shards on creation."""

    def __init__(self, split: ShardSplit, transform=None, limit: int | None = None):
        self.split, self.transform, self.classes = split, transform, list(split.classes)
        self.samples = []  # (shard path, image offset, image size, label, key)
        for path, length in zip(split.paths, split.lengths):
            before, size = len(self.samples), path.stat().st_size
            try:
                for key, parts, tar in _iter_samples(path):
                    image, label = _image_and_label(key, parts, tar, path)
                    if image.offset_data + image.size > size:
                        raise EOFError(f"sample {key} cut short")
                    self.samples.append((str(path), image.offset_data, image.size, label, key))
                    if limit is not None and len(self.samples) >= limit:
                        return
            except SHARD_ERRORS as e:
                raise _damaged(path, e) from None
            _check_count(path, len(self.samples) - before, length)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, offset, size, label, key = self.samples[index]
        where = f"{Path(path).name}:{key}"
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:  # the shard went away or cannot be read any more: this image is unreadable
            return None, label, vfolders.Unreadable(where, " ".join(f"{type(e).__name__}: {e}".split()))
        if len(data) != size:
            return None, label, vfolders.Unreadable(where, f"cut short: {len(data)} of {size} bytes")
        return _decode(data, label, where, self.transform, None)


def open_val(root, transform) -> ShardImages:
    """The validation shards of `root` as a dataset by position (evaluation, validation during training)."""
    return ShardImages(open_split(root, SPLITS["val"]), transform)


def open_training_sets(config, *, rank: int, world_size: int, per_rank_batch: int):
    """(the training stream, the validation images) of the shard folder config.data, for vgg.training.run."""
    from vgg.data.transforms import CenterCropTransform, TrainTransform

    if config.data_path == "gpu":
        raise UserError("--data-path gpu reads class folders; shards are decoded by the CPU workers: "
                        "use --data-path cpu with a shard folder")
    train = ShardStream(open_split(config.data, SPLITS["train"]),
                        TrainTransform(crop_size=config.crop_size, scale_min=config.scale_min,
                                       scale_max=config.scale_max, seed=config.seed),
                        batch_size=per_rank_batch, workers=config.workers, seed=config.seed, rank=rank,
                        world_size=world_size)
    val = open_val(config.data, CenterCropTransform(scale=config.test_scale, crop_size=config.crop_size))
    if val.classes != train.classes:
        raise UserError(f"{config.data}: the train and validation splits list different classes")
    return train, val


# --------------------------------------------------------------------------------------------------
# Statistics (paper §2.1; AlexNet §4.1): from the first images of the training shards
# --------------------------------------------------------------------------------------------------

def load_or_compute_stats(train_dir, *, num_images: int, seed: int = 0, workers: int | None = None,
                          progress_every_s: float = 30.0) -> vstats.DatasetStats:
    """vgg.data.stats.load_or_compute_stats for a shard folder (train_dir: `<shard folder>/train`, which need
    not exist): the first `num_images` training images in _info.json's order (`write_shards` dealt them
    over the shards at random, so they are a random sample; so are timm's), cached as vgg_stats_*.json.
    The training stream is not used: a sample of fixed images, read once, by position."""
    root = Path(train_dir).parent
    paths = vcache._cache_paths(root, vstats.stats_cache_name(num_images, seed))
    cached = vcache._read_json(paths, lambda c: vstats.is_valid_cache(c, num_images=num_images, seed=seed))
    if cached is not None:
        return vstats.DatasetStats.from_dict(cached)
    dataset = ShardImages(open_split(root, SPLITS["train"]), EvalTransform(scale=vstats.STATS_SIDE), limit=num_images)
    stats, used, skipped = vstats.stats_of_images(dataset, where=f"the first {len(dataset)} training images in {root}",
                                                 seed=seed, workers=workers, progress_every_s=progress_every_s)
    vcache._write_json(paths, {**stats.to_dict(), "num_images": num_images, "seed": seed,
                              "train_dir": str(root), "skipped": skipped})
    log.info(f"dataset statistics from the first {used} training images of {root}")
    return stats
