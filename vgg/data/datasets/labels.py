"""ImageNet's class and label files: the devkit's class list, the validation labels (devkit, Kaggle,
plain '<file> <wnid>'), and sorting the flat official val folder into class folders:

    python -m vgg.data sort-val --val-dir VAL --labels LABELS [--devkit-classes CLASSES]
"""

import os
import re
from pathlib import Path

from vgg.core.errors import UserError

# --------------------------------------------------------------------------------------------------
# Sorting the official flat validation folder into class folders
# --------------------------------------------------------------------------------------------------

_PLAIN_NAME = re.compile(r"^[^/\\]+$")


def _check_name(kind: str, name: str, where: str) -> str:
    if not _PLAIN_NAME.match(name) or name in (".", "..") or name.startswith("."):
        raise UserError(f"{where}: {kind} {name!r} is not a plain file/folder name")
    return name


def read_lines(path: Path) -> list[str]:
    """A text file's lines; UserError naming it when it cannot be read or is not UTF-8 text."""
    try:
        return Path(path).read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); expected a plain text file") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e})") from None


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
    wnids = [line.split()[0] for line in read_lines(path) if line.strip()]
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
    lines = [line for line in read_lines(path) if line.strip()]
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
