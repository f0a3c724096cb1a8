"""The per-batch and per-epoch loops of vgg/training/loop.py, on a tiny net and in-memory batches, against
hand-computed results: the batch's colour shift, top-k hits, the weighted SGD step, the epoch's
sums and syncs (logging, checkpoints, stop requests, a resumed epoch's start), NaN detection and
validation's counting."""

import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F
from test_hardening_ddp_data import LogLines

from vgg.data.batches.decode import Unreadable
from vgg.data.batches.transforms import TrainCrop, normalize
from vgg.data.datasets.stats import DatasetStats
from vgg.models.vgg import build_vgg
from vgg.training.loop import train_one_epoch, validate
from vgg.training.step import BatchAugment, NonFiniteLossError, topk_hits, train_step

CPU = torch.device("cpu")
STATS = DatasetStats(mean_rgb=(150.0, 60.0, 20.0), eigval=(0.2, 0.02, 0.004),
                     eigvec=((0.6, 0.7, 0.4), (0.6, 0.0, -0.8), (0.6, -0.7, 0.4)))


def net(dropout: float = 0.0, num_classes: int = 7):
    torch.manual_seed(0)
    return build_vgg("A", num_classes=num_classes, width=1 / 16, fc_width=16, image_size=32, dropout=dropout,
                     init="xavier")


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def labelled(n: int, seed: int, num_classes: int = 7, unreadable: int = 0):
    g = torch.Generator().manual_seed(seed + 1000)
    return (images(n, seed), torch.randint(0, num_classes, (n,), generator=g),
            [Unreadable(f"/data/train/n0/bad{seed}_{k}.JPEG", "truncated") for k in range(unreadable)])


def empty_batch(unreadable: int):
    return (torch.empty(0, 3, 32, 32, dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
            [Unreadable(f"/data/train/n0/empty{k}.JPEG", "empty file") for k in range(unreadable)])


def hand_shift(alphas: torch.Tensor, std: float) -> torch.Tensor:
    """AlexNet §4.1: sum_i alpha_i * std * lambda_i * p_i (p_i: column i of eigvec), times 255."""
    eigvec = torch.tensor(STATS.eigvec)
    shift = torch.zeros(alphas.shape[0], 3)
    for b in range(alphas.shape[0]):
        for i in range(3):
            shift[b] += alphas[b, i] * std * STATS.eigval[i] * eigvec[:, i]
    return 255 * shift


# --- BatchAugment ----------------------------------------------------------------------------------

def test_batch_augment_shifts_a_training_crop_by_its_own_alphas():
    x = images(3, 1)
    alphas = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [-1.5, 3.0, 2.0]])
    augment = BatchAugment(STATS, CPU, color_shift_std=0.3, generator=torch.Generator().manual_seed(5))
    out = augment(TrainCrop(x, alphas), train=True)
    expected = x.float() - torch.tensor(STATS.mean_rgb).view(1, 3, 1, 1) + hand_shift(alphas, 0.3).view(3, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-3)
    # Not training, or no colour shift asked for: the mean is subtracted and nothing else.
    unshifted = x.float() - torch.tensor(STATS.mean_rgb).view(1, 3, 1, 1)
    torch.testing.assert_close(augment(TrainCrop(x, alphas), train=False), unshifted, rtol=0, atol=1e-4)
    plain = BatchAugment(STATS, CPU, color_shift_std=0.0)
    torch.testing.assert_close(plain(TrainCrop(x, alphas), train=True), unshifted, rtol=0, atol=1e-4)


def test_batch_augment_draws_a_plain_batchs_alphas_from_its_generator():
    x = images(4, 2)
    out = BatchAugment(STATS, CPU, color_shift_std=0.2, generator=torch.Generator().manual_seed(7))(x, train=True)
    alphas = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    expected = normalize(x, STATS.mean_rgb) + hand_shift(alphas, 0.2).view(4, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-3)
    assert BatchAugment(STATS, CPU).color_shift_std == 0.1  # AlexNet's std is the default


