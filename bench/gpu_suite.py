"""Check a GPU machine in one command (at most ~8 minutes on one H100/H200): what it is, how fast our
training step, data paths and evaluation run on it against their ceilings and peers, and whether
training there is still correct. Prints a table, writes gpu_suite.json (--out) and, on a GPU,
docs/gpu-runs/<date>-<gpu>.json, and adds one row per section to docs/benchmarks.md (--no-record:
neither of the last two).

    python bench/gpu_suite.py                 # on the GPU machine
    python bench/gpu_suite.py --smoke --no-record --out /tmp/suite.json   # every section, tiny, on the CPU

Sections, each independent (one that fails says why in one line, and the rest still run):
  machine     GPU(s), memory, driver, CUDA, library versions, CPU cores; the two ceilings measured
              there: a large bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s, read + written).
  step        our trainer's step (vgg.training.step.train_step, bf16, channels-last, compile) on net D against
              torchvision's vgg16 three ways (fp32 eager; bf16 + channels-last eager; bf16 +
              channels-last + torch.compile, the strongest peer), synthetic batch on the device, timed
              in interleaved rounds (bench/train_step.py); nets A and E too when time allows.
  data        each data path (cpu, gpu) at cores-1 and 2 workers on ImageNet-sized JPEGs
              (bench/train_epoch.py): decode + augment alone, and fed steps against the step alone.
  decoder     the GPU path's decode of real JPEGs (baseline/progressive, 4:2:0/4:2:2/4:4:4, grey, odd
              sizes) against libjpeg's on the CPU: mean |difference| <= 2 levels; then each decoder
              (nvImageCodec's region decode on the hardware engine, on CUDA, on both; TorchCodec; the CPU
              workers) in a child process of its own (bench/decoder_variants.py: a crash is one line):
              its crops against the CPU path's, its decode + augment rate over the step alone. On the
              CPU (--smoke) the GPU ones say "not run: no GPU" and the GPU path's code runs on the CPU.
  learning    a short train.py run (bf16, channels-last, compile on) on shape/colour classes: the
              last epoch's loss must be at most half the first's.
  evaluation  evaluate.py --dense --multi-crop on that run: top-1 error at most half of chance's; its
              multi-crop crops/s against the net's forward pass alone at the same batch.
  two_gpus    (>= 2 GPUs) --gpus 2 against 1 on the same global batch (weights within 1e-3); SIGUSR1
              to one rank stops both at one step with a loadable last.pt, and --resume goes on.
  versions    torch (2.11 or newer), torchvision, TorchCodec, Pillow, decoder libraries.
"""

from __future__ import annotations  # annotations name classes that are absent when vgg cannot be imported

import argparse
import datetime
import gc
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
try:  # vgg imports TorchCodec at the top (vgg/data/batches/transforms.py): without it only `versions` can run
    from bench.common import (BENCH_FILE, cpu_cores, cpu_model, make_train_step, prepare_model,  # noqa: E402
                              record, synchronize, time_loop, trainer_optimizer)
    from bench.decoder_variants import run_variants  # noqa: E402
    from bench.decoder_variants import summary as variants_summary  # noqa: E402
    from bench.learnable_data import make_learnable_set  # noqa: E402
    from bench.suite_checks import (CheckFailed, check_decoder, check_evaluation, check_learning,  # noqa: E402
                                    check_two_gpus)
    from bench.train_epoch import (build_path_loader, make_jpeg_set, run_fed,  # noqa: E402
                                   step_alone_timer)
    from bench.train_step import StepCase, ours_case, peer_case, time_rounds, warm_up  # noqa: E402
    from vgg.data.datasets import folders as vfolders
    from vgg.data.datasets import stats as vstats
    from vgg.training.step import BatchAugment  # noqa: E402
    from vgg.models.vgg import build_vgg  # noqa: E402
    from vgg.data.batches.transforms import TrainTransform  # noqa: E402
    IMPORT_ERROR = None
except ImportError as error:
    IMPORT_ERROR = f"cannot import vgg ({error})"

    class CheckFailed(Exception):  # stands in for bench.suite_checks' (not importable): `versions` raises it
        def __init__(self, reason: str, figures: dict):
            super().__init__(reason)
            self.figures = figures

