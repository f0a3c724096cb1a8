"""The training and validation loops: plain functions that return a dict of metrics.

Host-device syncs happen only every `log_every` steps, where the running sums are reduced across
ranks, the loss is checked for NaN/inf and a stop request (SIGINT/SIGTERM on any rank) is agreed on
by every rank.
"""

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from vgg.core.distributed import all_reduce_sum, is_main_process
from vgg.core.progress import progress_bar
from vgg.data.datasets.folders import warn_unreadable
from vgg.training.step import (
    BatchAugment,
    NOT_SAVED,
    NonFiniteLossError,
    _norm_stats_frozen,
    _placeholder_batch,
    autocast_context,
    topk_hits,
    train_step,
)


class EpochTally:
    """An epoch's running sums. Between syncs they stay on the device (no host-device sync per step); a
    sync reduces them over the ranks, with this rank's counts and stop flag, then checks for NaN/inf.

    `sums`: the epoch's global sums as of the last sync, [loss * images, top-1 hits, top-5 hits, images,
    skipped images], the carried ones (those of steps 0 .. start_step-1, global already) added host-side;
    `part_images`: the images of this part of the epoch (since start_step), over all ranks.
    """

    def __init__(self, device: torch.device, carried_sums: list[float] | None, unreadable: list | None = None):
        self.carried = list(carried_sums) if carried_sums else [0.0] * 5
        self.device_sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss*n, top1, top5, nonfinite
        self.images_seen, self.skipped = 0, 0  # this rank's, since start_step
        self.unreadable = [] if unreadable is None else unreadable  # this rank's unreadable files, since start_step
        self.sums, self.part_images = self.carried, 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, n: int, unreadable: list) -> None:
        """A step's loss and hits (n images; 0 for a placeholder batch) and its unreadable files."""
        if n:  # (a placeholder counts for nothing)
            top1, top5 = topk_hits(logits, labels).sum(dim=1)
            self.device_sums[:3] += torch.stack([loss.double() * n, top1.double(), top5.double()])
        # Checked for a placeholder too: 0 * NaN is NaN, which would reach every rank's weights.
        self.device_sums[3] += (~torch.isfinite(loss)).double()
        self.images_seen += n
        self.skipped += len(unreadable)

    def sync(self, epoch: int, step: int, stop_requested) -> bool:
        """The one host-device sync; returns whether any rank asked to stop."""
        host = torch.tensor([self.images_seen, self.skipped, float(stop_requested())], dtype=torch.float64)
        reduced = all_reduce_sum(torch.cat([self.device_sums, host.to(self.device_sums.device)])).tolist()
        if reduced[3] > 0:
            raise NonFiniteLossError(
                f"the training loss became NaN/inf in epoch {epoch} before step {step}; {NOT_SAVED}")
        part = [reduced[0], reduced[1], reduced[2], reduced[4], reduced[5]]
        self.sums = [c + p for c, p in zip(self.carried, part)]
        self.part_images = reduced[4]
        return reduced[6] > 0


