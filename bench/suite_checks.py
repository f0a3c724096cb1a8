"""The GPU suite's correctness checks (bench/gpu_suite.py sections 4 and 5): the GPU decoder's pixels
against libjpeg's, a short train.py run that must learn, evaluate.py on it, and two GPUs against one.

Each check returns a dict of figures, or raises `CheckFailed` (with the figures measured so far) when
what it checks does not hold; the suite turns either into a row of its table.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from bench.common import REPO, synchronize, time_loop
from bench.learnable_data import chance_top1_err, make_learnable_set
from vgg.core.checkpoint import load_checkpoint
from vgg.data.batches.gpu import decode_batch
from vgg.evaluation.methods import CROPS_PER_FORWARD, GRID, MULTI_CROP
from vgg.evaluation.nets import load_eval_net
from vgg.evaluation.runner import evaluate_dataset
from vgg.training.step import autocast_context

# torchvision's own test of nvJPEG against libjpeg-turbo (test_image.py, test_decode_jpegs_cuda) asks
# for a mean absolute difference under 2 levels of 255: the decoders may round the IDCT and upsample
# chroma differently, so equal pixels are not expected.
DECODE_MEAN_BOUND = 2.0
# The loss of the last epoch must be at most this fraction of the first epoch's.
LOSS_MARGIN = 0.5
# The learning run's lr: half the demo's 0.01, at which the 6-class run at batch 64 spiked in its
# fourth epoch (loss 0.46 -> 1.93, CPU, fp32); at 0.005 it fell every epoch (1.79 -> 0.14).
LEARN_LR = 0.005
# Top-1 error must be at most this fraction of guessing's (4 classes: 75 % chance error -> <= 37.5 %).
TOP1_FRACTION_OF_CHANCE = 0.5
# Two processes against one on the same global batch: each weight tensor's relative difference
# ||w2 - w1|| / ||w1|| after the run. Only the order of the gradient sums differs, so the weights
# differ by rounding alone (fp32, no dropout, no cuDNN autotuning; TF32 convolutions allowed).
DDP_TOLERANCE = 1e-3


class CheckFailed(Exception):
    """A check that ran and found its property false; `figures` are what it measured."""

    def __init__(self, reason: str, figures: dict):
        super().__init__(reason)
        self.figures = figures


# --------------------------------------------------------------------------------------------------
# 4a. The GPU decoder against libjpeg
# --------------------------------------------------------------------------------------------------

# name -> (width, height, PIL mode, save options): the kinds of JPEG ImageNet holds, at odd sizes.
DECODER_CASES = {
    "baseline 4:2:0 500x375": (500, 375, "RGB", {"subsampling": 2}),
    "baseline 4:4:4 333x251": (333, 251, "RGB", {"subsampling": 0}),
    "baseline 4:2:2 257x199": (257, 199, "RGB", {"subsampling": 1}),
    "progressive 4:2:0 375x500": (375, 500, "RGB", {"subsampling": 2, "progressive": True}),
    "progressive 4:4:4 101x77": (101, 77, "RGB", {"subsampling": 0, "progressive": True}),
    "grey 250x187": (250, 187, "L", {}),
    "grey progressive 33x17": (33, 17, "L", {"progressive": True}),
    "baseline 4:2:0 9x7": (9, 7, "RGB", {"subsampling": 2}),
}


def decoder_test_jpegs() -> dict[str, torch.Tensor]:
    """Each DECODER_CASES file's bytes: a crop of a photograph (skimage's astronaut), quality 90."""
    import io

    from skimage import data as skdata

    photo = Image.fromarray(skdata.astronaut())
    files = {}
    for name, (width, height, mode, options) in DECODER_CASES.items():
        image = photo.resize((width, height), Image.Resampling.BILINEAR).convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90, **options)
        files[name] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    return files


def check_decoder(device: torch.device) -> dict:
    """The GPU data path's decode (vgg.data.batches.gpu.decode_batch on `device`) of DECODER_CASES against
    the CPU decode (libjpeg-turbo through TorchCodec): same shape, mean |difference| within
    DECODE_MEAN_BOUND. Also says which files nvJPEG itself took (the others the path decodes on the CPU)."""
    from torchcodec.decoders import decode_jpeg

    files = decoder_test_jpegs()
    names = list(files)
    on_gpu = decode_batch([files[n] for n in names], device, names)
    on_cpu = decode_batch([files[n] for n in names], "cpu", names, batched=False)
    rows, bad = [], []
    for name, gpu, cpu in zip(names, on_gpu, on_cpu):
        try:
            decode_jpeg(files[name], mode="RGB", device=str(device))
            nvjpeg = True
        except RuntimeError:
            nvjpeg = False
        row = {"file": name, "nvjpeg": nvjpeg, "same_shape": gpu is not None and gpu.shape == cpu.shape}
        if row["same_shape"]:
            diff = (gpu.cpu().int() - cpu.int()).abs().float()
            row.update(mean_abs=diff.mean().item(), p99_abs=diff.flatten().quantile(0.99).item(),
                       max_abs=int(diff.max().item()))
        rows.append(row)
        if not row["same_shape"] or row["mean_abs"] > DECODE_MEAN_BOUND:
            bad.append(name)
    worst = max((r.get("mean_abs", float("inf")) for r in rows), default=0.0)
    figures = {"files": rows, "bound_mean_abs": DECODE_MEAN_BOUND, "worst_mean_abs": worst,
               "max_abs": max((r.get("max_abs", 255) for r in rows), default=0),
               "summary": f"{len(rows)} JPEGs (baseline/progressive, 4:2:0/4:2:2/4:4:4, grey, odd sizes): "
                          f"worst mean |GPU - libjpeg| {worst:.2f} levels (bound {DECODE_MEAN_BOUND:g}), largest "
                          f"pixel difference {max((r.get('max_abs', 255) for r in rows), default=0)}; "
                          f"nvJPEG took {sum(r['nvjpeg'] for r in rows)} of {len(rows)}"}
    if bad:
        raise CheckFailed(f"GPU decode differs from libjpeg's beyond the bound for: {', '.join(bad)}", figures)
    return figures


# --------------------------------------------------------------------------------------------------
# 4b. A short train.py run that must learn
# --------------------------------------------------------------------------------------------------

def child_env() -> dict:
    """The environment of a train.py / evaluate.py child: this tree's vgg, unbuffered output."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # never a rank of some outer job
        env.pop(name, None)
    return env


