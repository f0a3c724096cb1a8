"""vgg/training/run.py in-process: what a run writes (rows, TensorBoard, checkpoints, skipped.txt, config),
how it resumes (`if-exists`, a folder, changed settings), its refusals, and its parts (EpochSampler,
resume_changes, apply_resume_changes, StopFlag, load_stats, init_from_checkpoint, stale temp files).
Real runs on real JPEGs, cut to a step or two (test_train.tiny_config)."""

import dataclasses
import json
import os
import re
import signal
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import wait_for_each_checkpoint, wait_for_the_next_second
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_hardening_ddp_data import LogLines, metrics_rows
from test_train import tiny_config

from vgg.config import Config
from vgg.core.checkpoint import load_checkpoint, save_checkpoint
from vgg.core.errors import UserError
from vgg.data.batches import loaders as vloaders
from vgg.data.batches.transforms import TrainCrop
from vgg.data.datasets import sample as vsample
from vgg.data.datasets import stats as vstats
from vgg.data.datasets.folders import ImageFolder
from vgg.data.datasets.stats import IMAGENET_STATS
from vgg.models.vgg import build_vgg
from vgg.training import epochs as vepochs
from vgg.training import logs as vlogs
from vgg.training import recipe as vrecipe
from vgg.training import resume as vresume
from vgg.training import run as vrun
from vgg.training import signals as vsignals
from vgg.training.step import BatchAugment


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def unreadable_files(split_dir) -> set[str]:
    ds = ImageFolder(split_dir, None)
    return {path for i, (path, _) in enumerate(ds.samples) if ds[i][0] is None}


# --- A whole run, then a requeued one ---------------------------------------------------------------

