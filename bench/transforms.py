"""Speed of the CPU training transform, ours vs torchvision.transforms.v2, and against bare decoding.

Everything runs in this one process, torch limited to one thread (figures are per core), on the same
real JPEG files (ImageNet-like: ~500x375, ~105 kB, made once from skimage photos with camera-like
grain). Each round takes the files in chunks of 32, every pipeline timed on each chunk in turn (the
order rotated from chunk to chunk); a pipeline's figure is its median round, in CPU time of this
process (on a shared machine, the time spent waiting for a core is not the pipeline's):

  ours           vgg.data.batches.transforms.TrainTransform on the file's path, its index and its verdict, as
                 vgg.data.datasets.folders.ImageFolder calls it: read the file, its header (nvImageCodec), the sample's
                 own draws (S, crop, flip, colour-shift alphas), decode and resample the crop box only, flip
                 -> uint8 [3, 224, 224]. The files are checked for damage once beforehand, as ImageFolder
                 checks a dataset (vgg.data.datasets.checks). Also timed: with that check on every call ("ours checking
                 each file", what an epoch cost before issue 35, and still costs a caller without verdicts);
                 handed an image PIL has already decoded ("ours on a PIL-decoded image"): PIL's decode and a
                 copy of its pixels; and without nvImageCodec ("ours decoding whole files", the fallback where
                 it has no wheel: TorchCodec decodes the whole file).
  torchvision v2 the usual way on uint8 tensors: torchcodec.decoders.decode_jpeg(path) (torchvision's
                 own decoders are deprecated since 0.29 in its favour; equally fast here), then
                 v2.Resize(S, antialias=True) (v2.RandomResize(S_min, S_max + 1) when jittering),
                 v2.RandomCrop(224), v2.RandomHorizontalFlip() -> uint8 [3, 224, 224].
  decode (floor) the whole file decoded and nothing else: PIL (Image.open + load), torchvision.io.decode_jpeg,
                 and torchcodec.decoders.decode_jpeg (all libjpeg-turbo). A transform that decodes the whole
                 file cannot be faster than these.
  ours' parts    where our time goes, to show what bounds it: "box decode" reads the file and decodes
                 the crop box of the same draws as ours (vgg.data.batches.jpeg.decode_crop, no resampling); "entropy
                 decoding" reads the file and decodes its bottom-right pixel only, which makes libjpeg
                 entropy-decode every row (JPEG has no way to skip them) and run the IDCT on almost
                 nothing: a floor for any libjpeg decode of a box that reaches the last rows.

Both pipelines stop at the uint8 crop: the float work (mean subtraction, colour shift) is done per
batch on the training device, and would be the same for both.
Measured for fixed S=256 and scale jittering S in [256, 512] (paper §3.1). Prints the machine, the
load average before and after (other processes on a shared machine slow every pipeline), one line per
S, and appends the figures to docs/benchmarks.md (`tools/readme_figures.py --transforms` runs it for the
README). Goals (issue 35): jittered, ours >= 1.5x torchvision v2 and no slower than a bare decode of the
whole file; at S=256, ours >= 1.2x torchvision v2.

    python bench/transforms.py                      # 1,024 JPEGs in the temp folder, 5 rounds
    python bench/transforms.py --images 256 --jpeg-dir /tmp/jpegs --rounds 3 --no-record
"""

import argparse
import json
import os
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchcodec.decoders import decode_jpeg as torchcodec_decode_jpeg
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import interleaved_medians, load_average, machine_text, record, write_imagenet_like_jpeg  # noqa: E402
from vgg.data.batches import jpeg as vjpeg  # noqa: E402
from vgg.data.batches.jpeg import Check  # noqa: E402
from vgg.data.batches.transforms import TrainTransform, _source_span, draw_train_crop, sample_generator  # noqa: E402
from vgg.data.datasets.checks import check_path  # noqa: E402

CROP = 224