OLDEST_TORCH = (2, 11)
SECTIONS_ORDER = ("machine", "step", "data", "decoder", "learning", "evaluation", "two_gpus", "versions")
# The keys the JSON always holds (a number, or null with a reason under the section's "why_null").
REQUIRED = {"step": ("ours_img_s", "peer_compiled_img_s", "matmul_tflops"),
            "data": ("gpu_fed_over_step", "cpu_fed_over_step", "workers"),
            "evaluation": ("fraction_of_forward",), "learning": ("loss_first", "loss_last")}


@dataclass(frozen=True)
class Settings:
    """How big each section runs: FULL on a GPU, SMOKE (tiny, CPU) to check the code."""
    smoke: bool
    budget_s: float  # the whole suite's target; nets A and E are timed only while it allows
    matmul_size: int
    copy_mib: int
    ceiling_iters: int
    step_width: float
    step_fc_width: int
    step_image_size: int
    step_batch: int
    step_warmup: int
    step_steps: int
    step_repeats: int
    extra_nets_need_s: float  # time left needed (for the later sections) before timing nets A and E
    data_images: int
    data_batch: int
    data_crop: int
    data_scale: int
    data_warmup: int
    data_steps: int
    learn_classes: int
    learn_train: int
    learn_val: int
    learn_epochs: int
    learn_steps: int
    learn_batch: int
    ddp_steps: int
    child_timeout_s: float


FULL = Settings(smoke=False, budget_s=480, matmul_size=8192, copy_mib=1024, ceiling_iters=20, step_width=1.0,
                step_fc_width=4096, step_image_size=224, step_batch=256, step_warmup=5, step_steps=10,
                step_repeats=3, extra_nets_need_s=300, data_images=3072, data_batch=256, data_crop=224,
                data_scale=256, data_warmup=4, data_steps=12, learn_classes=6, learn_train=400, learn_val=50,
                learn_epochs=6, learn_steps=30, learn_batch=64, ddp_steps=20, child_timeout_s=300)
SMOKE = Settings(smoke=True, budget_s=120, matmul_size=256, copy_mib=16, ceiling_iters=3, step_width=0.0625,
                 step_fc_width=64, step_image_size=32, step_batch=4, step_warmup=1, step_steps=2,
                 step_repeats=2, extra_nets_need_s=0, data_images=32, data_batch=8, data_crop=32, data_scale=36,
                 data_warmup=1, data_steps=2, learn_classes=4, learn_train=64, learn_val=16, learn_epochs=6,
                 learn_steps=8, learn_batch=32, ddp_steps=4, child_timeout_s=150)


class Skip(Exception):
    """A section (or part) that cannot run here; the message says why."""


@dataclass
class Context:
    settings: Settings
    device: torch.device
    work: Path
    started: float = field(default_factory=time.monotonic)
    results: dict = field(default_factory=dict)

    def time_left(self) -> float:
        return self.settings.budget_s - (time.monotonic() - self.started)

    def no_cuda(self) -> str:
        """Why a CUDA-only part does not run: no GPU, or a smoke run (the CPU only)."""
        return "smoke runs on the CPU only" if torch.cuda.is_available() else "no CUDA"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="every section with tiny settings on the CPU (CUDA-only parts say skipped)")
    parser.add_argument("--out", default="gpu_suite.json", help="where to write the JSON (default: gpu_suite.json)")
    parser.add_argument("--work-dir", default=str(REPO / "data" / "gpu_suite"),
                        help="generated data sets and runs (kept between runs: the JPEG sets are made once)")
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                        help="add a row per section to docs/benchmarks.md and, on a GPU, the JSON to docs/gpu-runs/")
    return parser


# --------------------------------------------------------------------------------------------------
# 1. Machine
# --------------------------------------------------------------------------------------------------

