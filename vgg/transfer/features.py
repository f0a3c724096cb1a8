"""Appendix B's image descriptor, extracted with the dense net of evaluation and cached on disk.

Per net, image and scale Q: the image rescaled isotropically to smallest side Q (as in §3.2), the net
applied densely with its last (1000-way) layer dropped, the 4096-D activations of the penultimate layer
(FC2 after its ReLU, Caffe's fc7) averaged over the whole map ("global average pooling"), then averaged
with those of the horizontally flipped image. That pooled descriptor is what the cache keeps, in float32;
normalising and combining scales and nets is the classifier's (vgg.transfer.classifier), so another
--combine or --svm-c costs no forward pass.

Cache: <cache>/<net key>/q<Q>-<fp32|bf16>/*.pt, each file a chunk of (image key, descriptor) written
atomically every FLUSH_IMAGES images and when the run stops (Ctrl-C too): a stopped extraction goes on
from the chunks written. The net key is a hash of the checkpoint's contents (its zip records' CRC-32s,
or the torchvision weights' file name), the image key the file's path under the dataset root, its size
and its modification time: a retrained net or a changed image is extracted again.
"""

import hashlib
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import Dataset

from vgg.config import speed_flag
from vgg.core.distributed import all_reduce_sum, shard_indices
from vgg.core.errors import UserError
from vgg.core.progress import get_logger, progress_bar
from vgg.data.batches import loaders as vloaders
from vgg.data.batches.decode import Unreadable
from vgg.data.batches.jpeg import DECODE_ERRORS
from vgg.data.batches.transforms import normalize
from vgg.data.datasets import folders as vfolders
from vgg.evaluation.inputs import (
    PENDING_BYTES,
    PENDING_LIMIT,
    MultiScaleTransform,
    ShardDataset,
    DenseBuckets,
    collate_shard,
)
from vgg.evaluation.nets import EvalNet, load_eval_net
from vgg.models import pretrained as vpretrained
from vgg.models.zoo import VGG_ARCHS, to_dense
from vgg.training.step import autocast_context

DESCRIPTOR_VERSION = 1  # part of every net key: a change to what is extracted starts a new cache
FLUSH_IMAGES = 256  # descriptors held in memory before a chunk is written


# --- The net ---------------------------------------------------------------------------------------

@dataclass
class FeatureNet:
    """A net under test as a descriptor: its scales, and the key its descriptors are cached under."""

    net: EvalNet
    key: str

    @property
    def name(self) -> str:
        return self.net.name

    @property
    def arch(self) -> str:
        return self.net.model.arch_name


def load_feature_net(spec, scales: list[int]) -> FeatureNet:
    """A checkpoint (or 'torchvision:vgg16') as a descriptor at test scales `scales`; VGG nets only."""
    net = load_eval_net(spec, scales=scales)
    if net.model.arch_name not in VGG_ARCHS:
        raise UserError(f"{spec} holds net {net.model.arch_name}: Appendix B's descriptor is a VGG's penultimate "
                        f"layer; transfer.py takes nets {', '.join(VGG_ARCHS)}")
    return FeatureNet(net, net_key(spec))


def net_key(spec) -> str:
    """A short hash of what decides the descriptors: the weights (a checkpoint's zip records by their CRC-32s
    and sizes, names without the archive's folder, which follows the file name; a legacy file's bytes) and
    DESCRIPTOR_VERSION."""
    digest = hashlib.sha256(f"descriptor {DESCRIPTOR_VERSION}\n".encode())
    if str(spec).startswith("torchvision:"):
        digest.update(f"{spec} {vpretrained.cache_file(str(spec).split(':', 1)[1]).name}".encode())
        return digest.hexdigest()[:16]
    path = Path(spec) / "best.pt" if Path(spec).is_dir() else Path(spec)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename.split("/", 1)[-1]):
                digest.update(f"{info.filename.split('/', 1)[-1]} {info.CRC} {info.file_size}\n".encode())
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def penultimate(model: nn.Module) -> nn.Module:
    """The dense net (§3.2) without its last layer: image -> [B, fc_width, h, w], FC2's activations after
    its ReLU at every position (the dropout layers are identities in eval mode)."""
    dense = to_dense(model)
    return nn.Sequential(dense.features, dense.classifier[:5]).eval()


