"""Testing a trained net the paper's ways (§3.2, §4): dense and multi-crop evaluation, ConvNet fusion.

Per image and test scale Q (the smallest image side after isotropic rescaling, §3.2):

    dense       the net made fully-convolutional (FC layers -> convs) runs on the whole rescaled
                image; its class score map is averaged over space; the same for the horizontally
                flipped image; the two soft-max outputs are averaged.
    multi-crop  a 5x5 regular grid of crops of the training crop size and their flips (50 crops a
                scale, §4.2); the 50 soft-max outputs are averaged.

Soft-max outputs (never logits) are then averaged over scales (Table 4 and 5), over both methods
("multi-crop & dense", Table 5) and over nets (ConvNet fusion, Table 6).

Speed (bench/evaluate.py, docs/benchmarks.md): each image is decoded once and rescaled to every
scale any net needs, in loader workers; a worker hands a whole batch over as one flat uint8 tensor
(`PackedImages`: one shared-memory transfer a batch, not one per image and scale). The main process
groups the scaled images by (Q, H, W) over a large window (`_DenseBuckets`; ImageNet's photos come in
a few sizes, so most groups fill) and runs each full group as one batch, dense and multi-crop alike:
the 50 crops of equal-size images are cut from the whole batch at once. The nets run channels-last
(on the CPU too, unless channels_last=False) and, on CUDA, in bf16 autocast (unless bf16=False).
Distributed: each rank evaluates a disjoint shard (no padded repeats), and only per-class counts
are summed across ranks, so every image is counted exactly once.
"""

import copy
import functools
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, get_worker_info

from vgg import data as vdata
from vgg import shards as vshards
from vgg.checkpoint import EVAL_KEYS, build_model_from_checkpoint, load_checkpoint
from vgg.config import speed_flag
from vgg.distributed import all_reduce_sum, batches_side_by_side, progress_bar, shard_indices
from vgg.engine import autocast_context, topk_hits
from vgg.errors import UserError
from vgg import pretrained
from vgg.zoo import to_dense
from vgg.transforms import EvalTransform, normalize

GRID = 5  # a 5x5 grid of crops per scale (§4.2)
SCALE_STEP = 32  # fixed-S nets are tested at Q = {S-32, S, S+32} (§4.2, Table 4)
CROPS_PER_FORWARD = 250  # multi-crop: the 50 crops of 5 images per forward pass
# Scaled images wait in buckets until `batch_size` of one size are there; once more than this many
# batches' worth (or PENDING_BYTES) wait, every bucket is run as it is, so memory stays bounded.
PENDING_LIMIT = 64
PENDING_BYTES = 512 * 2**20
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


# --- Nets ----------------------------------------------------------------------------------------

@dataclass
class EvalNet:
    """A trained net ready for testing, with what its checkpoint says about how it was trained."""

    name: str
    path: Path
    model: nn.Module  # the VGG as trained (multi-crop)
    classes: list[str]
    mean_rgb: list[float]
    crop_size: int
    scale_min: int
    scale_max: int
    scales: list[int]  # the test scales Q
    config: dict  # the run config saved in the checkpoint

    @property
    def train_s(self) -> str:
        return train_scale_text(self.scale_min, self.scale_max)


