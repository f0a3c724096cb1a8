"""The training and validation loops: plain functions that return a dict of metrics.

Images arrive from the loader as uint8 (decoded, rescaled, cropped and flipped in workers, §3.1);
`BatchAugment` turns a whole batch into float on the device, subtracts the mean RGB (§2.1) and adds
the PCA colour shift (AlexNet §4.1). Host-device syncs happen only every `log_every` steps, where
the running sums are reduced across ranks, the loss is checked for NaN/inf and a stop request
(SIGINT/SIGTERM on any rank) is agreed on by every rank.
"""

import contextlib
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vgg.config import speed_flag
from vgg.data import DatasetStats, warn_unreadable
from vgg.distributed import all_reduce_sum, is_main_process, progress_bar
from vgg.transforms import TrainCrop, color_shift, normalize
from vgg.zoo import main_logits, training_loss


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf: the run stops, the last good checkpoint is kept."""


class DeviceStats(NamedTuple):
    """A DatasetStats' mean RGB and PCA eigen-pairs as float32 tensors on the training device, made once:
    `normalize` and `color_shift` take them as they are (torch.as_tensor of a tensor already there is
    a no-op), where numbers would be copied to the device, blocking, on every call."""

    mean_rgb: torch.Tensor  # [3]
    eigval: torch.Tensor  # [3]
    eigvec: torch.Tensor  # [3, 3], eigenvectors as columns

    @classmethod
    def of(cls, stats: DatasetStats, device: torch.device) -> "DeviceStats":
        return cls(*(torch.tensor(values, dtype=torch.float32, device=device)
                     for values in (stats.mean_rgb, stats.eigval, stats.eigvec)))


@dataclass
class BatchAugment:
    """uint8 batch -> float batch on `device`: mean subtraction and (training only) colour shift.

    A training batch is a `vgg.transforms.TrainCrop`: the images and each one's colour-shift alphas,
    drawn per sample (see `sample_generator`), which go to the device with the images (both pinned
    by the loader on CUDA, so both copies are asynchronous). A plain uint8 batch draws its alphas
    from `generator` (a CPU generator, such as the trainer's, costs a blocking copy on CUDA; None:
    the device's global RNG); the training loop never hands it one (its zero-weight placeholder is a
    TrainCrop made on the device).

    Why the alphas are drawn on the CPU rather than on the device: they are part of the sample's
    draws from `sample_generator(seed, epoch, index)` (issue 17), so a resumed epoch, any worker
    count, either data path and any number of processes give a sample the same alphas, bit for bit.
    A device generator would tie them to the batch and the process instead; 12 bytes per image
    travelling with the batch cost nothing next to its pixels.
    """

    stats: DatasetStats
    device: torch.device
    color_shift_std: float = 0.1
    channels_last: bool = False
    generator: torch.Generator | None = None  # colour-shift alphas of plain (not TrainCrop) batches

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.constants = DeviceStats.of(self.stats, self.device)  # on the device once, not per step

    def __call__(self, images, train: bool) -> torch.Tensor:
        alphas = None
        if isinstance(images, TrainCrop):
            images, alphas = images[0], images[1].to(self.device, non_blocking=True)
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        images = normalize(images, self.constants.mean_rgb)
        if train and self.color_shift_std > 0:
            images = color_shift(images, self.constants, std=self.color_shift_std, generator=self.generator,
                                 alphas=alphas)
        return images


def autocast_context(device: torch.device, bf16: bool | str):
    """bf16 autocast (no loss scaling needed for bf16) where `bf16` says so: "auto" on CUDA only,
    true or false on any device (config.speed_flag); plain fp32 otherwise."""
    if speed_flag(bf16, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """bool [len(ks), N]: is sample i's label among its k highest scores? (k capped at the class count)"""
    maxk = min(max(ks), scores.shape[1])
    top = scores.topk(maxk, dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, : min(k, maxk)].any(dim=1) for k in ks])


def train_step(model, images: torch.Tensor, labels: torch.Tensor, optimizer, *, bf16: bool | str = "auto",
               weight: float = 1.0):
    """One SGD step (§3.1): forward (bf16 autocast if asked, see autocast_context), fp32 cross-entropy,
    backward, update.

    weight: multiplies the loss; 0 makes a zero-weight step (see train_one_epoch). Returns the
    detached logits and (unweighted) loss; nothing here waits for the GPU.
    """
    with autocast_context(images.device, bf16):
        outputs = model(images)
    # fp32 cross-entropy, plus the auxiliary heads' of GoogLeNet and Inception-v3 (vgg.zoo)
    loss = training_loss(outputs, labels)
    logits = main_logits(outputs)
    optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    optimizer.step()
    return logits.detach(), loss.detach()


def _net(model):
    """The net inside torch.compile's (_orig_mod) and DDP's (module) wrappers."""
    net = getattr(model, "_orig_mod", model)
    return getattr(net, "module", net)


def _placeholder_batch(model, device: torch.device) -> tuple[TrainCrop, torch.Tensor]:
    """Black uint8 images of the net's input size, zero colour-shift alphas and label 0, for a
    zero-weight step: made on `device`, so the step copies nothing from the host and draws nothing.
    Two images: batch norm (ResNets, GoogLeNet, Inception-v3) needs more than one value per channel.
    """
    size = _net(model).image_size
    return (TrainCrop(torch.zeros(2, 3, size, size, dtype=torch.uint8, device=device),
                      torch.zeros(2, 3, device=device)),
            torch.zeros(2, dtype=torch.int64, device=device))


