"""The GPU data path (`data_path: gpu`): JPEGs decoded in batches on the GPU and augmented there, for
when CPU decoding cannot feed the net.

DataLoader workers only read file bytes (cheap) with each file's verdict (vgg.data.datasets.checks: damaged files
are not read, they are handed on as `vgg.data.batches.decode.Unreadable` records, as on the CPU path). The main
process then, per batch (vgg.data.batches.gpu_decode, vgg.data.batches.gpu_augment):
  1. decode: `decoder="torchcodec"` (the default), one batched `torchcodec.decoders.decode_jpeg(...,
     device="cuda")` call (nvJPEG) of the whole images; `decoder="nvimgcodec"`, nvImageCodec's batched
     region decode of the rows and columns each crop box reaches only (`region_train_augment`). Files the
     GPU does not take (quirks: CMYK, PNGs named .JPEG) are decoded on the CPU by PIL and moved over.
  2. `gpu_train_augment`: the paper's training augmentation (§3.1), drawn exactly as the CPU path's
     `vgg.data.batches.transforms.TrainTransform` draws it: training scale S uniform in [S_min, S_max], isotropic
     rescale so the smaller side is S (antialiased bilinear), a random crop_size x crop_size crop
     (only the crop box is resampled, the whole batch in a few batched matmuls), a horizontal flip
     with probability 1/2, each sample's draws (and its colour-shift alphas) from
     `vgg.data.batches.transforms.sample_generator(seed, epoch, index)` as on the CPU path, so both paths pick the
     same S, crop box, flip and alphas for the same sample. Output `TrainCrop(uint8 [B, 3, crop, crop],
     alphas [B, 3])`.
The mean subtraction and colour shift then happen in the trainer's `vgg.training.step.BatchAugment`, the
same code for both paths. A background thread runs steps 1-2 for the next batch (on its own CUDA stream) while the current
batch trains, so decoding overlaps the training step.

Everything also runs with device="cpu" (TorchCodec's and nvImageCodec's CPU decoders), which is how the
tests check that the two paths produce the same distribution of training images.
"""

import contextlib
import queue
import threading
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vgg.data.batches import jpeg as vjpeg
from vgg.data.batches.decode import Unreadable
from vgg.data.batches.gpu_augment import gpu_train_augment, region_train_augment  # noqa: F401 - the tests' too
from vgg.data.batches.gpu_decode import RegionDecoder, decode_batch, decode_on_cpu  # noqa: F401 - the tests' too
from vgg.data.batches.jpeg import Check, jpeg_components  # noqa: F401 - the tests' too
from vgg.data.batches.loaders import ignore_stop_signals, split_unreadable
from vgg.data.batches.transforms import TrainCrop, draw_alphas, sample_generator

DECODERS = ("torchcodec", "nvimgcodec")


# --------------------------------------------------------------------------------------------------
# Reading bytes in DataLoader workers
# --------------------------------------------------------------------------------------------------

class EncodedImages(Dataset):
    """Samples -> (encoded file bytes, label, path, index, verdict), or (None, label, Unreadable(path, reason),
    index, verdict) for a file that cannot be read or is damaged (silently: this runs in DataLoader
    workers). The index picks the sample's random draws (`sample_generator`); the verdict
    (vgg.data.batches.jpeg.Check) says which decoder may take it.

    `samples`: a vgg.data.datasets.folders.ImageFolder, read through its numpy arrays (`path(i)`, `labels`, its
    cached verdicts) as the CPU path reads it, so persistent workers' memory stays flat over epochs
    (tests/test_loader_memory.py); or a list of (path, label) pairs, whose files are checked here, every
    time (vgg.data.batches.jpeg.check). Only reads the file; decoding happens batched on the device.
    """

    def __init__(self, samples):
        # An ImageFolder (vgg.data.datasets.folders, which this package does not import) is known by its
        # cached verdicts: only it has them.
        self.folder = samples if hasattr(samples, "checks") else None
        self.pairs = None if self.folder is not None else list(samples)

    def __len__(self) -> int:
        return len(self.folder) if self.folder is not None else len(self.pairs)

    def __getitem__(self, index: int):
        if self.folder is not None:
            path, label = self.folder.path(index), int(self.folder.labels[index])
            check, note = self.folder.checks.verdict(index)
        else:
            path, label = self.pairs[index]
            check, note = Check.UNCHECKED, ""
        try:
            data = Path(path).read_bytes() if check != Check.DAMAGED else None
        except OSError as e:
            check, note = Check.DAMAGED, f"{type(e).__name__}: {e}"
        if check == Check.UNCHECKED:
            check, note = vjpeg.check(data)
        if check == Check.DAMAGED:
            return None, label, Unreadable(str(path), note), index, check
        return data, label, str(path), index, check