def last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no output)"])[-1][:300]


def run_script(script: str, args: list[str], *, cwd: Path, timeout: float, env: dict | None = None):
    """Run train.py or evaluate.py to its end; a failure raises with its last error line."""
    try:
        done = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env or child_env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{script} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"{script} exited {done.returncode}: {last_error_line(done.stderr)}")
    return done


def speed_args(device: torch.device) -> list[str]:
    """bf16, channels-last and compile on for CUDA; on the CPU what `auto` gives (compiling there
    would cost minutes on a small machine and is not what the check is about)."""
    if device.type == "cuda":
        return ["--bf16", "true", "--channels-last", "true", "--compile", "true"]
    return ["--bf16", "false", "--channels-last", "auto", "--compile", "false"]


def check_learning(device: torch.device, work: Path, *, classes: int, train: int, val: int, epochs: int,
                   steps: int, batch: int, workers: int, timeout: float) -> dict:
    """train.py (the demo's small net A) on the learnable set for `epochs` x `steps` steps: the last
    epoch's mean training loss must be at most LOSS_MARGIN of the first's."""
    data = make_learnable_set(work / "learnable", classes=classes, train=train, val=val)
    run_root = work / "learning"
    shutil.rmtree(run_root, ignore_errors=True)  # a fresh run each time (train.py refuses to overwrite)
    run_root.mkdir(parents=True)
    args = ["--config", "demo", "--data", str(data), "--run-name", "learn", "--out-dir", str(run_root / "checkpoints"),
            "--log-dir", str(run_root / "runs"), "--epochs", str(epochs), "--steps-per-epoch", str(steps),
            "--batch-size", str(batch), "--workers", str(workers), "--stats", "imagenet", "--patience", "1000",
            "--lr", str(LEARN_LR), "--device", device.type, "--log-every", "10", *speed_args(device)]
    start = time.perf_counter()
    run_script("train.py", args, cwd=run_root, timeout=timeout)
    seconds = time.perf_counter() - start
    metrics = run_root / "checkpoints" / "learn" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    first, last = rows[0]["train_loss"], rows[-1]["train_loss"]
    figures = {"loss_first": first, "loss_last": last, "loss_margin": LOSS_MARGIN, "epochs": len(rows),
               "steps": len(rows) * steps, "classes": classes, "val_top1_err_last": rows[-1]["val_top1_err"],
               "seconds": seconds, "checkpoint": str(run_root / "checkpoints" / "learn" / "best.pt"),
               "data": str(data), "speed_settings": " ".join(speed_args(device)),
               "summary": f"train.py, {len(rows) * steps} steps of {batch} on {classes} shape/colour classes "
                          f"({' '.join(speed_args(device))}): epoch loss {first:.3f} -> {last:.3f} (must fall to "
                          f"<= {LOSS_MARGIN:g}x), val top-1 err {rows[-1]['val_top1_err']:.1f}%, {seconds:.0f} s"}
    if not last <= LOSS_MARGIN * first:
        raise CheckFailed(f"the training loss did not fall enough: {first:.3f} -> {last:.3f}, "
                          f"above {LOSS_MARGIN:g} x the first epoch's", figures)
    return figures