def test_a_run_writes_its_rows_curves_checkpoints_and_skipped_files_and_resumes_if_it_exists(
        sample_root, tmp_path, monkeypatch):
    config = tiny_config(sample_root, tmp_path, run_name="whole", epochs=1, batch_size=8, steps_per_epoch=2,
                         workers=0, stats="imagenet", log_every=1)
    run_dir = tmp_path / "checkpoints" / "whole"
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with LogLines("vgg") as lines:
        final = vrun.run(config, resume="if-exists")
    assert torch.backends.cudnn.benchmark is False  # cuDNN autotuning (config.cudnn_benchmark) on CUDA only
    # "auto" speed settings on the CPU: channels-last only (docs/benchmarks.md: never slower here).
    assert "speed settings on cpu: bf16 autocast off, channels-last on, torch.compile off" in lines
    assert f"starting fresh: no {run_dir / 'last.pt'} yet" in lines
    config_text = (run_dir / "config.yaml").read_text()
    assert yaml.safe_load(config_text) == config.to_dict()
    assert list(yaml.safe_load(config_text)) == list(config.to_dict())  # in the Config's order, as --help lists them
    train_count, val_count = len(ImageFolder(sample_root / "train", None)), len(ImageFolder(sample_root / "val", None))
    params = sum(p.numel() for p in build_vgg("A", num_classes=12, width=0.125, fc_width=64, image_size=32).parameters())
    assert (f"net A: {params:,} parameters, 12 classes, {train_count} train / {val_count} val images, 2 steps/epoch "
            "of 8 on 1 x cpu") in lines
    assert f"run folder {run_dir}; TensorBoard: tensorboard --logdir {tmp_path / 'runs'}" in lines

    (row,) = metrics_rows(run_dir)
    assert (row["epoch"], row["lr"], row["lr_drops"]) == (0, 0.01, 0)
    assert row["train_images"] + row["train_skipped"] == 2 * 8
    val_unreadable = unreadable_files(sample_root / "val")
    assert len(val_unreadable) == 2 and row["val_skipped"] == 2 and row["val_images"] == len(ImageFolder(sample_root / "val", None)) - 2
    assert not {"train_interrupted", "train_step", "train_sums", "train_unreadable", "val_unreadable"} & set(row)
    assert final["top1_err"] == row["val_top1_err"] and final["loss"] == row["val_loss"]
    listed = dict(line.split("\t") for line in (run_dir / "skipped.txt").read_text().splitlines())
    assert val_unreadable <= set(listed) and len(listed) == row["train_skipped"] + row["val_skipped"]
    assert all(reason for reason in listed.values())

    # The epoch's row in TensorBoard, at the epoch's last global step; the augmented-image grid.
    tb = events(tmp_path / "runs" / "whole")
    for tag, key in (("val/top1_err", "val_top1_err"), ("val/top5_err", "val_top5_err"), ("val/loss", "val_loss"),
                     ("epoch/train_top1_err", "train_top1_err"), ("epoch/train_top5_err", "train_top5_err"),
                     ("epoch/lr", "lr"), ("epoch/time_s", "train_epoch_time_s"),
                     ("epoch/images_per_s", "train_images_per_s"),
                     ("epoch/data_wait_fraction", "train_data_wait_fraction")):
        ((event,),) = [tb.Scalars(tag)]
        assert (event.step, event.value) == (2, pytest.approx(row[key], rel=1e-5)), tag
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2]
    (grid,) = tb.Images("train/augmented_images")
    assert grid.step == 0
    (text,) = tb.Tensors("config/text_summary")  # the run's settings beside its curves
    assert (text.step, text.tensor_proto.string_val[0].decode()) == (0, "```\n" + config_text + "```")

    ckpt = load_checkpoint(run_dir / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["lr_drops"], ckpt["world_size"]) == (1, 0, 0, 1)
    assert ckpt["epoch_sums"] is None and ckpt["config"] == config.to_dict()
    assert ckpt["best_top1"] == row["val_top1"]
    assert ckpt["best"] == {"epoch": 0, "val_top1_err": row["val_top1_err"], "val_top5_err": row["val_top5_err"]}
    assert ckpt["stats"] == IMAGENET_STATS.to_dict() and ckpt["classes"] == [f"n{k:08d}" for k in range(12)]
    assert ckpt["model"]["features.0.weight"].is_contiguous(memory_format=torch.channels_last)

    # Requeued by SLURM: the same command goes on from last.pt, one more epoch.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    longer = tiny_config(sample_root, tmp_path, run_name="whole", epochs=2, batch_size=8, steps_per_epoch=2,
                         workers=0, stats="imagenet", log_every=1)
    with LogLines("vgg") as lines:
        wait_for_the_next_second()  # (an in-process resume: see conftest)
        vrun.run(longer, resume="if-exists")
    assert f"resuming {run_dir / 'last.pt'} (requeued job 77, restart 2)" in lines
    assert "epochs 1 -> 2 on resume" in lines
    assert any(line.startswith(f"resumed {run_dir / 'last.pt'} at epoch 1, step 0 (lr 0.01, 0 lr drops")
               for line in lines)
    rows = metrics_rows(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1]
    again = dict(line.split("\t") for line in (run_dir / "skipped.txt").read_text().splitlines())
    assert set(listed) <= set(again)  # the first part's files are kept
    assert [e.step for e in events(tmp_path / "runs" / "whole").Scalars("val/top1_err")] == [2, 4]
    best_epoch = 0 if rows[0]["val_top1"] >= rows[1]["val_top1"] else 1
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == best_epoch + 1
    assert lines[-1] == (f"done: best val top-1 err {rows[best_epoch]['val_top1_err']:.1f}% (epoch {best_epoch}); "
                         f"checkpoints in {run_dir}")

    # A checkpoint folder resumes from its last.pt, which names the best epoch; one without the best
    # epoch's errors (older runs) reports the best accuracy alone. Nothing is left to train: one line says
    # so, and nothing is validated or written (issue 34).
    finished = f"{run_dir / 'last.pt'} is a finished run (it has trained all 2 epochs; best val top-1 err "
    with LogLines("vgg") as lines:
        assert vrun.run(longer, resume=str(run_dir)) == {}
    assert lines == [f"{finished}{rows[best_epoch]['val_top1_err']:.1f}% (epoch {best_epoch})): nothing to train, "
                     "nothing changed; to train on, pass --epochs 3 or more"]
    ckpt = load_checkpoint(run_dir / "last.pt")
    save_checkpoint(run_dir / "last.pt", **{**ckpt, "best": None})
    with LogLines("vgg") as lines:
        assert vrun.run(longer, resume=str(run_dir)) == {}
    assert lines[-1].startswith(f"{finished}{100 - ckpt['best_top1']:.1f}%): nothing to train")
    assert len(metrics_rows(run_dir)) == 2
    # `if-exists` outside SLURM: the plain line.
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    monkeypatch.delenv("SLURM_JOB_ID")
    with LogLines("vgg") as lines:
        vrun.run(longer, resume="if-exists")
    assert f"resuming {run_dir / 'last.pt'}" in lines
    # A restart count without a job id (set by hand, not by SLURM): the job shows as "?".
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with LogLines("vgg") as lines:
        vrun.run(longer, resume="if-exists")
    assert f"resuming {run_dir / 'last.pt'} (requeued job ?, restart 1)" in lines
    # The same settings on a dataset with other classes (as many, or fewer), an epoch more: refused, naming
    # the checkpoint.
    rng = np.random.default_rng(1)
    for count in (12, 2):
        other = tmp_path / f"other{count}"
        for c in range(count):
            for split in ("train", "val"):
                solid_jpegs(other / split / f"n1{c:07d}", (20 * c, 90, 90), 2, rng)
        with pytest.raises(UserError, match=f"^{re.escape(str(run_dir / 'last.pt'))} was trained as .* on 12 "
                                            "classes, not as this run's "):
            vrun.run(dataclasses.replace(longer, data=str(other), batch_size=2, epochs=3), resume="auto")
    # A setting that may not change on resume: refused, naming the checkpoint.
    with pytest.raises(UserError, match=f"^cannot resume {re.escape(str(run_dir / 'last.pt'))} with changed "
                                        "crop_size 32 -> 40: may change on resume: "):
        vrun.run(dataclasses.replace(longer, crop_size=40), resume="auto")
    # A resumed run keeps the statistics it started with (the mean it has been trained to expect).
    ckpt = load_checkpoint(run_dir / "last.pt")
    own_stats = {**ckpt["stats"], "mean_rgb": [100.0, 110.0, 120.0]}
    save_checkpoint(run_dir / "last.pt", **{**ckpt, "stats": own_stats})
    wait_for_the_next_second()
    vrun.run(dataclasses.replace(longer, epochs=3), resume="auto")
    assert load_checkpoint(run_dir / "last.pt")["stats"] == own_stats



