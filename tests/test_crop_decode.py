"""vgg.data.batches.jpeg and vgg.data.datasets.checks (issue 35): nvImageCodec's region decode gives
exactly the pixels of a full decode, each file is checked for damage once per dataset (cut short with or
without an end marker, a stray marker in the scan: refused; harmless quirks: decoded as PIL decodes them),
nothing needs a C compiler, and nothing the library prints reaches stderr."""

import io
import logging
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, subprocess_env
from PIL import Image
from skimage import data as skdata

from vgg.data.batches import jpeg as vjpeg
from vgg.data.batches.decode import Unreadable
from vgg.data.batches.jpeg import Check
from vgg.data.batches.loaders import collate_batch
from vgg.data.batches.transforms import CenterCropTransform, TrainTransform
from vgg.data.datasets import checks as vchecks
from vgg.data.datasets.folders import ImageFolder

needs_codec = pytest.mark.skipif(not vjpeg.available(), reason="nvImageCodec has no wheel for this platform")


def jpeg_bytes(photo: str, size, mode="RGB", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(getattr(skdata, photo)()[..., :3]).resize(size).convert(mode).save(out, "JPEG", **options)
    return out.getvalue()


def exif_tagged(data: bytes) -> bytes:
    """`data` with an EXIF segment saying "rotate 90°" (orientation 6), as cameras write it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, "JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()


def segment_before_scan(data: bytes, segment: bytes) -> bytes:
    at = data.index(b"\xff\xda")
    return data[:at] + segment + data[at:]


def sound_files() -> dict[str, bytes]:
    """JPEGs as they come in ImageNet; sizes that are not whole MCUs (16 px)."""
    return {"420": jpeg_bytes("astronaut", (300, 225)), "422": jpeg_bytes("coffee", (233, 300), subsampling=1),
            "444": jpeg_bytes("chelsea", (251, 200), subsampling=0),
            "progressive": jpeg_bytes("rocket", (267, 400), progressive=True),
            "grey": jpeg_bytes("coffee", (300, 200), "L"), "exif": exif_tagged(jpeg_bytes("astronaut", (240, 180)))}


def damaged_files(good: bytes, progressive: bytes) -> dict[str, bytes]:
    scan = good.index(b"\xff\xda")
    middle = (scan + len(good)) // 2
    return {"cut with end marker": good[:middle] + vjpeg.JPEG_END, "cut": good[:middle],
            "cut a byte short": good[:-1],
            "progressive cut in an early scan": progressive[:len(progressive) // 4] + vjpeg.JPEG_END,
            "progressive cut in the last scan": progressive[:len(progressive) * 9 // 10] + vjpeg.JPEG_END,
            "stray marker in the scan": good[:middle] + b"\xff\xd3" + good[middle:], "empty": b""}


def quirky_files(good: bytes) -> dict[str, bytes]:
    """Harmless: real ImageNet files have each of these, and PIL decodes them in full."""
    dqt = good.index(b"\xff\xdb")
    png = io.BytesIO()
    Image.open(io.BytesIO(good)).save(png, "PNG")
    return {"extraneous bytes": good[:dqt] + b"\x00\x01\x02" + good[dqt:],
            "png": png.getvalue(), "cmyk": jpeg_bytes("chelsea", (200, 150), "CMYK")}


def harmless_ok_files(good: bytes) -> dict[str, bytes]:
    """Harmless and silent: libjpeg says nothing of them, so nvImageCodec decodes them."""
    return {"unknown app segment": segment_before_scan(good, b"\xff\xe7\x00\x08junk!!"),
            "exif junk": segment_before_scan(good, b"\xff\xe1\x00\x11Exif\x00\x00\x01\x02garbage"),
            "extraneous bytes before the end": good[:-2] + b"\x00\x00" + good[-2:]}


@pytest.fixture(scope="module")
def files():
    sound = sound_files()
    good, progressive = sound["420"], sound["progressive"]
    return {"sound": sound, "damaged": damaged_files(good, progressive), "quirky": quirky_files(good),
            "silent": harmless_ok_files(good)}


def pil_pixels(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


@needs_codec
def test_any_box_has_the_pixels_of_a_full_decode(files):
    """4:2:0, 4:2:2, 4:4:4, progressive, grey, CMYK and EXIF-tagged (orientation ignored, as PIL ignores it)."""
    rng = random.Random(0)
    for name, data in {**files["sound"], "cmyk": files["quirky"]["cmyk"]}.items():
        jpeg, full = vjpeg.read_jpeg(data), pil_pixels(data)
        height, width = full.shape[1:]
        assert (jpeg.height, jpeg.width) == (height, width), name
        boxes = [(0, 0, height, width), (height - 1, width - 1, 1, 1), (0, width - 17, height, 17)]
        boxes += [(rng.randint(0, height - h), rng.randint(0, width - w), h, w)
                  for h, w in ((rng.randint(1, height), rng.randint(1, width)) for _ in range(12))]
        for top, left, h, w in boxes:
            crop = vjpeg.decode_crop(jpeg, top, left, h, w)
            assert crop.dtype == torch.uint8 and crop.shape == (3, h, w)
            assert torch.equal(crop, full[:, top:top + h, left:left + w]), (name, top, left, h, w)
    with pytest.raises(OSError, match="outside the 300x225 image"):
        vjpeg.decode_crop(vjpeg.read_jpeg(files["sound"]["420"]), 200, 0, 26, 10)


def test_the_check_refuses_damage_and_keeps_harmless_quirks(files):
    for name, data in files["damaged"].items():
        verdict = vjpeg.check(data)
        assert verdict.check == Check.DAMAGED and verdict.note, name
    assert "premature end" in vjpeg.check(files["damaged"]["cut with end marker"]).note
    for name, data in files["quirky"].items():
        assert vjpeg.check(data).check == Check.QUIRK, name
    for name, data in {**files["sound"], **files["silent"]}.items():
        assert vjpeg.check(data) == (Check.OK, ""), name


@pytest.fixture
def dataset_root(tmp_path, files):
    """A split with every kind of file, in two classes."""
    root = tmp_path / "train"
    kinds = [("sound", files["sound"]), ("damaged", files["damaged"]), ("quirky", files["quirky"]),
             ("silent", files["silent"])]
    for k, (kind, group) in enumerate(kinds):
        folder = root / f"n0{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in group.items():
            (folder / f"{kind}_{name.replace(' ', '_')}.JPEG").write_bytes(data)
    return root


def count_checks(monkeypatch) -> list:
    calls = []
    real = vjpeg.check
    monkeypatch.setattr(vjpeg, "check", lambda data: calls.append(1) or real(data))
    return calls


def test_each_file_is_checked_once_over_three_epochs(dataset_root, files, monkeypatch, caplog):
    """Damaged files come back Unreadable with libjpeg's reason every epoch, harmless ones train, and no
    file is checked twice: not in later epochs, not by a second dataset (the cache beside the file list);
    a file rewritten since is checked again."""
    calls = count_checks(monkeypatch)
    total = sum(len(group) for group in files.values())
    with caplog.at_level(logging.INFO, logger="vgg.data.datasets.checks"):
        dataset = ImageFolder(dataset_root, TrainTransform(crop_size=64, scale_min=72, scale_max=96))
    assert len(dataset) == total and len(calls) == total
    assert f"{len(files['quirky'])} files with harmless quirks" in caplog.text
    assert f"{len(files['damaged'])} damaged files" in caplog.text
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collate_batch)
    for epoch in range(3):
        dataset.transform.set_epoch(epoch)
        kept, unreadable = 0, []
        for crops, labels, skipped in loader:
            kept += len(labels)
            unreadable += skipped
        assert kept == total - len(files["damaged"]) and len(unreadable) == len(files["damaged"])
        assert all(isinstance(u, Unreadable) and u.reason for u in unreadable)
    assert len(calls) == total
    again = ImageFolder(dataset_root, CenterCropTransform(scale=72, crop_size=64))
    assert len(calls) == total and (dataset_root / vchecks.CHECKS_NAME).is_file()
    assert [again[i][0] is None for i in range(total)] == [dataset[i][0] is None for i in range(total)]
    victim = next(dataset_root.glob("n00/sound_420.JPEG"))
    victim.write_bytes(files["damaged"]["cut with end marker"])
    os.utime(victim, ns=(0, 123_456_789))  # the same second as before would do too: the size changed
    rechecked = ImageFolder(dataset_root, None)
    assert len(calls) == total + 1
    index = [rechecked.path(i) for i in range(total)].index(str(victim))
    assert rechecked[index][0] is None and "premature end" in rechecked[index][2].reason


def test_quirky_files_train_as_pil_decodes_them(files, monkeypatch):
    """A harmless quirk's crop: the one made from PIL's decode of the file (nvImageCodec never sees it)."""
    transform = TrainTransform(crop_size=64, scale_min=160, scale_max=200, seed=2)  # no 1/2^k reduced decode
    monkeypatch.setattr(vjpeg, "decode_crop", lambda *a: pytest.fail("nvImageCodec decoded a quirk"))
    for index, (name, data) in enumerate(files["quirky"].items()):
        got = transform(data, index, vjpeg.check(data).check)
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decoded by PIL before the transform sees it
            expected = transform(image, index)
        assert torch.equal(got.image, expected.image), name


@needs_codec
def test_checked_files_skip_the_check_and_crop_alike(files, monkeypatch):
    """Given a verdict, the transform checks nothing; unchecked, it checks first; the crops are the same."""
    transform = TrainTransform(crop_size=64, scale_min=72, scale_max=140, seed=5)
    calls = count_checks(monkeypatch)
    for index, data in enumerate(files["sound"].values()):
        trusted = transform(data, index, Check.OK)
        assert calls == []
        assert torch.equal(transform(data, index).image, trusted.image) and len(calls) == 1
        calls.clear()
    with pytest.raises(OSError, match="premature end"):
        transform(files["damaged"]["cut with end marker"], 0)


SCRIPT = """
import io, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from vgg.data.batches import jpeg as vjpeg
from vgg.data.batches.transforms import TrainTransform
from PIL import Image
out = io.BytesIO()
Image.new("RGB", (120, 90), (200, 30, 60)).save(out, "JPEG")
good = out.getvalue()
cut = good[:len(good) // 2] + vjpeg.JPEG_END
print("available", vjpeg.available())
print("verdicts", vjpeg.check(good).check.name, vjpeg.check(cut).check.name)
crop = TrainTransform(crop_size=32, scale_min=90, scale_max=90)(good, 0).image
print("crop", tuple(crop.shape), crop[:, 0, 0].tolist())
"""


def run_script(tmp_path, env_changes: dict, prelude: str = ""):
    env = {**subprocess_env(), **env_changes}
    return subprocess.run([sys.executable, "-c", prelude + SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_no_compiler_no_c_source_and_nothing_on_stderr(tmp_path):
    """The README's commands need no C compiler: none on PATH, the crop decode and the check still work;
    nvImageCodec's own notes (its import's "Failed to load nvjpeg2k", libjpeg's "premature end") never
    reach stderr. And no C source is left in vgg/."""
    assert not list((ROOT / "vgg").rglob("*.c"))
    bare = tmp_path / "bin"
    bare.mkdir()
    result = run_script(tmp_path, {"PATH": str(bare), "CC": "", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "verdicts OK DAMAGED" in result.stdout and "crop (3, 32, 32)" in result.stdout
    assert f"available {vjpeg.available()}" in result.stdout


def test_without_nvimagecodec_whole_files_are_decoded_and_still_checked(tmp_path):
    """Where nvImageCodec has no wheel (macOS, Windows): one log line, TorchCodec decodes whole files and
    its libjpeg still tells a cut file, the same crop."""
    with_codec = run_script(tmp_path, {})
    without = run_script(tmp_path, {}, prelude="import sys; sys.modules['nvidia.nvimgcodec'] = None\n")
    assert without.returncode == 0 and without.stderr == "", without.stderr
    assert without.stdout.count("decoding whole JPEG files: nvImageCodec is not available") == 1
    assert "available False" in without.stdout and "verdicts OK DAMAGED" in without.stdout
    crop_line = [line for line in with_codec.stdout.splitlines() if line.startswith("crop")]
    assert crop_line and crop_line[0] in without.stdout.splitlines()
