"""A small JPEG data set a small net learns in a few hundred steps: each class is one shape in one
colour (a red disc, a green square, a blue triangle, ...) on a noisy background of random tint, at a
random place and size, the colour jittered. Written as train/<class>/*.JPEG and val/<class>/*.JPEG,
the layout train.py and evaluate.py read. The GPU suite (bench/gpu_suite.py) trains on it to check
that training with bf16, channels-last and torch.compile on still learns.

    python bench/learnable_data.py OUT_DIR [--classes 4] [--train 60] [--val 20]
"""

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (name, RGB): each class's shape and colour; classes take them in this order.
SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar")
COLOURS = ((220, 40, 40), (40, 190, 60), (50, 70, 230), (230, 210, 40), (200, 60, 210), (40, 200, 210))
VERSION = 1  # bump when the images change: a set made by an older version is made again


def class_names(classes: int) -> list[str]:
    if not 2 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be 2 to {len(SHAPES)}, got {classes}")
    return [f"{i}_{SHAPES[i]}" for i in range(classes)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """`shape` filling `box` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "disc":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        draw.rectangle((x0 + w / 3, y0, x1 - w / 3, y1), fill=fill)
        draw.rectangle((x0, y0 + h / 3, x1, y1 - h / 3), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(w / 6)))
    else:  # bar
        draw.rectangle((x0, y0 + h / 3, x1, y1 - h / 3), fill=fill)


def make_image(label: int, rng: random.Random) -> Image.Image:
    """One image of class `label`: 48-80 px a side, its shape a third to two thirds of the short side."""
    width, height = rng.randint(48, 80), rng.randint(48, 80)
    tint = np.array([rng.randint(60, 190) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 18, (height, width, 3))
    image = Image.fromarray(np.clip(tint * 0.5 + 50 + noise, 0, 255).astype(np.uint8))
    side = rng.uniform(0.35, 0.7) * min(width, height)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    colour = tuple(int(min(255, max(0, c + rng.randint(-25, 25)))) for c in COLOURS[label])
    draw_shape(ImageDraw.Draw(image), SHAPES[label], (x0, y0, x0 + side, y0 + side), colour)
    return image


def make_learnable_set(root: Path, *, classes: int = 4, train: int = 60, val: int = 20, seed: int = 0) -> Path:
    """Write the set under `root` (train/<class>/, val/<class>/, `train` and `val` images a class);
    reuses a set already there made with the same settings. Returns `root`."""
    root = Path(root)
    settings = {"version": VERSION, "classes": classes, "train": train, "val": val, "seed": seed}
    marker = root / "learnable.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    names = class_names(classes)
    for split, count in (("train", train), ("val", val)):
        rng = random.Random(f"{seed}-{split}")  # the val images differ from the train images
        for label, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.JPEG"):  # a set of other settings: no stale files left among ours
                old.unlink()
            for i in range(count):
                make_image(label, rng).save(folder / f"{split}_{label}_{i:05d}.JPEG", "JPEG", quality=90)
    marker.write_text(json.dumps(settings))
    return root


def chance_top1_err(classes: int) -> float:
    """Top-1 error (%) of guessing."""
    return 100.0 * (1 - 1 / classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="dataset root to write")
    parser.add_argument("--classes", type=int, default=4, help=f"2 to {len(SHAPES)}")
    parser.add_argument("--train", type=int, default=60, help="training images a class")
    parser.add_argument("--val", type=int, default=20, help="validation images a class")
    args = parser.parse_args()
    try:
        root = make_learnable_set(Path(args.out), classes=args.classes, train=args.train, val=args.val)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {root}: {args.classes} classes, {args.train} train / {args.val} val images each"
          f" (chance: {chance_top1_err(args.classes):.0f}% top-1 error, {math.log(args.classes):.2f} loss)")


if __name__ == "__main__":
    main()
