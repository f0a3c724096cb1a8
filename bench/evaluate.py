"""Evaluation speed end to end (§3.2, §4): `vgg.evaluation.runner.evaluate_dataset` on real JPEG files, this
tree's evaluator against an older revision's, side by side in one run.

Each evaluation decodes the files in DataLoader workers, rescales them to every test scale Q, runs
the net, and counts top-1/top-5 errors: what `python evaluate.py --dense`, `--multi-crop` and
`--dense --multi-crop` do, timed from the call to evaluate_dataset to its result (worker start-up
included; checkpoint loading and process start-up not), with the CPU time of the process and its
workers beside the wall-clock time. Three evaluators, each in its own process:
  baseline   evaluate_dataset at `--baseline` (default ca798b9, before issue 16), extracted with
             `git archive` into a temporary folder, called as evaluate.py called it (channels_last=True,
             which it applied on CUDA only);
  new        this tree's, called the same way (channels-last now applies on the CPU too);
  new-plain  this tree's with channels_last=False: the batching alone, in the baseline's CPU layout.
They take turns, round after round (the first of each round rotates), and the figures are medians
over the rounds. Each process first evaluates once untimed (file cache, allocator). All must give the
same top-1/top-5 errors: the script fails otherwise. Before each timed evaluation the process runs a
full garbage collection, so that none started by an earlier evaluation's garbage falls into its time.

The CPU demo net (train it first: `python train.py`, which also generates data/sample), as measured
for docs/benchmarks.md:
    python bench/evaluate.py --rounds 5
On a GPU (nothing measured there yet), e.g. a net D checkpoint on an ImageNet copy:
    python bench/evaluate.py --checkpoint checkpoints/D/best.pt --data /data/imagenet --rounds 3

Torch threads follow evaluate.py (cores - workers on a CPU, unless OMP_NUM_THREADS is set). The
machine's load average is printed before and after every run: on a shared machine the figures
move with it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import describe_device, record, resolve_device  # noqa: E402

METHODS = {"dense": ["dense"], "multi-crop": ["multi-crop"], "both": ["dense", "multi-crop"]}

# Run in a fresh process with PYTHONPATH set to the tree under test; prints one JSON line.
CHILD = r"""
import gc, json, os, sys, time
import torch
try:
    from vgg.core.distributed import set_cpu_threads
    from vgg.evaluation.nets import load_eval_net
    from vgg.evaluation.runner import evaluate_dataset
except ImportError:  # the baseline revision: the package before its parts became folders (issue 28)
    from vgg.distributed import set_cpu_threads
    from vgg.evaluation import evaluate_dataset, load_eval_net

args = json.loads(sys.argv[1])
set_cpu_threads(args["device"], args["workers"])
nets = [load_eval_net(args["checkpoint"])]
device = torch.device(args["device"])

def once(methods):
    result = evaluate_dataset(nets, args["val_dir"], methods=methods, device=device, batch_size=args["batch_size"],
                              workers=args["workers"], channels_last=args["channels_last"], progress=False)
    return result

once(["dense"])  # untimed: file cache, allocator, first worker start
out = {"threads": torch.get_num_threads()}
for label, methods in args["methods"].items():
    gc.collect()  # a full collection (~0.15 s here) left over from the last evaluation never lands in this one
    load = os.getloadavg()[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), sum(os.times()[:4])
    result = once(methods)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu = sum(os.times()[:4]) - cpu  # this process and its (joined) loader workers
    out[label] = {"seconds": seconds, "cpu": cpu, "images": result["images"], "load": [load, os.getloadavg()[0]],
                  "errors": [[row["method"], row["top1_err"], row["top5_err"]] for row in result["rows"]]}
print("RESULT " + json.dumps(out), flush=True)
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/demo/best.pt", help="the net to evaluate")
    parser.add_argument("--data", help="dataset root holding val/<wnid>/* (default: the checkpoint's training data)")
    parser.add_argument("--baseline", default="ca798b9", help="git revision of the evaluator to compare with")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs all three evaluators)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers (evaluate.py's default: min(8, cores))")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (evaluate.py's default)")
    parser.add_argument("--methods", default="dense,multi-crop,both", help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=False,
                        help="append the figures as a row to docs/benchmarks.md")
    return parser


