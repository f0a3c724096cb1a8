"""What a resume and the ranks carry (issue 37), through real `train.py --gpus 2 --device cpu` runs: one
uninterrupted run, and the same run stopped mid-epoch by a real SIGTERM on rank 0 and resumed. The resumed
run must end bit-identical (weights, momentum, schedule, lr-drop count, best epoch, every row's sums), so
each rank went on with exactly the images it had not trained; skipped.txt and the rows' unreadable counts
hold every rank's files; the statistics are the training set's, sampled by --seed and --stats-images.

The run: lr 1e-6 and patience 0, so val accuracy stays put and the plateau schedule drops the lr after
epochs 1 and 2; --max-lr-drops 1 ends it after epoch 2 of --epochs 5 (the count must survive the resume
for that), its best epoch is 0; the stop lands in epoch 2 (after a drop), at step 2 of 4. With --seed 39
the training set's two unreadable files are first met in epoch 2, by rank 1 before the stop and by rank 0
after it; the validation set's two are both in rank 1's share (every other image).
"""

import json
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from stop_hook import stop_env
from test_train import train_cli

from vgg.config import Config
from vgg.core.checkpoint import load_checkpoint
from vgg.core.errors import UserError
from vgg.data.batches.loaders import EpochSampler
from vgg.data.datasets import stats as vstats
from vgg.data.datasets.folders import ImageFolder
from vgg.training.logs import SKIPPED_LIST, read_skipped_list
from vgg.training.resume import check_resume_checkpoint

SEED, STATS_IMAGES, BATCH, STEPS, WORLD = 39, 30, 32, 4, 2
STOP_EPOCH, STOP_STEP = 2, 2
TIMING = ("train_epoch_time_s", "train_data_wait_fraction", "train_images_per_s")
UNREADABLE = ("_awkward_truncated", "_awkward_empty")  # the sample set's files no decoder reads


def args(sample_root, out, run_name: str) -> list[str]:
    return ["--config", "demo", "--data", str(sample_root), "--out-dir", str(out / "checkpoints"),
            "--log-dir", str(out / "runs"), "--device", "cpu", "--gpus", str(WORLD), "--workers", "1",
            "--epochs", "5", "--steps-per-epoch", str(STEPS), "--batch-size", str(BATCH), "--lr", "1e-6",
            "--patience", "0", "--max-lr-drops", "1", "--seed", str(SEED), "--stats-images", str(STATS_IMAGES),
            "--log-every", "1", "--progress-every-s", "0", "--run-name", run_name]


def outcome(out, run_name: str) -> dict:
    run_dir = out / "checkpoints" / run_name
    ckpt = load_checkpoint(run_dir / "last.pt")
    ckpt["rows"] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ckpt["skipped"] = read_skipped_list(run_dir / SKIPPED_LIST) if (run_dir / SKIPPED_LIST).is_file() else {}
    ckpt["best.pt"] = load_checkpoint(run_dir / "best.pt")
    return ckpt


