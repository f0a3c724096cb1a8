"""The GPU data path (`data_path: gpu`): JPEGs decoded in batches by nvJPEG (TorchCodec) and augmented
on the GPU, for when CPU decoding cannot feed the net.

DataLoader workers only read file bytes (cheap). The main process then, per batch:
  1. `decode_batch`: one batched `torchcodec.decoders.decode_jpeg(..., device="cuda")` call. Files
     nvJPEG cannot take (CMYK/YCCK JPEGs, PNGs named .JPEG, anything it rejects) are decoded on the
     CPU instead (TorchCodec, then PIL) and moved over; files nobody can read or decode are skipped,
     and handed to the training loop as `vgg.data.folders.Unreadable` records (as on the CPU path), which
     warns once per file.
  2. `gpu_train_augment`: the paper's training augmentation (§3.1), drawn exactly as the CPU path's
     `vgg.data.transforms.TrainTransform` draws it: training scale S uniform in [S_min, S_max], isotropic
     rescale so the smaller side is S (antialiased bilinear), a random crop_size x crop_size crop
     (only the crop box is resampled, the whole batch in a few batched matmuls), a horizontal flip
     with probability 1/2, each sample's draws (and its colour-shift alphas) from
     `vgg.data.transforms.sample_generator(seed, epoch, index)` as on the CPU path, so both paths pick the
     same S, crop box, flip and alphas for the same sample. Output `TrainCrop(uint8 [B, 3, crop, crop],
     alphas [B, 3])`.
The mean subtraction and colour shift then happen in the trainer's `vgg.training.step.BatchAugment`, the
same code for both paths. A background thread runs steps 1-2 for the next batch (on its own CUDA stream) while the current
batch trains, so decoding overlaps the training step.

Everything also runs with device="cpu" (TorchCodec's CPU decoder), which is how the tests check that
the two paths produce the same distribution of training images.
"""

import contextlib
import io
import logging
import math
import queue
import threading
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchcodec.decoders import decode_jpeg

from vgg.core.errors import UserError
from vgg.data import jpeg as vjpeg
from vgg.data.folders import DECODE_ERRORS, ImageFolder, Unreadable, split_unreadable
from vgg.data.loaders import ignore_stop_signals
from vgg.data.transforms import TrainCrop, draw_alphas, draw_train_crop, load_rgb, sample_generator, to_uint8_tensor

log = logging.getLogger(__name__)  # a child of the "vgg" logger, like vgg.data's

JPEG_MAGIC = b"\xff\xd8\xff"
# Start-of-frame markers (SOF0-SOF15 except DHT C4, JPG C8 and DAC CC): they carry the component count.
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


# --------------------------------------------------------------------------------------------------
# Reading bytes in DataLoader workers
# --------------------------------------------------------------------------------------------------

class EncodedImages(Dataset):
    """Samples -> (encoded file bytes, label, path, index), or (None, label, Unreadable(path, reason),
    index) for a file that cannot be read (silently: this runs in DataLoader workers). The index picks
    the sample's random draws (`sample_generator`).

    `samples`: a vgg.data.folders.ImageFolder, read through its numpy arrays (`path(i)`, `labels`) as the CPU
    path reads it, so persistent workers' memory stays flat over epochs (tests/test_loader_memory.py);
    or a list of (path, label) pairs. Only reads the file; decoding happens batched on the device.
    """

    def __init__(self, samples):
        self.folder = samples if isinstance(samples, ImageFolder) else None
        self.pairs = None if self.folder is not None else list(samples)

    def __len__(self) -> int:
        return len(self.folder) if self.folder is not None else len(self.pairs)

    def __getitem__(self, index: int):
        if self.folder is not None:
            path, label = self.folder.path(index), int(self.folder.labels[index])
        else:
            path, label = self.pairs[index]
        try:
            return Path(path).read_bytes(), label, str(path), index
        except OSError as e:
            return None, label, Unreadable(str(path), f"{type(e).__name__}: {e}"), index


def collate_encoded(items):
    """Runs in the workers: -> (all readable files' bytes in one flat uint8 tensor, sizes int64 [B]
    (-1 for an unreadable file), labels int64 [B], list of paths, list of Unreadable, sample
    indices int64 [B]).

    One flat tensor per batch crosses from the worker in one shared-memory block, instead of one
    block (and file descriptor) per image.
    """
    _, unreadable = split_unreadable(items)
    sizes = torch.tensor([-1 if data is None else len(data) for data, *_ in items], dtype=torch.int64)
    flat = torch.frombuffer(bytearray(b"".join(data for data, *_ in items if data)) or bytearray(1),
                            dtype=torch.uint8)
    labels = torch.tensor([label for _, label, *_ in items], dtype=torch.int64)
    paths = [path if data is not None else path.path for data, _, path, _ in items]
    indices = torch.tensor([index for *_, index in items], dtype=torch.int64)
    return flat, sizes, labels, paths, unreadable, indices


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
# Decoding
# --------------------------------------------------------------------------------------------------

