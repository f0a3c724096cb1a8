"""Writing WebDataset shards from class folders (`python -m vgg.data shards SRC DEST`), in the layout
vgg.data.shard_format describes and vgg.data.shards reads."""

import io
import json
import math
import os
import tarfile
from pathlib import Path

import numpy as np

from vgg.core.errors import UserError
from vgg.core.progress import progress_bar
from vgg.data import folders as vfolders
from vgg.data.prepare import check_class_order
from vgg.data.shard_format import INFO_NAME, PREFIX, SPLITS


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

