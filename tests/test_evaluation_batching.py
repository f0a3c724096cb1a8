"""The evaluator's batching (issue 16): one tensor a batch from the loader workers, scaled images grouped
by size into full batches across the whole set, each file decoded once, and results equal to the
plain per-image path (`dense_probs` / `multi_crop_probs` on each image) on real JPEG files."""

import collections
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import evaluate_catching_probs
from PIL import Image, ImageFile
from skimage import data as skdata

from vgg.core.checkpoint import save_checkpoint
from vgg.data.batches.transforms import normalize
from vgg.data.datasets.folders import ImageFolder
from vgg.evaluation import inputs as vinputs
from vgg.evaluation import methods as vmethods
from vgg.evaluation import runner as vrunner
from vgg.evaluation.inputs import MultiScaleTransform, PackedImages, ShardDataset, collate_shard
from vgg.evaluation.methods import DENSE, MULTI_CROP, dense_probs, multi_crop_probs, topk_errors
from vgg.evaluation.nets import load_eval_net
from vgg.evaluation.runner import evaluate_dataset
from vgg.models.vgg import build_vgg, to_dense

CROP = 32
CLASSES = ["n01", "n02", "n03"]
# (width, height): every size once per class, so each size (and each of its rescaled sizes) comes
# three times, but every loader batch of 4 (one class) mixes four sizes. 200x150 is decoded at half
# size (JPEG draft mode) for Q = 48, and the smaller scales reuse those pixels.
SIZES = [(64, 48), (200, 150), (48, 64), (99, 41)]
PHOTOS = ["astronaut", "coffee", "chelsea"]
MEAN = (120.0, 100.0, 90.0)


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching") / "val"
    for c, (wnid, photo) in enumerate(zip(CLASSES, PHOTOS)):
        (root / wnid).mkdir(parents=True)
        array = getattr(skdata, photo)()[..., :3]
        for i in range(len(SIZES)):
            size = SIZES[(i + c) % len(SIZES)]  # a different order in each class
            Image.fromarray(array).resize(size, Image.Resampling.BILINEAR).save(root / wnid / f"{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    model = build_vgg("A", num_classes=len(CLASSES), width=1 / 16, fc_width=32, image_size=CROP, init="xavier")
    path = tmp_path_factory.mktemp("net") / "net" / "best.pt"
    config = {"arch": "A", "crop_size": CROP, "scale_min": 36, "scale_max": 48, "run_name": "net"}
    stats = {"mean_rgb": list(MEAN), "eigval": [0.2, 0.02, 0.004],
             "eigvec": [[0.6, 0.7, 0.4], [0.6, 0.0, -0.8], [0.6, -0.7, 0.4]]}
    save_checkpoint(path, model=model.state_dict(), arch=model.arch_kwargs(), epoch=1, step=0, config=config,
                    stats=stats, classes=CLASSES, best_top1=0.0)
    return path


def scaled_images(path, scales):
    with Image.open(path) as image:
        return MultiScaleTransform(scales=scales)(image)


@pytest.fixture(scope="module")
def reference(checkpoint, val_dir):
    """The per-image path (the evaluator before issue 16): each image's scaled copies through
    dense_probs / multi_crop_probs one at a time, soft-max averaged over the scales."""
    net = load_eval_net(checkpoint)
    dense = to_dense(net.model).eval()
    probs = {DENSE: [], MULTI_CROP: []}
    for path, _ in ImageFolder(val_dir).samples:
        images = [normalize(im, net.mean_rgb) for im in scaled_images(path, net.scales)]
        with torch.no_grad():
            probs[DENSE].append(torch.stack([dense_probs(dense, im[None])[0] for im in images]).mean(0))
            probs[MULTI_CROP].append(torch.stack([multi_crop_probs(net.model, [im], CROP)[0]
                                                  for im in images]).mean(0))
    return {m: torch.stack(p) for m, p in probs.items()}


@pytest.mark.parametrize("workers, channels_last", [(1, True), (0, False)])
def test_batched_results_equal_the_per_image_path(checkpoint, val_dir, reference, monkeypatch, workers,
                                                  channels_last):
    net = load_eval_net(checkpoint)
    assert net.scales == [36, 42, 48]
    result, caught = evaluate_catching_probs([net], val_dir, monkeypatch, batch_size=3, workers=workers,
                                             channels_last=channels_last)
    labels = torch.tensor([label for _, label in ImageFolder(val_dir).samples])
    assert result["images"] == len(labels) == 12
    assert [row["method"] for row in result["rows"]] == [DENSE, MULTI_CROP, vmethods.BOTH]
    for row, probs, method in zip(result["rows"], caught, (DENSE, MULTI_CROP)):
        torch.testing.assert_close(probs, reference[method], rtol=1e-4, atol=1e-6)
        expected = topk_errors(reference[method], labels)
        assert (row["top1_err"], row["top5_err"]) == pytest.approx((expected[1], expected[5]))
    # The reference differs between the methods, so a mix-up of the two would show.
    assert (reference[DENSE] - reference[MULTI_CROP]).abs().max() > 1e-3


@pytest.mark.parametrize("bf16", [False, True])
def test_waiting_batches_run_side_by_side_with_the_results_of_one_at_a_time(checkpoint, val_dir, reference,
                                                                             monkeypatch, bf16):
    """Once the loader is spent, a CPU runs the batches still waiting several at once, in threads (issue 16),
    each in inference mode and under the run's bf16 autocast as the main thread is: the same soft-max
    as one batch at a time, and for fp32 the per-image path's."""
    seen = []
    real_evaluate = vrunner._NetRunner.evaluate

    def recording(self, images, methods):
        seen.append((threading.current_thread() is threading.main_thread(), torch.is_inference_mode_enabled(),
                     torch.is_autocast_enabled("cpu")))
        return real_evaluate(self, images, methods)

    monkeypatch.setattr(vrunner._NetRunner, "evaluate", recording)
    caught = {}
    for side_by_side in (1, 3):
        monkeypatch.setattr(vrunner, "batches_side_by_side", lambda device, n=side_by_side: n)
        seen.clear()
        # One loader batch holds all 12 images, and no size has 32: every batch waits for the end.
        _, caught[side_by_side] = evaluate_catching_probs([load_eval_net(checkpoint)], val_dir, monkeypatch,
                                                          batch_size=32, workers=1, bf16=bf16)
        assert len(seen) == 9 and {(inference, autocast) for _, inference, autocast in seen} == {(True, bf16)}
        assert {main for main, *_ in seen} == {side_by_side == 1}
    for threaded, alone in zip(caught[3], caught[1]):
        torch.testing.assert_close(threaded, alone, rtol=0, atol=1e-6)
    if not bf16:
        for probs, method in zip(caught[3], (DENSE, MULTI_CROP)):
            torch.testing.assert_close(probs, reference[method], rtol=1e-4, atol=1e-6)


def test_equal_sizes_from_different_loader_batches_fill_whole_batches(checkpoint, val_dir, monkeypatch):
    net = load_eval_net(checkpoint)
    shapes = collections.Counter((q, *im.shape[1:]) for path, _ in ImageFolder(val_dir).samples
                                 for q, im in zip(net.scales, scaled_images(path, net.scales)))
    # 3 sizes at each scale (64x48 and 200x150 rescale alike), each a multiple of 3 images.
    assert all(n % 3 == 0 for n in shapes.values()) and len(shapes) == 9
    batches = []
    real_evaluate = vrunner._NetRunner.evaluate

    def recording(self, images, methods):
        batches.append((images.shape[0], tuple(images.shape[2:]), tuple(methods)))
        return real_evaluate(self, images, methods)

    monkeypatch.setattr(vrunner._NetRunner, "evaluate", recording)
    # Loader batches of 4 hold four different sizes; only grouping across them gives batches of 3.
    evaluate_dataset([net], val_dir, methods=(DENSE, MULTI_CROP), batch_size=3, workers=0, progress=False)
    assert [b for b, _, _ in batches] == [3] * (sum(shapes.values()) // 3)
    expected = collections.Counter()
    for (q, h, w), n in shapes.items():
        expected[(h, w)] += n // 3  # min(h, w) is Q: no two scales share a size
    assert collections.Counter(hw for _, hw, _ in batches) == expected
    assert {m for _, _, m in batches} == {(DENSE, MULTI_CROP)}  # one batch serves both methods


def test_each_file_is_decoded_once_for_all_scales_and_methods(checkpoint, val_dir, monkeypatch):
    decodes = collections.Counter()
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        if self.tile:  # pixels not decoded yet: this call decodes the file
            decodes[Path(self.filename).relative_to(val_dir).as_posix()] += 1
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    result = evaluate_dataset([load_eval_net(checkpoint)], val_dir, methods=(DENSE, MULTI_CROP), batch_size=3,
                              workers=0, progress=False)
    files = sorted(Path(p).relative_to(val_dir).as_posix() for p, _ in ImageFolder(val_dir).samples)
    assert result["images"] == len(files)
    assert sorted(decodes) == files and set(decodes.values()) == {1}


def test_a_loader_worker_hands_over_one_tensor_of_pixels_a_batch(checkpoint, val_dir):
    scales = load_eval_net(checkpoint).scales
    dataset = ImageFolder(val_dir, MultiScaleTransform(scales=scales))
    loader = torch.utils.data.DataLoader(ShardDataset(dataset, list(range(len(dataset)))), batch_size=4,
                                         num_workers=1, collate_fn=collate_shard)
    seen = 0
    for positions, packed, labels, unreadable in loader:
        assert isinstance(packed, PackedImages) and packed.pixels.dtype == torch.uint8
        assert len(packed.shapes) == 4 * len(scales) and not unreadable
        images = packed.unpack()
        for i, pos in enumerate(positions.tolist()):
            expected = scaled_images(dataset.samples[pos][0], scales)
            for got, want in zip(images[i * len(scales):(i + 1) * len(scales)], expected):
                assert torch.equal(got, want)
        seen += len(positions)
    assert seen == len(dataset)


def test_waiting_images_are_bounded_in_bytes_too():
    buckets = vinputs.DenseBuckets()
    for pos, w in enumerate((40, 41, 42)):
        buckets.add((36, 36, w), pos, torch.full((3, 36, w), pos, dtype=torch.uint8))
    assert buckets.count == 3 and buckets.bytes == 3 * 36 * (40 + 41 + 42)
    assert list(buckets.pop_full(batch_size=4, limit=10, max_bytes=20_000)) == []  # under both bounds
    released = list(buckets.pop_full(batch_size=4, limit=10, max_bytes=3 * 36 * 100))
    assert sorted(p for _, positions, _ in released for p in positions.tolist()) == [0, 1, 2]
    assert buckets.count == buckets.bytes == 0 and not buckets.pending
    packed = PackedImages.pack([torch.zeros(3, 2, 5, dtype=torch.uint8), torch.ones(3, 4, 1, dtype=torch.uint8)])
    assert packed.pixels.shape == (3 * 2 * 5 + 3 * 4,)
    assert [im.shape for im in packed.unpack()] == [(3, 2, 5), (3, 4, 1)]
    assert np.array_equal(packed.unpack()[1].numpy(), np.ones((3, 4, 1)))
