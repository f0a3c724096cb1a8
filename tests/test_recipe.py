"""The training recipe of paper §3.1, pinned by behaviour: SGD's hyper-parameters and update, the
plateau schedule with its lr drops and stop, best/last checkpoints, validation metrics, the
statistics' source and the mid-epoch resume.

The plateau tests script the validation scores (vgg.training.run.validate is replaced) so that the lr
schedule a real run follows is known exactly; everything else is a real run on real JPEGs.
"""

import copy
import json
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import wait_for_each_checkpoint
from PIL import Image
from test_train import tiny_config

from vgg.config import Config
from vgg.core.checkpoint import load_checkpoint
from vgg.data.batches import loaders as vloaders
from vgg.data.batches.decode import Unreadable
from vgg.data.batches.transforms import normalize
from vgg.data.datasets import folders as vfolders
from vgg.data.datasets.stats import DatasetStats
from vgg.models.vgg import build_vgg
from vgg.training import build as vbuild
from vgg.training import epochs as vepochs
from vgg.training import recipe as vrecipe
from vgg.training import run as vrun
from vgg.training.loop import validate
from vgg.training.step import BatchAugment, train_step

# --- The paper's values are the defaults ------------------------------------------------------------


def test_config_defaults_are_the_papers_recipe():
    """§3.1: batch 256, momentum 0.9, weight decay 5e-4, dropout 0.5, lr 0.01 divided by 10 on a plateau."""
    c = Config()
    assert (c.batch_size, c.momentum, c.weight_decay, c.dropout, c.lr, c.lr_factor) == (256, 0.9, 5e-4, 0.5, 0.01, 0.1)
    assert (c.patience, c.max_lr_drops, c.epochs, c.bias_decay) == (2, 3, 74, True)


# --- The optimizer -----------------------------------------------------------------------------------

def small_net(dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    return build_vgg("A", num_classes=6, width=1 / 16, fc_width=16, image_size=32, dropout=dropout, init="xavier")


@pytest.mark.parametrize("bias_decay", [True, False])
def test_build_optimizer_is_sgd_with_momentum_and_weight_decay_on_the_right_parameters(bias_decay):
    model = small_net()
    optimizer = vrecipe.build_optimizer(model, Config(bias_decay=bias_decay))
    assert type(optimizer) is torch.optim.SGD
    for group in optimizer.param_groups:
        assert (group["lr"], group["momentum"], group["dampening"], group["nesterov"]) == (0.01, 0.9, 0, False)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names) == sum(len(g["params"]) for g in optimizer.param_groups)  # each once
    for name, p in names.items():
        expected = 5e-4 if bias_decay or not name.endswith("bias") else 0.0
        assert decay_of[id(p)] == expected, name


@pytest.mark.parametrize("bias_decay", [True, False])
def test_sgd_steps_equal_the_hand_written_momentum_and_weight_decay_update(bias_decay):
    """v <- 0.9 v + (g + 5e-4 w); w <- w - 0.01 v (Caffe's and PyTorch's SGD), three real steps."""
    model = small_net()
    reference = copy.deepcopy(model)
    optimizer = vrecipe.build_optimizer(model, Config(bias_decay=bias_decay))
    g = torch.Generator().manual_seed(0)
    velocity = {}
    for step in range(3):
        images = torch.randn(8, 3, 32, 32, generator=g) * 60
        labels = torch.randint(0, 6, (8,), generator=g)
        train_step(model, images, labels, optimizer, bf16=False)

        params = dict(reference.named_parameters())
        grads = torch.autograd.grad(F.cross_entropy(reference(images), labels), list(params.values()))
        with torch.no_grad():
            for (name, p), grad in zip(params.items(), grads):
                decay = 5e-4 if bias_decay or not name.endswith("bias") else 0.0
                d = grad + decay * p
                velocity[name] = d if step == 0 else 0.9 * velocity[name] + d
                p -= 0.01 * velocity[name]
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, dict(reference.named_parameters())[name], rtol=1e-4, atol=1e-6, msg=name)
    # The update moved every parameter, and momentum made the third step differ from a plain one.
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), small_net().parameters()))


# --- The plateau schedule, with scripted validation scores -----------------------------------------