def collate_encoded(items):
    """Runs in the workers: -> (all readable files' bytes in one flat uint8 tensor, sizes int64 [B]
    (-1 for an unreadable file), labels int64 [B], list of paths, list of Unreadable, sample
    indices int64 [B], verdicts uint8 [B] (vgg.data.batches.jpeg.Check)).

    One flat tensor per batch crosses from the worker in one shared-memory block, instead of one
    block (and file descriptor) per image.
    """
    _, unreadable = split_unreadable(items)
    sizes = torch.tensor([-1 if data is None else len(data) for data, *_ in items], dtype=torch.int64)
    flat = torch.frombuffer(bytearray(b"".join(data for data, *_ in items if data)) or bytearray(1),
                            dtype=torch.uint8)
    labels = torch.tensor([label for _, label, *_ in items], dtype=torch.int64)
    paths = [path if data is not None else path.path for data, _, path, *_ in items]
    indices = torch.tensor([item[3] for item in items], dtype=torch.int64)
    checks = torch.tensor([item[4] for item in items], dtype=torch.uint8)
    return flat, sizes, labels, paths, unreadable, indices, checks


def split_encoded(flat: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor | None]:
    """Undo collate_encoded's packing: one 1-D uint8 view per file (None where unreadable)."""
    out, start = [], 0
    for size in sizes.tolist():
        if size < 0:
            out.append(None)
            continue
        out.append(flat[start:start + size])
        start += size
    return out


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------

class GpuTrainLoader:
    """Wraps a DataLoader of encoded bytes (`EncodedImages` + `collate_encoded`); iterating yields
    (TrainCrop(images uint8 [B, 3, crop, crop], alphas [B, 3]), labels, list of Unreadable), all on
    `device`, ready for the trainer's BatchAugment (mean subtraction and colour shift, as on the CPU
    path). Each sample's draws come from `sample_generator(seed, epoch, index)`; `set_epoch` before
    iterating.

    prefetch: a background thread prepares the next batch (on its own CUDA stream on a GPU).
    decoder: "torchcodec" (whole images, nvJPEG) or "nvimgcodec" (the crop regions only, on `backends`:
    vgg.data.batches.gpu_decode.BACKENDS; on the CPU, its CPU backend).
    """

    def __init__(self, loader: DataLoader, *, device, crop_size: int, scale_min: int, scale_max: int,
                 seed: int = 0, epoch: int = 0, channels_last: bool = False, prefetch: bool = True,
                 decoder: str = "torchcodec", backends: str = "both"):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        self.loader = loader
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # pin it: threads start on GPU 0
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.crop_size, self.scale_min, self.scale_max = crop_size, scale_min, scale_max
        self.seed, self.epoch = seed, epoch
        self.channels_last, self.prefetch = channels_last, prefetch
        self.regions = RegionDecoder(self.device, backends) if decoder == "nvimgcodec" else None

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prepare(self, batch):
        """One collated batch of bytes -> (images, labels, list of Unreadable) on the device."""
        flat, sizes, labels, names, unreadable, indices, checks = batch
        encoded, checks = split_encoded(flat, sizes), [Check(c) for c in checks.tolist()]
        present = [i for i, data in enumerate(encoded) if data is not None]
        generators = [sample_generator(self.seed, self.epoch, int(indices[i])) for i in present]
        scales = {"crop_size": self.crop_size, "scale_min": self.scale_min, "scale_max": self.scale_max}
        if self.regions is not None:
            def decode_whole(k):  # what nvImageCodec could not decode, and the quirks: on the CPU
                i = present[k]
                image = decode_on_cpu(encoded[i], names[i], unreadable, checks[i])
                return None if image is None else image.to(self.device, non_blocking=True)

            sound = [encoded[i] if checks[i] == Check.OK else None for i in present]
            images, kept = region_train_augment(self.regions, sound, generators, decode_whole=decode_whole, **scales)
        else:
            decoded = decode_batch([encoded[i] for i in present], self.device, [names[i] for i in present],
                                   unreadable=unreadable, checks=[checks[i] for i in present])
            kept = [k for k, image in enumerate(decoded) if image is not None]
            images = gpu_train_augment([decoded[k] for k in kept], generators=[generators[k] for k in kept], **scales)
        keep, generators = [present[k] for k in kept], [generators[k] for k in kept]
        # drawn after each sample's crop from its generator, in the CPU path's order
        alphas = torch.stack([draw_alphas(g) for g in generators]) if keep else torch.empty(0, 3)
        if images.device != self.device:  # an all-skipped batch
            images = images.to(self.device)
        labels = labels[keep]
        if self.device.type == "cuda":  # from pageable memory the copies would block this thread
            alphas, labels = alphas.pin_memory(), labels.pin_memory()
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return TrainCrop(images, alphas.to(self.device, non_blocking=True)), labels, unreadable

    def __iter__(self):
        batches = iter(self.loader)  # its workers start reading now (the trainer starts an epoch early)
        if not self.prefetch:
            return (self.prepare(batch) for batch in batches)
        return _prefetched(batches, self.prepare, self.device)