def test_a_thousand_class_folders_not_starting_with_tench_train_after_one_warning(tmp_path):
    """1000 classes whose index 0 is not n01440764: maybe another 1000-class set, maybe ImageNet with
    misnamed folders. Training warns once, naming train/, and goes on (evaluate.py refuses instead)."""
    root = tmp_path / "thousand"
    for split in ("train", "val"):
        for c in range(1000):
            (root / split / f"c{c:03d}").mkdir(parents=True)
            Image.new("RGB", (36, 36), (c % 256, 40, 90)).save(root / split / f"c{c:03d}" / "0.JPEG")
    config = tiny_config(root, tmp_path, run_name="thousand", epochs=1, batch_size=8, steps_per_epoch=1,
                         workers=0, stats="imagenet")
    with LogLines("vgg") as lines:
        vrun.run(config)
    warnings = [line for line in lines if line.startswith("warning")]
    assert warnings == [f"warning: {root / 'train'}: 1000 classes whose index 0 is c000, not n01440764 (tench) as "
                        "in ILSVRC-2012's sorted wnids: these are not the standard classes or not named by wnid"]
    assert metrics_rows(tmp_path / "checkpoints" / "thousand")[0]["val_images"] == 1000


# --- Steps per epoch, the mid-epoch checkpoint, refusals ---------------------------------------------

