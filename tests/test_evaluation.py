"""Dense and multi-crop evaluation (paper §3.2, §4): crops, scales, fusion, top-k error, exact counting."""

import re
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vgg.core.checkpoint import save_checkpoint
from vgg.core.errors import UserError
from vgg.data.datasets.folders import ImageFolder
from vgg.data.datasets.stats import IMAGENET_STATS
from vgg.evaluation.inputs import DenseBuckets
from vgg.evaluation.methods import (
    BOTH,
    DENSE,
    MULTI_CROP,
    crop_grid_positions,
    dense_probs,
    eval_scales,
    fuse,
    multi_crop_probs,
    multi_crops,
    topk_errors,
)
from vgg.evaluation.nets import load_eval_net
from vgg.evaluation.report import format_table, write_results
from vgg.evaluation.runner import evaluate_dataset
from vgg.models.vgg import build_vgg, to_dense

CROP = 32  # the tiny test nets' input size (full-size nets: 224)


def tiny_net(num_classes: int, width: float = 1 / 16) -> nn.Module:
    torch.manual_seed(0)
    return build_vgg("A", num_classes=num_classes, width=width, fc_width=32, image_size=CROP, init="xavier").eval()


def write_tiny_checkpoint(path, classes, *, data="", scale_min=36, scale_max=48, model=None):
    model = model if model is not None else tiny_net(len(classes))
    config = {"arch": "A", "crop_size": CROP, "scale_min": scale_min, "scale_max": scale_max, "data": str(data),
              "run_name": "tiny"}
    save_checkpoint(path, model=model.state_dict(), arch=model.arch_kwargs(), epoch=1, step=0, config=config,
                    stats=IMAGENET_STATS.to_dict(), classes=list(classes), best_top1=0.0)
    return path


@pytest.fixture(scope="module")
def val_dir(sample_root, tmp_path_factory):
    """A small copy of the sample validation set: two photos a class plus every awkward file (CMYK,
    grayscale, PNG named .JPEG, truncated, empty), so the tests stay fast on 2 cores."""
    root = tmp_path_factory.mktemp("small") / "val"
    for folder in sorted(p for p in (sample_root / "val").iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True)
        files = sorted(folder.iterdir())
        for f in [f for f in files if "awkward" not in f.name][:2] + [f for f in files if "awkward" in f.name]:
            shutil.copy(f, root / folder.name / f.name)
    return root


@pytest.fixture(scope="module")
def classes(val_dir):
    return ImageFolder(val_dir, transform=None).classes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, classes, sample_root):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("run") / "tiny" / "best.pt", classes, data=sample_root)


def evaluate(nets, val_dir, **kwargs):
    kwargs = {"methods": (DENSE,), "batch_size": 8, "workers": 0, "progress": False, **kwargs}
    return evaluate_dataset(nets, val_dir, **kwargs)


# --- Scales ------------------------------------------------------------------------------------

def test_eval_scales_follow_the_training_scale():
    assert eval_scales(256, 256, 224) == [224, 256, 288]  # Table 4, fixed S
    assert eval_scales(384, 384, 224) == [352, 384, 416]
    assert eval_scales(256, 512, 224) == [256, 384, 512]  # Table 4, jittered S
    assert eval_scales(256, 256, 224, single_scale=True) == [256]  # Table 3
    assert eval_scales(256, 512, 224, single_scale=True) == [384]
    # Scaled-down nets: Q below the crop size is raised to it, duplicates dropped.
    assert eval_scales(36, 36, 32) == [32, 36, 68]
    assert eval_scales(32, 32, 32) == [32, 64]


# --- Multi-crop --------------------------------------------------------------------------------

def test_crop_grid_is_5x5_from_edge_to_edge():
    positions = crop_grid_positions(256, 320, 224)
    assert len(positions) == 25
    assert sorted({t for t, _ in positions}) == [0, 8, 16, 24, 32]
    assert sorted({l for _, l in positions}) == [0, 24, 48, 72, 96]
    assert positions[0] == (0, 0) and positions[-1] == (32, 96) and positions[1] == (0, 24)
    assert crop_grid_positions(224, 224, 224) == [(0, 0)] * 25
    with pytest.raises(UserError, match="smaller than"):
        crop_grid_positions(200, 300, 224)