_DONE = object()


def _prefetched(loader, prepare, device: torch.device, depth: int = 2):
    """Run prepare(batch) for upcoming batches in a background thread, `depth` batches ahead.

    On CUDA the thread works on its own stream; the consumer's stream waits on an event recorded
    after each batch, and the tensors are marked as used by the consumer's stream so the caching
    allocator does not hand their memory back to the side stream too early.
    """
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            if side_stream is not None:
                torch.cuda.set_device(device)  # the current GPU is per thread
            with torch.cuda.stream(side_stream) if side_stream is not None else contextlib.nullcontext():
                for batch in loader:
                    if stop.is_set():
                        return
                    prepared = prepare(batch)
                    event = None
                    if side_stream is not None:
                        event = torch.cuda.Event()
                        event.record(side_stream)
                    if not put((prepared, event)):
                        return
            put((_DONE, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put((e, None))

    thread = threading.Thread(target=work, name="gpu-data-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, event = results.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for tensor in (*item[0], item[1]):  # images, alphas, labels
                    tensor.record_stream(current)
            yield item
    finally:
        stop.set()
        thread.join()


def build_gpu_train_loader(dataset, *, batch_size: int, device, crop_size: int, scale_min: int,
                           scale_max: int, seed: int = 0, epoch: int = 0, workers: int = 8, sampler=None,
                           shuffle: bool = False, drop_last: bool = True, channels_last: bool = False,
                           prefetch: bool = True, decoder: str = "torchcodec", backends: str = "both") -> GpuTrainLoader:
    """The `data_path: gpu` training loader over `dataset` (a vgg.data.datasets.folders.ImageFolder, whose transform
    is ignored, or any list of (path, label) samples).

    sampler / shuffle / drop_last / workers mean what they mean for a DataLoader; `seed` seeds the
    shuffle, and with `epoch` the augmentation draws; decoder, backends: see GpuTrainLoader.
    """
    # Workers persist across epochs: they only read files (every draw happens in this process, from
    # the epoch set on the GpuTrainLoader), so the copy of the dataset they started with stays right.
    loader = DataLoader(EncodedImages(dataset), batch_size=batch_size, sampler=sampler,
                        shuffle=shuffle if sampler is None else False, num_workers=workers,
                        collate_fn=collate_encoded, drop_last=drop_last, worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(seed),
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    return GpuTrainLoader(loader, device=device, crop_size=crop_size, scale_min=scale_min,
                          scale_max=scale_max, seed=seed, epoch=epoch,
                          channels_last=channels_last, prefetch=prefetch, decoder=decoder, backends=backends)
