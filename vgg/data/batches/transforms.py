"""Image transforms: per-image geometry on uint8 in DataLoader workers, float work on whole batches.

Training (paper §3.1), per image in a worker (`TrainTransform`):
    decode -> RGB -> isotropic rescale so the smallest side is S (S fixed, or uniform in
    [S_min, S_max]: scale jittering) -> random crop_size x crop_size crop -> random horizontal flip
    -> uint8 tensor [3, crop, crop], with the colour-shift alphas drawn for the image (`TrainCrop`);
every draw comes from `sample_generator(seed, epoch, sample index)`, so none depends on the worker;
then per batch, on the device the batch is on (the trainer's `BatchAugment`):
    `normalize` (subtract the training set's mean RGB, paper §2.1) -> `color_shift` (AlexNet §4.1).

Evaluation (paper §3.2): `EvalTransform` rescales the smallest side to Q and does not crop (the
evaluator crops or runs the net densely); `CenterCropTransform` is the quick validation during training.

What keeps the per-image part close to the cost of decoding the file (bench/transforms.py,
docs/benchmarks.md):
  * decoding only what is needed (vgg.data.batches.decode): the crop box only of a JPEG that PIL would decode at
    full size (nvImageCodec's region decode, vgg.data.batches.jpeg: the same pixels, 1.2-1.4x faster than the
    whole file), libjpeg's 1/2^k reduced decode for large photos; `EvalTransform` keeps PIL's decode,
    which several test scales share;
  * crop before resize: the crop box is mapped back to source pixels and only that box is
    resampled, which gives the pixels of "rescale the whole image, then crop" for a fraction of
    the work (most of all with scale jittering, where S goes up to 512);
  * the resampling itself is torch's vectorised uint8 antialiased bilinear kernel (the filter PIL
    uses, faster than PIL's own resize);
  * each file checked for damage once per dataset (vgg.data.datasets.checks), not once per epoch.
Images stay uint8 until the batch is formed.

Transforms take a PIL image. Handed one straight from `Image.open` (not yet loaded, as
`vgg.data.datasets.folders.ImageFolder` does), they decode it themselves (vgg.data.batches.decode), at
the reduced scale; an already loaded image is used as it is. `TrainTransform` also takes a file's path or bytes (what
ImageFolder and vgg.data.datasets.shards hand it): a JPEG's header is then read by nvImageCodec, not PIL.
"""

import functools
import hashlib
import io
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from vgg.core.errors import UserError
from vgg.data.batches import jpeg as vjpeg
from vgg.data.batches.decode import (  # noqa: F401 - load_rgb, decode_uint8, to_uint8_tensor: used from here too
    decode_jpeg_file,
    decode_uint8,
    full_size_jpeg_bytes,
    load_rgb,
    mark_checked,
    to_uint8_tensor,
)
from vgg.data.batches.jpeg import Check

