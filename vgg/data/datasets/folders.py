"""ImageNet as class folders: the file list (scanned once, cached), the dataset, unreadable files.

Layout (data/README.md): `<root>/train/<wnid>/*.JPEG` and `<root>/val/<wnid>/*.JPEG`. Class indices
are the sorted wnids, as in torchvision and the original Caffe release. Scanning the 1.28 M training
files takes a while, so the file list is cached next to the split (`<split>/.vgg_filelist.json`, or
under ~/.cache/vgg-imagenet/ when the data folder is read-only) and rescanned only when the class
folders (their names or modification times) change.
"""

import errno
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vgg.core.errors import UserError
from vgg.data.batches.decode import Unreadable, mark_checked
from vgg.data.batches.jpeg import DECODE_ERRORS, Check
from vgg.data.batches.transforms import TrainTransform, load_rgb
from vgg.data.datasets import checks as vchecks
from vgg.data.datasets.cache import cache_paths, read_json, write_json

log = logging.getLogger(__name__)  # a child of the "vgg" logger that vgg.core.progress sets up

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FILELIST_NAME = ".vgg_filelist.json"
FILELIST_VERSION = 1


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


def warn_unreadable(files) -> None:
    """One warning line per unreadable file per process, from the main process.

    Datasets do not log: they run in DataLoader workers, whose lines would reach stderr unordered,
    every epoch, splitting a live progress bar. They return an `Unreadable` instead, which the
    collate functions pass on to the loop in the main process, which calls this.
    """
    for file in files:
        _warn_once(f"warning: skipping unreadable image {file.path} ({file.reason})", key=f"unreadable:{file.path}")


def _is_file_list(files, folders: dict) -> bool:
    """A cached {wnid: [file name]} for exactly these class folders, of plain file names (a damaged or
    hand-edited cache could hold anything: numbers, `../x`, a folder that is gone)."""
    return (isinstance(files, dict) and sorted(files) == sorted(folders)
            and all(isinstance(names, list) and all(isinstance(n, str) and n not in ("", ".", "..") and "/" not in n
                                                    for n in names) for names in files.values()))


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
    paths = cache_paths(split_dir, FILELIST_NAME)
    cached = read_json(paths, lambda c: c.get("version") == FILELIST_VERSION and c.get("folders") == folders
                        and _is_file_list(c.get("files"), folders)
                        and isinstance(c.get("loops", []), list) and all(isinstance(n, str) for n in c.get("loops", [])))
    if cached is not None:
        files = cached["files"]
        loops += cached.get("loops", [])
    else:
        files, class_loops = {}, []
        for wnid in sorted(folders):
            files[wnid], found = _scan_class(split_dir / wnid)
            class_loops += found
        loops += class_loops
        write_json(paths, {"version": FILELIST_VERSION, "folders": folders, "files": files,
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
    transform can decode at a reduced scale, see vgg.data.batches.transforms.load_rgb); with transform=None it
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
        self.checks = vchecks.check_files(self.root, self._names, self._offsets)  # once per dataset, cached

    def fingerprint(self) -> dict:
        """What an epoch's order is built from: the number of files and a hash of their sorted list
        (checkpoints keep it, so that a mid-epoch resume can tell a changed training set, issue 29)."""
        digest = hashlib.sha256(self._names.tobytes())
        digest.update(self._offsets.tobytes())
        return {"count": len(self), "sha256": digest.hexdigest()}

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
        check, note = self.checks.verdict(index)
        if check == Check.DAMAGED:
            return None, label, Unreadable(path, note)
        try:
            if isinstance(self.transform, TrainTransform):  # its draws are a function of the index
                return self.transform(path, index, check), label  # it opens the file: a JPEG without PIL
            with Image.open(path) as image:
                mark_checked(image, check)
                if self.transform is None:
                    return load_rgb(image), label
                return self.transform(image), label
        except DECODE_ERRORS as e:
            return None, label, Unreadable(path, " ".join(f"{type(e).__name__}: {e}".split()))

    def __repr__(self) -> str:
        return (f"ImageFolder({str(self.root)!r}: {len(self)} images, {len(self.classes)} classes, "
                f"transform={self.transform!r})")


def require_a_readable_image(dataset, where) -> None:
    """UserError unless some image of `dataset` (ImageFolder-like items) decodes: a validation set of
    unreadable files would report 100 % error and drop the lr every epoch (issue 29). Stops at the first
    readable image, so a sound set costs one decode."""
    unreadable = []
    for index in range(len(dataset)):
        item = dataset[index]
        if item[0] is not None:
            return
        unreadable.append(item[2])
    example = f", e.g. {unreadable[0].path}: {unreadable[0].reason}" if unreadable else ""
    raise UserError(f"no readable image in {where} ({len(unreadable)} unreadable{example})")
