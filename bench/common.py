"""Helpers shared by the benchmarks: device, machine and load description, timing, FLOP counting,
the training step, and the one row each benchmark adds to docs/benchmarks.md.

Timing uses CUDA events on a GPU (one synchronisation at the end of a timed loop, never per step)
and `time.perf_counter` on the CPU; `interleaved_medians` times CPU pipelines against each other in
CPU time.
"""

import argparse
import datetime
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from vgg.training.step import train_step

REPO = Path(__file__).resolve().parent.parent

BENCH_FILE = REPO / "docs" / "benchmarks.md"
BENCH_HEADER = ("| date | device | command | figures |\n"
                "|------|--------|---------|---------|\n")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every benchmark shares: device, the speed switches, recording."""
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto: CUDA if available, else CPU")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast (CUDA only; the CPU runs fp32)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels-last memory format (CUDA only)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the net (default: on for CUDA, off for CPU)")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                        help="cuDNN autotuning (CUDA only)")
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                        help=f"append the figures as a row to {BENCH_FILE.relative_to(REPO)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for, but PyTorch sees no CUDA GPU")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """One line naming the hardware and software the figures were taken on."""
    versions = f"torch {torch.__version__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {versions}, "
                f"CUDA {torch.version.cuda}")
    return f"CPU {cpu_model()} ({cpu_cores()} cores), {torch.get_num_threads()} threads, {versions}"


def cpu_model() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_average() -> str:
    """The 1-minute load average (runnable processes) as text: on a shared machine, figures taken
    under a load above the core count are slowed by the other processes, so every row states it."""
    return f"{os.getloadavg()[0]:.1f}"


def machine_text() -> str:
    """Cores, threads and library versions, for the figures line of a CPU benchmark."""
    import PIL
    import torchvision

    return (f"{cpu_model()}, {cpu_cores()} cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}")


def interleaved_medians(fns: dict, items: list, rounds: int, chunk: int = 32) -> dict:
    """Median over `rounds` rounds of the CPU seconds each fn(items) takes (this process's CPU time,
    not wall time: on a shared, loaded machine a process waiting for a core is not doing the work).

    Within a round the items go by in chunks, every fn taking each chunk in turn, the order rotated
    from chunk to chunk, so a slow spell of the machine (caches shared with other processes) falls
    on all of them alike.
    """
    names = list(fns)
    seconds = {name: [] for name in names}
    turn = 0
    for _ in range(rounds):
        total = dict.fromkeys(names, 0.0)
        for first in range(0, len(items), chunk):
            part = items[first:first + chunk]
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                start = time.process_time()
                fns[name](part)
                total[name] += time.process_time() - start
            turn += 1
        for name in names:
            seconds[name].append(total[name])
    return {name: statistics.median(values) for name, values in seconds.items()}


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix()] + sys.argv[1:])


def record(device: torch.device, figures: str, enabled: bool = True, echo: bool = True) -> None:
    """Print the figures line and (unless disabled) add (date, device, command, figures) as the last
    row of the measured-figures table of docs/benchmarks.md (the first table with BENCH_HEADER;
    sections after it stay where they are). echo=False: print nothing (the caller reports)."""
    if echo:
        print(figures, flush=True)
    if not enabled:
        return
    BENCH_FILE.parent.mkdir(parents=True, exist_ok=True)
    if not BENCH_FILE.exists():
        BENCH_FILE.write_text("# Benchmarks\n\nOne row per benchmark run (bench/*.py append them).\n\n"
                              + BENCH_HEADER)
    cells = [datetime.date.today().isoformat(), describe_device(device), f"`{command_line()}`", figures]
    row = "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |\n"
    text = BENCH_FILE.read_text()
    if BENCH_HEADER not in text:
        text = text.rstrip("\n") + "\n\n" + BENCH_HEADER
    table = text.index(BENCH_HEADER) + len(BENCH_HEADER)
    end = table
    while end < len(text) and text.startswith("|", end):  # past the table's rows
        end = text.find("\n", end) + 1 or len(text)
    BENCH_FILE.write_text(text[:end] + row + text[end:])
    if echo:
        print(f"added a row to {BENCH_FILE}")


def time_loop(fn, steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of fn(), with one synchronisation at the end (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - begin


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_macs(model: torch.nn.Module, image_size: int) -> int:
    """Multiply-adds of one forward pass on one image_size x image_size image: the sum over conv and
    linear layers of (output elements) x (inputs each one reads), from the layers' shapes.

    Runs the model once on a zero image on its own device (use the meta device for a free count).
    Net D at 224 gives 15.47 G, the paper's ~15.5 G.
    """
    macs = []

    def conv_hook(module, inputs, output):
        kh, kw = module.kernel_size
        macs.append(output[0].numel() * module.in_channels // module.groups * kh * kw)

    def linear_hook(module, inputs, output):
        macs.append(output[0].numel() * module.in_features)

    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return int(sum(macs))


def speed_switches_text(*, bf16: bool, channels_last: bool, use_compile: bool) -> str:
    """How a benchmark ran, for its figures line: "bf16, channels-last on, compile on"."""
    on_off = {True: "on", False: "off"}
    return (f"{'bf16' if bf16 else 'fp32'}, channels-last {on_off[bool(channels_last)]}, "
            f"compile {on_off[bool(use_compile)]}")


def make_train_step(model, optimizer, *, device: torch.device, bf16: bool):
    """The trainer's step (vgg.training.step.train_step) as a closure of (images, labels) -> loss."""
    def step(images, labels):
        return train_step(model, images, labels, optimizer, bf16=bf16)[1]
    return step


# ImageNet's common image sizes (width, height); most train images are 500 px on the long side.
IMAGENET_SIZES = [(500, 375)] * 6 + [(375, 500)] * 2 + [(500, 333), (500, 400), (400, 300), (333, 500)]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def write_imagenet_like_jpeg(path: Path, seed: int) -> int:
    """Write one ImageNet-like JPEG (a random crop of a skimage photo at a common ImageNet size, with
    camera-like grain, quality 95: ~105 kB at 500x375, like ImageNet's ~110 kB); returns its size.

    Deterministic in `seed`. Smooth upscaled crops alone would give smaller files, quicker to decode.
    """
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    rng = random.Random(seed)
    photo = getattr(skdata, rng.choice(PHOTOS))()[..., :3]
    h, w = photo.shape[:2]
    ch, cw = rng.randint(h // 2, h), rng.randint(w // 2, w)
    top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
    image = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(rng.choice(IMAGENET_SIZES),
                                                                         Image.Resampling.BILINEAR)
    noise = np.random.default_rng(seed).normal(0, 8, (image.height, image.width, 1))
    array = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    tmp = path.with_suffix(".tmp")
    Image.fromarray(array).save(tmp, "JPEG", quality=95)
    tmp.replace(path)
    return path.stat().st_size


def trainer_optimizer(model) -> torch.optim.SGD:
    """The trainer's optimizer with the paper's values: SGD, momentum 0.9, weight decay 5e-4 (§3.1)."""
    from vgg.config import Config
    from vgg.training.recipe import build_optimizer

    return build_optimizer(model, Config())


def prepare_model(model, device: torch.device, *, channels_last: bool, compile_model: bool):
    """Move to the device in the trainer's way: channels-last and torch.compile on CUDA when asked."""
    model.to(device)
    if device.type == "cuda" and channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile_model else model