def solid_jpegs(folder: Path, colour, count: int, rng) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = (np.array(colour) + rng.normal(0, 8, (40, 48, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=95)


def small_dataset(root: Path, train_per_class: int = 6, val_classes=("n01", "n02")) -> Path:
    rng = np.random.default_rng(0)
    for wnid, colour in (("n01", (200, 40, 40)), ("n02", (30, 60, 220))):
        solid_jpegs(root / "train" / wnid, colour, train_per_class, rng)
    for wnid in val_classes:
        solid_jpegs(root / "val" / wnid, (90, 90, 90), 2, rng)
    return root


def test_an_epoch_is_every_full_batch_and_the_checkpoint_between_syncs_holds_its_sums(tmp_path, monkeypatch):
    """12 training images, batch 4, no step limit: 3 steps; checkpoint_every 2: last.pt at step 2."""
    root = small_dataset(tmp_path / "small")
    config = tiny_config(root, tmp_path, run_name="full", epochs=1, batch_size=4, steps_per_epoch=0, workers=0,
                         stats="imagenet", log_every=100, checkpoint_every=2, color_shift_std=0.25)
    on_disk, augments = [], []
    real_validate, real_train_one_epoch = vepochs.validate, vepochs.train_one_epoch

    def spying_train_one_epoch(model, loader, optimizer, augment, **kwargs):
        augments.append(augment)
        return real_train_one_epoch(model, loader, optimizer, augment, **kwargs)

    def spying_validate(*args, **kwargs):
        on_disk.append(load_checkpoint(tmp_path / "checkpoints" / "full" / "last.pt"))
        return {**real_validate(*args, **kwargs), "top1": 0.0}  # no image right: still the best so far

    monkeypatch.setattr(vepochs, "validate", spying_validate)
    monkeypatch.setattr(vepochs, "train_one_epoch", spying_train_one_epoch)
    wait_for_each_checkpoint(monkeypatch)  # validation reads the step-2 last.pt the background thread writes
    vrun.run(config)
    # The configured colour shift (every batch brings its own alphas, the placeholder's zeros).
    ((augment,),) = [augments]
    assert augment.color_shift_std == 0.25
    (row,) = metrics_rows(tmp_path / "checkpoints" / "full")
    assert row["train_images"] == 12 and row["val_images"] == 4
    (mid,) = on_disk
    assert (mid["epoch"], mid["step"]) == (0, 2) and mid["epoch_sums"][3:] == [8.0, 0.0]
    assert mid["epoch_sums"][0] > 0
    assert load_checkpoint(tmp_path / "checkpoints" / "full" / "best.pt")["epoch"] == 1

    with pytest.raises(UserError, match="12 training images make no full batch of 16 per process"):
        vrun.run(tiny_config(root, tmp_path, run_name="big", batch_size=16, steps_per_epoch=0, workers=0,
                                 stats="imagenet"))


def test_refusals_before_training(tmp_path, sample_root, monkeypatch):
    root = small_dataset(tmp_path / "odd", val_classes=("n01",))
    with pytest.raises(UserError, match=f"^{root / 'val'} has 1 classes, {root / 'train'} has 2: the class folders "
                                        "must be the same$"):
        vrun.run(tiny_config(root, tmp_path, run_name="odd", workers=0, stats="imagenet"))
    with pytest.raises(UserError, match=r"data folder .*missing/train not found: --data must hold "
                                        r"train/<wnid>/\*\.JPEG and val/<wnid>/\*\.JPEG \(see data/README\.md\)$"):
        vrun.run(tiny_config(tmp_path / "missing", tmp_path, run_name="none", workers=0, stats="imagenet"))
    run_dir = tmp_path / "checkpoints" / "taken"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"")
    with pytest.raises(UserError, match="already holds a run: pass --resume"):
        vrun.run(tiny_config(sample_root, tmp_path, run_name="taken"))
    with pytest.raises(UserError, match="nothing to resume: .*nowhere.pt does not exist"):
        vrun.run(tiny_config(sample_root, tmp_path, run_name="new"), resume=str(tmp_path / "nowhere.pt"))
    with pytest.raises(UserError, match=r"absent.pt not found: net A starts from a trained net \(§3.1: deeper nets "
                                        r"from net A, S=384 from S=256, jittered from S=384\); train that first, or "
                                        r"pass --init-from PATH, or --init-from '' to start from scratch$"):
        vrun.run(tiny_config(sample_root, tmp_path, run_name="new", init_from=str(tmp_path / "absent.pt")))
    # A net's weights without its training state (as evaluate.py or --init-from take): not resumable.
    weights_only = tmp_path / "weights.pt"
    save_checkpoint(weights_only, **checkpoint_of("A", ["n01", "n02"]), stats=IMAGENET_STATS.to_dict())
    with pytest.raises(UserError, match="weights.pt has no optimizer, scheduler, epoch, step, lr_drops, rng, config, "
                                        "best_top1 entry: not a checkpoint train.py wrote"):
        vrun.run(tiny_config(sample_root, tmp_path, run_name="new"), resume=str(weights_only))
    # Three processes (as torchrun would start them) cannot share a global batch of 16.
    monkeypatch.setattr(vrun, "init_distributed", lambda device: vrun.DistInfo(
        rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), distributed=False))
    with pytest.raises(UserError, match="^the global batch 16 does not split over 3 processes$"):
        vrun.run(tiny_config(sample_root, tmp_path, run_name="three"))