def default_checkpoint(root="checkpoints") -> Path:
    """The newest `<root>/<run>/best.pt` by modification time."""
    found = sorted(Path(root).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no checkpoint found under {root}/*/best.pt: train a net first "
                        "(python train.py) or pass --checkpoint PATH")
    return found[-1]


def load_eval_net(path, *, scales=None, single_scale: bool = False) -> EvalNet:
    """Load a checkpoint for testing; the test scales follow its training scales unless `scales` is given.

    `path` may also be a torchvision VGG state dict (.pth) or "torchvision:vgg16" (its published weights,
    vgg.pretrained); those take the classes of the data they meet (torchvision's order is sorted wnids).
    """
    if str(path).startswith("torchvision:"):
        tv_name, state_dict = pretrained.torchvision_state_dict(str(path))
        ckpt = pretrained.checkpoint_from_state_dict(state_dict, str(path))
        path = Path("checkpoints") / f"torchvision-{tv_name}" / "IMAGENET1K_V1"  # names the results' folder
    else:
        path = Path(path)
        if path.is_dir():
            path = path / "best.pt"
        ckpt = load_checkpoint(path, require=EVAL_KEYS)
    model = build_model_from_checkpoint(ckpt, path)
    model.eval()
    config = ckpt.get("config", {})
    crop = model.image_size
    scale_min, scale_max = config.get("scale_min"), config.get("scale_max", config.get("scale_min"))
    if scales:
        too_small = [q for q in scales if q < crop]
        if too_small:
            raise UserError(f"--scales {', '.join(map(str, too_small))} below the net's crop size {crop}: "
                            f"every Q must be >= {crop}")
        test_scales = sorted(set(scales))
    elif scale_min is None:
        raise UserError(f"{path} does not record its training scale (config 'scale_min'): pass --scales")
    else:
        test_scales = eval_scales(scale_min, scale_max, crop, single_scale=single_scale)
    run_name = config.get("run_name") or path.parent.name
    name = model.arch_name if run_name == model.arch_name else f"{model.arch_name} ({run_name})"
    return EvalNet(name=name, path=path, model=model, classes=list(ckpt["classes"]),
                   mean_rgb=list(vdata.DatasetStats.from_dict(ckpt["stats"]).mean_rgb), crop_size=crop,
                   scale_min=scale_min if scale_min is not None else 0,
                   scale_max=scale_max if scale_max is not None else 0, scales=test_scales, config=config)


# --- Data ----------------------------------------------------------------------------------------

class MultiScaleTransform:
    """Opened image -> one uint8 [3,H,W] per test scale, in the order given (smallest side Q, no crop, §3.2)."""

    def __init__(self, *, scales: list[int]):
        self.scales = list(scales)

    def __call__(self, image) -> list[torch.Tensor]:
        # Largest Q first: the file is decoded once (at the reduced JPEG scale that suits the largest
        # Q, see vgg.transforms.load_rgb) and the smaller scales reuse the decoded pixels.
        scaled = {q: EvalTransform(scale=q)(image) for q in sorted(self.scales, reverse=True)}
        return [scaled[q] for q in self.scales]


def open_val_set(nets: list[EvalNet], val_dir):
    """The validation images at every scale any of `nets` is tested at; their classes must be the nets'."""
    val_dir = Path(val_dir)
    transform = MultiScaleTransform(scales=sorted({q for n in nets for q in n.scales}))
    if vshards.is_shard_dir(val_dir.parent):  # --data is a folder of WebDataset shards (vgg/shards.py)
        dataset = vshards.open_val(val_dir.parent, transform)
    elif not val_dir.is_dir():
        raise UserError(f"validation folder {val_dir} not found: --data must be a root holding val/<wnid>/*")
    else:
        dataset = vdata.ImageFolder(val_dir, transform)
    for net in nets:
        if not net.classes and net.model.num_classes == len(dataset.classes):  # torchvision's weights
            net.classes = list(dataset.classes)
        if net.classes != dataset.classes:
            raise UserError(f"{net.path} was trained on {len(net.classes)} classes, {val_dir} has "
                            f"{len(dataset.classes)}{_first_difference(net.classes, dataset.classes)}: "
                            "they must be the same")
    return dataset


class ShardDataset(Dataset):
    """This rank's images, each tagged with its position in the shard (to file its results)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return i, *self.dataset[self.indices[i]]  # (i, images, label) or (i, None, label, Unreadable)


class PackedImages(NamedTuple):
    """uint8 images of any sizes in one flat tensor, and their shapes.

    A loader worker hands each tensor of a batch over through shared memory, and each transfer has
    a fixed cost: one flat tensor a batch crosses 2.4-3x faster than one tensor per image and scale
    (issue 16). In a worker the flat tensor is written straight into shared memory (as default_collate does).
    """

    pixels: torch.Tensor  # uint8 [sum of the images' sizes]
    shapes: list[tuple[int, ...]]  # each image's (C, H, W), in order

    @classmethod
    def pack(cls, images: list[torch.Tensor]) -> "PackedImages":
        numel = sum(image.numel() for image in images)
        out = None
        if get_worker_info() is not None and images:
            out = images[0].new(images[0]._typed_storage()._new_shared(numel, device=images[0].device))
        flat = [image.reshape(-1) for image in images]
        pixels = torch.cat(flat, out=out) if flat else torch.empty(0, dtype=torch.uint8)
        return cls(pixels, [tuple(image.shape) for image in images])

    def unpack(self) -> list[torch.Tensor]:
        """The images again: views into `pixels`."""
        sizes = [math.prod(shape) for shape in self.shapes]
        return [flat.view(shape) for flat, shape in zip(self.pixels.split(sizes), self.shapes)]


def collate_shard(items):
    """-> (positions [B], PackedImages of each readable image's scaled copies, image by image and
    scale by scale, labels [B], list of Unreadable); unreadable images dropped (see vgg.data.collate_batch)."""
    kept, unreadable = vdata.split_unreadable([item[1:] for item in items])
    positions = torch.tensor([item[0] for item in items if item[1] is not None], dtype=torch.int64)
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return positions, PackedImages.pack([image for images, _ in kept for image in images]), labels, unreadable


# --- The evaluation loop -------------------------------------------------------------------------

def evaluate_dataset(nets: list[EvalNet], val_dir, *, methods=(DENSE,), device=torch.device("cpu"),
                     batch_size: int = 32, workers: int = 4, bf16: bool | str = "auto", channels_last: bool | str = "auto",
                     rank: int = 0, world_size: int = 1, progress: bool = True,
                     progress_every_s: float = 30.0) -> dict:
    """Test `nets` on the images under `val_dir` with the given methods; returns the results, summed over ranks.

    One row per net and method (plus "multi-crop & dense" when both are asked for), and with
    several nets the fused rows (soft-max averaged over nets). Each row has top-1/top-5 error and
    per-class accuracy. `rank`/`world_size`: this process's shard of the images (every image is
    evaluated on exactly one rank). Keeps each net's soft-max for this rank's images in memory
    (images x classes floats per net and method). `bf16`, `channels_last`: config.speed_flag values
    ("auto": bf16 on CUDA; channels-last on CUDA and the CPU, where it runs these nets about 1.6x as
    fast as the plain layout, bench/evaluate.py); the nets in `nets` are left as they are.
    """
    methods = [m for m in (DENSE, MULTI_CROP) if m in methods]
    if not methods:
        raise UserError(f"no evaluation method given; allowed: {DENSE}, {MULTI_CROP}")
    if not nets:
        raise UserError("no net to evaluate")
    device = torch.device(device)
    all_scales = sorted({q for net in nets for q in net.scales})
    dataset = open_val_set(nets, val_dir)
    val_dir, classes = Path(val_dir), dataset.classes
    num_classes = len(classes)
    indices = shard_indices(len(dataset), rank, world_size)
    loader = vdata.build_loader(ShardDataset(dataset, indices), batch_size=batch_size, shuffle=False,
                                workers=workers, collate_fn=collate_shard)

    runners = [_NetRunner(net, device, speed_flag(channels_last, device, auto_on_cpu=True)) for net in nets]
    # probs[net index][method]: this rank's images x classes, summed over that net's scales; kept on
    # the device so the loop never waits for a copy back to the host.
    probs = [{m: torch.zeros(len(indices), num_classes, device=device) for m in methods} for _ in nets]
    # How many scale results each image received, to prove nothing is counted twice or missed.
    filed = [{m: torch.zeros(len(indices), dtype=torch.int64) for m in methods} for _ in nets]
    labels = torch.full((len(indices),), -1, dtype=torch.int64)
    skipped = 0

    def file(net_i: int, method: str, positions: torch.Tensor, p: torch.Tensor) -> None:
        probs[net_i][method].index_add_(0, positions.to(device), p / len(nets[net_i].scales))
        filed[net_i][method].index_add_(0, positions, torch.ones_like(positions))

    # Scaled images wait in buckets by (Q, H, W) until a batch of one size is full: each batch then
    # goes through the net at once, for both methods (crops are cut from the whole batch).
    buckets = _DenseBuckets(pin_memory=device.type == "cuda")
    limit = PENDING_LIMIT * batch_size

    def forward(key, images) -> list[tuple[int, str, torch.Tensor]]:
        """(net index, method, soft-max) of every net tested at this batch's scale."""
        return [(net_i, method, p) for net_i, runner in enumerate(runners) if key[0] in nets[net_i].scales
                for method, p in runner.evaluate(images, methods).items()]

    def run(key, positions, images) -> None:
        for net_i, method, p in forward(key, images):
            file(net_i, method, positions, p)

    def forward_in_thread(batch) -> list[tuple[int, str, torch.Tensor]]:
        with torch.inference_mode(), autocast_context(device, bf16):  # both are per thread
            return forward(batch[0], batch[2])

    # A with-block closes the bar on an error too, so an error line starts on a line of its own.
    with progress_bar(total=len(indices), unit="img", desc="evaluate", every_s=progress_every_s,
                      enabled=progress) as bar, torch.inference_mode(), autocast_context(device, bf16):
        for positions, packed, batch_labels, unreadable in loader:
            vdata.warn_unreadable(unreadable)  # once per file, from this process (not the workers)
            skipped += len(unreadable)
            bar.update(len(positions) + len(unreadable))  # loaded; the net may run on them later
            if len(positions) == 0:
                continue
            labels[positions] = batch_labels
            scaled = iter(packed.unpack())  # image by image, each at every scale in all_scales' order
            for pos in positions.tolist():
                for q in all_scales:
                    image = next(scaled)
                    # A copy, so that the worker's shared buffer is freed once this batch is done.
                    buckets.add((q, *image.shape[1:]), pos, image.clone())
            for key, pos, batch in buckets.pop_full(batch_size, limit, PENDING_BYTES):
                run(key, pos, batch)
        # The loader is spent, its workers idle. On a CPU their cores now run the batches still waiting
        # (sizes with fewer images than a batch: on the demo set nearly all), several side by side, each
        # on torch's threads: small batches run ~1.8x faster so than split over 2 threads (bench/evaluate.py).
        waiting = list(buckets.pop_all())
        side_by_side = batches_side_by_side(device.type)
        if side_by_side > 1 and len(waiting) > 1:
            if MULTI_CROP in methods:
                for runner in runners:
                    runner.model  # copied here, not by two threads at once
            with ThreadPoolExecutor(side_by_side) as pool:
                for (key, pos, _), outputs in zip(waiting, pool.map(forward_in_thread, waiting)):
                    for net_i, method, p in outputs:
                        file(net_i, method, pos, p)
        else:
            for key, pos, batch in waiting:
                run(key, pos, batch)

    readable = labels >= 0
    for net_i, net in enumerate(nets):
        for m in methods:
            expected = readable.long() * len(net.scales)
            if not torch.equal(filed[net_i][m], expected):  # a bug, not bad input
                raise RuntimeError(f"{m} results for {net.name} were filed {filed[net_i][m].tolist()} times, "
                                   f"expected {expected.tolist()}")

    rows = _result_rows(nets, methods, probs)
    # Per-class sums over this rank's readable images, then one reduction over all ranks.
    readable, y = readable.to(device), labels[readable].to(device)
    sums = torch.zeros(len(rows) * 2 + 1, num_classes, dtype=torch.float64, device=device)
    for row_i, row in enumerate(rows):
        hits = topk_hits(row.pop("probs")[readable], y)
        for k_i in range(2):
            sums[row_i * 2 + k_i] = torch.bincount(y[hits[k_i]], minlength=num_classes).double()
    sums[-1] = torch.bincount(y, minlength=num_classes).double()
    flat = torch.cat([sums.flatten(), torch.tensor([float(skipped)], dtype=torch.float64, device=device)])
    flat = all_reduce_sum(flat).cpu()
    skipped = int(flat[-1].item())
    sums = flat[:-1].view(len(rows) * 2 + 1, num_classes)
    class_images = sums[-1]
    total = int(class_images.sum().item())
    if total == 0:
        raise UserError(f"no readable image in {val_dir} ({skipped} skipped)")
    for row_i, row in enumerate(rows):
        top1, top5 = sums[row_i * 2], sums[row_i * 2 + 1]
        row["top1_err"] = 100.0 * (1.0 - top1.sum().item() / total)
        row["top5_err"] = 100.0 * (1.0 - top5.sum().item() / total)
        row["images"] = total
        row["per_class_top1_acc"] = _per_class(top1, class_images)
        row["per_class_top5_acc"] = _per_class(top5, class_images)
    return {"val_dir": str(val_dir), "images": total, "skipped": skipped, "world_size": world_size,
            "methods": methods, "classes": classes, "class_images": [int(n) for n in class_images.tolist()],
            "nets": [{"name": net.name, "checkpoint": str(net.path), "train_s": net.train_s,
                      "test_q": net.scales} for net in nets],
            "rows": rows}


class _NetRunner:
    """One net on the device: normalisation with its training mean RGB, its dense twin, its crop size.

    Works on copies of the net, so the caller's net keeps its device and layout.
    """

    def __init__(self, net: EvalNet, device: torch.device, channels_last: bool):
        self.net, self.device, self.channels_last = net, device, channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.dense_model = to_dense(net.model).to(device, memory_format=self.memory_format).eval()  # a copy
        # On the device once: a list of numbers would be copied to it on every batch (blocking on CUDA).
        self.mean_rgb = torch.tensor(net.mean_rgb, dtype=torch.float32, device=device)

    @functools.cached_property
    def model(self) -> nn.Module:
        """The net as trained (multi-crop), copied on first use: a dense-only run does not pay for it."""
        return copy.deepcopy(self.net.model).to(self.device, memory_format=self.memory_format).eval()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return normalize(images, self.mean_rgb)  # no colour shift at test time

    def evaluate(self, images: torch.Tensor, methods) -> dict[str, torch.Tensor]:
        """An equal-size uint8 batch [B,3,H,W] -> {method: soft-max [B, classes]}, normalised once for both."""
        x = self.prepare(images)
        out = {}
        if DENSE in methods:
            out[DENSE] = dense_probs(self.dense_model, x)
        if MULTI_CROP in methods:
            out[MULTI_CROP] = multi_crop_probs(self.model, x, self.net.crop_size, channels_last=self.channels_last)
        return out


class _DenseBuckets:
    """Scaled images waiting to be evaluated, grouped by (Q, H, W) so that each batch has one size."""

    def __init__(self, pin_memory: bool = False):
        self.pending: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        self.count = self.bytes = 0
        self.pin_memory = pin_memory  # batches stacked into page-locked memory: their copy to CUDA does not block

    def add(self, key: tuple, position: int, image: torch.Tensor) -> None:
        self.pending.setdefault(key, []).append((position, image))
        self.count += 1
        self.bytes += image.numel() * image.element_size()

    def pop_full(self, batch_size: int, limit: int, max_bytes: int | None = None):
        """Yield the full batches; if more than `limit` images (or `max_bytes`) still wait, everything
        (bounds memory)."""
        flush_all = self.count > limit or (max_bytes is not None and self.bytes > max_bytes)
        for key in list(self.pending):
            items = self.pending[key]
            while len(items) >= batch_size or (flush_all and items):
                batch, items = items[:batch_size], items[batch_size:]
                yield self._take(key, batch)
            if items:
                self.pending[key] = items
            else:
                del self.pending[key]

    def pop_all(self):
        pending, self.pending = self.pending, {}
        for key, items in pending.items():
            yield self._take(key, items)

    def _take(self, key, items):
        self.count -= len(items)
        self.bytes -= sum(im.numel() * im.element_size() for _, im in items)
        images = [im for _, im in items]
        batch = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=self.pin_memory)
        return key, torch.tensor([p for p, _ in items], dtype=torch.int64), torch.stack(images, out=batch)


def _result_rows(nets: list[EvalNet], methods: list[str], probs: list[dict]) -> list[dict]:
    """Table rows (each still holding its soft-max) in the order of the paper's tables."""
    rows = []
    for net, net_probs in zip(nets, probs):
        if len(methods) == 2:
            net_probs[BOTH] = fuse([net_probs[DENSE], net_probs[MULTI_CROP]])
        for m in net_probs:
            rows.append({"net": net.name, "checkpoint": str(net.path), "train_s": net.train_s,
                         "test_q": ",".join(map(str, net.scales)), "method": m, "probs": net_probs[m]})
    if len(nets) > 1:  # ConvNet fusion, Table 6
        for m in probs[0]:
            rows.append({"net": "fusion: " + " + ".join(net.name for net in nets), "checkpoint": "",
                         "train_s": "-", "test_q": "-", "method": m,
                         "probs": fuse([net_probs[m] for net_probs in probs])})
    return rows


def _per_class(hits: torch.Tensor, counts: torch.Tensor) -> list[float | None]:
    """Accuracy in percent per class; None for a class with no image in the set."""
    return [100.0 * h / n if n else None for h, n in zip(hits.tolist(), counts.tolist())]


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f" (class {i} is {x!r} in the checkpoint, {y!r} in the folder)"
    return ""


# --- Reporting -----------------------------------------------------------------------------------

COLUMNS = ("net", "train S", "test Q", "method", "top-1 err (%)", "top-5 err (%)")


def _cells(row: dict) -> list[str]:
    return [row["net"], row["train_s"], row["test_q"], row["method"], f"{row['top1_err']:.2f}",
            f"{row['top5_err']:.2f}"]


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The results in the layout of the paper's Tables 3-6, as aligned text or a Markdown table."""
    cells = [list(COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(r[c]) for r in cells) for c in range(len(COLUMNS))]
    numeric = {4, 5}

    def line(r):
        parts = [cell.rjust(w) if c in numeric else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths))]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    out = [line(cells[0])]
    if markdown:
        out.append("|" + "|".join("-" * (w + 1) + (":" if c in numeric else "-") for c, w in enumerate(widths)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def format_per_class(result: dict, row: dict, count: int = 5) -> str:
    """The `count` best and worst classes by top-1 accuracy for one result row."""
    scored = [(acc, wnid) for wnid, acc in zip(result["classes"], row["per_class_top1_acc"]) if acc is not None]
    scored.sort(key=lambda t: (-t[0], t[1]))
    count = min(count, math.ceil(len(scored) / 2))

    def show(items):
        return ", ".join(f"{wnid} {acc:.1f}%" for acc, wnid in items)

    return (f"per-class top-1 accuracy ({row['net']}, {row['method']}):\n"
            f"  best:  {show(scored[:count])}\n  worst: {show(scored[::-1][:count])}")


def format_report(result: dict) -> str:
    """What evaluate.py prints: the table, the best/worst classes of the last row, the image counts."""
    lines = [format_table(result["rows"]), "", format_per_class(result, result["rows"][-1]), "",
             f"{result['images']} images evaluated, {result['skipped']} unreadable images skipped"]
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The Markdown file written next to the JSON: the table and the run's facts."""
    nets = "\n".join(f"- {n['name']}: `{n['checkpoint']}` (train S {n['train_s']}, test Q "
                     f"{','.join(map(str, n['test_q']))})" for n in result["nets"])
    return (f"# Evaluation on `{result['val_dir']}`\n\n{format_table(result['rows'], markdown=True)}\n\n"
            f"{result['images']} images evaluated, {result['skipped']} unreadable images skipped.\n\n"
            f"Nets:\n{nets}\n")


def write_results(result: dict, out) -> tuple[Path, Path]:
    """Write `<out>.json` (everything, per-class accuracy included) and `<out>.md` (the table)."""
    out = Path(out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.parent / (out.name + ".json"), out.parent / (out.name + ".md")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(format_markdown(result))
    return json_path, md_path


def write_tensorboard(result: dict, net: EvalNet, name: str) -> Path:
    """An "evaluation" section in the TensorBoard folder of the run that trained `net`
    (<log_dir>/<run_name> from its checkpoint's config), beside the training curves: the table as
    text (TEXT tab) and each row's per-class top-1 accuracy as a histogram (HISTOGRAMS tab), under
    tags `evaluation/<name>/...` so that several evaluations of a run stay apart. Returns the folder."""
    from torch.utils.tensorboard import SummaryWriter  # only evaluate.py needs it

    folder = Path(net.config.get("log_dir") or "runs") / net.config.get("run_name", net.path.parent.name)
    with SummaryWriter(str(folder)) as writer:
        nets = ", ".join(f"{n['name']} (`{n['checkpoint']}`)" for n in result["nets"])
        writer.add_text(f"evaluation/{name}/table",
                        f"{format_table(result['rows'], markdown=True)}\n\n{result['images']} images of "
                        f"`{result['val_dir']}` evaluated, {result['skipped']} unreadable skipped; nets: {nets}", 0)
        for row in result["rows"]:
            accuracy = [a for a in row["per_class_top1_acc"] if a is not None]
            if accuracy:
                label = re.sub(r"[^\w.&+-]+", "_", f"{row['net']} {row['method']}").strip("_")
                writer.add_histogram(f"evaluation/{name}/per_class_top1_acc/{label}", torch.tensor(accuracy), 0)
    return folder
