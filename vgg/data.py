"""Reading ImageNet: the class-folder dataset, batching, loaders, dataset statistics, sorting val.

Layout (data/README.md): `<root>/train/<wnid>/*.JPEG` and `<root>/val/<wnid>/*.JPEG`. Class indices
are the sorted wnids, as in torchvision and the original Caffe release. The official validation
release is one flat folder plus a ground-truth file; sort it once with

    python -m vgg.data sort-val --val-dir VAL --labels LABELS [--devkit-classes CLASSES]

Scanning the 1.28 M training files takes a while, so the file list is cached next to the split
(`<split>/.vgg_filelist.json`, or under ~/.cache/vgg-imagenet/ when the data folder is read-only) and
rescanned only when the class folders (their names or modification times) change.

Dataset statistics (paper §2.1; AlexNet §4.1): mean RGB and the eigen-decomposition of the RGB
covariance, computed once from a sample of training images and cached as `<root>/vgg_stats.json`.
"""

import argparse
import errno
import hashlib
import json
import logging
import os
import random
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from vgg.distributed import progress_bar
from vgg.errors import UserError
from vgg.transforms import EvalTransform, TrainTransform, load_rgb

log = logging.getLogger(__name__)  # a child of the "vgg" logger that vgg.distributed sets up

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FILELIST_NAME = ".vgg_filelist.json"
FILELIST_VERSION = 1
STATS_NAME = "vgg_stats.json"
STATS_SIDE = 64  # images are rescaled to this smallest side for the statistics (each weighs alike)