def train_one_epoch(model, loader, optimizer, augment: BatchAugment, *, epoch: int, num_steps: int,
                    start_step: int = 0, bf16: bool | str = "auto", log_every: int = 20,
                    checkpoint_every: int = 0, on_checkpoint=None, on_sync=None, stop_requested=lambda: False,
                    writer=None, carried_sums: list[float] | None = None, progress_every_s: float = 30.0,
                    unreadable: list | None = None) -> dict:
    """Run optimizer steps `start_step .. num_steps-1` of `epoch` (the loader starts at start_step).

    Every `log_every` steps (and at the end) the running sums are reduced over ranks, the loss is
    checked for NaN/inf and a stop request is agreed on, and then `on_sync()` is called (the loss was
    seen finite: a save made at the sync before, whose weights gave these losses, is good). Every
    `checkpoint_every` global steps `on_checkpoint(step, sums)` is called at such a sync point, except
    at the epoch's last step (the epoch's own save follows its validation) and at a stop (its own save
    follows). `sums` are the epoch's sums over all ranks so far, [loss * images, top-1 hits, top-5
    hits, images, skipped images]; `carried_sums` are those of steps 0 .. start_step-1 (saved by a
    mid-epoch checkpoint), so that a resumed epoch's metrics still cover the whole epoch.
    Unreadable files are warned about once each (per process) and returned as this rank's
    `unreadable` list: the list passed as `unreadable`, if any, which they are added to as they are met (so
    that `on_checkpoint` can read those met so far). progress_every_s: see vgg.core.progress.progress_bar.
    Returns the epoch's metrics and `sums`, with `interrupted=True` if any rank asked to stop.
    """
    model.train()
    tally = EpochTally(augment.device, carried_sums, unreadable)
    data_time, interrupted = 0.0, False
    start = time.perf_counter()
    last_log_time = start
    bar = progress_bar(total=num_steps, initial=start_step, desc=f"epoch {epoch}", unit="steps",
                       every_s=progress_every_s, enabled=is_main_process())
    step = synced_step = start_step
    fetch_start = time.perf_counter()
    try:  # the bar is closed on an error too, so the error line starts on a line of its own
        for batch in loader:
            if step >= num_steps:
                break
            data_time += time.perf_counter() - fetch_start
            _train_batch(model, batch, optimizer, augment, bf16, tally)
            step += 1
            bar.update(1)
            global_step = epoch * num_steps + step
            checkpoint_due = checkpoint_every > 0 and global_step % checkpoint_every == 0
            if step % log_every == 0 or step == num_steps or checkpoint_due:
                last_images = tally.part_images
                stop = tally.sync(epoch, step, stop_requested)
                synced_step = step
                now = time.perf_counter()
                images_per_s = (tally.part_images - last_images) / max(now - last_log_time, 1e-9)
                last_log_time = now
                _report_window(bar, writer, optimizer, tally.sums, images_per_s,
                               data_time / max(now - start, 1e-9), global_step)
                if on_sync is not None:
                    on_sync()
                if checkpoint_due and on_checkpoint is not None and step < num_steps and not stop:
                    on_checkpoint(step, tally.sums)
                if stop:
                    interrupted = True
                    break
            fetch_start = time.perf_counter()
    finally:
        bar.close()
    if step != synced_step:
        # The loader ran out before num_steps: reduce the steps since the last sync too, or the
        # epoch's metrics would miss them. Every rank has the same batch count, so all get here.
        tally.sync(epoch, step, stop_requested)
    elapsed = time.perf_counter() - start
    return {**_train_metrics(tally.sums), "step": step, "interrupted": interrupted, "sums": tally.sums,
            "unreadable": tally.unreadable, "epoch_time_s": elapsed,
            "data_wait_fraction": data_time / max(elapsed, 1e-9),
            "images_per_s": tally.part_images / max(elapsed, 1e-9) if tally.part_images else None}  # None:
    # no step of the epoch trained in this process (resumed after its last one, to validate it)


def _train_batch(model, batch, optimizer, augment: BatchAugment, bf16: bool | str, tally: EpochTally) -> None:
    """One optimizer step on a loader batch (uint8 crops, labels, its unreadable files), counted in `tally`."""
    images, labels, unreadable = batch
    device = augment.device
    warn_unreadable(unreadable)
    tally.unreadable += unreadable
    n = labels.shape[0]
    weight = 1.0
    if n == 0:
        # Every file of this rank's batch was unreadable. The step still happens, with weight 0:
        # under DDP every rank must join the same gradient all-reduce in every step (skipping it
        # would pair this rank's next all-reduce with another rank's current one: gloo aborts,
        # NCCL hangs), and agreeing on a skip would cost a host-device sync per step. A black
        # image whose loss is multiplied by 0 adds nothing to the averaged gradient, so every
        # rank still applies the same update and counts the same steps (were every rank's batch
        # unreadable, that update would be momentum and weight decay alone).
        images, labels = _placeholder_batch(model, device)
        weight = 0.0
    images = augment(images, train=True)
    labels = labels.to(device, non_blocking=True)
    with _norm_stats_frozen(model) if n == 0 else contextlib.nullcontext():
        logits, loss = train_step(model, images, labels, optimizer, bf16=bf16, weight=weight)
    tally.add(logits, labels, loss, n, unreadable)


