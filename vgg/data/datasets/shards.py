"""WebDataset shards in the layout of timm/imagenet-1k-wds: write them from class folders, train and
evaluate from them (`--data SHARD_DIR`), for runs that outgrow one machine's disk.

    python -m vgg.data shards /data/imagenet /data/imagenet-wds     # once
    python train.py --config A --data /data/imagenet-wds --gpus 8   # streams the shards

The format: vgg.data.datasets.shard_format; writing: vgg.data.datasets.shard_writer.

Training streams (`ShardStream`). Each epoch the shards are put in an order drawn from (seed, epoch)
and read as one sequence of all N training images; rank r of W takes its contiguous part, N/W images
(give or take one), and each of its DataLoader workers a contiguous run of whole batches of that: a
rank opens only the shards its part overlaps, skipping at most one shard's leading samples (tar headers
only). A worker shuffles its run through a buffer of SHUFFLE_BUFFER images and makes batches. Every
rank makes the same number of steps (`num_steps`), full batches only, whatever the shard sizes and the
number of workers: as the class folders' loader drops a last short batch, the last images of each
rank's part (fewer than a batch, and other images each epoch as the shard order changes) wait for
another epoch. So no image is trained twice in an epoch, no step is short or empty (an empty one would
still move the weights through momentum and weight decay), and no DDP hang on uneven shards. A
sample's augmentation draws come from sample_generator(seed, epoch, its position in `_info.json`'s
order), as for class folders.

Resume. The order is a pure function of (seed, epoch, number of processes, workers): resuming at an
epoch boundary is exact. A mid-epoch resume skips the batches already trained (their images are read
past, not decoded), and is exact with the same number of processes (the trainer insists) and the same
`--workers`; with another worker count the rest of that epoch is cut differently, so some images
of that one epoch are trained twice and others not at all.

Validation and evaluation read the validation shards by position (`ShardImages`: tar headers scanned
once per process, each image read at its offset), as evaluation files each image's result by position.
"""

import hashlib
import math
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vgg.core.errors import UserError
from vgg.core.progress import get_logger
from vgg.data.batches import loaders as vloaders
from vgg.data.datasets import cache as vcache
from vgg.data.datasets import stats as vstats
from vgg.data.datasets.shard_format import (  # noqa: F401 (INFO_NAME, ShardError, is_shard_dir: importable from here)
    INFO_NAME, SHARD_ERRORS, SPLITS, ShardError, ShardSplit, check_count, damaged, decode_sample, image_and_label,
    is_shard_dir, iter_samples, open_split, read_verdict)
from vgg.data.batches.decode import Unreadable
from vgg.data.batches.transforms import EvalTransform
from vgg.data.datasets.shard_writer import write_shards  # noqa: F401 (importable from here, as before the split)

log = get_logger()

SHUFFLE_BUFFER = 1000  # images (their JPEG bytes, ~110 kB each on ImageNet) per DataLoader worker


# --------------------------------------------------------------------------------------------------
# Training: the stream
# --------------------------------------------------------------------------------------------------

def _read_shard(path: Path, skip: int, take: int, offset: int):
    """(bytes, label, index, where, verdict) of samples skip..take-1 of a training shard; ShardError if it is
    damaged or holds fewer samples than _info.json says (tarfile ends a cut tar without a word)."""
    count = skip
    try:
        for i, (key, parts, tar) in enumerate(iter_samples(path, skip), start=skip):
            if i >= take:
                break
            image, label = image_and_label(key, parts, tar, path)
            data = tar.extractfile(image).read()
            if len(data) != image.size:
                raise EOFError(f"sample {key} cut short")
            count += 1
            yield data, label, offset + i, f"{path.name}:{key}", read_verdict(parts, tar, image)
    except SHARD_ERRORS as e:
        raise damaged(path, e) from None
    check_count(path, count, take)


