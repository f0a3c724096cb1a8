"""The datasets of the paper's Appendix B as people get them, and their train/test splits.

Three layouts (`--layout`, found from the folder by default):

    folders     <root>/train/<class>/*, <root>/test/<class>/*: one fixed split, one label an image.
    voc         PASCAL VOC as distributed (<root> is VOCdevkit/VOC2007 or VOC2012): JPEGImages/<id>.jpg and
                ImageSets/Main/<class>_<split>.txt, whose labels are 1 (present), -1 (absent) and 0 (only
                "difficult" objects of the class: left out of that class's training and AP, as VOC's devkit
                does). Trained on trainval and tested on test where the test lists carry labels (VOC-2007);
                otherwise (VOC-2012, whose test labels are held by the evaluation server) trained on train
                and tested on val. Several labels an image: one SVM a class.
    caltech     Caltech-101 or -256 as distributed (<root> holds one folder a class: 101_ObjectCategories,
                256_ObjectCategories). Appendix B: "Caltech-101 contains 9K images labelled into 102 classes
                (101 object categories and a background class) ... 3 random splits ... 30 training images
                per class, and up to 50 test images per class. On Caltech-256 ... 60 training images per
                class (and the rest is used for testing)". So Caltech-101's BACKGROUND_Google is kept as the
                102nd class (as the paper, Zeiler & Fergus 2013 and Chatfield et al. 2014 count it), and
                Caltech-256's 257.clutter as the 257th. Splits are drawn from (seed, split number).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vgg.core.errors import UserError
from vgg.data.datasets.folders import list_files

LAYOUTS = ("auto", "folders", "voc", "caltech")
# Appendix B's splits: (training images a class, test images a class at most; None: all the rest).
CALTECH_SPLITS = {"caltech101": (30, 50), "caltech256": (60, None)}
CALTECH256_FOLDER = re.compile(r"^\d{3}\.")  # 001.ak47 ... 257.clutter
VOC_SPLITS = ("train", "val", "trainval", "test")
VOC_LIST = re.compile(r"^(?P<cls>.+)_(?P<split>train|val|trainval|test)\.txt$")


@dataclass
class Split:
    """One train/test split: positions into TransferSet.images and their labels (class indices, or for a
    multi-label set an int8 [N, classes] matrix of VOC's 1 / -1 / 0)."""

    name: str
    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray


@dataclass
class TransferSet:
    """Every image a descriptor is needed for (paths relative to root), the classes, and the splits."""

    root: Path
    kind: str  # folders, voc2007, voc2012 (any VOC year: voc<year>), caltech101, caltech256
    images: list[str]
    classes: list[str]
    splits: list[Split]
    multilabel: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def year(self) -> int | None:
        return int(self.kind[3:]) if self.kind.startswith("voc") else None


def open_transfer_set(root, layout: str = "auto", *, splits: int = 3, seed: int = 0,
                      train_per_class: int | None = None, test_per_class: int | None = None,
                      voc_year: int | None = None) -> TransferSet:
    """The dataset under `root` in `layout` (auto: told apart by its folders), with its splits.

    Caltech: `splits` random splits from `seed`; `train_per_class`/`test_per_class` override the paper's
    30/50 (Caltech-101) and 60/rest (Caltech-256). VOC: the year from the folder's name (VOC2007) unless
    `voc_year` is given: it decides VOC's AP (vgg.transfer.classifier.voc_ap)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} not found")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "folders":
        return _open_folders(root)
    if layout == "voc":
        return _open_voc(root, voc_year)
    if layout == "caltech":
        return _open_caltech(root, splits, seed, train_per_class, test_per_class)
    raise UserError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")


def detect_layout(root: Path) -> str:
    if (root / "ImageSets" / "Main").is_dir() and (root / "JPEGImages").is_dir():
        return "voc"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folders"
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if folders and not {"train", "test", "val", "JPEGImages", "ImageSets"} & {p.name for p in folders}:
        return "caltech"
    raise UserError(f"{root} is in none of the layouts: <root>/train/<class>/* and <root>/test/<class>/* "
                    "(folders); VOC's JPEGImages/ and ImageSets/Main/ (voc); one folder a class (caltech)")


# --- Class folders ------------------------------------------------------------------------------

def _open_folders(root: Path) -> TransferSet:
    train, test = _class_files(root / "train"), _class_files(root / "test")
    if sorted(train) != sorted(test):
        odd = sorted(set(train) ^ set(test))
        raise UserError(f"{root}: train/ and test/ must hold the same class folders; {', '.join(odd[:5])} "
                        "is in one only")
    classes = sorted(train)
    images, labels = [], {"train": [], "test": []}
    for split, files in (("train", train), ("test", test)):
        for label, cls in enumerate(classes):
            if not files[cls]:
                raise UserError(f"{root / split / cls} holds no images: every class needs training and test images")
            images += [f"{split}/{cls}/{name}" for name in files[cls]]
            labels[split] += [label] * len(files[cls])
    n_train = len(labels["train"])
    split = Split("train/test", np.arange(n_train), np.array(labels["train"]),
                  np.arange(n_train, len(images)), np.array(labels["test"]))
    return TransferSet(root, "folders", images, classes, [split])


def _class_files(folder: Path) -> dict[str, list[str]]:
    if not folder.is_dir():
        raise UserError(f"{folder} not found")
    files = list_files(folder)
    if not files:
        raise UserError(f"no class folders in {folder}")
    return files


# --- Caltech ------------------------------------------------------------------------------------

def _open_caltech(root: Path, splits: int, seed: int, train_per_class, test_per_class) -> TransferSet:
    files = _class_files(root)
    classes = sorted(files)
    if len(classes) < 2:
        raise UserError(f"{root} holds one folder, {classes[0]}: --data must be the folder of class folders "
                        "(e.g. 101_ObjectCategories)")
    kind = "caltech256" if all(CALTECH256_FOLDER.match(c) for c in classes) else "caltech101"
    paper_train, paper_test = CALTECH_SPLITS[kind]
    n_train = paper_train if train_per_class is None else train_per_class
    n_test = paper_test if test_per_class is None else test_per_class
    if n_train < 2 or (n_test is not None and n_test < 1) or splits < 1:
        raise UserError("--train-per-class must be at least 2 (C is chosen by cross-validation on them), "
                        "--test-per-class and --splits at least 1")
    short = [f"{cls} ({len(files[cls])})" for cls in classes if len(files[cls]) < n_train + 1]
    if short:
        raise UserError(f"too few images per class in {root}: {n_train} to train and at least 1 to test are "
                        f"needed, {', '.join(short[:5])}{' ...' if len(short) > 5 else ''} "
                        "(--train-per-class sets how many train)")
    images = [f"{cls}/{name}" for cls in classes for name in files[cls]]
    first = np.cumsum([0] + [len(files[cls]) for cls in classes])
    drawn = [_caltech_split(k, seed, first, n_train, n_test) for k in range(splits)]
    notes = [f"{splits} random split(s) from seed {seed}: {n_train} training images a class, "
             f"{'all the rest' if n_test is None else f'up to {n_test}'} to test"]
    if "BACKGROUND_Google" in classes:
        notes.append("BACKGROUND_Google is one of the classes, as the paper counts Caltech-101's 102")
    return TransferSet(root, kind, images, classes, drawn, notes=notes)


def _caltech_split(k: int, seed: int, first: np.ndarray, n_train: int, n_test: int | None) -> Split:
    """Split k: each class's images in an order drawn from (seed, k), the first n_train to train, the next
    n_test (or all the rest) to test. Depends only on the seed, k and the sorted file lists."""
    rng = np.random.default_rng([seed, k])
    parts = {"train": [], "train_labels": [], "test": [], "test_labels": []}
    for label in range(len(first) - 1):
        order = first[label] + rng.permutation(first[label + 1] - first[label])
        test = order[n_train:] if n_test is None else order[n_train:n_train + n_test]
        parts["train"].append(np.sort(order[:n_train]))
        parts["test"].append(np.sort(test))
        parts["train_labels"].append(np.full(n_train, label))
        parts["test_labels"].append(np.full(len(test), label))
    return Split(f"split {k}", **{key: np.concatenate(value) for key, value in parts.items()})


# --- PASCAL VOC -----------------------------------------------------------------------------------

def _open_voc(root: Path, year: int | None) -> TransferSet:
    if year is None:
        found = re.search(r"VOC(\d{4})", root.resolve().name)
        if not found:
            raise UserError(f"cannot tell the VOC year from the folder name {root.resolve().name!r} (VOC2007, "
                            "VOC2012): pass --voc-year, which decides VOC's AP (11-point up to 2009)")
        year = int(found.group(1))
    lists = _voc_lists(root)
    classes = sorted(lists)
    # Test lists with labels for any class (VOC-2007): every class needs its own; none (VOC-2012): val.
    labelled_test = any(lists[c].get("test") is not None for c in classes)
    train_split, test_split = ("trainval", "test") if labelled_test else ("train", "val")
    for cls in classes:
        for split in (train_split, test_split):
            if lists[cls].get(split) is None:
                raise UserError(f"{root}/ImageSets/Main/{cls}_{split}.txt missing (or without labels): VOC's "
                                f"classification lists are needed for {train_split} and {test_split}")
    ids = {split: list(lists[classes[0]][split]) for split in (train_split, test_split)}
    for cls in classes:
        for split in ids:
            if list(lists[cls][split]) != ids[split]:
                raise UserError(f"{root}/ImageSets/Main/{cls}_{split}.txt lists other images than "
                                f"{classes[0]}_{split}.txt")
    images = [f"JPEGImages/{i}.jpg" for split in ids for i in ids[split]]
    matrices = {split: np.array([[lists[c][split][i] for c in classes] for i in ids[split]], dtype=np.int8)
                for split in ids}
    for split, matrix in matrices.items():
        empty = [cls for cls, column in zip(classes, matrix.T) if not (column == 1).any()]
        if empty:
            raise UserError(f"{root}: no {split} image shows {', '.join(empty[:5])} (labels 1 in "
                            f"ImageSets/Main/<class>_{split}.txt): every class needs positives to train and test")
    n_train = len(ids[train_split])
    split = Split(f"{train_split}/{test_split}", np.arange(n_train), matrices[train_split],
                  np.arange(n_train, len(images)), matrices[test_split])
    notes = [f"VOC-{year}: trained on {train_split}, tested on {test_split}"]
    if not labelled_test:
        notes.append("the test set's labels are not here (VOC-2012 keeps them on its evaluation server, where the "
                     "paper's figure was measured): ours is on val")
    return TransferSet(root, f"voc{year}", images, classes, [split], multilabel=True, notes=notes)


def _voc_lists(root: Path) -> dict[str, dict[str, dict | None]]:
    """{class: {split: {image id: label} (None for a list without labels)}} from ImageSets/Main."""
    lists: dict[str, dict] = {}
    for path in sorted((root / "ImageSets" / "Main").glob("*_*.txt")):
        found = VOC_LIST.match(path.name)
        if not found:
            continue
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        if any(len(row) not in (1, 2) for row in rows) or any(len(row) == 2 and row[1] not in ("1", "-1", "0")
                                                              for row in rows):
            raise UserError(f"{path}: expected lines '<image id> <1|-1|0>' as VOC's devkit writes them")
        labels = {row[0]: int(row[1]) for row in rows} if rows and all(len(row) == 2 for row in rows) else None
        lists.setdefault(found["cls"], {})[found["split"]] = labels
    if not lists:
        raise UserError(f"{root}/ImageSets/Main holds no <class>_<split>.txt lists: not VOC's layout as distributed")
    return lists