# Everything PIL raises on a file it cannot decode: missing/empty/not an image (UnidentifiedImageError,
# an OSError), truncated data (OSError), broken headers (SyntaxError, ValueError, struct.error, EOFError)
# and absurd sizes (DecompressionBombError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def user_cache_dir() -> Path:
    """Where caches go when the data folder is read-only: $XDG_CACHE_HOME/vgg-imagenet or ~/.cache/..."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vgg-imagenet"


def _cache_paths(folder: Path, name: str) -> list[Path]:
    """The cache file beside the data first, then a per-folder file in the user cache."""
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return [folder / name, user_cache_dir() / f"{key}-{name.lstrip('.')}"]


def _read_json(paths: list[Path], is_valid) -> dict | None:
    """The first cache file (in `paths` order) that parses and passes `is_valid`."""
    for path in paths:
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and is_valid(content):
            return content
    return None


def _write_json(paths: list[Path], content) -> Path | None:
    """Write atomically to the first writable location; None if none is (the cache is then skipped)."""
    text = json.dumps(content)
    for path in paths:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
            return path
        except OSError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    return None


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------

def _is_symlink_loop(entry: os.DirEntry, ancestors=frozenset()) -> bool:
    """A symlink that never resolves (ELOOP: it points at itself, or round a circle), or a folder
    symlink back to one of `ancestors` (a class folder that would hold the split itself)."""
    if not entry.is_symlink():
        return False
    try:
        os.stat(entry.path)
    except OSError as e:  # other errors (a dangling link) are left to is_dir()/is_file(), as before
        return e.errno == errno.ELOOP
    return Path(entry.path).resolve() in ancestors


def _class_folders(split_dir: Path) -> tuple[dict[str, int], list[str]]:
    """Class folder name -> its modification time (ns), for every visible subfolder (symlinked
    folders included), and the symlink loops left out."""
    folders, loops = {}, []
    ancestors = frozenset([split_dir.resolve(), *split_dir.resolve().parents])
    with os.scandir(split_dir) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_symlink_loop(entry, ancestors):
                loops.append(entry.name)
            elif entry.is_dir():
                folders[entry.name] = entry.stat().st_mtime_ns
    return folders, loops


def _scan_class(folder: Path) -> tuple[list[str], list[str]]:
    """The sorted image file names in a class folder, and the symlink loops left out."""
    names, loops = [], []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith(".") or not e.name.lower().endswith(IMG_EXTENSIONS):
                continue
            if _is_symlink_loop(e):
                loops.append(f"{folder.name}/{e.name}")
            elif e.is_file():
                names.append(e.name)
    return sorted(names), loops


_warned: set[str] = set()


def _warn_once(message: str, key: str | None = None) -> None:
    """Log a warning once per process for each `key` (default: the message itself); a run builds the
    same ImageFolder more than once and meets the same unreadable files every epoch."""
    key = message if key is None else key
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


class Unreadable(NamedTuple):
    """A file that could not be read or decoded, and why (one line)."""

    path: str
    reason: str


def warn_unreadable(files) -> None:
    """One warning line per unreadable file per process, from the main process.

    Datasets do not log: they run in DataLoader workers, whose lines would reach stderr unordered,
    every epoch, splitting a live progress bar. They return an `Unreadable` instead, which the
    collate functions pass on to the loop in the main process, which calls this.
    """
    for file in files:
        _warn_once(f"warning: skipping unreadable image {file.path} ({file.reason})", key=f"unreadable:{file.path}")


def list_files(split_dir) -> dict[str, list[str]]:
    """{wnid: sorted image file names} for `split_dir/<wnid>/*`, from the cache when it is current.

    The cache is keyed on the class folders' names and modification times: adding, removing or
    renaming a file changes its folder's mtime, so the cache is rebuilt; rewriting a file does not
    matter (only the names are cached).

    Symlink loops (a link to itself or round a circle, a class-folder link back to a parent folder)
    would crash or corrupt the scan: they are left out and counted in one warning. An empty class
    folder stays a class (the class indices must match the other split's) with one warning.
    """
    split_dir = Path(split_dir)
    folders, loops = _class_folders(split_dir)
    paths = _cache_paths(split_dir, FILELIST_NAME)
    cached = _read_json(paths, lambda c: c.get("version") == FILELIST_VERSION and c.get("folders") == folders
                        and isinstance(c.get("files"), dict) and isinstance(c.get("loops", []), list))
    if cached is not None:
        files = cached["files"]
        loops += cached.get("loops", [])
    else:
        files, class_loops = {}, []
        for wnid in sorted(folders):
            files[wnid], found = _scan_class(split_dir / wnid)
            class_loops += found
        loops += class_loops
        _write_json(paths, {"version": FILELIST_VERSION, "folders": folders, "files": files,
                            "loops": class_loops})
    if loops:
        _warn_once(f"warning: skipped {len(loops)} symlink loop(s) in {split_dir}: {', '.join(sorted(loops)[:5])}"
                   f"{' ...' if len(loops) > 5 else ''}")
    empty = [wnid for wnid, names in files.items() if not names]
    if empty:
        _warn_once(f"warning: {len(empty)} class folder(s) in {split_dir} hold no images, kept as classes: "
                   f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
    return files


class ImageFolder(Dataset):
    """`split_dir/<wnid>/<image>` -> (transform(image), class index), ImageNet's layout; a
    `TrainTransform` is called as transform(path, index), as its random draws depend on the index (it
    opens the file itself: a colour JPEG's header is read by libjpeg rather than PIL, issue 16).

    classes: the class order (index = position); default the sorted folder names. Pass the training
    classes for a validation split so the labels agree (every folder must be one of them).

    `__getitem__` hands other transforms a PIL image straight from `Image.open` (not yet decoded, so the
    transform can decode at a reduced scale, see vgg.transforms.load_rgb); with transform=None it
    returns the decoded RGB PIL image. A file that cannot be decoded (empty, truncated, not an image)
    gives (None, label, Unreadable(path, reason)), silently (this runs in DataLoader workers):
    collate_batch drops it and hands the Unreadable on to the main process (see warn_unreadable).
    """

    def __init__(self, split_dir, transform=None, classes=None):
        self.root = Path(split_dir)
        if not self.root.is_dir():
            raise UserError(f"image folder {self.root} not found (expected {self.root}/<wnid>/*.JPEG)")
        files = list_files(self.root)
        if not files:
            loose = [p.name for p in self.root.iterdir() if p.name.lower().endswith(IMG_EXTENSIONS)]
            hint = (f"; it holds {len(loose)} images directly: sort them into class folders with "
                    "`python -m vgg.data sort-val` (see data/README.md)") if loose else ""
            raise UserError(f"no class folders in {self.root}: expected {self.root}/<wnid>/*.JPEG{hint}")
        if classes is None:
            classes = sorted(files)
        unknown = sorted(set(files) - set(classes))
        if unknown:
            raise UserError(f"{self.root} has class folders not among the {len(classes)} classes given: "
                            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        self.classes = list(classes)
        self.class_to_idx = {wnid: i for i, wnid in enumerate(self.classes)}
        # The samples as three numpy arrays, not a list of (path, label) tuples: DataLoader workers see
        # the dataset through fork's copy-on-write pages, and reading a Python object writes its
        # reference count, which copies its page: a list of 1.28 M tuples grows each worker by some
        # 250 MB over an epoch. The file names relative to the root, joined into one byte buffer, with
        # offsets: names of any length cost their bytes only.
        names = [os.fsencode(f"{wnid}/{name}") for wnid in self.classes for name in files.get(wnid, [])]
        if not names:
            raise UserError(f"no images in the class folders of {self.root} "
                            f"(allowed extensions: {', '.join(IMG_EXTENSIONS)})")
        self._names = np.frombuffer(b"".join(names), dtype=np.uint8)
        self._offsets = np.cumsum([0] + [len(name) for name in names], dtype=np.int64)
        self.labels = np.array([self.class_to_idx[wnid] for wnid in self.classes for _ in files.get(wnid, [])],
                               dtype=np.int64)
        self.transform = transform

    def path(self, index: int) -> str:
        name = self._names[self._offsets[index]:self._offsets[index + 1]].tobytes()
        return os.path.join(self.root, os.fsdecode(name))

    @property
    def samples(self) -> list[tuple[str, int]]:
        """Every (path, class index), as a new list (for inspection; the loader reads the arrays)."""
        return [(self.path(i), int(label)) for i, label in enumerate(self.labels)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list) -> list:
        """A batch's samples (the DataLoader's call). Indices from an `EpochTagged` sampler come as
        (epoch, index): the epoch goes to this process's transform (a persistent worker's own copy)."""
        if indices and isinstance(indices[0], tuple):
            self.transform.set_epoch(indices[0][0])  # one epoch a pass, hence a batch
            indices = [index for _, index in indices]
        return [self[index] for index in indices]

    def __getitem__(self, index: int):
        path, label = self.path(index), int(self.labels[index])
        try:
            if isinstance(self.transform, TrainTransform):  # its draws are a function of the index
                return self.transform(path, index), label  # it opens the file: a colour JPEG without PIL
            with Image.open(path) as image:
                if self.transform is None:
                    return load_rgb(image), label
                return self.transform(image), label
        except DECODE_ERRORS as e:
            return None, label, Unreadable(path, " ".join(f"{type(e).__name__}: {e}".split()))

    def __repr__(self) -> str:
        return (f"ImageFolder({str(self.root)!r}: {len(self)} images, {len(self.classes)} classes, "
                f"transform={self.transform!r})")


# --------------------------------------------------------------------------------------------------
# Batching and loading
# --------------------------------------------------------------------------------------------------

class EpochTagged(Sampler):
    """`sampler`'s indices as (epoch, index), the epoch read from `sampler.epoch` when a pass starts.

    Persistent DataLoader workers keep the dataset copy they were started with, so a `set_epoch` on
    the main process's transform would never reach them: the epoch travels with each index instead
    (ImageFolder.__getitems__ hands it to its TrainTransform, whose draws depend on it).
    """

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def split_unreadable(items) -> tuple[list, list[Unreadable]]:
    """ImageFolder items -> (the readable (image, label, ...) items, the Unreadable of the others)."""
    return [item for item in items if item[0] is not None], [item[2] for item in items if item[0] is None]


def collate_batch(items):
    """[(uint8 [3,H,W], label) or (None, label, Unreadable)] -> (uint8 [B,3,H,W], int64 labels [B],
    list of Unreadable). Training items hold a `vgg.transforms.TrainCrop` instead of the image: the
    batch then holds TrainCrop(uint8 [B,3,H,W], alphas [B,3]).

    Unreadable images are dropped; their Unreadable records travel with the batch, so the main
    process can warn once per file and report an epoch's skips (the workers are separate processes).
    All images must have the same size.
    """
    kept, unreadable = split_unreadable(items)
    labels = torch.tensor([item[1] for item in kept], dtype=torch.int64)
    if not kept:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), labels, unreadable
    # default_collate stacks straight into shared memory when running in a worker (no extra copy).
    images = torch.utils.data.default_collate([item[0] for item in kept])
    return images, labels, unreadable


def collate_list(items):
    """Like collate_batch for images of different sizes: (list of uint8 [3,H,W], labels [B], list of Unreadable)."""
    kept, unreadable = split_unreadable(items)
    labels = torch.tensor([item[1] for item in kept], dtype=torch.int64)
    return [item[0] for item in kept], labels, unreadable


def worker_init_fn(worker_id: int) -> None:
    """Seed python's `random`, numpy and torch in a DataLoader worker from torch.initial_seed().

    The DataLoader sets each worker's torch seed to base_seed + worker_id, with base_seed drawn from
    the loader's generator every time an iterator (an epoch) starts: so workers differ, epochs differ,
    and a loader built with the same seed repeats exactly. Seeding the other two RNGs from it makes
    any transform that uses them follow the same rule.
    """
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loader(dataset, *, batch_size: int, shuffle: bool = False, workers: int, collate_fn,
                 seed: int = 0, distributed: bool = False, drop_last: bool = False, sampler=None) -> DataLoader:
    """DataLoader with `workers` processes, pinned memory (on CUDA) and per-worker seeding.

    seed: the loader's generator, which drives the shuffle order and the workers' seeds (for transforms
    that draw from torch's RNG; TrainTransform draws from each sample's own generator instead);
    build a loader per epoch with a seed that depends on the epoch, or reuse one loader (each pass
    draws new seeds from the generator). distributed: a DistributedSampler over this rank's share
    (call `loader.sampler.set_epoch(e)` each epoch); the rank is mixed into the generator's seed so
    ranks do not share an augmentation stream. sampler: a custom sampler (then `shuffle` is ignored).
    """
    rank = 0
    if distributed:
        rank = torch.distributed.get_rank()
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else None,
                      sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                      worker_init_fn=worker_init_fn, generator=generator,
                      persistent_workers=workers > 0)


# --------------------------------------------------------------------------------------------------
# Dataset statistics (paper §2.1 mean subtraction; AlexNet §4.1 PCA colour shift)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetStats:
    """The training set's colour statistics.

    mean_rgb: mean R, G, B on the 0..255 scale (subtracted from every pixel, paper §2.1).
    eigval, eigvec: eigenvalues (descending) and eigenvectors of the 3x3 RGB covariance of pixel
    values scaled to [0, 1] (AlexNet §4.1's convention); eigvec[i][j] is component i (R, G, B) of
    eigenvector j, i.e. the columns are the eigenvectors. Their signs are arbitrary (the colour
    shift's alphas are symmetric).
    """

    mean_rgb: tuple[float, float, float]
    eigval: tuple[float, float, float]
    eigvec: tuple[tuple[float, float, float], ...]

    def to_dict(self) -> dict:
        return {"mean_rgb": list(self.mean_rgb), "eigval": list(self.eigval),
                "eigvec": [list(row) for row in self.eigvec]}

    @classmethod
    def from_dict(cls, d) -> "DatasetStats":
        """From `to_dict()`'s output (a checkpoint's "stats", a JSON file); extra keys of the stats
        cache (num_images, seed, train_dir, skipped) are allowed, anything else is an error."""
        allowed = {"mean_rgb", "eigval", "eigvec", "num_images", "seed", "train_dir", "skipped"}
        if not isinstance(d, dict):
            raise UserError(f"dataset statistics must be a mapping with keys mean_rgb, eigval, eigvec; got {d!r}")
        unknown = sorted(set(d) - allowed)
        missing = sorted({"mean_rgb", "eigval", "eigvec"} - set(d))
        if unknown or missing:
            raise UserError(f"dataset statistics: unknown keys {unknown}, missing keys {missing}; "
                            f"allowed: mean_rgb, eigval, eigvec (+ {sorted(allowed - {'mean_rgb', 'eigval', 'eigvec'})})")
        try:
            mean = np.asarray(d["mean_rgb"], dtype=np.float64)
            eigval = np.asarray(d["eigval"], dtype=np.float64)
            eigvec = np.asarray(d["eigvec"], dtype=np.float64)
        except (TypeError, ValueError):
            raise UserError(f"dataset statistics must hold numbers: {d!r}") from None
        if mean.shape != (3,) or eigval.shape != (3,) or eigvec.shape != (3, 3) or not (
                np.isfinite(mean).all() and np.isfinite(eigval).all() and np.isfinite(eigvec).all()):
            raise UserError("dataset statistics must be mean_rgb: 3 numbers, eigval: 3 numbers, "
                            f"eigvec: 3x3 numbers; got {d['mean_rgb']!r}, {d['eigval']!r}, {d['eigvec']!r}")
        return cls(mean_rgb=tuple(mean.tolist()), eigval=tuple(eigval.tolist()),
                   eigvec=tuple(tuple(row) for row in eigvec.tolist()))


# The well-known ImageNet values: mean RGB as in the Caffe VGG release; the PCA of AlexNet §4.1 as
# published with fb.resnet.torch (pixels scaled to [0, 1]). Use them with `--stats imagenet`.
IMAGENET_STATS = DatasetStats(
    mean_rgb=(123.68, 116.78, 103.94),
    eigval=(0.2175, 0.0188, 0.0045),
    eigvec=((-0.5675, 0.7192, 0.4009),
            (-0.5808, -0.0045, -0.8140),
            (-0.5836, -0.6948, 0.4203)),
)


def compute_stats(train_dir, *, num_images: int, seed: int = 0, workers: int | None = None,
                  progress_every_s: float = 30.0) -> tuple[DatasetStats, int, int]:
    """Mean RGB and RGB-covariance PCA from `num_images` random training images (all if fewer).

    Each image is rescaled to a smallest side of STATS_SIDE pixels first (decoded at a reduced
    scale, so this is fast), so every image weighs about the same. Unreadable images are skipped
    (one warning each). Returns (stats, number of images used, number of images skipped).
    """
    dataset = ImageFolder(train_dir, EvalTransform(scale=STATS_SIDE))
    count = min(_check_positive("num_images", num_images), len(dataset))
    chosen = np.sort(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False))
    return stats_of_images(torch.utils.data.Subset(dataset, chosen.tolist()), where=f"the {count} sampled images in "
                           f"{train_dir}", seed=seed, workers=workers, progress_every_s=progress_every_s)


def stats_of_images(dataset, *, where: str, seed: int = 0, workers: int | None = None,
                    progress_every_s: float = 30.0) -> tuple[DatasetStats, int, int]:
    """The statistics of every image of `dataset` ((uint8 [3,H,W], label) items; unreadable ones
    skipped with one warning each) -> (stats, images used, images skipped). `where` names the
    images in the progress bar and the error raised when none can be decoded."""
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    loader = build_loader(dataset, batch_size=32, workers=workers, collate_fn=collate_list, seed=seed)
    total = np.zeros(3)
    outer = np.zeros((3, 3))
    pixels, used, skipped = 0, 0, 0
    with progress_bar(total=len(dataset), desc=f"dataset statistics ({where})", unit="img",
                      every_s=progress_every_s) as bar:
        for images, _, unreadable in loader:
            warn_unreadable(unreadable)
            for image in images:
                x = image.reshape(3, -1).double().numpy() / 255.0
                total += x.sum(axis=1)
                outer += x @ x.T
                pixels += x.shape[1]
            used, skipped = used + len(images), skipped + len(unreadable)
            bar.update(len(images) + len(unreadable))
    if pixels == 0:
        raise UserError(f"none of {where} could be decoded")
    mean = total / pixels
    cov = outer / pixels - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    eigval, eigvec = eigval[::-1].clip(min=0), eigvec[:, ::-1]
    eigvec = eigvec * np.where(eigvec[0] < 0, -1.0, 1.0)  # a fixed sign: first component >= 0
    stats = DatasetStats(mean_rgb=tuple((255.0 * mean).tolist()), eigval=tuple(eigval.tolist()),
                         eigvec=tuple(tuple(row) for row in eigvec.tolist()))
    return stats, used, skipped


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def load_or_compute_stats(train_dir, *, num_images: int, seed: int = 0, workers: int | None = None,
                          progress_every_s: float = 30.0) -> DatasetStats:
    """The training set's statistics from `<root>/vgg_stats.json` (root = train_dir's parent), or
    computed by `compute_stats` (with a progress bar) and cached there (or under ~/.cache/vgg-imagenet/
    when the data folder is read-only). The cache is reused when it was made with the same
    num_images and seed."""
    train_dir = Path(train_dir)
    paths = _cache_paths(train_dir.parent, STATS_NAME)
    def is_valid(content: dict) -> bool:
        try:
            DatasetStats.from_dict(content)
        except UserError:
            return False  # a damaged cache: compute again
        return content.get("num_images") == num_images and content.get("seed") == seed

    cached = _read_json(paths, is_valid)
    if cached is not None:
        return DatasetStats.from_dict(cached)
    stats, used, skipped = compute_stats(train_dir, num_images=num_images, seed=seed, workers=workers,
                                         progress_every_s=progress_every_s)
    where = _write_json(paths, {**stats.to_dict(), "num_images": num_images, "seed": seed,
                                "train_dir": str(train_dir), "skipped": skipped})
    # The images actually used: fewer than asked for when the folder holds fewer, minus unreadable ones.
    log.info(f"dataset statistics from {used} images of {train_dir}"
             + (f" ({skipped} unreadable skipped)" if skipped else "") + ": mean RGB "
             f"{', '.join(f'{v:.2f}' for v in stats.mean_rgb)}; eigenvalues "
             f"{', '.join(f'{v:.4f}' for v in stats.eigval)}" + (f"; cached in {where}" if where else ""))
    return stats


# --------------------------------------------------------------------------------------------------
# Sorting the official flat validation folder into class folders
# --------------------------------------------------------------------------------------------------

_PLAIN_NAME = re.compile(r"^[^/\\]+$")


def _check_name(kind: str, name: str, where: str) -> str:
    if not _PLAIN_NAME.match(name) or name in (".", "..") or name.startswith("."):
        raise UserError(f"{where}: {kind} {name!r} is not a plain file/folder name")
    return name


def read_devkit_classes(path) -> list[str]:
    """The wnids in ILSVRC2012_ID order (ID 1 first): from the devkit's data/meta.mat, or a text file
    with one wnid per line (extra words after the wnid, as in synset_words.txt, are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"devkit classes file {path} not found")
    if path.suffix == ".mat":
        import scipy.io

        try:
            synsets = scipy.io.loadmat(str(path), squeeze_me=True)["synsets"]
            leaves = sorted((int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets if int(s["num_children"]) == 0)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not the devkit's meta.mat (a 'synsets' table with ILSVRC2012_ID, "
                            f"WNID, num_children): {e}") from None
        if [i for i, _ in leaves] != list(range(1, len(leaves) + 1)):
            raise UserError(f"{path}: the leaf synsets' ILSVRC2012_IDs are not 1..{len(leaves)}")
        return [wnid for _, wnid in leaves]
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    for wnid in wnids:
        _check_name("wnid", wnid, str(path))
    if len(set(wnids)) != len(wnids):
        raise UserError(f"{path}: a wnid appears twice; expected one wnid per line in ILSVRC2012_ID order")
    if not wnids:
        raise UserError(f"{path} is empty; expected one wnid per line in ILSVRC2012_ID order")
    return wnids


