"""Regenerate every figure the README quotes from a run, record them, and rewrite the README from the record.

    python tools/readme_figures.py                 # the demo, its evaluation and transfer.py runs, the LeNet-5 demo
    python tools/readme_figures.py --reproduce     # also time `reproduce.py --scale demo` (a minute or more)
    python tools/readme_figures.py --transforms    # time the training transform only (bench/transforms.py, minutes)
    python tools/readme_figures.py --check         # run them afresh and compare with the record; writes nothing
    python tools/readme_figures.py --readme-only   # rewrite the README's figures from the record, run nothing

Every command runs as a clean clone runs it, in a subprocess with one torch thread (OMP_NUM_THREADS=1:
other thread counts change float summation order and so the last digits), writing its checkpoints and
TensorBoard events into a scratch folder, never the user's checkpoints/ or runs/. The datasets are the
generated ones (data/sample, data/digits), made before the timed runs. The figures go to
docs/readme_figures.json with the date, machine, load, versions and commands; the README's quoted
figures sit between `<!-- figures:NAME -->` and `<!-- /figures -->` and are rewritten from that record
only, so tests/test_readme_figures.py can check that the two agree and that a fresh run still gives them.
Without --reproduce the record keeps the last reproduce timing, and but for --transforms the last
transform speed, each with its own date and load.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "docs" / "readme_figures.json"
README = ROOT / "README.md"
SPAN = re.compile(r"<!-- figures:(?P<name>[\w-]+) -->(?P<body>.*?)<!-- /figures -->", re.DOTALL)


class FiguresError(Exception):
    """A command failed or a file is not as expected: main prints it as one line."""


def run(args: list[str], cwd: Path) -> tuple[str, float]:
    """Run a repository script (python ARGS) with one torch thread; its stdout and wall time in seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)  # a launcher's environment would make the script think it is one rank of many
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall_s = time.monotonic() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FiguresError(f"python {' '.join(args)} failed (exit {proc.returncode}): {last}")
    return proc.stdout, wall_s


def shown(args: list[str], scratch: Path) -> str:
    """The command as a user types it, with the scratch folder written as $SCRATCH."""
    return "OMP_NUM_THREADS=1 python " + " ".join(args).replace(str(scratch), "$SCRATCH")