class Recorder(nn.Module):
    """Stand-in net: remembers every crop it sees and scores it by its top-left pixel."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.num_classes, self.seen = num_classes, []

    def forward(self, x):
        self.seen.append(x.clone())
        return x[:, 0, 0, 0:1].repeat(1, self.num_classes) * torch.arange(self.num_classes) / 100


def coded_image(h, w):
    """Channel 0 holds the row index, channel 1 the column index: a crop tells where it came from."""
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    return torch.stack([rows, cols, torch.zeros(h, w)])


def test_multi_crop_makes_150_crops_over_3_scales_at_the_grid_positions():
    recorder = Recorder()
    sizes = [(224, 298), (256, 341), (288, 384)]  # a 3:4 image at Q = 224, 256, 288
    for h, w in sizes:
        probs = multi_crop_probs(recorder, [coded_image(h, w)], 224, max_batch=16)
        assert probs.shape == (1, 4)
        torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    crops = torch.cat(recorder.seen)
    assert crops.shape == (150, 3, 224, 224)
    for s, (h, w) in enumerate(sizes):
        per_scale = crops[s * 50:(s + 1) * 50]
        plain, flipped = per_scale[:25], per_scale[25:]
        found = [(int(c[0, 0, 0]), int(c[1, 0, 0])) for c in plain]
        assert found == crop_grid_positions(h, w, 224)
        assert torch.equal(flipped, plain.flip(-1))  # the mirror images of the same 25 crops
        assert [int(c[1, 0, -1]) for c in flipped] == [left for _, left in found]
    # The soft-max (not the logits) is averaged over the 50 crops.
    recorder.seen.clear()
    image = coded_image(256, 341)
    expected = F.softmax(Recorder()(multi_crops(image, 224)), dim=1).mean(0)
    torch.testing.assert_close(multi_crop_probs(recorder, [image], 224)[0], expected)


def test_multi_crop_batches_several_images_of_different_sizes():
    recorder = Recorder()
    images = [coded_image(224, 300), coded_image(240, 224)]
    together = multi_crop_probs(recorder, images, 224, max_batch=30)
    alone = torch.cat([multi_crop_probs(recorder, [im], 224) for im in images])
    torch.testing.assert_close(together, alone)


def test_evaluate_dataset_runs_50_crops_per_image_and_scale(checkpoint, val_dir):
    net = load_eval_net(checkpoint)
    assert net.scales == [36, 42, 48] and net.crop_size == CROP
    crops = []
    net.model.register_forward_hook(lambda module, inputs, output: crops.append(inputs[0].shape))
    result = evaluate([net], val_dir, methods=(MULTI_CROP,))
    assert all(shape[1:] == (3, CROP, CROP) for shape in crops)
    assert sum(shape[0] for shape in crops) == 150 * result["images"]


# --- Dense ----------------------------------------------------------------------------------------

def test_dense_at_the_crop_size_without_flip_equals_the_plain_forward():
    model = tiny_net(7)
    dense = to_dense(model).eval()
    x = torch.randn(3, 3, CROP, CROP) * 50
    with torch.inference_mode():
        plain = F.softmax(model(x), dim=1)
        torch.testing.assert_close(dense_probs(dense, x, flip=False), plain, rtol=1e-4, atol=1e-6)
        flipped = F.softmax(model(x.flip(-1)), dim=1)
        torch.testing.assert_close(dense_probs(dense, x), (plain + flipped) / 2, rtol=1e-4, atol=1e-6)


def test_dense_averages_the_score_map_over_space_then_the_soft_max_over_flips():
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 4, kernel_size=(1, 2))  # stand-in class score map that a mirror image changes
    x = torch.randn(2, 3, 5, 7) * 3
    with torch.inference_mode():
        expected = (F.softmax(dense(x).mean(dim=(2, 3)), dim=1) +
                    F.softmax(dense(x.flip(-1)).mean(dim=(2, 3)), dim=1)) / 2
        torch.testing.assert_close(dense_probs(dense, x), expected)


def test_dense_batch_equals_one_image_at_a_time():
    dense = to_dense(tiny_net(5)).eval()
    x = torch.randn(4, 3, 48, 80) * 50
    with torch.inference_mode():
        alone = torch.cat([dense_probs(dense, x[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(dense_probs(dense, x), alone, rtol=1e-4, atol=1e-6)


def test_dense_buckets_batch_only_equal_sizes_and_release_every_image_once():
    buckets = DenseBuckets()
    sizes = [(36, 48), (48, 36), (36, 48), (36, 36), (36, 48), (48, 36), (36, 48)]
    released = []
    for pos, (h, w) in enumerate(sizes):
        buckets.add((min(h, w), h, w), pos, torch.full((3, h, w), pos, dtype=torch.uint8))
        for key, positions, batch in buckets.pop_full(batch_size=2, limit=100):
            assert len(positions) == 2
            released.append((key, positions, batch))
    for key, positions, batch in buckets.pop_all():
        released.append((key, positions, batch))
    for key, positions, batch in released:
        assert batch.shape[2:] == key[1:]
        assert [int(b[0, 0, 0]) for b in batch] == positions.tolist()  # images stay with their positions
    assert sorted(p for _, positions, _ in released for p in positions.tolist()) == list(range(len(sizes)))
    # Past the memory limit every waiting image is released, full batch or not.
    buckets.add((36, 36, 40), 0, torch.zeros(3, 36, 40, dtype=torch.uint8))
    buckets.add((36, 40, 36), 1, torch.zeros(3, 40, 36, dtype=torch.uint8))
    assert len(list(buckets.pop_full(batch_size=8, limit=1))) == 2 and not buckets.pending


# --- Metrics and fusion ------------------------------------------------------------------------

def test_topk_errors_on_hand_made_scores():
    scores = torch.tensor([
        [9.0, 1, 2, 3, 4, 5],  # label 0 is first: top-1 and top-5 hit
        [5.0, 3, 9, 8, 1, 0],  # label 1 is third: top-5 hit only
        [5.0, 4, 0, 3, 2, 1],  # label 2 is last (sixth): miss
        [9.0, 8, 7, 6, 0, 5],  # label 5 is fifth: top-5 hit only
    ])
    labels = torch.tensor([0, 1, 2, 5])
    assert topk_errors(scores, labels) == {1: 75.0, 5: 25.0}
    assert topk_errors(scores, labels, ks=(1, 2, 6)) == {1: 75.0, 2: 75.0, 6: 0.0}
    assert topk_errors(F.softmax(scores, dim=1), labels) == {1: 75.0, 5: 25.0}  # same ranking


def test_fusing_a_net_with_itself_changes_nothing(checkpoint, val_dir):
    p = F.softmax(torch.randn(10, 6), dim=1)
    torch.testing.assert_close(fuse([p, p]), p)
    torch.testing.assert_close(fuse([p, p.flip(0)]), (p + p.flip(0)) / 2)

    nets = [load_eval_net(checkpoint, single_scale=True), load_eval_net(checkpoint, single_scale=True)]
    result = evaluate(nets, val_dir, methods=(DENSE, MULTI_CROP))
    rows = result["rows"]
    assert [r["method"] for r in rows] == [DENSE, MULTI_CROP, BOTH] * 3
    assert rows[6]["net"].startswith("fusion:")
    for single, fused in zip(rows[:3], rows[6:]):
        assert (fused["top1_err"], fused["top5_err"]) == (single["top1_err"], single["top5_err"])
        assert fused["per_class_top1_acc"] == single["per_class_top1_acc"]


# --- Whole-set evaluation: exact counting, skips, bad input ------------------------------------

def test_shards_add_up_to_the_whole_set_exactly(checkpoint, val_dir):
    """Three ranks' shards (evaluated separately here) count every image once, as one process does."""
    net = load_eval_net(checkpoint, single_scale=True)
    whole = evaluate([net], val_dir)
    shards = [evaluate([net], val_dir, rank=r, world_size=3) for r in range(3)]
    assert sum(s["images"] for s in shards) == whole["images"] > 0
    counts = torch.tensor([s["class_images"] for s in shards]).sum(0)
    assert counts.tolist() == whole["class_images"]

    def hits(result, key):
        acc = torch.tensor([a or 0.0 for a in result["rows"][0][key]], dtype=torch.float64)
        return (acc * torch.tensor(result["class_images"]) / 100).round()

    for key in ("per_class_top1_acc", "per_class_top5_acc"):
        torch.testing.assert_close(sum(hits(s, key) for s in shards), hits(whole, key))


