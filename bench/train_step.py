"""Training-step speed on synthetic tensors already on the device: images/s and model FLOP utilisation.

Nets A, D and E (Table 1) at batch 256 run the trainer's step (bf16 autocast, channels-last,
torch.compile, SGD with momentum and weight decay), and, in the same run, torchvision's `vgg16`
trained the plain way (fp32, contiguous memory, no compile, no cuDNN autotuning): net D against
plain vgg16 (the same net) is the speed-up the issue asks for. MFU = achieved FLOP/s over the FLOP/s
of a bf16 matmul (8192^3) timed in the same run; FLOP per image = 3 x 2 x multiply-adds of the
forward pass (counted from the layer shapes: 15.47 G for net D at 224).

On an H100 (the figures the issue asks for; appends a row to docs/benchmarks.md):
    python bench/train_step.py
A quick check that it works, on the CPU (fp32, tiny nets, nothing recorded):
    python bench/train_step.py --device cpu --nets A --width 0.0625 --fc-width 64 --image-size 32 \
        --batch 4 --steps 2 --warmup 1 --no-record
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (add_common_args, count_macs, describe_device, free_memory,  # noqa: E402
                          make_train_step, matmul_flops_per_s, prepare_model, record, resolve_device,
                          speed_switches_text, synchronize, time_loop, trainer_optimizer)
from vgg.models import build_vgg  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", default="A,D,E", help="comma-separated nets from Table 1")
    parser.add_argument("--batch", type=int, default=256, help="images per step")
    parser.add_argument("--image-size", type=int, default=224, help="training crop side")
    parser.add_argument("--width", type=float, default=1.0, help="conv channel multiplier (1.0: the paper's nets)")
    parser.add_argument("--fc-width", type=int, default=4096, help="width of the hidden FC layers")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per net")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torchvision's vgg16 the plain way (fp32, no compile)")
    parser.add_argument("--matmul-size", type=int, default=0,
                        help="side of the reference matmul for MFU (default: 8192 on CUDA, 1024 on CPU)")
    add_common_args(parser)
    return parser


def time_training(model, step_images, labels, *, device, bf16: bool, warmup: int, steps: int) -> float:
    """Images per second of the trainer's step on one fixed synthetic batch."""
    step = make_train_step(model, trainer_optimizer(model), device=device, bf16=bf16)
    for _ in range(warmup):
        step(step_images, labels)
    synchronize(device)
    seconds = time_loop(lambda: step(step_images, labels), steps, device)
    return step_images.shape[0] * steps / seconds


def synthetic_batch(batch: int, size: int, device, channels_last: bool):
    """Mean-subtracted-looking float images and random labels, made on the device."""
    images = torch.randn(batch, 3, size, size, device=device) * 60
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 1000, (batch,), device=device)


def main(argv=None) -> str:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    use_compile = on_cuda if args.compile is None else args.compile
    channels_last, bf16 = on_cuda and args.channels_last, on_cuda and args.bf16
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    torch.manual_seed(0)

    # The MFU denominator: a big bf16 matmul on this GPU (fp32 on the CPU, which runs fp32 steps).
    ref_dtype = torch.bfloat16 if bf16 else torch.float32
    ref_size = args.matmul_size or (8192 if on_cuda else 1024)
    peak = matmul_flops_per_s(device, ref_dtype, ref_size)
    dtype_name = "bf16" if ref_dtype == torch.bfloat16 else "fp32"
    parts = [f"{dtype_name} matmul {ref_size}^3: {peak / 1e12:.1f} TFLOP/s"]
    print(f"device: {describe_device(device)}; {parts[0]}", flush=True)

    rates = {}
    for name in nets:
        torch.backends.cudnn.benchmark = on_cuda and args.cudnn_benchmark
        model = build_vgg(name, width=args.width, fc_width=args.fc_width, image_size=args.image_size).to(device)
        flops = 6 * count_macs(model, args.image_size)
        model = prepare_model(model, device, channels_last=channels_last, compile_model=use_compile)
        images, labels = synthetic_batch(args.batch, args.image_size, device, channels_last)
        rate = time_training(model, images, labels, device=device, bf16=bf16, warmup=args.warmup,
                             steps=args.steps)
        rates[name] = rate
        parts.append(f"net {name}: {rate:,.0f} img/s, MFU {100 * rate * flops / peak:.1f}%")
        print(parts[-1], flush=True)
        del model, images, labels
        free_memory(device)

    if args.plain:
        # What a user would write from torchvision's docs: fp32, NCHW, eager, default cuDNN settings.
        import torchvision

        torch.backends.cudnn.benchmark = False
        model = torchvision.models.vgg16(weights=None).to(device)
        flops = 6 * count_macs(model, args.image_size)
        images, labels = synthetic_batch(args.batch, args.image_size, device, channels_last=False)
        rate = time_training(model, images, labels, device=device, bf16=False, warmup=args.warmup,
                             steps=args.steps)
        parts.append(f"plain torchvision vgg16 fp32: {rate:,.0f} img/s, MFU {100 * rate * flops / peak:.1f}%")
        if "D" in rates and args.width == 1 and args.fc_width == 4096:  # the same net, so comparable
            parts.append(f"net D / plain = {rates['D'] / rate:.2f}x")
        del model, images, labels
        free_memory(device)

    settings = (f"batch {args.batch}, {args.image_size}px, width {args.width:g}, "
                + speed_switches_text(bf16=bf16, channels_last=channels_last, use_compile=use_compile))
    figures = f"train step ({settings}): " + "; ".join(parts)
    record(device, figures, enabled=args.record)
    return figures


if __name__ == "__main__":
    main()