def matmul_tflops(device: torch.device, size: int, iters: int) -> tuple[float, str]:
    """The dense matmul ceiling: bf16 on a GPU (fp32 on the CPU), 2 n^3 FLOP a product."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(2):
        torch.mm(a, b, out=out)
    synchronize(device)
    seconds = time_loop(lambda: torch.mm(a, b, out=out), iters, device)
    return 2 * size ** 3 * iters / seconds / 1e12, str(dtype).replace("torch.", "")


def copy_gb_s(device: torch.device, mib: int, iters: int) -> float:
    """The memory ceiling: one buffer copied into another on the device, bytes read + written."""
    src = torch.empty(mib * 2 ** 20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    seconds = time_loop(lambda: dst.copy_(src), iters, device)
    return 2 * src.numel() * iters / seconds / 1e9


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def section_machine(ctx: Context) -> dict:
    s, device = ctx.settings, ctx.device
    out = {"cpu": cpu_model(), "cpu_cores": cpu_cores(), "why_null": {}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=props.total_memory / 2 ** 30,
                   driver=driver_version(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        if out["driver"] is None:
            out["why_null"]["driver"] = "nvidia-smi not found or failed"
    else:
        out.update(gpu=None, gpu_count=0, gpu_memory_gib=None, driver=None, cuda=torch.version.cuda, cudnn=None)
        out["why_null"].update(dict.fromkeys(("gpu", "gpu_memory_gib", "driver", "cudnn"), ctx.no_cuda()))
    out["versions"] = library_versions()
    out["matmul_tflops"], out["matmul_dtype"] = matmul_tflops(device, s.matmul_size, s.ceiling_iters)
    out["copy_gb_s"] = copy_gb_s(device, s.copy_mib, s.ceiling_iters)
    where = (f"{out['gpu_count']} x {out['gpu']} ({out['gpu_memory_gib']:.0f} GiB), driver {out['driver']}, "
             f"CUDA {out['cuda']}" if device.type == "cuda" else f"no CUDA: CPU {out['cpu']}")
    out["summary"] = (f"{where}, {out['cpu_cores']} CPU cores; {out['matmul_dtype']} matmul {s.matmul_size}^3 "
                      f"{out['matmul_tflops']:.3g} TFLOP/s; copy {s.copy_mib} MiB {out['copy_gb_s']:.3g} GB/s "
                      f"(read + written); " + ", ".join(f"{k} {v}" for k, v in out["versions"].items() if v))
    return out


# --------------------------------------------------------------------------------------------------
# 2. Training step
# --------------------------------------------------------------------------------------------------

def smoke_peer() -> torch.nn.Module:
    """torchvision's VGG class with vgg16's layer pattern at 1/16 width and a small classifier: smoke
    runs time no full vgg16 (minutes a step on a small CPU), they only exercise the code."""
    from torchvision.models.vgg import VGG, cfgs, make_layers

    model = VGG(make_layers([v if v == "M" else max(1, v // 16) for v in cfgs["D"]]), num_classes=1000)
    model.classifier = torch.nn.Sequential(torch.nn.Linear(32 * 7 * 7, 64), torch.nn.ReLU(True),
                                           torch.nn.Linear(64, 1000))
    return model


# (label, bf16, channels-last, compile, cuDNN autotuning) of each peer: torchvision's vgg16 three ways.
PEERS = {"peer_fp32": ("torchvision vgg16 fp32 eager", False, False, False, False),
         "peer_bf16_cl": ("torchvision vgg16 bf16 channels-last eager", True, True, False, True),
         "peer_compiled": ("torchvision vgg16 bf16 channels-last compiled", True, True, True, True)}


def built_and_warmed(build: Callable[[], StepCase], ctx: Context) -> tuple[StepCase, float | None]:
    """Build a case and warm it up; on CUDA also the peak memory it adds (its weights, gradients,
    momentum, batch and activations: allocated before it was built subtracted)."""
    on_cuda = ctx.device.type == "cuda"
    before = torch.cuda.memory_allocated(ctx.device) if on_cuda else 0
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    case = build()
    warm_up(case, ctx.settings.step_warmup, ctx.device)
    return case, (torch.cuda.max_memory_allocated(ctx.device) - before) / 2 ** 30 if on_cuda else None


def step_cases(ctx: Context) -> tuple[dict, dict, dict]:
    """Ours (net D) and each peer runnable here, built and warmed: {key: case}, {key: GiB}, {key: why not}."""
    s, device, on_cuda = ctx.settings, ctx.device, ctx.device.type == "cuda"
    size = dict(device=device, batch=s.step_batch, image_size=s.step_image_size)
    cases, memory, skipped = {}, {}, {}
    cases["ours"], memory["ours"] = built_and_warmed(lambda: ours_case(
        "D", width=s.step_width, fc_width=s.step_fc_width, bf16=on_cuda, channels_last=on_cuda,
        compile_model=on_cuda, cudnn_benchmark=on_cuda, label="ours net D", **size), ctx)
    for key, (label, bf16, channels_last, compile_model, autotune) in PEERS.items():
        if (bf16 or compile_model) and not on_cuda:
            skipped[key] = ctx.no_cuda()
            continue
        cases[key], memory[key] = built_and_warmed(lambda: peer_case(
            label, bf16=bf16, channels_last=channels_last, compile_model=compile_model, cudnn_benchmark=autotune,
            model=smoke_peer() if s.smoke else None, **size), ctx)
    return cases, memory, skipped


def case_figures(case: StepCase, rates: list[float], memory: float | None, matmul: float | None) -> dict:
    rate = sorted(rates)[len(rates) // 2]
    tflops = rate * case.flops_per_image / 1e12
    return {"name": case.name, "img_s": rate, "tflops": tflops, "peak_memory_gib": memory,
            "fraction_of_matmul": tflops / matmul if matmul else None}


def section_step(ctx: Context) -> dict:
    s, device = ctx.settings, ctx.device
    matmul = ctx.results.get("machine", {}).get("matmul_tflops")
    cases, memory, skipped = step_cases(ctx)
    rates = time_rounds(list(cases.values()), steps=s.step_steps, repeats=s.step_repeats, device=device)
    figures = {key: case_figures(case, rates[case.name], memory[key], matmul) for key, case in cases.items()}
    ours = figures["ours"]["img_s"]
    for key in PEERS:
        if key in figures:
            figures[key]["ours_over"] = ours / figures[key]["img_s"]
    out = {"ours_img_s": ours, "peer_compiled_img_s": figures.get("peer_compiled", {}).get("img_s"),
           "matmul_tflops": matmul, "cases": figures, "why_null": {f"{k}_img_s": why for k, why in skipped.items()},
           "batch": s.step_batch, "image_size": s.step_image_size}
    if matmul is None:
        out["why_null"]["matmul_tflops"] = "the machine section measured no ceiling"
    del cases
    out["extra_nets"] = extra_nets(ctx, matmul)
    parts = [f"{f['name']} {f['img_s']:.4g} img/s, {f['tflops']:.3g} TFLOP/s"
             + (f" ({100 * f['fraction_of_matmul']:.0f}% of matmul)" if f["fraction_of_matmul"] else "")
             + (f", {f['peak_memory_gib']:.1f} GiB" if f["peak_memory_gib"] is not None else "")
             + (f", ours {f['ours_over']:.2f}x" if "ours_over" in f else "") for f in figures.values()]
    parts += [f"{PEERS[k][0]}: skipped ({why})" for k, why in skipped.items()]
    extra = out["extra_nets"]
    parts.append(f"nets A, E: skipped ({extra['skipped']})" if "skipped" in extra else
                 ", ".join(f"{f['name']} {f['img_s']:.4g} img/s" for f in extra.values()))
    out["summary"] = (f"batch {s.step_batch}, {s.step_image_size}px, median of {s.step_repeats} rounds: "
                      + "; ".join(parts))
    return out


def extra_nets(ctx: Context, matmul: float | None) -> dict:
    """Nets A and E by our step, in rounds of their own, if the budget leaves time for the later sections."""
    s, device, on_cuda = ctx.settings, ctx.device, ctx.device.type == "cuda"
    if ctx.time_left() < s.extra_nets_need_s:
        return {"skipped": f"time: {ctx.time_left():.0f} s of the {s.budget_s:.0f} s budget left, "
                           f"{s.extra_nets_need_s:.0f} s kept for the later sections"}
    built = {name: built_and_warmed(lambda: ours_case(
        name, device=device, batch=s.step_batch, image_size=s.step_image_size, width=s.step_width,
        fc_width=s.step_fc_width, bf16=on_cuda, channels_last=on_cuda, compile_model=on_cuda,
        cudnn_benchmark=on_cuda, label=f"ours net {name}"), ctx) for name in ("A", "E")}
    rates = time_rounds([case for case, _ in built.values()], steps=s.step_steps, repeats=s.step_repeats,
                        device=device)
    return {name: case_figures(case, rates[case.name], mem, matmul) for name, (case, mem) in built.items()}


# --------------------------------------------------------------------------------------------------
# 3. Data paths
# --------------------------------------------------------------------------------------------------

def worker_counts() -> list[int]:
    """cores - 1 (a core left for the training process; the headline figures), then 2."""
    first = max(1, cpu_cores() - 1)
    return [first] if first == 2 else [first, 2]


def data_step(ctx: Context, classes: int):
    """Net D at the data section's size, by the trainer's step, and the trainer's BatchAugment."""
    s, device, on_cuda = ctx.settings, ctx.device, ctx.device.type == "cuda"
    model = build_vgg("D", num_classes=classes, width=s.step_width, fc_width=s.step_fc_width, image_size=s.data_crop)
    model = prepare_model(model, device, channels_last=on_cuda, compile_model=on_cuda)
    torch.backends.cudnn.benchmark = on_cuda
    step = make_train_step(model, trainer_optimizer(model), device=device, bf16=on_cuda)
    augment = BatchAugment(vstats.IMAGENET_STATS, device, channels_last=on_cuda,
                           generator=torch.Generator().manual_seed(0))
    return step, augment


