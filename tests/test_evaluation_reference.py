"""vgg/evaluation/ against a hand-written reference (paper §3.2, §4.2, §4.3, Tables 3-6).

Two tiny nets with random (so not mirror-symmetric) weights, trained at different scales and with
different mean colours, are evaluated on real JPEG files with dense, multi-crop, both, and fused.
The reference below does, one image at a time and in the plainest way, what the paper says: rescale
the image to each test scale Q, subtract the net's mean RGB, then

    dense       the fully-convolutional net on the whole image, class scores averaged over space,
                soft-max; the same for the mirrored image; the two soft-max averaged;
    multi-crop  a 5x5 grid of crops from edge to edge and their mirror images, soft-max averaged;

then the soft-max averaged over the net's scales, over both methods, and over the two nets.
"""

import dataclasses
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import evaluate_catching_probs
from PIL import Image
from skimage import data as skdata

from vgg.core.checkpoint import load_checkpoint, save_checkpoint
from vgg.core.errors import UserError
from vgg.data.batches.transforms import EvalTransform
from vgg.data.datasets.folders import ImageFolder
from vgg.evaluation import inputs as vinputs
from vgg.evaluation import methods as vmethods
from vgg.evaluation import runner as vrunner
from vgg.evaluation.methods import BOTH, DENSE, MULTI_CROP
from vgg.evaluation.nets import load_eval_net
from vgg.evaluation.runner import evaluate_dataset
from vgg.models.checkpoint import build_model_from_checkpoint
from vgg.models.vgg import build_vgg, to_dense

CROP = 32
CLASSES = [f"n0{i}" for i in range(6)]
# (width, height) of each class's images: landscape, portrait, square, and a repeated size so the
# dense pass batches images together.
SIZES = [[(60, 45), (45, 60)], [(50, 50), (60, 45)], [(80, 40), (40, 70)], [(64, 48), (60, 45)],
         [(45, 60), (70, 52)], [(52, 52), (99, 41)]]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina"]
