"""ImageNet as people get it -> the class-folder layout `train.py` reads (data/README.md), one command each:

    python -m vgg.data prepare --from devkit SRC DEST   # image-net.org's ILSVRC2012 archives or their folders
    python -m vgg.data prepare --from kaggle SRC DEST   # Kaggle's imagenet-object-localization-challenge
    python -m vgg.data prepare --from hf SRC DEST       # Hugging Face's ILSVRC/imagenet-1k tarballs

DEST gets `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`. Files that are already files in SRC are hard
linked where the file system allows, else symbolic links, else copied (`--copy`: always copied);
files inside archives are written out. A file already in DEST with the same size (the same bytes, for
an archive's member) is left alone, and an archive unpacked whole is recorded in `DEST/.vgg_prepared.json`,
so a second run does nothing new. Two archive members of one name and class with other bytes are both
kept, the second as `<name>_2.JPEG`, with a warning.

Class indices are the sorted wnids everywhere (torchvision, Caffe's release, timm's shards). Every
reader here ends in `check_class_order`: with the 1000 ILSVRC-2012 classes, index 0 must be
n01440764 (tench); a source that disagrees is refused with one line (the classic silent bug is
taking the devkit's ILSVRC2012_IDs, which follow the WordNet hierarchy, as class indices).

Here: each source's layout and labels; vgg.data.datasets.unpack puts the files in place (links, copies,
archive members) and reads the tars.
"""

import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from vgg.core.errors import UserError
from vgg.core.progress import get_logger
from vgg.data.datasets.labels import _check_name, read_devkit_classes, read_lines, read_val_labels
from vgg.data.datasets.unpack import Writer, is_image, link_all, reading, tar_members, unpack

log = get_logger()

WNID = re.compile(r"^n\d{8}$")
FIRST_WNID = "n01440764"  # tench: class 0 of ILSVRC-2012 in sorted-wnid order
SOURCES = ("devkit", "kaggle", "hf")


def check_class_order(classes: list[str], where, *, warn: bool = False) -> None:
    """The class list must be sorted wnids; with 1000 classes the first must be n01440764 (tench).
    UserError if not; with warn=True one warning line instead (a training run on class folders,
    which may be another 1000-class dataset)."""
    classes, problem = list(classes), None
    if classes != sorted(classes):
        first = next(i for i, (a, b) in enumerate(zip(classes, sorted(classes))) if a != b)
        problem = (f"class {first} is {classes[first]}, but class indices must follow the sorted wnids "
                   f"({sorted(classes)[first]} there): labels would be silently wrong")
    elif len(classes) == 1000 and classes[0] != FIRST_WNID:
        problem = (f"1000 classes whose index 0 is {classes[0]}, not {FIRST_WNID} (tench) as in ILSVRC-2012's "
                   "sorted wnids: these are not the standard classes or not named by wnid")
    if problem and warn:
        log.warning(f"warning: {where}: {problem}")
    elif problem:
        raise UserError(f"{where}: {problem}")


def _check_wnid(wnid: str, where) -> str:
    if not WNID.match(wnid):
        raise UserError(f"{where}: unknown wnid {wnid!r}: expected a WordNet ID like {FIRST_WNID}")
    return wnid


