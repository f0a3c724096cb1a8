"""The paper's whole protocol as one resumable plan: twelve training runs, the evaluations of Tables 3-6, a report.

The plan is data: TRAIN_STAGES (§3.1: net A from scratch; A-LRN from scratch as its config says; B-E
warm-started from A; C/D/E at S=384 from their S=256 nets; C/D/E scale-jittered from S=384), then
EVAL_STAGES (§4.1-4.4), whose numbers fill PAPER_ROWS, the rows of the paper's Tables 3-6. Each stage is
one `train.py` or `evaluate.py` command (printed by --dry-run); with one process it runs in this
process through the same functions, with --gpus N > 1 as that command in a subprocess.

Completion: a training stage is complete when `<out_dir>/<run>/complete.json` exists, written here after
the run returned normally (the trainer keeps no such flag: a last.pt alone may be an interrupted
run); a run folder with last.pt and no marker is resumed (`--resume`). An evaluation stage is complete
when its `<out_dir>/eval/<stage>.json` is newer than every checkpoint it tests. To redo a stage, delete
its run folder or its results file. The report is rewritten after every stage that ran.

`--scale demo` runs the same plan with scaled-down nets on the sample dataset: every size in pixels
(S, the jitter range, the test scales Q, the crop) is the paper's times 32/224, so each keeps its
ratio to the crop (demo_px).
"""

import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vgg.config import FIELDS, RUNTIME_FIELDS, Config, config_path, ensure_writable_dir, get_args_parser, load_yaml
from vgg.distributed import set_cpu_threads
from vgg.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
DENSE, MULTI_CROP, BOTH = "dense", "multi-crop", "multi-crop & dense"  # as vgg.evaluation names them
MARKER = "complete.json"

# --- The plan (the paper's DAG) --------------------------------------------------------------------


@dataclass(frozen=True)
class TrainStage:
    """One training run: configs/<config>.yaml, run folder <out_dir>/<config>."""

    name: str
    after: str = ""  # the stage whose best.pt this run starts from (its config's init_from), "" for none

    @property
    def config(self) -> str:
        return self.name


