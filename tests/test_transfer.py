"""transfer.py, the paper's Appendix B: the descriptor, its cache, the splits, VOC's AP, the SVM, bad input.

The net is a short run of the demo config (A at 1/8 width, fc_width 256, 32-px crops); the datasets are the
generated ones in each layout (vgg/transfer/sample.py)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_one_line_error, subprocess_env

import transfer as transfer_cli

from vgg.transfer import features as vfeatures
from vgg.transfer.classifier import combine_scales, stack_nets, voc_ap
from vgg.transfer.datasets import open_transfer_set
from vgg.transfer.sample import make_transfer_samples

FC_WIDTH = 256  # configs/demo.yaml's fc_width: the demo net's descriptor size


def run(args, cwd, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return make_transfer_samples(tmp_path_factory.mktemp("transfer") / "sets")


@pytest.fixture(scope="module")
def demo_net(tmp_path_factory, sample_root):
    """best.pt of four steps of the demo config."""
    work = tmp_path_factory.mktemp("net")
    proc = run([str(ROOT / "train.py"), "--config", "demo", "--epochs", "1", "--steps-per-epoch", "4", "--run-name",
                "short", "--data", str(sample_root), "--out-dir", str(work), "--log-dir", str(work / "runs"),
                "--stats-images", "50", "--workers", "0", "--device", "cpu"], cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "short" / "best.pt"


def transfer(args, cwd, *extra):
    return run([str(ROOT / "transfer.py"), *args, "--workers", "0", "--progress-every-s", "0", *extra], cwd=cwd)


# --- The descriptor --------------------------------------------------------------------------------

def test_the_descriptor_is_the_penultimate_layer_densely_pooled_and_flip_averaged(demo_net):
    fnet = vfeatures.load_feature_net(demo_net, [32])
    model = fnet.net.model.eval()
    net = vfeatures.penultimate(model)
    plain_fc = model.classifier[:5]  # FC1, ReLU, dropout, FC2, ReLU: the last (class) layer dropped
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32) * 50
    big = torch.randn(2, 3, 64, 96) * 50
    with torch.inference_mode():
        plain = plain_fc(torch.flatten(model.features(x), 1))
        # At Q = the crop size and without the flip: the plain forward's penultimate activations.
        torch.testing.assert_close(vfeatures.pooled_descriptors(net, x, flip=False), plain, rtol=1e-4, atol=1e-5)
        mirrored = plain_fc(torch.flatten(model.features(x.flip(-1)), 1))
        torch.testing.assert_close(vfeatures.pooled_descriptors(net, x), (plain + mirrored) / 2, rtol=1e-4, atol=1e-5)
        # Larger images: the plain FC layers at every window of the feature map (2 x 3 here), averaged.
        maps = model.features(big)
        windows = [plain_fc(torch.flatten(maps[..., i:i + 1, j:j + 1], 1)) for i in range(2) for j in range(3)]
        torch.testing.assert_close(vfeatures.pooled_descriptors(net, big, flip=False),
                                   torch.stack(windows).mean(dim=0), rtol=1e-4, atol=1e-5)
    assert plain.shape == (3, FC_WIDTH)
    stacked = combine_scales([plain, plain * 3], "stack")
    averaged = combine_scales([plain, mirrored], "average")
    fused = stack_nets([stacked, averaged])
    assert stacked.shape == (3, 2 * FC_WIDTH) and averaged.shape == (3, FC_WIDTH) and fused.shape == (3, 3 * FC_WIDTH)
    for d in (stacked, averaged, fused):
        torch.testing.assert_close(d.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(averaged, F.normalize(F.normalize(plain, dim=1) + F.normalize(mirrored, dim=1), dim=1))


def test_a_stopped_extraction_goes_on_where_it_stopped(demo_net, sets, tmp_path, monkeypatch):
    """Ctrl-C after four batches: what they made is written (one chunk a scale), the next run extracts only
    the images not done at every scale, and the cache ends up as a run never stopped (batches of 2 against
    5: batching changes nothing)."""
    fnet = vfeatures.load_feature_net(demo_net, [32, 40])
    root = sets / "folders"
    images = open_transfer_set(root).images
    keys = vfeatures.image_keys(root, images)
    monkeypatch.setattr(vfeatures, "FLUSH_IMAGES", 1000)  # only the stop writes what was done
    calls, real_call = [], vfeatures._Extractor.__call__

    def stopping(self, batch):
        calls.append(len(batch))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_call(self, batch)

    how = vfeatures.Extraction(device=torch.device("cpu"), batch_size=2, workers=0, progress=False)
    with monkeypatch.context() as m:
        m.setattr(vfeatures._Extractor, "__call__", stopping)
        with pytest.raises(KeyboardInterrupt):
            vfeatures.extract([fnet], root, images, tmp_path / "cache", how)
    chunks = [torch.load(p, weights_only=True) for p in (tmp_path / "cache").rglob("*.pt")]
    assert sum(len(c["keys"]) for c in chunks) == sum(calls[:4]) > 0
    [counts] = vfeatures.extract([fnet], root, images, tmp_path / "cache", how)
    assert counts["cached"] < len(images) and counts["cached"] + counts["extracted"] == len(images)
    [again] = vfeatures.extract([fnet], root, images, tmp_path / "cache", how)
    assert again == {**again, "extracted": 0, "cached": len(images)}
    how.batch_size = 5
    vfeatures.extract([fnet], root, images, tmp_path / "fresh", how)
    resumed, found = vfeatures.load_descriptors(fnet, tmp_path / "cache", keys, bf16=False)
    fresh, found_fresh = vfeatures.load_descriptors(fnet, tmp_path / "fresh", keys, bf16=False)
    assert found.all() and found_fresh.all() and sorted(resumed) == [32, 40]
    for q in resumed:
        assert resumed[q].shape == (len(images), FC_WIDTH)
        torch.testing.assert_close(resumed[q], fresh[q], rtol=1e-4, atol=1e-5)


# --- Datasets, splits and measures -------------------------------------------------------------------

def test_the_layouts_and_caltech_splits_repeat_from_their_seed(sets):
    folders, voc = open_transfer_set(sets / "folders"), open_transfer_set(sets / "VOC2007")
    assert (folders.kind, len(folders.classes), len(folders.splits)) == ("folders", 4, 1)
    assert (voc.kind, voc.year, voc.multilabel, voc.splits[0].name) == ("voc2007", 2007, True, "trainval/test")
    assert voc.classes == ["bottle", "cat", "motorbike", "person"] and len(voc.splits[0].train) == 24
    assert set(np.unique(voc.splits[0].train_labels)) == {-1, 0, 1}  # "difficult"-only images are 0
    caltech = open_transfer_set(sets / "caltech", splits=3, seed=0, train_per_class=6, test_per_class=3)
    assert caltech.kind == "caltech101" and "BACKGROUND_Google" in caltech.classes and len(caltech.splits) == 3
    again = open_transfer_set(sets / "caltech", splits=3, seed=0, train_per_class=6, test_per_class=3)
    other = open_transfer_set(sets / "caltech", splits=3, seed=1, train_per_class=6, test_per_class=3)
    for a, b in zip(caltech.splits, again.splits):
        assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
    assert not np.array_equal(caltech.splits[0].train, caltech.splits[1].train)
    assert not np.array_equal(caltech.splits[0].train, other.splits[0].train)
    for split in caltech.splits:
        assert not set(split.train) & set(split.test)
        assert np.bincount(split.train_labels).tolist() == [6] * 5 and np.bincount(split.test_labels).tolist() == [3] * 5
        assert all(caltech.images[i].split("/")[0] == caltech.classes[y] for i, y in zip(split.test, split.test_labels))


def test_voc_ap_by_hand_with_a_difficult_image():
    """Ranked: positive, difficult, negative, positive, negative, positive. The difficult image counts as
    nothing: recall 1/3, 1/3, 2/3, 2/3, 1 at precision 1, 1/2, 2/3, 1/2, 3/5."""
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]
    labels = [1, 0, -1, 1, -1, 1]
    # 2010 on: the area under the monotone curve, 1/3 * (1 + 2/3 + 3/5).
    assert voc_ap(scores, labels, 2012) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # VOC-2007: 11 points, t = 0..0.3 -> 1, t = 0.4..0.6 -> 2/3, t = 0.7..1 -> 3/5.
    assert voc_ap(scores, labels, 2007) == pytest.approx((4 * 1 + 3 * 2 / 3 + 4 * 3 / 5) / 11)
    as_negative = voc_ap(scores, [1, -1, -1, 1, -1, 1], 2012)
    assert as_negative == pytest.approx((1 + 2 / 4 + 3 / 6) / 3) and as_negative != voc_ap(scores, labels, 2012)
    assert voc_ap(scores[::-1], labels[::-1], 2012) == pytest.approx(voc_ap(scores, labels, 2012))  # order of input
    for year in (2007, 2012):  # a difficult image ranked first changes nothing either (no 0/0 precision)
        assert voc_ap([1.0, *scores], [0, *labels], year) == pytest.approx(voc_ap(scores, labels, year))


# --- The command line ------------------------------------------------------------------------------

def test_the_command_beats_chance_caches_and_shards_exactly(demo_net, sets, tmp_path):
    """Caltech layout (5 classes, chance 20 % mean class recall): one process with batches of 8; two CPU
    ranks with batches of 3 into another cache (the same descriptors); a second run on the first cache with
    other classifier settings, which runs no image through the net and writes nothing to the cache."""
    common = ["--checkpoint", str(demo_net), "--data", str(sets / "caltech"), "--scales", "32,48",
              "--train-per-class", "6", "--test-per-class", "4", "--device", "cpu"]
    one = transfer([*common, "--cache", str(tmp_path / "c1"), "--out", str(tmp_path / "one"), "--batch-size", "8"],
                   tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = transfer([*common, "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "two"), "--batch-size", "3",
                    "--gpus", "2"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    first = json.loads((tmp_path / "one" / "results.json").read_text())
    [row] = first["rows"]
    assert row["mean"] >= 50.0, row  # chance: 20 %; the demo net after 4 steps gets ~78 %
    assert len(row["splits"]) == 3 and row["dims"] == 2 * FC_WIDTH and row["combine"] == "stack"
    assert first["features"][0]["extracted"] == 50 and first["left_out"] == ["cup/image_0011.jpg"]
    assert "mean class recall" in one.stdout and "Caltech-101" in one.stdout
    assert all((tmp_path / "one" / name).exists() for name in ("results.txt", "results.md", "tensorboard"))
    second = json.loads((tmp_path / "two" / "results.json").read_text())
    assert second["world_size"] == 2 and second["features"][0]["extracted"] == 50
    tset = open_transfer_set(sets / "caltech", train_per_class=6, test_per_class=4)
    keys = vfeatures.image_keys(tset.root, tset.images)
    fnet = vfeatures.load_feature_net(demo_net, [32, 48])
    a, _ = vfeatures.load_descriptors(fnet, tmp_path / "c1", keys, bf16=False)
    b, _ = vfeatures.load_descriptors(fnet, tmp_path / "c2", keys, bf16=False)
    for q in (32, 48):
        torch.testing.assert_close(a[q], b[q], rtol=1e-4, atol=1e-5)
    chunks = sorted((tmp_path / "c1").rglob("*.pt"))
    again = transfer([*common, "--cache", str(tmp_path / "c1"), "--out", str(tmp_path / "again"),
                      "--combine", "average", "--svm-c", "1"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    third = json.loads((tmp_path / "again" / "results.json").read_text())
    assert third["features"][0] == {**third["features"][0], "extracted": 0, "cached": 50}
    assert sorted((tmp_path / "c1").rglob("*.pt")) == chunks
    assert third["rows"][0]["dims"] == FC_WIDTH and {s["C"] for s in third["rows"][0]["splits"]} == {1.0}


def test_bad_input_is_one_line(demo_net, sets, tmp_path, capsys):
    voc = tmp_path / "VOC2007"
    shutil.copytree(sets / "VOC2007", voc)
    (voc / "ImageSets" / "Main" / "cat_test.txt").unlink()
    imagenet = tmp_path / "imagenet"  # ImageNet's layout (train/, val/) is none of Appendix B's
    shutil.copytree(sets / "folders" / "train", imagenet / "train")
    shutil.copytree(sets / "folders" / "test", imagenet / "val")
    not_a_file = tmp_path / "file"
    not_a_file.write_text("x")
    from vgg.core.checkpoint import save_checkpoint
    from vgg.data.datasets.stats import IMAGENET_STATS
    from vgg.models.zoo import build_net

    lenet = build_net("lenet5", 4, image_size=32)
    other_kind = tmp_path / "lenet.pt"
    save_checkpoint(other_kind, model=lenet.state_dict(), arch=lenet.arch_kwargs(), classes=list("abcd"),
                    stats=IMAGENET_STATS.to_dict(), config={})
    net = ["--checkpoint", str(demo_net), "--scales", "32", "--out", str(tmp_path / "out")]
    cases = [
        ([*net, "--data", str(imagenet)], "none of the layouts"),
        ([*net, "--data", str(voc)], "cat_test.txt missing"),
        ([*net, "--data", str(sets / "caltech")], "too few images per class"),
        (["--checkpoint", str(other_kind), "--scales", "32", "--data", str(sets / "folders")], "lenet5"),
        ([*net, "--data", str(sets / "folders"), "--cache", str(not_a_file / "cache")], "--cache"),
    ]
    # The first as a real process (exit 2, no traceback); the others through the same main(), in this one.
    assert_one_line_error(transfer(cases[0][0], tmp_path), cases[0][1])
    for args, fragment in cases[1:]:
        assert transfer_cli.main([*args, "--workers", "0"]) == 2
        assert_one_line_error(subprocess.CompletedProcess([], 2, "", capsys.readouterr().err), fragment)
