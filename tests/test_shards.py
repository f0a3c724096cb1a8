"""WebDataset shards: `python -m vgg.data shards` writes them; training streams them (full batches, each image at most
once an epoch, the same steps on every rank), evaluation reads them; 2 gloo processes on uneven shards."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, subprocess_env
from test_train import tiny_config, train_cli

from vgg.core.checkpoint import load_checkpoint
from vgg.data.batches.jpeg import Check
from vgg.data.datasets import folders as vfolders
from vgg.data.datasets.shard_format import read_verdict
from vgg.data.datasets.shards import ShardImages, ShardStream, is_shard_dir, open_split, write_shards
from vgg.training.run import run

CLASSES = ["n00000001", "n00000004", "n00000006", "n00000009"]


def small_folders(sample_root: Path, root: Path, per_class: dict[str, int], val_per_class: int = 2) -> Path:
    """Class folders of readable sample JPEGs (hard links), `per_class[wnid]` training images each."""
    for split, counts in (("train", per_class), ("val", {w: val_per_class for w in per_class})):
        for wnid, count in counts.items():
            (root / split / wnid).mkdir(parents=True)
            files = sorted(p for p in (sample_root / split / wnid).iterdir() if "awkward" not in p.name)[:count]
            for p in files:
                os.link(p, root / split / wnid / p.name)
    return root


class IndexTransform:
    """Stands in for TrainTransform: the sample's index, without decoding pixels."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image, index: int, check=None) -> torch.Tensor:  # (TrainTransform's signature)
        return torch.tensor(index)


def batches(stream: ShardStream, epoch: int, start_step: int = 0) -> list[list[int]]:
    return [images.tolist() if len(labels) else [] for images, labels, _ in stream.loader(epoch=epoch,
                                                                                          start_step=start_step)]


def test_shards_cli_writes_timm_layout_and_train_and_evaluate_stream_from_them(sample_root, tmp_path):
    wds = tmp_path / "wds"
    result = subprocess.run([sys.executable, "-m", "vgg.data", "shards", str(sample_root), str(wds),
                             "--images-per-shard", "300"], capture_output=True, text=True, env=subprocess_env(),
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads((wds / "_info.json").read_text())
    train_files = vfolders.list_files(sample_root / "train")
    n_train = sum(map(len, train_files.values()))
    assert info["classes"] == sorted(train_files)
    assert info["splits"]["train"]["filenames"] == [f"imagenet1k-train-{i:04d}.tar" for i in range(3)]
    assert info["splits"]["train"]["shard_lengths"] == [300, 300, n_train - 600]
    assert info["splits"]["validation"]["filenames"] == ["imagenet1k-validation-00.tar"]
    # Every training file once, as jpg (its bytes) + cls + json + its damage check sharing a key, classes
    # mixed in a shard; the check is the class folder's (made once, vgg.data.datasets.checks).
    seen, verdicts = {}, {}
    folder = vfolders.ImageFolder(sample_root / "train")
    folder_verdicts = {os.path.relpath(folder.path(i), folder.root): folder.checks.verdict(i)
                       for i in range(len(folder))}
    for name in info["splits"]["train"]["filenames"]:
        with tarfile.open(wds / name) as tar:
            members = tar.getmembers()
            kinds = ["jpg", "cls", "json", "vgg_check"]
            assert [m.name.rpartition(".")[2] for m in members] == kinds * (len(members) // 4)
            for jpg, cls, meta, check in zip(*(members[k::4] for k in range(4))):
                record = json.loads(tar.extractfile(meta).read())
                assert int(tar.extractfile(cls).read()) == info["classes"].index(record["wnid"]) == record["label"]
                seen[record["filename"]] = tar.extractfile(jpg).read()
                verdicts[record["filename"]] = read_verdict({"vgg_check": check}, tar, jpg)
    assert verdicts == folder_verdicts
    assert {v.check for v in verdicts.values()} == {Check.OK, Check.QUIRK, Check.DAMAGED}  # the awkward files
    assert sorted(seen) == sorted(f"{w}/{n}" for w, names in train_files.items() for n in names)
    some = sorted(seen)[5]
    assert seen[some] == (sample_root / "train" / some).read_bytes()

    args = ["--config", "demo", "--data", str(wds), "--out-dir", str(tmp_path / "ck"), "--log-dir",
            str(tmp_path / "runs"), "--workers", "1", "--device", "cpu", "--epochs", "1", "--steps-per-epoch", "2",
            "--batch-size", "16", "--stats-images", "20", "--run-name", "wds"]
    result = train_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ck" / "wds" / "best.pt")
    assert ckpt["classes"] == info["classes"] and ckpt["epoch"] == 1
    row = json.loads((tmp_path / "ck" / "wds" / "metrics.jsonl").read_text())
    n_val = info["splits"]["validation"]["num_samples"]
    assert row["train_images"] + row["train_skipped"] == 2 * 16
    assert row["val_images"] + row["val_skipped"] == n_val
    stats = json.loads((wds / "vgg_stats_20_seed0.json").read_text())
    assert stats["num_images"] == 20 and ckpt["stats"]["mean_rgb"] == stats["mean_rgb"]

    evaluated = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--checkpoint",
                                str(tmp_path / "ck" / "wds" / "best.pt"), "--data", str(wds), "--workers", "0",
                                "--device", "cpu", "--multi-crop", "--out", str(tmp_path / "eval")],
                               capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=ROOT)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["images"] + result["skipped"] == n_val and result["skipped"] == 2  # the awkward val files