def _report_window(bar, writer, optimizer, sums: list[float], images_per_s: float, data_wait: float,
                   global_step: int) -> None:
    """A sync point's figures: on the progress bar, and as TensorBoard scalars on rank 0."""
    metrics = _train_metrics(sums)
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", top1_err=f"{metrics['top1_err']:.1f}%",
                    img_s=f"{images_per_s:.0f}")
    if writer is not None:
        writer.add_scalar("train/loss", metrics["loss"], global_step)
        writer.add_scalar("train/top1_err", metrics["top1_err"], global_step)
        writer.add_scalar("train/top5_err", metrics["top5_err"], global_step)
        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("speed/images_per_s", images_per_s, global_step)
        writer.add_scalar("speed/data_wait_fraction", data_wait, global_step)


def _train_metrics(sums: list[float]) -> dict:
    """[loss * images, top-1 hits, top-5 hits, images, skipped] -> mean loss, top-1/5 error (%), counts."""
    loss_sum, top1, top5, images, skipped = sums
    if images == 0:
        return {"loss": math.nan, "top1_err": math.nan, "top5_err": math.nan, "images": 0,
                "skipped": int(skipped)}
    return {"loss": loss_sum / images, "top1_err": 100 * (1 - top1 / images),
            "top5_err": 100 * (1 - top5 / images), "images": int(images), "skipped": int(skipped)}


@torch.inference_mode()
def validate(model, loader, augment: BatchAugment, *, bf16: bool | str = "auto", desc: str = "val",
             progress_every_s: float = 30.0) -> dict:
    """Single-scale, centre-crop validation (the plateau signal of §3.1), summed over all ranks.

    Each rank sees a disjoint shard (no padded repeats), so every image is counted once. Unreadable
    files are warned about once each and returned as this rank's `unreadable` list.
    """
    device = augment.device
    model.eval()
    # A short batch (the shard's last, or one that lost unreadable files) is padded to the loader's batch
    # size, its padding's outputs dropped: one input shape, so a compiled net compiles validation once.
    full = getattr(loader, "batch_size", None) or 0
    sums = torch.zeros(5, device=device, dtype=torch.float64)  # loss*n, top1, top5, n, skipped
    unreadable_files = []
    with progress_bar(total=len(loader), desc=desc, unit="batches", every_s=progress_every_s,
                      enabled=is_main_process()) as bar:
        for images, labels, unreadable in loader:
            bar.update(1)
            warn_unreadable(unreadable)
            unreadable_files += unreadable
            sums[4] += len(unreadable)
            if labels.numel() == 0:
                # Safe to skip here, unlike in training: forward in eval mode without grad makes no DDP
                # collective (our nets have no buffers to broadcast), and the shards' batch counts may
                # differ anyway; the one all-reduce comes after the loop.
                continue
            n = labels.shape[0]
            if n < full:
                images = torch.cat([images, images.new_zeros((full - n, *images.shape[1:]))])
            images = augment(images, train=False)
            labels = labels.to(device, non_blocking=True)
            with autocast_context(device, bf16):
                logits = model(images).float()[:n]
            top1, top5 = topk_hits(logits, labels).sum(dim=1)
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += top1
            sums[2] += top5
            sums[3] += n
    reduced = all_reduce_sum(sums)
    count = max(reduced[3].item(), 1.0)
    return {"loss": reduced[0].item() / count, "top1": 100 * reduced[1].item() / count,
            "top1_err": 100 * (1 - reduced[1].item() / count),
            "top5_err": 100 * (1 - reduced[2].item() / count),
            "images": int(reduced[3].item()), "skipped": int(reduced[4].item()), "unreadable": unreadable_files}