def jpeg_components(data: torch.Tensor) -> int:
    """Colour components of a JPEG (1 grey, 3 YCbCr, 4 CMYK/YCCK) from its frame header; 0 if the
    bytes are not a JPEG or the header cannot be found."""
    raw = memoryview(data.numpy()) if isinstance(data, torch.Tensor) else memoryview(data)  # no copy
    if bytes(raw[:3]) != JPEG_MAGIC:
        return 0
    i = 2
    while i + 4 <= len(raw):
        if raw[i] != 0xFF:
            return 0
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(raw[i + 2:i + 4], "big")
        if marker in _SOF_MARKERS:
            return raw[i + 9] if i + 9 < len(raw) else 0
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return 0
        i += 2 + length
    return 0


def decode_on_cpu(data: torch.Tensor | None, name: str = "<bytes>",
                  unreadable: list | None = None) -> torch.Tensor | None:
    """Decode one image on the CPU: TorchCodec for JPEGs, else the CPU path's PIL decoder
    (`vgg.data.transforms.load_rgb`: PNGs named .JPEG, CMYK, ...; truncated files are refused, as there).
    Returns uint8 [3, H, W], or None: with an Unreadable(name, reason) appended to `unreadable` if
    given (the training loop warns once per file), else with one warning line naming the file."""
    def skip(reason: str) -> None:
        if unreadable is None:
            log.warning(f"warning: skipping unreadable image {name} ({reason})")
        else:
            unreadable.append(Unreadable(name, reason))

    if data is None:
        return None
    if data.numel() == 0:
        skip("empty file")
        return None
    if data[:3].numpy().tobytes() == JPEG_MAGIC:
        try:
            vjpeg.check_whole(data.numpy().tobytes())  # TorchCodec would fill a file cut short grey
            return decode_jpeg(data, mode="RGB")
        except (RuntimeError, OSError):
            pass  # e.g. truncated: let PIL have a go, as the CPU path would (and it refuses it likewise)
    try:  # the CPU path's decoder: same conversions (CMYK, grey, palette -> RGB), same refusals
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return to_uint8_tensor(load_rgb(image)).contiguous()
    except DECODE_ERRORS as e:
        skip(" ".join(f"{type(e).__name__}: {e}".split()))
        return None


def decode_batch(encoded: list, device: torch.device | str, names: list[str] | None = None, *,
                 batched: bool | None = None, unreadable: list | None = None) -> list[torch.Tensor | None]:
    """Decode a batch of encoded images to uint8 [3, H, W] tensors on `device` (None where undecodable).

    batched (default: device is CUDA): plain JPEGs (1 or 3 components) go through one batched
    decode_jpeg call on `device` (nvJPEG on CUDA). If that call fails, each file is retried on its
    own; whatever still fails, and every file that is not a plain JPEG, is decoded on the CPU
    (`decode_on_cpu`) and copied to `device`. Without batching every file is decoded on the CPU.
    unreadable: as for decode_on_cpu.
    """
    device = torch.device(device)
    names = names or [f"<image {i}>" for i in range(len(encoded))]
    batched = device.type == "cuda" if batched is None else batched
    out: list[torch.Tensor | None] = [None] * len(encoded)
    gpu_ok = [i for i, data in enumerate(encoded)
              if batched and data is not None and data.numel() > 0 and jpeg_components(data) in (1, 3)]
    if gpu_ok:
        try:
            for i, image in zip(gpu_ok, decode_jpeg([encoded[i] for i in gpu_ok], mode="RGB", device=device)):
                out[i] = image
        except RuntimeError:
            # One bad file fails the whole batched call: retry one by one to find it.
            for i in gpu_ok:
                try:
                    out[i] = decode_jpeg(encoded[i], mode="RGB", device=device)
                except RuntimeError:
                    pass
    for i, data in enumerate(encoded):
        if out[i] is None:
            image = decode_on_cpu(data, names[i], unreadable)
            out[i] = None if image is None else image.to(device, non_blocking=True)
        elif out[i].shape[0] == 1:  # a decoder that ignored mode="RGB" for a grey JPEG
            out[i] = out[i].expand(3, -1, -1)
    return out


# --------------------------------------------------------------------------------------------------
# Augmentation (paper §3.1)
# --------------------------------------------------------------------------------------------------