def split_layout(folder: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """A split folder as ({wnid: its image files}, loose image files); holding both is a mixed layout."""
    if not folder.is_dir():
        raise UserError(f"folder {folder} not found")
    classes, loose = {}, []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            classes[_check_wnid(entry.name, folder)] = sorted(p for p in entry.iterdir() if is_image(p.name))
        elif is_image(entry.name):
            loose.append(entry)
    if classes and loose:
        raise UserError(f"{folder} mixes class folders ({len(classes)}) and loose images ({len(loose)}, e.g. "
                        f"{loose[0].name}): expected one layout, <wnid>/*.JPEG or a flat folder")
    return classes, loose


def flat_val_files(val_dir: Path, labels: dict[str, str], labels_file: str, whose: str) -> dict[str, Path]:
    """name -> path of a flat val/ folder's images, every image `labels` names among them (one line if not)."""
    val_classes, val_files = split_layout(val_dir)
    if val_classes:
        raise UserError(f"{val_dir} holds class folders: {whose} val/ is flat (already sorted? then "
                        "point train.py at a root holding train/ and val/ directly)")
    present = {p.name: p for p in val_files}
    missing = sorted(set(labels) - set(present))
    if missing:
        raise UserError(f"{len(missing)} images named in {labels_file} are not in {val_dir} (first: {missing[0]})")
    return present


def check_dest(dest: Path) -> tuple[list[str], int, int]:
    """DEST's train classes (sorted, checked) and image counts; val's classes must be among train's."""
    train, loose = split_layout(dest / "train")
    if loose or not train:
        raise UserError(f"{dest / 'train'} holds no class folders after preparing: nothing was found to prepare")
    classes = sorted(train)
    check_class_order(classes, dest / "train")
    val, loose = split_layout(dest / "val") if (dest / "val").is_dir() else ({}, [])
    unknown = sorted(set(val) - set(classes))
    if unknown or loose:
        raise UserError(f"{dest / 'val'} has classes not in train/: {', '.join(unknown[:5]) or loose[0].name}")
    return classes, sum(map(len, train.values())), sum(map(len, val.values()))


# --------------------------------------------------------------------------------------------------
# The sources
# --------------------------------------------------------------------------------------------------

def prepare_kaggle(src: Path, writer: Writer, every_s: float) -> None:
    """Kaggle's imagenet-object-localization-challenge: ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG, a flat
    ILSVRC/Data/CLS-LOC/val/ and LOC_val_solution.csv (ImageId,PredictionString: the label is the first
    token of PredictionString); LOC_synset_mapping.txt, when there, must list the same classes in order."""
    loc = src / "ILSVRC" / "Data" / "CLS-LOC"
    if not (loc / "train").is_dir():
        raise UserError(f"{src} is not Kaggle's imagenet-object-localization-challenge folder: no {loc / 'train'} "
                        "(expected ILSVRC/Data/CLS-LOC/{train,val}/ and LOC_val_solution.csv)")
    csv = src / "LOC_val_solution.csv"
    if not csv.is_file():
        raise UserError(f"{csv} not found: Kaggle's validation labels (ImageId,PredictionString) are needed")
    train, loose = split_layout(loc / "train")
    if loose:
        raise UserError(f"{loc / 'train'} holds loose images ({loose[0].name}): expected <wnid>/*.JPEG")
    classes = sorted(train)
    check_class_order(classes, loc / "train")
    mapping = src / "LOC_synset_mapping.txt"
    if mapping.is_file():
        listed = [line.split()[0] for line in read_lines(mapping) if line.strip()]
        check_class_order(listed, mapping)
        if listed != classes:
            raise UserError(f"{mapping} lists {len(listed)} classes, {loc / 'train'} holds {len(classes)} "
                            "different ones: is the download complete?")
    labels = read_val_labels(csv)
    unknown = sorted(set(labels.values()) - set(classes))
    if unknown:
        raise UserError(f"{csv} labels images with wnids not among the {len(classes)} training classes: "
                        f"{', '.join(unknown[:5])}")
    present = flat_val_files(loc / "val", labels, str(csv), "Kaggle's")
    link_all(writer, "train", [(w, p) for w in classes for p in train[w]], every_s)
    link_all(writer, "val", [(labels[name], present[name]) for name in sorted(labels)], every_s)
    if len(present) > len(labels):
        log.warning(f"warning: {len(present) - len(labels)} images in {loc / 'val'} have no label in {csv}: left out")


def _hf_name(member_name: str, archive: Path) -> tuple[str, str]:
    """`n01440764_10026_n01440764.JPEG` -> (n01440764, n01440764_10026.JPEG): the synset is the suffix."""
    stem, ext = os.path.splitext(member_name)
    base, _, wnid = stem.rpartition("_")
    if not base or not WNID.match(wnid):
        raise UserError(f"{archive}: {member_name} does not end in _<wnid>{ext} (the naming of Hugging Face's "
                        "ILSVRC/imagenet-1k tarballs): unknown wnid")
    return wnid, base + ext


def prepare_hf(src: Path, writer: Writer, every_s: float) -> None:
    """Hugging Face's ILSVRC/imagenet-1k: train_images_*.tar.gz and val_images.tar.gz (in SRC or SRC/data/),
    each file named <original name>_<wnid>.JPEG. The test set (no labels) is left out."""
    folder = src / "data" if (src / "data").is_dir() and not list(src.glob("*_images*.tar.gz")) else src
    train = sorted(folder.glob("train_images_*.tar.gz"), key=lambda p: [int(t) if t.isdigit() else t
                                                                          for t in re.split(r"(\d+)", p.name)])
    val = folder / "val_images.tar.gz"
    if not train:
        found = sorted(p.name for p in folder.iterdir())[:5]
        raise UserError(f"no train_images_*.tar.gz in {folder} (found: {', '.join(found) or 'nothing'}): expected "
                        "the tarballs of Hugging Face's ILSVRC/imagenet-1k (data/train_images_0.tar.gz ...)")
    if not val.is_file():
        raise UserError(f"{val} not found: expected Hugging Face's ILSVRC/imagenet-1k val_images.tar.gz")
    for archive in train:
        unpack(writer, "train", archive, lambda name, a=archive: _hf_name(name, a), every_s)
    unpack(writer, "val", val, lambda name: _hf_name(name, val), every_s)


DEVKIT_ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar",
                   "devkit": "ILSVRC2012_devkit_t12.tar.gz"}
DEVKIT_FILES = ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt")


