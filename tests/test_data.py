"""vgg/data/ and vgg/data/datasets/sample.py on real files: the class-folder dataset and its file-list cache,
awkward and broken files, batching, per-worker seeding, dataset statistics, sorting the flat val
folder, and the generated sample dataset."""

import hashlib
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, subprocess_env
from PIL import Image, ImageFile
from skimage import data as skdata
from torch.utils.data import Dataset

from vgg.core.errors import UserError
from vgg.data import __main__ as vmain
from vgg.data.batches.decode import Unreadable
from vgg.data.batches.loaders import build_loader, collate_batch, collate_list
from vgg.data.batches.transforms import EvalTransform, TrainTransform
from vgg.data.datasets import folders as vfolders
from vgg.data.datasets import labels as vlabels
from vgg.data.datasets import sample as vsample
from vgg.data.datasets import stats as vstats
from vgg.data.datasets.folders import ImageFolder
from vgg.data.datasets.labels import sort_val
from vgg.data.datasets.stats import IMAGENET_STATS, DatasetStats, load_or_compute_stats


def jpeg_bytes(array: np.ndarray, mode: str = "RGB", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def small(array: np.ndarray, size=(60, 40)) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size))


def make_split(root, classes: dict[str, list[np.ndarray]]):
    for wnid, arrays in classes.items():
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i, array in enumerate(arrays):
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(array))
    return root


class LogLines:
    """Collect the 'vgg.data' logger's messages (its parent 'vgg' may not propagate to pytest's caplog)."""

    def __init__(self):
        self.lines = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.lines.append(record.getMessage())

    def __enter__(self):  # INFO and up, whatever level an earlier test's run left (test_hardening_ddp_data)
        self.level = logging.getLogger("vgg.data").level
        logging.getLogger("vgg.data").setLevel(logging.INFO)
        logging.getLogger("vgg.data").addHandler(self.handler)
        return self.lines

    def __exit__(self, *exc):
        logging.getLogger("vgg.data").removeHandler(self.handler)
        logging.getLogger("vgg.data").setLevel(self.level)


@pytest.fixture
def split(tmp_path):
    photos = {"n02": skdata.coffee(), "n01": skdata.chelsea(), "n10": skdata.rocket()}
    return make_split(tmp_path / "train", {w: [small(a), small(a[::-1]), small(a[:, ::-1])]
                                           for w, a in photos.items()})


# --- ImageFolder and its file-list cache ----------------------------------------------------------

class ListedInReverse:
    """os.scandir stand-in that lists a folder in reverse name order (disks list in any order)."""

    real_scandir = os.scandir

    def __init__(self, path):
        with self.real_scandir(path) as entries:
            self.entries = sorted(entries, key=lambda e: e.name, reverse=True)

    def __enter__(self):
        return iter(self.entries)

    def __exit__(self, *exc):
        return False

    def __iter__(self):
        return iter(self.entries)


