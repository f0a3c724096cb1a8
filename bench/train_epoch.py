"""Whole training steps fed by the real data path from JPEG files on disk: can the data keep up?

The same compiled step as bench/train_step.py (net D, batch 256 by default) is timed twice in one run:
  1. on one batch already on the device (the step alone: the most the data path could reach), then
  2. fed by a data path reading JPEGs from disk, each `--data-path`:
       cpu  PIL decode + rescale/crop/flip in DataLoader workers (vgg.data + vgg.data.batches.transforms),
       gpu  workers read bytes; nvJPEG batch decode + augmentation on the GPU (vgg.data.batches.gpu).
Both feed the trainer's BatchAugment (mean subtraction, colour shift). Figures per path: images/s,
data overhead = 1 - fed/step-alone (the goal: < 5 %), and the host time spent waiting for the
next batch as a fraction of the run.

Without --data, a synthetic ImageNet-sized JPEG set (photos from skimage, ~500x375) is
made once under data/bench_jpeg/ (quality 95, ~105 kB a file, like ImageNet's).

On an H100 machine (16 CPU cores):
    python bench/train_epoch.py --data-path gpu,cpu --workers 16
Quick CPU check (tiny net, nothing recorded):
    python bench/train_epoch.py --device cpu --width 0.0625 --fc-width 64 --crop-size 32 --scale-min 36 \
        --scale-max 36 --batch 8 --steps 3 --warmup 1 --images 64 --workers 1 --jpeg-dir /tmp/bench_jpeg --no-record
"""

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    REPO,
    add_common_args,
    load_average,
    make_train_step,
    prepare_model,
    record,
    resolve_device,
    speed_switches_text,
    synchronize,
    time_loop,
    trainer_optimizer,
    write_imagenet_like_jpeg,
)
from vgg.data.batches import loaders as vloaders
from vgg.data.batches.gpu import build_gpu_train_loader  # noqa: E402
from vgg.data.batches.transforms import TrainTransform  # noqa: E402
from vgg.data.datasets import folders as vfolders
from vgg.data.datasets import stats as vstats
from vgg.models.vgg import build_vgg  # noqa: E402
from vgg.training.step import BatchAugment  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="dataset root holding train/<wnid>/*.JPEG (default: "
                                                   "a synthetic set under --jpeg-dir)")
    parser.add_argument("--jpeg-dir", default=str(REPO / "data" / "bench_jpeg"),
                        help="where the synthetic JPEG set is made (once) when --data is not given")
    parser.add_argument("--images", type=int, default=10240, help="images in the synthetic JPEG set")
    parser.add_argument("--data-path", default="gpu,cpu", help="comma-separated: gpu, cpu")
    parser.add_argument("--workers", type=int, default=16, help="DataLoader worker processes")
    parser.add_argument("--net", default="D", help="net from Table 1")
    parser.add_argument("--width", type=float, default=1.0, help="conv channel multiplier")
    parser.add_argument("--fc-width", type=int, default=4096, help="width of the hidden FC layers")
    parser.add_argument("--batch", type=int, default=256, help="images per step")
    parser.add_argument("--crop-size", type=int, default=224, help="training crop side")
    parser.add_argument("--scale-min", type=int, default=256, help="training scale S (S_min)")
    parser.add_argument("--scale-max", type=int, default=256, help="S_max (> scale-min: scale jittering)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per data path")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (workers starting)")
    add_common_args(parser)
    return parser


def make_jpeg_set(root: Path, count: int, *, classes: int = 10, workers: int = 1) -> Path:
    """A synthetic ImageNet-sized JPEG training set of `count` images under root/<count>/train/<wnid>/
    (made once, reused)."""
    root = root / str(count)
    done = root / ".complete"
    if done.exists():
        return root
    jobs = []
    for i in range(count):
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"img_{i:07d}.JPEG", i))
    print(f"making {count} ImageNet-sized JPEGs under {root} ...", flush=True)
    with multiprocessing.Pool(max(workers, 1)) as pool:
        sizes = pool.starmap(write_imagenet_like_jpeg, jobs, chunksize=64)
    print(f"  mean file size {sum(sizes) / len(sizes) / 1e3:.0f} kB", flush=True)
    done.touch()
    return root


def endless(loader):
    """The loader's batches, pass after pass (a fresh iterator whenever one is spent)."""
    while True:
        yield from loader


def build_path_loader(name: str, train_set, *, batch: int, device, crop_size: int, scale_min: int,
                      scale_max: int, workers: int, channels_last: bool, **gpu_options):
    """The training loader of data path `name`: cpu (decode and augment in workers) or gpu (workers
    read bytes; decode and augmentation on the device; gpu_options: vgg.data.batches.gpu's decoder, backends)."""
    if name == "cpu":
        return vloaders.build_loader(train_set, batch_size=batch, shuffle=True, workers=workers,
                                  collate_fn=vloaders.collate_batch, seed=0, drop_last=True)
    if name == "gpu":
        return build_gpu_train_loader(train_set, batch_size=batch, device=device, crop_size=crop_size,
                                      scale_min=scale_min, scale_max=scale_max, seed=0, workers=workers,
                                      shuffle=True, channels_last=channels_last, **gpu_options)
    raise SystemExit(f"error: unknown --data-path {name!r}; allowed: cpu, gpu")