def section_data(ctx: Context) -> dict:
    s, device, on_cuda = ctx.settings, ctx.device, ctx.device.type == "cuda"
    workers = worker_counts()
    root = make_jpeg_set(ctx.work / "jpeg", s.data_images, workers=cpu_cores())
    train_set = vfolders.ImageFolder(root / "train", TrainTransform(crop_size=s.data_crop, scale_min=s.data_scale,
                                                                  scale_max=s.data_scale))
    step, augment = data_step(ctx, len(train_set.classes))
    step_alone = step_alone_timer(step, augment, batch=s.data_batch, crop_size=s.data_crop,
                                  classes=len(train_set.classes), device=device)
    step_alone(s.data_warmup)  # untimed: compilation, autotuning
    alone = step_alone(s.data_steps)
    runs, why_null = [], {}
    for path in ("cpu", "gpu"):
        if path == "gpu" and not on_cuda:
            why_null["gpu_fed_over_step"] = ctx.no_cuda()
            continue
        for count in workers:
            loader = build_path_loader(path, train_set, batch=s.data_batch, device=device, crop_size=s.data_crop,
                                       scale_min=s.data_scale, scale_max=s.data_scale, workers=count,
                                       channels_last=on_cuda)
            timing = dict(warmup=s.data_warmup, steps=s.data_steps, device=device)
            decode = run_fed(None, loader, augment, **timing)  # decode + augment alone
            fed = run_fed(step, loader, augment, **timing)
            runs.append({"path": path, "workers": count, "decode_augment_img_s": decode["images_per_s"],
                         "fed_img_s": fed["images_per_s"], "host_wait": fed["wait_fraction"]})
            del loader
    alone = max(alone, step_alone(s.data_steps))  # the faster of before and after: no under-warmed figure
    for run in runs:
        run["fed_over_step"] = run["fed_img_s"] / alone
    ratio = {p: next((r["fed_over_step"] for r in runs if r["path"] == p and r["workers"] == workers[0]), None)
             for p in ("cpu", "gpu")}
    parts = [f"{r['path']} path, workers {r['workers']}: decode+augment {r['decode_augment_img_s']:,.0f} img/s, fed "
             f"{r['fed_img_s']:,.0f} img/s = {r['fed_over_step']:.2f} of the step" for r in runs]
    parts += [f"{key.split('_')[0]} path: skipped ({why})" for key, why in why_null.items()]
    return {"workers": workers, "step_alone_img_s": alone, "cpu_fed_over_step": ratio["cpu"],
            "gpu_fed_over_step": ratio["gpu"], "runs": runs, "why_null": why_null, "images": len(train_set),
            "summary": f"net D, batch {s.data_batch}, crop {s.data_crop}, {len(train_set)} JPEGs ~500x375: step "
                       f"alone {alone:,.0f} img/s; " + "; ".join(parts)}