# Validation top-1 accuracy per epoch: improve, stall, improve, stall... Equal scores are stalls too.
# With patience 2 the lr drops at the third epoch in a row without improvement (epochs 4, 8, 11);
# after max_lr_drops = 3 drops the next plateau (epoch 15) ends the run.
SCRIPTED_TOP1 = [10, 20, 20, 15, 18, 30, 25, 30, 29, 29, 29, 29, 40, 40, 39, 38]
EXPECTED_LR = [1e-2] * 5 + [1e-3] * 4 + [1e-4] * 3 + [1e-5] * 4  # the lr each epoch trains at
IMPROVED = [0, 1, 5, 12]  # epochs whose score beats every earlier one
# Top-5 error and loss improve every epoch: a schedule that followed either would never drop.


def epoch_on_disk(path):
    return load_checkpoint(path)["epoch"] if path.exists() else None


def scripted_run(sample_root, tmp, epochs: int, **overrides) -> dict:
    """A real run (one step an epoch) whose validation returns the scripted scores; what it did, epoch by epoch.

    Each test makes its own run: mutmut only runs, against a mutant, the tests during which the
    mutated function ran, and a module-scoped fixture runs during the first test alone.
    """
    config = tiny_config(sample_root, tmp, run_name="plateau", epochs=epochs, steps_per_epoch=1, workers=0,
                         stats="imagenet", log_every=1, **overrides)
    run_dir = tmp / "checkpoints" / "plateau"
    seen = {"optimizers": [], "lr": [], "weights": [], "best_on_disk": [], "last_on_disk": []}
    real_build_optimizer = vrecipe.build_optimizer

    def spy_build_optimizer(model, config):
        optimizer = real_build_optimizer(model, config)
        seen["optimizers"].append(optimizer)
        return optimizer

    def scripted_validate(model, loader, augment, **kwargs):
        epoch = len(seen["lr"])
        seen["lr"].append(seen["optimizers"][-1].param_groups[0]["lr"])  # the lr this epoch trained at
        seen["weights"].append({k: v.clone() for k, v in model.state_dict().items()})
        seen["best_on_disk"].append(epoch_on_disk(run_dir / "best.pt"))
        seen["last_on_disk"].append(epoch_on_disk(run_dir / "last.pt"))
        # Past the script (a schedule that does not stop in time): top-1 stalls, the rest improves.
        top1 = float(SCRIPTED_TOP1[min(epoch, len(SCRIPTED_TOP1) - 1)])
        return {"loss": 3.0 - 0.1 * epoch, "top1": top1, "top1_err": 100 - top1,
                "top5_err": 60.0 - 2 * epoch, "images": 100, "skipped": 0, "unreadable": []}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vbuild, "build_optimizer", spy_build_optimizer)
        mp.setattr(vepochs, "validate", scripted_validate)
        wait_for_each_checkpoint(mp)  # validation reads best.pt / last.pt, written by a background thread
        final = vrun.run(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return {**seen, "rows": rows, "final": final, "run_dir": run_dir}


def test_plateau_schedule_drops_the_lr_stops_and_keeps_the_best(sample_root, tmp_path):
    run = scripted_run(sample_root, tmp_path, epochs=30)

    # The lr each epoch trained at: divided by 10 after patience (2) epochs without improvement.
    lrs = run["lr"]
    assert len(lrs) == len(EXPECTED_LR), lrs
    for epoch, (lr, expected) in enumerate(zip(lrs, EXPECTED_LR)):
        assert lr == pytest.approx(expected, rel=1e-9), f"epoch {epoch}: lr {lr}, expected {expected}"
    assert sum(1 for a, b in zip(lrs, lrs[1:]) if b < a) == 3

    # After max_lr_drops (3) drops the next plateau ends the run: epoch 15 of at most 30.
    rows = run["rows"]
    assert [row["epoch"] for row in rows] == list(range(16))
    assert [row["val_top1"] for row in rows] == SCRIPTED_TOP1
    assert run["final"]["top1"] == SCRIPTED_TOP1[-1]
    last_ckpt = load_checkpoint(run["run_dir"] / "last.pt")
    assert (last_ckpt["epoch"], last_ckpt["step"]) == (16, 0)

    # best.pt is rewritten only on improvement, last.pt every epoch: what was on disk when each
    # epoch's validation ran (after the previous epoch's saves).
    expected_best, best = [], None
    for epoch in range(len(SCRIPTED_TOP1)):
        expected_best.append(best)
        if epoch in IMPROVED:
            best = epoch + 1  # a checkpoint's epoch counts the epochs completed
    assert run["best_on_disk"] == expected_best
    assert run["last_on_disk"] == [None] + list(range(1, 16))
    best_ckpt = load_checkpoint(run["run_dir"] / "best.pt")
    assert best_ckpt["epoch"] == IMPROVED[-1] + 1 and best_ckpt["best_top1"] == 40
    for name, tensor in best_ckpt["model"].items():  # the weights validated at epoch 12
        assert torch.equal(tensor, run["weights"][IMPROVED[-1]][name]), name
    for name, tensor in last_ckpt["model"].items():
        assert torch.equal(tensor, run["weights"][-1][name]), name
    assert not torch.equal(best_ckpt["model"]["features.0.weight"], last_ckpt["model"]["features.0.weight"])

    # The checkpointed optimizer is the paper's SGD, with its momentum buffers.
    state = last_ckpt["optimizer"]
    (group,) = state["param_groups"]  # bias_decay true: one group
    assert (group["momentum"], group["weight_decay"], group["nesterov"], group["dampening"]) == (0.9, 5e-4, False, 0)
    assert group["lr"] == pytest.approx(1e-6)  # the fourth drop, which ended the run
    num_params = sum(1 for _ in build_vgg("A", num_classes=12, width=0.125, fc_width=64, image_size=32).parameters())
    assert sorted(group["params"]) == list(range(num_params))
    assert all(state["state"][i]["momentum_buffer"].abs().sum() > 0 for i in group["params"])


def test_the_configured_lr_factor_and_patience_drive_the_schedule(sample_root, tmp_path):
    """--lr-factor 0.5 --patience 1 (not the paper's 0.1 and 2, which are also torch's defaults for
    the factor): the lr halves at the second epoch in a row without improvement (epoch 3 of
    10, 20, 20, 15, 18, 30), and the count restarts after a drop."""
    run = scripted_run(sample_root, tmp_path, epochs=6, lr_factor=0.5, patience=1)
    assert run["lr"] == pytest.approx([1e-2] * 4 + [5e-3] * 2, rel=1e-9)
    assert [row["lr_drops"] for row in run["rows"]] == [0, 0, 0, 1, 1, 1]


def test_metrics_rows_report_the_lr_each_epoch_trained_at(sample_root, tmp_path):
    """A row pairs an epoch's training metrics with the lr that produced them (not the next epoch's):
    with the first drop after epoch 4, rows 0-4 say 0.01 and row 5 says 0.001."""
    run = scripted_run(sample_root, tmp_path, epochs=6)
    assert [row["lr"] for row in run["rows"]] == pytest.approx(EXPECTED_LR[:6], rel=1e-9)


# --- Validation metrics ------------------------------------------------------------------------------

def test_validate_matches_a_brute_force_top1_top5_and_loss():
    """Eval mode (no dropout), no colour shift, every image counted once, top-5 apart from top-1."""
    model = small_net(dropout=0.5)
    stats = DatasetStats(mean_rgb=(150.0, 60.0, 20.0), eigval=(0.2, 0.02, 0.004),
                         eigvec=((0.6, 0.7, 0.4), (0.6, 0.0, -0.8), (0.6, -0.7, 0.4)))
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g) for n in (5, 7, 3)]
    with torch.no_grad():
        logits = [model.eval()(normalize(x, stats.mean_rgb)) for x in images]
    # Labels at chosen ranks of the net's own scores: first, third, sixth, last (6 classes).
    ranks = [0, 2, 5, 0, 1, 3, 4, 0, 5, 2, 0, 1, 4, 5, 3]
    order = torch.cat(logits).argsort(dim=1, descending=True)
    all_labels = order[torch.arange(15), torch.tensor(ranks)]
    labels = list(all_labels.split([5, 7, 3]))
    def unreadable(n):  # what the collate functions hand on for the files they dropped
        return [Unreadable(f"/data/val/n0/broken{i}.JPEG", "truncated") for i in range(n)]

    loader = [(images[0], labels[0], unreadable(0)),
              (torch.empty(0, 3, 32, 32, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), unreadable(2)),
              (images[1], labels[1], unreadable(1)), (images[2], labels[2], unreadable(0))]

    model.train()  # validate must switch dropout off itself
    augment = BatchAugment(stats, torch.device("cpu"), color_shift_std=0.5, generator=torch.Generator().manual_seed(0))
    metrics = validate(model, loader, augment, bf16=False)

    ranks_t = torch.tensor(ranks)
    loss = F.cross_entropy(torch.cat(logits), all_labels).item()
    assert metrics["images"] == 15 and metrics["skipped"] == 3
    assert metrics["top1"] == pytest.approx(100 * (ranks_t < 1).sum().item() / 15)  # 4 of 15
    assert metrics["top1_err"] == pytest.approx(100 - metrics["top1"])
    assert metrics["top5_err"] == pytest.approx(100 * (ranks_t >= 5).sum().item() / 15)  # 3 of 15
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    again = validate(model, loader, augment, bf16=False)
    assert again == metrics  # deterministic: no dropout, no colour shift


