"""Decoding a file to uint8 RGB pixels for the transforms (vgg.data.batches.transforms): PIL, TorchCodec, and
nvImageCodec (vgg.data.batches.jpeg), each where it is the quicker one for the same pixels.

  * decode-time downscaling: libjpeg can decode at 1/2, 1/4 or 1/8 scale almost for free (PIL's
    `Image.draft`); we use the smallest such scale that keeps the decoded smallest side >= S, so
    nothing is upsampled that a full decode would not have upsampled;
  * no copy of the decoded pixels: a colour JPEG decoded at full size is decoded straight into a tensor
    (nvImageCodec, or TorchCodec without it: same libjpeg-turbo, same pixels as PIL's, see
    `decode_uint8`).

Damaged files are refused (OSError), never decoded with grey filling. PIL's ImageFile.LOAD_TRUNCATED_IMAGES
stays False (a JPEG cut before its end marker raises "image file is truncated"), and a file's verdict of
vgg.data.batches.jpeg.check (a JPEG cut short but ending in an end marker, which PIL and TorchCodec decode with grey
rows without a word) rides on the opened image (`mark_checked`): vgg.data.datasets.folders.ImageFolder puts its
cached verdict there, and a file without one is checked here before it is decoded.
"""

import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from vgg.data.batches import jpeg as vjpeg
from vgg.data.batches.jpeg import Check

# 16-bit grey images (PNG and TIFF open as I;16*, 16-bit PGM as I): PIL's convert("RGB") clips every
# value above 255, which turns them all white, so load_rgb scales them to 8 bits first (`_to_8_bit`).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
CHECK_KEY = "vgg_check"  # the file's vgg.data.batches.jpeg.Check in an opened image's `info`


class Unreadable(NamedTuple):
    """A file that could not be read or decoded, and why (one line)."""

    path: str
    reason: str


def _is_unloaded(image: Image.Image) -> bool:
    """True for an image fresh from Image.open whose pixels have not been decoded yet."""
    return bool(getattr(image, "tile", None))


def mark_checked(image: Image.Image, check: Check) -> Image.Image:
    """Note on an opened image its file's verdict (vgg.data.batches.jpeg.check), so that it is not checked again."""
    if check != Check.UNCHECKED:
        image.info[CHECK_KEY] = check
    return image


def file_check(image: Image.Image) -> Check:
    """The verdict on an opened image's file: the one noted on it, else vgg.data.batches.jpeg.check of its bytes
    (noted). OSError for a damaged file. An image already decoded is taken as it is (QUIRK: PIL's)."""
    check = image.info.get(CHECK_KEY, Check.UNCHECKED)
    if check == Check.UNCHECKED:
        if not _is_unloaded(image) or image.fp is None:
            return Check.QUIRK
        image.fp.seek(0)
        verdict = vjpeg.check(image.fp.read())
        if verdict.check == Check.DAMAGED:
            raise OSError(verdict.note)
        check = verdict.check
        mark_checked(image, check)
    return check


def load_rgb(image, min_side: int | None = None) -> Image.Image:
    """Decode `image` (a path, or a PIL image from `Image.open`) to an RGB PIL image.

    min_side: the smallest side the caller will rescale to. For a not-yet-decoded JPEG, libjpeg then
    decodes at the smallest of the scales 1, 1/2, 1/4, 1/8 whose smallest side is still >= min_side
    (PIL's draft mode), which skips most of the decoding work for large photos. None: full size.

    CMYK, grayscale, palette and other modes (and PNGs named .JPEG) are converted to RGB, 16-bit
    grey (PNG, TIFF, PGM) scaled to 8 bits first. Raises
    OSError/ValueError/SyntaxError on files that cannot be decoded (vgg.data.datasets.folders.ImageFolder skips them).
    """
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if _is_unloaded(image):
        file_check(image)
        _set_draft(image, min_side)
        image.load()
    elif min_side is not None and min(image.size) < min_side and _drafted_scale(image) > 1 \
            and getattr(image, "filename", ""):
        # Already decoded at a reduced scale for a smaller target (e.g. several test scales from
        # one opened file, smallest first): decode again rather than upsample the reduced copy.
        with Image.open(image.filename) as fresh:
            return load_rgb(mark_checked(fresh, image.info.get(CHECK_KEY, Check.UNCHECKED)), min_side)
    if image.mode in SIXTEEN_BIT_MODES:
        image = _to_8_bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


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

    A whole colour JPEG that PIL would decode at full size (no 1/2^k reduction fits min_side) is decoded
    straight into a tensor (`decode_jpeg_file`), without PIL's copy of the pixels into a bytes object,
    which costs a fifth of a decode for ImageNet's ~500x375 photos (bench/transforms.py).
    """
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return decode_uint8(opened, min_side)
    data = full_size_jpeg_bytes(image, min_side)
    return decode_jpeg_file(data) if data is not None else to_uint8_tensor(load_rgb(image, min_side))


def decode_jpeg_file(data: bytes) -> torch.Tensor:
    """A checked colour JPEG file's bytes (vgg.data.batches.jpeg.Check.OK) -> uint8 [3, H, W]: nvImageCodec's
    decode of the whole image, or TorchCodec's where it is not available (libjpeg-turbo with PIL's
    settings both: the same pixels). OSError if it cannot be decoded."""
    jpeg = vjpeg.read_jpeg(data)
    if jpeg is not None:
        return vjpeg.decode_crop(jpeg, 0, 0, jpeg.height, jpeg.width)
    from torchcodec.decoders import decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
    except RuntimeError as e:  # TorchCodec's error for a corrupt file
        raise OSError(str(e).split(", ")[-1]) from None


def full_size_jpeg_bytes(image: Image.Image, min_side: int | None) -> bytes | None:
    """The file's bytes if `image` (fresh from Image.open) is a sound colour JPEG (Check.OK) that PIL would
    decode at full size for min_side (no 1/2^k reduction fits); else None, and `image` is left for load_rgb.
    OSError for a damaged file."""
    if not (_is_unloaded(image) and image.format == "JPEG" and image.mode == "RGB"):
        return None
    if file_check(image) != Check.OK:
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


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]: a CHW view of the HWC pixels (one copy, no float).

    The tensor may be read-only memory (PIL hands numpy a bytes object); every transform here only
    reads it and returns new tensors.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
