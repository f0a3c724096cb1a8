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

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vgg.data import DatasetStats
from vgg.distributed import all_reduce_sum, is_main_process
from vgg.transforms import color_shift, normalize


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf: the run stops, the last good checkpoint is kept."""


@dataclass
class BatchAugment:
    """uint8 batch -> float batch on `device`: mean subtraction and (training only) colour shift."""

    stats: DatasetStats
    device: torch.device
    color_shift_std: float = 0.1
    channels_last: bool = False
    generator: torch.Generator | None = None  # colour-shift alphas; seeded per (seed, epoch, rank)

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        images = normalize(images, self.stats.mean_rgb)
        if train and self.color_shift_std > 0:
            images = color_shift(images, self.stats, std=self.color_shift_std, generator=self.generator)
        return images


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA (no loss scaling needed for bf16); plain fp32 elsewhere."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """bool [len(ks), N]: is sample i's label among its k highest scores? (k capped at the class count)"""
    maxk = min(max(ks), scores.shape[1])
    top = scores.topk(maxk, dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, : min(k, maxk)].any(dim=1) for k in ks])


def train_step(model, images: torch.Tensor, labels: torch.Tensor, optimizer, *, bf16: bool = True):
    """One SGD step (§3.1): forward (bf16 autocast on CUDA), fp32 cross-entropy, backward, update.

    Returns the detached logits and loss; nothing here waits for the GPU.
    """
    with autocast_context(images.device, bf16):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits.detach(), loss.detach()


def train_one_epoch(model, loader, optimizer, augment: BatchAugment, *, epoch: int, num_steps: int,
                    start_step: int = 0, bf16: bool = True, log_every: int = 20,
                    checkpoint_every: int = 0, on_checkpoint=None, stop_requested=lambda: False,
                    writer=None) -> dict:
    """Run optimizer steps `start_step .. num_steps-1` of `epoch` (the loader starts at start_step).

    Every `log_every` steps (and at the end) the running sums are reduced over ranks, the loss is
    checked for NaN/inf and a stop request is agreed on. Every `checkpoint_every` global steps
    `on_checkpoint(step)` is called at such a sync point, i.e. only after the loss was seen finite.
    Returns the epoch's metrics, with `interrupted=True` if a stop was requested on any rank.
    """
    device = augment.device
    model.train()
    device_sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss*n, top1, top5, nonfinite
    images_seen, skipped = 0, 0
    synced = {"loss": math.nan, "top1_err": math.nan, "top5_err": math.nan, "images": 0, "skipped": 0}
    data_time = 0.0
    start = time.perf_counter()
    last_log_time, last_log_images = start, 0
    interrupted = False
    bar = tqdm(total=num_steps, initial=start_step, desc=f"epoch {epoch}", unit="step",
               disable=not is_main_process(), dynamic_ncols=True, leave=False)

    step = start_step
    fetch_start = time.perf_counter()
    for images, labels, n_skipped in loader:
        if step >= num_steps:
            break
        data_time += time.perf_counter() - fetch_start
        if labels.numel() == 0:  # every file of the batch was unreadable: nothing to learn from
            skipped += n_skipped
            fetch_start = time.perf_counter()
            continue
        images = augment(images, train=True)
        labels = labels.to(device, non_blocking=True)
        logits, loss = train_step(model, images, labels, optimizer, bf16=bf16)
        top1, top5 = topk_hits(logits, labels).sum(dim=1)
        device_sums += torch.stack([loss.double() * labels.shape[0], top1.double(), top5.double(),
                                    (~torch.isfinite(loss)).double()])
        images_seen += labels.shape[0]
        skipped += n_skipped
        step += 1
        bar.update(1)

        global_step = epoch * num_steps + step
        checkpoint_due = checkpoint_every > 0 and global_step % checkpoint_every == 0
        if step % log_every == 0 or step == num_steps or checkpoint_due:
            # The one host-device sync: sums and the stop flag over all ranks, then the NaN check.
            host = torch.tensor([images_seen, skipped, float(stop_requested())], dtype=torch.float64)
            reduced = all_reduce_sum(torch.cat([device_sums, host.to(device)])).tolist()
            if reduced[3] > 0:
                raise NonFiniteLossError(
                    f"the training loss became NaN/inf in epoch {epoch} before step {step}; stopping. "
                    "The last good checkpoint is untouched; try a lower --lr")
            count = max(reduced[4], 1.0)
            synced = {"loss": reduced[0] / count, "top1_err": 100 * (1 - reduced[1] / count),
                      "top5_err": 100 * (1 - reduced[2] / count), "images": int(reduced[4]),
                      "skipped": int(reduced[5])}
            now = time.perf_counter()
            images_per_s = (synced["images"] - last_log_images) / max(now - last_log_time, 1e-9)
            last_log_time, last_log_images = now, synced["images"]
            bar.set_postfix(loss=f"{synced['loss']:.3f}", top1=f"{100 - synced['top1_err']:.1f}%",
                            img_s=f"{images_per_s:.0f}")
            if writer is not None:
                writer.add_scalar("train/loss", synced["loss"], global_step)
                writer.add_scalar("train/top1_err", synced["top1_err"], global_step)
                writer.add_scalar("train/top5_err", synced["top5_err"], global_step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
                writer.add_scalar("speed/images_per_s", images_per_s, global_step)
                writer.add_scalar("speed/data_wait_fraction", data_time / max(now - start, 1e-9),
                                  global_step)
            if checkpoint_due and on_checkpoint is not None:
                on_checkpoint(step)
            if reduced[6] > 0:
                interrupted = True
                break
        fetch_start = time.perf_counter()
    bar.close()

    elapsed = time.perf_counter() - start
    return {**synced, "step": step, "interrupted": interrupted, "epoch_time_s": elapsed,
            "data_wait_fraction": data_time / max(elapsed, 1e-9),
            "images_per_s": synced["images"] / max(elapsed, 1e-9)}


@torch.inference_mode()
def validate(model, loader, augment: BatchAugment, *, bf16: bool = True, desc: str = "val") -> dict:
    """Single-scale, centre-crop validation (the plateau signal of §3.1), summed over all ranks.

    Each rank sees a disjoint shard (no padded repeats), so every image is counted once.
    """
    device = augment.device
    model.eval()
    sums = torch.zeros(5, device=device, dtype=torch.float64)  # loss*n, top1, top5, n, skipped
    for images, labels, n_skipped in tqdm(loader, desc=desc, unit="batch", leave=False,
                                          disable=not is_main_process(), dynamic_ncols=True):
        sums[4] += n_skipped
        if labels.numel() == 0:
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
            "images": int(reduced[3].item()), "skipped": int(reduced[4].item())}