def gpu_train_augment(images: list[torch.Tensor], *, crop_size: int, scale_min: int, scale_max: int,
                      generator: torch.Generator | None = None,
                      generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """uint8 [3, H, W] images (any sizes, on one device) -> uint8 [B, 3, crop, crop] on that device.

    Per image: draw (S, crop box, flip) with `vgg.data.transforms.draw_train_crop`, the CPU path's own
    draw; the crop is the crop_size x crop_size box at (top, left) of the image rescaled isotropically
    (smallest side S) with antialiased bilinear interpolation (the triangle filter PIL and
    F.interpolate(antialias=True) use, the CPU path's), flipped if drawn so. The random draws use
    `generators` (one per image: in training each sample's `sample_generator`) or else `generator`
    for all (CPU generators, so the draws do not depend on the device).

    Only the box is resampled, for the whole batch at once (`_resample_boxes`): a few dozen kernels
    a batch, where rescaling each whole image in turn took ~800 and a float copy of every rescaled
    image. Its pixels are those of rescaling the whole image and cutting the box (the filter reaches
    past the box's edge, into the image, as it would there); the CPU path instead snaps the box to
    whole source pixels and filters inside it (moving it by under a source pixel, scaling it by under
    1 %), and decodes JPEGs at a reduced scale where it can: the same distribution of crops.
    """
    if scale_min < crop_size or scale_max < scale_min:
        raise UserError(f"need crop_size <= scale_min <= scale_max, got crop_size={crop_size}, "
                        f"scale_min={scale_min}, scale_max={scale_max}")
    if not images:
        return torch.empty(0, 3, crop_size, crop_size, dtype=torch.uint8)
    boxes = []
    for i, image in enumerate(images):
        height, width = image.shape[-2:]
        new_h, new_w, top, left, flip = draw_train_crop(height, width, crop_size=crop_size,
                                                        scale_min=scale_min, scale_max=scale_max,
                                                        generator=generator if generators is None else generators[i])
        # the box in source pixels: its start and the source pixels per output pixel, as F.interpolate
        # maps a rescaled image's pixel k to source position (k + 0.5) * height / new_h - 0.5
        boxes.append((top * height / new_h, height / new_h, left * width / new_w, width / new_w, flip))
    return _resample_boxes(images, boxes, crop_size)


def _resample_boxes(images: list[torch.Tensor], boxes: list[tuple], size: int) -> torch.Tensor:
    """uint8 [3, H_b, W_b] images and per image (y0, y_scale, x0, x_scale, flip) -> uint8 [B, 3, size, size]:
    output pixel (i, j) of image b samples source position (y0 + (i + 0.5) y_scale, x0 + (j + 0.5) x_scale)
    with the antialiased bilinear (triangle) filter, mirrored left-right where flip.

    The filter is separable, so each image's crop is Wy_b @ image_b @ Wx_b^T with weight matrices
    [size, H_b] and [size, W_b] that are zero outside the box and its filter margin. Images of one
    shape (ImageNet has few: most are 500 x 375 or 375 x 500) go through two batched matmuls
    together, on the band of rows and columns their boxes need; all weights are built at once on
    the device from one small copy of the boxes. The flip is a mirrored Wx. The matmuls run at the
    device's float32 matmul precision: with TF32 allowed (CUDA), a pixel may round one level off.
    """
    device = images[0].device
    order = sorted(range(len(images)), key=lambda b: tuple(images[b].shape[-2:]))  # same shapes together
    groups = []  # [first, end) in `order`, (H, W), band: rows/columns [y_lo, y_hi) x [x_lo, x_hi) any box reaches
    for rank, b in enumerate(order):
        shape = tuple(images[b].shape[-2:])
        if not groups or groups[-1]["shape"] != shape:
            groups.append({"first": rank, "shape": shape, "band": [shape[0], 0, shape[1], 0]})
        groups[-1]["end"] = rank + 1
        y0, y_scale, x0, x_scale, _ = boxes[b]
        band = groups[-1]["band"]
        for axis, (start, scale, limit) in enumerate(((y0, y_scale, shape[0]), (x0, x_scale, shape[1]))):
            support = max(scale, 1.0)  # the filter's half-width in source pixels (+1 below: rounding)
            band[2 * axis] = min(band[2 * axis], max(0, math.floor(start - support) - 1))
            band[2 * axis + 1] = max(band[2 * axis + 1], min(limit, math.ceil(start + size * scale + support) + 1))
    # One row per image, in `order`: its box, its image's size and its group's band start (where its
    # weights begin), the flip, and the image's place in the batch.
    params = []
    for group in groups:
        (height, width), (y_lo, _, x_lo, _) = group["shape"], group["band"]
        for b in order[group["first"]:group["end"]]:
            y0, y_scale, x0, x_scale, flip = boxes[b]
            params.append([y0, y_scale, height, y_lo, x0, x_scale, width, x_lo, float(flip), b])
    params = torch.tensor(params, dtype=torch.float32)  # (exact for the integers: all below 2^24)
    if device.type == "cuda":  # one asynchronous copy for the whole batch
        params = params.pin_memory()
    params = params.to(device, non_blocking=True)
    rows = _filter_weights(params[:, 0], params[:, 1], params[:, 2], params[:, 3], size,
                           max(g["band"][1] - g["band"][0] for g in groups))
    cols = _filter_weights(params[:, 4], params[:, 5], params[:, 6], params[:, 7], size,
                           max(g["band"][3] - g["band"][2] for g in groups), flip=params[:, 8] > 0)
    crops = []
    for group in groups:
        first, end, (y_lo, y_hi, x_lo, x_hi) = group["first"], group["end"], group["band"]
        n, h, w = end - first, y_hi - y_lo, x_hi - x_lo
        # [n, h, 3, w]: rows outermost, so both products below are batched matmuls of plain views
        band = torch.stack([images[b][:, y_lo:y_hi, x_lo:x_hi].permute(1, 0, 2) for b in order[first:end]])
        part = torch.bmm(rows[first:end, :, :h], band.float().view(n, h, 3 * w))  # [n, size, 3 w]
        part = torch.bmm(part.view(n, size * 3, w), cols[first:end, :, :w].transpose(1, 2))  # [n, 3 size, size]
        crops.append(part.view(n, size, 3, size).permute(0, 2, 1, 3))
    crops = torch.cat(crops)  # in `order`: back to the images' order
    batch = torch.empty_like(crops).index_copy_(0, params[:, 9].long(), crops)
    return batch.round_().clamp_(0, 255).to(torch.uint8)


def _filter_weights(start: torch.Tensor, scale: torch.Tensor, limit: torch.Tensor, offset: torch.Tensor,
                    size: int, length: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Per image b (float32 [B] each, on the device): the antialiased bilinear weights [B, size, length]
    of output pixel i over source pixels offset_b .. offset_b + length - 1 along one axis (of
    `limit` pixels), the output pixel sampling source position start + (i + 0.5) * scale. As in
    F.interpolate(antialias=True) and PIL: a triangle of half-width max(scale, 1) source pixels,
    cut at the image's edge and normalised to sum 1. flip [B] (bool): mirror the output axis."""
    device = start.device
    center = start[:, None] + scale[:, None] * (torch.arange(size, device=device, dtype=torch.float32) + 0.5)
    pixel = offset[:, None] + torch.arange(length, device=device, dtype=torch.float32)  # [B, length]
    support = scale.clamp(min=1.0)[:, None, None]
    weights = (1 - (pixel[:, None, :] + 0.5 - center[:, :, None]).abs_() / support).clamp_(min=0)
    weights *= (pixel < limit[:, None])[:, None, :]  # past the edge of an image (band of a larger one)
    weights /= weights.sum(dim=2, keepdim=True)
    if flip is not None:
        weights = torch.where(flip[:, None, None], weights.flip(1), weights)
    return weights


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
    """

    def __init__(self, loader: DataLoader, *, device, crop_size: int, scale_min: int, scale_max: int,
                 seed: int = 0, epoch: int = 0, channels_last: bool = False, prefetch: bool = True):
        self.loader = loader
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # pin it: threads start on GPU 0
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.crop_size, self.scale_min, self.scale_max = crop_size, scale_min, scale_max
        self.seed, self.epoch = seed, epoch
        self.channels_last, self.prefetch = channels_last, prefetch

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prepare(self, batch):
        """One collated batch of bytes -> (images, labels, list of Unreadable) on the device."""
        flat, sizes, labels, names, unreadable, indices = batch
        encoded = split_encoded(flat, sizes)
        decoded = decode_batch(encoded, self.device, names, unreadable=unreadable)
        keep = [i for i, image in enumerate(decoded) if image is not None]
        generators = [sample_generator(self.seed, self.epoch, int(indices[i])) for i in keep]
        images = gpu_train_augment([decoded[i] for i in keep], crop_size=self.crop_size,
                                   scale_min=self.scale_min, scale_max=self.scale_max, generators=generators)
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
                           shuffle: bool = False, drop_last: bool = True,
                           channels_last: bool = False, prefetch: bool = True) -> GpuTrainLoader:
    """The `data_path: gpu` training loader over `dataset` (a vgg.data.folders.ImageFolder, whose transform
    is ignored, or any list of (path, label) samples).

    sampler / shuffle / drop_last / workers mean what they mean for a DataLoader; `seed` seeds the
    shuffle, and with `epoch` the augmentation draws (see GpuTrainLoader).
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
                          channels_last=channels_last, prefetch=prefetch)