def test_batch_augment_channels_last():
    x = images(2, 3)
    out = BatchAugment(STATS, CPU, channels_last=True)(x, train=False)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, normalize(x, STATS.mean_rgb))
    assert not BatchAugment(STATS, CPU)(x, train=False).is_contiguous(memory_format=torch.channels_last)


# --- topk_hits --------------------------------------------------------------------------------------

def test_topk_hits_against_ranks():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.0, 0.5, 0.2, 0.4],   # order: 1, 4, 6, 2, 5, 0, 3
                           [0.7, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])  # order: 0, 6, 5, 4, 3, 2, 1
    labels = torch.tensor([2, 1])  # rank 4 (top-4, not top-3), rank 7 (last)
    hits = topk_hits(scores, labels, ks=(1, 3, 4, 5))
    assert hits.dtype == torch.bool
    assert hits.tolist() == [[False, False], [False, False], [True, False], [True, False]]
    assert topk_hits(scores, torch.tensor([1, 0])).tolist() == [[True, True], [True, True]]  # default (1, 5)
    assert topk_hits(scores, torch.tensor([3, 1])).tolist() == [[False, False], [False, False]]
    # Fewer classes than k: top-k is every class.
    three = torch.tensor([[0.2, 0.5, 0.3]])
    assert topk_hits(three, torch.tensor([0]), ks=(1, 2, 5)).tolist() == [[False], [False], [True]]


# --- train_step ----------------------------------------------------------------------------------

def test_train_step_weight_scales_the_update_and_the_loss_is_returned_unweighted():
    x, y, _ = labelled(6, 4)
    inputs = normalize(x, STATS.mean_rgb)
    deltas, losses = [], []
    for weight in (0.0, 1.0, 2.5):
        model = net()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)  # plain SGD: the update is lr * grad
        logits, loss = train_step(model, inputs, y, optimizer, bf16=False, weight=weight)
        assert not logits.requires_grad and not loss.requires_grad
        with torch.no_grad():
            expected = F.cross_entropy(net()(inputs), y)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        losses.append(loss.item())
        deltas.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    assert all(torch.equal(d, torch.zeros_like(d)) for d in deltas[0])  # weight 0: no change
    assert any(d.abs().sum() > 0 for d in deltas[1])
    for d1, d25 in zip(deltas[1], deltas[2]):
        torch.testing.assert_close(d25, 2.5 * d1, rtol=1e-3, atol=1e-7)


def test_train_step_starts_each_step_from_fresh_gradients():
    """Two steps of plain SGD equal two hand-made steps: the first step's gradient is not added again."""
    model, reference = net(), net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for seed in (5, 6):
        x, y, _ = labelled(4, seed)
        inputs = normalize(x, STATS.mean_rgb)
        train_step(model, inputs, y, optimizer, bf16=False)
        grads = torch.autograd.grad(F.cross_entropy(reference(inputs), y), list(reference.parameters()))
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p -= 0.05 * g
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


# --- train_one_epoch: the sums and the syncs ---------------------------------------------------------

