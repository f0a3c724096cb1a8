"""A whole training run (paper §3.1): build everything from the config, loop over epochs, checkpoint.
"""

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from vgg.config import Config, speed_flag
from vgg.core.checkpoint import RESUME_KEYS, CheckpointWriter, load_checkpoint, rng_state
from vgg.core.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    is_main_process,
    main_process_first,
    shard_indices,
    wrap_ddp,
)
from vgg.core.errors import UserError, is_disk_full
from vgg.core.progress import get_logger
from vgg.core.runlock import RunLock
from vgg.data import folders as vfolders
from vgg.data import loaders as vloaders
from vgg.data import sample as vsample
from vgg.data import shards as vshards
from vgg.data import stats as vstats
from vgg.data.loaders import EpochSampler
from vgg.data.prepare import check_class_order
from vgg.data.transforms import CenterCropTransform, TrainTransform
from vgg.models.checkpoint import load_net_checkpoint
from vgg.models.zoo import build_net
from vgg.training.logs import (
    DASHBOARD_LAYOUT,
    NOT_IN_ROW,
    SKIPPED_LIST,
    hide_writer_thread_disk_full,
    log_augmented_images,
    log_epoch,
    read_skipped_list,
    write_skipped_list,
)
from vgg.training.loop import train_one_epoch, validate
from vgg.training.recipe import build_optimizer
from vgg.training.resume import (
    apply_resume_changes,
    check_checkpoint_fits_run,
    check_resume_checkpoint,
    drop_rows_to_rewrite,
    init_from_checkpoint,
    remove_stale_temp_files,
    restore_training_state,
    resume_changes,
)
from vgg.training.signals import StopFlag
from vgg.training.step import BatchAugment

log = get_logger()


