"""What a run is built of (vgg/training/build.py builds it; run.py, folder.py and epochs.py read and update it).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from vgg.config import Config, speed_flag
from vgg.core.checkpoint import CheckpointWriter
from vgg.core.distributed import DistInfo
from vgg.data.batches.loaders import EpochSampler
from vgg.data.datasets import shards as vshards
from vgg.data.datasets import stats as vstats


@dataclass
class Speed:
    """The speed settings as they apply on this device: "auto" turns each on for CUDA only (they pay off
    there; channels-last on the CPU too); true turns it on for any device, so CI runs the CUDA
    configuration on its CPU."""
    bf16: bool
    channels_last: bool
    compile: bool

    @classmethod
    def of(cls, config: Config, device: torch.device) -> "Speed":
        return cls(bf16=speed_flag(config.bf16, device),
                   channels_last=speed_flag(config.channels_last, device, auto_on_cpu=True),
                   compile=speed_flag(config.compile, device))


@dataclass
class RunData:
    """The run's data (§3.1): uint8 crops from workers, the validation loader, this rank's epoch order."""
    stats: vstats.DatasetStats
    train_set: object
    val_set: object
    val_loader: object
    sampler: EpochSampler
    per_rank_batch: int
    steps_per_epoch: int
    train_files: dict | None = None  # what the epoch's order is built from (count, hash), kept in checkpoints

    @property
    def classes(self) -> list[str]:
        return self.train_set.classes

    @property
    def streamed(self) -> bool:  # WebDataset shards: one loader an epoch (vgg/data/datasets/shards.py)
        return isinstance(self.train_set, vshards.ShardStream)


@dataclass
class Net:
    raw: torch.nn.Module  # what checkpoints hold: unwrapped, uncompiled
    model: torch.nn.Module  # what trains: wrapped in DDP and compiled where asked
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau


@dataclass
class Position:
    """Where the run stands, as every checkpoint saves it."""
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps done within `epoch`
    best_top1: float = -1.0
    lr_drops: int = 0
    best: dict | None = None  # the best epoch's number and val errors (those of best.pt)
    epoch_sums: list[float] | None = None  # a mid-epoch save's metric sums of the epoch so far

    @classmethod
    def of(cls, ckpt: dict | None) -> "Position":
        if not ckpt:
            return cls()
        best = ckpt.get("best") if isinstance(ckpt.get("best"), dict) else None  # absent in older checkpoints
        return cls(ckpt["epoch"], ckpt["step"], ckpt["best_top1"], ckpt["lr_drops"], best, ckpt.get("epoch_sums"))


@dataclass
class RunFolder:
    """The run folder and what rank 0 writes there: checkpoints, metrics, skipped files, TensorBoard."""
    path: Path
    checkpoints: CheckpointWriter
    writer: SummaryWriter | None = None  # rank 0 only
    skipped_files: dict = field(default_factory=dict)  # path -> reason: every unreadable file of the run so far


@dataclass
class RunParts:
    """What a run is built of, once built: the steps below read and update it."""
    config: Config
    dist: DistInfo
    speed: Speed
    data: RunData
    net: Net
    position: Position
    folder: RunFolder
