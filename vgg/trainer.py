"""A whole training run (paper §3.1): build everything from the config, loop over epochs, checkpoint.

The per-epoch loops live in vgg/engine.py; this module wires data, net, optimizer, plateau
schedule, warm start, resume, TensorBoard and checkpoints together.
"""

import json
import math
import os
import signal
from pathlib import Path

import torch
import yaml
from torch.utils.data import Sampler
from torch.utils.tensorboard import SummaryWriter

from vgg import data as vdata
from vgg import sample_data
from vgg import shards as vshards
from vgg.checkpoint import (RESUME_KEYS, CheckpointWriter, build_model_from_checkpoint, load_checkpoint,
                            load_model_state, rng_state, set_rng_state)
from vgg.config import Config, speed_flag
from vgg.distributed import (DistInfo, all_reduce_max, barrier, broadcast_object, cleanup_distributed, gather_objects,
                             get_logger, init_distributed, is_main_process, main_process_first, shard_indices,
                             wrap_ddp)
from vgg.engine import BatchAugment, train_one_epoch, validate
from vgg.errors import UserError
from vgg.models import warm_start
from vgg.prepare import check_class_order
from vgg.zoo import VGG_ARCHS, build_net
from vgg.transforms import CenterCropTransform, TrainCrop, TrainTransform

log = get_logger()


class EpochSampler(Sampler):
    """This rank's share of a per-epoch shuffle, optionally starting part-way (mid-epoch resume).

    The order depends only on (seed, epoch): like DistributedSampler, the permutation is padded to
    a multiple of the world size and dealt out rank by rank; `set_epoch(epoch, start)` also skips
    the first `start` indices of this rank's share, so a resumed epoch sees exactly the images the
    interrupted one had not reached.
    """

    def __init__(self, num_items: int, *, seed: int, rank: int, world_size: int):
        self.num_items, self.seed, self.rank, self.world_size = num_items, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return math.ceil(self.num_items / self.world_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g).tolist()
        order += order[: self.per_rank() * self.world_size - len(order)]
        return iter(order[self.rank :: self.world_size][self.start :])

    def __len__(self) -> int:
        return self.per_rank() - self.start


