"""Parts of vgg/training/run.py that mutation testing found unpinned (issue 18): the kernel flags a resume
sets, the file named by a checkpoint that does not fit, skipped.txt paths with spaces, the speed-settings
words, the GPU data path's loader as the trainer builds it, and what goes to TensorBoard."""

import pytest
import torch
from PIL import Image
from test_hardening_ddp_data import LogLines

from vgg.config import Config
from vgg.core.checkpoint import rng_state
from vgg.core.errors import UserError
from vgg.data.batches import loaders as vloaders
from vgg.data.batches.transforms import TrainTransform
from vgg.data.datasets import folders as vfolders
from vgg.models.vgg import build_vgg
from vgg.training import folder as vrunfolder
from vgg.training import logs as vlogs
from vgg.training import recipe as vrecipe
from vgg.training import resume as vresume
from vgg.training import run as vrun


def tiny(num_classes: int = 3):
    torch.manual_seed(0)
    return build_vgg("A", num_classes=num_classes, width=1 / 16, fc_width=16, image_size=32, init="xavier")


def test_a_resume_runs_this_machines_sgd_kernel_whatever_the_checkpoints():
    """A checkpoint saved on a GPU (fused) resumed on another device: its groups get this device's flag."""
    model = tiny()
    config = Config()
    saved = vrecipe.build_optimizer(model, config)
    for group in saved.param_groups:
        group.update({"fused": None, "foreach": None, "differentiable": False})
        group["foreach"] = "from the saving run"
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(saved)
    ckpt = {"model": model.state_dict(), "optimizer": saved.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng_state()}
    optimizer = vrecipe.build_optimizer(model, config)
    fresh_keys = [set(group) for group in optimizer.param_groups]
    vresume.restore_training_state(ckpt, "last.pt", model, optimizer,
                                    torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer))
    kernel = vrecipe.sgd_kernel(torch.device("cpu"))
    for group, keys in zip(optimizer.param_groups, fresh_keys):
        assert set(group) == keys
        assert group["fused"] == kernel.get("fused") and group["foreach"] == kernel.get("foreach")


def test_state_that_does_not_fit_names_its_file(tmp_path):
    model = tiny()
    other = tiny(num_classes=5)
    optimizer = vrecipe.build_optimizer(model, Config())
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    try:
        vresume.restore_training_state({"model": other.state_dict()}, tmp_path / "last.pt", model, optimizer, scheduler)
    except UserError as e:
        assert str(e).startswith(f"{tmp_path / 'last.pt'}: its weights do not fit net A")
    else:
        raise AssertionError("no error")
    source = {"arch": other.arch_kwargs(), "model": other.state_dict(), "classes": ["a", "b", "c", "d", "e"]}
    source["arch"]["num_classes"] = 3  # names 3 classes but holds weights for 5
    try:
        vresume.init_from_checkpoint(model, {**source, "classes": ["a", "b", "c"]}, "a.pt", ["a", "b", "c"])
    except UserError as e:
        assert str(e).startswith("a.pt: its weights do not fit net A")
    else:
        raise AssertionError("no error")
    same_kind = {"arch": model.arch_kwargs(), "model": {**tiny().state_dict()}, "classes": ["a", "b", "c"]}
    bad = tiny(num_classes=5).state_dict()
    loaded = vresume.init_from_checkpoint(tiny(), same_kind, "b.pt", ["a", "b", "c"])
    assert loaded == list(model.state_dict())
    same_kind["model"] = {k: v for k, v in bad.items()}
    try:
        vresume.init_from_checkpoint(tiny(), same_kind, "c.pt", ["a", "b", "c"])
    except UserError as e:
        assert str(e).startswith("c.pt: its weights do not fit net A")
    else:
        raise AssertionError("no error")


def test_skipped_list_keeps_paths_with_spaces(tmp_path):
    path = tmp_path / "skipped.txt"
    path.write_text("/data/train/n01/a file.JPEG\tOSError: truncated\n/data/x.JPEG\tempty file\n\n")
    assert vlogs.read_skipped_list(path) == {"/data/train/n01/a file.JPEG": "OSError: truncated",
                                                "/data/x.JPEG": "empty file"}


