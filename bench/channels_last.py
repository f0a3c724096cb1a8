"""Training steps on the CPU in the plain and the channels-last memory format, side by side.

    python bench/channels_last.py [--rounds 3]

Why `channels_last: auto` is on for the CPU too (vgg/config/ speed_flag): one torch thread, net A
at three sizes (the demo's 1/8 width at 32 px, 1/4 width at 64 px, the paper's net at 224 px), each
size timed in both layouts in turns, round after round; process CPU time per step, medians. Prints the
machine and its load. Evaluation's side of the same question is bench/evaluate.py.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vgg.models.vgg import build_vgg  # noqa: E402

SIZES = [  # (label, width, fc_width, crop, batch, timed steps)
    ("demo net A 1/8 width, 32 px, batch 32", 0.125, 256, 32, 32, 10),
    ("net A 1/4 width, 64 px, batch 16", 0.25, 256, 64, 16, 10),
    ("net A (paper), 224 px, batch 2", 1.0, 4096, 224, 2, 2),
]


def seconds_per_step(channels_last: bool, width: float, fc_width: int, crop: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_vgg("A", 12, width=width, fc_width=fc_width, image_size=crop).to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, crop, crop).contiguous(memory_format=layout)
    labels = torch.randint(0, 12, (batch,))

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    for _ in range(2):  # warm-up
        step()
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread, torch "
          f"{torch.__version__}; load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for label, *size in SIZES:
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for channels_last in (False, True):
                times[channels_last].append(seconds_per_step(channels_last, *size))
        plain, last = statistics.median(times[False]), statistics.median(times[True])
        print(f"{label}: plain {plain * 1e3:.1f} ms/step, channels-last {last * 1e3:.1f} ms/step, "
              f"channels-last {plain / last:.2f}x as fast")
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