# --- Where the statistics come from ------------------------------------------------------------------

def solid_jpegs(folder, colour, count, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        noise = rng.normal(0, 8, (40, 48, 3))
        pixels = (np.array(colour) + noise).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=95)


def test_statistics_come_from_train_not_val(tmp_path):
    """Red training images, blue validation images: the mean in the checkpoint is red."""
    rng = np.random.default_rng(0)
    root = tmp_path / "colours"
    for wnid in ("n01", "n02"):
        solid_jpegs(root / "train" / wnid, (200, 40, 40), 8, rng)
        solid_jpegs(root / "val" / wnid, (30, 60, 220), 4, rng)
    config = tiny_config(root, tmp_path, run_name="colours", epochs=1, batch_size=8, steps_per_epoch=1, workers=0)
    vrun.run(config)
    stats = load_checkpoint(tmp_path / "checkpoints" / "colours" / "last.pt")["stats"]
    np.testing.assert_allclose(stats["mean_rgb"], [200, 40, 40], atol=6)


# --- Mid-epoch resume --------------------------------------------------------------------------------

def test_mid_epoch_resume_trains_on_exactly_the_images_not_yet_seen(sample_root, tmp_path, monkeypatch):
    """SIGINT while step 3's batch loads: the run saves at step 3 and the resume starts at image 12."""
    batch, steps = 4, 6
    config = tiny_config(sample_root, tmp_path, run_name="resume", epochs=1, batch_size=batch,
                         steps_per_epoch=steps, workers=0, stats="imagenet", log_every=1)
    train_set = vfolders.ImageFolder(sample_root / "train")
    sampler = vloaders.EpochSampler(len(train_set), seed=config.seed, rank=0, world_size=1)
    sampler.set_epoch(0)
    order = list(sampler)  # epoch 0's image order (tests/test_distributed.py pins the sampler)
    fetched = []
    interrupt_on = [order[2 * batch + 1]]  # the second image of step 3's batch (steps count from 1)
    real_getitem = vfolders.ImageFolder.__getitem__

    def recording_getitem(self, index):
        if self.root.name == "train":
            fetched.append(index)
            if index == interrupt_on[0]:
                signal.raise_signal(signal.SIGINT)
        return real_getitem(self, index)

    monkeypatch.setattr(vfolders.ImageFolder, "__getitem__", recording_getitem)
    with pytest.raises(SystemExit) as stopped:
        vrun.run(config)
    assert stopped.value.code == 128 + signal.SIGINT
    saved = load_checkpoint(tmp_path / "checkpoints" / "resume" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (0, 3)
    assert fetched[-3 * batch:] == order[:3 * batch]  # the interrupted run trained on images 0..11

    fetched.clear()
    interrupt_on[0] = -1
    vrun.run(config, resume="auto")
    assert fetched[0] == 0  # the check that the training set has a readable image (issue 34), then steps 4..6:
    assert fetched[1:1 + (steps - 3) * batch] == order[3 * batch:steps * batch]
    assert load_checkpoint(tmp_path / "checkpoints" / "resume" / "last.pt")["epoch"] == 1