@contextlib.contextmanager
def _norm_stats_frozen(model):
    """Batch norm's running statistics (and its batch count) left as they are for one forward: a
    placeholder's black images must not move them, as its zero weight keeps them out of the update.
    Momentum 0 keeps the running mean and variance; the count is put back on the device (no sync)."""
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def train_one_epoch(model, loader, optimizer, augment: BatchAugment, *, epoch: int, num_steps: int,
                    start_step: int = 0, bf16: bool | str = "auto", log_every: int = 20,
                    checkpoint_every: int = 0, on_checkpoint=None, stop_requested=lambda: False,
                    writer=None, carried_sums: list[float] | None = None, progress_every_s: float = 30.0) -> dict:
    """Run optimizer steps `start_step .. num_steps-1` of `epoch` (the loader starts at start_step).

    Every `log_every` steps (and at the end) the running sums are reduced over ranks, the loss is
    checked for NaN/inf and a stop request is agreed on. Every `checkpoint_every` global steps
    `on_checkpoint(step, sums)` is called at such a sync point, i.e. only after the loss was seen
    finite. `sums` are the epoch's sums over all ranks so far, [loss * images, top-1 hits, top-5
    hits, images, skipped images]; `carried_sums` are those of steps 0 .. start_step-1 (saved by a
    mid-epoch checkpoint), so that a resumed epoch's metrics still cover the whole epoch.
    Unreadable files are warned about once each (per process) and returned as this rank's
    `unreadable` list. progress_every_s: see vgg.distributed.progress_bar.
    Returns the epoch's metrics and `sums`, with `interrupted=True` if any rank asked to stop.
    """
    device = augment.device
    model.train()
    carried = list(carried_sums) if carried_sums else [0.0] * 5
    device_sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss*n, top1, top5, nonfinite
    images_seen, skipped = 0, 0  # this rank's, since start_step
    unreadable_files = []  # this rank's, since start_step
    sums, part_images = carried, 0.0  # as of the last sync: the epoch's global sums; this part's images
    data_time = 0.0
    start = time.perf_counter()
    last_log_time = start
    interrupted = False
    bar = progress_bar(total=num_steps, initial=start_step, desc=f"epoch {epoch}", unit="steps",
                       every_s=progress_every_s, enabled=is_main_process())

    def sync(step: int) -> bool:
        """The one host-device sync: sums and the stop flag over all ranks, then the NaN check.
        Updates `sums` (the carried ones added host-side: they are global already) and `part_images`;
        returns whether any rank asked to stop."""
        nonlocal sums, part_images
        host = torch.tensor([images_seen, skipped, float(stop_requested())], dtype=torch.float64)
        reduced = all_reduce_sum(torch.cat([device_sums, host.to(device)])).tolist()
        if reduced[3] > 0:
            raise NonFiniteLossError(
                f"the training loss became NaN/inf in epoch {epoch} before step {step}; stopping. "
                "The last good checkpoint is untouched; try a lower --lr")
        part = [reduced[0], reduced[1], reduced[2], reduced[4], reduced[5]]
        sums = [c + p for c, p in zip(carried, part)]
        part_images = reduced[4]
        return reduced[6] > 0

    step = synced_step = start_step
    fetch_start = time.perf_counter()
    try:  # the bar is closed on an error too, so the error line starts on a line of its own
        for images, labels, unreadable in loader:
            if step >= num_steps:
                break
            data_time += time.perf_counter() - fetch_start
            warn_unreadable(unreadable)
            unreadable_files += unreadable
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
            if n:  # (a placeholder counts for nothing)
                top1, top5 = topk_hits(logits, labels).sum(dim=1)
                device_sums[:3] += torch.stack([loss.double() * n, top1.double(), top5.double()])
            # Checked for a placeholder too: 0 * NaN is NaN, which would reach every rank's weights.
            device_sums[3] += (~torch.isfinite(loss)).double()
            images_seen += n
            skipped += len(unreadable)
            step += 1
            bar.update(1)

            global_step = epoch * num_steps + step
            checkpoint_due = checkpoint_every > 0 and global_step % checkpoint_every == 0
            if step % log_every == 0 or step == num_steps or checkpoint_due:
                last_images = part_images
                stop = sync(step)
                synced_step = step
                metrics = _train_metrics(sums)
                now = time.perf_counter()
                images_per_s = (part_images - last_images) / max(now - last_log_time, 1e-9)
                last_log_time = now
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", top1_err=f"{metrics['top1_err']:.1f}%",
                                img_s=f"{images_per_s:.0f}")
                if writer is not None:
                    writer.add_scalar("train/loss", metrics["loss"], global_step)
                    writer.add_scalar("train/top1_err", metrics["top1_err"], global_step)
                    writer.add_scalar("train/top5_err", metrics["top5_err"], global_step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
                    writer.add_scalar("speed/images_per_s", images_per_s, global_step)
                    writer.add_scalar("speed/data_wait_fraction", data_time / max(now - start, 1e-9),
                                      global_step)
                if checkpoint_due and on_checkpoint is not None:
                    on_checkpoint(step, sums)
                if stop:
                    interrupted = True
                    break
            fetch_start = time.perf_counter()
    finally:
        bar.close()
    if step != synced_step:
        # The loader ran out before num_steps: reduce the steps since the last sync too, or the
        # epoch's metrics would miss them. Every rank has the same batch count, so all get here.
        sync(step)

    elapsed = time.perf_counter() - start
    return {**_train_metrics(sums), "step": step, "interrupted": interrupted, "sums": sums,
            "unreadable": unreadable_files, "epoch_time_s": elapsed,
            "data_wait_fraction": data_time / max(elapsed, 1e-9), "images_per_s": part_images / max(elapsed, 1e-9)}


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
            images = augment(images, train=False)
            labels = labels.to(device, non_blocking=True)
            with autocast_context(device, bf16):
                logits = model(images).float()
            top1, top5 = topk_hits(logits, labels).sum(dim=1)
            n = labels.shape[0]
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