def test_unreadable_images_are_counted_as_skipped_not_scored(checkpoint, val_dir, tmp_path):
    copy = tmp_path / "val"
    shutil.copytree(val_dir, copy)
    net = load_eval_net(checkpoint, single_scale=True)
    before = evaluate([net], copy)
    assert before["skipped"] > 0  # the sample set's truncated and empty files
    first_class = sorted(p for p in copy.iterdir() if p.is_dir())[0]
    (first_class / "zz_broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    after = evaluate([net], copy, methods=(DENSE, MULTI_CROP))
    assert after["skipped"] == before["skipped"] + 1
    assert after["images"] == before["images"]
    assert after["class_images"] == before["class_images"]
    shards = [evaluate([net], copy, rank=r, world_size=3) for r in range(3)]
    assert sum(s["skipped"] for s in shards) == after["skipped"]
    assert sum(s["images"] for s in shards) == after["images"]


def test_bad_checkpoints_and_data_fail_with_one_clear_message(checkpoint, classes, val_dir, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_eval_net(tmp_path / "nope.pt")
    other = write_tiny_checkpoint(tmp_path / "other" / "best.pt", classes[:-1] + ["n99999999"])
    with pytest.raises(UserError, match="classes"):
        evaluate([load_eval_net(other)], val_dir)
    # Weights of a wider net under the name of a narrower one.
    wrong = tmp_path / "wrong" / "best.pt"
    wide = tiny_net(len(classes), width=1 / 8)
    save_checkpoint(wrong, model=wide.state_dict(), arch=tiny_net(len(classes)).arch_kwargs(),
                    config={"scale_min": 36, "scale_max": 36}, stats=IMAGENET_STATS.to_dict(), classes=classes)
    with pytest.raises(UserError, match="do not fit"):
        load_eval_net(wrong)
    with pytest.raises(UserError, match="below the net's crop size"):
        load_eval_net(checkpoint, scales=[16, 40])
    with pytest.raises(UserError, match="not found"):
        evaluate([load_eval_net(checkpoint)], tmp_path / "no_val")


def test_results_table_and_files(checkpoint, val_dir, tmp_path):
    result = evaluate([load_eval_net(checkpoint)], val_dir, methods=(DENSE, MULTI_CROP))
    text = format_table(result["rows"])
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["net", "train", "S", "test"] and len(lines) == 2 + 3
    assert "[36;48]" in lines[2] and "36,42,48" in lines[2] and BOTH in lines[4]
    json_path, md_path = write_results(result, tmp_path / "eval" / "run1")
    assert json_path.name == "run1.json" and md_path.name == "run1.md"
    assert md_path.read_text().count("\n| ") >= 4
    import json
    saved = json.loads(json_path.read_text())
    assert len(saved["rows"][0]["per_class_top1_acc"]) == len(saved["classes"])
    assert saved["images"] + saved["skipped"] == len(ImageFolder(val_dir, transform=None).samples)


# --- Protocol details a user relies on (issue 18's mutation audit) ----------------------------------

def exactly(text):
    """A UserError's whole message, as one line."""
    return "^" + re.escape(text) + "$"


def test_test_scales_are_whole_pixels_even_for_an_odd_jitter_range():
    for scales in (eval_scales(256, 513, 224), eval_scales(256, 513, 224, single_scale=True),
                   eval_scales(255, 255, 224)):
        assert all(type(q) is int for q in scales)
    assert eval_scales(256, 513, 224) == [256, 384, 513]
    assert eval_scales(256, 513, 224, single_scale=True) == [384]


def test_crop_grid_rounds_its_spacing_and_centres_a_single_crop():
    assert [t for t, _ in crop_grid_positions(227, 224, 224)[::5]] == [0, 1, 2, 2, 3]  # 3/4 apart, rounded
    assert crop_grid_positions(41, 36, 32, n=1) == [(4, 2)]
    assert crop_grid_positions(34, 33, 32, n=2) == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert all(type(v) is int for pos in crop_grid_positions(41, 36, 32, n=1) for v in pos)
    assert len(multi_crops(torch.zeros(3, 40, 40), 32, n=2, flip=False)) == 4
    assert len(multi_crops(torch.zeros(3, 40, 40), 32)) == 50  # 5x5 and their flips by default
    for h, w in ((223, 300), (300, 223)):
        with pytest.raises(UserError, match=exactly(f"image {h}x{w} is smaller than the 224x224 crop: "
                                                    "test scales must be >= 224")):
            crop_grid_positions(h, w, 224)
    with pytest.raises(UserError, match=exactly("the crop grid needs n >= 1, got 0")):
        crop_grid_positions(40, 40, 32, n=0)


class Bf16Logits(nn.Module):
    """Stand-in for a net under CUDA's bf16 autocast: bf16 logits (a class score map for 4-d inputs)."""

    def forward(self, x):
        scores = x[:, :4] * torch.tensor([1.0, 1.01, 1.02, 1.03]).view(1, 4, 1, 1)
        return (scores if x.shape[-1] > 32 else scores[:, :, 0, 0]).to(torch.bfloat16)


def test_soft_max_is_taken_in_float32_even_from_bf16_scores():
    torch.manual_seed(0)
    images = torch.rand(2, 4, 36, 40) * 3
    for probs in (dense_probs(Bf16Logits(), images), multi_crop_probs(Bf16Logits(), list(images), 32)):
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(2), rtol=0, atol=1e-6)


def test_load_eval_net_reads_how_the_net_was_trained(checkpoint, classes, tmp_path):
    net = load_eval_net(checkpoint.parent)  # a run folder means its best.pt
    assert net.path == checkpoint and not net.model.training
    assert (net.name, net.classes, net.crop_size, net.scale_min, net.scale_max, net.scales, net.train_s) == (
        "A (tiny)", classes, CROP, 36, 48, [36, 42, 48], "[36;48]")
    assert net.mean_rgb == list(IMAGENET_STATS.mean_rgb) and net.config["run_name"] == "tiny"
    assert load_eval_net(checkpoint, single_scale=True).scales == [42]
    given = load_eval_net(checkpoint, scales=[48, 32, 48])  # Q = the crop size is allowed
    assert (given.scales, given.scale_min, given.scale_max) == ([32, 48], 36, 48)
    with pytest.raises(UserError, match=exactly("--scales 16, 31 below the net's crop size 32: every Q must be >= 32")):
        load_eval_net(checkpoint, scales=[16, 40, 31])
    # Fixed S (only scale_min recorded), a run named after its net, no run name (the folder's).
    fixed = write_tiny_checkpoint(tmp_path / "fixed" / "best.pt", classes, scale_max=None)
    state = torch.load(fixed, weights_only=True)
    del state["config"]["scale_max"]
    state["config"]["run_name"] = "A"
    torch.save(state, fixed)
    net = load_eval_net(fixed)
    assert (net.name, net.scale_min, net.scale_max, net.scales, net.train_s) == ("A", 36, 36, [32, 36, 68], "36")
    del state["config"]["run_name"]
    torch.save(state, fixed)
    assert load_eval_net(fixed).name == "A (fixed)"


def test_a_checkpoint_without_its_training_scale_needs_scales(classes, tmp_path):
    path = write_tiny_checkpoint(tmp_path / "noscale" / "best.pt", classes)
    state = torch.load(path, weights_only=True)
    for config in ({"run_name": "x"}, None):
        if config is None:
            del state["config"]
        else:
            state["config"] = config
        torch.save(state, path)
        with pytest.raises(UserError, match=exactly(f"{path} does not record its training scale "
                                                    "(config 'scale_min'): pass --scales")):
            load_eval_net(path)
        net = load_eval_net(path, scales=[40])
        assert (net.scales, net.scale_min, net.scale_max) == ([40], 0, 0)


def test_result_names_the_set_the_methods_and_the_nets(checkpoint, val_dir):
    net = load_eval_net(checkpoint, single_scale=True)
    result = evaluate([net], val_dir, methods=(MULTI_CROP, DENSE))
    assert result["methods"] == [DENSE, MULTI_CROP]  # in the paper's order, whatever the order asked
    assert (result["val_dir"], result["world_size"]) == (str(val_dir), 1)
    assert result["nets"] == [{"name": "A (tiny)", "checkpoint": str(checkpoint), "train_s": "[36;48]",
                               "test_q": [42]}]
    assert [row["images"] for row in result["rows"]] == [result["images"]] * 3
    assert result["images"] == sum(result["class_images"]) and result["images"] > 0
    with pytest.raises(UserError, match=exactly(f"validation folder {val_dir / 'nope'} not found: --data must be "
                                                "a root holding val/<wnid>/*")):
        evaluate([net], val_dir / "nope")


def test_a_class_without_readable_images_has_no_accuracy(checkpoint, val_dir, tmp_path):
    copy = tmp_path / "val"
    shutil.copytree(val_dir, copy)
    folders = sorted(p for p in copy.iterdir() if p.is_dir())
    for f in folders[1].iterdir():
        f.unlink()
    (folders[1] / "broken.JPEG").write_bytes(b"not a jpeg")
    result = evaluate([load_eval_net(checkpoint, single_scale=True)], copy)
    assert result["class_images"][1] == 0 and result["class_images"][0] > 0
    for key in ("per_class_top1_acc", "per_class_top5_acc"):
        accuracy = result["rows"][0][key]
        assert accuracy[1] is None and all(a is not None for i, a in enumerate(accuracy) if i != 1)
