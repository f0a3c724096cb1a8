"""Decoding for the GPU data path (vgg.data.batches.gpu): TorchCodec's whole-image batch decode (nvJPEG), and
nvImageCodec's batched region decode (the crop box only, on the GPU's hardware JPEG engine, CUDA, or both).

Every file comes with its verdict (vgg.data.batches.jpeg.Check: ImageFolder's cached one, or checked by the
DataLoader worker that read it), so damaged files never get here, and only sound JPEGs (Check.OK) go to
the GPU: harmless quirks (PNGs or CMYK named .JPEG, extraneous bytes) are decoded on the CPU by PIL, as the
CPU path decodes them. libjpeg has nothing to say about a sound file, so nvImageCodec prints nothing.

nvImageCodec's GPU region decode is new to this project: TorchCodec stays the default decoder until a GPU
run of bench/gpu_suite.py picks the faster correct one (its 0.9.0's GPU region decode crashed on H100/B200
and failed on A100 where 0.8.0 worked: nvImageCodec issue #55; docs/benchmarks.md has the suite's rows).
Everything also runs with device="cpu" (nvImageCodec's CPU backend, TorchCodec's CPU decoder): the tests.
"""

import io
import logging

import numpy as np
import torch
from PIL import Image

from vgg.data.batches import jpeg as vjpeg
from vgg.data.batches.decode import Unreadable, load_rgb, mark_checked, to_uint8_tensor
from vgg.data.batches.jpeg import DECODE_ERRORS, Check, jpeg_components

log = logging.getLogger(__name__)  # a child of the "vgg" logger, like vgg.data's

# nvImageCodec's backends on a GPU, by name (bench/gpu_suite.py times each): the hardware JPEG engine
# (A100, H100, H200), CUDA kernels, or both, the batch split between them by nvImageCodec's adaptive
# load-balancing hint.
BACKENDS = {"hw": ("HW_GPU_ONLY",), "cuda": ("GPU_ONLY",), "both": ("HW_GPU_ONLY", "GPU_ONLY")}


def decode_on_cpu(data: torch.Tensor | None, name: str = "<bytes>", unreadable: list | None = None,
                  check: Check = Check.UNCHECKED) -> torch.Tensor | None:
    """Decode one image on the CPU, as the CPU path would: a sound JPEG by TorchCodec, anything else by
    PIL (`vgg.data.batches.decode.load_rgb`: PNGs named .JPEG, CMYK, ...); a file without a verdict is checked
    first (vgg.data.batches.jpeg.check). Returns uint8 [3, H, W], or None: with an Unreadable(name, reason)
    appended to `unreadable` if given (the training loop warns once per file), else with one warning
    line naming the file."""
    def skip(reason: str) -> None:
        if unreadable is None:
            log.warning(f"warning: skipping unreadable image {name} ({reason})")
        else:
            unreadable.append(Unreadable(name, reason))

    if data is None:
        return None
    raw = data.numpy().tobytes()
    if check in (Check.UNCHECKED, Check.DAMAGED):
        verdict = vjpeg.check(raw)
        if verdict.check == Check.DAMAGED:
            skip(verdict.note)
            return None
        check = verdict.check
    if check == Check.OK and raw[:3] == vjpeg.JPEG_START:
        from torchcodec.decoders import decode_jpeg

        try:
            return decode_jpeg(data, mode="RGB")
        except RuntimeError:
            pass  # let PIL have a go, as the CPU path would
    try:  # the CPU path's decoder: same conversions (CMYK, grey, palette -> RGB), same refusals
        with Image.open(io.BytesIO(raw)) as image:
            return to_uint8_tensor(load_rgb(mark_checked(image, Check.QUIRK))).contiguous()
    except DECODE_ERRORS as e:
        skip(" ".join(f"{type(e).__name__}: {e}".split()))
        return None


