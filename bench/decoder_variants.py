"""The GPU suite's decoder section (bench/gpu_suite.py): each way of decoding the training JPEGs, timed in a
child process of its own, so that one that crashes (nvImageCodec 0.9.0's GPU region decode on H100/B200,
its issue #55) is one line of the report and the others still run.

Variants: nvImageCodec's region decode on the GPU's hardware JPEG engine ("nvimgcodec-hw"), on CUDA
("nvimgcodec-cuda"), and both with its load-balancing hint ("nvimgcodec-both"); TorchCodec's whole-image
nvJPEG decode ("torchcodec", the GPU path's default); the CPU path's workers ("cpu-workers"). Without a
GPU the GPU ones are "not run: no GPU", and the GPU path's code runs on the CPU instead ("torchcodec" on
TorchCodec's CPU decoder, "nvimgcodec-cpu" on nvImageCodec's CPU backend). Per variant: a pixel check
(its crops of the first 16 files against those of the CPU decode, libjpeg-turbo's whole image through the
same resampling, for the same draws: mean |difference| <= 2 levels) and the data path's rate (decode +
augment alone, img/s), over the step alone where the suite has measured it.

    python bench/decoder_variants.py --variant torchcodec --device cpu --jpeg-dir DIR --out result.json
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GPU_VARIANTS = {"nvimgcodec-hw": ("nvimgcodec", "hw"), "nvimgcodec-cuda": ("nvimgcodec", "cuda"),
                "nvimgcodec-both": ("nvimgcodec", "both"), "torchcodec": ("torchcodec", "both")}
CPU_STAND_INS = {"nvimgcodec-cpu": ("nvimgcodec", "both"), "torchcodec": ("torchcodec", "both")}
PIXEL_BOUND = 2.0  # mean |difference| in levels from the CPU decode's crops (bench/suite_checks.py's bound for nvJPEG)


def variants(on_cuda: bool) -> dict[str, str | None]:
    """Each variant to run here: None, or why it is not run."""
    out = {name: None if on_cuda else "not run: no GPU" for name in GPU_VARIANTS}
    if not on_cuda:
        out.update({name: None for name in CPU_STAND_INS})
    out["cpu-workers"] = None
    return out


def run_variants(device: torch.device, jpeg_root: Path, work: Path, *, batch: int, crop: int, scale: int,
                 workers: int, warmup: int, steps: int, timeout: float, step_alone: float | None) -> dict:
    """Each variant in a child process: its figures, or one line saying why it has none."""
    results = {}
    for name, why in variants(device.type == "cuda").items():
        if why is not None:
            results[name] = {"status": why}
            continue
        out = work / f"decoder-{name}.json"
        out.unlink(missing_ok=True)
        command = [sys.executable, str(Path(__file__)), "--variant", name, "--device", str(device),
                   "--jpeg-dir", str(jpeg_root), "--batch", str(batch), "--crop", str(crop), "--scale", str(scale),
                   "--workers", str(workers), "--warmup", str(warmup), "--steps", str(steps), "--out", str(out)]
        try:
            child = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            results[name] = {"status": f"failed: no result in {timeout:.0f} s"}
            continue
        if child.returncode != 0 or not out.is_file():
            last = (child.stderr.strip().splitlines() or ["no message"])[-1][:200]
            how = f"killed by signal {-child.returncode}" if child.returncode < 0 else f"exit {child.returncode}"
            results[name] = {"status": f"crashed ({how}): {last}"}
            continue
        figures = json.loads(out.read_text())
        if step_alone:
            figures["fed_over_step"] = figures["decode_augment_img_s"] / step_alone
        figures["status"] = "ok" if figures["pixel_mean_diff"] <= PIXEL_BOUND else (
            f"failed: pixels {figures['pixel_mean_diff']:.2f} levels from the CPU path's (bound {PIXEL_BOUND:g})")
        results[name] = figures
    return results


def summary(results: dict) -> str:
    parts = []
    for name, r in results.items():
        if "decode_augment_img_s" not in r:
            parts.append(f"{name}: {r['status']}")
            continue
        over = f" = {r['fed_over_step']:.2f} of the step" if "fed_over_step" in r else ""
        pixels = "" if name == "cpu-workers" else f", {r['pixel_mean_diff']:.2f} levels from the CPU decode"
        parts.append(f"{name}: {r['decode_augment_img_s']:,.0f} img/s{over}{pixels}"
                     + ("" if r["status"] == "ok" else f" ({r['status']})"))
    return "; ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", required=True, choices=sorted({*GPU_VARIANTS, *CPU_STAND_INS, "cpu-workers"}))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jpeg-dir", required=True, help="a dataset root with train/<class>/*.JPEG")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--scale", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    Path(args.out).write_text(json.dumps(child_figures(args)))


def child_figures(args) -> dict:
    from bench.train_epoch import build_path_loader, run_fed
    from vgg.data.datasets import folders as vfolders
    from vgg.data.datasets import stats as vstats
    from vgg.data.batches.transforms import TrainTransform
    from vgg.training.step import BatchAugment

    device = torch.device(args.device)
    transform = TrainTransform(crop_size=args.crop, scale_min=args.scale, scale_max=args.scale)
    train_set = vfolders.ImageFolder(Path(args.jpeg_dir) / "train", transform)
    path = "cpu" if args.variant == "cpu-workers" else "gpu"
    decoder, backends = {**GPU_VARIANTS, **CPU_STAND_INS}.get(args.variant, ("torchcodec", "both"))
    options = {} if path == "cpu" else {"decoder": decoder, "backends": backends}
    loader = build_path_loader(path, train_set, batch=args.batch, device=device, crop_size=args.crop,
                               scale_min=args.scale, scale_max=args.scale, workers=args.workers,
                               channels_last=False, **options)
    augment = BatchAugment(vstats.IMAGENET_STATS, device, generator=torch.Generator().manual_seed(0))
    rate = run_fed(None, loader, augment, warmup=args.warmup, steps=args.steps, device=device)
    return {"decode_augment_img_s": rate["images_per_s"],
            "pixel_mean_diff": 0.0 if path == "cpu" else pixel_difference(train_set, device, options, args)}


def pixel_difference(train_set, device: torch.device, options: dict, args) -> float:
    """Mean |difference| between the variant's crops of the first 16 files and the CPU decode's (the GPU
    path's code with TorchCodec on the CPU), for the same draws (seed 0, epoch 0). The CPU workers are
    not compared: they decode at a reduced scale where one fits, and snap each box to whole pixels."""
    from vgg.data.batches.gpu import build_gpu_train_loader

    count, crops = min(16, len(train_set)), []
    for on, decoder in ((device, options), ("cpu", {"decoder": "torchcodec"})):
        loader = build_gpu_train_loader(train_set, batch_size=count, device=on, crop_size=args.crop, scale_min=args.scale,
                                        scale_max=args.scale, workers=0, drop_last=False, prefetch=False, **decoder)
        crops.append(next(iter(loader))[0].image.cpu().float())
    if crops[0].shape != crops[1].shape:
        return float("inf")
    return (crops[0] - crops[1]).abs().mean().item()


if __name__ == "__main__":
    main()