def _devkit_files(src: Path, scratch: Path) -> tuple[Path, Path]:
    """(meta.mat, ground truth) from SRC/ILSVRC2012_devkit_t12/ or its .tar.gz (read into `scratch`)."""
    folder = src / "ILSVRC2012_devkit_t12"
    archive = src / DEVKIT_ARCHIVES["devkit"]
    if not folder.is_dir():
        if not archive.is_file():
            raise UserError(f"neither {folder}/ nor {archive} found: the devkit gives the validation labels")
        try:
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name.split("/", 1)[-1] in DEVKIT_FILES:
                        out = scratch / member.name.split("/", 1)[-1]
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(tar.extractfile(member).read())
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"{archive} is not a readable tar archive: {e}") from None
        folder = scratch
    meta, truth = (folder / name for name in DEVKIT_FILES)
    for path in (meta, truth):
        if not path.is_file():
            raise UserError(f"{path} not found: expected the ILSVRC2012 devkit's {', '.join(DEVKIT_FILES)}")
    return meta, truth


def prepare_devkit(src: Path, writer: Writer, every_s: float) -> None:
    """image-net.org's ILSVRC-2012 release, as archives or unpacked: train from SRC/train/ (class folders,
    or the per-class <wnid>.tar files the training archive holds) or SRC/ILSVRC2012_img_train.tar; val
    from a flat SRC/val/ or SRC/ILSVRC2012_img_val.tar, labelled by the devkit (SRC/ILSVRC2012_devkit_t12/
    or its .tar.gz): ground truth line k = ILSVRC2012_ID of val image k, IDs in data/meta.mat's order."""
    with tempfile.TemporaryDirectory() as scratch:
        meta, truth = _devkit_files(src, Path(scratch))
        wnids = read_devkit_classes(meta)  # ILSVRC2012_ID order (WordNet hierarchy), not class-index order
        for wnid in wnids:
            _check_wnid(wnid, meta)
        check_class_order(sorted(wnids), meta)
        labels = read_val_labels(truth, meta)
    known = set(wnids)

    def member_wnid(path_or_name: str, where) -> str:
        wnid = _check_wnid(Path(path_or_name).name.split(".")[0], where)
        if wnid not in known:
            raise UserError(f"{where}: {wnid} is not one of the devkit's {len(wnids)} classes ({meta})")
        return wnid

    train_dir, train_tar = src / "train", src / DEVKIT_ARCHIVES["train"]
    if train_dir.is_dir():
        classes, loose = split_layout(train_dir)
        tars = sorted(p for p in train_dir.iterdir() if p.name.endswith(".tar"))
        if (classes or loose) and tars:
            raise UserError(f"{train_dir} mixes per-class .tar files ({len(tars)}) and images: expected one layout")
        for tar in tars:  # the training archive's per-class tars: n01440764.tar holds n01440764_*.JPEG
            wnid = member_wnid(tar.name, tar)
            unpack(writer, "train", tar, lambda name, w=wnid: (w, name), every_s)
        for wnid in classes:
            member_wnid(wnid, train_dir)
        link_all(writer, "train", [(w, p) for w in sorted(classes) for p in classes[w]], every_s)
    elif train_tar.is_file():
        if not writer.archive_done(train_tar):
            with tempfile.TemporaryDirectory(dir=writer.dest) as scratch, reading(train_tar):
                # The archive holds one tar per class; each is unpacked from a scratch copy, one at a time.
                for name, fileobj, _ in tar_members(train_tar, every_s, f"train: {train_tar.name}"):
                    inner = Path(scratch) / _check_name("file name", name, str(train_tar))
                    with open(inner, "wb") as f:
                        shutil.copyfileobj(fileobj, f)
                    wnid = member_wnid(name, train_tar)
                    with tarfile.open(inner) as tar:
                        for member in tar:
                            if member.isfile() and is_image(member.name):
                                writer.extract("train", wnid, os.path.basename(member.name),
                                               tar.extractfile(member), member.size)
                    inner.unlink()
            writer.mark_done(train_tar)
    else:
        raise UserError(f"neither {train_dir}/ nor {train_tar} found in {src}")

    val_dir, val_tar = src / "val", src / DEVKIT_ARCHIVES["val"]
    if val_dir.is_dir():
        present = flat_val_files(val_dir, labels, truth.name, "the release's")
        link_all(writer, "val", [(labels[name], present[name]) for name in sorted(labels)], every_s)
    elif val_tar.is_file():
        def val_label(name: str) -> tuple[str, str]:
            if name not in labels:
                raise UserError(f"{val_tar}: {name} has no label in the devkit's ground truth")
            return labels[name], name
        unpack(writer, "val", val_tar, val_label, every_s)
    else:
        raise UserError(f"neither {val_dir}/ nor {val_tar} found in {src}")


def prepare(source: str, src, dest, *, copy: bool = False, progress_every_s: float = 30.0) -> dict:
    """Prepare DEST from SRC as `source` lays it out; returns counts (linked, symlinked, copied,
    extracted, present; classes, train and val images in DEST)."""
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; allowed: {', '.join(SOURCES)}")
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise UserError(f"source folder {src} not found")
    if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
        raise UserError(f"DEST {dest} must lie outside SRC {src}")
    writer = Writer(dest, copy=copy)
    {"devkit": prepare_devkit, "kaggle": prepare_kaggle, "hf": prepare_hf}[source](src, writer, progress_every_s)
    classes, train_images, val_images = check_dest(dest)
    return {**writer.counts, "classes": len(classes), "train": train_images, "val": val_images}
