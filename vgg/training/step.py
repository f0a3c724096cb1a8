"""One training step and what it needs: the batch augmentation on the device, autocast, top-k hits.

Images arrive from the loader as uint8 (decoded, rescaled, cropped and flipped in workers, §3.1);
`BatchAugment` turns a whole batch into float on the device, subtracts the mean RGB (§2.1) and adds
the PCA colour shift (AlexNet §4.1).
"""

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from vgg.config import speed_flag
from vgg.data.batches.transforms import TrainCrop, color_shift, normalize
from vgg.data.datasets.stats import DatasetStats
from vgg.models.zoo import main_logits, training_loss


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf: the run stops, the last good checkpoint is kept."""


# What a NonFiniteLossError's line ends with: true, since no save holds weights that have not given a finite
# loss (the loop's next sync confirms a mid-epoch save, validation an epoch's; issue 34).
NOT_SAVED = "stopping. The last good checkpoint is untouched; try a lower --lr"


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

    A training batch is a `vgg.data.batches.transforms.TrainCrop`: the images and each one's colour-shift alphas,
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
    # fp32 cross-entropy, plus the auxiliary heads' of GoogLeNet and Inception-v3 (vgg.models.zoo)
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
