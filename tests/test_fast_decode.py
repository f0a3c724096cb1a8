"""vgg/data/batches/transforms.py's decode straight into a tensor (`decode_uint8`): the same pixels as PIL's decode,
taken only where PIL would decode at full size, and corrupt files still refused with OSError."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from vgg.data.batches.transforms import EvalTransform, TrainTransform, decode_uint8, load_rgb, to_uint8_tensor


def jpeg_bytes(array: np.ndarray, mode: str = "RGB", **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, "JPEG", **options)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """JPEGs as they come in ImageNet: 4:2:0 and 4:4:4 chroma, progressive, grey and CMYK."""
    folder = tmp_path_factory.mktemp("jpegs")
    photo = skdata.coffee()  # 600x400
    files = {"q95_420": jpeg_bytes(photo, quality=95),
             "q75_444": jpeg_bytes(photo, quality=75, subsampling=0),
             "progressive": jpeg_bytes(photo, quality=90, progressive=True),
             "grey": jpeg_bytes(photo, "L"),
             "cmyk": jpeg_bytes(photo, "CMYK")}
    for name, data in files.items():
        (folder / f"{name}.JPEG").write_bytes(data)
    return {name: folder / f"{name}.JPEG" for name in files}


def pil_pixels(path, min_side):
    with Image.open(path) as image:
        return to_uint8_tensor(load_rgb(image, min_side)).contiguous()


@pytest.mark.parametrize("min_side", [None, 256, 400, 150])  # 150: PIL decodes at 1/2 scale
@pytest.mark.parametrize("name", ["q95_420", "q75_444", "progressive", "grey", "cmyk"])
def test_decode_gives_pils_pixels(jpegs, name, min_side):
    with Image.open(jpegs[name]) as image:
        pixels = decode_uint8(image, min_side)
    expected = pil_pixels(jpegs[name], min_side)
    assert pixels.dtype == torch.uint8 and pixels.shape == expected.shape
    assert torch.equal(pixels, expected), (name, min_side)
    assert torch.equal(decode_uint8(jpegs[name], min_side), expected)  # a path is decoded alike


def test_colour_jpegs_at_full_size_skip_pils_decode(jpegs):
    """The fast path is taken (the PIL image is left undecoded) only for colour JPEGs that PIL would
    decode at full size; a reduced-scale decode stays with PIL's draft mode."""
    with Image.open(jpegs["q95_420"]) as image:
        assert decode_uint8(image, 256).shape == (3, 400, 600)
        assert image.tile  # PIL did not decode it
    with Image.open(jpegs["q95_420"]) as image:
        assert decode_uint8(image, 150).shape == (3, 200, 300)  # libjpeg's 1/2 scale, via PIL
        assert not image.tile and image.size == (300, 200)
    with Image.open(jpegs["cmyk"]) as image:
        decode_uint8(image, 256)
        assert not image.tile  # CMYK: PIL's conversion


def test_training_skips_pils_decode_and_evaluation_keeps_it(jpegs):
    """TrainTransform takes the fast path; EvalTransform decodes with PIL, which keeps the pixels in
    the opened image, so the evaluator's several scales of one image decode the file once."""
    with Image.open(jpegs["q95_420"]) as image:
        TrainTransform(crop_size=224, scale_min=256, scale_max=256)(image, 0)
        assert image.tile
    with Image.open(jpegs["q95_420"]) as image:
        EvalTransform(scale=384)(image)
        assert not image.tile and image.size == (600, 400)
        decoded = image.im
        assert EvalTransform(scale=256)(image).shape == (3, 256, 384)
        assert image.im is decoded  # not decoded again


def test_training_crops_are_those_of_the_pil_decode(jpegs):
    """The same sample draws give the same crop whether the file is decoded here or by PIL first
    (an already decoded image goes through PIL's pixels), so resumed runs stay bit-exact."""
    transform = TrainTransform(crop_size=224, scale_min=256, scale_max=512, seed=3)
    for index in range(6):
        with Image.open(jpegs["q95_420"]) as image:
            fast = transform(image, index)
        with Image.open(jpegs["q95_420"]) as image:
            image.load()
            slow = transform(image, index)
        assert torch.equal(fast.image, slow.image) and torch.equal(fast.alphas, slow.alphas), index


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg_raises_oserror(jpegs, cut, tmp_path):
    """vgg.data.datasets.folders.ImageFolder skips files whose decode raises OSError; TorchCodec raises RuntimeError."""
    data = jpegs["q95_420"].read_bytes()
    path = tmp_path / "cut.JPEG"
    path.write_bytes(data[: int(len(data) * cut)])
    with Image.open(path) as image, pytest.raises(OSError, match="truncated"):
        decode_uint8(image, 256)
    with Image.open(path) as image, pytest.raises(OSError):
        EvalTransform(scale=300)(image)