def _parts(total: int, n: int) -> list[int]:
    """`total` items dealt into n contiguous parts, the first ones one larger: [7, 7, 6] for (20, 3)."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def _share(steps: int, worker: int, workers: int) -> int:
    """How many of the batches 0..steps-1 a DataLoader with `workers` workers takes from `worker`:
    it asks them in turn (batch j from worker j % workers)."""
    return steps // workers + (1 if worker < steps % workers else 0)


class ShardStream(IterableDataset):
    """This rank's training batches of one epoch, streamed from shards (see the module docstring).

    Yields lists of (TrainCrop, label) / (None, label, Unreadable) items, a batch each: build the
    DataLoader with batch_size=None and vgg.data.batches.loaders.collate_batch (`loader`). `len()` is the number of
    training images (all ranks), as for an ImageFolder.
    """

    def __init__(self, split: ShardSplit, transform, *, batch_size: int, workers: int, seed: int,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = SHUFFLE_BUFFER):
        self.split, self.transform = split, transform
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.classes = list(split.classes)
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return sum(self.split.lengths)

    def fingerprint(self) -> dict:
        """What an epoch's order is built from (as ImageFolder.fingerprint): the shards' names and lengths."""
        listing = "\n".join(f"{path.name}\t{length}" for path, length in zip(self.split.paths, self.split.lengths))
        return {"count": len(self), "sha256": hashlib.sha256(listing.encode()).hexdigest()}

    @property
    def num_steps(self) -> int:
        """Full batches per epoch on every rank: those of the smallest rank's part (any worker count)."""
        return len(self) // self.world_size // self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch to stream, from batch `start_step` on (a mid-epoch resume); before iterating."""
        self.epoch, self.start_step = epoch, start_step
        self.transform.set_epoch(epoch)

    def _range(self, worker: int) -> tuple[int, int]:
        """This rank's worker's [first, stop) in the epoch's sequence of all images: whole batches, as many as
        the DataLoader asks that worker for (it asks the workers in turn)."""
        workers = max(1, self.workers)
        first = sum(_parts(len(self), self.world_size)[:self.rank])
        first += sum(_share(self.num_steps, w, workers) for w in range(worker)) * self.batch_size
        return first, first + _share(self.num_steps, worker, workers) * self.batch_size

    def _samples(self, first: int, stop: int):
        """(bytes, label, index, where, verdict) of the epoch's images first..stop-1: the shards in the epoch's
        order."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.split.paths))
        offsets, position = self.split.offsets, 0
        for shard in order.tolist():
            length, path = self.split.lengths[shard], self.split.paths[shard]
            if position + length > first and position < stop:
                skip, take = max(0, first - position), min(length, stop - position)
                yield from _read_shard(path, skip, take, offsets[shard])
            position += length
            if position >= stop:
                return

    def _shuffled(self, samples, rng):
        buffer = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        stream = self._shuffled(self._samples(*self._range(worker)), rng)
        skip = _share(self.start_step, worker, workers)
        total = _share(self.num_steps, worker, workers)
        for b in range(total):
            batch = [sample for sample in (next(stream, None) for _ in range(self.batch_size)) if sample is not None]
            if b >= skip:
                yield [decode_sample(data, label, where, self.transform, index, verdict)
                       for data, label, index, where, verdict in batch]

    def loader(self, *, epoch: int, start_step: int = 0, seed: int = 0):
        """The epoch's DataLoader: `workers` processes (the count num_steps was planned for)."""
        self.set_epoch(epoch, start_step)  # before the loader copies the stream into its workers
        return vloaders.build_loader(self, batch_size=None, workers=self.workers, collate_fn=vloaders.collate_batch,
                                  seed=seed)


# --------------------------------------------------------------------------------------------------
# Validation and evaluation: by position
# --------------------------------------------------------------------------------------------------