def _check_size(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def scaled_size(height: int, width: int, smallest_side: int) -> tuple[int, int]:
    """(new_height, new_width) of an isotropic rescale that makes the smallest side `smallest_side`.

    The other side is rounded down, never below smallest_side.
    """
    if height <= width:
        return smallest_side, max(smallest_side, int(smallest_side * width / height))
    return max(smallest_side, int(smallest_side * height / width)), smallest_side


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one training sample's random draws: a pure function of (seed, epoch, index).

    Every draw of the training augmentation (S, crop position, flip, colour-shift alphas) comes from
    it, so a sample is augmented alike whatever the worker count, the process, the data path, or
    where a resumed epoch starts. BLAKE2 hashes the three numbers into well-mixed 64-bit seeds
    (nearby seeds, epochs and indices give unrelated streams) in ~1 us, a tenth of numpy's
    SeedSequence, which took ~3 % of a sample's whole transform (bench/transforms.py).
    """
    digest = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def draw_train_crop(height: int, width: int, *, crop_size: int, scale_min: int, scale_max: int,
                    generator: torch.Generator | None = None) -> tuple[int, int, int, int, bool]:
    """One draw of the paper's training augmentation (§3.1) for a height x width image.

    Returns (new_height, new_width, top, left, flip): rescale isotropically so the smallest side is
    S ~ U{scale_min..scale_max}, take the crop_size x crop_size crop at (top, left) of the rescaled
    image, flip it horizontally if `flip`. Draws from `generator` (in training the sample's
    `sample_generator`) or torch's global RNG; vgg.data.batches.gpu uses this same function, so both data
    paths draw alike.
    """
    # One call for the four draws: each torch call costs several microseconds, ~5 % of a sample's
    # whole transform when made one draw at a time (bench/transforms.py). A uniform u in [0, 1) picks
    # one of n values as floor(u * n) (53-bit uniforms: no value favoured).
    u_scale, u_top, u_left, u_flip = torch.rand(4, dtype=torch.float64, generator=generator).tolist()
    s = scale_min + int(u_scale * (scale_max - scale_min + 1))
    new_h, new_w = scaled_size(height, width, s)
    top = int(u_top * (new_h - crop_size + 1))
    left = int(u_left * (new_w - crop_size + 1))
    return new_h, new_w, top, left, u_flip < 0.5


def draw_alphas(generator: torch.Generator | None = None) -> torch.Tensor:
    """A sample's colour-shift alphas (AlexNet §4.1): float32 [3] ~ N(0, 1), drawn after
    `draw_train_crop` from the same generator; `color_shift` scales them by its std."""
    return torch.randn(3, generator=generator)


class TrainCrop(NamedTuple):
    """A training crop and its colour-shift alphas: uint8 [3, crop, crop] and float32 [3] per sample;
    collated (default_collate keeps the NamedTuple), uint8 [B, 3, crop, crop] and float32 [B, 3].
    `vgg.training.step.BatchAugment` applies the alphas, so they travel with the batch in one small copy."""

    image: torch.Tensor
    alphas: torch.Tensor


def _resized_crop(image, new_h: int, new_w: int, top: int, left: int, crop_h: int, crop_w: int, *,
                  keep_decoded: bool = False) -> torch.Tensor:
    """Decode, rescale to new_h x new_w and cut the crop_h x crop_w box at (top, left) -> uint8 [3, crop_h, crop_w].

    image: a PIL image from Image.open, or a checked JPEG file (vgg.data.batches.jpeg.JpegFile, Check.OK).
    keep_decoded: decode with PIL (`load_rgb`), which keeps the pixels in `image`, for callers that
    take several scales of one opened image (vgg.evaluation.inputs.MultiScaleTransform: decoded once);
    otherwise the box only of a sound JPEG that PIL would decode at full size (nvImageCodec's region
    decode: the same pixels, 1.2-1.4x faster than decoding the whole file), and `decode_uint8` for the others.

    Only the box is resampled: it is mapped back to the decoded image's pixel grid (snapped to whole
    source pixels, which moves the crop by under a source pixel and changes its scale by under 1 %:
    nothing next to the 1x-2x scale jitter) and resized with antialiased bilinear interpolation, as
    PIL does, by torch's vectorised uint8 kernel (several times faster than PIL's).
    """
    min_side = min(new_h, new_w)
    if not isinstance(image, vjpeg.JpegFile):
        data = None if keep_decoded else full_size_jpeg_bytes(image, min_side)
        jpeg = None if data is None else vjpeg.read_jpeg(data)
        if jpeg is None:  # PIL's decode (reduced, or another format, or a quirk), or TorchCodec's
            if keep_decoded:
                pixels = to_uint8_tensor(load_rgb(image, min_side))
            else:
                pixels = decode_jpeg_file(data) if data is not None else decode_uint8(image, min_side)
            return _resampled_box(lambda y, x, h, w: pixels[:, y:y + h, x:x + w], *pixels.shape[1:],
                                  new_h, new_w, top, left, crop_h, crop_w)
        image = jpeg  # PIL would decode it at full size (no reduction fits): decode the box only, below
    elif min(image.height, image.width) >= 2 * min_side:  # a 1/2^k reduced decode may fit: PIL decides
        with Image.open(io.BytesIO(image.data)) as opened:
            return _resized_crop(mark_checked(opened, Check.OK), new_h, new_w, top, left, crop_h, crop_w)
    # No reduction fits, so PIL would decode it at full size: decode the box only.
    return _resampled_box(functools.partial(vjpeg.decode_crop, image), image.height, image.width,
                          new_h, new_w, top, left, crop_h, crop_w)


def _resampled_box(decode_box, src_h: int, src_w: int, new_h: int, new_w: int, top: int, left: int, crop_h: int,
                   crop_w: int) -> torch.Tensor:
    """The crop_h x crop_w box at (top, left) of the src_h x src_w image rescaled to new_h x new_w:
    `decode_box(y, x, h, w)` gives the source pixels of the box, which are resampled to the crop's size."""
    y0, y1 = _source_span(top, crop_h, src_h / new_h, src_h)
    x0, x1 = _source_span(left, crop_w, src_w / new_w, src_w)
    region = decode_box(y0, x0, y1 - y0, x1 - x0)
    if region.shape[1:] == (crop_h, crop_w):
        return region.clone(memory_format=torch.contiguous_format)  # a copy: `pixels` may be read-only
    return F.interpolate(region[None], size=(crop_h, crop_w), mode="bilinear", antialias=True,
                         align_corners=False)[0].contiguous()