def decode_batch(encoded: list, device: torch.device | str, names: list[str] | None = None, *,
                 batched: bool | None = None, unreadable: list | None = None,
                 checks: list | None = None) -> list[torch.Tensor | None]:
    """Decode a batch of encoded images to uint8 [3, H, W] tensors on `device` (None where undecodable):
    TorchCodec's whole-image decode.

    batched (default: device is CUDA): sound JPEGs (1 or 3 components) go through one batched
    decode_jpeg call on `device` (nvJPEG on CUDA). If that call fails, each file is retried on its
    own; whatever still fails, and every other file, is decoded on the CPU (`decode_on_cpu`) and copied
    to `device`. Without batching every file is decoded on the CPU. checks: each file's verdict
    (unchecked files are checked on the CPU first). unreadable: as for decode_on_cpu.
    """
    from torchcodec.decoders import decode_jpeg

    device = torch.device(device)
    names = names or [f"<image {i}>" for i in range(len(encoded))]
    checks = list(checks or [Check.UNCHECKED] * len(encoded))
    for i, data in enumerate(encoded):
        if checks[i] == Check.UNCHECKED and data is not None:
            checks[i] = vjpeg.check(data.numpy().tobytes()).check  # damaged: decode_on_cpu says why
    batched = device.type == "cuda" if batched is None else batched
    out: list[torch.Tensor | None] = [None] * len(encoded)
    gpu_ok = [i for i, data in enumerate(encoded) if batched and data is not None and checks[i] == Check.OK
              and jpeg_components(data) in (1, 3)]
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
            image = decode_on_cpu(data, names[i], unreadable, checks[i])
            out[i] = None if image is None else image.to(device, non_blocking=True)
        elif out[i].shape[0] == 1:  # a decoder that ignored mode="RGB" for a grey JPEG
            out[i] = out[i].expand(3, -1, -1)
    return out


class RegionDecoder:
    """nvImageCodec's batched region decode on `device`: on a GPU with `backends` (a BACKENDS name), on the
    CPU with its CPU backend (libjpeg-turbo: the CPU path's decoder, which the tests use). Made in the
    process that uses it (the GPU loader's main process)."""

    def __init__(self, device: torch.device | str, backends: str = "both"):
        codec = vjpeg.load()
        if not vjpeg.available():
            raise RuntimeError("nvImageCodec is not available")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            self.decoder = vjpeg.cpu_decoder()
            return
        kinds = BACKENDS[backends]
        policy = codec.LoadHintPolicy.ADAPTIVE_MINIMIZE_IDLE_TIME
        chosen = [codec.Backend(getattr(codec.BackendKind, kind), load_hint=1.0 / len(kinds), load_hint_policy=policy)
                  for kind in kinds]
        notes = []
        with vjpeg.captured_stderr(notes):  # "Failed to load nvjpeg2k/nvtiff" and the like
            self.decoder = codec.Decoder(device_id=self.device.index or 0, backends=chosen)
        if notes[0].strip():
            log.debug(f"nvImageCodec's decoder on {self.device}: {' '.join(notes[0].split())}")

    def sizes(self, encoded: list[torch.Tensor]) -> list[tuple[int, int] | None]:
        """Each JPEG's (height, width) from its header (None where nvImageCodec cannot read it)."""
        codec, out = vjpeg.load(), []
        for data in encoded:
            if data is None:
                out.append(None)
                continue
            try:
                stream = codec.CodeStream(data.numpy())
                out.append((stream.height, stream.width))
            except RuntimeError:
                out.append(None)
        return out

    def decode(self, encoded: list[torch.Tensor], regions: list[tuple[int, int, int, int]]) -> list:
        """The (top, left, bottom, right) region of each JPEG -> uint8 [3, h, w] on the device, or None
        where it could not be decoded (the caller decodes that file on the CPU)."""
        codec = vjpeg.load()
        streams = [codec.CodeStream(data.numpy()).get_sub_code_stream(region=codec.Region(*region))
                   for data, region in zip(encoded, regions)]
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        images = self.decoder.decode(streams, params=vjpeg.decode_params(), cuda_stream=stream) if streams else []
        out = []
        for image in images:
            if image is None:
                out.append(None)
            elif self.device.type == "cuda":
                out.append(torch.from_dlpack(image).permute(2, 0, 1))
            else:
                out.append(torch.from_numpy(np.asarray(image)).permute(2, 0, 1))
        return out