# --------------------------------------------------------------------------------------------------
# 4, 5. Correct on this GPU; several GPUs (bench/suite_checks.py)
# --------------------------------------------------------------------------------------------------

def section_decoder(ctx: Context) -> dict:
    s, failed = ctx.settings, None
    try:
        out = check_decoder(ctx.device) if ctx.device.type == "cuda" else {"summary": f"nvJPEG check: {ctx.no_cuda()}"}
    except CheckFailed as e:  # the variants still run
        out, failed = {**e.figures, "summary": e.figures.get("summary", str(e))}, e
    root = make_jpeg_set(ctx.work / "jpeg", s.data_images, workers=cpu_cores())
    results = run_variants(ctx.device, root, ctx.work, batch=s.data_batch, crop=s.data_crop, scale=s.data_scale,
                           workers=worker_counts()[0], warmup=s.data_warmup, steps=s.data_steps,
                           timeout=s.child_timeout_s, step_alone=ctx.results.get("data", {}).get("step_alone_img_s"))
    out = {**out, "variants": results, "summary": f"{out['summary']}; {variants_summary(results)}"}
    if failed is not None:
        raise CheckFailed(str(failed), out)
    return out


def section_learning(ctx: Context) -> dict:
    s = ctx.settings
    return check_learning(ctx.device, ctx.work, classes=s.learn_classes, train=s.learn_train, val=s.learn_val,
                          epochs=s.learn_epochs, steps=s.learn_steps, batch=s.learn_batch,
                          workers=min(4, worker_counts()[0]), timeout=s.child_timeout_s)


