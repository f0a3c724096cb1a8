"""Small datasets in each layout transfer.py reads, generated deterministically from scikit-image's
photographs (as vgg.data.datasets.sample makes the sample ImageNet set), for the CPU demo and the tests.

    python -m vgg.transfer sample [--out data/transfer] [--seed 0]

    <out>/folders/     train/<class>/*.jpg (8 a class) and test/<class>/*.jpg (4 a class), 4 classes
    <out>/VOC2007/     VOC's layout: JPEGImages/, Annotations/ (objects with "difficult" flags) and
                       ImageSets/Main/<class>_{train,val,trainval,test}.txt made from them as VOC's organisers do
                       (1: an object that is not difficult, 0: difficult objects only, -1: none); 4 of VOC's
                       class names, each image one or two photo views side by side
    <out>/caltech/     one folder a class, 10 images each, as Caltech-101 (BACKGROUND_Google: views of other
                       photos), and one truncated file that is left out as unreadable

Every class is its own photo, every image a random view of it (vgg.data.datasets.sample's crops, sizes, flips and
colour jitter), so a net's descriptors tell the classes apart well above chance.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from vgg.core.errors import UserError
from vgg.data.datasets.sample import _jpeg_bytes, _photo, _random_view

DEFAULT_ROOT = Path("data/transfer")
VERSION = 1
FOLDER_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
VOC_CLASSES = {"person": "astronaut", "cat": "chelsea", "motorbike": "stereo_motorcycle", "bottle": "coffee"}
CALTECH_PHOTOS = {"astronaut": "astronaut", "cat": "chelsea", "cup": "coffee", "rocket": "rocket"}
BACKGROUND_PHOTOS = ("camera", "coins", "gravel", "hubble_deep_field")
VOC_SPLITS = {"train": 12, "val": 12, "test": 16}


def _view(photo: Image.Image, rng: np.random.Generator, side: int | None = None) -> Image.Image:
    view = _random_view(photo, rng)
    if side is not None:
        scale = side / min(view.size)
        view = view.resize((max(1, round(view.width * scale)), max(1, round(view.height * scale))))
    return view


def _write(path: Path, image: Image.Image, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes(image, int(rng.integers(75, 96))))


def _folders(out: Path, rng: np.random.Generator) -> None:
    for name in FOLDER_PHOTOS:
        photo = Image.fromarray(_photo(name))
        for split, count in (("train", 8), ("test", 4)):
            for k in range(count):
                _write(out / split / name / f"{name}_{k}.jpg", _view(photo, rng), rng)


def _caltech(out: Path, rng: np.random.Generator) -> None:
    for folder, name in CALTECH_PHOTOS.items():
        photo = Image.fromarray(_photo(name))
        for k in range(10):
            _write(out / folder / f"image_{k + 1:04d}.jpg", _view(photo, rng), rng)
    background = [Image.fromarray(_photo(name)) for name in BACKGROUND_PHOTOS]
    for k in range(10):
        _write(out / "BACKGROUND_Google" / f"image_{k + 1:04d}.jpg", _view(background[k % 4], rng), rng)
    whole = _jpeg_bytes(_view(background[0], rng), 90)
    (out / "cup" / "image_0011.jpg").write_bytes(whole[: len(whole) // 2])  # truncated: left out


def _voc_image(photos: dict, rng: np.random.Generator) -> tuple[Image.Image, list[tuple[str, bool]]]:
    """One or two views side by side, each (class, difficult); a small view is sometimes "difficult"."""
    names = list(rng.choice(list(photos), size=int(rng.integers(1, 3)), replace=False))
    objects = [(name, bool(rng.random() < 0.2)) for name in names]
    views = [_view(photos[name], rng, side=40 if difficult else 72) for name, difficult in objects]
    canvas = Image.new("RGB", (sum(v.width for v in views), max(v.height for v in views)), (128, 128, 128))
    left = 0
    for view in views:
        canvas.paste(view, (left, 0))
        left += view.width
    return canvas, objects


def _annotation(image_id: str, size: tuple[int, int], objects: list[tuple[str, bool]]) -> str:
    items = "".join(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult></object>"
                    for name, difficult in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size><width>{size[0]}"
            f"</width><height>{size[1]}</height><depth>3</depth></size>{items}</annotation>\n")


def _voc(out: Path, rng: np.random.Generator) -> None:
    photos = {cls: Image.fromarray(_photo(name)) for cls, name in VOC_CLASSES.items()}
    ids, labels, number = {}, {}, 0
    for split, count in VOC_SPLITS.items():
        ids[split] = []
        for _ in range(count):
            number += 1
            image_id = f"{number:06d}"
            image, objects = _voc_image(photos, rng)
            _write(out / "JPEGImages" / f"{image_id}.jpg", image, rng)
            (out / "Annotations").mkdir(parents=True, exist_ok=True)
            (out / "Annotations" / f"{image_id}.xml").write_text(_annotation(image_id, image.size, objects))
            ids[split].append(image_id)
            labels[image_id] = {cls: 1 if (cls, False) in objects else 0 if (cls, True) in objects else -1
                                for cls in VOC_CLASSES}
    ids["trainval"] = ids["train"] + ids["val"]
    main = out / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for split, split_ids in ids.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
        for cls in VOC_CLASSES:
            (main / f"{cls}_{split}.txt").write_text("".join(f"{i} {labels[i][cls]:2d}\n" for i in split_ids))


def _meta(seed: int) -> dict:
    return {"generator": "vgg.transfer.sample", "version": VERSION, "seed": seed,
            "layouts": {"folders": "train/ and test/ class folders", "VOC2007": "PASCAL VOC as distributed",
                        "caltech": "Caltech-101 as distributed (BACKGROUND_Google a class)"}}


def make_transfer_samples(root=DEFAULT_ROOT, *, seed: int = 0) -> Path:
    """Generate the three sets into `root` (folders/, VOC2007/, caltech/, meta.json) unless this generator
    made them already with this seed. Written beside and renamed into place, so a stopped run leaves no half
    set; a non-empty folder it did not make is refused. Returns root."""
    root = Path(root)
    try:
        if json.loads((root / "meta.json").read_text()) == _meta(seed):
            return root
    except (OSError, ValueError):
        pass
    if root.is_dir() and any(root.iterdir()) and not (root / "meta.json").is_file():
        raise UserError(f"{root} exists and was not made by vgg.transfer.sample (no meta.json): choose another --out")
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
        _folders(tmp / "folders", rngs[0])
        _voc(tmp / "VOC2007", rngs[1])
        _caltech(tmp / "caltech", rngs[2])
        (tmp / "meta.json").write_text(json.dumps(_meta(seed), indent=1) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