def _source_span(start: int, length: int, scale: float, limit: int) -> tuple[int, int]:
    """[start, start + length) in rescaled coordinates -> whole source pixels [a, b) inside [0, limit)."""
    a = min(max(0, round(start * scale)), limit - 1)
    b = min(limit, max(a + 1, round((start + length) * scale)))
    return a, b


class TrainTransform:
    """Paper §3.1: rescale (smallest side S, S uniform in [scale_min, scale_max]; fixed S when they
    are equal), random crop_size x crop_size crop, random horizontal flip -> `TrainCrop(uint8 [3, crop,
    crop], colour-shift alphas [3])`.

    Called with the sample's `index` (vgg.data.datasets.folders.ImageFolder passes it), every draw comes from
    `sample_generator(seed, epoch, index)`: the run's seed, the epoch set by `set_epoch` (before the
    epoch's DataLoader starts its workers, which copy the transform) and the index. Without an index
    it draws from torch's global RNG (quick looks, benchmarks).
    Mean subtraction and the colour shift are done later on whole batches (`normalize`, `color_shift`).
    """

    def __init__(self, *, crop_size: int, scale_min: int, scale_max: int, seed: int = 0):
        _check_size("crop_size", crop_size)
        _check_size("scale_min", scale_min, crop_size)
        _check_size("scale_max", scale_max, scale_min)
        self.crop_size, self.scale_min, self.scale_max = crop_size, scale_min, scale_max
        self.seed, self.epoch = seed, 0
        vjpeg.available()  # imported here, so DataLoader workers inherit it rather than each import it

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image, index: int | None = None, check: Check = Check.UNCHECKED) -> TrainCrop:
        """image: a file's path or its bytes (vgg.data.datasets.folders.ImageFolder and vgg.data.datasets.shards
        pass these: a JPEG's header is then read by nvImageCodec, in a tenth of the time of PIL's Image.open,
        and only its crop box decoded), or a PIL image from Image.open. check: the file's verdict where the
        caller has it (ImageFolder's, cached: vgg.data.datasets.checks); unchecked, the file is checked first
        (vgg.data.batches.jpeg.check).
        OSError/ValueError/SyntaxError for a damaged file."""
        generator = None if index is None else sample_generator(self.seed, self.epoch, index)
        if isinstance(image, Image.Image):
            return self._crop(image, image.height, image.width, generator)
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        if check == Check.UNCHECKED:
            verdict = vjpeg.check(data)
            if verdict.check == Check.DAMAGED:
                raise OSError(verdict.note if isinstance(image, bytes) else f"{verdict.note}: {image}")
            check = verdict.check
        jpeg = vjpeg.read_jpeg(data) if check == Check.OK else None
        if jpeg is not None:
            return self._crop(jpeg, jpeg.height, jpeg.width, generator)
        # Quirks (PNGs named .JPEG, CMYK, extraneous bytes before a marker) and, without nvImageCodec, every
        # file: PIL (a path is opened by name, so that any refusal names the file).
        with Image.open(io.BytesIO(data) if isinstance(image, bytes) else image) as opened:
            return self._crop(mark_checked(opened, check), opened.height, opened.width, generator)

    def _crop(self, image, height: int, width: int, generator: torch.Generator | None) -> TrainCrop:
        new_h, new_w, top, left, flip = draw_train_crop(height, width, crop_size=self.crop_size,
                                                        scale_min=self.scale_min, scale_max=self.scale_max,
                                                        generator=generator)
        crop = _resized_crop(image, new_h, new_w, top, left, self.crop_size, self.crop_size)
        return TrainCrop(crop.flip(-1) if flip else crop, draw_alphas(generator))

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, scale_min={self.scale_min}, "
                f"scale_max={self.scale_max}, seed={self.seed})")


