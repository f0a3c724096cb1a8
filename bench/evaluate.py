"""Test-time speed of net D (§3.2, §4): dense 3-scale evaluation and 150-crop evaluation, in images/s.

Uses vgg/evaluation.py's own functions on decoded images already on the device (ImageNet's usual
4:3 shape, rescaled to each test scale Q), so the figures are the net's share of an evaluation:
  dense       `dense_probs` of the fully-convolutional net on the whole image and its mirror image,
              at Q = 224, 256, 288 (S = 256, {S-32, S, S+32}, §4.2); soft-max averaged over scales.
  150-crop    `multi_crop_probs`: a 5x5 grid of 224 crops and their flips at each of the 3 scales.
Like vgg/evaluation.py: bf16 autocast and channels-last on CUDA, no torch.compile (--compile to try).

On an H100:
    python bench/evaluate.py
Quick CPU check (tiny net, nothing recorded):
    python bench/evaluate.py --device cpu --width 0.0625 --fc-width 64 --crop-size 32 --scales 32,36,48 \
        --batch 2 --steps 1 --warmup 1 --no-record
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (add_common_args, prepare_model, record, resolve_device,  # noqa: E402
                          speed_switches_text, synchronize, time_loop)
from vgg.engine import autocast_context  # noqa: E402
from vgg.evaluation import dense_probs, fuse, multi_crop_probs  # noqa: E402
from vgg.models import build_vgg, to_dense  # noqa: E402
from vgg.transforms import normalize  # noqa: E402

IMAGENET_MEAN = (123.68, 116.78, 103.94)  # speed does not depend on the values


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="D", help="net from Table 1")
    parser.add_argument("--width", type=float, default=1.0, help="conv channel multiplier")
    parser.add_argument("--fc-width", type=int, default=4096, help="width of the hidden FC layers")
    parser.add_argument("--crop-size", type=int, default=224, help="the net's training crop side")
    parser.add_argument("--scales", default="224,256,288", help="test scales Q (smallest image side)")
    parser.add_argument("--batch", type=int, default=32, help="images per dense batch (and per crop batch)")
    parser.add_argument("--steps", type=int, default=5, help="timed batches per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (cuDNN autotuning)")
    add_common_args(parser)
    return parser


def main(argv=None) -> str:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    use_compile = bool(args.compile)  # vgg/evaluation.py runs the nets uncompiled
    channels_last, bf16 = on_cuda and args.channels_last, on_cuda and args.bf16
    scales = [int(q) for q in args.scales.split(",")]
    torch.backends.cudnn.benchmark = on_cuda and args.cudnn_benchmark
    torch.manual_seed(0)

    model = build_vgg(args.net, width=args.width, fc_width=args.fc_width, image_size=args.crop_size).eval()
    dense_model = to_dense(model).eval()
    model = prepare_model(model, device, channels_last=channels_last, compile_model=use_compile)
    dense_model = prepare_model(dense_model, device, channels_last=channels_last, compile_model=use_compile)

    # One batch of decoded 4:3 images per scale, as the loader would hand them over (uint8).
    images = {q: torch.randint(0, 256, (args.batch, 3, q, q * 4 // 3), dtype=torch.uint8, device=device)
              for q in scales}

    def prepared(q):
        x = images[q]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return normalize(x, IMAGENET_MEAN)

    @torch.inference_mode()
    def dense_batch():
        with autocast_context(device, bf16):
            return fuse([dense_probs(dense_model, prepared(q)) for q in scales])

    @torch.inference_mode()
    def crops_batch():
        with autocast_context(device, bf16):
            return fuse([multi_crop_probs(model, list(prepared(q)), args.crop_size, channels_last=channels_last)
                         for q in scales])

    parts = []
    crops = 50 * len(scales)
    for label, fn in ((f"dense {len(scales)}-scale", dense_batch), (f"{crops}-crop", crops_batch)):
        for _ in range(args.warmup):
            fn()
        synchronize(device)
        rate = args.batch * args.steps / time_loop(fn, args.steps, device)
        parts.append(f"{label}: {rate:,.1f} img/s")
        print(parts[-1], flush=True)

    settings = (f"net {args.net} width {args.width:g}, Q {','.join(map(str, scales))}, 4:3 images, "
                f"batch {args.batch}, "
                + speed_switches_text(bf16=bf16, channels_last=channels_last, use_compile=use_compile))
    figures = f"evaluation ({settings}): " + "; ".join(parts)
    record(device, figures, enabled=args.record)
    return figures


if __name__ == "__main__":
    main()