def read_val_labels(labels_file, devkit_classes=None) -> dict[str, str]:
    """{file name: wnid} from either labels format:

    * `<filename> <wnid>` per line;
    * the devkit's ILSVRC2012_validation_ground_truth.txt: line k holds the ILSVRC2012_ID (1-based)
      of ILSVRC2012_val_<k, 8 digits>.JPEG; needs `devkit_classes` (see read_devkit_classes);
    * Kaggle's LOC_val_solution.csv: a header `ImageId,PredictionString`, then `<ImageId>,<wnid> <box>
      [<wnid> <box> ...]`: the label is the first wnid, the file <ImageId>.JPEG.
    """
    path = Path(labels_file)
    if not path.is_file():
        raise UserError(f"labels file {path} not found")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines and lines[0].strip().replace(" ", "") == "ImageId,PredictionString":
        return _read_kaggle_labels(path, lines[1:])
    rows = [line.split() for line in lines]
    if not rows:
        raise UserError(f"labels file {path} is empty")
    if all(len(r) == 1 and r[0].isdigit() for r in rows):
        if devkit_classes is None:
            raise UserError(f"{path} holds class IDs (the devkit's ground truth): pass --devkit-classes "
                            "(the devkit's data/meta.mat, or a file of wnids in ILSVRC2012_ID order)")
        wnids = read_devkit_classes(devkit_classes)
        labels = {}
        for k, (token,) in enumerate(rows, start=1):
            class_id = int(token)
            if not 1 <= class_id <= len(wnids):
                raise UserError(f"{path} line {k}: class ID {class_id} is outside 1..{len(wnids)} "
                                f"({devkit_classes} lists {len(wnids)} classes)")
            labels[f"ILSVRC2012_val_{k:08d}.JPEG"] = wnids[class_id - 1]
        return labels
    labels = {}
    for k, row in enumerate(rows, start=1):
        if len(row) != 2:
            raise UserError(f"{path} line {k}: expected '<filename> <wnid>' or one class ID per line, "
                            f"got {' '.join(row)!r}")
        name, wnid = _check_name("file name", row[0], f"{path} line {k}"), _check_name("wnid", row[1], f"{path} line {k}")
        if labels.get(name, wnid) != wnid:
            raise UserError(f"{path} line {k}: {name} is labelled both {labels[name]} and {wnid}")
        labels[name] = wnid
    return labels