class Recorder:
    """A SummaryWriter stand-in: every add_scalar call."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def steps(self, tag):
        return [step for t, _, step in self.scalars if t == tag]

    def values(self, tag):
        return [value for t, value, _ in self.scalars if t == tag]


def brute_force(model, batches) -> tuple[float, float, float, int]:
    """[loss * images, top-1 hits, top-5 hits, images] of the (unchanging: lr 0) net on the batches."""
    loss_sum, top1, top5, count = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y, _ in batches:
            if len(y) == 0:
                continue
            logits = model(normalize(x, STATS.mean_rgb))
            order = logits.argsort(dim=1, descending=True)
            rank = (order == y[:, None]).float().argmax(dim=1)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            top1 += int((rank < 1).sum())
            top5 += int((rank < 5).sum())
            count += len(y)
    return loss_sum, top1, top5, count


def test_epoch_metrics_are_the_sums_over_every_step():
    """lr 0 keeps the net fixed, so the epoch's loss and errors equal a brute-force pass over its batches."""
    model = net()
    batches = [labelled(5, 10), labelled(3, 11, unreadable=1), empty_batch(2), labelled(6, 12), labelled(4, 13)]
    expected = brute_force(model, batches)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    augment = BatchAugment(STATS, CPU, color_shift_std=0.0)
    metrics = train_one_epoch(model, batches, optimizer, augment, epoch=0, num_steps=5, log_every=2, bf16=False)
    loss_sum, top1, top5, count = expected
    assert count == 18 and 0 < top1 < top5 < count  # the batches tell top-1 from top-5
    assert metrics["step"] == 5 and not metrics["interrupted"]
    assert metrics["images"] == 18 and metrics["skipped"] == 3
    assert metrics["loss"] == pytest.approx(loss_sum / 18, rel=1e-5)
    assert metrics["top1_err"] == pytest.approx(100 * (1 - top1 / 18))
    assert metrics["top5_err"] == pytest.approx(100 * (1 - top5 / 18))
    assert metrics["sums"] == pytest.approx([loss_sum, top1, top5, 18, 3], rel=1e-5)
    assert [f.path for f in metrics["unreadable"]] == ["/data/train/n0/bad11_0.JPEG", "/data/train/n0/empty0.JPEG",
                                                       "/data/train/n0/empty1.JPEG"]
    assert metrics["epoch_time_s"] > 0 and metrics["images_per_s"] > 0 and 0 <= metrics["data_wait_fraction"] <= 1


def test_epoch_logs_at_every_sync_against_the_global_step():
    """Syncs every log_every steps and at the epoch's last; scalars on the global step epoch * num_steps + step."""
    model = net()
    batches = [labelled(4, 20 + k) for k in range(7)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    writer = Recorder()
    metrics = train_one_epoch(model, batches, optimizer, BatchAugment(STATS, CPU, color_shift_std=0.0), epoch=2,
                              num_steps=7, log_every=3, writer=writer, bf16=False)
    for tag in ("train/loss", "train/top1_err", "train/top5_err", "train/lr", "speed/images_per_s",
                "speed/data_wait_fraction"):
        assert writer.steps(tag) == [17, 20, 21], tag  # steps 3, 6, 7 of epoch 2
    assert writer.values("train/lr") == [0.0] * 3
    # Each logged loss is the running mean over the steps so far.
    running = [brute_force(model, batches[:n]) for n in (3, 6, 7)]
    assert writer.values("train/loss") == pytest.approx([s[0] / s[3] for s in running], rel=1e-5)
    assert writer.values("train/top1_err") == pytest.approx([100 * (1 - s[1] / s[3]) for s in running])
    assert writer.values("train/top5_err") == pytest.approx([100 * (1 - s[2] / s[3]) for s in running])
    assert writer.values("train/loss")[-1] == pytest.approx(metrics["loss"])
    assert all(v > 0 for v in writer.values("speed/images_per_s"))
    assert all(0 <= v <= 1 for v in writer.values("speed/data_wait_fraction"))


def test_epoch_checkpoints_on_global_steps_with_the_sums_so_far():
    """checkpoint_every counts global steps: in epoch 1 of 5 steps, every 3 means steps 1 and 4 (global 6, 9)."""
    model = net()
    batches = [labelled(2, 30 + k) for k in range(5)]
    saved = []
    train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0),
                    BatchAugment(STATS, CPU, color_shift_std=0.0), epoch=1, num_steps=5, log_every=100,
                    checkpoint_every=3, bf16=False, on_checkpoint=lambda step, sums: saved.append((step, list(sums))))
    assert [step for step, _ in saved] == [1, 4]
    for step, sums in saved:
        loss_sum, top1, top5, count = brute_force(model, batches[:step])
        assert sums == pytest.approx([loss_sum, top1, top5, count, 0], rel=1e-5)
    # checkpoint_every 0: never.
    none = []
    train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0), BatchAugment(STATS, CPU), epoch=0,
                    num_steps=5, on_checkpoint=lambda step, sums: none.append(step), bf16=False)
    assert none == []


