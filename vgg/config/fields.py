"""The run configuration as data: one dataclass whose defaults are the paper's values (§3.1), the
allowed values and ranges of each field, and the check a whole config must pass.
"""

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from vgg.core.distributed import usable_cpus
from vgg.core.errors import MAX_SEED, UserError, check_ranges_in
from vgg.models.zoo import ARCH_NAMES, check_input_size  # VGG A-E and the neighbours of Table 7


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


# Bounds on single fields, checked before any data scan or model build: (low, high, low_open, high_open)
# with None for no bound. An impossible value (lr 0, dropout 1.5, --workers -1) fails at once, in one line,
# and so does an absurd one (--seed 99999999999999999999999 overflowed torch's seed): every number has an
# upper bound too, far above any sensible run; below it, a size memory cannot hold is the out-of-memory line.
MAX_PIXELS = 100_000  # image sides: scales and crops (the paper's largest is 512; a side of 10^5 takes
# ~40 GB an image: the out-of-memory line, tests/test_hardening_cli.py; beyond, sizes overflow)
MAX_COUNT = 10**9  # steps, intervals
RANGES = {
    "width": (0, 16, True, False), "fc_width": (1, 10**8, False, False),
    "dropout": (0, 1, False, True), "crop_size": (32, MAX_PIXELS, False, False),
    "scale_min": (1, MAX_PIXELS, False, False), "scale_max": (1, MAX_PIXELS, False, False),
    "val_scale": (0, MAX_PIXELS, False, False), "color_shift_std": (0, 10, False, False),
    "stats_images": (1, 10**7, False, False), "workers": (0, 1024, False, False),
    "batch_size": (1, 2**20, False, False), "lr": (0, 10, True, False),
    "momentum": (0, 1, False, True), "weight_decay": (0, 1, False, False),
    "lr_factor": (0, 1, True, True), "patience": (0, 1000, False, False),
    "max_lr_drops": (0, 100, False, False), "epochs": (1, 100_000, False, False),
    "steps_per_epoch": (0, MAX_COUNT, False, False), "seed": (0, MAX_SEED, False, False),
    "gpus": (1, 1024, False, False), "checkpoint_every": (0, MAX_COUNT, False, False),
    "log_every": (1, MAX_COUNT, False, False), "progress_every_s": (0, 7 * 86400, False, False),
}
# DataLoader workers per usable core, all processes on the machine together: each worker is a process
# with the dataset's file list and its batches in memory, so `--workers 1000` is OOM-killed under a job's
# memory limit, without a word, long before it could help. 8 per process (the default's cap) always passes.
WORKERS_PER_CORE = 4


def check_ranges(values: dict) -> None:
    """Each field of `values` (name -> value) that has a range must lie in it (one UserError naming the flag)."""
    check_ranges_in(values, RANGES)
    if "workers" in values:
        check_workers(values["workers"], values.get("gpus", 1))


def check_workers(workers: int, gpus: int) -> None:
    """At most WORKERS_PER_CORE data-loading workers per usable core over this machine's processes
    (--gpus, or the LOCAL_WORLD_SIZE torchrun sets), and 8 a process whatever the cores."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    processes = max(gpus, int(local) if local.isdigit() else 1, 1)
    cores = usable_cpus()
    limit = max(8, WORKERS_PER_CORE * cores // processes)
    if workers > limit:
        raise UserError(f"--workers {workers} is too many for {cores} usable core(s) and {processes} process(es): "
                        f"at most {limit} a process ({WORKERS_PER_CORE} a core; each worker is a process "
                        "holding batches in memory)")


def check_run_name(name: str) -> str:
    """A run name is one plain folder name: it must not be empty or climb out of --out-dir/--log-dir."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise UserError(f"run_name {name!r} must be a plain folder name (no '/', not empty, '.' or '..'): "
                        "runs are written to <out_dir>/<run_name>")
    return name


def validate(config: Config) -> None:
    """Checks a YAML type check cannot make: each field's range, then the cross-field ones."""
    check_ranges({name: getattr(config, name) for name in RANGES})
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