def _read_kaggle_labels(path: Path, lines: list[str]) -> dict[str, str]:
    """{<ImageId>.JPEG: first wnid of PredictionString} from LOC_val_solution.csv's lines after the header."""
    labels = {}
    for k, line in enumerate(lines, start=2):
        image_id, _, prediction = line.partition(",")
        tokens = prediction.split()
        if not image_id.strip() or not tokens:
            raise UserError(f"{path} line {k}: expected '<ImageId>,<wnid> <x_min> <y_min> <x_max> <y_max> ...', "
                            f"got {line.strip()!r}")
        name = _check_name("ImageId", image_id.strip(), f"{path} line {k}") + ".JPEG"
        wnid = _check_name("wnid", tokens[0], f"{path} line {k}")
        if labels.get(name, wnid) != wnid:
            raise UserError(f"{path} line {k}: {name} is labelled both {labels[name]} and {wnid}")
        labels[name] = wnid
    if not labels:
        raise UserError(f"labels file {path} holds only the header ImageId,PredictionString")
    return labels


def sort_val(val_dir, labels_file, devkit_classes=None) -> dict:
    """Move `val_dir/<file>` to `val_dir/<wnid>/<file>` for every labelled file.

    Checks everything before moving anything; files already in their class folder are left alone
    (so an interrupted run can be repeated). Returns counts: moved, already_sorted, classes, unlabelled.
    """
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise UserError(f"validation folder {val_dir} not found")
    labels = read_val_labels(labels_file, devkit_classes)
    present = {p.name for p in val_dir.iterdir() if p.is_file()}
    to_move, already = [], 0
    missing = []
    for name, wnid in labels.items():
        if name in present:
            to_move.append((name, wnid))
        elif (val_dir / wnid / name).is_file():
            already += 1
        else:
            missing.append(name)
    if missing:
        raise UserError(f"{len(missing)} files named in {labels_file} are not in {val_dir} "
                        f"(first: {', '.join(sorted(missing)[:3])}); nothing was moved")
    for wnid in sorted({w for _, w in to_move}):
        if (val_dir / wnid).exists() and not (val_dir / wnid).is_dir():
            raise UserError(f"{val_dir / wnid} exists and is not a folder; nothing was moved")
    for name, wnid in to_move:
        (val_dir / wnid).mkdir(exist_ok=True)
        os.replace(val_dir / name, val_dir / wnid / name)
    unlabelled = len(present - set(labels))
    return {"moved": len(to_move), "already_sorted": already, "classes": len(set(labels.values())),
            "unlabelled": unlabelled}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vgg.data", description="ImageNet data utilities")
    commands = parser.add_subparsers(dest="command", required=True)
    sort = commands.add_parser("sort-val", help="sort the flat official val folder into <wnid>/ folders")
    sort.add_argument("--val-dir", required=True, help="the folder of ILSVRC2012_val_*.JPEG files")
    sort.add_argument("--labels", required=True,
                      help="'<filename> <wnid>' per line, or the devkit's ILSVRC2012_validation_ground_truth.txt")
    sort.add_argument("--devkit-classes", default=None,
                      help="for the devkit's ground truth: data/meta.mat, or a file of wnids in ILSVRC2012_ID order")
    prepare = commands.add_parser("prepare", help="write the class-folder layout from an ImageNet download "
                                  "(links where possible; re-runnable)")
    prepare.add_argument("--from", dest="source", required=True, choices=("devkit", "kaggle", "hf"),
                         help="devkit: image-net.org's ILSVRC2012 archives or folders; kaggle: "
                              "imagenet-object-localization-challenge; hf: ILSVRC/imagenet-1k tarballs")
    prepare.add_argument("src", help="the downloaded source folder")
    prepare.add_argument("dest", help="the dataset root to write (train/<wnid>/, val/<wnid>/)")
    prepare.add_argument("--copy", action="store_true", help="copy files instead of linking them")
    shards = commands.add_parser("shards", help="write WebDataset shards (timm/imagenet-1k-wds layout) "
                                 "from class folders")
    shards.add_argument("src", help="a dataset root holding train/<wnid>/ and val/<wnid>/")
    shards.add_argument("dest", help="the folder to write imagenet1k-{train,validation}-*.tar and _info.json to")
    shards.add_argument("--images-per-shard", type=int, default=1252,
                        help="images per shard (1252: ImageNet's train split in 1024 shards)")
    shards.add_argument("--seed", type=int, default=0, help="the shuffle of the training images over the shards")
    stats = commands.add_parser("stats", help="compute (or show the cached) dataset statistics")
    stats.add_argument("--train-dir", required=True, help="the train/ folder")
    stats.add_argument("--num-images", type=int, default=10000, help="training images to sample")
    stats.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "sort-val":
            counts = sort_val(args.val_dir, args.labels, args.devkit_classes)
            print(f"moved {counts['moved']} images into {counts['classes']} class folders under {args.val_dir} "
                  f"({counts['already_sorted']} were already sorted, {counts['unlabelled']} unlabelled files left)")
        elif args.command == "prepare":
            from vgg.prepare import prepare  # (vgg.prepare imports this module)

            counts = prepare(args.source, args.src, args.dest, copy=args.copy)
            done = ", ".join(f"{counts[k]} {k}" for k in ("linked", "symlinked", "copied", "extracted", "present")
                             if counts.get(k))
            print(f"{args.dest}: {counts['classes']} classes, {counts['train']} train and {counts['val']} val "
                  f"images ({done or 'nothing to do'})")
        elif args.command == "shards":
            from vgg.shards import write_shards

            info = write_shards(args.src, args.dest, images_per_shard=args.images_per_shard, seed=args.seed)
            print(f"{args.dest}: " + ", ".join(f"{split} {s['num_samples']} images in {len(s['filenames'])} shards"
                                               for split, s in info["splits"].items()))
        else:
            print(json.dumps(load_or_compute_stats(args.train_dir, num_images=args.num_images,
                                                   seed=args.seed).to_dict(), indent=2))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