# --------------------------------------------------------------------------------------------------
# 4c. evaluate.py on that run, and its speed against the net's forward pass
# --------------------------------------------------------------------------------------------------

def forward_rate(model: torch.nn.Module, *, batch: int, crop: int, device: torch.device, steps: int) -> float:
    """Crops per second of the net's forward pass alone at `batch`, as evaluation runs it (inference
    mode, bf16 autocast on CUDA, channels-last)."""
    model = model.to(device, memory_format=torch.channels_last).eval()
    crops = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_context(device, "auto"):
        for _ in range(2):  # warm-up: cuDNN's choice of algorithms
            model(crops)
        synchronize(device)
        seconds = time_loop(lambda: model(crops), steps, device)
    return batch * steps / seconds


def multi_crop_rate(checkpoint: Path, val_dir: Path, *, device: torch.device, batch: int, workers: int) -> float:
    """Crops per second of vgg.evaluation.runner.evaluate_dataset (what evaluate.py runs) doing multi-crop on
    `val_dir`, end to end (decoding and rescaling in workers included), after one untimed pass."""
    nets = [load_eval_net(checkpoint)]
    kwargs = dict(methods=(MULTI_CROP,), device=device, batch_size=batch, workers=workers, progress=False)
    evaluate_dataset(nets, val_dir, **kwargs)  # untimed: file cache, allocator, cuDNN
    synchronize(device)
    start = time.perf_counter()
    result = evaluate_dataset(nets, val_dir, **kwargs)
    synchronize(device)
    crops = result["images"] * len(nets[0].scales) * GRID * GRID * 2  # a grid of crops and their flips per Q
    return crops / (time.perf_counter() - start)