def export_tree(revision: str, folder: Path) -> Path:
    """The `vgg` package of `revision` written into `folder` (git archive: the repository is not touched)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "vgg"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def run_child(tree: Path, args: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env, cwd=tree,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"error: the evaluation in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> str:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise SystemExit(f"error: no checkpoint {checkpoint}: train the demo first (python train.py) "
                         "or pass --checkpoint")
    if args.data:
        val_dir = Path(args.data) / "val"
    else:
        import torch
        val_dir = Path(torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]["data"]) / "val"
    child_args = {"checkpoint": str(checkpoint.resolve()), "val_dir": str(val_dir.resolve()), "device": device.type,
                  "workers": args.workers, "batch_size": args.batch_size, "methods": methods}

    load_before = os.getloadavg()[0]
    print(f"device: {describe_device(device)}; {os.cpu_count()} cores; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(f"{checkpoint} on {val_dir}, {args.workers} workers, batch {args.batch_size}", flush=True)
    # (tree, channels_last): the baseline as evaluate.py ran it (its channels_last=True took effect on
    # CUDA only); this tree as evaluate.py runs it (channels-last on every device), and in the plain layout.
    variants = {"baseline": ("baseline", True), "new": ("new", True), "new-plain": ("new", False)}
    seconds = {v: {m: [] for m in methods} for v in variants}
    cpu = {v: {m: [] for m in methods} for v in variants}
    images, errors, threads = {}, {}, set()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": export_tree(args.baseline, Path(tmp)), "new": REPO}
        for round_i in range(args.rounds):
            order = list(variants)[round_i % len(variants):] + list(variants)[:round_i % len(variants)]
            for v in order:
                tree, channels_last = variants[v]
                out = run_child(trees[tree], {**child_args, "channels_last": channels_last})
                threads.add(out["threads"])
                for m in methods:
                    r = out[m]
                    seconds[v][m].append(r["seconds"])
                    cpu[v][m].append(r["cpu"])
                    images[m] = r["images"]
                    errors.setdefault(m, {}).setdefault(v, r["errors"])
                    print(f"round {round_i + 1} {v:9s} {m:10s} {r['images'] / r['seconds']:7.1f} img/s, "
                          f"{1000 * r['cpu'] / r['images']:6.2f} CPU-ms/img ({r['seconds']:.2f} s; "
                          f"load {r['load'][0]:.2f} -> {r['load'][1]:.2f})", flush=True)

    parts = []
    for m in methods:
        for v in variants:
            if not _same_errors(errors[m]["baseline"], errors[m][v]):
                raise SystemExit(f"error: {m}: baseline errors {errors[m]['baseline']} != {v} {errors[m][v]}")
        rate = {v: images[m] / statistics.median(seconds[v][m]) for v in variants}
        per_cpu = {v: images[m] / statistics.median(cpu[v][m]) for v in variants}
        # Speed-ups within each round (runs minutes apart, under about the same load), then the median.
        within = {v: statistics.median(b / s for b, s in zip(seconds["baseline"][m], seconds[v][m]))
                  for v in ("new", "new-plain")}
        parts.append(f"{m}: {rate['new']:,.0f} img/s ({rate['new'] / rate['baseline']:.2f}x; {within['new']:.2f}x "
                     f"within rounds), plain layout {rate['new-plain']:,.0f} "
                     f"({rate['new-plain'] / rate['baseline']:.2f}x; "
                     f"{within['new-plain']:.2f}x), baseline {rate['baseline']:,.0f}; per CPU-second "
                     f"{per_cpu['new']:,.0f} / {per_cpu['new-plain']:,.0f} / {per_cpu['baseline']:,.0f} img")
    figures = (f"evaluation end to end, {checkpoint}, {images[next(iter(methods))]} JPEGs of {val_dir}, "
               f"{args.workers} workers, {'/'.join(map(str, sorted(threads)))} torch thread(s), batch "
               f"{args.batch_size}, medians of {args.rounds} interleaved rounds, baseline {args.baseline}, same "
               f"top-1/top-5 errors: " + "; ".join(parts) + f"; load average {load_before:.2f} before, "
               f"{os.getloadavg()[0]:.2f} after")
    record(device, figures, enabled=args.record)
    return figures


def _same_errors(a, b, tol=1e-9) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and abs(x[1] - y[1]) < tol and abs(x[2] - y[2]) < tol
                                    for x, y in zip(a, b))


if __name__ == "__main__":
    main()
