"""JPEG files through NVIDIA's nvImageCodec (issue 35): the header, the crop box only, and the check for
damage that every file of a dataset gets once (vgg.data.datasets.checks).

A training crop (paper §3.1) covers a third to a half of the decoded image. nvImageCodec's region decode
(libjpeg-turbo on the CPU, nvJPEG on the GPU: vgg.data.batches.gpu_decode) skips the inverse DCT and colour
conversion outside the box and stops after its last row; its pixels are those of a full decode by PIL
(tests/test_crop_decode.py checks 4:2:0, 4:2:2, 4:4:4, progressive, grey, CMYK and EXIF-tagged files), so
the training images are the same, 1.2-1.4x faster to make (bench/transforms.py).

nvImageCodec does not refuse a damaged file: one cut short but ending in an end-of-image marker comes
back with grey rows, libjpeg's warning printed on stderr. `check` therefore decodes a file's last pixel
(which entropy-decodes every scan) with stderr captured, and reads libjpeg's message: a premature end or
corrupt entropy data is damage; anything else it says (extraneous bytes before a marker) is a harmless
quirk, and such files are decoded by PIL, as PIL decodes them. Nothing the library writes on stderr
(its import notes "Failed to load nvjpeg2k/nvtiff", libjpeg's messages) reaches the user's log: it is
captured (`captured_stderr`) and logged at debug level, and its own logger is silenced
(PYNVIMGCODEC_VERBOSITY=0).

nvImageCodec has wheels for Linux (x86_64, aarch64) only. Elsewhere `available()` is false: files are
decoded whole (TorchCodec, PIL), checked the same way with TorchCodec's decoder, and one log line says so.
"""

import contextlib
import enum
import io
import logging
import os
import re
import struct
import sys
import tempfile
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"  # a JPEG file's first bytes (SOI, a marker), its end marker
# libjpeg's warnings that some of the image is not in the file (jerror.h): cut short (JWRN_HIT_MARKER,
# JWRN_JPEG_EOF, a read error), or corrupt entropy-coded data (JWRN_HUFF_BAD_CODE, JWRN_MUST_RESYNC,
# JWRN_NOT_SEQUENTIAL, JWRN_BOGUS_PROGRESSION, coefficients out of range). Its other warnings (extraneous
# bytes before a marker, an unknown JFIF revision, a thumbnail's size) leave every pixel decoded.
# Start-of-frame markers (SOF0-SOF15 except DHT C4, JPG C8 and DAC CC): they carry the component count.
SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
DAMAGE = re.compile(r"premature end|read error|huffman|instead of RST|invalid SOS|progression|out of range", re.I)
# Everything PIL raises on a file it cannot decode: missing/empty/not an image (UnidentifiedImageError,
# an OSError), truncated data (OSError), broken headers (SyntaxError, ValueError, struct.error, EOFError)
# and absurd sizes (DecompressionBombError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
log = logging.getLogger(__name__)

CPU_ONLY = -99999  # nvimgcodec.h's NVIMGCODEC_DEVICE_CPU_ONLY, which its Python module names from 0.9 on only
_codec = None  # the nvidia.nvimgcodec module; False where it is not installed
_decoders: dict = {}  # process id -> its CPU-only decoder (a forked DataLoader worker makes its own)
_params: dict = {}  # process id -> its DecodeParams
_capture: tuple | None = None  # (process id, file descriptor) of this process's stderr capture file


class Check(enum.IntEnum):
    """A file's verdict (vgg.data.datasets.checks keeps one per file of a dataset)."""

    UNCHECKED = 0
    OK = 1  # a JPEG libjpeg decodes without a word: nvImageCodec decodes its crop box
    QUIRK = 2  # harmless (a PNG named .JPEG, extraneous bytes before a marker): PIL decodes it
    DAMAGED = 3  # cut short or corrupt: never trained on or evaluated (skipped.txt)


class Verdict(NamedTuple):
    check: Check
    note: str = ""  # why a file is a quirk or damaged, one line


def load():
    """The nvidia.nvimgcodec module (imported on the first call, its stderr notes captured), or None."""
    global _codec
    if _codec is None:
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")  # its logger: errors of a file we refuse anyway
        notes = []
        try:
            with captured_stderr(notes):
                from nvidia import nvimgcodec
            _codec = nvimgcodec
        except ImportError as e:  # no wheel for this platform (macOS, Windows), or not installed
            log.info(f"decoding whole JPEG files: nvImageCodec is not available ({e})")
            _codec = False
        if notes[0].strip():
            log.debug(f"nvImageCodec at import: {' '.join(notes[0].split())}")
    return _codec or None


