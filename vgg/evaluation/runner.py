"""Evaluating a validation set: every net, scale and method over every image, results per class.

Each full group of equal-size images runs as one batch, dense and multi-crop alike: the 50 crops of
equal-size images are cut from the whole batch at once. The nets run channels-last (on the CPU too,
unless channels_last=False) and, on CUDA, in bf16 autocast (unless bf16=False). Distributed: each
rank evaluates a disjoint shard (no padded repeats), and only per-class counts are summed across
ranks, so every image is counted exactly once.
"""

import copy
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn

from vgg.config import speed_flag
from vgg.core.distributed import all_reduce_sum, batches_side_by_side, shard_indices
from vgg.core.errors import UserError
from vgg.core.progress import progress_bar
from vgg.data.batches import loaders as vloaders
from vgg.data.batches.transforms import normalize
from vgg.data.datasets import folders as vfolders
from vgg.evaluation.inputs import PENDING_BYTES, PENDING_LIMIT, ShardDataset, DenseBuckets, collate_shard, open_val_set
from vgg.evaluation.methods import BOTH, DENSE, MULTI_CROP, dense_probs, fuse, multi_crop_probs
from vgg.evaluation.nets import EvalNet
from vgg.models.zoo import to_dense
from vgg.training.step import autocast_context, topk_hits

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
    dataset = open_val_set(nets, val_dir)
    indices = shard_indices(len(dataset), rank, world_size)
    loader = vloaders.build_loader(ShardDataset(dataset, indices), batch_size=batch_size, shuffle=False,
                                   workers=workers, collate_fn=collate_shard)
    runners = [_NetRunner(net, device, speed_flag(channels_last, device, auto_on_cpu=True)) for net in nets]
    forward = functools.partial(_forward, nets, runners, methods)
    results = _Results(nets, methods, len(indices), len(dataset.classes), device)
    # A with-block closes the bar on an error too, so an error line starts on a line of its own.
    with progress_bar(total=len(indices), unit="img", desc="evaluate", every_s=progress_every_s,
                      enabled=progress) as bar, torch.inference_mode(), autocast_context(device, bf16):
        waiting = _run_loader(loader, forward, results, bar, sorted({q for net in nets for q in net.scales}),
                              batch_size, pin_memory=device.type == "cuda")
        _run_waiting(waiting, forward, results, runners, methods, device, bf16)
    results.check_complete()
    rows = _result_rows(nets, methods, results.probs)
    total, skipped, class_images = _count_hits(rows, results, device)
    if total == 0:
        raise UserError(f"no readable image in {val_dir} ({skipped} skipped)")
    return {"val_dir": str(Path(val_dir)), "images": total, "skipped": skipped, "world_size": world_size,
            "methods": methods, "classes": dataset.classes, "class_images": [int(n) for n in class_images.tolist()],
            "nets": [{"name": net.name, "checkpoint": str(net.path), "train_s": net.train_s,
                      "test_q": net.scales} for net in nets],
            "rows": rows}


class _Results:
    """This rank's results: each net's soft-max per method (summed over that net's scales; kept on the device
    so the loop never waits for a copy back to the host), the labels (-1: unreadable), the files skipped,
    and how many scale results each image received, to prove nothing is counted twice or missed."""

    def __init__(self, nets: list[EvalNet], methods: list[str], count: int, num_classes: int, device: torch.device):
        self.nets, self.methods, self.device = nets, methods, device
        self.probs = [{m: torch.zeros(count, num_classes, device=device) for m in methods} for _ in nets]
        self.filed = [{m: torch.zeros(count, dtype=torch.int64) for m in methods} for _ in nets]
        self.labels = torch.full((count,), -1, dtype=torch.int64)
        self.skipped = 0

    def file(self, positions: torch.Tensor, outputs: list[tuple[int, str, torch.Tensor]]) -> None:
        for net_i, method, p in outputs:
            self.probs[net_i][method].index_add_(0, positions.to(self.device), p / len(self.nets[net_i].scales))
            self.filed[net_i][method].index_add_(0, positions, torch.ones_like(positions))

    def check_complete(self) -> None:
        readable = self.labels >= 0
        for net_i, net in enumerate(self.nets):
            for m in self.methods:
                expected = readable.long() * len(net.scales)
                if not torch.equal(self.filed[net_i][m], expected):  # a bug, not bad input
                    raise RuntimeError(f"{m} results for {net.name} were filed {self.filed[net_i][m].tolist()} "
                                       f"times, expected {expected.tolist()}")