def training_figures(metrics_path: Path) -> dict:
    """The best epoch as the trainer picks it (the first with the lowest val top-1 error; epochs count from 0)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        raise FiguresError(f"{metrics_path} holds no epoch")
    best = min(rows, key=lambda row: (row["val_top1_err"], row["epoch"]))
    return {"best_epoch": best["epoch"], "best_val_top1_err": best["val_top1_err"],
            "best_val_top5_err": best["val_top5_err"], "epochs": len(rows), "val_images": best["val_images"],
            "val_top1_err_by_epoch": [row["val_top1_err"] for row in rows]}


def train_demo(config: str, data: Path, scratch: Path, cwd: Path) -> dict:
    """train.py --config CONFIG on DATA into the scratch folder: its figures, command and wall time."""
    args = ["train.py", "--config", config, "--data", str(data), "--out-dir", str(scratch / "checkpoints"),
            "--log-dir", str(scratch / "runs")]
    _, wall_s = run(args, cwd)
    figures = training_figures(scratch / "checkpoints" / config / "metrics.jsonl")
    return {"command": shown(args, scratch), "wall_s": round(wall_s, 1), **figures}


def evaluate_demo(scratch: Path, cwd: Path) -> dict:
    """evaluate.py --dense --multi-crop on the demo's best.pt: the printed table and each row's errors."""
    args = ["evaluate.py", "--dense", "--multi-crop", "--checkpoint", str(scratch / "checkpoints/demo/best.pt"),
            "--out", str(scratch / "eval")]
    stdout, wall_s = run(args, cwd)
    result = json.loads((scratch / "eval.json").read_text())
    table = stdout.split("\n\n")[0].rstrip()  # the table comes first, then the per-class lines
    return {"command": shown(args, scratch), "wall_s": round(wall_s, 1), "images": result["images"],
            "classes": len(result["classes"]), "table": table.splitlines(),
            "rows": [{"method": row["method"], "top1_err": row["top1_err"], "top5_err": row["top5_err"]}
                     for row in result["rows"]]}


TRANSFER_RUNS = {"caltech": ["--scales", "32,48", "--train-per-class", "6", "--test-per-class", "4"],
                 "VOC2007": ["--scales", "32,48"]}


def transfer_demo(scratch: Path, cwd: Path, data: Path) -> dict:
    """transfer.py (Appendix B) with the demo's best.pt on the generated Caltech-like and VOC sets: when and
    where, and per run the printed table, its rows' figures and the first split's test images (one image's
    worth of tolerance)."""
    figures = {**context(), "runs": []}
    for layout, extra in TRANSFER_RUNS.items():
        out = scratch / f"transfer-{layout}"
        args = ["transfer.py", "--checkpoint", str(scratch / "checkpoints/demo/best.pt"), "--data", str(data / layout),
                *extra, "--cache", str(scratch / "transfer-cache"), "--out", str(out)]
        stdout, wall_s = run(args, cwd)
        result = json.loads((out / "results.json").read_text())
        figures["runs"].append({"layout": layout, "command": shown(args, scratch), "wall_s": round(wall_s, 1),
                                "table": stdout.split("\n\n")[0].rstrip().splitlines(),
                                "test_images": result["rows"][0]["splits"][0]["test_images"],
                                "rows": [{"net": row["net"], "mean": row["mean"], "std": row["std"]}
                                         for row in result["rows"]]})
    return figures


def time_reproduce(data: Path, scratch: Path, cwd: Path) -> dict:
    """reproduce.py --scale demo (its twelve runs and evaluations) from nothing: the wall time only."""
    args = ["reproduce.py", "--scale", "demo", "--data", str(data), "--out-dir", str(scratch / "reproduce"),
            "--log-dir", str(scratch / "reproduce-runs")]
    before = context()  # the load before the run: afterwards it counts the run's own processes
    _, wall_s = run(args, cwd)
    return {"command": shown(args, scratch), "wall_s": round(wall_s, 1), **before,
            "load_average_1min_after": round(os.getloadavg()[0], 2)}


def time_transforms(scratch: Path, cwd: Path) -> dict:
    """bench/transforms.py (its 1,024 JPEGs, 5 rounds, its row added to docs/benchmarks.md): ours against
    torchvision v2 and a bare decode."""
    out = scratch / "transforms.json"
    args = ["bench/transforms.py", "--json", str(out)]  # its row goes to docs/benchmarks.md too
    before = context()
    run(args, cwd)
    return {"command": "python bench/transforms.py", **before, **json.loads(out.read_text())}


def context() -> dict:
    """When and where: the date, the machine, its load, and the versions that decide the digits."""
    import numpy
    import PIL
    import torch
    import torchvision

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"cpus": os.cpu_count(), "cpu": cpu, "system": platform.platform(),
                        "load_average_1min": round(os.getloadavg()[0], 2)},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": numpy.__version__,
                         "pillow": PIL.__version__, "commit": commit.stdout.strip()}}


def make_datasets(cwd: Path, data: Path, digits: Path) -> None:
    """Generate the datasets first (they are reused when current), so the timings are the runs' own."""
    run(["-m", "vgg.sample_data", "--out", str(data)], cwd)
    run(["-m", "vgg.sample_data", "--digits", "--out", str(digits)], cwd)
    run(["-m", "vgg.transfer", "sample", "--out", str(digits.parent / "transfer")], cwd)


def measure(data: Path, digits: Path, scratch: Path, cwd: Path = ROOT) -> dict:
    """Run the demo, its evaluation and the LeNet-5 demo into `scratch`: their figures, as the record holds them."""
    make_datasets(cwd, data, digits)
    before = context()
    demo = train_demo("demo", data, scratch, cwd)
    evaluation = evaluate_demo(scratch, cwd)
    transfer = transfer_demo(scratch, cwd, digits.parent / "transfer")  # data/transfer beside data/digits
    lenet5 = train_demo("lenet5-demo", digits, scratch, cwd)
    return {**before, "load_average_1min_after": round(os.getloadavg()[0], 2), "threads": "OMP_NUM_THREADS=1",
            "demo": demo, "evaluation": evaluation, "transfer": transfer, "lenet5_demo": lenet5}


def one_image(figures: dict) -> float:
    """One validation image's worth of error, in percentage points."""
    return 100 / figures["val_images"]


