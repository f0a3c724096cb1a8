"""A whole training run (paper §3.1) as named steps: where it starts from, its data, the net and its
optimizer, the run folder, the epochs, the last line. The parts: build.py (data, net, optimizer), parts.py
(what a run is built of), folder.py (the run folder and what is written there), epochs.py (the epochs).
"""

from pathlib import Path

import torch

from vgg.config import Config
from vgg.core.checkpoint import RESUME_KEYS, CheckpointWriter, load_checkpoint
from vgg.core.distributed import DistInfo, cleanup_distributed, init_distributed, is_main_process
from vgg.core.errors import UserError, is_disk_full
from vgg.core.progress import get_logger
# The run's parts are importable from here too, as before they moved to their own files.
from vgg.training.build import (
    build_data,
    build_net_and_optimizer,
    build_train_loader,
    load_stats,
    prepare_dataset,
    read_init_checkpoint,
    wrap_for_speed,
)
from vgg.training.epochs import train_epochs
from vgg.training.folder import best_so_far, find_resume_checkpoint, finish_run, hold_run_folder, open_run_folder
from vgg.training.parts import Net, Position, RunData, RunFolder, RunParts, Speed
from vgg.training.resume import (
    apply_resume_changes,
    check_checkpoint_fits_run,
    check_resume_checkpoint,
    init_from_checkpoint,
    resume_changes,
    restore_training_state,
)
from vgg.training.signals import StopFlag

log = get_logger()


def run(config: Config, resume: str = "") -> dict:
    """Train as the config says; returns the final validation metrics. Raises UserError on bad input."""
    dist = init_distributed(config.device)
    stop = StopFlag()
    checkpoints = CheckpointWriter()
    try:
        with hold_run_folder(Path(config.out_dir) / config.run_name, Path(config.log_dir) / config.run_name):
            try:
                return _run(config, resume, dist, stop, checkpoints)
            except OSError as e:  # metrics.jsonl, TensorBoard's event file, config.yaml (a checkpoint: its writer)
                if not is_disk_full(e):
                    raise
                folders = f"{Path(config.out_dir) / config.run_name} or {Path(config.log_dir) / config.run_name}"
                raise UserError(f"no space left on device while writing the run's files under {folders}: free "
                                "space, then --resume from its last checkpoint") from None
            finally:
                checkpoints.close()  # the last save is on disk before this returns (and the process may exit)
    finally:
        stop.restore()
        cleanup_distributed()


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
        if is_finished(ckpt, resume_path, config):
            return {}
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


def is_finished(ckpt: dict, path: Path, config: Config) -> bool:
    """Whether the checkpoint ends the run: the plateau schedule ended it (§3.1) or it has trained --epochs.
    Then one line says so, and nothing is trained or written (a requeued job, reproduce.py's stage killed
    before its done-marker: issue 34)."""
    if ckpt["step"]:  # (a stop after an epoch's last step: its validation is left)
        return False
    if ckpt["lr_drops"] > config.max_lr_drops:
        why = f"val top-1 plateaued after {config.max_lr_drops} lr drops (§3.1)"
        how = f"--max-lr-drops {ckpt['lr_drops']}"
    elif ckpt["epoch"] >= config.epochs:
        why, how = f"it has trained all {config.epochs} epochs", f"--epochs {config.epochs + 1} or more"
    else:
        return False
    log.info(f"{path} is a finished run ({why}; {best_so_far(Position.of(ckpt))}): nothing to train, nothing "
             f"changed; to train on, pass {how}")
    return True


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
