"""The validation images as evaluation reads them: decoded once, rescaled to every test scale in loader
workers, handed over a batch at a time as one flat uint8 tensor (`PackedImages`: one shared-memory
transfer a batch, not one per image and scale), and grouped by (Q, H, W) over a large window
(`DenseBuckets`; ImageNet's photos come in a few sizes, so most groups fill).
"""

import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, get_worker_info

from vgg.core.errors import UserError
from vgg.data.batches.loaders import split_unreadable
from vgg.data.batches.transforms import EvalTransform
from vgg.data.datasets import folders as vfolders
from vgg.data.datasets import shards as vshards
from vgg.evaluation.nets import EvalNet

# Scaled images wait in buckets until `batch_size` of one size are there; once more than this many
# batches' worth (or PENDING_BYTES) wait, every bucket is run as it is, so memory stays bounded.
PENDING_LIMIT = 64
PENDING_BYTES = 512 * 2**20


# --- Data ----------------------------------------------------------------------------------------

class MultiScaleTransform:
    """Opened image -> one uint8 [3,H,W] per test scale, in the order given (smallest side Q, no crop, §3.2)."""

    def __init__(self, *, scales: list[int]):
        self.scales = list(scales)

    def __call__(self, image) -> list[torch.Tensor]:
        # Largest Q first: the file is decoded once (at the reduced JPEG scale that suits the largest
        # Q, see vgg.data.batches.transforms.load_rgb) and the smaller scales reuse the decoded pixels.
        scaled = {q: EvalTransform(scale=q)(image) for q in sorted(self.scales, reverse=True)}
        return [scaled[q] for q in self.scales]


def open_val_set(nets: list[EvalNet], val_dir):
    """The validation images at every scale any of `nets` is tested at; their classes must be the nets'."""
    val_dir = Path(val_dir)
    transform = MultiScaleTransform(scales=sorted({q for n in nets for q in n.scales}))
    if vshards.is_shard_dir(val_dir.parent):  # --data is a folder of WebDataset shards (vgg/data/datasets/shards.py)
        dataset = vshards.open_val(val_dir.parent, transform)
    elif not val_dir.is_dir():
        raise UserError(f"validation folder {val_dir} not found: --data must be a root holding val/<wnid>/*")
    else:
        dataset = vfolders.ImageFolder(val_dir, transform)
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
    scale by scale, labels [B], list of Unreadable); unreadable images dropped (see
    vgg.data.batches.loaders.collate_batch)."""
    kept, unreadable = split_unreadable([item[1:] for item in items])
    positions = torch.tensor([item[0] for item in items if item[1] is not None], dtype=torch.int64)
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return positions, PackedImages.pack([image for images, _ in kept for image in images]), labels, unreadable


class DenseBuckets:
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


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f" (class {i} is {x!r} in the checkpoint, {y!r} in the folder)"
    return ""
