"""A compiled net compiles once for training and once for validation, over a whole run (issue 27): no
recompile after the first epoch. The run is the real trainer's, with torch.compile's backend swapped for
torch's own counting backend (the guards that decide a recompile are the backend's same), so the count
is exact and the test takes seconds rather than inductor's minutes on a CPU."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from test_train import tiny_config
from vgg.training import run as vrun


@pytest.fixture
def counted_compiles(monkeypatch):
    torch._dynamo.reset()  # no frame compiled by an earlier test is reused
    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=counter))
    yield counter
    torch._dynamo.reset()


def test_three_epochs_with_validation_compile_the_net_twice(sample_root, tmp_path, counted_compiles):
    # 185 val images in batches of 16: the last is short, and nets compiled before this change
    # compiled it a third time (a new batch size); every epoch validates, between training epochs.
    config = tiny_config(sample_root, tmp_path, compile=True, epochs=3, steps_per_epoch=2, workers=0,
                         stats="imagenet", batch_size=16)
    metrics = vrun.run(config)
    assert metrics["images"] == 185 - metrics["skipped"] and metrics["images"] % 16  # a short last batch ran
    assert counted_compiles.frame_count == 2  # training (grad mode, train mode) and validation (inference)


def test_a_short_validation_batch_gives_the_same_metrics_padded(sample_root, tmp_path):
    """The padding that keeps validation at one shape leaves the metrics as an unpadded pass gives them."""
    from vgg.data.datasets.folders import ImageFolder
    from vgg.data.batches.loaders import build_loader, collate_batch
    from vgg.data.datasets.stats import IMAGENET_STATS
    from vgg.data.batches.transforms import CenterCropTransform
    from vgg.models import build_vgg
    from vgg.training.loop import validate
    from vgg.training.step import BatchAugment

    torch.manual_seed(0)
    model = build_vgg("A", num_classes=12, width=0.125, fc_width=64, image_size=32)
    val = ImageFolder(sample_root / "val", CenterCropTransform(scale=40, crop_size=32))
    augment = BatchAugment(IMAGENET_STATS, torch.device("cpu"))
    results = {}
    for batch_size in (16, 1):  # 16: short last batch, padded; 1: no batch is ever short
        loader = build_loader(val, batch_size=batch_size, shuffle=False, workers=0, collate_fn=collate_batch)
        results[batch_size] = validate(model, loader, augment, bf16=False)
    for key in ("top1_err", "top5_err", "images", "skipped"):
        assert results[16][key] == results[1][key], key
    assert results[16]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)


@pytest.mark.parametrize("arch", ["A", "A-LRN", "B", "C", "D", "E"])
def test_the_compiled_forward_and_loss_have_no_graph_break(arch):
    """What the trainer compiles (each VGG's forward), with the mean subtraction, colour shift and loss around
    it, traces as one graph (torch._dynamo.explain): nothing in them falls back to Python each step."""
    from vgg.data.datasets.stats import IMAGENET_STATS
    from vgg.data.batches.transforms import TrainCrop
    from vgg.models import build_vgg
    from vgg.models.zoo import training_loss
    from vgg.training.step import BatchAugment

    torch._dynamo.reset()
    model = build_vgg(arch, num_classes=10, width=0.125, fc_width=64, image_size=32)
    augment = BatchAugment(IMAGENET_STATS, torch.device("cpu"), channels_last=True)
    batch = TrainCrop(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.randn(2, 3))

    def augment_forward_loss(batch, labels):
        return training_loss(model(augment(batch, train=True)), labels)

    explained = torch._dynamo.explain(augment_forward_loss)(batch, torch.tensor([1, 2]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
