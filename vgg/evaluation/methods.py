"""The paper's test-time methods (§3.2, §4): test scales, dense evaluation, the multi-crop grid, fusion.

Per image and test scale Q (the smallest image side after isotropic rescaling, §3.2):

    dense       the net made fully-convolutional (FC layers -> convs) runs on the whole rescaled
                image; its class score map is averaged over space; the same for the horizontally
                flipped image; the two soft-max outputs are averaged.
    multi-crop  a 5x5 regular grid of crops of the training crop size and their flips (50 crops a
                scale, §4.2); the 50 soft-max outputs are averaged.

Soft-max outputs (never logits) are then averaged over scales (Table 4 and 5), over both methods
("multi-crop & dense", Table 5) and over nets (ConvNet fusion, Table 6).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from vgg.core.errors import UserError
from vgg.training.step import topk_hits

GRID = 5  # a 5x5 grid of crops per scale (§4.2)
SCALE_STEP = 32  # fixed-S nets are tested at Q = {S-32, S, S+32} (§4.2, Table 4)
CROPS_PER_FORWARD = 250  # multi-crop: the 50 crops of 5 images per forward pass
DENSE, MULTI_CROP, BOTH = "dense", "multi-crop", "multi-crop & dense"


# --- Scales ------------------------------------------------------------------------------------

def eval_scales(scale_min: int, scale_max: int, crop_size: int, *, single_scale: bool = False) -> list[int]:
    """The test scales Q for a net trained at S in [scale_min, scale_max] (scale_min == scale_max: fixed S).

    Single scale (Table 3): Q = S, or (S_min + S_max) / 2 for a jittered net. Multi-scale (Table 4):
    {S-32, S, S+32} for fixed S, {S_min, (S_min+S_max)/2, S_max} for jittered S. A crop (or the
    dense net's receptive field of the first FC layer) needs Q >= crop_size, so smaller Q are raised
    to crop_size and duplicates dropped: a scaled-down demo net with S=36, crop 32 gets {32, 36, 68}.
    """
    if single_scale:
        scales = [(scale_min + scale_max) // 2]
    elif scale_min == scale_max:
        scales = [scale_min - SCALE_STEP, scale_min, scale_min + SCALE_STEP]
    else:
        scales = [scale_min, (scale_min + scale_max) // 2, scale_max]
    return sorted({max(q, crop_size) for q in scales})


def train_scale_text(scale_min: int, scale_max: int) -> str:
    """Training S the way the paper's tables write it: "256", or "[256;512]" when jittered."""
    return str(scale_min) if scale_min == scale_max else f"[{scale_min};{scale_max}]"


# --- Multi-crop ----------------------------------------------------------------------------------

def crop_grid_positions(h: int, w: int, crop: int, n: int = GRID) -> list[tuple[int, int]]:
    """(top, left) of an n x n grid of crop x crop windows evenly spread over an h x w image.

    The first row/column touches the top/left edge, the last the bottom/right edge; row-major order.
    """
    if h < crop or w < crop:
        raise UserError(f"image {h}x{w} is smaller than the {crop}x{crop} crop: test scales must be >= {crop}")
    if n < 1:
        raise UserError(f"the crop grid needs n >= 1, got {n}")

    def spread(size: int) -> list[int]:
        if n == 1:
            return [(size - crop) // 2]
        return [round(i * (size - crop) / (n - 1)) for i in range(n)]

    return [(top, left) for top in spread(h) for left in spread(w)]


def multi_crops(image: torch.Tensor, crop: int, n: int = GRID, flip: bool = True) -> torch.Tensor:
    """[C,H,W] image -> [n*n (*2 with flips), C, crop, crop]: the grid crops, then their mirror images.

    A batch of equal-size images [B,C,H,W] -> [B, n*n (*2), C, crop, crop], the same crops per image.
    """
    crops = torch.stack([image[..., top:top + crop, left:left + crop]
                         for top, left in crop_grid_positions(image.shape[-2], image.shape[-1], crop, n)], dim=-4)
    if flip:
        crops = torch.cat([crops, crops.flip(-1)], dim=-4)
    return crops


def multi_crop_probs(model: nn.Module, images, crop: int, *, n: int = GRID,
                     flip: bool = True, max_batch: int = CROPS_PER_FORWARD,
                     channels_last: bool = False) -> torch.Tensor:
    """Soft-max averaged over each image's grid crops and flips (§4.2): float images -> [B, classes].

    `images`: a list of [3,H,W] images, which may differ in size (their crops all have the net's
    input size, so the crops of several images are batched together), or a batch [B,3,H,W] of
    equal-size images (cropped all at once, a few images at a time). `max_batch` crops per forward pass.
    """
    per_image = n * n * (2 if flip else 1)

    def chunks():
        if torch.is_tensor(images) and images.dim() == 4:
            for group in images.split(max(1, max_batch // per_image)):
                yield from multi_crops(group, crop, n, flip).flatten(0, 1).split(max_batch)
        else:
            yield from torch.cat([multi_crops(image, crop, n, flip) for image in images]).split(max_batch)

    probs = []
    for chunk in chunks():
        if channels_last:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        probs.append(F.softmax(model(chunk).float(), dim=1))
    return torch.cat(probs).view(len(images), per_image, -1).mean(dim=1)


# --- Dense ---------------------------------------------------------------------------------------

def dense_probs(dense_model: nn.Module, images: torch.Tensor, *, flip: bool = True) -> torch.Tensor:
    """Dense evaluation (§3.2) of a batch of equal-size float images [B,3,H,W] -> soft-max [B, classes].

    The class score map of the fully-convolutional net is averaged over space (sum-pooled), turned
    into a soft-max; with `flip` the same for the mirrored images, and the two soft-max are averaged.
    """
    batch = images.shape[0]
    x = torch.cat([images, images.flip(-1)]) if flip else images
    scores = dense_model(x).float().mean(dim=(2, 3))
    probs = F.softmax(scores, dim=1)
    return probs.view(2, batch, -1).mean(dim=0) if flip else probs


# --- Metrics ------------------------------------------------------------------------------------

def topk_errors(probs: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Top-k error in percent for each k (ILSVRC's measures, §4): {1: top-1 err, 5: top-5 err}."""
    if labels.numel() == 0:
        raise UserError("no images to score")
    hits = topk_hits(probs, labels, ks).double().mean(dim=1)
    return {k: 100.0 * (1.0 - h.item()) for k, h in zip(ks, hits)}


def fuse(probs_list: list[torch.Tensor]) -> torch.Tensor:
    """ConvNet fusion (§4.3, Table 6): the soft-max outputs of several nets averaged."""
    if not probs_list:
        raise UserError("nothing to fuse")
    return torch.stack(probs_list).mean(dim=0)
