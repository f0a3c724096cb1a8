"""The epochs of a run (§3.1): train, validate, step the plateau schedule, save, record; a stop request
saves where every rank stopped.
"""

import math
from typing import NoReturn

import torch

from vgg.core.distributed import gather_objects, is_main_process
from vgg.core.errors import UserError
from vgg.core.progress import get_logger
from vgg.data.batches.loaders import shut_down_workers
from vgg.training.build import build_train_loader
from vgg.training.folder import list_skipped_files, record_epoch, save
from vgg.training.logs import log_augmented_images
from vgg.training.loop import train_one_epoch, validate
from vgg.training.parts import Net, RunParts
from vgg.training.signals import StopFlag
from vgg.training.step import NOT_SAVED, BatchAugment, NonFiniteLossError

log = get_logger()


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
    try:
        for epoch in range(start_epoch, config.epochs):
            if batches is None and position.step == data.steps_per_epoch:
                batches = iter(())  # resumed after the epoch's last step (a stop there): its validation is left
            elif batches is None:  # the run's first epoch; later ones were started before the last validation
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
            check_finite(parts.net, f"after epoch {epoch}")
            save(parts, ("best.pt", "last.pt") if improved else ("last.pt",), epoch + 1, 0)
            last_step = (epoch + 1) * data.steps_per_epoch
            record_epoch(parts, epoch, last_step, epoch_lr, next_lr, train_metrics, val_metrics)
            if position.lr_drops > config.max_lr_drops:
                log.info(f"val top-1 plateaued after {config.max_lr_drops} lr drops: training ends (§3.1)")
                break
    finally:  # its loader workers end with the run, not whenever the loader is collected
        if hasattr(batches, "close"):
            batches.close()
        shut_down_workers(train_loader)
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
    step every rank stopped at (the epoch's last step too: --resume then validates it) and exits 128 + the
    signal. A --checkpoint-every save is pending until the loop's next sync sees the loss its weights gave.
    UserError for an epoch that could read no training image."""
    config, position = parts.config, parts.position
    met = []  # this rank's unreadable files of the epoch so far, which the loop adds to
    train_metrics = train_one_epoch(
        parts.net.model, batches, parts.net.optimizer, augment, epoch=epoch,
        num_steps=parts.data.steps_per_epoch, start_step=position.step, bf16=parts.speed.bf16,
        log_every=config.log_every, checkpoint_every=config.checkpoint_every, stop_requested=stop,
        writer=parts.folder.writer, on_sync=parts.folder.checkpoints.confirm,
        on_checkpoint=lambda step, sums: save_in_epoch(parts, epoch, step, sums, met, pending=True),
        unreadable=met, carried_sums=position.epoch_sums, progress_every_s=config.progress_every_s)
    position.step, position.epoch_sums = 0, None
    if train_metrics["interrupted"]:
        stop_and_save(parts, epoch, train_metrics, stop)
    if not train_metrics["images"]:
        files = train_metrics["unreadable"]
        example = f", e.g. {files[0].path}: {files[0].reason}" if files else ""
        raise UserError(f"no training image of epoch {epoch} could be read ({train_metrics['skipped']} unreadable"
                        f"{example}): stopping without saving, {parts.folder.path / 'last.pt'} is the last save "
                        "before it; make the files readable, then --resume")
    return train_metrics


def save_in_epoch(parts: RunParts, epoch: int, step: int, sums: list[float], met: list, pending: bool) -> bool:
    """last.pt at `step` of `epoch` (vgg/training/folder.py's save), unless the epoch has read no image
    yet (no checkpoint of an epoch that trained on nothing, issue 34); whether it saved. The unreadable
    files every rank met so far (`met`: this rank's) go into skipped.txt with it: the resumed run never
    meets them again."""
    if not sums[3]:
        return False
    unreadable = gather_objects(met)
    if is_main_process():
        list_skipped_files(parts.folder, unreadable)
    check_finite(parts.net, f"in epoch {epoch} by step {step}")
    save(parts, ("last.pt",), epoch, step, sums, pending=pending)
    return True


def stop_and_save(parts: RunParts, epoch: int, train_metrics: dict, stop: StopFlag) -> NoReturn:
    """A stop agreed at a sync point: last.pt where every rank stopped, its line, exit 128 + the signal."""
    step, last = train_metrics["step"], parts.folder.path / "last.pt"
    saved = save_in_epoch(parts, epoch, step, train_metrics["sums"], train_metrics["unreadable"], pending=False)
    code = stop.exit_code()
    if saved:
        log.warning(f"stopped at epoch {epoch} step {step}; saved {last}; continue with --resume (exit code {code})")
    else:
        log.warning(f"stopped at epoch {epoch} step {step} without saving: no training image of the epoch could be "
                    f"read so far; {last} is the last save before it (exit code {code})")
    raise SystemExit(code)


def check_finite(net: Net, when: str) -> None:
    """NonFiniteLossError unless every weight and momentum buffer is finite: no save holds a diverged net.
    (The same on every rank: DDP keeps them equal, so no collective is needed.)"""
    tensors = [t for t in net.raw.state_dict().values() if t.is_floating_point()]
    tensors += [state["momentum_buffer"] for state in net.optimizer.state.values()
                if state.get("momentum_buffer") is not None]
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise NonFiniteLossError(f"the weights or their momentum became NaN/inf {when}; {NOT_SAVED}")


def validate_and_schedule(parts: RunParts, augment: BatchAugment, epoch: int) -> tuple[dict, float, float, bool]:
    """Validation, then the plateau schedule (§3.1: the lr ÷10 when val accuracy stops improving) and the
    best epoch. Returns the val metrics, the lr the epoch trained with, the next one, and whether it improved."""
    net, position = parts.net, parts.position
    # Nets with buffers (batch norm) validate unwrapped: DDP would broadcast them in every forward,
    # a collective the ranks' unequal validation shards could not match.
    eval_model = net.raw if any(True for _ in net.raw.buffers()) else net.model
    val_metrics = validate(eval_model, parts.data.val_loader, augment, bf16=parts.speed.bf16,
                           progress_every_s=parts.config.progress_every_s)
    if not math.isfinite(val_metrics["loss"]):  # the weights the epoch's save would hold gave it
        raise NonFiniteLossError(f"the validation loss after epoch {epoch} is NaN/inf: the epoch's last steps "
                                 f"diverged; {NOT_SAVED}")
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