@pytest.fixture(scope="module")
def runs(sample_root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ranks")
    ref = train_cli(*args(sample_root, out, "ref"), timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    at_step = STOP_EPOCH * STEPS + STOP_STEP  # rank 0's optimizer steps, counted from 1
    cut = subprocess.run([sys.executable, str(ROOT / "train.py"), *args(sample_root, out, "cut")],
                         capture_output=True, text=True, env=stop_env(out, at_step), timeout=600, cwd=ROOT)
    assert cut.returncode == 128 + signal.SIGTERM, cut.stderr[-3000:]
    stopped = load_checkpoint(out / "checkpoints" / "cut" / "last.pt")
    assert (stopped["epoch"], stopped["step"]) == (STOP_EPOCH, STOP_STEP)
    resumed = train_cli(*args(sample_root, out, "cut"), "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch {STOP_EPOCH}, step {STOP_STEP}" in resumed.stderr
    return {"ref": outcome(out, "ref"), "cut": outcome(out, "cut"), "stopped": stopped}


def test_the_reference_run_drops_the_lr_ends_on_the_plateau_and_keeps_epoch_0_as_best(runs):
    """The premises of the comparisons below: lr drops before the stop, a best epoch before it, an end by
    --max-lr-drops before --epochs."""
    ref = runs["ref"]
    assert [row["lr_drops"] for row in ref["rows"]] == [0, 1, 2]
    assert ref["epoch"] == 3 and ref["lr_drops"] == 2
    assert ref["best"]["epoch"] == 0 and ref["best.pt"]["epoch"] == 1
    assert runs["stopped"]["lr_drops"] == 1 and runs["stopped"]["best"]["epoch"] == 0


def test_the_resumed_run_ends_bit_identical_to_the_uninterrupted_one(runs):
    """Momentum buffers hold each step's gradients, so any image trained twice or left out by either rank
    after the resume shows there; the rows' sums cover the whole epoch; the lr-drop count, the best epoch
    and best.pt are those of the run that never stopped."""
    ref, cut = runs["ref"], runs["cut"]
    assert (cut["epoch"], cut["step"], cut["lr_drops"], cut["best"]) == (ref["epoch"], 0, ref["lr_drops"], ref["best"])
    assert cut["best_top1"] == ref["best_top1"] and cut["scheduler"] == ref["scheduler"]
    for name, tensor in ref["model"].items():
        assert torch.equal(tensor, cut["model"][name]), name
    assert ref["optimizer"]["param_groups"] == cut["optimizer"]["param_groups"]
    for key, state in ref["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], cut["optimizer"]["state"][key]["momentum_buffer"]), key
    assert [{k: v for k, v in row.items() if k not in TIMING} for row in cut["rows"]] == \
           [{k: v for k, v in row.items() if k not in TIMING} for row in ref["rows"]]
    assert cut["best.pt"]["epoch"] == ref["best.pt"]["epoch"]
    for name, tensor in ref["best.pt"]["model"].items():
        assert torch.equal(tensor, cut["best.pt"]["model"][name]), name


def met_unreadable(sample_root, epochs: int) -> tuple[list[set], set]:
    """The unreadable training files each epoch's steps deal to either rank (EpochSampler's order), and the
    validation set's."""
    train = ImageFolder(sample_root / "train")
    per_epoch = []
    for epoch in range(epochs):
        met = set()
        for rank in range(WORLD):
            sampler = EpochSampler(len(train), seed=SEED, rank=rank, world_size=WORLD)
            sampler.set_epoch(epoch)
            met |= {train.path(i) for i in list(sampler)[:STEPS * BATCH // WORLD]}
        per_epoch.append({p for p in met if any(u in p for u in UNREADABLE)})
    val = {p for p, _ in ImageFolder(sample_root / "val").samples if any(u in p for u in UNREADABLE)}
    return per_epoch, val


def test_skipped_files_and_counts_hold_every_ranks_files(runs, sample_root):
    """Rank 1 met every unreadable file of these runs but one: a list or count of rank 0's alone misses them;
    and the one file rank 1 met before the stop is in the resumed run's list too."""
    per_epoch, val = met_unreadable(sample_root, epochs=3)
    assert [len(files) for files in per_epoch] == [0, 0, 2] and len(val) == 2
    for name in ("ref", "cut"):
        rows, skipped = runs[name]["rows"], runs[name]["skipped"]
        assert [(row["train_skipped"], row["val_skipped"]) for row in rows] == [(len(f), 2) for f in per_epoch], name
        assert set(skipped) == set().union(*per_epoch, val), name


def test_the_statistics_are_the_training_sets_by_seed_and_stats_images(runs, sample_root):
    """Mean RGB and PCA of the --stats-images images --seed samples from train/ (not val/, not seed 0, not
    another count), the same on every rank and kept by the resume."""
    expected = vstats.compute_stats(sample_root / "train", num_images=STATS_IMAGES, seed=SEED, workers=0)[0].to_dict()
    for name in ("ref", "cut", "stopped"):
        assert runs[name]["stats"] == expected, name
    others = [vstats.compute_stats(sample_root / "train", num_images=STATS_IMAGES, seed=0, workers=0)[0],
              vstats.compute_stats(sample_root / "train", num_images=STATS_IMAGES + 1, seed=SEED, workers=0)[0],
              vstats.compute_stats(sample_root / "val", num_images=STATS_IMAGES, seed=SEED, workers=0)[0]]
    assert all(other.to_dict() != expected for other in others)


def test_each_ranks_rng_is_saved_and_a_crafted_one_is_one_line(runs, tmp_path):
    """The stop came after rank 1's batch had lost an unreadable file (fewer dropout draws): the ranks' RNG
    states differ, and the checkpoint holds both. A list of another length, or a state that does not load,
    is refused before anything is built, naming the file and the field."""
    stopped = runs["stopped"]
    states = stopped["rank_rng"]
    assert len(states) == WORLD and torch.equal(states[0]["torch"], stopped["rng"]["torch"])
    assert not torch.equal(states[0]["torch"], states[1]["torch"])
    path, config = tmp_path / "last.pt", Config(**stopped["config"])
    for crafted, message in [(states[:1], "'rank_rng' entry is not None or a list of the RNG states of its 2 "
                                          "processes"),
                             ([states[0], {**states[1], "torch": torch.zeros(3)}],
                              "'rank_rng' entry does not load as RNG states: ")]:
        with pytest.raises(UserError) as refused:
            check_resume_checkpoint({**stopped, "rank_rng": crafted}, path, config)
        assert str(refused.value).startswith(f"{path}: its {message}"), str(refused.value)