@pytest.fixture(scope="module")
def uneven(sample_root, tmp_path_factory) -> Path:
    """25 training images in shards of 10, 10 and 5."""
    root = tmp_path_factory.mktemp("uneven")
    small_folders(sample_root, root / "folders", {"n00000001": 7, "n00000004": 6, "n00000006": 6, "n00000009": 6})
    write_shards(root / "folders", root / "wds", images_per_shard=10)
    return root / "wds"


@pytest.mark.parametrize("world_size,workers,batch_size", [(2, 0, 6), (3, 2, 4)])
def test_stream_deals_full_batches_of_each_image_once_with_equal_steps_and_resumes_exactly(uneven, world_size, workers,
                                                                                           batch_size):
    split = open_split(uneven, "train")
    assert split.lengths == (10, 10, 5)
    streams = [ShardStream(split, IndexTransform(), batch_size=batch_size, workers=workers, seed=3, rank=r,
                           world_size=world_size, shuffle_buffer=4) for r in range(world_size)]
    epochs = []
    for epoch in range(2):
        per_rank = [batches(s, epoch) for s in streams]
        assert [len(b) for b in per_rank] == [streams[0].num_steps] * world_size  # no rank waits for another
        assert all(len(b) == batch_size for rank_batches in per_rank for b in rank_batches)  # none short or empty
        flat = [i for rank_batches in per_rank for b in rank_batches for i in b]
        assert len(set(flat)) == len(flat) == (25 // world_size // batch_size) * batch_size * world_size
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]  # a new order each epoch
    fresh = ShardStream(split, IndexTransform(), batch_size=batch_size, workers=workers, seed=3, rank=1,
                        world_size=world_size, shuffle_buffer=4)
    assert batches(fresh, 1) == epochs[1][1]  # an epoch's order depends on (seed, epoch) only: exact resume
    assert batches(fresh, 1, start_step=3) == epochs[1][1][3:]  # mid-epoch: the batches not yet trained


def test_validation_images_by_position_and_bad_info(uneven, tmp_path):
    val = ShardImages(open_split(uneven, "validation"))
    assert len(val) == 8 and val.classes == CLASSES
    image, label = val[5]
    assert image.mode == "RGB" and label == 2
    assert is_shard_dir(uneven) and not is_shard_dir(uneven.parent)
    from vgg.core.errors import UserError

    broken = tmp_path / "broken"
    broken.mkdir()
    info = json.loads((uneven / "_info.json").read_text())
    (broken / "_info.json").write_text(json.dumps({**info, "classes": ["n00000004", "n00000001"] + CLASSES[2:]}))
    with pytest.raises(UserError, match="missing"):
        open_split(broken, "train")
    for name in info["splits"]["train"]["filenames"]:
        os.link(uneven / name, broken / name)
    with pytest.raises(UserError, match="sorted wnids"):
        open_split(broken, "train")


def test_epoch_boundary_resume_from_shards_gives_identical_weights(uneven, tmp_path):
    config = dict(data=str(uneven), batch_size=8, steps_per_epoch=0, stats_images=10, workers=0)
    run(tiny_config(None, tmp_path, run_name="straight", **config))
    run(tiny_config(None, tmp_path, run_name="split", epochs=1, **config))
    run(tiny_config(None, tmp_path, run_name="split", **config), resume="auto")
    straight = load_checkpoint(tmp_path / "checkpoints" / "straight" / "last.pt")
    split = load_checkpoint(tmp_path / "checkpoints" / "split" / "last.pt")
    assert straight["epoch"] == split["epoch"] == 2
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    rows = [json.loads(line) for line in (tmp_path / "checkpoints" / "straight" / "metrics.jsonl").open()]
    assert [r["train_images"] for r in rows] == [24, 24]  # 3 full batches of the 25 images each epoch