class ShardImages(Dataset):
    """A split's images by position: i -> (transform(image), label), or (None, label, Unreadable),
    like vgg.data.datasets.folders.ImageFolder. Indexes the tar headers of the split's shards on creation."""

    def __init__(self, split: ShardSplit, transform=None, limit: int | None = None):
        self.split, self.transform, self.classes = split, transform, list(split.classes)
        self.samples = []  # (shard path, image offset, image size, label, key, verdict)
        for path, length in zip(split.paths, split.lengths):
            before, size = len(self.samples), path.stat().st_size
            try:
                for key, parts, tar in iter_samples(path):
                    image, label = image_and_label(key, parts, tar, path)
                    if image.offset_data + image.size > size:
                        raise EOFError(f"sample {key} cut short")
                    self.samples.append((str(path), image.offset_data, image.size, label, key,
                                         read_verdict(parts, tar, image)))
                    if limit is not None and len(self.samples) >= limit:
                        return
            except SHARD_ERRORS as e:
                raise damaged(path, e) from None
            check_count(path, len(self.samples) - before, length)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, offset, size, label, key, verdict = self.samples[index]
        where = f"{Path(path).name}:{key}"
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:  # the shard went away or cannot be read any more: this image is unreadable
            return None, label, Unreadable(where, " ".join(f"{type(e).__name__}: {e}".split()))
        if len(data) != size:
            return None, label, Unreadable(where, f"cut short: {len(data)} of {size} bytes")
        return decode_sample(data, label, where, self.transform, None, verdict)


def open_val(root, transform) -> ShardImages:
    """The validation shards of `root` as a dataset by position (evaluation, validation during training)."""
    return ShardImages(open_split(root, SPLITS["val"]), transform)


def open_training_sets(config, *, rank: int, world_size: int, per_rank_batch: int):
    """(the training stream, the validation images) of the shard folder config.data, for vgg.training.run."""
    from vgg.data.batches.transforms import CenterCropTransform, TrainTransform

    if config.data_path == "gpu":
        raise UserError("--data-path gpu reads class folders; shards are decoded by the CPU workers: "
                        "use --data-path cpu with a shard folder")
    train = ShardStream(open_split(config.data, SPLITS["train"]),
                        TrainTransform(crop_size=config.crop_size, scale_min=config.scale_min,
                                       scale_max=config.scale_max, seed=config.seed),
                        batch_size=per_rank_batch, workers=config.workers, seed=config.seed, rank=rank,
                        world_size=world_size)
    val = open_val(config.data, CenterCropTransform(scale=config.test_scale, crop_size=config.crop_size))
    if val.classes != train.classes:
        raise UserError(f"{config.data}: the train and validation splits list different classes")
    return train, val


# --------------------------------------------------------------------------------------------------
# Statistics (paper §2.1; AlexNet §4.1): from the first images of the training shards
# --------------------------------------------------------------------------------------------------

def load_or_compute_stats(train_dir, *, num_images: int, seed: int = 0, workers: int | None = None,
                          progress_every_s: float = 30.0) -> vstats.DatasetStats:
    """vgg.data.datasets.stats.load_or_compute_stats for a shard folder (train_dir: `<shard folder>/train`, which need
    not exist): the first `num_images` training images in _info.json's order (`write_shards` dealt them
    over the shards at random, so they are a random sample; so are timm's), cached as vgg_stats_*.json.
    The training stream is not used: a sample of fixed images, read once, by position."""
    root = Path(train_dir).parent
    paths = vcache.cache_paths(root, vstats.stats_cache_name(num_images, seed))
    cached = vcache.read_json(paths, lambda c: vstats.is_valid_cache(c, num_images=num_images, seed=seed))
    if cached is not None:
        return vstats.DatasetStats.from_dict(cached)
    dataset = ShardImages(open_split(root, SPLITS["train"]), EvalTransform(scale=vstats.STATS_SIDE), limit=num_images)
    stats, used, skipped = vstats.stats_of_images(dataset, where=f"the first {len(dataset)} training images in {root}",
                                                 seed=seed, workers=workers, progress_every_s=progress_every_s)
    vcache.write_json(paths, {**stats.to_dict(), "num_images": num_images, "seed": seed,
                              "train_dir": str(root), "skipped": skipped})
    log.info(f"dataset statistics from the first {used} training images of {root}")
    return stats