def section_evaluation(ctx: Context) -> dict:
    learning = ctx.results.get("learning", {})
    if not Path(learning.get("checkpoint", "")).is_file():
        raise Skip(f"no trained net: the learning section {learning.get('status', 'did not run')}")
    return check_evaluation(ctx.device, ctx.work, learning, batch=32, workers=min(4, worker_counts()[0]),
                            timeout=ctx.settings.child_timeout_s)


def section_two_gpus(ctx: Context) -> dict:
    if ctx.device.type != "cuda":
        raise Skip(ctx.no_cuda())
    if torch.cuda.device_count() < 2:
        raise Skip("one GPU")
    s = ctx.settings
    data = make_learnable_set(ctx.work / "learnable", classes=s.learn_classes, train=s.learn_train, val=s.learn_val)
    return check_two_gpus(ctx.device, ctx.work, data, steps=s.ddp_steps, batch=s.learn_batch,
                          timeout=s.child_timeout_s)


# --------------------------------------------------------------------------------------------------
# 6. Versions
# --------------------------------------------------------------------------------------------------

# module -> the name it is listed under; vgg decodes with nvImageCodec (Linux) and TorchCodec, DALI is optional.
LIBRARIES = {"torch": "torch", "torchvision": "torchvision", "torchcodec": "TorchCodec", "PIL": "Pillow",
             "numpy": "numpy", "nvidia.nvimgcodec": "nvImageCodec", "nvidia.dali": "DALI"}


def quiet_import(module: str):
    """The module; nvImageCodec through vgg.data.batches.jpeg, which keeps its import notes off stderr."""
    if module == "nvidia.nvimgcodec" and IMPORT_ERROR is None:
        from vgg.data.batches import jpeg as vjpeg

        if vjpeg.load() is None:
            raise ImportError(module)
        return vjpeg.load()
    return importlib.import_module(module)


def library_versions() -> dict:
    """Each library's version, or None where it cannot be imported."""
    versions = {"python": platform.python_version()}
    for module, name in LIBRARIES.items():
        try:
            versions[name] = getattr(quiet_import(module), "__version__", "unknown")
        except Exception:  # not installed, or broken (e.g. a CUDA mismatch): listed as absent
            versions[name] = None
    return versions


def torch_release(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def section_versions(ctx: Context) -> dict:
    versions = library_versions()
    why = {name: reason for name, reason in (("nvImageCodec", "not installed (no wheel for this platform: whole files "
                                                               "are decoded)"), ("DALI", "not installed (optional)"))
           if versions[name] is None}
    if versions["TorchCodec"] is None:
        why["TorchCodec"] = "not installed: the data, decoder, learning and evaluation sections need it"
    if IMPORT_ERROR:
        why["vgg"] = IMPORT_ERROR
    new_enough = torch_release(torch.__version__) >= OLDEST_TORCH
    out = {**versions, "torch_new_enough": new_enough, "oldest_torch": ".".join(map(str, OLDEST_TORCH)),
           "why_null": why,
           "summary": ", ".join(f"{k} {v}" for k, v in versions.items() if v) + "".join(
               f"; {k}: {w}" for k, w in why.items())}
    if not new_enough:
        raise CheckFailed(f"torch {torch.__version__} is older than {out['oldest_torch']}, the oldest "
                          "this suite supports", out)
    return out


# --------------------------------------------------------------------------------------------------
# Running the sections, the table, the JSON
# --------------------------------------------------------------------------------------------------

SECTIONS = {"machine": section_machine, "step": section_step, "data": section_data, "decoder": section_decoder,
            "learning": section_learning, "evaluation": section_evaluation, "two_gpus": section_two_gpus,
            "versions": section_versions}


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, (Skip, CheckFailed)) else f"{type(error).__name__}: {text}"[:400]


