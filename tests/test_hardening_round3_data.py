"""Issue 29, hardening round 3 on the data side: no silent wrong answers, no tracebacks for bad input.

* A validation set without one readable image is refused by train.py before training (as evaluate.py does).
* A JPEG cut short but ending in an end-of-image marker (libjpeg's "premature end of data segment"
  warning) is unreadable on every decoder: PIL, TorchCodec, the cropped decoder, the GPU path's fallback.
* A mid-epoch resume refuses a training set that changed since the checkpoint; an epoch boundary goes on.
* One line, no traceback: corrupt or truncated shards, a truncated tarball in `prepare` (no .tmp left),
  malformed --stats and --config files, and every cache or list file the data side reads.
* File names that are not UTF-8 or hold a newline keep skipped.txt parseable (escaped).
"""

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image
from test_train import common_cli_args, tiny_config, train_cli

from vgg.core.checkpoint import load_checkpoint, save_checkpoint
from vgg.core.errors import UserError
from vgg.data.batches import jpeg as vjpeg
from vgg.data.batches.decode import Unreadable
from vgg.data.batches.transforms import CenterCropTransform, EvalTransform, TrainTransform, decode_uint8
from vgg.data.datasets import folders as vfolders
from vgg.data.datasets.folders import ImageFolder
from vgg.training.logs import read_skipped_list, write_skipped_list
from vgg.training.run import run as train_run

WNIDS = ("n00000000", "n00000001")


