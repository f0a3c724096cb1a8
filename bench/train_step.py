"""Training-step speed on synthetic tensors already on the device: images/s, and MFU on a known GPU.

Nets A, D and E (Table 1) at batch 256 run the trainer's step (bf16 autocast, channels-last,
torch.compile, SGD with momentum and weight decay), and, in the same run, torchvision's `vgg16`
trained the plain way (fp32, contiguous memory, no compile, no cuDNN autotuning). The nets are timed
in turns (`--repeats` rounds of `--steps` steps each, median kept), so a slow spell of the machine
falls on all of them.

"net D / plain" compares the same net only: at 224 px, where torchvision's adaptive average pool is
the identity (7x7 in, 7x7 out) and both first FC layers take 25,088 inputs, with the paper's widths.
At any other size the pool resizes the feature map to 7x7 (at 64 px: 2x2 -> 7x7, 25,088 FC inputs
against our 2,048), so plain vgg16 is then not timed.

MFU (model FLOP utilisation) = achieved FLOP/s over the GPU's datasheet dense bf16 peak, printed only
for bf16 runs on a GPU whose peak is listed in `BF16_PEAK_TFLOPS`; never on the CPU. FLOP per image
= 3 x 2 x multiply-adds of the forward pass (counted from the layer shapes: 15.47 G for net D at 224).

On an H100 (the figures the issue asks for; appends a row to docs/benchmarks.md):
    python bench/train_step.py
On the CPU, net D against plain vgg16 at 224 px (fp32, small batch):
    python bench/train_step.py --device cpu --nets D --batch 4 --steps 2 --warmup 1 --repeats 3
A quick check that it works (tiny nets, nothing recorded):
    python bench/train_step.py --device cpu --nets A --width 0.0625 --fc-width 64 --image-size 32 \
        --batch 4 --steps 2 --warmup 1 --no-record
"""

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    add_common_args,
    count_macs,
    describe_device,
    load_average,
    make_train_step,
    prepare_model,
    record,
    resolve_device,
    speed_switches_text,
    synchronize,
    time_loop,
    trainer_optimizer,
)
from vgg.models.vgg import build_vgg  # noqa: E402

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), by a part of
# torch.cuda.get_device_name(); the more specific names first.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", default="A,D,E", help="comma-separated nets from Table 1")
    parser.add_argument("--batch", type=int, default=256, help="images per step")
    parser.add_argument("--image-size", type=int, default=224, help="training crop side")
    parser.add_argument("--width", type=float, default=1.0, help="conv channel multiplier (1.0: the paper's nets)")
    parser.add_argument("--fc-width", type=int, default=4096, help="width of the hidden FC layers")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per net and round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of timed steps, nets in turn (median kept)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torchvision's vgg16 the plain way (fp32, no compile), where comparable")
    parser.add_argument("--matmul-size", type=int, default=0, help="ignored (kept for old command lines)")
    add_common_args(parser)
    return parser


def bf16_peak_flops(device: torch.device) -> float | None:
    """The datasheet dense bf16 peak of this GPU in FLOP/s, or None (unknown GPU, or the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, tflops in BF16_PEAK_TFLOPS.items():
        if part in name:
            return tflops * 1e12
    return None


def synthetic_batch(batch: int, size: int, device, channels_last: bool):
    """Mean-subtracted-looking float images and random labels, made on the device."""
    images = torch.randn(batch, 3, size, size, device=device) * 60
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 1000, (batch,), device=device)


def plain_skip_reason(args) -> str | None:
    """Why plain vgg16 cannot be compared with our nets in this run, or None when it can."""
    if args.image_size != 224:
        return (f"not comparable at {args.image_size}px: torchvision's adaptive pool feeds its first FC "
                f"25,088 inputs, ours {512 * (args.image_size // 32) ** 2:,}; compare at 224px")
    if args.width != 1 or args.fc_width != 4096:
        return "not comparable: our nets are scaled down (--width, --fc-width)"
    return None


@dataclass
class StepCase:
    """One way of training one net, ready to time: its step, its own batch on the device, the FLOP
    one image costs (3 x 2 x forward multiply-adds) and the cuDNN autotuning it runs under."""
    name: str
    step: Callable
    batch: tuple
    flops_per_image: float
    cudnn_benchmark: bool


def ours_case(name: str, *, device, batch: int, image_size: int, width: float = 1.0, fc_width: int = 4096,
              bf16: bool, channels_last: bool, compile_model: bool, cudnn_benchmark: bool,
              label: str | None = None) -> StepCase:
    """Our net `name` (Table 1) trained by the trainer's step, as the trainer sets it up."""
    model = build_vgg(name, width=width, fc_width=fc_width, image_size=image_size).to(device)
    flops = 6 * count_macs(model, image_size)
    model = prepare_model(model, device, channels_last=channels_last, compile_model=compile_model)
    return StepCase(label or f"net {name}", make_train_step(model, trainer_optimizer(model), device=device, bf16=bf16),
                    synthetic_batch(batch, image_size, device, channels_last), flops, cudnn_benchmark)


