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

import fnmatch
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from vgg.config import FIELDS, RUNTIME_FIELDS, config_path, load_yaml
from vgg.core.errors import UserError
from vgg.evaluation.methods import BOTH, DENSE, MULTI_CROP

ROOT = Path(__file__).resolve().parents[2]
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