def small_dataset(sample_root: Path, root: Path, train_per_class: int = 8, val_per_class: int = 2) -> Path:
    """Readable JPEGs of two sample classes in both splits."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for wnid in WNIDS:
            (root / split / wnid).mkdir(parents=True)
            for k in range(count):
                shutil.copy(sample_root / "train" / wnid / f"{wnid}_{k}.JPEG", root / split / wnid)
    return root


def photo_jpeg(height: int = 300, width: int = 400) -> bytes:
    """A real colour JPEG with detail in every row (a smooth picture plus noise)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1) + rng.integers(0, 40, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def cut_with_end_marker(data: bytes) -> bytes:
    """The first half of a JPEG file and an end-of-image marker: libjpeg warns "premature end of data
    segment" and fills the lower half grey; nothing else tells."""
    return data[:len(data) // 2] + vjpeg.JPEG_END


# --- 1. A validation set without a readable image --------------------------------------------------

def test_train_refuses_a_val_set_without_a_readable_image(sample_root, tmp_path):
    root = small_dataset(sample_root, tmp_path / "data")
    for path in (root / "val").rglob("*.JPEG"):
        path.write_bytes(b"not an image")
    result = train_cli(*common_cli_args(sample_root, tmp_path), "--data", str(root), "--stats", "imagenet",
                       "--epochs", "2", "--steps-per-epoch", "1", "--batch-size", "4", "--run-name", "noval")
    assert_one_line_error(result, "no readable image", str(root / "val"))
    assert not (tmp_path / "checkpoints" / "noval" / "last.pt").exists()  # refused before training


# --- 2. A JPEG cut short, ending in an end-of-image marker ------------------------------------------

@pytest.fixture
def cut_folder(tmp_path) -> Path:
    (tmp_path / "split" / WNIDS[0]).mkdir(parents=True)
    (tmp_path / "split" / WNIDS[0] / "cut.JPEG").write_bytes(cut_with_end_marker(photo_jpeg()))
    return tmp_path / "split"


@pytest.mark.parametrize("transform", [
    TrainTransform(crop_size=32, scale_min=36, scale_max=48),  # a 1/2^k reduced decode: PIL
    TrainTransform(crop_size=224, scale_min=256, scale_max=256),  # full size: the cropped decoder
    CenterCropTransform(scale=256, crop_size=32),  # validation during training: cropped decoder
    CenterCropTransform(scale=48, crop_size=32),  # validation during training: PIL, reduced
    EvalTransform(scale=256),  # evaluation: PIL at full size
    None,  # statistics and inspection: PIL
], ids=["train-pil", "train-crop", "centre-crop", "centre-pil", "eval", "plain"])
def test_a_jpeg_cut_short_with_an_end_marker_is_unreadable(cut_folder, transform):
    dataset = ImageFolder(cut_folder, transform)
    item = dataset[0]
    assert item[0] is None and isinstance(item[2], Unreadable), item
    assert "premature end" in item[2].reason.lower(), item[2]


def test_every_decoder_refuses_a_jpeg_cut_short_with_an_end_marker(cut_folder):
    path = cut_folder / WNIDS[0] / "cut.JPEG"
    data = path.read_bytes()
    with pytest.raises(OSError, match="(?i)premature end"):
        decode_uint8(path)  # a file without a verdict is checked before it is decoded
    assert vjpeg.check(data).check == vjpeg.Check.DAMAGED  # nvImageCodec alone would give grey rows
    from vgg.data.batches.gpu import decode_on_cpu

    unreadable = []
    assert decode_on_cpu(torch.frombuffer(bytearray(data), dtype=torch.uint8), str(path), unreadable) is None
    assert len(unreadable) == 1 and unreadable[0].path == str(path)
    # The whole file still decodes (the cut changes nothing for a good one).
    good = photo_jpeg()
    assert vjpeg.check(good) == (vjpeg.Check.OK, "")
    assert decode_uint8(Image.open(io.BytesIO(good))).shape == (3, 300, 400)
    if vjpeg.available():
        assert torch.equal(vjpeg.decode_crop(vjpeg.read_jpeg(good), 0, 0, 16, 16),
                           decode_uint8(Image.open(io.BytesIO(good)))[:, :16, :16])


# --- 3. The training set changed under a mid-epoch resume -------------------------------------------

def test_a_mid_epoch_resume_refuses_a_changed_training_set(sample_root, tmp_path):
    root = small_dataset(sample_root, tmp_path / "data")
    config = tiny_config(sample_root, tmp_path, data=str(root), stats="imagenet", epochs=1, steps_per_epoch=2,
                         batch_size=4, workers=0, run_name="changed")
    train_run(config)
    last = tmp_path / "checkpoints" / "changed" / "last.pt"
    boundary = load_checkpoint(last)
    assert boundary["train_files"]["count"] == 16
    # The same checkpoint as if saved after step 1 of epoch 0.
    mid = {**boundary, "epoch": 0, "step": 1, "epoch_sums": None, "best": None, "best_top1": -1.0}  # no epoch done
    save_checkpoint(last, **mid)
    shutil.copy(sample_root / "train" / WNIDS[0] / f"{WNIDS[0]}_20.JPEG", root / "train" / WNIDS[0])
    with pytest.raises(UserError, match="16 training files then, 17 now"):
        train_run(tiny_config(sample_root, tmp_path, data=str(root), stats="imagenet", epochs=1, steps_per_epoch=2,
                              batch_size=4, workers=0, run_name="changed"), resume="auto")
    # Renamed (same count): refused too.
    (root / "train" / WNIDS[0] / f"{WNIDS[0]}_20.JPEG").unlink()
    os.rename(root / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG", root / "train" / WNIDS[0] / "renamed.JPEG")
    with pytest.raises(UserError, match="16 training files then and now, a different list"):
        train_run(tiny_config(sample_root, tmp_path, data=str(root), stats="imagenet", epochs=1, steps_per_epoch=2,
                              batch_size=4, workers=0, run_name="changed"), resume="auto")
    # At an epoch boundary the run goes on, with one line saying so.
    save_checkpoint(last, **boundary)
    from test_hardening_ddp_data import LogLines

    with LogLines("vgg") as lines:
        train_run(tiny_config(sample_root, tmp_path, data=str(root), stats="imagenet", epochs=2, steps_per_epoch=2,
                              batch_size=4, workers=0, run_name="changed"), resume="auto")
    assert len([line for line in lines if "training set changed" in line]) == 1
    assert load_checkpoint(last)["epoch"] == 2


# --- 4. One line, no traceback ----------------------------------------------------------------------

@pytest.fixture
def shard_dir(sample_root, tmp_path) -> Path:
    from vgg.data.datasets.shards import write_shards

    root = small_dataset(sample_root, tmp_path / "folders", train_per_class=12, val_per_class=4)
    write_shards(root, tmp_path / "wds", images_per_shard=8)
    return tmp_path / "wds"


def shard_train_args(sample_root, tmp_path, wds):
    return [*common_cli_args(sample_root, tmp_path), "--data", str(wds), "--stats", "imagenet", "--epochs", "1",
            "--steps-per-epoch", "3", "--batch-size", "8", "--run-name", "wds"]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_training_shard_is_one_line_in_a_worker(sample_root, tmp_path, shard_dir, damage):
    shard = shard_dir / "imagenet1k-train-0001.tar"
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[:len(data) // 2])
    else:  # a member header overwritten (garbage in an image's bytes is only an unreadable image)
        with tarfile.open(shard) as tar:
            header = tar.getmembers()[3].offset
        shard.write_bytes(data[:header] + b"\x07" * 512 + data[header + 512:])
    result = train_cli(*shard_train_args(sample_root, tmp_path, shard_dir))
    assert_one_line_error(result, "imagenet1k-train-0001.tar")


def test_a_truncated_validation_shard_is_one_line(shard_dir):
    from vgg.data.datasets.shards import open_val

    shard = shard_dir / "imagenet1k-validation-00.tar"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    with pytest.raises(UserError, match="imagenet1k-validation-00.tar"):
        open_val(shard_dir, None)


def test_a_truncated_tarball_in_prepare_is_one_line_and_leaves_no_tmp(sample_root, tmp_path):
    from test_prepare_sources import data_cli, make_hf

    make_hf(sample_root, tmp_path / "src")
    tarball = tmp_path / "src" / "data" / "train_images_1.tar.gz"
    # Cut short inside a member: the last file extracted is half there.
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
    raw = io.BytesIO()
    with tarfile.open(tarball) as tar, tarfile.open(fileobj=raw, mode="w") as out:
        for member in members:
            out.addfile(member, tar.extractfile(member))
    cut = raw.getvalue()[:members[3].offset_data + members[3].size // 2]
    import gzip

    tarball.write_bytes(gzip.compress(cut))
    for _ in range(2):  # a rerun meets the same file, and leaves nothing behind either
        result = data_cli("prepare", "--from", "hf", tmp_path / "src", tmp_path / "dest")
        assert_one_line_error(result, "train_images_1.tar.gz")
        assert not [p for p in (tmp_path / "dest").rglob("*.tmp")], list((tmp_path / "dest").rglob("*"))


STATS_CASES = {
    "encoding": b'{"mean_rgb": [1, 2, 3], "eigval": [1, 1, 1], "eigvec": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "x": "\xff"}',
    "duplicate": b'{"mean_rgb": [1, 2, 3], "mean_rgb": [4, 5, 6], "eigval": [1, 1, 1], '
                 b'"eigvec": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}',
    "not-json": b"mean_rgb: [1, 2, 3]\n",
    "deep": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("case", sorted(STATS_CASES))
def test_a_malformed_stats_file_is_one_line(sample_root, tmp_path, case):
    stats = tmp_path / "stats.json"
    stats.write_bytes(STATS_CASES[case])
    result = train_cli(*common_cli_args(sample_root, tmp_path), "--stats", str(stats), "--epochs", "1",
                       "--steps-per-epoch", "1")
    assert_one_line_error(result, str(stats))


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)) + "lr: *i\n"
CONFIG_CASES = {
    "encoding": b"lr: 0.01\narch: \xff\n",
    "aliases": BOMB.encode(),
    "duplicate": b"lr: 0.01\nlr: 0.1\n",
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_a_malformed_config_file_is_one_line(tmp_path, case):
    config = tmp_path / "bad.yaml"
    config.write_bytes(CONFIG_CASES[case])
    result = train_cli("--config", str(config), "--out-dir", str(tmp_path / "out"), timeout=120)
    assert_one_line_error(result, str(config), {"encoding": "UTF-8", "aliases": "aliases", "duplicate": "twice"}[case])


# --- File names: not UTF-8, or holding a newline ----------------------------------------------------

AWKWARD_NAMES = [os.fsdecode(b"bad-\xff-name.JPEG"), "two\nlines.JPEG", "tab\there.JPEG", "back\\slash.JPEG"]


def test_the_skipped_list_escapes_awkward_names_and_reads_them_back(tmp_path):
    files = {f"/data/train/{WNIDS[0]}/{name}": f"OSError: cannot identify image file '{name}'" for name in AWKWARD_NAMES}
    write_skipped_list(tmp_path / "skipped.txt", files)
    lines = (tmp_path / "skipped.txt").read_bytes().decode("utf-8").splitlines()
    assert len(lines) == len(files) and all(line.count("\t") == 1 for line in lines)
    assert read_skipped_list(tmp_path / "skipped.txt") == files


def test_a_run_with_unreadable_files_of_awkward_names_lists_them(sample_root, tmp_path):
    root = small_dataset(sample_root, tmp_path / "data")
    for name in AWKWARD_NAMES:
        (root / "train" / WNIDS[0] / name).write_bytes(b"not an image")
    config = tiny_config(sample_root, tmp_path, data=str(root), stats="imagenet", epochs=2, steps_per_epoch=5,
                         batch_size=4, workers=0, run_name="names")
    train_run(config)
    skipped = read_skipped_list(tmp_path / "checkpoints" / "names" / "skipped.txt")
    assert sorted(skipped) == sorted(str(root / "train" / WNIDS[0] / name) for name in AWKWARD_NAMES)


# --- Beyond the list: every file the data side reads ------------------------------------------------

@pytest.mark.parametrize("cache", [
    {"version": 1, "folders": None, "files": {"n00000000": 5}},
    {"version": 1, "folders": "FOLDERS", "files": {"n00000000": 5}},
    {"version": 1, "folders": "FOLDERS", "files": {"n00000000": [1, 2]}},
    {"version": 1, "folders": "FOLDERS", "files": {"n00000000": ["../../../etc/passwd"]}},
    {"version": 1, "folders": "FOLDERS", "files": {"n99999999": ["x.JPEG"]}},
])
def test_a_malformed_file_list_cache_is_rebuilt(sample_root, tmp_path, cache):
    root = small_dataset(sample_root, tmp_path / "data")
    expected = vfolders.list_files(root / "train")
    folders, _ = vfolders._class_folders(root / "train")
    cache = {**cache, "folders": folders if cache["folders"] == "FOLDERS" else cache["folders"]}
    (root / "train" / vfolders.FILELIST_NAME).write_text(json.dumps(cache))
    assert vfolders.list_files(root / "train") == expected


def test_a_malformed_stats_cache_is_recomputed(sample_root, tmp_path):
    from vgg.data.datasets import stats as vstats

    root = small_dataset(sample_root, tmp_path / "data")
    good = vstats.load_or_compute_stats(root / "train", num_images=8)
    (root / vstats.stats_cache_name(8, 0)).write_text(json.dumps({"mean_rgb": ["a", 2, 3], "eigval": [1, 1], "eigvec": 3,
                                                      "num_images": 8, "seed": 0}))
    assert vstats.load_or_compute_stats(root / "train", num_images=8) == good


@pytest.mark.parametrize("change", ["lengths-text", "lengths-negative", "classes-not-text", "encoding"])
def test_a_malformed_shard_info_is_one_line(shard_dir, change):
    from vgg.data.datasets.shards import INFO_NAME, open_split

    info = json.loads((shard_dir / INFO_NAME).read_text())
    split = info["splits"]["train"]
    if change == "lengths-text":
        split["shard_lengths"] = ["eight", "eight", "eight"]
        split.pop("num_samples")
    elif change == "lengths-negative":
        split["shard_lengths"] = [-8, 20, 12]
    elif change == "classes-not-text":
        info["classes"] = [1, 2]
    text = json.dumps(info).encode()
    (shard_dir / INFO_NAME).write_bytes(text.replace(b'"name"', b'"n\xffme"') if change == "encoding" else text)
    with pytest.raises(UserError, match=INFO_NAME):
        open_split(shard_dir, "train")


def test_a_labels_file_in_another_encoding_is_one_line(tmp_path):
    from vgg.data.datasets.labels import read_val_labels

    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_bytes(b"ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4\xff\n")
    with pytest.raises(UserError, match="LOC_val_solution.csv"):
        read_val_labels(labels)