class EvalTransform:
    """Paper §3.2: rescale isotropically so the smallest side is Q (`scale`); no crop -> uint8 [3, H, W]."""

    def __init__(self, *, scale: int):
        self.scale = _check_size("scale", scale)

    def __call__(self, image) -> torch.Tensor:
        width, height = image.size
        new_h, new_w = scaled_size(height, width, self.scale)
        # PIL's decode, kept in `image`: the evaluator takes several scales of one opened image.
        return _resized_crop(image, new_h, new_w, 0, 0, new_h, new_w, keep_decoded=True)

    def __repr__(self) -> str:
        return f"EvalTransform(scale={self.scale})"


class CenterCropTransform:
    """Quick validation during training: rescale the smallest side to Q (`scale`), then take the
    central crop_size x crop_size crop -> uint8 [3, crop, crop] (fixed-size, so batches stack)."""

    def __init__(self, *, scale: int, crop_size: int):
        self.crop_size = _check_size("crop_size", crop_size)
        self.scale = _check_size("scale", scale, crop_size)

    def __call__(self, image) -> torch.Tensor:
        width, height = image.size
        new_h, new_w = scaled_size(height, width, self.scale)
        top = int(round((new_h - self.crop_size) / 2))
        left = int(round((new_w - self.crop_size) / 2))
        return _resized_crop(image, new_h, new_w, top, left, self.crop_size, self.crop_size)

    def __repr__(self) -> str:
        return f"CenterCropTransform(scale={self.scale}, crop_size={self.crop_size})"


# --- Batch-level float work (on whatever device the batch is on) ---------------------------------

def normalize(images: torch.Tensor, mean_rgb) -> torch.Tensor:
    """uint8 images [B, 3, H, W] (or [3, H, W]) -> float32 with the mean RGB subtracted (paper §2.1).

    The only pre-processing the paper does: pixel values stay on the 0..255 scale. Runs on the
    images' device and keeps the memory format (channels-last stays channels-last). Converting
    first and subtracting in place is ~2x faster on the CPU than one mixed-dtype subtraction.

    mean_rgb: 3 numbers, or a float32 tensor [3] already on the images' device (the training loop's,
    `vgg.training.step.DeviceStats`): numbers are copied to the device on every call, which on CUDA is a
    blocking copy, so per-step callers pass the tensor.
    """
    mean = torch.as_tensor(mean_rgb, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return images.to(torch.float32).sub_(mean)


def color_shift(images: torch.Tensor, stats, std: float = 0.1,
                generator: torch.Generator | None = None, alphas: torch.Tensor | None = None) -> torch.Tensor:
    """AlexNet §4.1 PCA colour augmentation, used by the paper (§3.1): adds a per-image RGB shift to
    float images [B, 3, H, W] on any device, IN PLACE (the batch from `normalize` is a temporary,
    and a second batch-sized buffer costs as much as the shift on the CPU), and returns them.

    The shift is sum_i alpha_i * lambda_i * p_i, with p_i, lambda_i the eigenvectors (columns of
    `stats.eigvec`) and eigenvalues of the training set's RGB covariance and alpha_i ~ N(0, std^2)
    drawn once per image (and per pass over it). The statistics are computed on pixel values scaled
    to [0, 1] (so the well-known ImageNet eigenvalues 0.2175, 0.0188, 0.0045 apply), while images
    here are on the 0..255 scale minus the mean, so the shift is multiplied by 255.

    stats: anything with `eigval` [3] and `eigvec` [3, 3]: a DatasetStats (numbers, copied to the
    device on every call: a blocking copy on CUDA), or `vgg.training.step.DeviceStats` (float32 tensors
    already on the images' device, as the training loop passes them: no copy).
    alphas: the images' standard-normal draws [B, 3] (a training batch's `TrainCrop.alphas`, drawn
    per sample), multiplied by std here; no copy when already on the images' device. Without them
    they are drawn from `generator` (a CPU generator works for CUDA images, at the cost of a
    copy), or the images' device's global RNG when that is None.
    """
    batch = images.shape[0]
    if alphas is None:
        gen_device = generator.device if generator is not None else images.device  # global RNG: no copy
        alphas = torch.randn(batch, 3, generator=generator, device=gen_device)
    alphas = alphas.to(images.device, torch.float32) * std
    eigval = torch.as_tensor(stats.eigval, dtype=torch.float32, device=images.device)
    eigvec = torch.as_tensor(stats.eigvec, dtype=torch.float32, device=images.device)
    shift = 255.0 * (alphas * eigval) @ eigvec.T  # [B, 3]: row b = sum_i alpha_bi lambda_i p_i
    return images.add_(shift.to(images.dtype).view(batch, 3, 1, 1))