def test_the_default_sample_dataset_is_generated_on_first_use(tmp_path, monkeypatch):
    made = []

    def make(root):
        made.append(Path(root))
        small_dataset(Path(root))
        return Path(root)

    monkeypatch.setattr(vsample, "DEFAULT_ROOT", tmp_path / "default")
    monkeypatch.setattr(vsample, "make_sample_dataset", make)
    assert vrun.prepare_dataset(Config(data=str(tmp_path / "default"))) == tmp_path / "default"
    assert made == [tmp_path / "default"]
    other = small_dataset(tmp_path / "other")
    assert vrun.prepare_dataset(Config(data=str(other))) == other and len(made) == 1


# --- The parts ---------------------------------------------------------------------------------------

def test_epoch_sampler_pads_to_whole_shards_and_depends_on_seed_and_epoch():
    """10 images over 3 ranks: 4 each, the shuffle's first 2 dealt again; a resumed rank skips `start`."""
    order = list(vloaders.EpochSampler(10, seed=1, rank=0, world_size=1))
    shards = []
    for rank in range(3):
        sampler = vloaders.EpochSampler(10, seed=1, rank=rank, world_size=3)
        assert sampler.per_rank() == 4 and len(sampler) == 4
        shards.append(list(sampler))
    padded = order + order[:2]
    first = vloaders.EpochSampler(10, seed=1, rank=0, world_size=1)
    first.set_epoch(0)
    assert list(first) == order  # a new sampler is at epoch 0
    assert shards == [padded[0::3], padded[1::3], padded[2::3]]
    sampler = vloaders.EpochSampler(10, seed=1, rank=1, world_size=3)
    sampler.set_epoch(0, start=3)
    assert list(sampler) == padded[1::3][3:] and len(sampler) == 1
    orders = set()
    for seed, epoch in ((1, 0), (2, 0), (1, 1), (0, 1)):
        s = vloaders.EpochSampler(10, seed=seed, rank=0, world_size=1)
        s.set_epoch(epoch)
        orders.add(tuple(s))
    assert len(orders) == 4


def test_resume_changes_policy():
    config = Config(batch_size=16)
    saved = {"config": config.to_dict(), "world_size": 1, "epoch": 2, "step": 0}
    changed = Config(batch_size=8, lr=0.05, out_dir="elsewhere")
    assert sorted(vresume.resume_changes(changed, saved, Path("x.pt"), world_size=1)) == [
        ("batch_size", 16, 8), ("lr", 0.01, 0.05), ("out_dir", config.out_dir, "elsewhere")]
    assert vresume.resume_changes(config, saved, Path("x.pt"), world_size=1) == []
    no_size = {k: v for k, v in saved.items() if k != "world_size"}  # older checkpoints: as this run
    assert vresume.resume_changes(config, no_size, Path("x.pt"), world_size=2) == []
    with pytest.raises(UserError) as refused:
        vresume.resume_changes(Config(batch_size=16, seed=3, arch="B"), saved, Path("x.pt"), world_size=1)
    message = str(refused.value)
    assert message.startswith("cannot resume x.pt with changed arch 'A' -> 'B', seed 0 -> 3: may change on resume: ")
    assert message.endswith(f"{', '.join(vresume.RESUME_APPLIED)}; train under a new --run-name to change the rest")
    assert "only at an epoch boundary" not in message
    mid = dict(saved, step=1)  # stopped after the epoch's first step
    with pytest.raises(UserError, match=r"batch_size 16 -> 8: .*at an epoch boundary \(it is at epoch 2, step 1\)"):
        vresume.resume_changes(Config(batch_size=8), mid, Path("x.pt"), world_size=1)
    assert vresume.resume_changes(Config(batch_size=16, lr=0.1), mid, Path("x.pt"), world_size=1) == [
        ("lr", 0.01, 0.1)]