def compare(record: dict, fresh: dict) -> list[str]:
    """How `fresh` differs from the record beyond the tolerance; empty when they agree.

    Errors may differ by one validation image (another CPU may sum floats in another order; on the same
    machine and versions they are equal to the last digit); the best epoch must be the same, or one whose
    error is within that of the fresh run's best. Timings are never compared: they depend on the load."""
    differences = []
    for name in ("demo", "lenet5_demo"):
        old, new = record[name], fresh[name]
        tolerance = one_image(old) + 1e-9
        if abs(old["best_val_top1_err"] - new["best_val_top1_err"]) > tolerance:
            differences.append(f"{name}: best val top-1 error {new['best_val_top1_err']:.2f} % "
                               f"against the record's {old['best_val_top1_err']:.2f} %")
        by_epoch = new["val_top1_err_by_epoch"]  # a run that stopped before the recorded best epoch: no tie
        at_recorded = by_epoch[old["best_epoch"]] if old["best_epoch"] < len(by_epoch) else float("inf")
        if new["best_epoch"] != old["best_epoch"] and at_recorded - new["best_val_top1_err"] > tolerance:
            differences.append(f"{name}: best epoch {new['best_epoch']} against the record's {old['best_epoch']}")
    differences += compare_transfer(record.get("transfer", {}).get("runs", []), fresh.get("transfer", {}).get("runs", []))
    tolerance = 100 / record["evaluation"]["images"] + 1e-9
    old_rows = {row["method"]: row for row in record["evaluation"]["rows"]}
    new_rows = {row["method"]: row for row in fresh["evaluation"]["rows"]}
    if list(new_rows) != list(old_rows):
        return differences + [f"evaluation: methods {list(new_rows)} against the record's {list(old_rows)}"]
    for method, row in new_rows.items():
        for key in ("top1_err", "top5_err"):
            if abs(old_rows[method][key] - row[key]) > tolerance:
                differences.append(f"evaluation {method}: {key} {row[key]:.2f} against the record's "
                                   f"{old_rows[method][key]:.2f}")
    return differences


def compare_transfer(old: list[dict], new: list[dict]) -> list[str]:
    """transfer.py's figures (mean and std over the splits) within one test image's worth of the record's."""
    if [(t["layout"], [r["net"] for r in t["rows"]]) for t in new] != [(t["layout"], [r["net"] for r in t["rows"]])
                                                                      for t in old]:
        return ["transfer: other runs or rows than the record's"]
    differences = []
    for before, after in zip(old, new):
        tolerance = 100 / before["test_images"] + 1e-9
        for a, b in zip(before["rows"], after["rows"]):
            for key in ("mean", "std"):
                if abs(a[key] - b[key]) > tolerance:
                    differences.append(f"transfer {before['layout']}: {key} {b[key]:.2f} against the record's "
                                       f"{a[key]:.2f}")
    return differences


def when(record: dict) -> str:
    """The day, the machine's size and its load before the run, which a quoted timing needs beside it."""
    return (f"{record['date'][:10]}, {record['machine']['cpus']} CPU cores, 1-minute load average "
            f"{record['machine']['load_average_1min']:.1f}")


def wrapped(sentence: str) -> str:
    """A rendered sentence in lines of about the README's width (Markdown reads a line break as a space)."""
    return textwrap.fill(sentence, width=100, break_long_words=False, break_on_hyphens=False)


def render_demo(record: dict) -> str:
    demo, evaluation = record["demo"], record["evaluation"]
    chance = 100 * (1 - 1 / evaluation["classes"])
    return wrapped(f"measured by `tools/readme_figures.py` on {when(record)}, one torch thread, torch "
            f"{record['versions']['torch']}, recorded in `docs/readme_figures.json`: the demo trained in "
            f"{demo['wall_s']:.0f} s to a best val top-1 error of {demo['best_val_top1_err']:.1f} % at epoch "
            f"{demo['best_epoch']} (epochs count from 0), chance being {chance:.1f} %; the evaluation took "
            f"{evaluation['wall_s']:.0f} s")


def render_table(record: dict) -> str:
    lines = ["    " + line for line in record["evaluation"]["table"]]
    return "\n\n" + "\n".join(lines) + "\n\n"


def render_lenet5(record: dict) -> str:
    lenet5 = record["lenet5_demo"]
    return wrapped(f"{lenet5['wall_s']:.0f} s on {when(record)}; best val top-1 error "
            f"{lenet5['best_val_top1_err']:.1f} % at epoch {lenet5['best_epoch']} (of {lenet5['epochs']}, counted "
            "from 0), chance 90 %")