@dataclass(frozen=True)
class EvalStage:
    """One evaluate.py command: the best.pt of `nets` (several are fused, §4.4) at test scales `scales`."""

    name: str
    nets: tuple[str, ...]
    scales: tuple[int, ...]  # Q at the paper's scale
    methods: tuple[str, ...] = (DENSE,)


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Tables 3-6 and the evaluation stage whose results hold our number."""

    table: int
    net: str  # a training stage, or "D-jitter + E-jitter" for a fusion
    train_s: str
    test_q: str
    method: str
    top1: float  # the paper's top-1 / top-5 error (%) on ILSVRC-2012 val
    top5: float
    source: str  # EvalStage.name

    @property
    def nets(self) -> list[str]:
        return self.net.split(" + ")


TRAIN_STAGES = [
    TrainStage("A"),
    TrainStage("A-LRN"),  # configs/A-LRN.yaml trains it from scratch (it is no deeper than A)
    TrainStage("B", after="A"),
    TrainStage("C", after="A"),
    TrainStage("D", after="A"),
    TrainStage("E", after="A"),
    TrainStage("C-S384", after="C"),
    TrainStage("D-S384", after="D"),
    TrainStage("E-S384", after="E"),
    TrainStage("C-jitter", after="C-S384"),
    TrainStage("D-jitter", after="D-S384"),
    TrainStage("E-jitter", after="E-S384"),
]

# Test scales (§4.1, §4.2): single scale Q = S, or 384 for the nets jittered over [256;512]; multi-scale
# Q = {S-32, S, S+32} for fixed S, {256, 384, 512} for jittered S.
SINGLE_Q = {"A": 256, "A-LRN": 256, "B": 256, "C": 256, "D": 256, "E": 256,
            "C-S384": 384, "D-S384": 384, "E-S384": 384, "C-jitter": 384, "D-jitter": 384, "E-jitter": 384}
MULTI_Q = {"B": (224, 256, 288), "C": (224, 256, 288), "D": (224, 256, 288), "E": (224, 256, 288),
           "C-S384": (352, 384, 416), "D-S384": (352, 384, 416), "E-S384": (352, 384, 416),
           "C-jitter": (256, 384, 512), "D-jitter": (256, 384, 512), "E-jitter": (256, 384, 512)}
JITTER_Q = (256, 384, 512)

EVAL_STAGES = (
    [EvalStage(f"table3-{net}", (net,), (q,)) for net, q in SINGLE_Q.items()]
    # Table 4's rows for the jittered D and E are the dense rows of table5-6 (the same nets, scales and
    # method; the paper prints the same numbers in both tables), so they are not computed twice.
    + [EvalStage(f"table4-{net}", (net,), q) for net, q in MULTI_Q.items() if net not in ("D-jitter", "E-jitter")]
    + [EvalStage("table5-6", ("D-jitter", "E-jitter"), JITTER_Q, (DENSE, MULTI_CROP))]
)

# The paper's numbers: top-1 / top-5 val error (%), Tables 3-6 of arXiv:1409.1556v6. Checked against
# public copies where they could be found (Table 3's D at 256: 27.0 top-1; D/E jittered at Q=384: 8.1 /
# 8.0 top-5; Tables 4/5's D jittered, multi-scale dense: 7.5 top-5); the others are as transcribed
# from the paper and could not be cross-checked here.
_S256, _S384, _JIT = "256", "384", "[256;512]"
PAPER_ROWS = [
    PaperRow(3, "A", _S256, "256", DENSE, 29.6, 10.4, "table3-A"),
    PaperRow(3, "A-LRN", _S256, "256", DENSE, 29.7, 10.5, "table3-A-LRN"),
    PaperRow(3, "B", _S256, "256", DENSE, 28.7, 9.9, "table3-B"),
    PaperRow(3, "C", _S256, "256", DENSE, 28.1, 9.4, "table3-C"),
    PaperRow(3, "C-S384", _S384, "384", DENSE, 28.1, 9.3, "table3-C-S384"),
    PaperRow(3, "C-jitter", _JIT, "384", DENSE, 27.3, 8.8, "table3-C-jitter"),
    PaperRow(3, "D", _S256, "256", DENSE, 27.0, 8.8, "table3-D"),
    PaperRow(3, "D-S384", _S384, "384", DENSE, 26.8, 8.7, "table3-D-S384"),
    PaperRow(3, "D-jitter", _JIT, "384", DENSE, 25.6, 8.1, "table3-D-jitter"),
    PaperRow(3, "E", _S256, "256", DENSE, 27.3, 9.0, "table3-E"),
    PaperRow(3, "E-S384", _S384, "384", DENSE, 26.9, 8.7, "table3-E-S384"),
    PaperRow(3, "E-jitter", _JIT, "384", DENSE, 25.5, 8.0, "table3-E-jitter"),
    PaperRow(4, "B", _S256, "224,256,288", DENSE, 28.2, 9.6, "table4-B"),
    PaperRow(4, "C", _S256, "224,256,288", DENSE, 27.7, 9.2, "table4-C"),
    PaperRow(4, "C-S384", _S384, "352,384,416", DENSE, 27.8, 9.2, "table4-C-S384"),
    PaperRow(4, "C-jitter", _JIT, "256,384,512", DENSE, 26.3, 8.2, "table4-C-jitter"),
    PaperRow(4, "D", _S256, "224,256,288", DENSE, 26.6, 8.6, "table4-D"),
    PaperRow(4, "D-S384", _S384, "352,384,416", DENSE, 26.5, 8.6, "table4-D-S384"),
    PaperRow(4, "D-jitter", _JIT, "256,384,512", DENSE, 24.8, 7.5, "table5-6"),
    PaperRow(4, "E", _S256, "224,256,288", DENSE, 26.9, 8.7, "table4-E"),
    PaperRow(4, "E-S384", _S384, "352,384,416", DENSE, 26.7, 8.6, "table4-E-S384"),
    PaperRow(4, "E-jitter", _JIT, "256,384,512", DENSE, 24.8, 7.5, "table5-6"),
    PaperRow(5, "D-jitter", _JIT, "256,384,512", DENSE, 24.8, 7.5, "table5-6"),
    PaperRow(5, "D-jitter", _JIT, "256,384,512", MULTI_CROP, 24.6, 7.5, "table5-6"),
    PaperRow(5, "D-jitter", _JIT, "256,384,512", BOTH, 24.4, 7.2, "table5-6"),
    PaperRow(5, "E-jitter", _JIT, "256,384,512", DENSE, 24.8, 7.5, "table5-6"),
    PaperRow(5, "E-jitter", _JIT, "256,384,512", MULTI_CROP, 24.6, 7.4, "table5-6"),
    PaperRow(5, "E-jitter", _JIT, "256,384,512", BOTH, 24.4, 7.1, "table5-6"),
    PaperRow(6, "D-jitter + E-jitter", _JIT, "256,384,512", DENSE, 24.0, 7.1, "table5-6"),
    PaperRow(6, "D-jitter + E-jitter", _JIT, "256,384,512", MULTI_CROP, 23.9, 7.2, "table5-6"),
    PaperRow(6, "D-jitter + E-jitter", _JIT, "256,384,512", BOTH, 23.7, 6.8, "table5-6"),
]

TABLE_TITLES = {
    3: "Table 3: single test scale (dense evaluation, §4.1)",
    4: "Table 4: multiple test scales (dense evaluation, §4.2)",
    5: "Table 5: dense, multi-crop and both (multi-scale, §4.3)",
    6: "Table 6: ConvNet fusion of the jittered D and E (multi-scale, §4.4)",
}

# --- Scales ------------------------------------------------------------------------------------------

SCALES = ("paper", "demo")
PAPER_CROP, DEMO_CROP = 224, 32
# The demo's net and schedule (cf. configs/demo.yaml), a few minutes for all twelve runs on 2 CPU cores.
# Sizes in pixels are not listed: they follow demo_px. The configs' lr (0.01, 0.001 for fine-tunes) stays.
DEMO_OVERRIDES = dict(width=0.125, fc_width=256, init="xavier", crop_size=DEMO_CROP, stats_images=50, batch_size=32,
                      steps_per_epoch=22, epochs=8, checkpoint_every=0, log_every=5)
# Runtime defaults of the demo (flags on the command line win): one loader worker, and no torch.compile on
# a GPU (compiling would take longer than a demo run trains).
DEMO_RUNTIME = dict(workers=1, compile=False)
TRAIN_RUNTIME_FIELDS = (*RUNTIME_FIELDS, "compile", "data_path")  # the flags reproduce.py passes on


def demo_px(paper_px: int) -> int:
    """A size in the paper's pixels at the demo's scale: the same ratio to the crop (224 -> 32)."""
    return round(paper_px * DEMO_CROP / PAPER_CROP)


def scale_rule_text(scale: str) -> str:
    if scale == "paper":
        return "the paper's sizes: crop 224, S and Q as in the tables."
    sizes = ", ".join(f"{q}->{demo_px(q)}" for q in (224, 256, 288, 352, 384, 416, 512))
    return (f"every size is the paper's x {DEMO_CROP}/{PAPER_CROP} (same ratio to the crop), rounded: {sizes} "
            f"(so S=256 -> {demo_px(256)}, [256;512] -> [{demo_px(256)};{demo_px(512)}]); nets with 1/8 of the "
            f"channels (width {DEMO_OVERRIDES['width']}), FC width {DEMO_OVERRIDES['fc_width']}, Glorot init, "
            f"{DEMO_OVERRIDES['epochs']} epochs of {DEMO_OVERRIDES['steps_per_epoch']} steps of "
            f"{DEMO_OVERRIDES['batch_size']} images per run.")


# --- Settings and commands ---------------------------------------------------------------------------


@dataclass
class Settings:
    scale: str
    data: str
    out_dir: Path
    log_dir: Path
    runtime: dict  # TRAIN_RUNTIME_FIELDS values: the scale's defaults, then what the user typed

    def run_dir(self, stage: str) -> Path:
        return self.out_dir / stage

    def best(self, stage: str) -> Path:
        return self.run_dir(stage) / "best.pt"

    def eval_out(self, stage: str) -> Path:
        return self.out_dir / "eval" / stage

    @property
    def gpus(self) -> int:
        return self.runtime.get("gpus", FIELDS["gpus"].default)

    def runtime_value(self, name: str):
        return self.runtime.get(name, FIELDS[name].default)


def _flag(name: str, value) -> list[str]:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return ["--" + name.replace("_", "-"), text]


def train_argv(stage: TrainStage, settings: Settings, resume: bool = False) -> list[str]:
    """train.py's arguments for a stage: its config, where things go, the scale's sizes, the runtime flags."""
    argv = ["--config", stage.config, "--data", settings.data, "--out-dir", str(settings.out_dir),
            "--log-dir", str(settings.log_dir)]
    if stage.after:  # the config's init_from names checkpoints/<after>/best.pt; here under --out-dir
        argv += ["--init-from", str(settings.best(stage.after))]
    if settings.scale == "demo":
        yaml_values = load_yaml(config_path(stage.config))
        scale_min = yaml_values.get("scale_min", FIELDS["scale_min"].default)
        scale_max = yaml_values.get("scale_max", FIELDS["scale_max"].default)
        overrides = {**DEMO_OVERRIDES, "scale_min": demo_px(scale_min), "scale_max": demo_px(scale_max)}
        for name, value in overrides.items():
            argv += _flag(name, value)
    for name, value in settings.runtime.items():
        argv += _flag(name, value)
    return argv + (["--resume"] if resume else [])


def eval_scales(stage: EvalStage, settings: Settings) -> list[int]:
    return [demo_px(q) if settings.scale == "demo" else q for q in stage.scales]


def eval_argv(stage: EvalStage, settings: Settings) -> list[str]:
    methods = [{DENSE: "--dense", MULTI_CROP: "--multi-crop"}[m] for m in stage.methods]
    argv = ["--checkpoint", *[str(settings.best(net)) for net in stage.nets], *methods,
            "--scales", *map(str, eval_scales(stage, settings)), "--data", settings.data,
            "--out", str(settings.eval_out(stage.name))]
    for name, value in settings.runtime.items():
        if name in RUNTIME_FIELDS:
            argv += _flag(name, value)
    return argv


def command_text(script: str, argv: list[str]) -> str:
    """The command a user would type for a stage (`python train.py ...`), relative to the working directory."""
    path = os.path.relpath(ROOT / script)
    return shlex.join(["python", path, *argv])


# --- Stage status ------------------------------------------------------------------------------------


def read_marker(settings: Settings, stage: str) -> dict | None:
    path = settings.run_dir(stage) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write: the run is resumed (and finishes at once if it had finished)
    if marker.get("scale") != settings.scale:
        raise UserError(f"{path} marks a --scale {marker.get('scale')} run, not --scale {settings.scale}: "
                        "use another --out-dir for this scale")
    return marker


def train_status(stage: TrainStage, settings: Settings) -> str:
    """'done' (marker written), 'resume' (last.pt without marker: interrupted) or 'run'."""
    if read_marker(settings, stage.name) is not None:
        return "done"
    return "resume" if (settings.run_dir(stage.name) / "last.pt").is_file() else "run"


def eval_status(stage: EvalStage, settings: Settings) -> str:
    """'done' when the results file is readable and newer than every checkpoint it tests, else 'run'."""
    path = settings.eval_out(stage.name).with_suffix(".json")
    try:
        json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "run"
    checkpoints = [settings.best(net) for net in stage.nets]
    if not all(p.is_file() for p in checkpoints):
        return "run"
    newest = max(p.stat().st_mtime for p in checkpoints)
    return "done" if path.stat().st_mtime >= newest else "run"


def needs(stage) -> list[str]:
    """The training stages a stage reads the best.pt of."""
    if isinstance(stage, TrainStage):
        return [stage.after] if stage.after else []
    return list(stage.nets)


def select_stages(patterns: list[str] | None) -> list:
    """All stages in order, or those matching --stages (names or shell-style globs)."""
    stages = [*TRAIN_STAGES, *EVAL_STAGES]
    if not patterns:
        return stages
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(s.name, pattern) for s in stages):
            raise UserError(f"--stages {pattern!r} matches no stage; stages: "
                            f"{', '.join(s.name for s in stages)} (globs like 'D*' or 'table3-*' work)")
    return [s for s in stages if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def plan(selected: list, settings: Settings) -> list[tuple[object, str, str]]:
    """(stage, status, command) in run order; refuses a stage whose input is neither done nor selected."""
    selected_names = {s.name for s in selected}
    train_done = {s.name: train_status(s, settings) == "done" for s in TRAIN_STAGES}
    steps = []
    for stage in selected:
        for need in needs(stage):
            if not train_done[need] and need not in selected_names:
                raise UserError(f"stage {stage.name} needs {settings.best(need)} from stage {need}, which is "
                                f"not complete: add {need} to --stages (or leave --stages out)")
        if isinstance(stage, TrainStage):
            status = train_status(stage, settings)
            steps.append((stage, status, command_text("train.py", train_argv(stage, settings, status == "resume"))))
        else:
            steps.append((stage, eval_status(stage, settings), command_text("evaluate.py", eval_argv(stage, settings))))
    return steps


# --- Running stages ----------------------------------------------------------------------------------


class StageFailed(Exception):
    """A stage's subprocess failed; it has printed its own error. Carries the exit code."""

    def __init__(self, stage: str, code: int):
        super().__init__(f"stage {stage} failed with exit code {code}")
        self.code = code


