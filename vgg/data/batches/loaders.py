"""Batches: the collate functions, DataLoader workers, and the sampler that deals each epoch's order.
"""

import atexit
import math
import multiprocessing
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from vgg.core.launch import STOP_SIGNALS
from vgg.data.batches.decode import Unreadable

# --------------------------------------------------------------------------------------------------
# Batching and loading
# --------------------------------------------------------------------------------------------------

class EpochTagged(Sampler):
    """`sampler`'s indices as (epoch, index), the epoch read from `sampler.epoch` when a pass starts.

    Persistent DataLoader workers keep the dataset copy they were started with, so a `set_epoch` on
    the main process's transform would never reach them: the epoch travels with each index instead
    (ImageFolder.__getitems__ hands it to its TrainTransform, whose draws depend on it).
    """

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def split_unreadable(items) -> tuple[list, list[Unreadable]]:
    """Dataset items -> (the readable (image, label, ...) items, the Unreadable of the others)."""
    return [item for item in items if item[0] is not None], [item[2] for item in items if item[0] is None]


def collate_batch(items):
    """[(uint8 [3,H,W], label) or (None, label, Unreadable)] -> (uint8 [B,3,H,W], int64 labels [B],
    list of Unreadable). Training items hold a `vgg.data.batches.transforms.TrainCrop` instead of the image: the
    batch then holds TrainCrop(uint8 [B,3,H,W], alphas [B,3]).

    Unreadable images are dropped; their Unreadable records travel with the batch, so the main
    process can warn once per file and report an epoch's skips (the workers are separate processes).
    All images must have the same size.
    """
    kept, unreadable = split_unreadable(items)
    labels = torch.tensor([item[1] for item in kept], dtype=torch.int64)
    if not kept:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), labels, unreadable
    # default_collate stacks straight into shared memory when running in a worker (no extra copy).
    images = torch.utils.data.default_collate([item[0] for item in kept])
    return images, labels, unreadable


def collate_list(items):
    """Like collate_batch for images of different sizes: (list of uint8 [3,H,W], labels [B], list of Unreadable)."""
    kept, unreadable = split_unreadable(items)
    labels = torch.tensor([item[1] for item in kept], dtype=torch.int64)
    return [item[0] for item in kept], labels, unreadable


def worker_init_fn(worker_id: int) -> None:
    """Seed python's `random`, numpy and torch in a DataLoader worker from torch.initial_seed().

    The DataLoader sets each worker's torch seed to base_seed + worker_id, with base_seed drawn from
    the loader's generator every time an iterator (an epoch) starts: so workers differ, epochs differ,
    and a loader built with the same seed repeats exactly. Seeding the other two RNGs from it makes
    any transform that uses them follow the same rule.

    The worker also ignores the stop signals (SIGINT, SIGTERM, SIGUSR1). SLURM, Kubernetes and Ctrl-C
    signal every process of a job, workers included; a worker that died of one (torch's own SIGTERM
    handler ends it) would fail the main process's next batch before it could stop at a step and save.
    The main process ends its workers itself once it has stopped (the loader's shutdown; a worker whose
    main process is gone ends on its own).
    """
    ignore_stop_signals()
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _kill_loader_workers_at_exit() -> None:
    """DataLoader workers ignore SIGTERM (above), and multiprocessing's own exit handler terminates daemon
    children with SIGTERM and then joins them: a worker whose loader was never shut down (one that an
    exception's traceback kept alive, say) would keep the process from exiting, forever. Workers hold
    nothing to save, so they are killed first (atexit runs the handler registered last first, and this
    module is imported after multiprocessing)."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each one killed as an error
        for worker in workers:
            worker.kill()


atexit.register(_kill_loader_workers_at_exit)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader worker's `worker_init_fn` (or its first step): SIGINT, SIGTERM and SIGUSR1 are the main
    process's to handle (see worker_init_fn)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def build_loader(dataset, *, batch_size: int, shuffle: bool = False, workers: int, collate_fn,
                 seed: int = 0, distributed: bool = False, drop_last: bool = False, sampler=None) -> DataLoader:
    """DataLoader with `workers` processes, pinned memory (on CUDA) and per-worker seeding.

    seed: the loader's generator, which drives the shuffle order and the workers' seeds (for transforms
    that draw from torch's RNG; TrainTransform draws from each sample's own generator instead);
    build a loader per epoch with a seed that depends on the epoch, or reuse one loader (each pass
    draws new seeds from the generator). distributed: a DistributedSampler over this rank's share
    (call `loader.sampler.set_epoch(e)` each epoch); the rank is mixed into the generator's seed so
    ranks do not share an augmentation stream. sampler: a custom sampler (then `shuffle` is ignored).
    """
    rank = 0
    if distributed:
        rank = torch.distributed.get_rank()
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else None,
                      sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                      worker_init_fn=worker_init_fn, generator=generator,
                      persistent_workers=workers > 0)


def shut_down_workers(loader) -> None:
    """End `loader`'s persistent worker processes now (a DataLoader, or the GPU path's loader around one).

    torch ends them when the loader is garbage-collected; one held in a reference cycle is collected with
    its queues already closed, so its workers never hear that they are done, and they ignore the SIGTERM
    torch sends next (worker_init_fn above): they would run until this process ends.
    """
    loader = getattr(loader, "loader", loader)
    iterator = getattr(loader, "_iterator", None)  # where torch keeps a persistent loader's workers
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        loader._iterator = None
        iterator._shutdown_workers()


class EpochSampler(Sampler):
    """This rank's share of a per-epoch shuffle, optionally starting part-way (mid-epoch resume).

    The order depends only on (seed, epoch): like DistributedSampler, the permutation is padded to
    a multiple of the world size and dealt out rank by rank; `set_epoch(epoch, start)` also skips
    the first `start` indices of this rank's share, so a resumed epoch sees exactly the images the
    interrupted one had not reached.
    """

    def __init__(self, num_items: int, *, seed: int, rank: int, world_size: int):
        self.num_items, self.seed, self.rank, self.world_size = num_items, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return math.ceil(self.num_items / self.world_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g).tolist()
        order += order[: self.per_rank() * self.world_size - len(order)]
        return iter(order[self.rank :: self.world_size][self.start :])

    def __len__(self) -> int:
        return self.per_rank() - self.start
