"""The small sample dataset in ImageNet's layout, generated deterministically in a few seconds.

    python -m vgg.data sample [--out data/sample] [--seed 0]     # (or python -m vgg.sample_data)

Twelve classes (wnid-style folder names n00000000 ... n00000011, so sorted order = class index), each
made from a different real photo of `skimage.data` (no download): every image is a random crop of
its class's photo, rescaled to a random size (smallest side mostly 48-160 px, a few larger), maybe
flipped, with a slight colour jitter, saved as a real JPEG at a random quality. 60 training and 15
validation images per class, a few MB in all. A scaled-down net learns it well above chance in a few
minutes on a CPU (configs/demo.yaml).

Both splits also hold the awkward files real ImageNet and real disks have: a CMYK JPEG, a
grayscale JPEG and a PNG named .JPEG (decoded to RGB and used), and a truncated JPEG and an empty
file (skipped with a warning and counted). `meta.json` in the root names the generator version;
a dataset made by an older generator (or another seed) is regenerated.
"""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage import data as skdata

from vgg.core.errors import UserError

DEFAULT_ROOT = Path("data/sample")  # relative to the working directory, as the config's `data` default
GENERATOR_VERSION = 1
TRAIN_PER_CLASS, VAL_PER_CLASS = 60, 15

# One photo per class; colour photos first, then grayscale ones (saved as 3-channel JPEGs).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "hubble_deep_field",
          "colorwheel", "stereo_motorcycle", "camera", "coins", "gravel")


