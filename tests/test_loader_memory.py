"""Persistent DataLoader workers and the samples kept in numpy arrays: a worker's private memory stays
flat over epochs (a list of (path, label) tuples is copied page by page into every worker that reads it)."""

import pathlib

import torch

from vgg.data import folders as vfolders
from vgg.data import loaders as vloaders
from vgg.data.gpu import EncodedImages

NUM_SAMPLES, CLASSES = 1_000_000, 1000


class LabelsOnly(vfolders.ImageFolder):
    """The real sample storage, read as the real __getitem__ reads it (path and label), without image files."""

    def __getitem__(self, index):
        return len(self.path(index)) + int(self.labels[index])


class TupleList(LabelsOnly):
    """The former layout, as a control: one Python (path, label) tuple per sample."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tuples = [(self.path(i), int(label)) for i, label in enumerate(self.labels)]

    def __getitem__(self, index):
        path, label = self.tuples[index]
        return len(path) + label


def fake_files(tmp_path, monkeypatch):
    """1 M file names in 1000 class folders, listed without any file on disk."""
    files = {f"n{c:08d}": [f"n{c:08d}_{k}.JPEG" for k in range(NUM_SAMPLES // CLASSES)] for c in range(CLASSES)}
    monkeypatch.setattr(vfolders, "list_files", lambda root: files)
    return tmp_path


def private_mb(pid: int) -> float:
    """Memory only this process holds (copy-on-write pages it has copied, its own allocations)."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/smaps_rollup").read().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


def worker_growth_mb(dataset, epochs: int, collate_fn=torch.utils.data.default_collate) -> tuple[float, set[int]]:
    """Private memory a worker gains from its first batch to the end of `epochs` epochs; the worker pids seen."""
    loader = vloaders.build_loader(dataset, batch_size=8192, workers=1, collate_fn=collate_fn)
    pids, start, total = set(), None, 0
    for _ in range(epochs):
        batches = iter(loader)
        pids |= {w.pid for w in batches._workers}
        for batch in batches:
            if start is None:
                start = private_mb(next(iter(pids)))
            total += len(batch)
    assert total == epochs * NUM_SAMPLES
    return private_mb(next(iter(pids))) - start, pids


def test_worker_memory_stays_flat_over_three_epochs_of_a_million_samples(tmp_path, monkeypatch):
    root = fake_files(tmp_path, monkeypatch)
    growth, pids = worker_growth_mb(LabelsOnly(root), epochs=3)
    assert len(pids) == 1  # one worker, kept across the epochs
    assert growth < 32, growth  # (a few MB of allocator noise; the control below gains ~180 MB)
    # the control: the measurement sees what the former tuple list costs in a single epoch
    growth, _ = worker_growth_mb(TupleList(root), epochs=1)
    assert growth > 100, growth


def path_lengths_and_labels(items):
    """EncodedImages items -> one small tensor a batch (what the bytes are does not matter here)."""
    return torch.tensor([len(path) + label for _, label, path, _ in items])


def test_gpu_path_reads_the_folder_arrays_with_flat_worker_memory(tmp_path, monkeypatch):
    """data_path: gpu's dataset (vgg.data.gpu.EncodedImages) reads the ImageFolder's arrays, not a list."""
    root = fake_files(tmp_path, monkeypatch)
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: b"x")  # no files: every read returns 1 byte
    growth, pids = worker_growth_mb(EncodedImages(LabelsOnly(root)), epochs=3, collate_fn=path_lengths_and_labels)
    assert len(pids) == 1
    assert growth < 32, growth
    # the control: a list of (path, label) pairs handed to EncodedImages grows the worker as before
    growth, _ = worker_growth_mb(EncodedImages(LabelsOnly(root).samples), epochs=1, collate_fn=path_lengths_and_labels)
    assert growth > 100, growth