def test_a_stop_request_ends_the_epoch_at_the_next_sync():
    model = net()
    batches = [labelled(2, 40 + k) for k in range(6)]
    asked = []

    def stop_requested():  # asked at each sync; says yes from the second one on
        asked.append(True)
        return len(asked) >= 2

    metrics = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0),
                              BatchAugment(STATS, CPU), epoch=0, num_steps=6, log_every=2, bf16=False,
                              stop_requested=stop_requested)
    assert metrics["interrupted"] and metrics["step"] == 4 and metrics["images"] == 8
    assert len(asked) == 2
    done = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0), BatchAugment(STATS, CPU),
                           epoch=0, num_steps=6, log_every=2, bf16=False)
    assert not done["interrupted"] and done["step"] == 6  # by default nobody asks to stop


def test_a_resumed_epoch_runs_only_its_remaining_steps():
    """start_step 2 of 4: the loader (already started at step 2) gives more batches than needed."""
    model = net()
    batches = [labelled(3, 50 + k) for k in range(5)]
    metrics = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0),
                              BatchAugment(STATS, CPU, color_shift_std=0.0), epoch=0, num_steps=4, start_step=2,
                              log_every=1, bf16=False)
    assert metrics["step"] == 4 and metrics["images"] == 6
    assert metrics["loss"] == pytest.approx(brute_force(model, batches[:2])[0] / 6, rel=1e-5)


def test_an_empty_epoch_has_no_metrics_but_counts_its_skipped_files():
    model = net()
    metrics = train_one_epoch(model, [empty_batch(2), empty_batch(1)], torch.optim.SGD(model.parameters(), lr=0.1),
                              BatchAugment(STATS, CPU), epoch=0, num_steps=2, bf16=False)
    assert metrics["images"] == 0 and metrics["skipped"] == 3 and metrics["step"] == 2
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["top1_err"]) and math.isnan(metrics["top5_err"])


def test_the_epoch_trains_in_train_mode():
    """Dropout on in training whatever mode the net came in: two passes over one batch differ."""
    model = net(dropout=0.5).eval()
    batch = labelled(8, 60)
    runs = [train_one_epoch(model, [batch], torch.optim.SGD(model.parameters(), lr=0.0),
                            BatchAugment(STATS, CPU, color_shift_std=0.0), epoch=0, num_steps=1, bf16=False)
            for _ in range(2)]
    assert model.training and runs[0]["loss"] != runs[1]["loss"]


class Wrapped(torch.nn.Module):
    """What DDP (`module`) or torch.compile (`_orig_mod`) put around the net."""

    def __init__(self, inner, attribute: str):
        super().__init__()
        setattr(self, attribute, inner)
        self.attribute = attribute

    def forward(self, x):
        self.seen = x.detach().clone()
        return getattr(self, self.attribute)(x)


@pytest.mark.parametrize("attribute", ["module", "_orig_mod"])
def test_an_unreadable_batch_is_a_black_placeholder_of_the_nets_size(attribute):
    model = Wrapped(net(), attribute)
    metrics = train_one_epoch(model, [empty_batch(4)], torch.optim.SGD(model.parameters(), lr=0.1),
                              BatchAugment(STATS, CPU, color_shift_std=0.0), epoch=0, num_steps=1, bf16=False)
    assert metrics["images"] == 0 and metrics["skipped"] == 4 and metrics["sums"][:3] == [0.0, 0.0, 0.0]
    # Two black images (0 minus the mean; two, for batch norm), at the net's input size.
    assert model.seen.shape == (2, 3, 32, 32)
    torch.testing.assert_close(model.seen, normalize(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), STATS.mean_rgb))


