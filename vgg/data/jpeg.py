"""Decoding only the crop box of a JPEG file (issue 16): libjpeg-turbo's cropped decode, called
through ctypes.

A training crop (paper §3.1) covers a third to a half of the decoded image; libjpeg-turbo can skip
the inverse DCT and colour conversion of the columns outside it and of the rows above it, and stop
after its last row (only the entropy decoding of those rows remains). The pixels are those of a full
decode (vgg/data/jpeg_crop.c says how; tests/test_crop_decode.py checks it), so the training images are
the same as before, 1.2-1.4x faster to make (bench/transforms.py).

No Python package exposes that part of libjpeg-turbo, so vgg/data/jpeg_crop.c is compiled on first use
with the system's C compiler against its libjpeg(-turbo) headers (`cc`, and Debian's
libjpeg62-turbo-dev), into the user's cache folder. Where that is impossible, `available()` is false
and vgg.data.transforms decodes whole files as before (one line in the log says so).
"""

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

SOURCE = Path(__file__).with_name("jpeg_crop.c")
MESSAGE_SIZE = 200  # libjpeg's JMSG_LENGTH_MAX
JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"  # a JPEG file's first bytes (SOI, a marker), its end marker
BUILD_PREFIX = "jpeg_crop-build-"  # a compile's temporary folder in the cache
STALE_BUILD_S = 3600  # a build folder this old was left by a compile that was killed
log = logging.getLogger(__name__)

_library = None  # the loaded library; False once building it failed (never retried in this process)


def _build() -> Path:
    """Compile jpeg_crop.c into <cache>/jpeg_crop-<hash of source>.so (atomically: DataLoader
    workers may build it at the same time); reuse it if there."""
    from vgg.data.cache import user_cache_dir  # (vgg.data imports vgg.data.transforms, which imports this module)

    source = SOURCE.read_bytes()
    target = user_cache_dir() / f"jpeg_crop-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed_builds(target.parent)
    with tempfile.TemporaryDirectory(prefix=BUILD_PREFIX, dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(SOURCE), "-o", str(built), "-ljpeg"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"compiling {SOURCE.name} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(built, target)
    return target


def _remove_killed_builds(cache: Path) -> None:
    """Temporary folders of compiles killed half-way (a compile takes about a second, so an hour-old
    one is not another process's build in progress)."""
    for folder in cache.glob(BUILD_PREFIX + "*"):
        try:
            if time.time() - folder.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(folder)
        except OSError:  # removed by another process meanwhile, or not ours to remove
            pass


def _load():
    global _library
    if _library is None:
        try:
            library = ctypes.CDLL(str(_build()))
        except OSError as e:
            log.info(f"decoding whole JPEG files: the cropped decoder is not available ({e})")
            _library = False
            return _library
        buffer, size, ints = ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int
        library.vgg_jpeg_decode_crop.argtypes = [buffer, size, ints, ints, ints, ints, ctypes.c_void_p,
                                                 ctypes.c_char_p]
        library.vgg_jpeg_header.argtypes = [buffer, size, ctypes.c_void_p, ctypes.c_char_p]
        library.vgg_jpeg_check.argtypes = [buffer, size, ctypes.c_char_p]
        _library = library
    return _library


def available() -> bool:
    """Whether the cropped decoder could be built and loaded here (built on the first call)."""
    return bool(_load())


class JpegFile(NamedTuple):
    """A whole colour JPEG file (3 components, ending with its end marker) and its size, read from its
    header by libjpeg: what `decode_crop` takes, without PIL having parsed the file."""

    data: bytes
    height: int
    width: int


def read_colour_jpeg(data: bytes) -> JpegFile | None:
    """`data` as a JpegFile if it is a whole colour JPEG file whose header libjpeg reads and the cropped
    decoder is available; None otherwise (other formats, grey or CMYK JPEGs, a file cut short before
    its end marker, a damaged header: PIL then opens it, and refuses it with its own message)."""
    if not (data[:3] == JPEG_START and data.endswith(JPEG_END) and available()):
        return None
    header = (ctypes.c_int * 3)()
    message = ctypes.create_string_buffer(MESSAGE_SIZE)
    if _load().vgg_jpeg_header(data, len(data), header, message) != 0 or header[2] != 3:
        return None
    return JpegFile(data, header[0], header[1])


def check_whole(data: bytes) -> None:
    """OSError if libjpeg warns on the JPEG file `data` (a file cut short but ending in an end-of-image
    marker: "premature end of data segment"; corrupt data), which PIL and TorchCodec decode without a
    word, filling the missing rows grey; their callers ask this first. Reads the file's coefficients
    only (no IDCT). A file without its end marker is left to those decoders, which refuse it ("image file
    is truncated"); nothing is checked where the cropped decoder could not be built."""
    if data[:3] != JPEG_START or not data.endswith(JPEG_END) or not available():
        return
    message = ctypes.create_string_buffer(MESSAGE_SIZE)
    if _load().vgg_jpeg_check(data, len(data), message) != 0:
        raise OSError(message.value.decode(errors="replace"))


def decode_crop(data: bytes, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Rows top..top+height-1 and columns left..left+width-1 of the full-size RGB decode of a colour
    JPEG file -> uint8 [3, height, width] (a CHW view of HWC pixels, as vgg.data.transforms.to_uint8_tensor).

    OSError for a damaged file: libjpeg's errors and its warnings (corrupt data, premature end), also
    below the box (its rows are entropy-decoded, not transformed, to reach the file's end).
    """
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    message = ctypes.create_string_buffer(MESSAGE_SIZE)
    if _load().vgg_jpeg_decode_crop(data, len(data), top, left, height, width, pixels.ctypes.data, message) != 0:
        raise OSError(message.value.decode(errors="replace"))
    return torch.from_numpy(pixels).permute(2, 0, 1)