def prepare_dataset(config: Config) -> Path:
    """The dataset root; the sample dataset and the digits set are generated on first use (rank 0 only)."""
    root = Path(config.data)
    if vshards.is_shard_dir(root):  # WebDataset shards: streamed (vgg/data/shards.py)
        return root
    generated = {Path(vsample.DEFAULT_ROOT).resolve(): vsample.make_sample_dataset,
                 Path(vsample.DIGITS_ROOT).resolve(): vsample.make_digits_dataset}
    if root.resolve() in generated:
        if is_main_process():
            generated[root.resolve()](root)
        barrier()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data folder {root / split} not found: --data must hold train/<wnid>/*.JPEG "
                            "and val/<wnid>/*.JPEG (see data/README.md)")
    return root


def load_stats(config: Config, train_dir: Path) -> vstats.DatasetStats:
    """Mean RGB and colour PCA (§2.1; AlexNet §4.1): computed once and cached, or supplied."""
    if config.stats == "imagenet":
        return vstats.IMAGENET_STATS
    if config.stats != "auto":
        path = Path(config.stats)
        if not path.is_file():
            raise UserError(f"stats file not found: {path} (use --stats auto or imagenet)")
        return vstats.read_stats_file(path)
    stats = None
    if is_main_process():
        shards = vshards.is_shard_dir(train_dir.parent)
        compute = vshards.load_or_compute_stats if shards else vstats.load_or_compute_stats
        stats = compute(train_dir, num_images=config.stats_images, seed=config.seed,
                        progress_every_s=config.progress_every_s)
    return broadcast_object(stats)


def build_train_loader(config: Config, train_set, sampler, batch_size: int, device: torch.device, *, seed: int):
    """uint8 training crops, decoded and augmented by CPU workers (default) or on the GPU (TorchCodec).

    Built once for the run, iterated once an epoch after `sampler.set_epoch(epoch, start)`. Either way
    each sample's draws come from sample_generator(config.seed, epoch, index) (bit-exact whatever the
    workers, processes or resume point); `seed` only seeds the loader's own generator. The CPU
    workers persist across epochs with the dataset copy they started with, so each index brings its
    epoch along (EpochTagged); the GPU loader is told it by `set_epoch`.
    """
    if config.data_path == "gpu":
        from vgg.data.gpu import build_gpu_train_loader  # needs TorchCodec; only imported when asked for

        return build_gpu_train_loader(train_set, batch_size=batch_size, device=device, crop_size=config.crop_size,
                                      scale_min=config.scale_min, scale_max=config.scale_max, seed=config.seed,
                                      epoch=sampler.epoch, workers=config.workers, sampler=sampler, drop_last=True)
    return vloaders.build_loader(train_set, batch_size=batch_size, sampler=vloaders.EpochTagged(sampler),
                              workers=config.workers, collate_fn=vloaders.collate_batch, seed=seed, drop_last=True)


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
    def streamed(self) -> bool:  # WebDataset shards: one loader an epoch (vgg/data/shards.py)
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


def run(config: Config, resume: str = "") -> dict:
    """Train as the config says; returns the final validation metrics. Raises UserError on bad input."""
    dist = init_distributed(config.device)
    stop = StopFlag()
    checkpoints = CheckpointWriter()
    try:
        with hold_run_folder(Path(config.out_dir) / config.run_name):
            try:
                return _run(config, resume, dist, stop, checkpoints)
            except OSError as e:  # metrics.jsonl, TensorBoard's event file, config.yaml (a checkpoint: its writer)
                if not is_disk_full(e):
                    raise
                folders = f"{Path(config.out_dir) / config.run_name} or {Path(config.log_dir) / config.run_name}"
                raise UserError(f"no space left on device while writing the run's files under {folders}: free "
                                "space, then --resume from its last checkpoint") from None
            finally:
                checkpoints.wait()  # the last save is on disk before this returns (and the process may exit)
    finally:
        stop.restore()
        cleanup_distributed()


@contextlib.contextmanager
def hold_run_folder(path: Path):
    """Rank 0 holds the run folder's lock (vgg/core/runlock.py) for the whole run, taken before anything is
    written there; every rank refuses, in one line, a folder that a live run (fresh or resumed) holds."""
    lock = refused = None
    if is_main_process():
        try:
            lock = RunLock(path)
        except UserError as e:
            refused = str(e)
    refused = broadcast_object(refused)
    if refused:
        raise UserError(refused)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _run(config: Config, resume: str, dist: DistInfo, stop: StopFlag, checkpoints: CheckpointWriter) -> dict:
    """§3.1 as named steps: where the run starts from, its data, the net and its optimizer, the epochs."""
    speed = Speed.of(config, dist.device)
    if config.batch_size % dist.world_size:
        raise UserError(f"the global batch {config.batch_size} does not split over {dist.world_size} processes")
    torch.backends.cudnn.benchmark = dist.device.type == "cuda" and config.cudnn_benchmark
    folder = RunFolder(Path(config.out_dir) / config.run_name, checkpoints)
    resume_path = find_resume_checkpoint(resume, folder.path)
    # Checkpoints are read and checked before any data scan: a refused file or setting costs seconds.
    ckpt = load_checkpoint(resume_path, require=RESUME_KEYS) if resume_path else None
    changes = resume_changes(config, ckpt, resume_path, dist.world_size) if ckpt else []
    if ckpt:
        check_resume_checkpoint(ckpt, resume_path, config)  # every field: a crafted one fails here, not mid-run
    source_ckpt = None if resume_path else read_init_checkpoint(config)
    data = build_data(config, ckpt, dist)
    net = build_net_and_optimizer(config, data, speed, dist)
    if ckpt:
        resume_from(ckpt, resume_path, net, changes, config, data.classes, data.steps_per_epoch)
    elif source_ckpt:
        copied = init_from_checkpoint(net.raw, source_ckpt, config.init_from, data.classes)
        log.info(f"initialised from {config.init_from}: copied {len(copied)} tensors: {', '.join(copied)}")
    net.model = wrap_for_speed(net.raw, speed, dist)
    parts = RunParts(config, dist, speed, data, net, Position.of(ckpt), folder)
    if is_main_process():
        open_run_folder(parts, resumed=ckpt is not None)
    val_metrics, last_step = train_epochs(parts, stop)
    if is_main_process():
        finish_run(parts, last_step)
    return val_metrics


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint `--resume` names (None: a fresh run); a fresh run refuses a folder holding one."""
    if resume == "if-exists":  # the SLURM templates' choice: a requeued job goes on, a new run name starts
        resume = "auto" if broadcast_object((run_dir / "last.pt").is_file()) else ""  # rank 0's view, for all
        restarts, job = os.environ.get("SLURM_RESTART_COUNT", "0"), os.environ.get("SLURM_JOB_ID", "?")
        requeued = f" (requeued job {job}, restart {restarts})" if restarts != "0" else ""
        log.info(f"resuming {run_dir / 'last.pt'}{requeued}" if resume else
                 f"starting fresh: no {run_dir / 'last.pt'} yet")
    if not resume:
        if (run_dir / "last.pt").exists():
            raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or a new --run-name")
        return None
    resume_path = run_dir / "last.pt" if resume == "auto" else Path(resume)
    if resume_path.is_dir():
        resume_path = resume_path / "last.pt"
    if not resume_path.is_file():
        raise UserError(f"nothing to resume: {resume_path} does not exist")
    return resume_path


def read_init_checkpoint(config: Config) -> dict | None:
    """The net a fresh run starts from (§3.1: deeper nets from net A, S=384 from S=256, jittered from S=384)."""
    if not config.init_from:
        return None
    if not Path(config.init_from).is_file():
        raise UserError(f"--init-from {config.init_from} not found: net {config.arch} starts from a trained "
                        "net (§3.1: deeper nets from net A, S=384 from S=256, jittered from S=384); train "
                        "that first, or pass --init-from PATH, or --init-from '' to start from scratch")
    return load_net_checkpoint(config.init_from)


def build_data(config: Config, ckpt: dict | None, dist: DistInfo) -> RunData:
    """Data (§3.1): the statistics (a resume keeps its own), both splits, this rank's order and batches."""
    per_rank_batch = config.batch_size // dist.world_size
    root = prepare_dataset(config)
    stats = vstats.DatasetStats.from_dict(ckpt["stats"]) if ckpt else load_stats(config, root / "train")
    if vshards.is_shard_dir(root):
        train_set, val_set = vshards.open_training_sets(config, rank=dist.rank, world_size=dist.world_size,
                                                        per_rank_batch=per_rank_batch)
    else:
        with main_process_first():  # rank 0 scans and caches the file lists; the other ranks read its cache
            train_set = vfolders.ImageFolder(root / "train", TrainTransform(
                crop_size=config.crop_size, scale_min=config.scale_min, scale_max=config.scale_max, seed=config.seed))
            val_set = vfolders.ImageFolder(root / "val", CenterCropTransform(scale=config.test_scale,
                                                                             crop_size=config.crop_size))
    check_class_order(train_set.classes, root / "train", warn=True)  # 1000 classes: index 0 must be n01440764
    if val_set.classes != train_set.classes:
        raise UserError(f"{root / 'val'} has {len(val_set.classes)} classes, {root / 'train'} has "
                        f"{len(train_set.classes)}: the class folders must be the same")
    vfolders.require_a_readable_image(val_set, getattr(val_set, "root", f"the validation shards of {root}"))
    train_files = train_set.fingerprint()
    check_training_set(ckpt, train_files)
    sampler = EpochSampler(len(train_set), seed=config.seed, rank=dist.rank, world_size=dist.world_size)
    steps_per_epoch = sampler.per_rank() // per_rank_batch
    if isinstance(train_set, vshards.ShardStream):  # every image once an epoch, the same steps on every rank
        steps_per_epoch = train_set.num_steps
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_set)} training images make no full batch of {per_rank_batch} per process")
    val_loader = vloaders.build_loader(
        torch.utils.data.Subset(val_set, shard_indices(len(val_set), dist.rank, dist.world_size)),
        batch_size=per_rank_batch, shuffle=False, workers=config.workers,
        collate_fn=vloaders.collate_batch, seed=config.seed)
    return RunData(stats, train_set, val_set, val_loader, sampler, per_rank_batch, steps_per_epoch, train_files)


def check_training_set(ckpt: dict | None, files: dict) -> None:
    """A mid-epoch resume deals the rest of the epoch's order, which was built from the training file
    list: with files added, removed or renamed since, some images would be trained twice and others
    not at all, so it is refused; at an epoch boundary the run goes on, with one line (issue 29)."""
    saved = ckpt.get("train_files") if ckpt else None
    if not isinstance(saved, dict) or saved == files:  # older checkpoints do not record it
        return
    what = (f"{saved.get('count')} training files then, {files['count']} now" if saved.get("count") != files["count"]
            else f"{files['count']} training files then and now, a different list")
    if ckpt["step"]:
        raise UserError(f"the training set changed since the checkpoint of epoch {ckpt['epoch']} step {ckpt['step']} "
                        f"({what}): the rest of that epoch would train some images twice and skip others; put the "
                        "files back, or resume from a checkpoint saved at an epoch's end")
    log.info(f"the training set changed since the checkpoint ({what}): epoch {ckpt['epoch']} on is dealt from the new list")


def build_net_and_optimizer(config: Config, data: RunData, speed: Speed, dist: DistInfo) -> Net:
    """The net (Table 1) with N(0, 0.01^2) or Glorot init (§3.1), SGD and the plateau schedule."""
    torch.manual_seed(config.seed)
    model = build_net(config.arch, num_classes=len(data.classes), width=config.width, fc_width=config.fc_width,
                      image_size=config.crop_size, dropout=config.dropout, init=config.init)
    # On the device before the optimizer exists: its loaded state (momentum) follows the parameters.
    model.to(dist.device)
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.lr_factor, patience=config.patience)
    return Net(model, model, optimizer, scheduler)


def resume_from(ckpt: dict, path: Path, net: Net, changes, config: Config, classes: list[str],
                steps_per_epoch: int) -> None:
    """The checkpoint's weights, optimizer and schedule, with the changed flags applied (Position.of reads
    its place in the run)."""
    if ckpt["arch"] != net.raw.arch_kwargs() or ckpt["classes"] != classes:
        raise UserError(f"{path} was trained as {ckpt['arch']} on {len(ckpt['classes'])} "
                        f"classes, not as this run's {net.raw.arch_kwargs()}")
    check_checkpoint_fits_run(ckpt, path, net.optimizer, steps_per_epoch)
    restore_training_state(ckpt, path, net.raw, net.optimizer, net.scheduler)
    apply_resume_changes(changes, net.optimizer, net.scheduler, config)
    log.info(f"resumed {path} at epoch {ckpt['epoch']}, step {ckpt['step']} (lr "
             f"{net.optimizer.param_groups[0]['lr']:g}, {ckpt['lr_drops']} lr drops so far)")


def wrap_for_speed(model: torch.nn.Module, speed: Speed, dist: DistInfo) -> torch.nn.Module:
    if dist.distributed:
        model = wrap_ddp(model, dist)
    return torch.compile(model) if speed.compile else model


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


def open_run_folder(parts: RunParts, resumed: bool) -> None:
    """Rank 0: the folder, its config.yaml, the skipped files so far, the TensorBoard writer, the first lines."""
    config, folder = parts.config, parts.folder
    folder.path.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(folder.path)
    config_text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    (folder.path / "config.yaml").write_text(config_text)
    if resumed and (folder.path / SKIPPED_LIST).is_file():
        folder.skipped_files = read_skipped_list(folder.path / SKIPPED_LIST)
    if resumed:  # each epoch's row once: those the resumed run trains again go
        drop_rows_to_rewrite(folder.path / "metrics.jsonl", parts.position.epoch)
    # Every scalar's x axis is the global optimizer step. Events after the step this run starts
    # from (those logged before an interruption, or by a run resumed from a later checkpoint)
    # are dropped when TensorBoard reads the folder, as this run logs those steps again: no curve
    # shows a doubled segment. A fresh run drops everything a former run left in the folder.
    last_step = parts.position.epoch * parts.data.steps_per_epoch + parts.position.step
    hide_writer_thread_disk_full()
    folder.writer = SummaryWriter(str(Path(config.log_dir) / config.run_name),
                                  purge_step=last_step + 1 if resumed else 0)
    folder.writer.add_custom_scalars(DASHBOARD_LAYOUT)
    folder.writer.add_text("config", "```\n" + config_text + "```", 0)
    data, device, speed = parts.data, parts.dist.device, parts.speed
    log.info(f"net {config.arch}: {sum(p.numel() for p in parts.net.raw.parameters()):,} parameters, "
             f"{len(data.classes)} classes, {len(data.train_set)} train / {len(data.val_set)} val images, "
             f"{data.steps_per_epoch} steps/epoch of {config.batch_size} on {parts.dist.world_size} x {device.type}")
    log.info(f"speed settings on {device.type}: bf16 autocast {_on_off(speed.bf16)}, channels-last "
             f"{_on_off(speed.channels_last)}, torch.compile {_on_off(speed.compile)}")
    log.info(f"run folder {folder.path}; TensorBoard: tensorboard --logdir {config.log_dir}")


def save(parts: RunParts, name: str, epoch: int, step: int, epoch_sums: list[float] | None = None) -> None:
    """One checkpoint (vgg/core/checkpoint.py), written by rank 0 in the background. epoch_sums: the metric
    sums of a part-done epoch's steps 0..step-1, so its row covers it all. Every rank calls it: each one's RNG
    state goes in (its dropout masks are its own, and the ranks' streams part as soon as their batches do:
    a batch that lost an unreadable file draws fewer), so a resume gives each rank back its own."""
    rngs = gather_objects(rng_state())
    if not is_main_process():
        return
    net, position = parts.net, parts.position
    parts.folder.checkpoints.save(
        parts.folder.path / name, model=net.raw.state_dict(), arch=net.raw.arch_kwargs(),
        optimizer=net.optimizer.state_dict(), scheduler=net.scheduler.state_dict(), epoch=epoch, step=step,
        lr_drops=position.lr_drops, world_size=parts.dist.world_size, rng=rngs[0],
        rank_rng=rngs if len(rngs) > 1 else None,
        config=parts.config.to_dict(), stats=parts.data.stats.to_dict(), classes=parts.data.classes,
        best_top1=position.best_top1, best=position.best, epoch_sums=epoch_sums, train_files=parts.data.train_files)


def train_epochs(parts: RunParts, stop: StopFlag) -> tuple[dict, int]:
    """Epochs until the plateau schedule ends the run (§3.1) or `epochs`; the last val metrics and the
    global step of the last optimizer step done."""
    config, data, dist, position = parts.config, parts.data, parts.dist, parts.position
    start_epoch, start_step = position.epoch, position.step
    last_step = start_epoch * data.steps_per_epoch + start_step
    train_loader = None
    if not data.streamed:
        train_loader = build_train_loader(config, data.train_set, data.sampler, data.per_rank_batch, dist.device,
                                          seed=config.seed * 1_000_003 + start_epoch * 1_009 + dist.rank)
    augment = BatchAugment(data.stats, dist.device, config.color_shift_std, channels_last=parts.speed.channels_last)
    val_metrics, batches = {}, None
    for epoch in range(start_epoch, config.epochs):
        if batches is None:  # the run's first epoch; later ones were started before the last validation
            train_loader = epoch_loader(parts, train_loader, epoch)
            if parts.folder.writer is not None and start_step == 0 and epoch == 0:
                log_augmented_images(parts.folder.writer, train_loader, augment)
            batches = iter(train_loader)
        train_metrics = train_epoch(parts, batches, augment, epoch, stop)
        batches = None
        if epoch + 1 < config.epochs:
            # The next epoch's order is known: its loader workers start reading and decoding now, while
            # this epoch validates, so its first steps do not wait for them (issue 25). (Every draw
            # depends on the seed, the epoch and the image only, and the loader has its own generator:
            # the numbers and the RNG state the checkpoints save are those of starting it after.)
            train_loader = epoch_loader(parts, train_loader, epoch + 1)
            batches = iter(train_loader)
        val_metrics, epoch_lr, next_lr, improved = validate_and_schedule(parts, augment, epoch)
        if improved:
            save(parts, "best.pt", epoch + 1, 0)
        save(parts, "last.pt", epoch + 1, 0)
        last_step = (epoch + 1) * data.steps_per_epoch
        record_epoch(parts, epoch, last_step, epoch_lr, next_lr, train_metrics, val_metrics)
        if position.lr_drops > config.max_lr_drops:
            log.info(f"val top-1 plateaued after {config.max_lr_drops} lr drops: training ends (§3.1)")
            break
    return val_metrics, last_step


def epoch_loader(parts: RunParts, train_loader, epoch: int):
    """The training loader told its epoch (and where in it a resumed run starts): the sampler's order, a
    shard stream's own loader (one an epoch), the GPU path's draws."""
    config, data, dist, position = parts.config, parts.data, parts.dist, parts.position
    data.sampler.set_epoch(epoch, start=position.step * data.per_rank_batch)  # (read by the loader's next pass)
    if data.streamed:  # a shard stream learns its epoch before its workers copy it: one loader an epoch
        train_loader = data.train_set.loader(epoch=epoch, start_step=position.step,
                                             seed=config.seed * 1_000_003 + epoch * 1_009 + dist.rank)
    if config.data_path == "gpu":
        train_loader.set_epoch(epoch)
    return train_loader


def train_epoch(parts: RunParts, batches, augment: BatchAugment, epoch: int, stop: StopFlag) -> dict:
    """One epoch's training from the run's position; a stop request (a signal on any rank) saves at the
    step every rank stopped at and exits 128 + the signal."""
    config, position = parts.config, parts.position
    met = []  # this rank's unreadable files of the epoch so far, which the loop adds to

    def save_mid_epoch(step: int, sums: list[float]) -> None:
        # The files met so far go into skipped.txt with the save: the resumed run never meets them again.
        unreadable = gather_objects(met)
        if is_main_process():
            list_skipped_files(parts.folder, unreadable)
        save(parts, "last.pt", epoch, step, sums)

    train_metrics = train_one_epoch(
        parts.net.model, batches, parts.net.optimizer, augment, epoch=epoch,
        num_steps=parts.data.steps_per_epoch, start_step=position.step, bf16=parts.speed.bf16,
        log_every=config.log_every, checkpoint_every=config.checkpoint_every, stop_requested=stop,
        writer=parts.folder.writer, on_checkpoint=save_mid_epoch, unreadable=met,
        carried_sums=position.epoch_sums, progress_every_s=config.progress_every_s)
    position.step, position.epoch_sums = 0, None
    if train_metrics["interrupted"]:
        save_mid_epoch(train_metrics["step"], train_metrics["sums"])
        code = stop.exit_code()
        log.warning(f"stopped at epoch {epoch} step {train_metrics['step']}; saved {parts.folder.path / 'last.pt'}; "
                    f"continue with --resume (exit code {code})")
        raise SystemExit(code)
    return train_metrics


def validate_and_schedule(parts: RunParts, augment: BatchAugment, epoch: int) -> tuple[dict, float, float, bool]:
    """Validation, then the plateau schedule (§3.1: the lr ÷10 when val accuracy stops improving) and the
    best epoch. Returns the val metrics, the lr the epoch trained with, the next one, and whether it improved."""
    net, position = parts.net, parts.position
    # Nets with buffers (batch norm) validate unwrapped: DDP would broadcast them in every forward,
    # a collective the ranks' unequal validation shards could not match.
    eval_model = net.raw if any(True for _ in net.raw.buffers()) else net.model
    val_metrics = validate(eval_model, parts.data.val_loader, augment, bf16=parts.speed.bf16,
                           progress_every_s=parts.config.progress_every_s)
    epoch_lr = net.optimizer.param_groups[0]["lr"]  # the lr this epoch trained with
    net.scheduler.step(val_metrics["top1"])
    next_lr = net.optimizer.param_groups[0]["lr"]
    if next_lr < epoch_lr:  # counted when made: a resumed --lr is no drop
        position.lr_drops += 1
    improved = val_metrics["top1"] > position.best_top1
    position.best_top1 = max(position.best_top1, val_metrics["top1"])
    if improved:
        position.best = {"epoch": epoch, "val_top1_err": val_metrics["top1_err"],
                         "val_top5_err": val_metrics["top5_err"]}
    return val_metrics, epoch_lr, next_lr, improved


def record_epoch(parts: RunParts, epoch: int, last_step: int, epoch_lr: float, next_lr: float, train_metrics: dict,
                 val_metrics: dict) -> None:
    """The epoch's row in metrics.jsonl and TensorBoard, its console line, and every rank's unreadable files
    in skipped.txt. lr: the one this epoch trained with; lr_drops: the drops made so far, this epoch's
    plateau check included (so an epoch that triggers a drop shows its own lr and the new count)."""
    config, folder = parts.config, parts.folder
    row = {"epoch": epoch, "lr": epoch_lr, "lr_drops": parts.position.lr_drops,
           **{f"train_{k}": v for k, v in train_metrics.items() if k not in NOT_IN_ROW},
           **{f"val_{k}": v for k, v in val_metrics.items() if k not in NOT_IN_ROW}}
    unreadable = gather_objects(train_metrics["unreadable"] + val_metrics["unreadable"])  # one gather an epoch
    if not is_main_process():
        return
    with open(folder.path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    log_epoch(folder.writer, last_step, row, parts.dist.device)
    dropped = (f", dropped to {next_lr:g} (lr drop {parts.position.lr_drops} of {config.max_lr_drops})"
               if next_lr < epoch_lr else "")
    log.info(f"epoch {epoch}: train loss {train_metrics['loss']:.3f}, top-1 err "
             f"{train_metrics['top1_err']:.1f}% | val top-1 err {val_metrics['top1_err']:.1f}%, "
             f"top-5 err {val_metrics['top5_err']:.1f}% | {train_metrics['images_per_s']:.0f} img/s | "
             f"lr {epoch_lr:g}{dropped}")
    list_skipped_files(folder, unreadable)


def list_skipped_files(folder: RunFolder, unreadable: list[list]) -> None:
    """Rank 0: every rank's unreadable files (gather_objects of each rank's list) into skipped.txt. Said once
    per file: a line only when files the list does not hold yet were met (each epoch's count is in its
    row); validation meets the same unreadable files every epoch."""
    found = {f.path: f.reason for rank_files in unreadable for f in rank_files}
    new = found.keys() - folder.skipped_files.keys()
    if new:
        folder.skipped_files.update(found)
        write_skipped_list(folder.path / SKIPPED_LIST, folder.skipped_files)
        log.info(f"{len(new)} unreadable files met for the first time, {len(folder.skipped_files)} in all; "
                 f"list in {folder.path / SKIPPED_LIST}")


def finish_run(parts: RunParts, last_step: int) -> None:
    """Rank 0: the hyper-parameters beside the best epoch's errors (those of best.pt, which evaluation
    starts from) in TensorBoard, and the run's last line."""
    best, best_top1 = parts.position.best, parts.position.best_top1
    if best is not None:
        final = {"hparam/val_top1_err": best["val_top1_err"], "hparam/val_top5_err": best["val_top5_err"],
                 "hparam/best_epoch": best["epoch"]}
    else:  # resumed from a checkpoint that kept only the best accuracy
        final = {"hparam/val_top1_err": 100 - best_top1}
    hparams = {k: v for k, v in parts.config.to_dict().items() if isinstance(v, (int, float, str, bool))}
    writer = parts.folder.writer
    writer.flush()  # a failed event write (a full disk) is raised by flush; close would drop it unsaid
    writer.add_hparams(hparams, final, run_name=".", global_step=last_step)  # purged on resume, like the rest
    writer.close()
    where = f" (epoch {best['epoch']})" if best is not None else ""
    log.info(f"done: best val top-1 err {100 - best_top1:.1f}%{where}; checkpoints in {parts.folder.path}")


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"