def run_subprocess(stage_name: str, script: str, argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv])
    if proc.returncode != 0:
        raise StageFailed(stage_name, proc.returncode)


def run_train_stage(stage: TrainStage, status: str, settings: Settings) -> None:
    argv = train_argv(stage, settings)
    if settings.gpus > 1:  # train.py runs itself under torchrun
        run_subprocess(stage.name, "train.py", train_argv(stage, settings, status == "resume"))
    else:
        from vgg.config import check_output_dirs, resolve_config
        from vgg.trainer import run

        parser = argparse.ArgumentParser(parents=[get_args_parser()])  # train.py's own flags
        config = resolve_config(parser.parse_args(argv))
        check_output_dirs(config)
        run(config, resume="auto" if status == "resume" else "")
    marker = {"stage": stage.name, "scale": settings.scale, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": command_text("train.py", argv)}
    (settings.run_dir(stage.name) / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def run_eval_stage(stage: EvalStage, settings: Settings) -> None:
    argv = eval_argv(stage, settings)
    if settings.gpus > 1:  # evaluate.py shards the images over N processes
        run_subprocess(stage.name, "evaluate.py", argv)
        return
    from vgg.distributed import init_distributed
    from vgg.evaluation import evaluate_dataset, load_eval_net, write_results

    scales = eval_scales(stage, settings)
    nets = [load_eval_net(settings.best(net), scales=scales) for net in stage.nets]
    device = init_distributed(settings.runtime_value("device")).device
    result = evaluate_dataset(nets, Path(settings.data) / "val", methods=list(stage.methods), device=device,
                              workers=settings.runtime_value("workers"), bf16=settings.runtime_value("bf16"),
                              channels_last=settings.runtime_value("channels_last"))
    write_results(result, settings.eval_out(stage.name))


def reproduce(settings: Settings, patterns: list[str] | None, dry_run: bool) -> int:
    """Run (or with dry_run print) the selected stages in order, then write the report."""
    steps = plan(select_stages(patterns), settings)
    verb = {"done": "complete, skipped", "resume": "interrupted, resuming", "run": "to run"}
    if dry_run:
        for i, (stage, status, command) in enumerate(steps, 1):
            print(f"[{i}/{len(steps)}] {stage.name}: {verb[status]}\n    {command}")
        return 0
    ensure_writable_dir(settings.out_dir, "--out-dir")
    ensure_writable_dir(settings.log_dir, "--log-dir")
    if settings.runtime.get("gpus", 1) <= 1:  # stages run in this process: its threads, as train.py's
        set_cpu_threads(settings.runtime.get("device", FIELDS["device"].default),
                        settings.runtime.get("workers", FIELDS["workers"].default))
    from vgg.trainer import prepare_dataset

    prepare_dataset(Config(data=settings.data))  # generates the sample dataset on first use; checks train/, val/
    for i, (stage, status, command) in enumerate(steps, 1):
        if isinstance(stage, EvalStage):
            status = eval_status(stage, settings)  # a checkpoint may have changed since the plan was made
        print(f"[{i}/{len(steps)}] {stage.name}: {verb[status]}", flush=True)
        if status == "done":
            continue
        print(f"    {command}", flush=True)
        start = time.perf_counter()
        try:
            if isinstance(stage, TrainStage):
                run_train_stage(stage, status, settings)
            else:
                run_eval_stage(stage, settings)
        except UserError as e:
            raise UserError(f"stage {stage.name}: {e}") from None
        print(f"[{i}/{len(steps)}] {stage.name}: done in {time.perf_counter() - start:.0f} s", flush=True)
        write_report(settings)  # kept current while a long plan runs
    md_path, json_path = write_report(settings)
    print(f"report: {md_path} ({json_path}); training curves also in TensorBoard: "
          f"tensorboard --logdir {settings.log_dir}")
    return 0


# --- The report --------------------------------------------------------------------------------------


def load_result(settings: Settings, source: str) -> dict | None:
    """An evaluation stage's results (evaluate.py's JSON), or None when it has not run."""
    try:
        return json.loads(settings.eval_out(source).with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def our_row(result: dict, row: PaperRow, settings: Settings) -> dict | None:
    """The result row for a paper row: the net's checkpoint (or the fusion, which has none) and the method."""
    checkpoint = str(settings.best(row.net)) if len(row.nets) == 1 else ""
    found = [r for r in result["rows"] if r["checkpoint"] == checkpoint and r["method"] == row.method]
    return found[0] if found else None


def collect_rows(settings: Settings) -> list[dict]:
    """Every row of Tables 3-6: the paper's errors, ours (None where not evaluated yet) and the differences."""
    rows = []
    for row in PAPER_ROWS:
        result = load_result(settings, row.source)
        ours = our_row(result, row, settings) if result else None
        our_nets = [n for n in (result or {}).get("nets", []) if Path(n["checkpoint"]).parent.name in row.nets]
        entry = {"table": row.table, "net": row.net, "train_s": row.train_s, "test_q": row.test_q,
                 "method": row.method, "paper_top1_err": row.top1, "paper_top5_err": row.top5,
                 "top1_err": None, "top5_err": None, "diff_top1": None, "diff_top5": None,
                 "our_train_s": our_nets[0]["train_s"] if our_nets else None,
                 "our_test_q": ",".join(map(str, our_nets[0]["test_q"])) if our_nets else None,
                 "images": result["images"] if result else None, "source": row.source}
        if ours is not None:
            entry.update(top1_err=ours["top1_err"], top5_err=ours["top5_err"],
                         diff_top1=ours["top1_err"] - row.top1, diff_top5=ours["top5_err"] - row.top5)
        rows.append(entry)
    return rows


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows, one per epoch (the last row of an epoch if a resume repeated one)."""
    by_epoch = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_curves(stage: str, metrics: list[dict], path: Path) -> None:
    """Val top-1/top-5 error and train loss per epoch of one run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] + 1 for m in metrics]
    fig, (err_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    err_ax.plot(epochs, [m["val_top1_err"] for m in metrics], "o-", label="val top-1 error")
    err_ax.plot(epochs, [m["val_top5_err"] for m in metrics], "s-", label="val top-5 error")
    err_ax.set(xlabel="epoch", ylabel="error (%)", title=f"{stage}: validation")
    err_ax.legend()
    loss_ax.plot(epochs, [m["train_loss"] for m in metrics], "o-", color="tab:red")
    loss_ax.set(xlabel="epoch", ylabel="loss", title=f"{stage}: training loss")
    for ax in (err_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _number(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-" if sign else "not run"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def _with_ours(paper: str, ours: str | None) -> str:
    """'256', or '256 → 37' where our run used other sizes (the demo)."""
    return paper if ours in (None, paper) else f"{paper} → {ours}"


def format_report(report: dict) -> str:
    lines = ["# The paper's Tables 3-6, reproduced", "",
             f"Written by `python reproduce.py` on {report['generated']}. Scale: **{report['scale']}** - "
             f"{report['scale_rule']}", "",
             f"Our numbers: top-1 / top-5 error (%) on `{report['data']}/val` ({report['val_images']} images "
             "read); the paper's: ILSVRC-2012 val "
             "(50,000 images). Δ = ours - paper (positive: worse than the paper). Where two sizes are given "
             "(paper → ours) our run used the second.", ""]
    if report["scale"] == "demo":
        n = report["classes"]
        chance = f" (chance: {100 * (1 - 1 / n):.1f}% top-1, {100 * max(0, 1 - 5 / n):.1f}% top-5 error for {n} " \
                 "classes)" if n else ""
        lines += ["The demo's nets are tiny and its data small: its numbers show that every stage and evaluation "
                  f"runs, not the paper's accuracy{chance}.", ""]
    for table, title in TABLE_TITLES.items():
        lines += [f"## {title}", "",
                  "| net (run) | train S | test Q | method | top-1 ours | top-1 paper | Δ top-1 | top-5 ours "
                  "| top-5 paper | Δ top-5 |",
                  "|---|---|---|---|--:|--:|--:|--:|--:|--:|"]
        for r in (r for r in report["rows"] if r["table"] == table):
            lines.append(f"| {r['net']} | {_with_ours(r['train_s'], r['our_train_s'])} | "
                         f"{_with_ours(r['test_q'], r['our_test_q'])} | {r['method']} | {_number(r['top1_err'])} | "
                         f"{r['paper_top1_err']:.1f} | {_number(r['diff_top1'], True)} | {_number(r['top5_err'])} | "
                         f"{r['paper_top5_err']:.1f} | {_number(r['diff_top5'], True)} |")
        lines.append("")
    lines += ["## Training curves", "",
              "Per run, from its `metrics.jsonl`: validation top-1 and top-5 error after each epoch (one centre "
              "crop at Q = S, or the middle of the jitter range) and the mean training loss.", ""]
    for stage in TRAIN_STAGES:
        curve = report["curves"].get(stage.name)
        lines += [f"### {stage.name}", "", f"![{stage.name}]({curve})" if curve else "not trained yet", ""]
    lines += ["## Stages", "", "| stage | status |", "|---|---|"]
    words = {"done": "complete", "resume": "interrupted (resumed by the next run)", "run": "not run yet"}
    lines += [f"| {s['name']} | {words[s['status']]} |" for s in report["stages"]]
    lines += ["", f"Numbers depend on the machine: {report['device_note']}", ""]
    return "\n".join(lines)


def write_report(settings: Settings) -> tuple[Path, Path]:
    """report.md and report.json in --out-dir, the training curves under <out-dir>/curves/."""
    import torch

    curves = {}
    for stage in TRAIN_STAGES:
        metrics_path = settings.run_dir(stage.name) / "metrics.jsonl"
        metrics = read_metrics(metrics_path) if metrics_path.is_file() else []
        if metrics:
            png = settings.out_dir / "curves" / f"{stage.name}.png"
            if not png.is_file() or png.stat().st_mtime < metrics_path.stat().st_mtime:
                plot_curves(stage.name, metrics, png)
            curves[stage.name] = f"curves/{stage.name}.png"
    device = settings.runtime_value("device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = collect_rows(settings)
    any_result = next(filter(None, (load_result(settings, s.name) for s in EVAL_STAGES)), None)
    statuses = [{"name": s.name, "status": train_status(s, settings)} for s in TRAIN_STAGES]
    statuses += [{"name": s.name, "status": eval_status(s, settings)} for s in EVAL_STAGES]
    report = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "scale": settings.scale,
        "scale_rule": scale_rule_text(settings.scale), "data": settings.data, "out_dir": str(settings.out_dir),
        "rows": rows, "val_images": any_result["images"] if any_result else None,
        "classes": len(any_result["classes"]) if any_result else None,
        "curves": curves, "stages": statuses,
        "device_note": (f"device {device}, {settings.gpus} process(es), "
                        f"{torch.get_num_threads()} CPU threads in this process; another thread count or "
                        "GPU changes the order of float sums and so the last digits, and over a training "
                        "run possibly more."),
    }
    md_path, json_path = settings.out_dir / "report.md", settings.out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(format_report(report))
    return md_path, json_path