# Net 1: jittered S in [36, 48] -> Q 36, 42, 48; net 2: fixed S = 40 -> Q 32 (raised from 8), 40, 72.
NETS = [dict(seed=1, scale_min=36, scale_max=48, scales=[36, 42, 48], mean=(150.0, 60.0, 20.0)),
        dict(seed=2, scale_min=40, scale_max=40, scales=[32, 40, 72], mean=(30.0, 90.0, 170.0))]


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref") / "val"
    for wnid, photo, sizes in zip(CLASSES, PHOTOS, SIZES):
        (root / wnid).mkdir(parents=True)
        for i, size in enumerate(sizes):
            array = getattr(skdata, photo)()
            array = np.stack([array] * 3, -1) if array.ndim == 2 else array[..., :3]
            Image.fromarray(array).resize(size, Image.Resampling.BILINEAR).save(root / wnid / f"{i}.JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = []
    for i, spec in enumerate(NETS):
        torch.manual_seed(spec["seed"])
        model = build_vgg("A", num_classes=len(CLASSES), width=1 / 16, fc_width=32, image_size=CROP, init="xavier")
        path = tmp_path_factory.mktemp(f"net{i}") / f"net{i}" / "best.pt"
        config = {"arch": "A", "crop_size": CROP, "scale_min": spec["scale_min"], "scale_max": spec["scale_max"],
                  "run_name": f"net{i}"}
        stats = {"mean_rgb": list(spec["mean"]), "eigval": [0.2, 0.02, 0.004],
                 "eigvec": [[0.6, 0.7, 0.4], [0.6, 0.0, -0.8], [0.6, -0.7, 0.4]]}
        save_checkpoint(path, model=model.state_dict(), arch=model.arch_kwargs(), epoch=1, step=0, config=config,
                        stats=stats, classes=CLASSES, best_top1=0.0)
        paths.append(path)
    return paths


@pytest.fixture
def nets(checkpoints):
    """Loaded for each test: mutmut credits what a fixture runs to the first test that used it."""
    return [load_eval_net(path) for path in checkpoints]


def rescaled(path, q: int) -> torch.Tensor:
    with Image.open(path) as image:
        return EvalTransform(scale=q)(image)


def grid(size: int) -> list[int]:
    """5 crop offsets along one side: the first at 0, the last at size - CROP, evenly spread."""
    return [round(i * (size - CROP) / 4) for i in range(5)]


@torch.no_grad()
def reference_probs(model, mean, scales, path) -> dict[str, torch.Tensor]:
    """The paper's dense and multi-crop soft-max for one image file, averaged over `scales`."""
    model = model.eval()
    dense = to_dense(model).eval()
    mean = torch.tensor(mean).view(3, 1, 1)
    per_scale = {DENSE: [], MULTI_CROP: []}
    for q in scales:
        x = rescaled(path, q).float() - mean  # R, G, B minus the net's mean R, G, B
        plain = F.softmax(dense(x[None]).mean(dim=(2, 3)), dim=1)[0]
        mirrored = F.softmax(dense(x.flip(-1)[None]).mean(dim=(2, 3)), dim=1)[0]
        per_scale[DENSE].append((plain + mirrored) / 2)
        crops = [x[:, top:top + CROP, left:left + CROP] for top in grid(x.shape[1]) for left in grid(x.shape[2])]
        crops += [c.flip(-1) for c in crops]
        assert len(crops) == 50
        per_scale[MULTI_CROP].append(F.softmax(model(torch.stack(crops)), dim=1).mean(dim=0))
    return {m: torch.stack(p).mean(dim=0) for m, p in per_scale.items()}, per_scale


@pytest.fixture
def evaluated(nets, val_dir, monkeypatch):
    """evaluate_dataset's result, with the soft-max of every row (caught on their way to the table).

    Run again for each test (about a second): mutmut only runs, against a mutant, the tests during
    which the mutated function ran, and a module-scoped fixture runs during the first test alone.
    """
    return evaluate_catching_probs(nets, val_dir, monkeypatch, batch_size=2, workers=0, bf16=False,
                                   channels_last=False)


@pytest.fixture(scope="module")
def reference(checkpoints, val_dir):
    samples = ImageFolder(val_dir).samples
    per_net, per_scale = [], []
    for path, spec in zip(checkpoints, NETS):
        model = build_model_from_checkpoint(load_checkpoint(path))
        results = [reference_probs(model, spec["mean"], spec["scales"], image) for image, _ in samples]
        per_net.append({m: torch.stack([r[0][m] for r in results]) for m in (DENSE, MULTI_CROP)})
        per_scale.append([r[1] for r in results])
    for probs in per_net:
        probs[BOTH] = (probs[DENSE] + probs[MULTI_CROP]) / 2
    fused = {m: (per_net[0][m] + per_net[1][m]) / 2 for m in (DENSE, MULTI_CROP, BOTH)}
    labels = torch.tensor([label for _, label in samples])
    return per_net, fused, labels, per_scale


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_the_reference_can_tell_the_mistakes_apart(nets, reference):
    """The test's own power: mirror images, scales, methods and nets all give different soft-max."""
    per_net, _, _, per_scale = reference
    assert [net.scales for net in nets] == [spec["scales"] for spec in NETS]
    assert (per_net[0][DENSE] - per_net[1][DENSE]).abs().max() > 1e-3
    assert (per_net[0][DENSE] - per_net[0][MULTI_CROP]).abs().max() > 1e-3
    for scales in per_scale[0]:
        assert (scales[DENSE][0] - scales[DENSE][-1]).abs().max() > 1e-4
    image = torch.rand(3, 40, 56) * 255 - 100
    dense = to_dense(nets[0].model).eval()
    with torch.no_grad():
        assert (dense(image[None]).mean(dim=(2, 3)) - dense(image.flip(-1)[None]).mean(dim=(2, 3))).abs().max() > 1e-3


def test_dense_matches_the_reference(evaluated, reference):
    """Mean subtracted in RGB order, each scale on its own rescaled image, the mirror image included."""
    for net_i in range(2):
        close(evaluated[1][3 * net_i], reference[0][net_i][DENSE])


def test_multi_crop_matches_the_reference(evaluated, reference):
    """25 grid crops from edge to edge and their 25 mirror images per scale, soft-max averaged."""
    for net_i in range(2):
        close(evaluated[1][3 * net_i + 1], reference[0][net_i][MULTI_CROP])


def test_multi_crop_and_dense_averages_the_two_methods(evaluated, reference):
    for net_i in range(2):
        close(evaluated[1][3 * net_i + 2], reference[0][net_i][BOTH])


def test_fusion_averages_the_two_different_nets(evaluated, reference):
    for method_i, method in enumerate([DENSE, MULTI_CROP, BOTH]):
        close(evaluated[1][6 + method_i], reference[1][method])


def test_rows_in_the_papers_order_name_their_nets_and_scales(evaluated, nets):
    result, caught = evaluated
    rows = result["rows"]
    assert [row["method"] for row in rows] == [DENSE, MULTI_CROP, BOTH] * 3 and len(caught) == 9
    for i, net in enumerate(nets):
        for row in rows[3 * i:3 * i + 3]:
            assert (row["net"], row["checkpoint"], row["train_s"], row["test_q"]) == (
                f"A (net{i})", str(net.path), ["[36;48]", "40"][i], ["36,42,48", "32,40,72"][i])
    for row in rows[6:]:
        assert (row["net"], row["checkpoint"], row["train_s"], row["test_q"]) == (
            "fusion: A (net0) + A (net1)", "", "-", "-")
    assert result["class_images"] == [2] * len(CLASSES) and result["classes"] == CLASSES


def test_errors_and_per_class_accuracy_are_those_of_the_reference_soft_max(evaluated, reference):
    result, _ = evaluated
    per_net, fused, labels, _ = reference
    expected = [p[m] for p in per_net for m in (DENSE, MULTI_CROP, BOTH)] + [fused[m] for m in (DENSE, MULTI_CROP, BOTH)]
    for row, probs in zip(result["rows"], expected):
        top1 = probs.argmax(dim=1) == labels
        top5 = (probs.topk(5, dim=1).indices == labels[:, None]).any(dim=1)
        assert row["top1_err"] == pytest.approx(100 * (1 - top1.double().mean().item())), row["method"]
        assert row["top5_err"] == pytest.approx(100 * (1 - top5.double().mean().item())), row["method"]
        assert row["images"] == len(labels)
        for key, hits in (("per_class_top1_acc", top1), ("per_class_top5_acc", top5)):
            per_class = [100.0 * hits[labels == c].double().mean().item() for c in range(len(CLASSES))]
            assert row[key] == pytest.approx(per_class), (row["method"], key)


def test_the_channels_last_path_runs_on_the_cpu_too(nets, val_dir):
    """CUDA's channels-last path (net, dense net, batches) gives the soft-max of the plain path."""
    paths = [path for path, _ in ImageFolder(val_dir).samples[:4]]
    images = [rescaled(path, 40) for path in paths]
    same_size = torch.stack([image for image in images if image.shape == (3, 40, 53)])  # the two 60x45 photos
    assert len(same_size) == 2
    plain = vrunner._NetRunner(nets[1], torch.device("cpu"), channels_last=False)
    both = (vmethods.DENSE, vmethods.MULTI_CROP)
    with torch.no_grad():
        expected = plain.evaluate(same_size, both)
    seen = []
    fast = vrunner._NetRunner(load_eval_net(nets[1].path), torch.device("cpu"), channels_last=True)
    for model in (fast.model, fast.dense_model):
        model.register_forward_pre_hook(
            lambda module, inputs: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        got = fast.evaluate(same_size, both)
    for method in both:
        close(got[method], expected[method])
    assert seen and all(seen)
    assert fast.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.dense_model.features[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_on_the_cpu_the_nets_stay_in_their_plain_layout(nets, val_dir):
    """channels_last=True only applies on CUDA: on the CPU the net's weights keep their layout."""
    net = load_eval_net(nets[0].path, single_scale=True)
    evaluate_dataset([net], val_dir, methods=(DENSE,), workers=0, channels_last=True, progress=False)
    assert all(p.is_contiguous() for p in net.model.parameters())


def test_bad_calls_fail_with_one_clear_line(nets, val_dir):
    with pytest.raises(UserError, match=r"^no evaluation method given; allowed: dense, multi-crop$"):
        evaluate_dataset(nets, val_dir, methods=(), workers=0, progress=False)
    with pytest.raises(UserError, match=r"^no net to evaluate$"):
        evaluate_dataset([], val_dir, workers=0, progress=False)
    renamed = dataclasses.replace(nets[0], classes=CLASSES[:3] + ["n99"] + CLASSES[4:])
    with pytest.raises(UserError, match=r"was trained on 6 classes, .* has 6 \(class 3 is 'n99' in the checkpoint, "
                                        r"'n03' in the folder\): they must be the same$"):
        evaluate_dataset([renamed], val_dir, workers=0, progress=False)
    with pytest.raises(UserError, match=r"was trained on 5 classes, .* has 6: they must be the same$"):
        evaluate_dataset([dataclasses.replace(nets[0], classes=CLASSES[:5])], val_dir, workers=0, progress=False)


def test_progress_bar_by_default(nets, val_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: a tqdm bar on stderr
    evaluate_dataset([load_eval_net(nets[1].path, single_scale=True)], val_dir, workers=0)
    assert "evaluate" in capsys.readouterr().err


def test_a_full_dense_batch_leaves_as_soon_as_it_is_full():
    buckets = vinputs.DenseBuckets()
    for pos in range(2):
        buckets.add((36, 36, 48), pos, torch.full((3, 36, 48), pos, dtype=torch.uint8))
    released = list(buckets.pop_full(batch_size=2, limit=100))
    assert [positions.tolist() for _, positions, _ in released] == [[0, 1]] and not buckets.pending
    assert released[0][2].shape == (2, 3, 36, 48)