def make_jpegs(folder: Path, count: int) -> list[Path]:
    """`count` ImageNet-like JPEGs in `folder` (deterministic; files already there are reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:05d}.JPEG" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            write_imagenet_like_jpeg(path, seed=i)
    return paths


def ours(paths: list[Path], transform: TrainTransform, checks: dict[Path, Check]) -> None:
    for index, path in enumerate(paths):
        transform(path, index, checks[path])


def ours_checking(paths: list[Path], transform: TrainTransform) -> None:
    """Ours without a verdict: the file is checked for damage first, on every call."""
    for index, path in enumerate(paths):
        transform(path, index)


def ours_pil_decode(paths: list[Path], transform: TrainTransform) -> None:
    """Ours handed an image PIL has already decoded: PIL's decode and a copy of its pixels, as before
    the TorchCodec path (shows what that path gains)."""
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            image.load()
            transform(image, index)


def ours_whole_file(paths: list[Path], transform: TrainTransform, checks: dict[Path, Check]) -> None:
    """Ours where nvImageCodec is not installed (no wheel for the platform): PIL opens the file and
    TorchCodec decodes all of it (vgg.data.batches.decode's fallback)."""
    codec, vjpeg._codec = vjpeg._codec, False  # what vgg.data.batches.jpeg holds where the import failed
    try:
        ours(paths, transform, checks)
    finally:
        vjpeg._codec = codec


def torchvision_v2(paths: list[Path], transform) -> None:
    for path in paths:
        transform(torchcodec_decode_jpeg(str(path), mode="RGB"))


def decode_pil(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as image:
            image.load()


def decode_torchvision(paths: list[Path]) -> None:
    for path in paths:
        decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)


def decode_torchcodec(paths: list[Path]) -> None:
    for path in paths:
        torchcodec_decode_jpeg(str(path), mode="RGB")


FLOORS = {"PIL": decode_pil, "torchvision": decode_torchvision, "torchcodec": decode_torchcodec}


def crop_boxes(paths: list[Path], transform: TrainTransform) -> dict[Path, tuple[int, int, int, int]]:
    """Each file's crop box in source pixels (top, left, height, width), drawn as `transform` draws
    (sample i's own generator), mapped back as vgg.data.batches.transforms._resized_crop maps it."""
    boxes = {}
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            height, width = image.height, image.width
        new_h, new_w, top, left, _ = draw_train_crop(
            height, width, crop_size=transform.crop_size, scale_min=transform.scale_min,
            scale_max=transform.scale_max, generator=sample_generator(transform.seed, 0, index))
        y0, y1 = _source_span(top, CROP, height / new_h, height)
        x0, x1 = _source_span(left, CROP, width / new_w, width)
        boxes[path] = (y0, x0, y1 - y0, x1 - x0)
    return boxes


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


def box_decode(paths: list[Path], boxes: dict) -> None:
    for path in paths:
        vjpeg.decode_crop(vjpeg.read_jpeg(path.read_bytes()), *boxes[path])


def box_decode_resample(paths: list[Path], boxes: dict) -> None:
    for path in paths:
        box = vjpeg.decode_crop(vjpeg.read_jpeg(path.read_bytes()), *boxes[path])
        F.interpolate(box[None], size=(CROP, CROP), mode="bilinear", antialias=True, align_corners=False)


def entropy_decode(paths: list[Path], sizes: dict) -> None:
    for path in paths:
        height, width = sizes[path]
        vjpeg.decode_crop(vjpeg.read_jpeg(path.read_bytes()), height - 1, width - 1, 1, 1)


def v2_transform(scale_min: int, scale_max: int) -> v2.Compose:
    resize = (v2.Resize(scale_min, antialias=True) if scale_min == scale_max
              else v2.RandomResize(scale_min, scale_max + 1, antialias=True))
    return v2.Compose([resize, v2.RandomCrop(CROP), v2.RandomHorizontalFlip()])


def measure(paths: list[Path], scale_min: int, scale_max: int, rounds: int) -> tuple[str, dict]:
    """One figures line for one S setting: img/s of each pipeline and the ratios; and the ratios the
    README quotes (tools/readme_figures.py): ours over torchvision v2 in speed, ours over each bare decode
    in time."""
    transform = TrainTransform(crop_size=CROP, scale_min=scale_min, scale_max=scale_max)
    checks = {path: check_path(str(path)).check for path in paths}  # once, as vgg.data.datasets.checks does
    pipelines = {"ours": partial(ours, transform=transform, checks=checks),
                 "ours checking each file": partial(ours_checking, transform=transform),
                 "ours on a PIL-decoded image": partial(ours_pil_decode, transform=transform),
                 "ours decoding whole files": partial(ours_whole_file, transform=transform, checks=checks),
                 "torchvision v2": partial(torchvision_v2, transform=v2_transform(scale_min, scale_max))}
    pipelines.update({f"{name} decode": fn for name, fn in FLOORS.items()})
    if vjpeg.available():
        boxes = crop_boxes(paths, transform)
        sizes = {path: image_size(path) for path in paths}
        pipelines.update({"box decode": partial(box_decode, boxes=boxes),
                          "box decode + resampling": partial(box_decode_resample, boxes=boxes),
                          "entropy decoding": partial(entropy_decode, sizes=sizes)})
    for pipeline in pipelines.values():  # warm-up: libraries loaded, caches filled
        pipeline(paths[:16])
    seconds = interleaved_medians(pipelines, paths, rounds)
    rates = ", ".join(f"{name} {len(paths) / s:.0f} img/s" for name, s in seconds.items())
    floor_ratios = ", ".join(f"{seconds['ours'] / seconds[f'{name} decode']:.2f}x {name} decode" for name in FLOORS)
    label = f"S={scale_min}" if scale_min == scale_max else f"S in [{scale_min},{scale_max}]"
    line = (f"{label}: {rates}; ours {seconds['torchvision v2'] / seconds['ours']:.2f}x as fast as "
            f"torchvision v2; ours takes {floor_ratios}")
    if "box decode" in seconds:
        ms = {name: 1e3 * s / len(paths) for name, s in seconds.items()}
        resample = ms["box decode + resampling"] - ms["box decode"]
        line += (f"; per image: ours {ms['ours']:.2f} ms = box decode {ms['box decode']:.2f} ms (of which entropy "
                 f"decoding {ms['entropy decoding']:.2f} ms; a whole decode {ms['torchcodec decode']:.2f} ms) + "
                 f"resampling {resample:.2f} ms + the rest {ms['ours'] - ms['box decode + resampling']:.2f} ms; "
                 f"box decode + resampling alone: {seconds['torchvision v2'] / seconds['box decode + resampling']:.2f}x "
                 f"as fast as torchvision v2")
    ratios = {"over_v2": seconds["torchvision v2"] / seconds["ours"],
              "time_over_decode": {name: seconds["ours"] / seconds[f"{name} decode"] for name in FLOORS}}
    return line, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jpeg-dir", default=str(Path(tempfile.gettempdir()) / "vgg_bench_jpeg"),
                        help="where the JPEG set is made (once) and read from")
    parser.add_argument("--images", type=int, default=1024, help="JPEG files to time on")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per pipeline (median kept)")
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                        help="append the figures as a row to docs/benchmarks.md")
    parser.add_argument("--json", help="also write the ratios to this JSON file (tools/readme_figures.py reads it)")
    args = parser.parse_args()
    # torchvision's decoder is timed as a floor only; its deprecation notice would clutter the output.
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
    torch.set_num_threads(1)  # per core: PIL and libjpeg are single-threaded, keep torch so too

    paths = make_jpegs(Path(args.jpeg_dir), args.images)
    kilobytes = sum(p.stat().st_size for p in paths) / len(paths) / 1e3
    for path in paths:  # into the page cache: time decoding, not the disk
        path.read_bytes()

    torch.manual_seed(0)
    load_before = load_average()
    print(f"machine: {machine_text()}; load average {load_before} ({os.cpu_count()} CPUs)", flush=True)
    lines, ratios = [], {}
    for scale_min, scale_max in ((256, 256), (256, 512)):
        line, ratios["fixed" if scale_min == scale_max else "jittered"] = measure(paths, scale_min, scale_max,
                                                                                 args.rounds)
        lines.append(line)
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"images": len(paths), "rounds": args.rounds, "load_average_1min":
                                               float(load_before), "load_average_1min_after": float(load_average()),
                                               **ratios}, indent=1))
    figures = (f"train transform per core, {len(paths)} JPEGs ~500x375 ({kilobytes:.0f} kB), crop {CROP}, "
               f"CPU time, median of {args.rounds} interleaved rounds, load average {load_before} before, "
               f"{load_average()} after: " + " — ".join(lines))
    record(torch.device("cpu"), figures, enabled=args.record)


if __name__ == "__main__":
    main()
