"""The run configuration: one dataclass, YAML files under configs/, the command line on top.

Precedence (timm's train.py pattern): dataclass defaults (the paper's values) < the YAML file named by
`--config` < command-line flags. Every field is a flag (`lr` -> `--lr`, `scale_min` ->
`--scale-min`). The resolved config is written to the run folder as config.yaml and into every
checkpoint, so a run can always be reproduced from what it saved.
"""

import argparse
import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from vgg.errors import UserError
from vgg.zoo import ARCH_NAMES, check_input_size  # VGG A-E and the neighbours of Table 7

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class Config:
    # --- The net (paper §2.2, Table 1) ---
    arch: str = field(default="A", metadata={
        "help": f"net: VGG configuration ({', '.join(ARCH_NAMES[:6])}) or a neighbour from Table 7's era "
                f"({', '.join(ARCH_NAMES[6:])})"})
    width: float = field(default=1.0, metadata={"help": "conv channel multiplier (1.0 = the paper's nets)"})
    fc_width: int = field(default=4096, metadata={"help": "width of the two hidden FC layers"})
    dropout: float = field(default=0.5, metadata={"help": "dropout on the first two FC layers (§3.1)"})
    init: str = field(default="normal", metadata={
        "help": "normal: N(0, 0.01^2) as in §3.1; xavier: Glorot; default: the net's own builder's (its paper's)"})
    init_from: str = field(default="", metadata={
        "help": "checkpoint to start from: net A's for a deeper net (§3.1 warm start: first 4 convs + "
                "3 FC layers), or the same net's (e.g. S=384 from S=256, all weights)"})

    # --- Data (§3.1; AlexNet §4.1 for the colour shift) ---
    data: str = field(default="data/sample", metadata={"help": "dataset root holding train/ and val/"})
    crop_size: int = field(default=224, metadata={"help": "training crop side (the net's input)"})
    scale_min: int = field(default=256, metadata={"help": "training scale S (S_min when jittering)"})
    scale_max: int = field(default=256, metadata={"help": "S_max for scale jittering (= scale_min: fixed S)"})
    val_scale: int = field(default=0, metadata={
        "help": "Q for the validation done during training (0: S, or (S_min+S_max)/2 when jittering)"})
    color_shift_std: float = field(default=0.1, metadata={"help": "std of the PCA colour-shift alphas"})
    stats: str = field(default="auto", metadata={
        "help": "dataset statistics: auto (compute once from train/, cached), imagenet (the "
                "well-known values) or a path to a stats JSON"})
    stats_images: int = field(default=10000, metadata={"help": "training images sampled for the statistics"})
    workers: int = field(default=min(8, os.cpu_count() or 1),
                         metadata={"help": "data-loading worker processes per GPU (8, or the CPU count if fewer)"})
    data_path: str = field(default="cpu", metadata={
        "help": "where images are decoded and augmented: cpu (PIL in workers) or gpu (TorchCodec)"})

    # --- Optimisation (§3.1) ---
    batch_size: int = field(default=256, metadata={"help": "global batch size, split across GPUs"})
    lr: float = field(default=0.01, metadata={"help": "initial learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "L2 penalty multiplier"})
    bias_decay: bool = field(default=True, metadata={
        "help": "apply weight decay to biases too (the paper is silent; Caffe's default does)"})
    norm_decay: bool = field(default=True, metadata={
        "help": "apply weight decay to batch-norm scales and shifts too (nets with batch norm only)"})
    lr_factor: float = field(default=0.1, metadata={"help": "lr multiplier when val top-1 plateaus"})
    patience: int = field(default=2, metadata={
        "help": "epochs without val top-1 improvement before the lr drops (the paper is silent)"})
    max_lr_drops: int = field(default=3, metadata={"help": "stop at the plateau after this many drops"})
    epochs: int = field(default=74, metadata={"help": "maximum number of epochs"})
    steps_per_epoch: int = field(default=0, metadata={"help": "cap on steps per epoch (0: whole epoch)"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and augmentation"})

    # --- Speed (each "auto": on for CUDA, off for CPU; true/false force it on any device) ---
    device: str = field(default="auto", metadata={"help": "auto, cuda or cpu"})
    gpus: int = field(default=1, metadata={"help": "processes (GPUs) on this machine; >1 uses DDP"})
    bf16: bool | str = field(default="auto", metadata={"help": "bf16 autocast: auto (on for CUDA), true or false"})
    channels_last: bool | str = field(default="auto", metadata={
        "help": "channels-last memory format: auto (on for CUDA and the CPU), true or false"})
    compile: bool | str = field(default="auto", metadata={"help": "torch.compile the net: auto (on for CUDA), "
                                                                   "true or false"})
    cudnn_benchmark: bool = field(default=True, metadata={"help": "cuDNN autotuning on CUDA"})

    # --- Output ---
    run_name: str = field(default="", metadata={"help": "run folder name (the config's name unless given)"})
    out_dir: str = field(default="checkpoints", metadata={"help": "where run folders are written"})
    log_dir: str = field(default="runs", metadata={"help": "TensorBoard root (events in <log_dir>/<run>)"})
    checkpoint_every: int = field(default=1000, metadata={"help": "also save last.pt every N steps (0: off)"})
    log_every: int = field(default=20, metadata={"help": "steps between progress/TensorBoard updates"})
    progress_every_s: float = field(default=30.0, metadata={
        "help": "when stderr is not a terminal (a log file, SLURM): seconds between plain progress lines, "
                "which replace the progress bar's redraws (0: every step)"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def jittered(self) -> bool:
        return self.scale_max != self.scale_min

    @property
    def test_scale(self) -> int:
        """Q for single-scale validation: S, or the middle of the jitter range (paper §4.1)."""
        return self.val_scale or (self.scale_min + self.scale_max) // 2


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# Settings that are "auto" (what pays off on the device) unless set true or false: bf16 and compile on
# CUDA only; channels-last on the CPU too, where it was measured faster for these nets (bench/channels_last.py
# and bench/evaluate.py, docs/benchmarks.md).
AUTO_FIELDS = ("bf16", "channels_last", "compile")


def speed_flag(value: bool | str, device: torch.device, *, auto_on_cpu: bool = False) -> bool:
    """An AUTO_FIELDS value on `device`: "auto" is on for CUDA (and for the CPU if `auto_on_cpu`);
    true/false hold on any device."""
    if value == "auto":
        return device.type == "cuda" or (auto_on_cpu and device.type == "cpu")
    return value


CHOICES = {"arch": ARCH_NAMES, "init": ("normal", "xavier", "default"), "device": ("auto", "cuda", "cpu"),
           "data_path": ("cpu", "gpu")}


def _check_type(key: str, value, source: str):
    """Return `value` as the field's type, or raise one clear UserError naming the key."""
    if key in AUTO_FIELDS:
        if not isinstance(value, bool) and value != "auto":
            raise UserError(f"{source}: '{key}' must be auto, true or false, got {value!r}")
        return value
    kind = type(FIELDS[key].default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{source}: '{key}' must be {kind.__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"{source}: '{key}' is {value!r}; allowed: {', '.join(CHOICES[key])}")
    return value


def config_path(name: str) -> Path:
    """`--config D` -> configs/D.yaml; anything that looks like a path is taken as one."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        return path
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown config {name!r}; available: {', '.join(available_configs())} "
                        f"(or a path to a .yaml file)")
    return path


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_yaml(path: Path) -> dict:
    """Read a config file; unknown keys and wrong types fail loudly (STYLE: fail on bad config)."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of config fields")
    for key, value in values.items():
        if key not in FIELDS:
            raise UserError(f"{path}: unknown key '{key}'; allowed keys: {', '.join(FIELDS)}")
        values[key] = _check_type(key, value, str(path))
    return values


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_auto_bool(text: str) -> bool | str:
    if text.lower() == "auto":
        return "auto"
    try:
        return _parse_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}") from None


# The flags evaluate.py shares with train.py: how to run, not what to train.
RUNTIME_FIELDS = ("device", "gpus", "workers", "bf16", "channels_last", "progress_every_s")


def get_args_parser(add_help: bool = False, default_config: str = "demo",
                    fields: tuple[str, ...] | None = None, shown_defaults: dict | None = None) -> argparse.ArgumentParser:
    """Flags for Config fields, each spelled `--field-name`, for use through `parents=[...]`.

    By default: --config plus every field (train.py). With `fields`: only those, and no --config
    (evaluate.py takes RUNTIME_FIELDS). Unset flags are absent from the namespace (SUPPRESS), so
    only what the user typed overrides the YAML file; read others with `runtime_value`.
    shown_defaults: the values `--help` shows as defaults (the chosen config file's), where they
    differ from the dataclass's.
    """
    parser = argparse.ArgumentParser(add_help=add_help, argument_default=argparse.SUPPRESS)
    if fields is None:
        parser.add_argument("--config", help=f"a name under configs/ ({', '.join(available_configs())}) or a "
                                             f"YAML path (default: {default_config}, the small CPU demo)")
    group = parser.add_argument_group("config fields (override the YAML file)" if fields is None
                                      else "runtime")
    shown_defaults = shown_defaults or {}
    for name, f in FIELDS.items():
        if fields is not None and name not in fields:
            continue
        kind = type(f.default)
        flag = "--" + name.replace("_", "-")
        default_text = f" (default: {shown_defaults.get(name, f.default)!r})"
        if name in AUTO_FIELDS:  # a bare `--bf16` is true, as for the other switches
            group.add_argument(flag, type=_parse_auto_bool, nargs="?", const=True, metavar="auto|BOOL",
                               help=f.metadata["help"] + default_text)
        elif kind is bool:
            group.add_argument(flag, type=_parse_bool, nargs="?", const=True, metavar="BOOL",
                               help=f.metadata["help"] + default_text)
        else:
            group.add_argument(flag, type=kind, metavar=name.upper(), choices=CHOICES.get(name),
                               help=f.metadata["help"] + default_text)
    return parser


def config_defaults(argv: list[str] | None, default_config: str = "demo") -> dict:
    """The values of the config file `argv` names with --config (or the default one), for `--help`;
    {} if it cannot be read (resolve_config then reports why)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default_config)
    known, _ = pre.parse_known_args(argv)
    try:
        values = load_yaml(config_path(known.config))
    except UserError:
        return {}
    values.setdefault("run_name", config_path(known.config).stem)
    return values


def runtime_value(args: argparse.Namespace, name: str):
    """A field's value from the command line, or the Config default when it was not given."""
    return getattr(args, name, FIELDS[name].default)


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults < YAML named by args.config < command-line values present in `args`."""
    config_name = getattr(args, "config", None)
    path = config_path(config_name or "demo")
    values = load_yaml(path)
    for name in FIELDS:
        if name in args:
            values[name] = _check_type(name, getattr(args, name), "command line")
    values.setdefault("run_name", path.stem)
    config = Config(**values)
    validate(config)
    if config_name is None and Path(config.data).resolve() != Path(FIELDS["data"].default).resolve():
        # `train.py --data /data/imagenet` alone would train the tiny demo net on ImageNet.
        raise UserError(f"--data {config.data} given without --config: the default config is the small CPU "
                        f"demo; pick a net, e.g. --config A (available: {', '.join(available_configs())})")
    return config


# Bounds on single fields, checked before any data scan or model build: (low, high, low_open, high_open)
# with None for no bound. An impossible value (lr 0, dropout 1.5, --workers -1) fails at once, in one line.
RANGES = {
    "width": (0, None, True, False), "fc_width": (1, None, False, False),
    "dropout": (0, 1, False, True), "crop_size": (32, None, False, False),
    "scale_min": (1, None, False, False), "scale_max": (1, None, False, False),
    "val_scale": (0, None, False, False), "color_shift_std": (0, None, False, False),
    "stats_images": (1, None, False, False), "workers": (0, None, False, False),
    "batch_size": (1, None, False, False), "lr": (0, None, True, False),
    "momentum": (0, 1, False, True), "weight_decay": (0, None, False, False),
    "lr_factor": (0, 1, True, True), "patience": (0, None, False, False),
    "max_lr_drops": (0, None, False, False), "epochs": (1, None, False, False),
    "steps_per_epoch": (0, None, False, False), "seed": (0, None, False, False),
    "gpus": (1, None, False, False), "checkpoint_every": (0, None, False, False),
    "log_every": (1, None, False, False), "progress_every_s": (0, None, False, False),
}


def _range_text(low, high, low_open, high_open) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_run_name(name: str) -> str:
    """A run name is one plain folder name: it must not be empty or climb out of --out-dir/--log-dir."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise UserError(f"run_name {name!r} must be a plain folder name (no '/', not empty, '.' or '..'): "
                        "runs are written to <out_dir>/<run_name>")
    return name


def validate(config: Config) -> None:
    """Checks a YAML type check cannot make: each field's range, then the cross-field ones."""
    for name, (low, high, low_open, high_open) in RANGES.items():
        value = getattr(config, name)
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise UserError(f"{name} must be {_range_text(low, high, low_open, high_open)}, got {value!r} "
                            f"(--{name.replace('_', '-')})")
    check_run_name(config.run_name)
    if config.scale_min > config.scale_max:
        raise UserError(f"scale_min ({config.scale_min}) must not exceed scale_max ({config.scale_max})")
    if config.scale_min < config.crop_size:
        raise UserError(f"scale_min ({config.scale_min}) must be at least crop_size ({config.crop_size}): "
                        "the random crop is taken from the rescaled image (§3.1)")
    if 0 < config.val_scale < config.crop_size:
        raise UserError(f"val_scale ({config.val_scale}) must be 0 (= S) or at least crop_size ({config.crop_size})")
    check_input_size(config.arch, config.crop_size)
    if config.batch_size % config.gpus:
        raise UserError(f"batch_size {config.batch_size} is the global batch; it must split evenly "
                        f"over {config.gpus} GPUs")


def ensure_writable_dir(path, flag: str) -> Path:
    """Create `path` (and parents) if needed and prove a file can be written there; UserError otherwise.

    Called before any data scan or model build, so an unwritable output place fails in a second, not
    after an hour of training or evaluation. (A permission check alone would not do: root passes it
    on a read-only file system.)
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written: {e.strerror or e}") from None
    return path


def check_output_dirs(config: Config) -> None:
    """The run folder and the TensorBoard folder must be writable (checked up front)."""
    ensure_writable_dir(Path(config.out_dir) / config.run_name, "--out-dir")
    ensure_writable_dir(Path(config.log_dir) / config.run_name, "--log-dir")