def test_two_gloo_processes_stream_uneven_shards_without_hang(uneven, tmp_path):
    """25 images over 2 ranks (13 / 12), 6 a rank a step: 2 full batches on each rank, as from the class folders
    (rank 0's 13th image waits for another epoch). Both finish; each epoch trains on 24 images."""
    result = train_cli("--config", "demo", "--data", str(uneven), "--out-dir", str(tmp_path / "ck"), "--log-dir",
                       str(tmp_path / "runs"), "--device", "cpu", "--gpus", "2", "--workers", "1", "--epochs", "2",
                       "--batch-size", "12", "--stats-images", "10", "--run-name", "ddp", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 steps/epoch of 12 on 2 x cpu" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "ck" / "ddp" / "metrics.jsonl").open()]
    assert [(r["train_images"], r["train_skipped"], r["val_images"]) for r in rows] == [(24, 0, 8)] * 2


def test_written_shards_carry_each_images_check_so_reading_them_checks_none_again(sample_root, tmp_path, monkeypatch):
    """The check made once per class folder (vgg.data.datasets.checks) goes into the shards: streaming and
    reading them by position check no image again, and skip the damaged ones with the folder's reason; a
    shard without the checks (timm's) is checked as it is read, with the same outcome."""
    from vgg.data.batches import jpeg as vjpeg
    from vgg.data.batches.transforms import CenterCropTransform, TrainTransform

    wnids = [f"n0000000{c}" for c in range(5)]
    for split, normal in (("train", 3), ("val", 1)):
        for wnid in wnids:
            (tmp_path / "folders" / split / wnid).mkdir(parents=True)
            files = sorted((sample_root / split / wnid).iterdir())
            for p in [p for p in files if "awkward" not in p.name][:normal] + [p for p in files if "awkward" in p.name]:
                os.link(p, tmp_path / "folders" / split / wnid / p.name)
    write_shards(tmp_path / "folders", tmp_path / "wds", images_per_shard=7)
    checked = []
    real_check = vjpeg.check
    monkeypatch.setattr(vjpeg, "check", lambda data: checked.append(len(data)) or real_check(data))

    def read_both() -> tuple[list, list]:
        """(the training stream's items, the validation images by position), as (label, reason or '')."""
        stream = ShardStream(open_split(tmp_path / "wds", "train"), TrainTransform(crop_size=32, scale_min=36,
                             scale_max=48, seed=1), batch_size=20, workers=0, seed=1)
        stream.set_epoch(0)
        train = [(item[1], item[2].reason if len(item) == 3 else "") for batch in stream for item in batch]
        val = ShardImages(open_split(tmp_path / "wds", "validation"), CenterCropTransform(scale=36, crop_size=32))
        return sorted(train), sorted((item[1], item[2].reason if len(item) == 3 else "") for item in val)

    train, val = read_both()
    assert checked == []  # every image's check came from its shard
    assert len(train) == 20 and len(val) == 10
    damaged = [folder.checks.verdict(i).note for folder in map(vfolders.ImageFolder, [tmp_path / "folders" / "train",
               tmp_path / "folders" / "val"]) for i in range(len(folder)) if folder.checks.verdict(i).check == Check.DAMAGED]
    assert len(damaged) == 4  # the truncated and the empty file, in both splits
    assert sorted(r for _, r in train + val if r) == sorted(damaged)  # the folders' reasons, word for word
    for path in (tmp_path / "wds").glob("*.tar"):  # the same shards without the checks
        with tarfile.open(path) as tar:
            kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.endswith(".vgg_check")]
        with tarfile.open(path, "w") as tar:
            for member, data in kept:
                tar.addfile(member, io.BytesIO(data))
    unchecked_train, unchecked_val = read_both()
    assert len([size for size in checked if size]) == 28  # each image checked as it was read (2 are empty)
    for unchecked, checked_once in ((unchecked_train, train), (unchecked_val, val)):  # the same images skipped
        assert [(label, bool(reason)) for label, reason in unchecked] == [(label, bool(r)) for label, r in checked_once]


def test_a_check_made_for_other_bytes_or_unreadable_is_no_check(tmp_path):
    """A `.vgg_check` member is trusted only for an image of the size it was made for, and only if it reads."""
    from vgg.data.batches.jpeg import Verdict
    from vgg.data.datasets.shard_format import verdict_bytes

    path = tmp_path / "one.tar"
    members = {"a.jpg": b"\xff\xd8" + bytes(10), "a.vgg_check": verdict_bytes(Verdict(Check.DAMAGED, "cut\tshort"), 12),
               "b.jpg": b"\xff\xd8" + bytes(9), "b.vgg_check": verdict_bytes(Verdict(Check.OK), 12),
               "c.jpg": b"\xff\xd8", "c.vgg_check": b"3\tnot a size\t"}
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        parts = {name.split(".")[0]: {} for name in members}
        for member in tar.getmembers():
            key, ext = member.name.split(".")
            parts[key][ext] = member
        verdicts = [read_verdict(parts[key], tar, parts[key]["jpg"]) for key in "abc"]
        assert read_verdict({"jpg": parts["a"]["jpg"]}, tar, parts["a"]["jpg"]) == Verdict(Check.UNCHECKED)
    assert verdicts == [Verdict(Check.DAMAGED, "cut short"), Verdict(Check.UNCHECKED), Verdict(Check.UNCHECKED)]