def run_fed(step, loader, augment: BatchAugment, *, warmup: int, steps: int, device) -> dict:
    """Train `steps` steps fed by `loader` after `warmup` untimed ones (the loader restarts when done).
    With step=None, the data path alone: decode and augment (BatchAugment included), no training."""
    batches = endless(loader)
    wait, images_seen, skipped, start = 0.0, 0, 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            wait, images_seen, skipped, start = 0.0, 0, 0, time.perf_counter()
        fetch = time.perf_counter()
        images, labels, unreadable = next(batches)
        wait += time.perf_counter() - fetch
        images, labels = augment(images, train=True), labels.to(device, non_blocking=True)
        if step is not None:
            step(images, labels)
        images_seen += labels.shape[0]
        skipped += len(unreadable)
    synchronize(device)
    elapsed = time.perf_counter() - start
    batches.close()
    return {"images_per_s": images_seen / elapsed, "wait_fraction": wait / elapsed, "skipped": skipped}


def step_alone_timer(step, augment: BatchAugment, *, batch: int, crop_size: int, classes: int, device):
    """A function of `steps` that times that many steps on one uint8 batch already on the device
    (still through BatchAugment): the most a data path could reach. It returns images/s."""
    images = torch.randint(0, 256, (batch, 3, crop_size, crop_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)

    def step_alone(steps: int) -> float:
        synchronize(device)
        seconds = time_loop(lambda: step(augment(images, train=True), labels), steps, device)
        return batch * steps / seconds
    return step_alone


def main(argv=None) -> str:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    use_compile = on_cuda if args.compile is None else args.compile
    channels_last, bf16 = on_cuda and args.channels_last, on_cuda and args.bf16
    paths = [p.strip() for p in args.data_path.split(",") if p.strip()]
    for p in paths:
        if p not in ("cpu", "gpu"):
            raise SystemExit(f"error: unknown --data-path {p!r}; allowed: cpu, gpu")
    torch.backends.cudnn.benchmark = on_cuda and args.cudnn_benchmark
    torch.manual_seed(0)

    root = Path(args.data) if args.data else make_jpeg_set(Path(args.jpeg_dir), args.images,
                                                           workers=args.workers)
    train_transform = TrainTransform(crop_size=args.crop_size, scale_min=args.scale_min,
                                     scale_max=args.scale_max)
    train_set = vfolders.ImageFolder(root / "train", train_transform)
    stats = vstats.IMAGENET_STATS  # speed does not depend on the statistics' values
    kilobytes = sum(Path(p).stat().st_size for p, _ in train_set.samples) / len(train_set) / 1e3

    model = build_vgg(args.net, num_classes=len(train_set.classes), width=args.width, fc_width=args.fc_width,
                      image_size=args.crop_size)
    model = prepare_model(model, device, channels_last=channels_last, compile_model=use_compile)
    step = make_train_step(model, trainer_optimizer(model), device=device, bf16=bf16)
    augment = BatchAugment(stats, device, channels_last=channels_last, generator=torch.Generator().manual_seed(0))

    load_before = load_average()
    # 1. The step alone, timed before and after the fed runs, the faster kept: an under-warmed first
    #    timing would make the data overhead look smaller than it is.
    step_alone = step_alone_timer(step, augment, batch=args.batch, crop_size=args.crop_size,
                                  classes=len(train_set.classes), device=device)
    step_alone(args.warmup)  # untimed: compilation, autotuning
    alone = step_alone(args.steps)
    print(f"step alone {alone:,.0f} img/s", flush=True)

    # 2. Fed from disk by each data path.
    fed = {}
    for name in paths:
        loader = build_path_loader(name, train_set, batch=args.batch, device=device, crop_size=args.crop_size,
                                   scale_min=args.scale_min, scale_max=args.scale_max, workers=args.workers,
                                   channels_last=channels_last)
        fed[name] = run_fed(step, loader, augment, warmup=args.warmup, steps=args.steps, device=device)
        print(f"{name} data path: {fed[name]['images_per_s']:,.0f} img/s", flush=True)
        del loader
    alone = max(alone, step_alone(args.steps))

    parts = [f"step alone {alone:,.0f} img/s"]
    for name, result in fed.items():
        overhead = max(0.0, 1 - result["images_per_s"] / alone)
        parts.append(f"{name} data path: {result['images_per_s']:,.0f} img/s, data overhead "
                     f"{100 * overhead:.1f}%, host wait {100 * result['wait_fraction']:.1f}%"
                     + (f", {result['skipped']} skipped" if result["skipped"] else ""))

    source = (f"{args.data}/train" if args.data else "synthetic JPEGs") + f" ({len(train_set)}, {kilobytes:.0f} kB)"
    settings = (f"net {args.net} width {args.width:g}, batch {args.batch}, crop {args.crop_size}, "
                f"S {args.scale_min}-{args.scale_max}, {args.workers} workers, {source}, "
                + speed_switches_text(bf16=bf16, channels_last=channels_last, use_compile=use_compile)
                + f", load average {load_before} before, {load_average()} after")
    figures = f"train epoch ({settings}): " + "; ".join(parts)
    record(device, figures, enabled=args.record)
    return figures


if __name__ == "__main__":
    main()
