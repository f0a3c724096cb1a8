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
  * decode-time downscaling: libjpeg can decode at 1/2, 1/4 or 1/8 scale almost for free (PIL's
    `Image.draft`); we use the smallest such scale that keeps the decoded smallest side >= S, so
    nothing is upsampled that a full decode would not have upsampled;
  * no copy of the decoded pixels: in training, a colour JPEG decoded at full size is decoded by
    TorchCodec's CPU decoder straight into a tensor (same libjpeg-turbo, same pixels as PIL's, see
    `decode_uint8`; `EvalTransform` keeps PIL's decode, which several test scales share);
  * crop before resize: the crop box is mapped back to source pixels and only that box is
    resampled, which gives the pixels of "rescale the whole image, then crop" for a fraction of
    the work (most of all with scale jittering, where S goes up to 512);
  * the resampling itself is torch's vectorised uint8 antialiased bilinear kernel (the filter PIL
    uses, faster than PIL's own resize).
Images stay uint8 until the batch is formed.

Transforms take a PIL image. Handed one straight from `Image.open` (not yet loaded, as
`vgg.data.folders.ImageFolder` does), they decode it themselves with `decode_uint8`, at the reduced scale;
an already loaded image is used as it is. `TrainTransform` also takes a file's path or bytes (what
ImageFolder and vgg.data.shards hand it): a colour JPEG's header is then read by libjpeg, not PIL.
"""

import functools
import hashlib
import io
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchcodec.decoders import decode_jpeg

from vgg.core.errors import UserError
from vgg.data import jpeg as vjpeg

# Decoding. PIL's ImageFile.LOAD_TRUNCATED_IMAGES stays at its default, False, on purpose: a truncated
# JPEG raises OSError("image file is truncated") when loaded, and vgg.data.folders.ImageFolder skips the file
# with a warning instead of training on an image whose lower part is grey filler. A JPEG cut short but
# ending in an end-of-image marker gets past that check (libjpeg only warns, "premature end of data
# segment", and PIL and TorchCodec drop its warnings): vgg.data.jpeg.check_whole refuses it first.

# 16-bit grey images (PNG and TIFF open as I;16*, 16-bit PGM as I): PIL's convert("RGB") clips every
# value above 255, which turns them all white, so load_rgb scales them to 8 bits first (`_to_8_bit`).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _is_unloaded(image: Image.Image) -> bool:
    """True for an image fresh from Image.open whose pixels have not been decoded yet."""
    return bool(getattr(image, "tile", None))


def load_rgb(image, min_side: int | None = None) -> Image.Image:
    """Decode `image` (a path, or a PIL image from `Image.open`) to an RGB PIL image.

    min_side: the smallest side the caller will rescale to. For a not-yet-decoded JPEG, libjpeg then
    decodes at the smallest of the scales 1, 1/2, 1/4, 1/8 whose smallest side is still >= min_side
    (PIL's draft mode), which skips most of the decoding work for large photos. None: full size.

    CMYK, grayscale, palette and other modes (and PNGs named .JPEG) are converted to RGB, 16-bit
    grey (PNG, TIFF, PGM) scaled to 8 bits first. Raises
    OSError/ValueError/SyntaxError on files that cannot be decoded (vgg.data.folders.ImageFolder skips them).
    """
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if _is_unloaded(image):
        _check_whole_jpeg(image)
        _set_draft(image, min_side)
        image.load()
    elif min_side is not None and min(image.size) < min_side and _drafted_scale(image) > 1 \
            and getattr(image, "filename", ""):
        # Already decoded at a reduced scale for a smaller target (e.g. several test scales from
        # one opened file, smallest first): decode again rather than upsample the reduced copy.
        with Image.open(image.filename) as fresh:
            return load_rgb(fresh, min_side)
    if image.mode in SIXTEEN_BIT_MODES:
        image = _to_8_bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_whole_jpeg(image: Image.Image) -> None:
    """OSError for a JPEG that libjpeg warns on (cut short but ending in an end-of-image marker: PIL
    would fill its lower part grey without a word, even with LOAD_TRUNCATED_IMAGES False)."""
    if image.format == "JPEG":
        image.fp.seek(0)
        vjpeg.check_whole(image.fp.read())


def _set_draft(image: Image.Image, min_side: int | None) -> None:
    """Ask libjpeg (PIL's draft mode) for the largest 1/2^k reduction whose smallest side is still
    >= min_side; a no-op for other formats and for an image already drafted."""
    if min_side is None:
        return
    width, height = image.size
    scale = min_side / min(width, height)
    if scale < 1:
        # draft picks the largest 1/2^k reduction with both sides >= the requested size.
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))


def decode_uint8(image, min_side: int | None = None) -> torch.Tensor:
    """Decode `image` (a path, or a PIL image from `Image.open`) to uint8 RGB pixels [3, H, W]: the
    pixels of `to_uint8_tensor(load_rgb(image, min_side))`, possibly a strided view.

    A colour JPEG that PIL would decode at full size (no 1/2^k reduction fits min_side) is decoded
    straight into a tensor by TorchCodec's CPU decoder: libjpeg-turbo with PIL's settings, so the
    same pixels (tests/test_fast_decode.py), without PIL's copy of them into a bytes object, which
    costs a fifth of a decode for ImageNet's ~500x375 photos (bench/transforms.py).
    """
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return decode_uint8(opened, min_side)
    data = _full_size_jpeg_bytes(image, min_side)
    return _decode_jpeg_file(data) if data is not None else to_uint8_tensor(load_rgb(image, min_side))


def _decode_jpeg_file(data: bytes) -> torch.Tensor:
    """A colour JPEG file's bytes -> uint8 [3, H, W]; OSError for a damaged file.

    By the cropped decoder with the whole image as its box where it was built: libjpeg-turbo with PIL's
    settings like TorchCodec (the same pixels, as fast: 1.01 vs 1.03 ms a ~500x333 file, one thread,
    2026-12-04), and in the same pass it refuses a file libjpeg warns on (cut short but ending in an
    end-of-image marker), where TorchCodec only prints the warning and fills the rest grey; checking
    first and then decoding with TorchCodec took 1.86 ms. TorchCodec, after that check, elsewhere."""
    jpeg = vjpeg.read_colour_jpeg(data)
    if jpeg is not None:
        return vjpeg.decode_crop(data, 0, 0, jpeg.height, jpeg.width)
    vjpeg.check_whole(data)  # TorchCodec only prints libjpeg's warnings (a file cut short: grey rows)
    try:
        return decode_jpeg(data, mode="RGB")
    except RuntimeError as e:  # TorchCodec's error for a corrupt or truncated file
        raise OSError(str(e).split(", ")[-1]) from None


def _full_size_jpeg_bytes(image: Image.Image, min_side: int | None) -> bytes | None:
    """The file's bytes if `image` (fresh from Image.open) is a colour JPEG that PIL would decode at
    full size for min_side (no 1/2^k reduction fits); else None, and `image` is left for load_rgb."""
    if not (_is_unloaded(image) and image.format == "JPEG" and image.mode == "RGB"):
        return None
    _set_draft(image, min_side)
    if _drafted_scale(image) != 1:
        return None
    image.fp.seek(0)
    return image.fp.read()


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit grey -> 8-bit grey ("L"): v * 255 / 65535, rounded (so 257 * k -> k exactly).

    Mode "I" is 32-bit; values outside 0..65535 are clipped (it holds 16-bit data here).
    """
    pixels = np.asarray(image).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))  # 2-D uint8: mode L


