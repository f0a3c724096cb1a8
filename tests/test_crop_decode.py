"""vgg.data.jpeg: libjpeg-turbo's cropped decode gives exactly the pixels of a full decode, refuses damaged
files, and the training transform makes the same crops with it as without it (issue 16)."""

import logging
import os
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from vgg.data import jpeg as vjpeg
from vgg.data import transforms as vtransforms
from vgg.data.transforms import TrainTransform

# (photo, size, JPEG options): chroma subsampling 4:2:0 (PIL's default), 4:2:2 and 4:4:4, a progressive
# file, and sizes that are not whole MCUs (16 px).
FILES = [("astronaut", (500, 375), {}), ("coffee", (333, 500), {"subsampling": 1}),
         ("chelsea", (451, 300), {"subsampling": 0}), ("rocket", (427, 640), {"progressive": True}),
         ("astronaut", (257, 259), {"quality": 75}), ("coffee", (500, 375), {"progressive": True})]


@pytest.fixture(scope="module")
def jpeg_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for k, (photo, size, options) in enumerate(FILES):
        path = folder / f"{k}_{photo}.JPEG"
        Image.fromarray(getattr(skdata, photo)()[..., :3]).resize(size).save(path, "JPEG", **options)
        paths.append(path)
    return paths


def full_decode(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def test_the_cropped_decoder_is_built_here():
    """CI and the README's setup have a C compiler and libjpeg's headers: the fast path is what runs."""
    assert vjpeg.available()


def test_any_box_has_the_pixels_of_a_full_decode(jpeg_files):
    rng = random.Random(0)
    for path in jpeg_files:
        data, full = path.read_bytes(), full_decode(path)
        height, width = full.shape[1:]
        boxes = [(0, 0, height, width), (height - 1, width - 1, 1, 1), (0, width - 17, height, 17),
                 (height - 40, 0, 40, width)]
        boxes += [(rng.randint(0, height - h), rng.randint(0, width - w), h, w)
                  for h, w in ((rng.randint(1, height), rng.randint(1, width)) for _ in range(40))]
        for top, left, h, w in boxes:
            crop = vjpeg.decode_crop(data, top, left, h, w)
            assert crop.dtype == torch.uint8 and crop.shape == (3, h, w)
            assert torch.equal(crop, full[:, top:top + h, left:left + w]), (path.name, top, left, h, w)


def test_damaged_files_and_boxes_outside_the_image_are_refused(jpeg_files):
    data = jpeg_files[0].read_bytes()
    height, width = full_decode(jpeg_files[0]).shape[1:]
    # cut in the middle, end marker put back: libjpeg's "premature end" warning is an error here
    cut = data[:len(data) // 2] + b"\xff\xd9"
    with pytest.raises(OSError):
        vjpeg.decode_crop(cut, height - 10, 0, 10, width)
    with pytest.raises(OSError, match="Not a JPEG file"):
        vjpeg.decode_crop(b"\x89PNG\r\n\x1a\n" + bytes(100), 0, 0, 1, 1)
    with pytest.raises(OSError, match="outside the 500x375 image"):
        vjpeg.decode_crop(data, 300, 0, 76, 10)
    with pytest.raises(OSError, match="outside"):
        vjpeg.decode_crop(data, 0, -1, 10, 10)


@pytest.mark.parametrize("scale_min, scale_max", [(256, 256), (256, 512), (384, 384)])
def test_training_crops_are_the_same_with_and_without_the_cropped_decoder(jpeg_files, monkeypatch, scale_min,
                                                                          scale_max):
    transform = TrainTransform(crop_size=224, scale_min=scale_min, scale_max=scale_max, seed=3)
    crops = {}
    for enabled in (True, False):
        monkeypatch.setattr(vjpeg, "available", lambda: enabled)
        calls = []
        monkeypatch.setattr(vjpeg, "decode_crop", lambda *a, f=vjpeg.decode_crop: calls.append(1) or f(*a))
        out = []
        for index, path in enumerate(jpeg_files * 3):
            with Image.open(path) as image:
                out.append(transform(image, index).image)
        crops[enabled] = torch.stack(out)
        assert len(calls) == (len(out) if enabled else 0)
    assert torch.equal(crops[True], crops[False])


def test_a_truncated_file_is_still_refused(jpeg_files, tmp_path):
    """The cropped decode stops after the box's last row, so it would not notice a file cut after
    it: such a file (no end marker) goes to the full decoder, which refuses it as before."""
    cut = tmp_path / "cut.JPEG"
    cut.write_bytes(jpeg_files[0].read_bytes()[:-2000])
    transform = TrainTransform(crop_size=32, scale_min=256, scale_max=256)
    with Image.open(cut) as image, pytest.raises(OSError):
        transform(image, 0)


def test_without_a_compiler_the_whole_file_is_decoded(jpeg_files, tmp_path, monkeypatch, caplog):
    """No C compiler: one log line, and the transform decodes whole files, with the same crops."""
    monkeypatch.setattr(vjpeg, "_library", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="vgg.data.jpeg"):
        transform = TrainTransform(crop_size=224, scale_min=256, scale_max=300, seed=1)
        assert not vjpeg.available()
    assert "decoding whole JPEG files: the cropped decoder is not available" in caplog.text
    with Image.open(jpeg_files[1]) as image:
        without = transform(image, 5).image
    monkeypatch.setattr(vjpeg, "_library", None)
    monkeypatch.delenv("CC")
    assert vjpeg.available()  # built again, into the new cache folder
    assert list((tmp_path / "cache" / "vgg-imagenet").glob("jpeg_crop-*.so"))
    with Image.open(jpeg_files[1]) as image:
        assert torch.equal(transform(image, 5).image, without)


def test_the_decoder_is_loaded_once_the_transform_is_built(monkeypatch):
    """In the main process, before DataLoader workers fork: they inherit it instead of each building it."""
    monkeypatch.setattr(vjpeg, "_library", None)
    TrainTransform(crop_size=224, scale_min=256, scale_max=256)
    assert vjpeg._library
    assert vtransforms.vjpeg is vjpeg


def test_a_large_photo_still_takes_libjpegs_reduced_decode(tmp_path, monkeypatch):
    """Smallest side 2 S or more: PIL's 1/2^k decode (vgg.data.transforms.load_rgb) is quicker than any
    full-size decode, so the cropped decoder is not used for it."""
    path = tmp_path / "large.JPEG"
    Image.fromarray(skdata.astronaut()).resize((1100, 1040)).save(path, "JPEG")
    calls = []
    monkeypatch.setattr(vjpeg, "decode_crop", lambda *a: calls.append(a))
    transform = TrainTransform(crop_size=224, scale_min=256, scale_max=256)
    with Image.open(path) as image:
        crop = transform(image, 0).image
        assert image.decoderconfig[0] == 4 and image.size == (275, 260)  # decoded at 1/4
    assert calls == [] and crop.shape == (3, 224, 224)


def test_a_build_killed_half_way_leaves_nothing_behind_for_long(tmp_path, monkeypatch):
    """A compile killed before its rename leaves its temporary folder; the next build removes those
    over an hour old, and leaves a fresh one (another process may be compiling into it)."""
    cache = tmp_path / "cache" / "vgg-imagenet"
    killed, running = cache / f"{vjpeg.BUILD_PREFIX}killed", cache / f"{vjpeg.BUILD_PREFIX}running"
    for folder in (killed, running):
        folder.mkdir(parents=True)
        (folder / "jpeg_crop-0123.so").write_bytes(b"half-written")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(killed, (two_hours_ago, two_hours_ago))
    monkeypatch.setattr(vjpeg, "_library", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert vjpeg.available()
    assert not killed.exists()
    assert running.exists()
    assert len(list(cache.glob("jpeg_crop-*.so"))) == 1


# --- The file read by libjpeg, not PIL: TrainTransform handed a path or bytes -------------------------

@pytest.fixture(scope="module")
def other_files(tmp_path_factory, jpeg_files):
    """Files the libjpeg header path must leave to PIL: grey and CMYK JPEGs, a PNG named .JPEG, a
    large photo (PIL's reduced decode), a file cut before its end marker, a damaged header."""
    folder = tmp_path_factory.mktemp("others")
    photo = Image.fromarray(skdata.chelsea()).resize((400, 300))
    files = {"grey": ("L", "JPEG"), "cmyk": ("CMYK", "JPEG"), "png": ("RGB", "PNG")}
    paths = {}
    for name, (mode, fmt) in files.items():
        paths[name] = folder / f"{name}.JPEG"
        photo.convert(mode).save(paths[name], fmt)
    paths["large"] = folder / "large.JPEG"
    Image.fromarray(skdata.astronaut()).resize((1100, 1040)).save(paths["large"], "JPEG")
    paths["twice S"] = folder / "twice_s.JPEG"  # smallest side 2 x 256: PIL decodes it at half size for S=256
    Image.fromarray(skdata.astronaut()).resize((600, 512)).save(paths["twice S"], "JPEG")
    data = jpeg_files[0].read_bytes()
    paths["cut"] = folder / "cut.JPEG"
    paths["cut"].write_bytes(data[:-2000])
    paths["bad header"] = folder / "bad_header.JPEG"  # a start-of-frame marker with nonsense after it
    paths["bad header"].write_bytes(b"\xff\xd8\xff\xc0\x00\x04\x08" + bytes(64) + b"\xff\xd9")
    return paths


def test_the_header_gives_the_size_pil_reads_for_colour_jpegs_only(jpeg_files, other_files):
    for path in jpeg_files:
        jpeg = vjpeg.read_colour_jpeg(path.read_bytes())
        with Image.open(path) as image:
            assert jpeg is not None and (jpeg.height, jpeg.width) == (image.height, image.width), path.name
        assert jpeg.data == path.read_bytes()
    assert vjpeg.read_colour_jpeg(other_files["large"].read_bytes()).height == 1040
    for name in ("grey", "cmyk", "png", "cut", "bad header"):
        assert vjpeg.read_colour_jpeg(other_files[name].read_bytes()) is None, name
    assert vjpeg.read_colour_jpeg(b"") is None


@pytest.mark.parametrize("scale_min, scale_max", [(256, 256), (256, 512)])
def test_a_path_or_bytes_give_the_crops_of_an_opened_image(jpeg_files, other_files, scale_min, scale_max):
    """Every kind of file: the same crop and alphas from its path, its bytes and PIL's opened image;
    the colour JPEGs (but the large one) by the cropped decoder, read without PIL."""
    transform = TrainTransform(crop_size=224, scale_min=scale_min, scale_max=scale_max, seed=4)
    paths = jpeg_files + [other_files[name] for name in ("grey", "cmyk", "png", "large", "twice S")]
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            expected = transform(image, index)
        for given in (path, str(path), path.read_bytes()):
            got = transform(given, index)
            assert torch.equal(got.image, expected.image) and torch.equal(got.alphas, expected.alphas), path.name


def test_a_path_skips_pils_parser_for_a_colour_jpeg(jpeg_files, other_files, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    transform = TrainTransform(crop_size=224, scale_min=256, scale_max=256)
    transform(jpeg_files[0], 0)
    transform(jpeg_files[0].read_bytes(), 0)
    assert opened == []
    transform(other_files["grey"], 0)
    assert opened == [other_files["grey"]]


def test_damaged_files_given_by_path_are_refused_naming_the_file(other_files):
    transform = TrainTransform(crop_size=32, scale_min=256, scale_max=256)
    with pytest.raises(OSError, match="truncated"):
        transform(other_files["cut"], 0)
    with pytest.raises(OSError, match="bad_header.JPEG"):  # PIL's UnidentifiedImageError names it
        transform(other_files["bad header"], 0)
    with pytest.raises(OSError):
        transform(other_files["cut"].read_bytes(), 0)
    with pytest.raises(FileNotFoundError):
        transform(other_files["cut"].with_name("missing.JPEG"), 0)