def available() -> bool:
    """Whether nvImageCodec's region decode is there, in this process (imported on the first call)."""
    return load() is not None and cpu_decoder() is not None


@contextlib.contextmanager
def captured_stderr(out: list):
    """What C libraries write on file descriptor 2 inside the block is appended to `out` (one string)
    instead of reaching the terminal or the run's log. A file of this process's, reused."""
    global _capture
    if _capture is None or _capture[0] != os.getpid():
        handle, name = tempfile.mkstemp(prefix="vgg-stderr-")
        os.unlink(name)
        _capture = (os.getpid(), handle)
    capture = _capture[1]
    os.lseek(capture, 0, os.SEEK_SET)
    os.ftruncate(capture, 0)
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(capture, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.lseek(capture, 0, os.SEEK_SET)
        out.append(os.read(capture, 1 << 16).decode(errors="replace"))


def cpu_decoder():
    """This process's CPU-only nvImageCodec decoder (libjpeg-turbo), one thread: a DataLoader worker is a
    core. The default decoder needs a GPU (CUDA error 35 without one). None where nvImageCodec is missing
    or the decoder cannot be made (this process then decodes whole files, as without nvImageCodec)."""
    if os.getpid() not in _decoders:
        codec, notes, decoder = load(), [], None
        if codec is not None:
            try:
                with captured_stderr(notes):
                    decoder = codec.Decoder(device_id=getattr(codec, "NVIMGCODEC_DEVICE_CPU_ONLY", CPU_ONLY),
                                            max_num_cpu_threads=1, backends=[codec.Backend(codec.BackendKind.CPU_ONLY)])
            except RuntimeError as e:
                log.debug(f"nvImageCodec's CPU decoder: {e} ({' '.join(notes[0].split()) if notes else ''})")
        _decoders[os.getpid()] = decoder
    return _decoders[os.getpid()]


def decode_params():
    """Decode to RGB, EXIF orientation ignored (as PIL's decode and the paper's pipeline ignore it): made
    once per process, as the decoder is, not for every crop."""
    if os.getpid() not in _params:
        codec = load()
        _params[os.getpid()] = codec.DecodeParams(apply_exif_orientation=False, color_spec=codec.ColorSpec.SRGB)
    return _params[os.getpid()]


class JpegFile(NamedTuple):
    """A JPEG file, its code stream as nvImageCodec parsed it, and the image's size: what `decode_crop` takes."""

    data: bytes
    stream: object
    height: int
    width: int


def read_jpeg(data: bytes) -> JpegFile | None:
    """`data` as a JpegFile if it is a JPEG whose header nvImageCodec reads; None otherwise (other
    formats, a damaged header, nvImageCodec not available: PIL then opens it)."""
    if data[:3] != JPEG_START or not available():
        return None
    try:
        stream = load().CodeStream(data)
        if stream.codec_name != "jpeg":
            return None
        return JpegFile(data, stream, stream.height, stream.width)
    except RuntimeError:  # "Failed to get image info"
        return None


def decode_crop(jpeg: JpegFile, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Rows top..top+height-1 and columns left..left+width-1 of the full-size RGB decode of a checked
    JPEG file (Check.OK: libjpeg has nothing to say about it, so nothing is printed) -> uint8
    [3, height, width], a CHW view of HWC pixels (as vgg.data.batches.decode.to_uint8_tensor). OSError if it
    cannot be decoded, or for a box outside the image."""
    if top < 0 or left < 0 or height < 1 or width < 1 or top + height > jpeg.height or left + width > jpeg.width:
        raise OSError(f"crop {width}x{height} at ({left}, {top}) outside the {jpeg.width}x{jpeg.height} image")
    codec = load()
    region = jpeg.stream.get_sub_code_stream(region=codec.Region(top, left, top + height, left + width))
    image = cpu_decoder().decode(region, params=decode_params())
    if image is None:
        raise OSError("nvImageCodec could not decode the file")
    return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


def check(data: bytes) -> Verdict:
    """Whether a file is whole (OK), harmless but for PIL to decode (QUIRK), or DAMAGED, and why.

    A JPEG's last pixel is decoded (nvImageCodec's CPU decoder, or TorchCodec's whole-file decode where
    it is not available), which entropy-decodes every row of every scan, with stderr captured: libjpeg
    warns there of a file cut short or corrupt data (DAMAGE) and of harmless oddities. Bytes between
    header segments are dropped first (nvImageCodec's parser refuses them; libjpeg and PIL skip them).
    Whatever nvImageCodec cannot decode at all, and every other format, PIL decodes in full: OK for PIL
    is QUIRK here (PNGs named .JPEG, ...), PIL's refusal (a JPEG cut before its end marker: "image file
    is truncated") DAMAGED."""
    if data[:3] != JPEG_START:
        return _check_with_pil(data)
    clean = without_header_junk(data)
    messages = []
    with captured_stderr(messages):
        decoded = _decode_last_pixel(clean)
    message = " ".join(messages[0].split())
    if DAMAGE.search(message):
        return Verdict(Check.DAMAGED, message)
    if not decoded:
        return _check_with_pil(data)
    if message or clean is not data:
        return Verdict(Check.QUIRK, message or "extraneous bytes before a marker")
    if jpeg_components(clean) == 4:  # decoded alike by nvImageCodec, but rare enough to leave to PIL
        return Verdict(Check.QUIRK, "CMYK JPEG")
    return Verdict(Check.OK)


def _decode_last_pixel(data: bytes) -> bool:
    """Decode a JPEG file's bottom-right pixel (all of it without nvImageCodec); False if that fails."""
    codec = load()
    if not available():
        from torchcodec.decoders import decode_jpeg  # TorchCodec also has wheels for macOS and Windows

        try:
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
            return True
        except RuntimeError:
            return False
    try:
        stream = codec.CodeStream(data)
        height, width = stream.height, stream.width
        corner = stream.get_sub_code_stream(region=codec.Region(height - 1, width - 1, height, width))
    except RuntimeError:
        return False
    return cpu_decoder().decode(corner, params=decode_params()) is not None


def _check_with_pil(data: bytes) -> Verdict:
    """PIL's full decode (LOAD_TRUNCATED_IMAGES stays False: a file cut short raises)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return Verdict(Check.QUIRK, f"{image.format} file" if image.format != "JPEG" else "decoded by PIL")
    except DECODE_ERRORS as e:
        if not data:
            return Verdict(Check.DAMAGED, "empty file")
        text = re.sub(r" <_io.BytesIO object at \w+>", "", f"{type(e).__name__}: {e}")  # names no file
        return Verdict(Check.DAMAGED, " ".join(text.split()))


def segments(data: bytes):
    """A JPEG's header segments: (offset of the marker's 0xFF, marker, offset just past the segment), up to and
    including the start of scan (whose segment is the rest of the file); bytes between segments are
    skipped, as libjpeg skips them. Stops at anything that is not a marker's segment."""
    i = 2
    while i + 4 <= len(data):
        start = data.find(b"\xff", i)
        while 0 <= start < len(data) - 1 and data[start + 1] == 0xFF:  # fill bytes before a marker
            start += 1
        if start < 0 or start + 4 > len(data):
            return
        marker = data[start + 1]
        if marker == 0xDA:
            yield start, marker, len(data)
            return
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7 or marker == 0xD9:  # not a header segment
            return
        end = start + 2 + int.from_bytes(data[start + 2:start + 4], "big")
        yield start, marker, end
        i = end


def jpeg_components(data) -> int:
    """Colour components of a JPEG (1 grey, 3 YCbCr, 4 CMYK/YCCK) from its frame header (bytes, or a uint8
    tensor); 0 if the bytes are not a JPEG or the header cannot be found."""
    raw = bytes(data.numpy()[:1 << 16]) if isinstance(data, torch.Tensor) else data  # the header is near the start
    if raw[:3] != JPEG_START:
        return 0
    for start, marker, _ in segments(raw):
        if marker in SOF_MARKERS:
            return raw[start + 9] if start + 9 < len(raw) else 0
    return 0


def without_header_junk(data: bytes) -> bytes:
    """`data` without the bytes between its header segments (itself, the same object, where there are none)."""
    parts, i = [data[:2]], 2
    for start, _, end in segments(data):
        parts.append(data[start:end])
        i = end
    parts.append(data[i:])
    return data if sum(map(len, parts)) == len(data) else b"".join(parts)
