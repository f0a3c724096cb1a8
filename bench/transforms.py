"""Speed of the whole CPU training transform, ours vs torchvision.transforms.v2, per CPU core.

Both pipelines run in this one process (torch limited to 1 thread, so figures are per core) on the
same real JPEG files (ImageNet-like: ~500x375, ~105 kB, made once from skimage photos with
camera-like grain, as bench/train_epoch.py makes its set), in alternating rounds, best round kept:

  ours         vgg.transforms.TrainTransform on the opened file and its index (the sample's own
               generator; decode at a reduced scale when S allows, resample only the crop, flip,
               uint8 [3,224,224] and the colour-shift alphas), then per batch of 64: stack,
               `normalize` (mean RGB, paper §2.1) and `color_shift` (AlexNet PCA) with those alphas.
  torchvision  PIL decode + convert("RGB"), v2.Resize(S) or v2.RandomResize(S_min, S_max + 1),
               v2.RandomCrop(224), v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(float32),
               v2.Normalize(mean RGB, std 1) per image, then per batch of 64: stack (no colour shift:
               v2 has none, so ours does strictly more work).

Measured for fixed S=256 and scale jittering S in [256, 512] (paper §3.1). Prints one line and appends
it to docs/benchmarks.md. The goal (issue 4): ours >= 1.5x torchvision per core.

    python bench/transforms.py                      # 200 JPEGs in the temp folder
    python bench/transforms.py --images 500 --jpeg-dir /tmp/jpegs --rounds 5 --no-record
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import record, write_imagenet_like_jpeg  # noqa: E402
from vgg.data import IMAGENET_STATS  # noqa: E402
from vgg.transforms import TrainTransform, color_shift, normalize  # noqa: E402

BATCH = 64
CROP = 224
def make_jpegs(folder: Path, count: int) -> list[Path]:
    """`count` ImageNet-like JPEGs in `folder` (deterministic; files already there are reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:05d}.JPEG" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            write_imagenet_like_jpeg(path, seed=i)
    return paths


def ours(paths: list[Path], scale_min: int, scale_max: int) -> float:
    """Seconds for our whole training transform over `paths`, float batches included."""
    transform = TrainTransform(crop_size=CROP, scale_min=scale_min, scale_max=scale_max)
    start = time.perf_counter()
    for first in range(0, len(paths), BATCH):
        crops = []
        for index, path in enumerate(paths[first:first + BATCH], start=first):
            with Image.open(path) as image:
                crops.append(transform(image, index))  # per-sample draws, as vgg.data.ImageFolder asks
        alphas = torch.stack([crop.alphas for crop in crops])
        batch = color_shift(normalize(torch.stack([crop.image for crop in crops]), IMAGENET_STATS.mean_rgb),
                            IMAGENET_STATS, alphas=alphas)
    del batch
    return time.perf_counter() - start


def torchvision_v2(paths: list[Path], scale_min: int, scale_max: int) -> float:
    """Seconds for the equivalent torchvision.transforms.v2 pipeline over `paths`."""
    resize = v2.Resize(scale_min) if scale_min == scale_max else v2.RandomResize(scale_min, scale_max + 1)
    transform = v2.Compose([resize, v2.RandomCrop(CROP), v2.RandomHorizontalFlip(), v2.ToImage(),
                            v2.ToDtype(torch.float32), v2.Normalize(mean=list(IMAGENET_STATS.mean_rgb),
                                                                    std=[1.0, 1.0, 1.0])])
    start = time.perf_counter()
    for first in range(0, len(paths), BATCH):
        crops = []
        for path in paths[first:first + BATCH]:
            with Image.open(path) as image:
                crops.append(transform(image.convert("RGB")))
        batch = torch.stack(crops)
    del batch
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jpeg-dir", default=str(Path(tempfile.gettempdir()) / "vgg_bench_jpeg"),
                        help="where the JPEG set is made (once) and read from")
    parser.add_argument("--images", type=int, default=200, help="JPEG files to time on")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per pipeline (best kept)")
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                        help="append the figures as a row to docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core: PIL is single-threaded, keep torch so too

    paths = make_jpegs(Path(args.jpeg_dir), args.images)
    kilobytes = sum(p.stat().st_size for p in paths) / len(paths) / 1e3
    for path in paths:  # into the page cache: time decoding, not the disk
        path.read_bytes()

    parts = []
    for scale_min, scale_max in ((256, 256), (256, 512)):
        torch.manual_seed(0)
        ours(paths[:BATCH], scale_min, scale_max)  # warm-up
        torchvision_v2(paths[:BATCH], scale_min, scale_max)
        best_ours, best_tv = float("inf"), float("inf")
        for _ in range(args.rounds):
            best_ours = min(best_ours, ours(paths, scale_min, scale_max))
            best_tv = min(best_tv, torchvision_v2(paths, scale_min, scale_max))
        rate_ours, rate_tv = len(paths) / best_ours, len(paths) / best_tv
        label = f"S={scale_min}" if scale_min == scale_max else f"S in [{scale_min},{scale_max}]"
        parts.append(f"{label}: ours {rate_ours:.0f} img/s, torchvision v2 {rate_tv:.0f} img/s "
                     f"({rate_ours / rate_tv:.2f}x)")
    figures = (f"train transform per core, {len(paths)} JPEGs ~500x375 ({kilobytes:.0f} kB), crop {CROP}, "
               f"batch {BATCH}: " + "; ".join(parts))
    record(torch.device("cpu"), figures, enabled=args.record)


if __name__ == "__main__":
    main()