def render_reproduce(record: dict) -> str:
    timing = record.get("reproduce_demo")
    if timing is None:
        return "not timed yet (`tools/readme_figures.py --reproduce`)"
    minutes, seconds = divmod(round(timing["wall_s"]), 60)
    return wrapped(f"{minutes} min {seconds} s with `OMP_NUM_THREADS=1` ({when(timing)})")


def render_transfer(record: dict) -> str:
    transfer = record["transfer"]
    timing = ", ".join(f"{t['layout']} {t['wall_s']:.0f} s" for t in transfer["runs"])
    tables = "\n\n".join("\n".join("    " + line for line in t["table"]) for t in transfer["runs"])
    return (f"\n\n{tables}\n\n" + wrapped(f"(measured by `tools/readme_figures.py` on {when(transfer)}, one "
                                            f"torch thread, recorded in `docs/readme_figures.json`: {timing})") + "\n")


def render_transforms(record: dict) -> str:
    speed = record.get("transforms")
    if speed is None:
        return "not timed yet (`tools/readme_figures.py --transforms`)"
    jittered, fixed = speed["jittered"], speed["fixed"]
    return wrapped(f"{jittered['over_v2']:.2f}× the crops per second of the same work written with "
                   f"torchvision.transforms.v2 when scale-jittering (S in [256, 512]) and {fixed['over_v2']:.2f}× "
                   f"at S=256, for {jittered['time_over_decode']['torchcodec']:.2f}× and "
                   f"{fixed['time_over_decode']['torchcodec']:.2f}× the time of a bare decode of the whole file "
                   f"(TorchCodec's; `bench/transforms.py` by `tools/readme_figures.py --transforms`, {when(speed)})")


RENDERERS = {"demo": render_demo, "eval-table": render_table, "lenet5": render_lenet5,
             "reproduce": render_reproduce, "transfer": render_transfer, "transforms": render_transforms}


def readme_spans(text: str) -> dict[str, str]:
    """The README's generated spans by name; every renderer's name must be there exactly once."""
    names = [m["name"] for m in SPAN.finditer(text)]
    if sorted(names) != sorted(RENDERERS):
        raise FiguresError(f"README figure spans {sorted(names)}, expected each of {sorted(RENDERERS)} once")
    return {m["name"]: m["body"] for m in SPAN.finditer(text)}


def rewrite(text: str, record: dict) -> str:
    """The README text with every generated span rendered from the record."""
    readme_spans(text)
    return SPAN.sub(lambda m: f"<!-- figures:{m['name']} -->{RENDERERS[m['name']](record)}<!-- /figures -->", text)


def new_record(args, scratch: Path) -> dict:
    data, digits = Path("data/sample"), Path("data/digits")  # what a clean clone's demos use
    record = measure(data, digits, scratch)
    old = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    if args.reproduce:
        record["reproduce_demo"] = time_reproduce(data, scratch, ROOT)
    elif "reproduce_demo" in old:
        record["reproduce_demo"] = old["reproduce_demo"]
    if "transforms" in old:
        record["transforms"] = old["transforms"]
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--reproduce", action="store_true", help="also time reproduce.py --scale demo")
    mode.add_argument("--transforms", action="store_true",
                      help="time the training transform (bench/transforms.py) only; the rest of the record is kept")
    mode.add_argument("--check", action="store_true", help="run afresh and compare with the record; write nothing")
    mode.add_argument("--readme-only", action="store_true", help="rewrite the README from the record; run nothing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            with tempfile.TemporaryDirectory(prefix="readme-figures-") as scratch:
                differences = compare(json.loads(RECORD.read_text()),
                                      measure(Path("data/sample"), Path("data/digits"), Path(scratch)))
            print("\n".join(differences) or "the fresh run agrees with docs/readme_figures.json")
            return 1 if differences else 0
        if not args.readme_only:
            with tempfile.TemporaryDirectory(prefix="readme-figures-") as scratch:
                if args.transforms:
                    record = {**json.loads(RECORD.read_text()), "transforms": time_transforms(Path(scratch), ROOT)}
                else:
                    record = new_record(args, Path(scratch))
            RECORD.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
            print(f"wrote {RECORD.relative_to(ROOT)}")
        README.write_text(rewrite(README.read_text(), json.loads(RECORD.read_text())))
        print(f"rewrote the figures in {README.relative_to(ROOT)}")
    except (FiguresError, OSError, json.JSONDecodeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