def small_optimizer(config: Config):
    torch.manual_seed(0)
    model = build_vgg("A", num_classes=3, width=1 / 16, fc_width=16, image_size=32)
    optimizer = vrecipe.build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=2)
    return model, optimizer, scheduler


def test_apply_resume_changes_sets_the_new_values_and_says_so():
    _, optimizer, scheduler = small_optimizer(Config(bias_decay=False))
    for group in optimizer.param_groups:
        group["lr"] = 0.001  # the checkpoint's lr after one drop
    new = Config(bias_decay=False, lr=0.05, momentum=0.8, weight_decay=1e-3, patience=4)
    changes = [("lr", 0.01, 0.05), ("momentum", 0.9, 0.8), ("weight_decay", 5e-4, 1e-3), ("patience", 2, 4)]
    with LogLines("vgg") as lines:
        vresume.apply_resume_changes(changes, optimizer, scheduler, new)
    assert lines == ["lr 0.01 -> 0.05 on resume (the optimizer's lr was 0.001)", "momentum 0.9 -> 0.8 on resume",
                     "weight_decay 0.0005 -> 0.001 on resume", "patience 2 -> 4 on resume"]
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (0.05, 0.8, 1e-3), (0.05, 0.8, 0.0)]  # biases keep no decay
    assert scheduler.patience == 4
    # The lr unchanged: the restored (dropped) lr stays; a restored lr equal to the old one is not noted.
    _, optimizer, scheduler = small_optimizer(Config())
    for group in optimizer.param_groups:
        group["lr"] = 0.001
    with LogLines("vgg") as lines:
        vresume.apply_resume_changes([("epochs", 74, 80)], optimizer, scheduler, Config(epochs=80))
    assert lines == ["epochs 74 -> 80 on resume"] and optimizer.param_groups[0]["lr"] == 0.001
    _, optimizer, scheduler = small_optimizer(Config())
    with LogLines("vgg") as lines:
        vresume.apply_resume_changes([("lr", 0.01, 0.02)], optimizer, scheduler, Config(lr=0.02))
    assert lines == ["lr 0.01 -> 0.02 on resume"]


def test_restore_training_state_refuses_a_misfit_optimizer_in_one_line(tmp_path):
    model, optimizer, scheduler = small_optimizer(Config(bias_decay=False))  # two param groups
    _, one_group, _ = small_optimizer(Config())
    ckpt = {"model": model.state_dict(), "optimizer": one_group.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {}}
    with pytest.raises(UserError, match=r"^x.pt: its optimizer, scheduler or RNG state does not fit this run: "
                                        r"ValueError: loaded state dict has a different number of parameter groups"):
        vresume.restore_training_state(ckpt, Path("x.pt"), model, optimizer, scheduler)


def test_stale_temp_files_of_a_killed_save_are_removed(tmp_path):
    (tmp_path / "last.pt.k2x9a1.tmp").write_bytes(b"half")
    (tmp_path / "best.pt.q7w3e0.tmp").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("not ours")
    (tmp_path / "last.pt").write_bytes(b"whole")
    with LogLines("vgg") as lines:
        vresume.remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
    assert lines == [f"removed 2 stale temp file(s) of an interrupted save from {tmp_path}"]
    with LogLines("vgg") as lines:
        vresume.remove_stale_temp_files(tmp_path)
    assert lines == []


