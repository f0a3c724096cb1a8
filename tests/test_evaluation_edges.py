"""Evaluation edge cases mutation testing found unpinned (issue 18): a loader batch of unreadable files
only, a set with one readable image or none, multi-crop without flips."""

import shutil

import pytest
import torch
from test_evaluation import CROP, checkpoint, classes, evaluate, tiny_net, val_dir  # noqa: F401 (fixtures)

from vgg.core.errors import UserError
from vgg.evaluation.methods import DENSE, MULTI_CROP, multi_crop_probs, multi_crops
from vgg.evaluation.nets import load_eval_net


def test_a_loader_batch_of_unreadable_files_only_does_not_end_the_evaluation(checkpoint, val_dir):  # noqa: F811
    """batch_size 1: the truncated and empty files each make a batch with no image; the images
    after them are still scored."""
    net = load_eval_net(checkpoint, single_scale=True)
    one_by_one = evaluate([net], val_dir, batch_size=1, methods=(DENSE, MULTI_CROP))
    whole = evaluate([net], val_dir, batch_size=8, methods=(DENSE, MULTI_CROP))
    assert one_by_one["skipped"] == whole["skipped"] >= 2
    assert one_by_one["images"] == whole["images"]
    for a, b in zip(one_by_one["rows"], whole["rows"]):
        assert a["top1_err"] == pytest.approx(b["top1_err"]) and a["top5_err"] == pytest.approx(b["top5_err"])


def test_one_readable_image_is_scored_and_none_is_refused(checkpoint, val_dir, tmp_path):  # noqa: F811
    net = load_eval_net(checkpoint, single_scale=True)
    one = tmp_path / "one" / "val"
    for folder in sorted(p for p in val_dir.iterdir() if p.is_dir()):
        (one / folder.name).mkdir(parents=True)
    photo = next(f for f in sorted(val_dir.rglob("*.JPEG")) if "awkward" not in f.name)
    shutil.copy(photo, one / photo.parent.name / photo.name)
    result = evaluate([net], one)
    assert result["images"] == 1 and result["rows"][0]["top1_err"] in (0.0, 100.0)
    empty = tmp_path / "none" / "val"
    for folder in sorted(p for p in val_dir.iterdir() if p.is_dir()):
        (empty / folder.name).mkdir(parents=True)
    (empty / photo.parent.name / "bad.JPEG").write_bytes(b"")
    with pytest.raises(UserError, match=f"no readable image in {empty} \\(1 skipped\\)"):
        evaluate([net], empty)


@pytest.mark.parametrize("as_batch", [True, False])
def test_multi_crop_without_flips_averages_the_grid_crops_only(as_batch):
    model = tiny_net(5)
    torch.manual_seed(1)
    images = torch.randn(2, 3, CROP + 8, CROP + 12) * 50
    with torch.inference_mode():
        expected = torch.stack([torch.softmax(model(multi_crops(image, CROP, 3, flip=False)), dim=1).mean(dim=0)
                                for image in images])
        got = multi_crop_probs(model, images if as_batch else list(images), CROP, n=3, flip=False, max_batch=4)
        flipped = multi_crop_probs(model, images if as_batch else list(images), CROP, n=3, max_batch=4)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, flipped)  # the mirror images do change the average