@pytest.mark.parametrize("listing", ["as the disk lists", "reversed"])
def test_classes_are_the_sorted_folders_and_samples_follow(split, listing, monkeypatch):
    """Class i is the i-th folder name in sorted order, whatever order the file system lists them in
    (the split fixture creates n02, n01, n10 in that order)."""
    if listing == "reversed":
        monkeypatch.setattr(os, "scandir", ListedInReverse)
        assert [e.name for e in os.scandir(split)] == ["n10", "n02", "n01"]
    ds = ImageFolder(split, EvalTransform(scale=32))
    assert ds.classes == ["n01", "n02", "n10"]
    assert len(ds) == 9 and [label for _, label in ds.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [path for path, _ in ds.samples] == sorted(path for path, _ in ds.samples)  # files sorted too
    assert all(path.startswith(str(split)) for path, _ in ds.samples)
    image, label = ds[4]
    assert label == 1 and image.dtype == torch.uint8 and image.shape == (3, 32, 48)
    raw, _ = ImageFolder(split, None)[0]
    assert isinstance(raw, Image.Image) and raw.mode == "RGB" and raw.size == (60, 40)


def test_given_classes_set_the_labels(split):
    ds = ImageFolder(split, None, classes=["n10", "n02", "n01", "n99"])
    assert ds.classes == ["n10", "n02", "n01", "n99"] and [label for _, label in ds.samples][:3] == [0, 0, 0]
    with pytest.raises(UserError, match="n10"):
        ImageFolder(split, None, classes=["n01", "n02"])


def test_missing_or_flat_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ImageFolder(tmp_path / "nope", None)
    flat = tmp_path / "val"
    flat.mkdir()
    (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg_bytes(small(skdata.coffee())))
    with pytest.raises(UserError, match="sort-val"):
        ImageFolder(flat, None)
    (flat / "n01").mkdir()
    with pytest.raises(UserError, match="no images"):
        ImageFolder(flat, None)


def test_file_list_is_cached_and_invalidated(split, monkeypatch):
    ImageFolder(split, None)
    cache = split / ".vgg_filelist.json"
    assert cache.is_file() and "n01_0.JPEG" in cache.read_text()

    scans = []
    real_scan = vfolders._scan_class
    monkeypatch.setattr(vfolders, "_scan_class", lambda folder: scans.append(folder.name) or real_scan(folder))
    assert len(ImageFolder(split, None)) == 9 and scans == []  # from the cache, no folder listed

    (split / "n02" / "extra.JPEG").write_bytes(jpeg_bytes(small(skdata.astronaut())))
    assert len(ImageFolder(split, None)) == 10 and scans  # a changed folder: scanned again
    scans.clear()
    make_split(split, {"n05": [small(skdata.astronaut())]})
    ds = ImageFolder(split, None)
    assert ds.classes == ["n01", "n02", "n05", "n10"] and len(ds) == 11
    (split / "n05" / "n05_0.JPEG").unlink()
    assert len(ImageFolder(split, None)) == 10


def test_file_list_cache_falls_back_to_the_user_cache(split, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (split / ".vgg_filelist.json").mkdir()  # the data folder's cache spot is unusable
    assert len(ImageFolder(split, None)) == 9
    cached = list((tmp_path / "xdg" / "vgg-imagenet").glob("*vgg_filelist.json"))
    assert len(cached) == 1
    monkeypatch.setattr(vfolders, "_scan_class", lambda folder: pytest.fail("should come from the cache"))
    assert len(ImageFolder(split, None)) == 9


# --- Bad input ------------------------------------------------------------------------------------

@pytest.fixture
def awkward_split(tmp_path):
    """Each awkward file real ImageNet and real disks have, as real files."""
    folder = tmp_path / "train" / "n00000001"
    folder.mkdir(parents=True)
    photo = small(skdata.chelsea(), (90, 60))
    (folder / "good.JPEG").write_bytes(jpeg_bytes(photo))
    (folder / "cmyk.JPEG").write_bytes(jpeg_bytes(photo, "CMYK"))
    (folder / "gray.JPEG").write_bytes(jpeg_bytes(photo, "L"))
    png = io.BytesIO()
    Image.fromarray(photo).save(png, "PNG")
    (folder / "png_named.JPEG").write_bytes(png.getvalue())
    palette = io.BytesIO()
    Image.fromarray(photo).convert("P").save(palette, "GIF")
    (folder / "palette_gif.JPEG").write_bytes(palette.getvalue())
    big = jpeg_bytes(small(skdata.astronaut(), (512, 512)))
    (folder / "truncated.JPEG").write_bytes(big[: len(big) // 2])
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "text.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder.parent


DECODED = {"good", "cmyk", "gray", "png_named", "palette_gif"}
SKIPPED = {"truncated", "empty", "text"}


@pytest.mark.parametrize("transform", [None, TrainTransform(crop_size=32, scale_min=40, scale_max=48),
                                       EvalTransform(scale=256), EvalTransform(scale=32)])
def test_awkward_files_decode_to_rgb_or_are_skipped_with_one_line(awkward_split, transform):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # deliberate: a truncated file is skipped
    ds = ImageFolder(awkward_split, transform)
    names = [p.split("/")[-1].removesuffix(".JPEG") for p, _ in ds.samples]
    with LogLines() as lines:
        items = [ds[i] for i in range(len(ds))]
    assert lines == []  # the dataset runs in DataLoader workers: it reports, the main process warns
    for name, (image, label, *unreadable) in zip(names, items):
        assert label == 0
        if name in SKIPPED:
            assert image is None and unreadable[0].path.endswith(f"/{name}.JPEG"), name
        elif transform is None:
            assert image.mode == "RGB" and not unreadable, name
        else:
            image = image.image if isinstance(transform, TrainTransform) else image  # TrainCrop: + alphas
            assert image.dtype == torch.uint8 and image.shape[0] == 3 and not unreadable, name
    assert {n for n, (image, *_) in zip(names, items) if image is None} == SKIPPED
    with LogLines() as lines:
        for _ in range(2):  # once per file, however often it is met
            vfolders.warn_unreadable([item[2] for item in items if item[0] is None])
    assert len(lines) == len(SKIPPED)
    for name, line in zip(sorted(SKIPPED), sorted(lines, key=lambda l: l.split("/")[-1])):
        assert "\n" not in line and f"{name}.JPEG" in line and "skipping" in line


def test_truncated_jpeg_is_skipped_even_when_decoded_at_reduced_scale(tmp_path):
    folder = tmp_path / "n1"
    folder.mkdir()
    full = jpeg_bytes(small(skdata.astronaut(), (1024, 1024)))
    (folder / "cut.JPEG").write_bytes(full[: int(len(full) * 0.8)])
    with LogLines():
        assert ImageFolder(tmp_path, EvalTransform(scale=128))[0][0] is None  # 1/8-scale decode
        assert ImageFolder(tmp_path, EvalTransform(scale=1024))[0][0] is None


def test_collate_drops_skipped_images_and_passes_on_which():
    a, b = torch.zeros(3, 4, 4, dtype=torch.uint8), torch.ones(3, 4, 4, dtype=torch.uint8)
    x, y = Unreadable("x.JPEG", "empty"), Unreadable("y.JPEG", "truncated")
    images, labels, skipped = collate_batch([(a, 3), (None, 1, x), (b, 2)])
    assert images.shape == (2, 3, 4, 4) and images.dtype == torch.uint8
    assert labels.tolist() == [3, 2] and labels.dtype == torch.int64 and skipped == [x]
    images, labels, skipped = collate_batch([(None, 0, x), (None, 1, y)])
    assert images.shape[0] == 0 and labels.shape == (0,) and skipped == [x, y]
    images, labels, skipped = collate_list([(a, 0), (None, 1, y), (torch.zeros(3, 5, 7, dtype=torch.uint8), 2)])
    assert [tuple(i.shape) for i in images] == [(3, 4, 4), (3, 5, 7)] and labels.tolist() == [0, 2] and skipped == [y]


def test_loader_counts_skips_over_an_epoch_with_workers(awkward_split):
    ds = ImageFolder(awkward_split, TrainTransform(crop_size=32, scale_min=40, scale_max=48))
    loader = build_loader(ds, batch_size=3, shuffle=True, workers=2, collate_fn=collate_batch, seed=0)
    seen = skipped = 0
    names = []
    for (images, alphas), labels, unreadable in loader:  # the records cross from the worker processes
        assert images.shape[1:] == (3, 32, 32) and images.shape[0] == labels.shape[0] == alphas.shape[0]
        seen, skipped = seen + labels.shape[0], skipped + len(unreadable)
        names += [f.path.split("/")[-1].removesuffix(".JPEG") for f in unreadable]
    assert (seen, skipped) == (len(DECODED), len(SKIPPED)) and set(names) == SKIPPED


# --- Per-sample draws ------------------------------------------------------------------------------

class SameImage(Dataset):
    """One file, many times: item i differs from the others only by its augmentation (sample i's draws)."""

    def __init__(self, folder, n):
        self.folder, self.n = folder, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        path, label = self.folder.samples[0]
        with Image.open(path) as image:
            return self.folder.transform(image, i), label


def crops(loader) -> torch.Tensor:
    return torch.cat([batch.image for batch, _, _ in loader])


def test_draws_follow_the_index_and_epoch_not_the_worker(split):
    """Issue 17: the crop of item i depends on (seed, epoch, i) only: not on the worker that made it,
    the loader's seed, or which pass of the loader this is."""
    folder = ImageFolder(split, TrainTransform(crop_size=24, scale_min=30, scale_max=60, seed=3))
    ds = SameImage(folder, 8)

    def loader(workers, seed=0):
        return build_loader(ds, batch_size=2, shuffle=False, workers=workers, collate_fn=collate_batch, seed=seed)

    two_workers = loader(2)
    flat = crops(two_workers)
    assert len({hashlib.sha1(c.numpy().tobytes()).hexdigest() for c in flat}) == 8  # no two items alike
    assert torch.equal(flat, crops(two_workers))  # a second pass of the same epoch: the same draws
    assert torch.equal(flat, crops(loader(0))) and torch.equal(flat, crops(loader(2, seed=1)))
    folder.transform.set_epoch(1)
    assert not torch.equal(flat, crops(loader(2)))  # the next epoch draws anew


def test_build_loader_takes_a_sampler_and_drops_the_last_batch(split):
    ds = ImageFolder(split, EvalTransform(scale=16))
    loader = build_loader(ds, batch_size=4, workers=0, collate_fn=collate_list, sampler=[8, 0, 4, 1, 2],
                          drop_last=True)
    batches = list(loader)
    assert len(batches) == 1 and batches[0][1].tolist() == [2, 0, 1, 0]
    assert loader.pin_memory == torch.cuda.is_available()


# --- Dataset statistics -----------------------------------------------------------------------------

def test_stats_round_trip_and_validation():
    assert DatasetStats.from_dict(IMAGENET_STATS.to_dict()) == IMAGENET_STATS
    assert json.loads(json.dumps(IMAGENET_STATS.to_dict())) == IMAGENET_STATS.to_dict()
    with pytest.raises(UserError, match="eigvec"):
        DatasetStats.from_dict({"mean_rgb": [1, 2, 3], "eigval": [1, 2, 3]})
    with pytest.raises(UserError, match="unknown keys"):
        DatasetStats.from_dict({**IMAGENET_STATS.to_dict(), "std": [1, 1, 1]})
    with pytest.raises(UserError, match="3x3"):
        DatasetStats.from_dict({**IMAGENET_STATS.to_dict(), "eigvec": [[1, 0], [0, 1]]})


@pytest.fixture
def colour_line_split(tmp_path):
    """Flat images whose colours vary along one known RGB direction around a known mean."""
    rng = np.random.default_rng(0)
    direction = np.array([2.0, 1.0, -1.0]) / np.sqrt(6)
    arrays = []
    for _ in range(40):
        colour = np.array([120.0, 110.0, 100.0]) + rng.normal(0, 30) * direction
        arrays.append(np.broadcast_to(colour.clip(0, 255).round().astype(np.uint8), (48, 64, 3)).copy())
    return make_split(tmp_path / "data" / "train", {"n01": arrays[:20], "n02": arrays[20:]}), direction


def test_stats_find_the_mean_and_the_colour_direction(colour_line_split):
    train, direction = colour_line_split
    stats, used, skipped = vstats.compute_stats(train, num_images=40, workers=0)
    assert skipped == 0 and used == min(40, len(ImageFolder(train, None)))
    np.testing.assert_allclose(stats.mean_rgb, [120, 110, 100], atol=8)
    vec = np.array(stats.eigvec)
    np.testing.assert_allclose(vec.T @ vec, np.eye(3), atol=1e-6)  # orthonormal columns
    assert abs(vec[:, 0] @ direction) > 0.99  # the first principal component is the colour line
    assert stats.eigval[0] > 20 * stats.eigval[1] >= 0 and stats.eigval[1] >= stats.eigval[2] >= 0
    np.testing.assert_allclose(stats.eigval[0], (30 / 255) ** 2, rtol=0.5)  # on the [0, 1] scale


def test_stats_are_cached_beside_the_data(colour_line_split, monkeypatch):
    train, _ = colour_line_split
    stats = load_or_compute_stats(train, num_images=10, workers=0)
    cache = train.parent / "vgg_stats_10_seed0.json"
    assert json.loads(cache.read_text())["num_images"] == 10
    monkeypatch.setattr(vstats, "compute_stats", lambda *a, **k: pytest.fail("should come from the cache"))
    assert load_or_compute_stats(train, num_images=10) == stats
    monkeypatch.undo()
    other = load_or_compute_stats(train, num_images=12, seed=1, workers=0)  # other settings: computed again
    assert other != stats and json.loads((train.parent / "vgg_stats_12_seed1.json").read_text())["num_images"] == 12
    # ... into a file of their own: the first setting's cache is still there, not rewritten (issue 30)
    assert json.loads(cache.read_text())["num_images"] == 10
    monkeypatch.setattr(vstats, "compute_stats", lambda *a, **k: pytest.fail("should come from the cache"))
    assert load_or_compute_stats(train, num_images=10) == stats and load_or_compute_stats(
        train, num_images=12, seed=1) == other


# --- Sorting the official flat validation folder ------------------------------------------------

@pytest.fixture
def flat_val(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    photos = [skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.astronaut()]
    for k, photo in enumerate(photos, start=1):
        (val / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(jpeg_bytes(small(photo)))
    return val


def test_sort_val_with_filename_wnid_lines(flat_val, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG n02\nILSVRC2012_val_00000002.JPEG n01\n\n"
                      "ILSVRC2012_val_00000003.JPEG n02\nILSVRC2012_val_00000004.JPEG n03\n")
    counts = sort_val(flat_val, labels)
    assert counts == {"moved": 4, "already_sorted": 0, "classes": 3, "unlabelled": 0}
    ds = ImageFolder(flat_val, None)
    assert ds.classes == ["n01", "n02", "n03"]
    assert [(p.split("/")[-1], label) for p, label in ds.samples] == [
        ("ILSVRC2012_val_00000002.JPEG", 0), ("ILSVRC2012_val_00000001.JPEG", 1),
        ("ILSVRC2012_val_00000003.JPEG", 1), ("ILSVRC2012_val_00000004.JPEG", 2)]
    assert sort_val(flat_val, labels)["already_sorted"] == 4  # repeating it is harmless


def test_sort_val_with_the_devkit_ground_truth(flat_val, tmp_path):
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("3\n1\n3\n2\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    with pytest.raises(UserError, match="--devkit-classes"):
        sort_val(flat_val, truth)
    sort_val(flat_val, truth, classes)
    assert sorted(p.relative_to(flat_val).as_posix() for p in flat_val.rglob("*.JPEG")) == [
        "n01440764/ILSVRC2012_val_00000002.JPEG", "n01443537/ILSVRC2012_val_00000004.JPEG",
        "n01484850/ILSVRC2012_val_00000001.JPEG", "n01484850/ILSVRC2012_val_00000003.JPEG"]


def test_sort_val_reads_the_devkit_meta_mat(flat_val, tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    # The devkit's synsets table: the 1000 leaves have ILSVRC2012_ID 1..1000 and no children;
    # inner nodes follow with higher IDs. Here: 3 leaves, listed out of order, and one inner node.
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.array([(2, "n02", "b", 0), (4, "n99", "inner", 2), (1, "n01", "a", 0), (3, "n03", "c", 0)],
                       dtype=dtype)
    scipy_io.savemat(tmp_path / "meta.mat", {"synsets": synsets})
    assert vlabels.read_devkit_classes(tmp_path / "meta.mat") == ["n01", "n02", "n03"]
    truth = tmp_path / "truth.txt"
    truth.write_text("1\n2\n3\n3\n")
    sort_val(flat_val, truth, tmp_path / "meta.mat")
    assert ImageFolder(flat_val, None).classes == ["n01", "n02", "n03"]


def test_sort_val_bad_input_moves_nothing(flat_val, tmp_path):
    before = sorted(p.name for p in flat_val.iterdir())
    cases = {
        "ILSVRC2012_val_00000001.JPEG n01\nILSVRC2012_val_00000009.JPEG n01\n": "not in",
        "ILSVRC2012_val_00000001.JPEG n01 extra\n": "expected",
        "ILSVRC2012_val_00000001.JPEG ../n01\n": "plain",
        "ILSVRC2012_val_00000001.JPEG n01\nILSVRC2012_val_00000001.JPEG n02\n": "both",
        "": "empty",
    }
    for text, message in cases.items():
        labels = tmp_path / "labels.txt"
        labels.write_text(text)
        with pytest.raises(UserError, match=message):
            sort_val(flat_val, labels)
    (tmp_path / "truth.txt").write_text("1\n5\n")
    (tmp_path / "classes.txt").write_text("n01\nn02\n")
    with pytest.raises(UserError, match="outside 1..2"):
        sort_val(flat_val, tmp_path / "truth.txt", tmp_path / "classes.txt")
    assert sorted(p.name for p in flat_val.iterdir()) == before


def test_sort_val_command_line(flat_val, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"ILSVRC2012_val_{k:08d}.JPEG n0{k % 2}\n" for k in range(1, 5)))
    args = ["sort-val", "--val-dir", str(flat_val)]
    bad = subprocess.run([sys.executable, "-m", "vgg.data", *args, "--labels", str(tmp_path / "missing.txt")],
                         capture_output=True, text=True, env=subprocess_env(), cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "missing.txt" in bad.stderr
    assert vmain.main([*args, "--labels", str(labels)]) == 0
    assert "moved 4 images into 2 class folders" in capsys.readouterr().out
    assert ImageFolder(flat_val, None).classes == ["n00", "n01"]


# --- The sample dataset -------------------------------------------------------------------------------

def tree_digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith((".", "vgg_stats_"))}


def test_sample_dataset_layout_and_awkward_files(sample_root):
    meta = json.loads((sample_root / "meta.json").read_text())
    assert meta["version"] == vsample.GENERATOR_VERSION
    train, val = ImageFolder(sample_root / "train", None), ImageFolder(sample_root / "val", None)
    assert len(train.classes) >= 10 and train.classes == val.classes == sorted(meta["classes"])
    assert len(train) >= 50 * len(train.classes) and len(val) >= 10 * len(val.classes)
    total = sum(p.stat().st_size for p in sample_root.rglob("*") if p.is_file())
    assert total < 8 * 2**20
    sizes, modes, skipped = set(), set(), []
    for path, _ in train.samples + val.samples:
        try:
            with Image.open(path) as probe:  # the header only
                modes.add(f"{probe.format}/{probe.mode}")
                sizes.add(probe.size)
        except OSError:
            assert path.endswith("_awkward_empty.JPEG")
    assert {"JPEG/RGB", "JPEG/CMYK", "JPEG/L", "PNG/RGB"} <= modes
    assert len(sizes) > 100 and min(min(s) for s in sizes) < 64 and max(max(s) for s in sizes) > 250
    for ds in (train, val):
        skipped += [path for i, (path, _) in enumerate(ds.samples) if ds[i][0] is None]
    assert sorted(p.split("_awkward_")[1] for p in skipped) == ["empty.JPEG", "empty.JPEG",
                                                                "truncated.JPEG", "truncated.JPEG"]


def test_sample_dataset_is_deterministic_and_regenerated_when_stale(sample_root, tmp_path):
    again = vsample.make_sample_dataset(tmp_path / "sample")
    assert tree_digest(again) == tree_digest(sample_root)
    assert vsample.make_sample_dataset(again) == again  # up to date: nothing to do
    meta = json.loads((again / "meta.json").read_text())
    (again / "meta.json").write_text(json.dumps({**meta, "version": 0}))
    (again / "train" / "stray.txt").write_text("from the old generator")
    vsample.make_sample_dataset(again)
    assert not (again / "train" / "stray.txt").exists() and tree_digest(again) == tree_digest(sample_root)


def test_sample_dataset_refuses_to_overwrite_other_folders(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="meta.json"):
        vsample.make_sample_dataset(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_sample_dataset_is_learnable(sample_root):
    """Far above chance with the simplest classifier (nearest class mean of colour statistics on
    the same kind of 32x32 crops the demo trains on), so a small net has something to learn."""
    transform = EvalTransform(scale=32)

    def features(split):
        ds = ImageFolder(sample_root / split, transform)
        xs, ys = [], []
        with LogLines():
            for i in range(len(ds)):
                image, label, *_ = ds[i]
                if image is not None:
                    x = image.float().reshape(3, -1) / 255
                    xs.append(torch.cat([x.mean(1), x.std(1), (x[:, 1:] - x[:, :-1]).abs().mean(1)]))
                    ys.append(label)
        return torch.stack(xs), torch.tensor(ys), len(ds.classes)

    train_x, train_y, classes = features("train")
    val_x, val_y, _ = features("val")
    mean, std = train_x.mean(0), train_x.std(0)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in range(classes)])
    accuracy = (torch.cdist(val_x, centroids).argmin(1) == val_y).float().mean().item()
    print(f"nearest-class-mean val accuracy {accuracy:.2f} ({classes} classes)")
    assert accuracy > 4 / classes, accuracy


def test_sample_command_line(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert vmain.main(["sample", "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert vmain.main(["sample", "--out", str(tmp_path / "s"), "--seed", "3"]) == 0
    assert "12 classes" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["seed"] == 3
    # The older command still works: `python -m vgg.sample_data` is `python -m vgg.data sample`.
    old = subprocess.run([sys.executable, "-m", "vgg.sample_data", "--out", str(tmp_path / "old"), "--seed", "3"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert old.returncode == 0, old.stderr
    assert "12 classes" in old.stdout
    assert json.loads((tmp_path / "old" / "meta.json").read_text())["seed"] == 3