def test_skipped_list_round_trip(tmp_path):
    path = tmp_path / "skipped.txt"
    files = {"b.JPEG": "empty file", "a.JPEG": "truncated", "d.JPEG": "SyntaxError: bad\theader"}
    vlogs.write_skipped_list(path, files)
    assert path.read_text().startswith("a.JPEG\ttruncated\nb.JPEG\tempty file\nd.JPEG\t")
    path.write_text(path.read_text() + "c.JPEG\n\n")
    assert vlogs.read_skipped_list(path) == {**files, "c.JPEG": ""}  # a reason may hold a tab


def test_stop_flag_first_signal_wins_second_ctrl_c_stops_at_once_and_workers_ignore(monkeypatch):
    flag = vsignals.StopFlag()
    try:
        assert not flag() and flag.exit_code() == 128 + signal.SIGINT
        with LogLines("vgg") as lines:
            signal.raise_signal(signal.SIGTERM)
        assert flag() and flag.signal == signal.SIGTERM and flag.exit_code() == 128 + signal.SIGTERM
        assert lines == ["SIGTERM received: saving a checkpoint at the next step, then stopping"]
        signal.raise_signal(signal.SIGUSR1)  # a second request changes nothing
        assert flag.signal == signal.SIGTERM
        reported, killed = [], []
        workers = [types.SimpleNamespace(kill=lambda k=k: killed.append(k)) for k in range(2)]
        monkeypatch.setattr(vsignals, "report", lambda line: reported.append((line, list(killed))))
        monkeypatch.setattr(vsignals.multiprocessing, "active_children", lambda: workers)  # not pytest's own
        monkeypatch.setattr(vsignals.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
        with pytest.raises(SystemExit) as stopped:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while stopping: out at once, one line
        assert stopped.value.code == 128 + signal.SIGINT
        assert reported == [(vsignals.STOPPED_AT_ONCE, [0, 1])]  # the workers killed first, then the line
        monkeypatch.undo()
        flag.restore()  # stopping: the handler stays for the process's exit
        assert all(signal.getsignal(sig) == flag._handle for sig in vsignals.STOP_SIGNALS)
    finally:
        for sig, handler in flag.previous.items():
            signal.signal(sig, handler)
    quiet = vsignals.StopFlag()
    try:
        quiet.restore()  # no stop asked for: the handlers before it come back
        assert all(signal.getsignal(sig) == quiet.previous[sig] for sig in vsignals.STOP_SIGNALS)
    finally:
        quiet.restore()

    worker = vsignals.StopFlag()
    try:
        monkeypatch.setattr(os, "getpid", lambda: worker.pid + 1)  # as in a forked DataLoader worker
        signal.raise_signal(signal.SIGUSR1)
        assert not worker()
        monkeypatch.undo()
        signal.raise_signal(signal.SIGUSR1)
        assert worker() and worker.exit_code() == 128 + signal.SIGUSR1
    finally:
        worker.restore()


def test_load_stats_by_name_file_or_refusal(tmp_path):
    assert vrun.load_stats(Config(stats="imagenet"), tmp_path) == IMAGENET_STATS
    stats = vstats.DatasetStats(mean_rgb=(1.0, 2.0, 3.0), eigval=(0.3, 0.2, 0.1),
                               eigvec=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    (tmp_path / "stats.json").write_text(json.dumps(stats.to_dict()))
    assert vrun.load_stats(Config(stats=str(tmp_path / "stats.json")), tmp_path) == stats
    with pytest.raises(UserError, match="stats file not found: .*gone.json"):
        vrun.load_stats(Config(stats=str(tmp_path / "gone.json")), tmp_path)


def checkpoint_of(arch: str, classes, **kwargs) -> dict:
    torch.manual_seed(1)
    net = build_vgg(arch, num_classes=len(classes), width=1 / 16, fc_width=16, image_size=32, **kwargs)
    return {"model": net.state_dict(), "arch": net.arch_kwargs(), "classes": list(classes)}


def test_init_from_checkpoint_copies_its_own_kind_warm_starts_from_a_and_refuses_the_rest():
    classes = ["n01", "n02", "n03"]
    torch.manual_seed(2)
    target = build_vgg("A", num_classes=3, width=1 / 16, fc_width=16, image_size=32)
    same = checkpoint_of("A", classes)
    copied = vresume.init_from_checkpoint(target, same, "a.pt", classes)
    assert copied == list(target.state_dict())
    assert all(torch.equal(v, same["model"][k]) for k, v in target.state_dict().items())

    deeper = build_vgg("D", num_classes=3, width=1 / 16, fc_width=16, image_size=32)
    copied = vresume.init_from_checkpoint(deeper, same, "a.pt", classes)
    assert "features.0.weight" in copied and len(copied) < len(deeper.state_dict())
    assert torch.equal(deeper.state_dict()["features.0.weight"], same["model"]["features.0.weight"])

    older = {k: v for k, v in checkpoint_of("A", classes).items() if k != "classes"}  # no class list: trusted
    assert vresume.init_from_checkpoint(target, older, "a.pt", classes) == list(target.state_dict())
    with pytest.raises(UserError, match="--init-from a.pt: its 2 classes differ from this dataset's 3"):
        vresume.init_from_checkpoint(target, checkpoint_of("A", classes[:2]), "a.pt", classes)
    with pytest.raises(UserError, match="--init-from a.pt: net .* does not match this run's"):
        vresume.init_from_checkpoint(target, checkpoint_of("A", classes, dropout=0.2), "a.pt", classes)
    with pytest.raises(UserError, match="^--init-from b.pt holds net B; net D warm-starts from net A or from a net "
                                        "of its own kind$"):
        vresume.init_from_checkpoint(deeper, checkpoint_of("B", classes), "b.pt", classes)


def test_auto_stats_are_computed_from_train_with_the_configured_sample(tmp_path, monkeypatch):
    asked = []

    def fake(train_dir, **kwargs):
        asked.append((train_dir, kwargs))
        return IMAGENET_STATS

    monkeypatch.setattr(vstats, "load_or_compute_stats", fake)
    config = Config(stats="auto", stats_images=37, seed=5, progress_every_s=7.0)
    assert vrun.load_stats(config, tmp_path / "train") == IMAGENET_STATS
    assert asked == [(tmp_path / "train", {"num_images": 37, "seed": 5, "progress_every_s": 7.0})]


class ImageRecorder:
    def __init__(self):
        self.images = []

    def add_images(self, tag, images, step):
        self.images.append((tag, images, step))


def test_the_image_grid_shows_the_first_32_crops_as_the_net_sees_them_on_a_0_1_scale():
    """Colour-shifted (alphas large enough to leave 0..255), mean added back, divided by 255, clamped."""
    stats = IMAGENET_STATS
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    alphas = torch.randn(40, 3, generator=g) * 30
    writer = ImageRecorder()
    vlogs.log_augmented_images(writer, [(TrainCrop(x, alphas), torch.zeros(40), [])],
                                  BatchAugment(stats, torch.device("cpu"), color_shift_std=0.1))
    ((tag, grid, step),) = writer.images
    assert (tag, step, grid.shape) == ("train/augmented_images", 0, (32, 3, 32, 32))
    eigval, eigvec = torch.tensor(stats.eigval), torch.tensor(stats.eigvec)
    shift = 255 * (alphas[:32] * 0.1 * eigval) @ eigvec.T
    expected = ((x[:32].float() + shift.view(32, 3, 1, 1)) / 255).clamp(0, 1)
    assert (expected == 0).any() and (expected == 1).any() and ((expected > 0) & (expected < 1)).any()
    torch.testing.assert_close(grid, expected, rtol=0, atol=1e-5)
    # A plain uint8 batch (no alphas), no colour shift: the crops themselves.
    vlogs.log_augmented_images(writer, [(x, torch.zeros(40), [])],
                                  BatchAugment(stats, torch.device("cpu"), color_shift_std=0.0))
    torch.testing.assert_close(writer.images[-1][1], x[:32].float() / 255, rtol=0, atol=1e-5)