def check_evaluation(device: torch.device, work: Path, learning: dict, *, batch: int, workers: int,
                     timeout: float) -> dict:
    """`evaluate.py --dense --multi-crop` on the learning run's best.pt: every method's top-1 error at
    most TOP1_FRACTION_OF_CHANCE of guessing's; and multi-crop's crops/s against the forward pass's."""
    checkpoint, data = Path(learning["checkpoint"]), Path(learning["data"])
    out = work / "evaluation" / "result"
    shutil.rmtree(out.parent, ignore_errors=True)
    run_script("evaluate.py", ["--dense", "--multi-crop", "--checkpoint", str(checkpoint), "--data", str(data),
                               "--out", str(out), "--workers", str(workers), "--batch-size", str(batch),
                               "--device", device.type], cwd=work, timeout=timeout)
    result = json.loads(out.with_suffix(".json").read_text())
    errors = {row["method"]: row["top1_err"] for row in result["rows"]}
    chance = chance_top1_err(len(result["classes"]))
    eval_rate = multi_crop_rate(checkpoint, data / "val", device=device, batch=batch, workers=workers)
    net = load_eval_net(checkpoint)
    forward = forward_rate(net.model, batch=CROPS_PER_FORWARD, crop=net.crop_size, device=device, steps=10)
    figures = {"top1_err": errors, "chance_top1_err": chance, "bound_top1_err": TOP1_FRACTION_OF_CHANCE * chance,
               "images": result["images"], "multi_crop_crops_s": eval_rate, "forward_crops_s": forward,
               "forward_batch": CROPS_PER_FORWARD, "fraction_of_forward": eval_rate / forward,
               "summary": f"evaluate.py --dense --multi-crop on {result['images']} images: top-1 err "
                          + ", ".join(f"{m} {e:.1f}%" for m, e in errors.items())
                          + f" (chance {chance:.0f}%, bound {TOP1_FRACTION_OF_CHANCE * chance:.1f}%); multi-crop "
                          f"{eval_rate:,.0f} crops/s = {eval_rate / forward:.2f} of the forward pass alone "
                          f"({forward:,.0f} crops/s at batch {CROPS_PER_FORWARD})"}
    above = [m for m, e in errors.items() if e > TOP1_FRACTION_OF_CHANCE * chance]
    if above:
        raise CheckFailed(f"top-1 error not well below chance for {', '.join(above)}", figures)
    return figures


# --------------------------------------------------------------------------------------------------
# 5. Two GPUs against one; a stop signal to one rank
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_args(data: Path, run_root: Path, name: str, *, device: torch.device, epochs: int, steps: int,
             batch: int) -> list[str]:
    """train.py's arguments for the DDP checks: the demo net in fp32 without dropout or cuDNN
    autotuning, so that one process and two differ only in the order of the gradient sums."""
    return ["--config", "demo", "--data", str(data), "--run-name", name, "--out-dir", str(run_root / "checkpoints"),
            "--log-dir", str(run_root / "runs"), "--epochs", str(epochs), "--steps-per-epoch", str(steps),
            "--batch-size", str(batch), "--workers", "2", "--stats", "imagenet", "--patience", "1000",
            "--dropout", "0", "--bf16", "false", "--compile", "false", "--cudnn-benchmark", "false",
            "--device", device.type, "--log-every", "1"]


def start_ranks(args: list[str], world_size: int, *, cwd: Path) -> list[subprocess.Popen]:
    """`world_size` train.py processes as torchrun would start them (its environment variables), so
    that a signal can be sent to one rank."""
    port, procs = str(free_port()), []
    for rank in range(world_size):
        env = dict(child_env(), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Each process's exit code and stderr once all have ended (killed past `timeout`)."""
    deadline, out = time.monotonic() + timeout, []
    for proc in procs:
        try:
            out.append((proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[1]))
        except subprocess.TimeoutExpired:
            proc.kill()
            out.append(proc.communicate()[1] + f"\nerror: killed after {timeout:.0f} s")
    return [(proc.returncode, err) for proc, err in zip(procs, out)]


def relative_weight_difference(path_a: Path, path_b: Path) -> float:
    """max over the nets' float tensors of ||a - b|| / ||b|| (the checkpoints' `model` state)."""
    a = torch.load(path_a, map_location="cpu", weights_only=True)["model"]
    b = torch.load(path_b, map_location="cpu", weights_only=True)["model"]
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)).item()
               for k in b if b[k].is_floating_point())