def _photo(name: str) -> np.ndarray:
    image = getattr(skdata, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def _random_view(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (35-100% of the area, aspect 3:4-4:3 relative to the photo) rescaled to a random
    size, maybe flipped, with a slight per-channel colour jitter."""
    width, height = photo.size
    area = rng.uniform(0.35, 1.0) * width * height
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = min(width, int(round(np.sqrt(area * aspect))))
    crop_h = min(height, int(round(np.sqrt(area / aspect))))
    left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
    # Mostly small images so CPU demos are fast; one in twenty ImageNet-like large.
    side = int(rng.integers(200, 321)) if rng.random() < 0.05 else int(rng.integers(48, 161))
    scale = side / min(crop_w, crop_h)
    size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
    view = photo.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h),
                        reducing_gap=2.0)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.9, 1.1, size=3)
    offset = rng.uniform(-10, 10)
    pixels = np.asarray(view, dtype=np.float32) * gain + offset
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def _jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _awkward_files(image: Image.Image) -> dict[str, bytes]:
    """The files ImageNet (CMYK, grayscale, PNG named .JPEG) and disks (truncated, empty) produce."""
    png = io.BytesIO()
    image.save(png, "PNG")
    full = _jpeg_bytes(image, 90)
    return {"cmyk": _jpeg_bytes(image.convert("CMYK"), 90), "gray": _jpeg_bytes(image.convert("L"), 90),
            "png": png.getvalue(), "truncated": full[: len(full) // 2], "empty": b""}


def _is_current(root: Path, seed: int, generator: str = "vgg.sample_data", version: int = GENERATOR_VERSION) -> bool:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("generator") == generator and meta.get("version") == version and meta.get("seed") == seed
            and (root / "train").is_dir())


def _generate(out: Path, seed: int) -> dict:
    rng_root = np.random.SeedSequence(seed)
    class_rngs = [np.random.default_rng(s) for s in rng_root.spawn(len(PHOTOS))]
    wnids = [f"n{i:08d}" for i in range(len(PHOTOS))]
    val_labels = []
    val_number = 0
    for index, (wnid, name, rng) in enumerate(zip(wnids, PHOTOS, class_rngs)):
        photo = Image.fromarray(_photo(name))
        for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
            folder = out / split / wnid
            folder.mkdir(parents=True)
            for k in range(count):
                if split == "train":
                    filename = f"{wnid}_{k}.JPEG"
                else:
                    val_number += 1
                    filename = f"ILSVRC2012_val_{val_number:08d}.JPEG"
                    val_labels.append(f"{filename} {wnid}")
                (folder / filename).write_bytes(_jpeg_bytes(_random_view(photo, rng), int(rng.integers(70, 96))))
            # The awkward files, one kind per class (classes 0-4) in each split.
            if index < 5:
                kind = ("cmyk", "gray", "png", "truncated", "empty")[index]
                (folder / f"{wnid}_awkward_{kind}.JPEG").write_bytes(_awkward_files(_random_view(photo, rng))[kind])
    (out / "val_labels.txt").write_text("\n".join(val_labels) + "\n")
    return {"generator": "vgg.sample_data", "version": GENERATOR_VERSION, "seed": seed,
            "classes": dict(zip(wnids, PHOTOS)), "train_per_class": TRAIN_PER_CLASS,
            "val_per_class": VAL_PER_CLASS,
            "awkward_files": "in train/ and val/: *_awkward_{cmyk,gray,png}.JPEG are decoded, "
                             "*_awkward_{truncated,empty}.JPEG are skipped"}


DIGITS_ROOT = Path("data/digits")  # the digits-like set of configs/lenet5-demo.yaml
DIGITS_VERSION = 1
DIGITS_TRAIN_PER_CLASS, DIGITS_VAL_PER_CLASS = 100, 20


def _digit_image(digit: int, rng: np.random.Generator) -> Image.Image:
    """One printed digit, LeNet-5-sized: 36-44 px square, a random size, position, slant and colours, noise."""
    side = int(rng.integers(36, 45))
    background = rng.integers(0, 120, size=3)
    ink = 255 - rng.integers(0, 90, size=3)
    glyph = Image.new("L", (side, side))
    font = ImageFont.load_default(size=int(rng.integers(22, 32)))
    centre = (side / 2 + rng.uniform(-3, 3), side / 2 + rng.uniform(-3, 3))
    ImageDraw.Draw(glyph).text(centre, str(digit), font=font, fill=255, anchor="mm")
    glyph = glyph.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR)
    mask = np.asarray(glyph, dtype=np.float32)[..., None] / 255
    pixels = background * (1 - mask) + ink * mask + rng.normal(0, 8, size=(side, side, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _generate_digits(out: Path, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    wnids = [f"n{d:08d}" for d in range(10)]  # class index = the digit
    for digit, wnid in enumerate(wnids):
        for split, count in (("train", DIGITS_TRAIN_PER_CLASS), ("val", DIGITS_VAL_PER_CLASS)):
            folder = out / split / wnid
            folder.mkdir(parents=True)
            for k in range(count):
                image = _digit_image(digit, rng)
                (folder / f"{wnid}_{k}.JPEG").write_bytes(_jpeg_bytes(image, int(rng.integers(80, 96))))
    return {"generator": "vgg.sample_data digits", "version": DIGITS_VERSION, "seed": seed,
            "classes": {w: str(d) for d, w in enumerate(wnids)}, "train_per_class": DIGITS_TRAIN_PER_CLASS,
            "val_per_class": DIGITS_VAL_PER_CLASS}


def make_digits_dataset(root=DIGITS_ROOT, *, seed: int = 0) -> Path:
    """Generate the digits-like set (printed digits 0-9, LeNet-5's kind of data) into `root`, like
    make_sample_dataset: unless an up-to-date copy is there, atomically, never over a foreign folder."""
    return _make(root, seed, _generate_digits, "vgg.sample_data digits", DIGITS_VERSION)


def make_sample_dataset(root=DEFAULT_ROOT, *, seed: int = 0) -> Path:
    """Generate the sample dataset into `root` (train/, val/, val_labels.txt, meta.json) unless an
    up-to-date copy (same generator version and seed) is already there. Returns root.

    Writes into a temporary sibling folder and renames it into place, so an interrupted run leaves
    no half-made dataset. Refuses (UserError) to replace a non-empty folder it did not generate.
    """
    return _make(root, seed, _generate, "vgg.sample_data", GENERATOR_VERSION)


def _make(root, seed: int, generate, generator: str, version: int) -> Path:
    root = Path(root)
    if _is_current(root, seed, generator, version):
        return root
    if root.exists() and not (root / "meta.json").is_file() and any(root.iterdir()):
        raise UserError(f"{root} exists and is not a generated sample dataset (no meta.json): "
                        "choose another --out or remove it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = generate(tmp, seed)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.replace(root, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