def _forward(nets: list[EvalNet], runners: list["_NetRunner"], methods: list[str], key: tuple,
             images: torch.Tensor) -> list[tuple[int, str, torch.Tensor]]:
    """(net index, method, soft-max) of every net tested at this batch's scale key[0]."""
    return [(net_i, method, p) for net_i, runner in enumerate(runners) if key[0] in nets[net_i].scales
            for method, p in runner.evaluate(images, methods).items()]


def _run_loader(loader, forward, results: _Results, bar, all_scales: list[int], batch_size: int, *,
                pin_memory: bool) -> list:
    """Every loader batch: scaled images wait in buckets by (Q, H, W) until a batch of one size is full, which
    then goes through the nets at once, for both methods (crops are cut from the whole batch). Returns the
    batches still waiting once the loader is spent."""
    buckets = DenseBuckets(pin_memory=pin_memory)
    for positions, packed, batch_labels, unreadable in loader:
        vfolders.warn_unreadable(unreadable)  # once per file, from this process (not the workers)
        results.skipped += len(unreadable)
        bar.update(len(positions) + len(unreadable))  # loaded; the net may run on them later
        if len(positions) == 0:
            continue
        results.labels[positions] = batch_labels
        scaled = iter(packed.unpack())  # image by image, each at every scale in all_scales' order
        for pos in positions.tolist():
            for q in all_scales:
                image = next(scaled)
                # A copy, so that the worker's shared buffer is freed once this batch is done.
                buckets.add((q, *image.shape[1:]), pos, image.clone())
        for key, pos, batch in buckets.pop_full(batch_size, PENDING_LIMIT * batch_size, PENDING_BYTES):
            results.file(pos, forward(key, batch))
    return list(buckets.pop_all())


def _run_waiting(waiting: list, forward, results: _Results, runners: list["_NetRunner"], methods: list[str],
                 device: torch.device, bf16: bool | str) -> None:
    """The loader is spent, its workers idle. On a CPU their cores now run the batches still waiting
    (sizes with fewer images than a batch: on the demo set nearly all), several side by side, each on
    torch's threads: small batches run ~1.8x faster so than split over 2 threads (bench/evaluate.py)."""
    side_by_side = batches_side_by_side(device.type)
    if side_by_side <= 1 or len(waiting) <= 1:
        for key, pos, batch in waiting:
            results.file(pos, forward(key, batch))
        return

    def forward_in_thread(batch) -> list[tuple[int, str, torch.Tensor]]:
        with torch.inference_mode(), autocast_context(device, bf16):  # both are per thread
            return forward(batch[0], batch[2])

    if MULTI_CROP in methods:
        for runner in runners:
            runner.model  # copied here, not by two threads at once
    with ThreadPoolExecutor(side_by_side) as pool:
        for (_, pos, _), outputs in zip(waiting, pool.map(forward_in_thread, waiting)):
            results.file(pos, outputs)


def _count_hits(rows: list[dict], results: _Results, device: torch.device):
    """Per-class top-1/top-5 hits of every row over this rank's readable images, then one reduction over all
    ranks; fills each row's errors and per-class accuracy. Returns (images, skipped, images per class)."""
    num_classes = results.probs[0][results.methods[0]].shape[1]
    readable = results.labels >= 0
    y = results.labels[readable].to(device)
    readable = readable.to(device)
    sums = torch.zeros(len(rows) * 2 + 1, num_classes, dtype=torch.float64, device=device)
    for row_i, row in enumerate(rows):
        hits = topk_hits(row.pop("probs")[readable], y)
        for k_i in range(2):
            sums[row_i * 2 + k_i] = torch.bincount(y[hits[k_i]], minlength=num_classes).double()
    sums[-1] = torch.bincount(y, minlength=num_classes).double()
    flat = torch.cat([sums.flatten(), torch.tensor([float(results.skipped)], dtype=torch.float64, device=device)])
    flat = all_reduce_sum(flat).cpu()
    sums = flat[:-1].view(len(rows) * 2 + 1, num_classes)
    class_images = sums[-1]
    total = int(class_images.sum().item())
    for row_i, row in enumerate(rows):
        top1, top5 = sums[row_i * 2], sums[row_i * 2 + 1]
        row["top1_err"] = 100.0 * (1.0 - top1.sum().item() / max(total, 1))
        row["top5_err"] = 100.0 * (1.0 - top5.sum().item() / max(total, 1))
        row["images"] = total
        row["per_class_top1_acc"] = _per_class(top1, class_images)
        row["per_class_top5_acc"] = _per_class(top5, class_images)
    return total, int(flat[-1].item()), class_images


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

