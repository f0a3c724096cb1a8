"""Writing WebDataset shards from class folders (`python -m vgg.data shards SRC DEST`), in the layout
vgg.data.datasets.shard_format describes and vgg.data.datasets.shards reads."""

import io
import json
import math
import os
import tarfile
from pathlib import Path

import numpy as np

from vgg.core.errors import UserError, is_disk_full
from vgg.core.progress import progress_bar
from vgg.data.batches.jpeg import Verdict
from vgg.data.datasets import checks as vchecks
from vgg.data.datasets import folders as vfolders
from vgg.data.datasets.prepare import check_class_order
from vgg.data.datasets.shard_format import CHECK_KEY, INFO_NAME, PREFIX, SPLITS, verdict_bytes


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # the same bytes on every run
    tar.addfile(info, io.BytesIO(data))


def _keys(wnid: str, names: list[str]) -> list[str]:
    """Each file's sample key: its name without extension, led by the wnid unless it already is (ImageNet's
    training names are), dots replaced (a reader takes the key to the first dot). Two names that map to
    one key (`a.b.JPEG` and `a_b.JPEG`, `pic.JPEG` and `pic.png`) would merge into one sample, which the
    reader refuses; the later one (in sorted order, so the same on every run) gets `_2`, `_3`, ..."""
    keys, used = [], set()
    for name in names:
        stem = os.path.splitext(name)[0]
        base = (stem if stem.startswith(wnid) else f"{wnid}_{stem}").replace(".", "_")
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def _remove_stale_temporaries(dest: Path) -> None:
    """Hidden shards a killed or failed run left (`.imagenet1k-*.tar.<pid>.tmp`): two runs writing into one
    folder would overwrite each other's shards anyway, so none of them is anyone's work in progress."""
    for path in dest.glob(f".{PREFIX}-*.tmp"):
        path.unlink(missing_ok=True)


def _write_shard(path: Path, src_split: Path, part: list[tuple[str, str, str, int, Verdict]], bar) -> None:
    """One tar of (wnid, file name, key, label, verdict) samples, written under a hidden temporary name and
    renamed into place; the temporary is removed whatever goes wrong (a full disk, an unreadable file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w") as tar:
            for wnid, file_name, key, label, verdict in part:
                data = (src_split / wnid / file_name).read_bytes()
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.cls", str(label).encode())
                _add(tar, f"{key}.json", json.dumps({"filename": f"{wnid}/{file_name}", "wnid": wnid,
                                                     "label": label}).encode())
                _add(tar, f"{key}.{CHECK_KEY}", verdict_bytes(verdict, len(data)))
                bar.update(1)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, e) from None


def _write_split(src: Path, dest: Path, split: str, files: dict, class_index: dict, *, images_per_shard: int,
                 seed: int) -> dict:
    """One split's shards; its _info.json entry."""
    items = [(wnid, name, key, class_index[wnid]) for wnid in sorted(files)
             for name, key in zip(files[wnid], _keys(wnid, files[wnid]))]
    checks = _checks(src / split, [f"{wnid}/{name}" for wnid, name, _, _ in items])
    items = [(*item, checks.verdict(i)) for i, item in enumerate(items)]
    if split == "train":
        items = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
    shard_split = SPLITS[split]
    count = max(1, math.ceil(len(items) / images_per_shard))
    width = max(4 if split == "train" else 2, len(str(count - 1)))
    names = [f"{PREFIX}-{shard_split}-{s:0{width}d}.tar" for s in range(count)]
    with progress_bar(total=len(items), desc=f"{shard_split} shards", unit="img") as bar:
        for s, name in enumerate(names):
            _write_shard(dest / name, src / split, items[s * images_per_shard:(s + 1) * images_per_shard], bar)
    lengths = [len(items[s * images_per_shard:(s + 1) * images_per_shard]) for s in range(count)]
    return {"name": shard_split, "num_samples": len(items), "filenames": names, "shard_lengths": lengths}


def _checks(split_dir: Path, names: list[str]) -> vchecks.Checks:
    """The damage check of each file (`wnid/name`), as class folders keep it (`.vgg_checks.npz`, made once:
    a folder trained on before is not checked again), to go into the shards with the images."""
    encoded = [os.fsencode(name) for name in names]
    offsets = np.cumsum([0] + [len(name) for name in encoded], dtype=np.int64)
    return vchecks.check_files(split_dir, np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)


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
    try:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / INFO_NAME).unlink(missing_ok=True)
        _remove_stale_temporaries(dest)
    except OSError as e:
        raise _write_failed(dest, e) from None
    class_index = {wnid: i for i, wnid in enumerate(classes)}
    info = {"name": "imagenet-1k", "classes": classes, "splits": {}}
    for split, shard_split in SPLITS.items():
        info["splits"][shard_split] = _write_split(src, dest, split, files[split], class_index,
                                                   images_per_shard=images_per_shard, seed=seed)
    _write_shard_info(dest, info)
    return info


def _write_shard_info(dest: Path, info: dict) -> None:
    """_info.json, atomically: a full disk leaves none (the folder then reads as unfinished), not half a one."""
    tmp = dest / f".{PREFIX}-{INFO_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, dest / INFO_NAME)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(dest / INFO_NAME, e) from None


def _write_failed(path: Path, error: OSError) -> UserError:
    """One line for a failed write (or a source file that cannot be read) while writing `path`."""
    if is_disk_full(error):
        return UserError(f"no space left on device while writing {path}: free space there (the shards take about "
                         "as much as the images) and run the same command again")
    where = f" ({error.filename})" if error.filename else ""
    return UserError(f"writing {path} failed: {error.strerror or error}{where}")