def test_speed_settings_read_on_and_off():
    assert [vrunfolder._on_off(flag) for flag in (True, False)] == ["on", "off"]


def test_the_gpu_data_paths_loader_as_built_for_the_run(tmp_path):
    """data_path: gpu, built by the trainer: the run's sampler and epoch, whole batches only, and the
    same crops, alphas and labels as the CPU path's loader (on the CPU here)."""
    root = tmp_path / "train"
    for c in range(2):
        (root / f"n{c}").mkdir(parents=True)
        for k in range(5):
            Image.new("RGB", (40 + 7 * k, 36 + 3 * c), (30 * k, 90 * c, 60)).save(root / f"n{c}" / f"{k}.JPEG")
    config = Config(crop_size=32, scale_min=36, scale_max=48, workers=1, seed=5)
    sampler = vloaders.EpochSampler(10, seed=5, rank=0, world_size=1)
    sampler.set_epoch(2)
    batches = {}
    for path in ("cpu", "gpu"):
        config.data_path = path
        folder = vfolders.ImageFolder(root, TrainTransform(crop_size=32, scale_min=36, scale_max=48, seed=5))
        loader = vrun.build_train_loader(config, folder, sampler, 4, torch.device("cpu"), seed=1)
        assert (loader.loader if path == "gpu" else loader).num_workers == 1  # the run's --workers
        batches[path] = list(loader)
        assert len(batches[path]) == 2  # 10 images, batches of 4: the last 2 are dropped
    for (cpu_crops, cpu_labels, _), (gpu_crops, gpu_labels, _) in zip(batches["cpu"], batches["gpu"]):
        assert torch.equal(cpu_labels, gpu_labels)
        assert torch.equal(cpu_crops.alphas, gpu_crops.alphas)
        assert (cpu_crops.image.int() - gpu_crops.image.int()).abs().max() <= 1


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_an_epoch_row_goes_to_tensorboard_at_its_step(tmp_path, monkeypatch, device_type):
    """Every number of the row under its tag at the epoch's global step; the peak GPU memory in GiB on
    CUDA only (its counter stubbed here: no GPU on CI)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 3 * 2**30)
    row = {"val_top1_err": 61.5, "val_top5_err": 30.25, "val_loss": 2.5, "train_top1_err": 70.5,
           "train_top5_err": 40.75, "lr": 0.001, "train_epoch_time_s": 12.5, "train_images_per_s": 80.5,
           "train_data_wait_fraction": 0.125}
    writer = SummaryWriter(tmp_path)
    vlogs.log_epoch(writer, 17, row, torch.device(device_type))
    writer.close()
    assert asked == ([torch.device("cuda")] if device_type == "cuda" else [])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    expected = {"val/top1_err": 61.5, "val/top5_err": 30.25, "val/loss": 2.5, "epoch/train_top1_err": 70.5,
                "epoch/train_top5_err": 40.75, "epoch/lr": 0.001, "epoch/time_s": 12.5,
                "epoch/images_per_s": 80.5, "epoch/data_wait_fraction": 0.125}
    if device_type == "cuda":
        expected["epoch/gpu_memory_gb"] = 3.0
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, value in expected.items():
        (event,) = events.Scalars(tag)
        assert (event.step, event.value) == (17, pytest.approx(value)), tag


def test_no_image_grid_without_a_readable_training_image(tmp_path):
    """Every batch of the first pass unreadable: a warning says the grid is missing, and none is logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    unreadable = [(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), ["bad"])] * 2
    writer = SummaryWriter(tmp_path)
    with LogLines("vgg") as lines:
        vlogs.log_augmented_images(writer, unreadable, augment=None)
    writer.close()
    assert lines == ["warning: no readable training image for the TensorBoard image grid; none logged"]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Tags()["images"] == []


def test_sgd_is_one_fused_kernel_on_cuda_and_the_cpu_and_batched_elsewhere():
    assert vrecipe.sgd_kernel(torch.device("cuda")) == {"fused": True}
    assert vrecipe.sgd_kernel(torch.device("cpu")) == {"fused": True}
    assert vrecipe.sgd_kernel(torch.device("mps")) == {"foreach": True}  # torch has no fused SGD there