def check_two_gpus(device: torch.device, work: Path, data: Path, *, steps: int, batch: int, timeout: float) -> dict:
    """`train.py --gpus 2` against `--gpus 1` on the same global batch for `steps` steps: the largest
    relative weight difference within DDP_TOLERANCE. Then SIGUSR1 to rank 1 of a two-process run:
    both ranks stop at the same step with exit code 138, last.pt loads, and --resume goes on from it."""
    run_root = work / "two_gpus"
    shutil.rmtree(run_root, ignore_errors=True)
    run_root.mkdir(parents=True)
    for name, gpus in (("one", 1), ("two", 2)):
        run_script("train.py", [*ddp_args(data, run_root, name, device=device, epochs=1, steps=steps, batch=batch),
                                "--gpus", str(gpus)], cwd=run_root, timeout=timeout)
    ckpts = run_root / "checkpoints"
    difference = relative_weight_difference(ckpts / "two" / "last.pt", ckpts / "one" / "last.pt")
    figures = {"steps": steps, "global_batch": batch, "relative_weight_difference": difference,
               "tolerance": DDP_TOLERANCE, **stop_and_resume(device, run_root, data, batch=batch, timeout=timeout)}
    figures["summary"] = (f"2 GPUs vs 1, {steps} steps of {batch}: largest relative weight difference "
                          f"{difference:.1e} (tolerance {DDP_TOLERANCE:g}); SIGUSR1 to rank 1: both ranks stopped "
                          f"at epoch {figures['stopped_at'][0]} step {figures['stopped_at'][1]}, exit codes "
                          f"{figures['exit_codes']}, resumed from there to the end")
    if not difference <= DDP_TOLERANCE:
        raise CheckFailed(f"2 GPUs and 1 differ by {difference:.1e} relative, above {DDP_TOLERANCE:g}", figures)
    return figures


def stop_and_resume(device: torch.device, run_root: Path, data: Path, *, batch: int, timeout: float) -> dict:
    """SIGUSR1 to rank 1 once the run has started; then the same command with --resume (and one more
    epoch than the saved one, so it ends soon)."""
    run_dir = run_root / "checkpoints" / "stopped"
    args = ddp_args(data, run_root, "stopped", device=device, epochs=1000, steps=1000, batch=batch)
    procs = start_ranks(args, 2, cwd=run_root)
    deadline = time.monotonic() + timeout
    # config.yaml is written once both ranks are past the data set's barrier: their handlers are in place.
    while not (run_dir / "config.yaml").exists() and time.monotonic() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)
    ended = finish(procs, timeout)
    codes = [code for code, _ in ended]
    stops = [re.findall(r"stopped at epoch (\d+) step (\d+)", err) for _, err in ended]
    if codes != [128 + signal.SIGUSR1] * 2 or not all(stops):
        raise RuntimeError(f"after SIGUSR1 to rank 1 the ranks exited {codes}: "
                           f"{last_error_line(ended[0][1] + ended[1][1])}")
    if len({s[-1] for s in stops}) != 1:
        raise CheckFailed(f"the ranks stopped at different steps: {[s[-1] for s in stops]}", {"exit_codes": codes})
    saved = load_checkpoint(run_dir / "last.pt")
    epoch, step = saved["epoch"], saved["step"]
    if (str(epoch), str(step)) != stops[0][-1]:
        raise CheckFailed(f"last.pt holds epoch {epoch} step {step}, the ranks stopped at {stops[0][-1]}",
                          {"exit_codes": codes})
    resume = ddp_args(data, run_root, "stopped", device=device, epochs=epoch + 1, steps=1000, batch=batch)
    resumed = finish(start_ranks([*resume, "--resume"], 2, cwd=run_root), timeout)
    if [code for code, _ in resumed] != [0, 0] or f"at epoch {epoch}, step {step}" not in resumed[0][1]:
        raise CheckFailed(f"the resumed run did not go on from epoch {epoch} step {step}: exit codes "
                          f"{[c for c, _ in resumed]}, {last_error_line(resumed[0][1] + resumed[1][1])}",
                          {"exit_codes": codes, "stopped_at": [epoch, step]})
    final = load_checkpoint(run_dir / "last.pt")
    return {"exit_codes": codes, "stopped_at": [epoch, step], "resumed_to": [final["epoch"], final["step"]]}