def pooled_descriptors(net: nn.Module, images: torch.Tensor, *, flip: bool = True) -> torch.Tensor:
    """Float images [B, 3, H, W] -> [B, D]: the activation map averaged over space, and averaged with that
    of the mirrored images (one forward pass for both)."""
    batch = images.shape[0]
    x = torch.cat([images, images.flip(-1)]) if flip else images
    pooled = net(x).float().mean(dim=(2, 3))
    return pooled.view(2, batch, -1).mean(dim=0) if flip else pooled


class _Extractor:
    """One net on the device: its penultimate dense form and its training mean RGB (a copy of the net)."""

    def __init__(self, fnet: FeatureNet, device: torch.device, channels_last: bool):
        self.device, self.channels_last = device, channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = penultimate(fnet.net.model).to(device, memory_format=memory_format)
        self.mean_rgb = torch.tensor(fnet.net.mean_rgb, dtype=torch.float32, device=device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return pooled_descriptors(self.net, normalize(x, self.mean_rgb)).cpu()


# --- The cache ------------------------------------------------------------------------------------

def image_keys(root: Path, images: list[str]) -> list[str]:
    """Each image's cache key: its path under the root, size and modification time; a missing file gets
    one that no chunk holds (it is then met, and reported, as unreadable)."""
    keys = []
    for name in images:
        try:
            st = os.stat(root / name)
            keys.append(f"{name}|{st.st_size}|{st.st_mtime_ns}")
        except OSError:
            keys.append(f"{name}|missing")
    return keys


class FeatureStore:
    """The descriptors of one net at one scale and precision: a folder of chunks."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self) -> dict[str, torch.Tensor]:
        """{image key: descriptor} of every chunk; a chunk that cannot be read is left out (extracted again)."""
        found = {}
        for path in sorted(self.folder.glob("*.pt")) if self.folder.is_dir() else []:
            try:
                chunk = torch.load(path, map_location="cpu", weights_only=True)
                found.update(zip(chunk["keys"], chunk["descriptors"]))
            except Exception as e:  # a damaged file: its images are extracted again
                get_logger().warning(f"warning: feature cache {path} unreadable ({type(e).__name__}), "
                                     "extracting its images again")
        return found

    def write(self, keys: list[str], descriptors: torch.Tensor, rank: int) -> None:
        """One chunk, atomically (written beside, then renamed): a stop never leaves half a chunk."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{rank}-{time.time_ns()}-{len(keys)}.pt"
        tmp = self.folder / f".{name}.tmp"
        torch.save({"keys": list(keys), "descriptors": descriptors.contiguous()}, tmp)
        os.replace(tmp, self.folder / name)


def stores_of(fnet: FeatureNet, cache: Path, bf16: bool) -> dict[int, FeatureStore]:
    precision = "bf16" if bf16 else "fp32"
    return {q: FeatureStore(Path(cache) / fnet.key / f"q{q}-{precision}") for q in fnet.net.scales}


class _ChunkWriter:
    """Descriptors waiting to be written, per scale; written every FLUSH_IMAGES and at the end."""

    def __init__(self, stores: dict[int, FeatureStore], rank: int):
        self.stores, self.rank = stores, rank
        self.pending = {q: ([], []) for q in stores}
        self.count = 0
        self.written = {q: 0 for q in stores}

    def add(self, q: int, keys: list[str], descriptors: torch.Tensor) -> None:
        self.pending[q][0].extend(keys)
        self.pending[q][1].append(descriptors)
        self.count += len(keys)
        if self.count >= FLUSH_IMAGES:
            self.flush()

    def flush(self) -> None:
        for q, (keys, parts) in self.pending.items():
            if keys:
                self.stores[q].write(keys, torch.cat(parts), self.rank)
                self.written[q] += len(keys)
        self.pending = {q: ([], []) for q in self.stores}
        self.count = 0


# --- Extraction -----------------------------------------------------------------------------------

class ImageFiles(Dataset):
    """Images by path under a root -> (transform(image), 0), or (None, 0, Unreadable) (ImageFolder's items)."""

    def __init__(self, root: Path, images: list[str], transform):
        self.root, self.images, self.transform = Path(root), images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        path = self.root / self.images[index]
        try:
            with Image.open(path) as image:
                return self.transform(image), 0
        except DECODE_ERRORS as e:
            return None, 0, Unreadable(str(path), " ".join(f"{type(e).__name__}: {e}".split()))


@dataclass
class Extraction:
    """How to run the nets: device, batching, loader workers, speed flags, this process's shard."""

    device: torch.device
    batch_size: int = 32
    workers: int = 2
    bf16: bool | str = "auto"
    channels_last: bool | str = "auto"
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    progress_every_s: float = 30.0


def extract(fnets: list[FeatureNet], root: Path, images: list[str], cache: Path, run: Extraction) -> list[dict]:
    """Every descriptor of every net and scale not in the cache yet, each image on exactly one rank, written
    to the cache. Returns per net {"extracted": images run through the net, "cached": images found}, summed
    over ranks."""
    keys = image_keys(root, images)
    bf16 = speed_flag(run.bf16, run.device)
    counts = []
    for fnet in fnets:
        stores = stores_of(fnet, cache, bf16)
        done = set.intersection(*(set(store.load()) for store in stores.values()))
        missing = [i for i, key in enumerate(keys) if key not in done]
        mine = [missing[j] for j in shard_indices(len(missing), run.rank, run.world_size)]
        extracted = _extract_net(fnet, root, images, keys, mine, stores, run) if mine else 0
        total = all_reduce_sum(torch.tensor([extracted], dtype=torch.float64, device=_reduce_device(run.device)))
        counts.append({"net": fnet.name, "key": fnet.key, "extracted": int(total.item()),
                       "cached": len(images) - len(missing)})
        if run.progress:
            get_logger().info(f"{fnet.name}: {len(images) - len(missing)} of {len(images)} images' descriptors from "
                              f"the cache, {int(total.item())} extracted ({Path(cache) / fnet.key})")
    return counts


def _reduce_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


def _extract_net(fnet: FeatureNet, root: Path, images: list[str], keys: list[str], mine: list[int],
                 stores: dict[int, FeatureStore], run: Extraction) -> int:
    """This rank's missing images through one net, at all its scales; equal-size images batched together
    (evaluation's buckets). Returns how many images went through the net."""
    scales = fnet.net.scales
    dataset = ImageFiles(root, images, MultiScaleTransform(scales=scales))
    loader = vloaders.build_loader(ShardDataset(dataset, mine), batch_size=run.batch_size, workers=run.workers,
                                   collate_fn=collate_shard)
    extractor = _Extractor(fnet, run.device, speed_flag(run.channels_last, run.device, auto_on_cpu=True))
    writer = _ChunkWriter(stores, run.rank)
    buckets = DenseBuckets(pin_memory=run.device.type == "cuda")
    with progress_bar(total=len(mine), unit="img", desc=f"descriptors {fnet.name}", every_s=run.progress_every_s,
                      enabled=run.progress) as bar, torch.inference_mode(), autocast_context(run.device, run.bf16):
        try:
            for positions, packed, _, unreadable in loader:
                vfolders.warn_unreadable(unreadable)
                bar.update(len(positions) + len(unreadable))
                scaled = iter(packed.unpack())  # image by image, each at every scale
                for pos in positions.tolist():
                    for q in scales:
                        image = next(scaled)
                        buckets.add((q, *image.shape[1:]), pos, image.clone())
                for (q, *_), pos, batch in buckets.pop_full(run.batch_size, PENDING_LIMIT * run.batch_size,
                                                            PENDING_BYTES):
                    writer.add(q, [keys[mine[p]] for p in pos.tolist()], extractor(batch))
            for (q, *_), pos, batch in buckets.pop_all():
                writer.add(q, [keys[mine[p]] for p in pos.tolist()], extractor(batch))
        finally:
            writer.flush()  # what was extracted is kept, on a stop or an error too
    return min(writer.written.values())


def load_descriptors(fnet: FeatureNet, cache: Path, keys: list[str], bf16: bool) -> tuple[dict, torch.Tensor]:
    """{Q: float32 [N, D]} in the images' order, and bool [N]: the images found at every scale (the others
    were unreadable). Rows of images not found are zeros."""
    found_all = torch.ones(len(keys), dtype=torch.bool)
    out = {}
    for q, store in stores_of(fnet, cache, bf16).items():
        found = store.load()
        width = next(iter(found.values())).shape[0] if found else fnet.net.model.fc_width
        matrix = torch.zeros(len(keys), width)
        present = torch.tensor([key in found for key in keys], dtype=torch.bool)
        for i, key in enumerate(keys):
            if key in found:
                matrix[i] = found[key]
        out[q], found_all = matrix, found_all & present
    return out, found_all