def _drafted_scale(image: Image.Image) -> int:
    config = getattr(image, "decoderconfig", ())
    return config[0] if config else 1


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
    `sample_generator`) or torch's global RNG; vgg.data.gpu uses this same function, so both data
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

    keep_decoded: decode with PIL (`load_rgb`), which keeps the pixels in `image`, for callers that
    take several scales of one opened image (vgg.evaluation.inputs.MultiScaleTransform: decoded once);
    otherwise the box only of a full-size colour JPEG (vgg.data.jpeg, where it could be built; the same
    pixels, 1.2-1.4x faster than decoding the whole file), and `decode_uint8` for the others.

    Only the box is resampled: it is mapped back to the decoded image's pixel grid (snapped to whole
    source pixels, which moves the crop by under a source pixel and changes its scale by under 1 %:
    nothing next to the 1x-2x scale jitter) and resized with antialiased bilinear interpolation, as
    PIL does, by torch's vectorised uint8 kernel (several times faster than PIL's).
    """
    min_side = min(new_h, new_w)
    if isinstance(image, vjpeg.JpegFile):  # its header read by libjpeg, not PIL (TrainTransform)
        if min(image.height, image.width) >= 2 * min_side:  # a 1/2^k reduced decode may fit: PIL decides
            with Image.open(io.BytesIO(image.data)) as opened:
                return _resized_crop(opened, new_h, new_w, top, left, crop_h, crop_w)
        # No reduction fits, so PIL would decode it at full size: decode the box only, as below.
        return _resampled_box(functools.partial(vjpeg.decode_crop, image.data), image.height, image.width,
                              new_h, new_w, top, left, crop_h, crop_w)
    data = None if keep_decoded else _full_size_jpeg_bytes(image, min_side)
    if data is not None and data.endswith(vjpeg.JPEG_END) and vjpeg.available():
        # A whole colour JPEG file (one truncated before its end marker goes to the full decoder,
        # which refuses it as before): decode the box only, the same pixels as a full decode.
        src_h, src_w = image.height, image.width
        decode_box = functools.partial(vjpeg.decode_crop, data)
    else:
        if keep_decoded:
            pixels = to_uint8_tensor(load_rgb(image, min_side))
        else:
            pixels = _decode_jpeg_file(data) if data is not None else decode_uint8(image, min_side)
        src_h, src_w = pixels.shape[1:]
        decode_box = lambda y, x, h, w: pixels[:, y:y + h, x:x + w]  # noqa: E731
    return _resampled_box(decode_box, src_h, src_w, new_h, new_w, top, left, crop_h, crop_w)


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


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]: a CHW view of the HWC pixels (one copy, no float).

    The tensor may be read-only memory (PIL hands numpy a bytes object); every transform here only
    reads it and returns new tensors.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


class TrainTransform:
    """Paper §3.1: rescale (smallest side S, S uniform in [scale_min, scale_max]; fixed S when they
    are equal), random crop_size x crop_size crop, random horizontal flip -> `TrainCrop(uint8 [3, crop,
    crop], colour-shift alphas [3])`.

    Called with the sample's `index` (vgg.data.folders.ImageFolder passes it), every draw comes from
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
        vjpeg.available()  # built and loaded here, so DataLoader workers inherit it rather than each build it

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image, index: int | None = None) -> TrainCrop:
        """image: a file's path or its bytes (vgg.data.folders.ImageFolder and vgg.data.shards pass these: a colour
        JPEG's header is then read by libjpeg, in a tenth of the time of PIL's Image.open, and only its crop box
        decoded), or a PIL image from Image.open. OSError/ValueError/SyntaxError for a damaged file."""
        generator = None if index is None else sample_generator(self.seed, self.epoch, index)
        if isinstance(image, Image.Image):
            return self._crop(image, image.height, image.width, generator)
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        jpeg = vjpeg.read_colour_jpeg(data)
        if jpeg is not None:
            return self._crop(jpeg, jpeg.height, jpeg.width, generator)
        # Other formats, grey and CMYK JPEGs, damaged files: PIL (a path is opened by name, so that
        # its refusal names the file).
        with Image.open(io.BytesIO(data) if isinstance(image, bytes) else image) as opened:
            return self._crop(opened, opened.height, opened.width, generator)

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