def test_a_placeholder_step_leaves_batch_norms_running_statistics_alone():
    """The black placeholder images of an all-unreadable batch must not move batch norm's running
    mean, variance or count (ResNet-18 here); a readable batch does (the control)."""
    from vgg.models.zoo import build_net

    torch.manual_seed(0)
    model = build_net("resnet18", num_classes=7, image_size=32, init="default")
    buffers = lambda: {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    before = buffers()
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_one_epoch(model, [empty_batch(3)], optimizer, BatchAugment(STATS, CPU), epoch=0, num_steps=1, bf16=False)
    after = buffers()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta == [0.1] * 20
    train_one_epoch(model, [labelled(2, 5)], optimizer, BatchAugment(STATS, CPU), epoch=0, num_steps=1, bf16=False)
    after = buffers()
    assert all(not torch.equal(before[k], after[k]) for k in before)


# --- NaN/inf -----------------------------------------------------------------------------------------

def test_a_nonfinite_loss_stops_at_the_sync_and_names_the_step():
    model = net()
    with torch.no_grad():
        model.classifier[-1].bias[0] = math.inf  # inf - inf in the softmax: a NaN loss
    with pytest.raises(NonFiniteLossError, match="NaN/inf in epoch 3 before step 2; stopping. The last good"):
        train_one_epoch(model, [labelled(2, 70 + k) for k in range(4)], torch.optim.SGD(model.parameters(), lr=0.0),
                        BatchAugment(STATS, CPU), epoch=3, num_steps=4, log_every=2, bf16=False)
    # A placeholder step's loss is checked too (0 * NaN would still reach the weights).
    with pytest.raises(NonFiniteLossError):
        train_one_epoch(model, [empty_batch(1)], torch.optim.SGD(model.parameters(), lr=0.0),
                        BatchAugment(STATS, CPU), epoch=0, num_steps=1, bf16=False)


# --- validate ----------------------------------------------------------------------------------------

def test_validate_counts_a_single_image_and_an_empty_set():
    model = net()
    x, y, _ = labelled(1, 80)
    metrics = validate(model, [(x, y, [])], BatchAugment(STATS, CPU), bf16=False)
    with torch.no_grad():
        logits = model.eval()(normalize(x, STATS.mean_rgb))
    assert metrics["images"] == 1 and metrics["skipped"] == 0
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    hit = float(logits.argmax(dim=1).item() == y.item())
    assert (metrics["top1"], metrics["top1_err"]) == (100 * hit, 100 * (1 - hit))
    empty = validate(model, [empty_batch(3)], BatchAugment(STATS, CPU), bf16=False)
    assert (empty["images"], empty["skipped"], empty["loss"], empty["top1"]) == (0, 3, 0.0, 0.0)
    assert [f.path for f in empty["unreadable"]] == [f"/data/train/n0/empty{k}.JPEG" for k in range(3)]


# --- More of the epoch: the whole SGD update, a NaN in one step, progress lines, defaults --------------

def crops(n: int, seed: int):
    """A training batch as the loader hands it on: uint8 crops with their alphas, and labels."""
    g = torch.Generator().manual_seed(seed + 2000)
    return TrainCrop(images(n, seed), torch.randn(n, 3, generator=g)), torch.randint(0, 7, (n,), generator=g), []


def test_an_epoch_is_one_sgd_step_per_batch_on_its_colour_shifted_crops():
    """Momentum SGD over two batches equals train_step on each batch, mean-subtracted and shifted by
    each crop's own alphas (std 0.1) by hand; the loss sum is kept in float64, exactly."""
    batches = [crops(5, 90), crops(3, 91)]
    model, reference = net(), net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    metrics = train_one_epoch(model, batches, optimizer, BatchAugment(STATS, CPU), epoch=0, num_steps=2,
                              log_every=1, bf16=False)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    loss_sum = 0.0
    for (x, alphas), y, _ in batches:
        inputs = x.float() - torch.tensor(STATS.mean_rgb).view(1, 3, 1, 1) + hand_shift(alphas, 0.1).view(-1, 3, 1, 1)
        _, loss = train_step(reference, inputs, y, ref_optimizer, bf16=False)
        loss_sum += loss.double().item() * len(y)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), net().parameters()))
    assert metrics["images"] == 8 and metrics["sums"][0] == pytest.approx(loss_sum, rel=1e-5)