def prepare_dataset(config: Config) -> Path:
    """The dataset root; the sample dataset and the digits set are generated on first use (rank 0 only)."""
    root = Path(config.data)
    if vshards.is_shard_dir(root):  # WebDataset shards: streamed (vgg/shards.py)
        return root
    generated = {Path(sample_data.DEFAULT_ROOT).resolve(): sample_data.make_sample_dataset,
                 Path(sample_data.DIGITS_ROOT).resolve(): sample_data.make_digits_dataset}
    if root.resolve() in generated:
        if is_main_process():
            generated[root.resolve()](root)
        barrier()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data folder {root / split} not found: --data must hold train/<wnid>/*.JPEG "
                            "and val/<wnid>/*.JPEG (see data/README.md)")
    return root


def load_stats(config: Config, train_dir: Path) -> vdata.DatasetStats:
    """Mean RGB and colour PCA (§2.1; AlexNet §4.1): computed once and cached, or supplied."""
    if config.stats == "imagenet":
        return vdata.IMAGENET_STATS
    if config.stats != "auto":
        path = Path(config.stats)
        if not path.is_file():
            raise UserError(f"stats file not found: {path} (use --stats auto or imagenet)")
        return vdata.DatasetStats.from_dict(json.loads(path.read_text()))
    stats = None
    if is_main_process():
        shards = vshards.is_shard_dir(train_dir.parent)
        compute = vshards.load_or_compute_stats if shards else vdata.load_or_compute_stats
        stats = compute(train_dir, num_images=config.stats_images, seed=config.seed,
                        progress_every_s=config.progress_every_s)
    return broadcast_object(stats)


def init_from_checkpoint(model, source_ckpt: dict, path: str, classes: list[str]) -> list[str]:
    """§3.1: a deeper net warm-starts from net A; a re-scaled net (S=384, jitter) from its own kind."""
    source_arch = source_ckpt["arch"]
    if source_ckpt.get("classes") and source_ckpt["classes"] != classes:  # (torchvision's weights name none)
        raise UserError(f"--init-from {path}: its {len(source_ckpt.get('classes', []))} classes differ "
                        f"from this dataset's {len(classes)}")
    source = build_model_from_checkpoint(source_ckpt, path)
    if source_arch["name"] == model.arch_name:
        if source_arch != model.arch_kwargs():
            raise UserError(f"--init-from {path}: net {source_arch} does not match this run's "
                            f"{model.arch_kwargs()}")
        load_model_state(model, source.state_dict(), path)
        return list(model.state_dict())
    if source_arch["name"] != "A" or model.arch_name not in VGG_ARCHS:  # §3.1's warm start is VGG's alone
        raise UserError(f"--init-from {path} holds net {source_arch['name']}; net {model.arch_name} "
                        "warm-starts from net A or from a net of its own kind")
    return warm_start(model, source)


def build_train_loader(config: Config, train_set, sampler, batch_size: int, device: torch.device, *, seed: int):
    """uint8 training crops, decoded and augmented by CPU workers (default) or on the GPU (TorchCodec).

    Built once for the run, iterated once an epoch after `sampler.set_epoch(epoch, start)`. Either way
    each sample's draws come from sample_generator(config.seed, epoch, index) (bit-exact whatever the
    workers, processes or resume point); `seed` only seeds the loader's own generator. The CPU
    workers persist across epochs with the dataset copy they started with, so each index brings its
    epoch along (EpochTagged); the GPU loader is told it by `set_epoch`.
    """
    if config.data_path == "gpu":
        from vgg.gpu_data import build_gpu_train_loader  # needs TorchCodec; only imported when asked for

        return build_gpu_train_loader(train_set, batch_size=batch_size, device=device, crop_size=config.crop_size,
                                      scale_min=config.scale_min, scale_max=config.scale_max, seed=config.seed,
                                      epoch=sampler.epoch, workers=config.workers, sampler=sampler, drop_last=True)
    return vdata.build_loader(train_set, batch_size=batch_size, sampler=vdata.EpochTagged(sampler),
                              workers=config.workers, collate_fn=vdata.collate_batch, seed=seed, drop_last=True)


def _is_decayed(model, config: Config):
    """name -> whether weight decay applies: to weights always, to biases and batch-norm parameters by choice."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters()}
    return lambda name, p: (config.norm_decay if id(p) in norm_params
                            else config.bias_decay or not name.endswith("bias"))


def build_optimizer(model, config: Config) -> torch.optim.SGD:
    """SGD, momentum 0.9, weight decay 5e-4 (§3.1); decay on biases (and batch-norm parameters, for
    the nets that have them) is a config choice.

    Built after the model is on its device: the update is one fused kernel there (CUDA and CPU), or
    one batched (foreach) update elsewhere; either is the same arithmetic as the plain per-tensor loop.
    """
    is_decayed = _is_decayed(model, config)
    decay = [p for n, p in model.named_parameters() if is_decayed(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not is_decayed(n, p)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           **sgd_kernel(next(model.parameters()).device))


FUSED_SGD_DEVICES = ("cuda", "cpu")  # where torch has a fused SGD kernel for float parameters


def sgd_kernel(device: torch.device) -> dict:
    """SGD's fused or foreach flag for parameters on `device` (kept across resume: see restore_training_state)."""
    return {"fused": True} if device.type in FUSED_SGD_DEVICES else {"foreach": True}


# How `--resume` treats a setting that differs from the checkpoint's config (see resume_changes).
RESUME_APPLIED = ("lr", "momentum", "weight_decay", "patience", "max_lr_drops", "epochs",
                  "workers", "data_path", "data", "device", "bf16", "compile", "channels_last", "cudnn_benchmark",
                  "log_every", "checkpoint_every", "log_dir", "out_dir", "run_name", "progress_every_s")
RESUME_AT_EPOCH_BOUNDARY = ("batch_size", "gpus", "world_size", "steps_per_epoch")


def resume_changes(config: Config, ckpt: dict, path: Path, world_size: int) -> list[tuple[str, object, object]]:
    """The settings that differ from the checkpoint's, as (field, old, new); UserError for any that may not.

    Per field, never silently:
    - applied from now on, each logged as "lr 0.01 -> 0.005 on resume": the optimisation settings lr
      (the optimizer's current lr is set to it; the count of plateau drops is kept), momentum,
      weight_decay, patience, max_lr_drops, epochs; and how/where the run executes and writes:
      workers, data_path, data (a moved dataset), device, bf16, compile, channels_last,
      cudnn_benchmark, log_every, checkpoint_every, log_dir, out_dir, run_name (continue in a new
      folder), progress_every_s;
    - batch_size, gpus, the number of processes and steps_per_epoch: applied at an epoch boundary,
      refused for a mid-epoch checkpoint (the resumed epoch would re-train or skip images);
    - everything else (arch, width, fc_width, dropout, init, init_from, crop and scales, val_scale,
      stats, stats_images, color_shift_std, lr_factor, bias_decay, seed): refused, since it defines
      the run; one error lists every such field with old and new values.
    """
    saved = dict(ckpt["config"], world_size=ckpt.get("world_size", world_size))
    current = dict(config.to_dict(), world_size=world_size)
    changes = [(name, saved.get(name), value) for name, value in current.items() if saved.get(name) != value]
    mid_epoch = ckpt["step"] > 0
    refused = [c for c in changes if c[0] not in RESUME_APPLIED
               and (mid_epoch or c[0] not in RESUME_AT_EPOCH_BOUNDARY)]
    if refused:
        listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in refused)
        boundary = (f"; batch size, processes and steps per epoch change only at an epoch boundary (it is at "
                    f"epoch {ckpt['epoch']}, step {ckpt['step']})" if mid_epoch else "")
        raise UserError(f"cannot resume {path} with changed {listed}: may change on resume: "
                        f"{', '.join(RESUME_APPLIED)}{boundary}; train under a new --run-name to change the rest")
    return changes


def apply_resume_changes(changes, optimizer, scheduler, config: Config) -> None:
    """Put the changed optimisation settings into the restored optimizer and scheduler, and log each change."""
    restored_lr = optimizer.param_groups[0]["lr"]
    for name, old, new in changes:
        note = f" (the optimizer's lr was {restored_lr:g})" if name == "lr" and restored_lr != old else ""
        log.info(f"{name} {old} -> {new} on resume{note}")
        if name == "lr":  # unchanged, the restored (maybe already dropped) lr stays
            for group in optimizer.param_groups:
                group["lr"] = config.lr
    for group in optimizer.param_groups:
        group["momentum"] = config.momentum
    optimizer.param_groups[0]["weight_decay"] = config.weight_decay  # group 1, if any: biases, no decay
    scheduler.patience = config.patience


def restore_training_state(ckpt: dict, path: Path, model, optimizer, scheduler) -> None:
    """Weights, optimizer and scheduler state and RNGs from a resume checkpoint; one line if they do not fit."""
    load_model_state(model, ckpt["model"], path)
    kernel = sgd_kernel(next(model.parameters()).device)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])  # (its saved groups carry the saving run's kernel flags)
        for group in optimizer.param_groups:
            group.update({"fused": None, "foreach": None, **kernel})
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"{path}: its optimizer, scheduler or RNG state does not fit this run: "
                        f"{type(e).__name__}: {reason}") from None


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of saves killed mid-write (`kill -9`): as big as a checkpoint and of no use."""
    stale = list(run_dir.glob("*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info(f"removed {len(stale)} stale temp file(s) of an interrupted save from {run_dir}")


# The signals that ask a run to stop at its next sync point, save last.pt and exit with 128 + signal:
# Ctrl-C; SIGTERM (kill, and SLURM's preemption or scancel); SIGUSR1 (the warning SLURM sends before
# the time limit, as scripts/slurm/ ask for it: that exit, 138, means "requeue me").
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """A STOP_SIGNALS signal asks the loop to stop at its next sync point, save, and exit cleanly.

    One rank's signal is enough: the loop agrees on the stop at every sync point, and `exit_code`
    agrees on the signal. DataLoader workers are forked with this handler installed, and Ctrl-C signals
    the terminal's whole process group (as SLURM's signals reach every process of a job step): the
    handler acts in the process that installed it only (workers ignore the signal; the main process
    shuts them down), so the message is printed once.
    """

    def __init__(self):
        self.signal = None
        self.pid = os.getpid()
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker
            return
        if self.signal is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop right away
                raise KeyboardInterrupt
            return  # (a batch script's forwarded USR1 and SLURM's own, say: one stop is enough)
        self.signal = signum
        log.warning(f"{signal.Signals(signum).name} received: saving a checkpoint at the next step, then stopping")

    def __call__(self) -> bool:
        return self.signal is not None

    def exit_code(self) -> int:
        """128 + the signal, the same on every rank (the highest any rank got; SIGINT on none): called by
        every rank once the loop has agreed to stop, so a rank that got no signal exits like the one that did."""
        return 128 + all_reduce_max(int(self.signal or signal.SIGINT))


def run(config: Config, resume: str = "") -> dict:
    """Train as the config says; returns the final validation metrics. Raises UserError on bad input."""
    dist = init_distributed(config.device)
    stop = StopFlag()
    checkpoints = CheckpointWriter()
    try:
        try:
            return _run(config, resume, dist, stop, checkpoints)
        finally:
            checkpoints.wait()  # the last save is on disk before this returns (and the process may exit)
    finally:
        stop.restore()
        cleanup_distributed()


def _run(config: Config, resume: str, dist: DistInfo, stop: StopFlag, checkpoints: CheckpointWriter) -> dict:
    device, on_cuda = dist.device, dist.device.type == "cuda"
    # "auto" turns each on for CUDA only (they pay off there); true turns it on for any device, so CI
    # runs the CUDA configuration on its CPU.
    bf16 = speed_flag(config.bf16, device)
    channels_last = speed_flag(config.channels_last, device, auto_on_cpu=True)
    compile_net = speed_flag(config.compile, device)
    if config.batch_size % dist.world_size:
        raise UserError(f"the global batch {config.batch_size} does not split over {dist.world_size} processes")
    per_rank_batch = config.batch_size // dist.world_size
    torch.backends.cudnn.benchmark = on_cuda and config.cudnn_benchmark
    run_dir = Path(config.out_dir) / config.run_name

    if resume == "if-exists":  # the SLURM templates' choice: a requeued job goes on, a new run name starts
        resume = "auto" if broadcast_object((run_dir / "last.pt").is_file()) else ""  # rank 0's view, for all
        restarts, job = os.environ.get("SLURM_RESTART_COUNT", "0"), os.environ.get("SLURM_JOB_ID", "?")
        requeued = f" (requeued job {job}, restart {restarts})" if restarts != "0" else ""
        log.info(f"resuming {run_dir / 'last.pt'}{requeued}" if resume else
                 f"starting fresh: no {run_dir / 'last.pt'} yet")
    resume_path = None
    if resume:
        resume_path = run_dir / "last.pt" if resume == "auto" else Path(resume)
        if resume_path.is_dir():
            resume_path = resume_path / "last.pt"
        if not resume_path.is_file():
            raise UserError(f"nothing to resume: {resume_path} does not exist")
    elif (run_dir / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or a new --run-name")
    # Checkpoints are read and checked before any data scan: a refused file or setting costs seconds.
    ckpt = load_checkpoint(resume_path, require=RESUME_KEYS) if resume_path else None
    changes = resume_changes(config, ckpt, resume_path, dist.world_size) if ckpt else []

    if config.init_from and not resume_path and not Path(config.init_from).is_file():
        raise UserError(f"--init-from {config.init_from} not found: net {config.arch} starts from a trained "
                        "net (§3.1: deeper nets from net A, S=384 from S=256, jittered from S=384); train "
                        "that first, or pass --init-from PATH, or --init-from '' to start from scratch")
    source_ckpt = load_checkpoint(config.init_from) if config.init_from and not resume_path else None

    # Data (§3.1): uint8 crops from workers, float work on whole batches in BatchAugment.
    root = prepare_dataset(config)
    stats = vdata.DatasetStats.from_dict(ckpt["stats"]) if ckpt else load_stats(config, root / "train")
    if vshards.is_shard_dir(root):
        train_set, val_set = vshards.open_training_sets(config, rank=dist.rank, world_size=dist.world_size,
                                                        per_rank_batch=per_rank_batch)
    else:
        with main_process_first():  # rank 0 scans and caches the file lists; the other ranks read its cache
            train_set = vdata.ImageFolder(root / "train", TrainTransform(
                crop_size=config.crop_size, scale_min=config.scale_min, scale_max=config.scale_max, seed=config.seed))
            val_set = vdata.ImageFolder(root / "val", CenterCropTransform(scale=config.test_scale,
                                                                          crop_size=config.crop_size))
    classes = train_set.classes
    check_class_order(classes, root / "train", warn=True)  # 1000 classes: index 0 must be n01440764
    if val_set.classes != classes:
        raise UserError(f"{root / 'val'} has {len(val_set.classes)} classes, {root / 'train'} has "
                        f"{len(classes)}: the class folders must be the same")
    sampler = EpochSampler(len(train_set), seed=config.seed, rank=dist.rank, world_size=dist.world_size)
    steps_per_epoch = sampler.per_rank() // per_rank_batch
    if isinstance(train_set, vshards.ShardStream):  # every image once an epoch, the same steps on every rank
        steps_per_epoch = train_set.num_steps
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_set)} training images make no full batch of {per_rank_batch} per process")
    val_loader = vdata.build_loader(
        torch.utils.data.Subset(val_set, shard_indices(len(val_set), dist.rank, dist.world_size)),
        batch_size=per_rank_batch, shuffle=False, workers=config.workers,
        collate_fn=vdata.collate_batch, seed=config.seed)

    # The net (Table 1) with N(0, 0.01^2) or Glorot init, warm start or resume (§3.1).
    torch.manual_seed(config.seed)
    model = build_net(config.arch, num_classes=len(classes), width=config.width, fc_width=config.fc_width,
                      image_size=config.crop_size, dropout=config.dropout, init=config.init)
    # On the device before the optimizer exists: its loaded state (momentum) follows the parameters.
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.lr_factor, patience=config.patience)
    start_epoch, start_step, best_top1, lr_drops = 0, 0, -1.0, 0
    best = None  # the best epoch's number and val errors (those of best.pt), for the final line and hparams
    if ckpt:
        if ckpt["arch"] != model.arch_kwargs() or ckpt["classes"] != classes:
            raise UserError(f"{resume_path} was trained as {ckpt['arch']} on {len(ckpt['classes'])} "
                            f"classes, not as this run's {model.arch_kwargs()}")
        restore_training_state(ckpt, resume_path, model, optimizer, scheduler)
        apply_resume_changes(changes, optimizer, scheduler, config)
        start_epoch, start_step, best_top1, lr_drops = ckpt["epoch"], ckpt["step"], ckpt["best_top1"], ckpt["lr_drops"]
        best = ckpt.get("best") if isinstance(ckpt.get("best"), dict) else None  # absent in older checkpoints
        log.info(f"resumed {resume_path} at epoch {start_epoch}, step {start_step} (lr "
                 f"{optimizer.param_groups[0]['lr']:g}, {lr_drops} lr drops so far)")
    elif source_ckpt:
        copied = init_from_checkpoint(model, source_ckpt, config.init_from, classes)
        log.info(f"initialised from {config.init_from}: copied {len(copied)} tensors: {', '.join(copied)}")

    raw_model = model  # checkpoints always hold the unwrapped, uncompiled net
    if dist.distributed:
        model = wrap_ddp(model, dist)
    if compile_net:
        model = torch.compile(model)

    writer = None
    last_step = start_epoch * steps_per_epoch + start_step  # the global step of the last optimizer step done
    skipped_files = {}  # path -> reason: every unreadable file of the run so far, for skipped.txt
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if ckpt and (run_dir / SKIPPED_LIST).is_file():
            skipped_files = read_skipped_list(run_dir / SKIPPED_LIST)
        # Every scalar's x axis is the global optimizer step. Events after the step this run starts
        # from (those logged before an interruption, or by a run resumed from a later checkpoint)
        # are dropped when TensorBoard reads the folder, as this run logs those steps again: no curve
        # shows a doubled segment. A fresh run drops everything a former run left in the folder.
        writer = SummaryWriter(str(Path(config.log_dir) / config.run_name),
                               purge_step=last_step + 1 if ckpt else 0)
        writer.add_custom_scalars(DASHBOARD_LAYOUT)
        writer.add_text("config", "```\n" + yaml.safe_dump(config.to_dict(), sort_keys=False) + "```", 0)
        log.info(f"net {config.arch}: {sum(p.numel() for p in raw_model.parameters()):,} parameters, "
                 f"{len(classes)} classes, {len(train_set)} train / {len(val_set)} val images, "
                 f"{steps_per_epoch} steps/epoch of {config.batch_size} on {dist.world_size} x {device.type}")
        log.info(f"speed settings on {device.type}: bf16 autocast {_on_off(bf16)}, channels-last "
                 f"{_on_off(channels_last)}, torch.compile {_on_off(compile_net)}")
        log.info(f"run folder {run_dir}; TensorBoard: tensorboard --logdir {config.log_dir}")

    def checkpoint_state(epoch: int, step: int) -> dict:
        return {"model": raw_model.state_dict(), "arch": raw_model.arch_kwargs(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "step": step, "lr_drops": lr_drops, "world_size": dist.world_size,
                "rng": rng_state(), "config": config.to_dict(),
                "stats": stats.to_dict(), "classes": classes, "best_top1": best_top1, "best": best}

    def save(name: str, epoch: int, step: int, epoch_sums: list[float] | None = None) -> None:
        # epoch_sums: the metric sums of a part-done epoch's steps 0..step-1, so its row covers it all
        if is_main_process():
            checkpoints.save(run_dir / name, **checkpoint_state(epoch, step), epoch_sums=epoch_sums)

    val_metrics = {}
    epoch_sums = ckpt.get("epoch_sums") if ckpt else None  # None from an epoch boundary
    streamed = isinstance(train_set, vshards.ShardStream)
    if not streamed:
        train_loader = build_train_loader(config, train_set, sampler, per_rank_batch, device,
                                          seed=config.seed * 1_000_003 + start_epoch * 1_009 + dist.rank)
    augment = BatchAugment(stats, device, config.color_shift_std, channels_last=channels_last)
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch, start=start_step * per_rank_batch)  # (read by the loader's next pass)
        if streamed:  # a shard stream learns its epoch before its workers copy it: one loader an epoch
            train_loader = train_set.loader(epoch=epoch, start_step=start_step,
                                            seed=config.seed * 1_000_003 + epoch * 1_009 + dist.rank)
        if config.data_path == "gpu":
            train_loader.set_epoch(epoch)
        if writer is not None and epoch == start_epoch and start_step == 0 and epoch == 0:
            log_augmented_images(writer, train_loader, augment)
        train_metrics = train_one_epoch(
            model, train_loader, optimizer, augment, epoch=epoch, num_steps=steps_per_epoch,
            start_step=start_step, bf16=bf16, log_every=config.log_every,
            checkpoint_every=config.checkpoint_every, stop_requested=stop, writer=writer,
            on_checkpoint=lambda step, sums: save("last.pt", epoch, step, sums), carried_sums=epoch_sums,
            progress_every_s=config.progress_every_s)
        start_step, epoch_sums = 0, None
        if train_metrics["interrupted"]:
            save("last.pt", epoch, train_metrics["step"], train_metrics["sums"])
            code = stop.exit_code()
            log.warning(f"stopped at epoch {epoch} step {train_metrics['step']}; saved {run_dir / 'last.pt'}; "
                        f"continue with --resume (exit code {code})")
            raise SystemExit(code)

        # Nets with buffers (batch norm) validate unwrapped: DDP would broadcast them in every forward,
        # a collective the ranks' unequal validation shards could not match.
        eval_model = raw_model if any(True for _ in raw_model.buffers()) else model
        val_metrics = validate(eval_model, val_loader, augment, bf16=bf16, progress_every_s=config.progress_every_s)
        epoch_lr = optimizer.param_groups[0]["lr"]  # the lr this epoch trained with
        scheduler.step(val_metrics["top1"])  # ÷10 when val accuracy stops improving (§3.1)
        next_lr = optimizer.param_groups[0]["lr"]
        if next_lr < epoch_lr:  # counted when made: a resumed --lr is no drop
            lr_drops += 1
        plateau_end = lr_drops > config.max_lr_drops
        improved = val_metrics["top1"] > best_top1
        best_top1 = max(best_top1, val_metrics["top1"])
        if improved:
            best = {"epoch": epoch, "val_top1_err": val_metrics["top1_err"], "val_top5_err": val_metrics["top5_err"]}
            save("best.pt", epoch + 1, 0)
        save("last.pt", epoch + 1, 0)

        # lr: the one this epoch trained with; lr_drops: the drops made so far, this epoch's plateau
        # check included (so an epoch that triggers a drop shows its own lr and the new count).
        last_step = (epoch + 1) * steps_per_epoch
        row = {"epoch": epoch, "lr": epoch_lr, "lr_drops": lr_drops,
               **{f"train_{k}": v for k, v in train_metrics.items() if k not in NOT_IN_ROW},
               **{f"val_{k}": v for k, v in val_metrics.items() if k not in NOT_IN_ROW}}
        # Every rank's unreadable files, to list them all in skipped.txt (one gather an epoch).
        unreadable = gather_objects(train_metrics["unreadable"] + val_metrics["unreadable"])
        if is_main_process():
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            log_epoch(writer, last_step, row, device)
            dropped = (f", dropped to {next_lr:g} (lr drop {lr_drops} of {config.max_lr_drops})"
                       if next_lr < epoch_lr else "")
            log.info(f"epoch {epoch}: train loss {train_metrics['loss']:.3f}, top-1 err "
                     f"{train_metrics['top1_err']:.1f}% | val top-1 err {val_metrics['top1_err']:.1f}%, "
                     f"top-5 err {val_metrics['top5_err']:.1f}% | {train_metrics['images_per_s']:.0f} img/s | "
                     f"lr {epoch_lr:g}{dropped}")
            skipped = train_metrics["skipped"] + val_metrics["skipped"]
            if skipped:
                skipped_files.update({f.path: f.reason for rank_files in unreadable for f in rank_files})
                write_skipped_list(run_dir / SKIPPED_LIST, skipped_files)
                log.info(f"{skipped} unreadable files skipped; list in {run_dir / SKIPPED_LIST}")
        if plateau_end:
            log.info(f"val top-1 plateaued after {config.max_lr_drops} lr drops: training ends (§3.1)")
            break

    if writer is not None:
        if best is not None:  # the best epoch's errors: those of best.pt, which evaluation starts from
            final = {"hparam/val_top1_err": best["val_top1_err"], "hparam/val_top5_err": best["val_top5_err"],
                     "hparam/best_epoch": best["epoch"]}
        else:  # resumed from a checkpoint that kept only the best accuracy
            final = {"hparam/val_top1_err": 100 - best_top1}
        hparams = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
        writer.add_hparams(hparams, final, run_name=".", global_step=last_step)  # purged on resume, like the rest
        writer.close()
        where = f" (epoch {best['epoch']})" if best is not None else ""
        log.info(f"done: best val top-1 err {100 - best_top1:.1f}%{where}; checkpoints in {run_dir}")
    return val_metrics


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


# Per-epoch metrics that are no numbers for metrics.jsonl: loop state and the unreadable files' list.
NOT_IN_ROW = ("interrupted", "step", "sums", "unreadable")
SKIPPED_LIST = "skipped.txt"


def read_skipped_list(path: Path) -> dict[str, str]:
    """skipped.txt -> {path: reason}."""
    lines = [line.split("\t", 1) for line in path.read_text().splitlines() if line.strip()]
    return {parts[0]: parts[1] if len(parts) > 1 else "" for parts in lines}


def write_skipped_list(path: Path, files: dict[str, str]) -> None:
    """The run's unreadable files, one `path<TAB>reason` line each, sorted."""
    path.write_text("".join(f"{name}\t{reason}\n" for name, reason in sorted(files.items())))


# The TensorBoard custom-scalars page ("CUSTOM SCALARS"): the charts to look at first, then the rest.
# Every scalar is logged against the global optimizer step, so a chart can overlay per-step tags
# and per-epoch ones. (The layout cannot set a log scale: each chart has a log-scale toggle.)
DASHBOARD_LAYOUT = {
    "1. training": {
        "top-1 error (%): train vs val": ["Multiline", ["^epoch/train_top1_err$", "^val/top1_err$"]],
        "loss: train (running) vs val": ["Multiline", ["^train/loss$", "^val/loss$"]],
        "learning rate": ["Multiline", ["^train/lr$"]],
        "images/s": ["Multiline", ["^speed/images_per_s$"]],
        "fraction of time waiting for data": ["Multiline", ["^speed/data_wait_fraction$"]],
    },
    "2. more": {
        "top-5 error (%): train vs val": ["Multiline", ["^epoch/train_top5_err$", "^val/top5_err$"]],
        "running train error (%)": ["Multiline", [r"^train/top\d_err$"]],
        "epoch time (s)": ["Multiline", ["^epoch/time_s$"]],
        "GPU memory (GB)": ["Multiline", ["^epoch/gpu_memory_gb$"]],
    },
}


def log_augmented_images(writer: SummaryWriter, loader, augment: BatchAugment, count: int = 32) -> None:
    """A grid of training images as the net sees them (after every augmentation), for a sanity look."""
    for images, labels, _ in loader:  # the first batch with a readable image
        if labels.numel():
            break
    else:
        log.warning("warning: no readable training image for the TensorBoard image grid; none logged")
        return
    images = TrainCrop(*(part[:count] for part in images)) if isinstance(images, TrainCrop) else images[:count]
    batch = augment(images, train=True).float().cpu()
    mean = torch.tensor(augment.stats.mean_rgb).view(1, 3, 1, 1)
    writer.add_images("train/augmented_images", ((batch + mean) / 255).clamp(0, 1), 0)


def log_epoch(writer: SummaryWriter, step: int, row: dict, device: torch.device) -> None:
    """An epoch's row, at `step`: the global optimizer step at the end of the epoch (the per-step
    tags' axis, so both kinds can share a chart)."""
    writer.add_scalar("val/top1_err", row["val_top1_err"], step)
    writer.add_scalar("val/top5_err", row["val_top5_err"], step)
    writer.add_scalar("val/loss", row["val_loss"], step)
    writer.add_scalar("epoch/train_top1_err", row["train_top1_err"], step)
    writer.add_scalar("epoch/train_top5_err", row["train_top5_err"], step)
    writer.add_scalar("epoch/lr", row["lr"], step)
    writer.add_scalar("epoch/time_s", row["train_epoch_time_s"], step)
    writer.add_scalar("epoch/images_per_s", row["train_images_per_s"], step)
    writer.add_scalar("epoch/data_wait_fraction", row["train_data_wait_fraction"], step)
    if device.type == "cuda":
        writer.add_scalar("epoch/gpu_memory_gb", torch.cuda.max_memory_allocated(device) / 2**30, step)
    writer.flush()