def peer_case(label: str, *, device, batch: int, image_size: int, bf16: bool, channels_last: bool,
              compile_model: bool, cudnn_benchmark: bool, model=None) -> StepCase:
    """torchvision's vgg16 (or `model`) trained by the same step and optimizer: only the net differs."""
    import torchvision

    model = (model if model is not None else torchvision.models.vgg16(weights=None)).to(device)
    flops = 6 * count_macs(model, image_size)
    model = prepare_model(model, device, channels_last=channels_last, compile_model=compile_model)
    return StepCase(label, make_train_step(model, trainer_optimizer(model), device=device, bf16=bf16),
                    synthetic_batch(batch, image_size, device, channels_last), flops, cudnn_benchmark)


def warm_up(case: StepCase, steps: int, device) -> None:
    """Untimed steps (compilation, cuDNN autotuning), ended by one synchronisation."""
    torch.backends.cudnn.benchmark = case.cudnn_benchmark
    for _ in range(steps):
        case.step(*case.batch)
    synchronize(device)


def time_rounds(cases: list[StepCase], *, steps: int, repeats: int, device) -> dict[str, list[float]]:
    """Images/s of each case in each of `repeats` rounds of `steps` steps, the cases in turn within a
    round, so that a slow spell of the machine falls on all of them."""
    rates = {case.name: [] for case in cases}
    for _ in range(repeats):
        for case in cases:
            torch.backends.cudnn.benchmark = case.cudnn_benchmark
            seconds = time_loop(lambda: case.step(*case.batch), steps, device)
            rates[case.name].append(case.batch[1].shape[0] * steps / seconds)
    return rates


def main(argv=None) -> str:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    use_compile = on_cuda if args.compile is None else args.compile
    channels_last, bf16 = on_cuda and args.channels_last, on_cuda and args.bf16
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    torch.manual_seed(0)
    peak = bf16_peak_flops(device) if bf16 else None
    load_before = load_average()
    print(f"device: {describe_device(device)}; load average {load_before}", flush=True)

    # Every net and its step, built first, then timed in turns.
    cases = [ours_case(name, device=device, batch=args.batch, image_size=args.image_size, width=args.width,
                       fc_width=args.fc_width, bf16=bf16, channels_last=channels_last, compile_model=use_compile,
                       cudnn_benchmark=on_cuda and args.cudnn_benchmark) for name in nets]
    skip = plain_skip_reason(args) if args.plain else "not asked for"
    plain = "plain torchvision vgg16 fp32"
    if skip is None:
        # What a user would write from torchvision's docs: fp32, NCHW, eager, default cuDNN settings.
        cases.append(peer_case(plain, device=device, batch=args.batch, image_size=args.image_size, bf16=False,
                               channels_last=False, compile_model=False, cudnn_benchmark=False))
    for case in cases:
        warm_up(case, args.warmup, device)
    rates = {name: statistics.median(r) for name, r in
             time_rounds(cases, steps=args.steps, repeats=args.repeats, device=device).items()}

    parts = []
    for case in cases:
        rate = rates[case.name]
        mfu = f", MFU {100 * rate * case.flops_per_image / peak:.1f}%" if peak and case.name != plain else ""
        parts.append(f"{case.name}: {rate:,.0f} img/s{mfu}" if rate >= 100 else f"{case.name}: {rate:.3g} img/s{mfu}")
        print(parts[-1], flush=True)
    if skip is not None:
        parts.append(f"{plain}: skipped, {skip}")
    elif "D" in nets:
        parts.append(f"net D / plain = {rates['net D'] / rates[plain]:.2f}x")
    if peak is None:
        parts.append("MFU: not given (no known peak for this device"
                     + (")" if device.type == "cuda" and bf16 else " and precision)"))
    else:
        parts.append(f"MFU against the datasheet bf16 peak, {peak / 1e12:.0f} TFLOP/s")

    settings = (f"batch {args.batch}, {args.image_size}px, width {args.width:g}, "
                + speed_switches_text(bf16=bf16, channels_last=channels_last, use_compile=use_compile)
                + f", median of {args.repeats} rounds of {args.steps} steps, nets in turn, "
                f"load average {load_before} before, {load_average()} after")
    figures = f"train step ({settings}): " + "; ".join(parts)
    record(device, figures, enabled=args.record)
    return figures


if __name__ == "__main__":
    main()