class NanOnce(torch.nn.Module):
    """The net, with NaN logits in its first forward pass only."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out * math.nan if self.calls == 1 else out


class NoStep:
    """An optimizer that never changes the weights, so one NaN loss cannot spread to later steps."""

    param_groups = [{"lr": 0.0}]

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        pass


def test_one_nonfinite_step_between_syncs_is_enough_to_stop():
    model = NanOnce(net())
    with pytest.raises(NonFiniteLossError, match=r"in epoch 0 before step 2; stopping\. The last good checkpoint "
                                                 r"is untouched; try a lower --lr"):
        train_one_epoch(model, [labelled(2, 95 + k) for k in range(3)], NoStep(), BatchAugment(STATS, CPU),
                        epoch=0, num_steps=3, log_every=2, bf16=False)
    assert model.calls == 2  # it stopped at the first sync after the NaN


def test_progress_lines_count_the_steps_and_show_the_running_metrics(capsys, caplog):
    """A log that is a file gets plain lines (every update with progress_every_s=0): steps done of the
    epoch's (a resumed epoch counts from its start step), then the running loss, top-1 error and speed."""
    caplog.set_level(logging.INFO, logger="vgg")  # (as the CLIs set it)
    model = net()
    batches = [labelled(4, 100 + k) for k in range(2)]
    with LogLines("vgg") as lines:
        metrics = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0),
                                  BatchAugment(STATS, CPU, color_shift_std=0.0), epoch=3, num_steps=3, start_step=1,
                                  log_every=1, bf16=False, progress_every_s=0)
    first = brute_force(model, batches[:1])
    assert len(lines) == 2
    assert re.fullmatch(r"epoch 3: 2/3 steps, \d+ s", lines[0]), lines
    expected = (f"loss {first[0] / first[3]:.3f}, top1_err {100 * (1 - first[1] / first[3]):.1f}%, img_s ")
    assert re.fullmatch(r"epoch 3: 3/3 steps, \d+ s, " + re.escape(expected) + r"\d+", lines[1]), lines
    assert metrics["step"] == 3


def test_by_default_an_epoch_syncs_every_20_steps_and_never_checkpoints():
    model = net()
    writer, saved = Recorder(), []
    metrics = train_one_epoch(model, [labelled(1, 110 + k) for k in range(21)], torch.optim.SGD(model.parameters(),
                              lr=0.0), BatchAugment(STATS, CPU), epoch=0, num_steps=21, bf16=False, writer=writer,
                              on_checkpoint=lambda step, sums: saved.append(step))
    assert writer.steps("train/loss") == [20, 21] and saved == [] and metrics["images"] == 21
    # The epoch's speed is its images over its time.
    assert metrics["images_per_s"] == pytest.approx(metrics["images"] / metrics["epoch_time_s"], rel=1e-6)


def test_a_resumed_epoch_with_no_step_left_is_empty():
    """A mid-epoch checkpoint saved after the epoch's last step (stopped before validation), from a
    version that kept no epoch sums: nothing is trained and nothing counted (no speed either)."""
    model = net()
    metrics = train_one_epoch(model, [], torch.optim.SGD(model.parameters(), lr=0.1), BatchAugment(STATS, CPU),
                              epoch=0, num_steps=3, start_step=3, bf16=False)
    assert (metrics["step"], metrics["images"], metrics["skipped"], metrics["images_per_s"]) == (3, 0, 0, None)
    assert metrics["sums"] == [0.0] * 5 and math.isnan(metrics["loss"]) and not metrics["interrupted"]