def run_section(name: str, ctx: Context) -> dict:
    """One section's figures with its status (ok, skipped, failed) and a one-line reason; a failure
    never stops the suite (its traceback goes to <work-dir>/<name>-traceback.txt)."""
    start = time.monotonic()
    try:
        if IMPORT_ERROR and name != "versions":
            raise Skip(IMPORT_ERROR)
        result = {**SECTIONS[name](ctx), "status": "ok"}
    except Skip as e:
        result = {"status": "skipped", "reason": one_line(e)}
    except CheckFailed as e:  # ran, and what it checks does not hold: loudly
        result = {**e.figures, "status": "failed", "reason": one_line(e)}
    except (Exception, SystemExit) as e:  # (bench code raises SystemExit("error: ...") on bad input)
        ctx.work.mkdir(parents=True, exist_ok=True)
        (ctx.work / f"{name}-traceback.txt").write_text(traceback.format_exc())
        result = {"status": "failed", "reason": one_line(e)}
    finally:
        gc.collect()  # what a section left (nets, loaders) is freed before the next one measures
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = time.monotonic() - start
    for key in REQUIRED.get(name, ()):  # every required key present: a number, or null and why
        result.setdefault(key, None)
        if result[key] is None:
            result.setdefault("why_null", {}).setdefault(key, result.get("reason", "not measured"))
    return result


def format_table(report: dict) -> str:
    rows = [("section", "result", "figures")]
    for name in SECTIONS_ORDER:
        r = report[name]
        text = r.get("summary", "") if r["status"] == "ok" else r["reason"]
        if r["status"] == "failed" and r.get("summary"):
            text = f"{r['reason']} | {r['summary']}"
        rows.append((name, f"{r['status']} ({r['seconds']:.0f} s)", text))
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows)


def gpu_run_path(report: dict) -> Path:
    gpu = re.sub(r"[^a-z0-9]+", "-", (report["machine"].get("gpu") or "gpu").lower()).strip("-")
    return REPO / "docs" / "gpu-runs" / f"{report['date']}-{gpu}.json"


def record_rows(report: dict, device: torch.device) -> None:
    """One row per section in docs/benchmarks.md (its figures, or why it was skipped or failed)."""
    for name in SECTIONS_ORDER:
        r = report[name]
        text = r.get("summary") if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        record(device, f"GPU suite, {name}: {text}", echo=False)
    print(f"added {len(SECTIONS_ORDER)} rows to {BENCH_FILE}")


def usage_error(message: str) -> None:
    """Bad input: one `error:` line and exit code 2, as train.py and evaluate.py do."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def choose_device(smoke: bool) -> torch.device:
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        usage_error("PyTorch sees no CUDA GPU: run on the GPU machine, or --smoke to check the suite on the CPU")
    return torch.device("cuda")


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    if not (out.parent.is_dir() and os.access(out.parent, os.W_OK)):
        usage_error(f"cannot write --out {out}: {out.parent} is not a writable folder")
    settings = SMOKE if args.smoke else FULL
    ctx = Context(settings, choose_device(args.smoke), Path(args.work_dir))
    print(f"GPU suite{' (smoke: tiny settings on the CPU)' if settings.smoke else ''}, device {ctx.device}, "
          f"work folder {ctx.work}", flush=True)
    for name in SECTIONS_ORDER:
        print(f"[{time.monotonic() - ctx.started:4.0f} s] {name} ...", flush=True)
        ctx.results[name] = run_section(name, ctx)
        print(f"        {ctx.results[name]['status']}", flush=True)
    report = {"date": datetime.date.today().isoformat(), "smoke": settings.smoke, "device": str(ctx.device),
              "seconds": time.monotonic() - ctx.started, "settings": asdict(settings), **ctx.results}
    text = json.dumps(report, indent=1, default=str) + "\n"
    out.write_text(text)
    print("\n" + format_table(report) + f"\n\nwhole suite {report['seconds']:.0f} s; JSON: {out}")
    if args.record and not IMPORT_ERROR:
        record_rows(report, ctx.device)
        if ctx.device.type == "cuda" and not settings.smoke:
            gpu_run_path(report).parent.mkdir(parents=True, exist_ok=True)
            gpu_run_path(report).write_text(text)
            print(f"JSON also in {gpu_run_path(report)}")
    return report


if __name__ == "__main__":
    main()
