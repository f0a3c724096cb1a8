"""The engine's speed figures, bf16 autocast and edge cases of its syncs (mutation testing of
vgg/training/loop.py found them unpinned, issue 18): figures against a scripted clock, autocast seen from
inside the net, checkpoint_every 1, and the NaN message of a step after the last log point."""

import pytest
import torch
from test_engine import CPU, STATS, Recorder, labelled, net

from vgg.training import loop as vloop
from vgg.training.loop import train_one_epoch
from vgg.training.step import BatchAugment, NonFiniteLossError, train_step


class Clock:
    """time.perf_counter for vgg.training.loop: moves only when told (starts at 1000 s, not 0)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TimedLoader:
    """Each batch takes `wait` seconds to arrive."""

    def __init__(self, clock: Clock, batches, wait: float):
        self.clock, self.batches, self.wait = clock, batches, wait

    def __iter__(self):
        for batch in self.batches:
            self.clock.now += self.wait
            yield batch


class TimedNet(torch.nn.Module):
    """Each forward takes `compute` seconds; records whether autocast was on."""

    def __init__(self, clock: Clock, compute: float):
        super().__init__()
        self.inner, self.clock, self.compute = net(), clock, compute
        self.image_size = self.inner.image_size
        self.autocast = []

    def forward(self, x):
        self.clock.now += self.compute
        self.autocast.append(torch.is_autocast_enabled(x.device.type))
        return self.inner(x)


@pytest.mark.parametrize("wait, compute, steps, images_per_s, data_wait", [
    (2.0, 3.0, 6, 0.8, 0.4),  # batches arrive after 2 s, each step computes 3 s; 4 images a step
    (0.001, 0.003, 4, 1000.0, 0.25),  # a fast machine's windows last milliseconds, not seconds
])
def test_speed_figures_follow_the_clock(monkeypatch, wait, compute, steps, images_per_s, data_wait):
    """4 images a step every wait + compute seconds, per sync window (every 2 steps) and for the
    epoch; the figures divide by the windows' lengths as they are, under a second too."""
    clock = Clock()
    monkeypatch.setattr(vloop.time, "perf_counter", clock)
    model = TimedNet(clock, compute=compute)
    writer = Recorder()
    loader = TimedLoader(clock, [labelled(4, 60 + k) for k in range(steps)], wait=wait)
    metrics = train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.0), BatchAugment(STATS, CPU),
                              epoch=0, num_steps=steps, log_every=2, writer=writer, bf16=False)
    assert writer.values("speed/images_per_s") == pytest.approx([images_per_s] * (steps // 2))
    assert writer.values("speed/data_wait_fraction") == pytest.approx([data_wait] * (steps // 2))
    assert metrics["epoch_time_s"] == pytest.approx(steps * (wait + compute))
    assert metrics["images_per_s"] == pytest.approx(images_per_s)
    assert metrics["data_wait_fraction"] == pytest.approx(data_wait)


def test_speed_figures_of_a_window_count_only_its_own_images_and_time(monkeypatch):
    """The second window is twice as slow as the first: the logged rates are per window, not running."""
    clock = Clock()
    monkeypatch.setattr(vloop.time, "perf_counter", clock)
    model = TimedNet(clock, compute=1.0)
    batches = [labelled(4, 70 + k) for k in range(4)]

    def loader():
        for k, batch in enumerate(batches):
            clock.now += 1.0 if k < 2 else 5.0
            yield batch

    writer = Recorder()
    train_one_epoch(model, loader(), torch.optim.SGD(model.parameters(), lr=0.0), BatchAugment(STATS, CPU), epoch=0,
                    num_steps=4, log_every=2, writer=writer, bf16=False)
    assert writer.values("speed/images_per_s") == pytest.approx([8 / 4, 8 / 12])
    assert writer.values("speed/data_wait_fraction") == pytest.approx([2 / 4, 12 / 16])


def test_bf16_autocast_is_on_when_asked_and_off_by_default_on_the_cpu():
    clock = Clock()
    model = TimedNet(clock, compute=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    images = torch.randn(2, 3, 32, 32) * 50
    labels = torch.tensor([1, 2])
    logits, _ = train_step(model, images, labels, optimizer)
    assert model.autocast == [False] and logits.dtype == torch.float32  # "auto": bf16 on CUDA only
    previous = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)  # so that autocast's own default is not bf16
    try:
        logits, loss = train_step(model, images, labels, optimizer, bf16=True)
    finally:
        torch.set_autocast_dtype("cpu", previous)
    assert model.autocast[-1] is True and logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    # and through an epoch: the flag reaches every step; by default it is off on the CPU
    model.autocast.clear()
    train_one_epoch(model, [labelled(2, 80), labelled(2, 81)], optimizer, BatchAugment(STATS, CPU), epoch=0,
                    num_steps=2, bf16=True)
    train_one_epoch(model, [labelled(2, 82)], optimizer, BatchAugment(STATS, CPU), epoch=0, num_steps=1)
    assert model.autocast == [True, True, False]


def test_checkpoint_every_step():
    model = net()
    saved = []
    train_one_epoch(model, [labelled(2, 90 + k) for k in range(3)], torch.optim.SGD(model.parameters(), lr=0.0),
                    BatchAugment(STATS, CPU), epoch=0, num_steps=3, log_every=100, checkpoint_every=1, bf16=False,
                    on_checkpoint=lambda step, sums: saved.append(step))
    assert saved == [1, 2]  # none at the epoch's last step: the epoch's own save follows its validation


def test_a_nonfinite_loss_after_the_last_log_point_names_its_step():
    """The loader runs out at step 3 of 5, past the sync of step 2: the closing sync names step 3."""
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [labelled(2, 100), labelled(2, 101), labelled(2, 102)]
    hook = model.register_forward_hook(lambda m, i, out: out * float("nan") if len(calls) == 3 else out)
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    with pytest.raises(NonFiniteLossError, match="in epoch 0 before step 3; stopping"):
        train_one_epoch(model, batches, optimizer, BatchAugment(STATS, CPU), epoch=0, num_steps=5, log_every=2,
                        bf16=False)
    hook.remove()
    assert len(calls) == 3


def test_an_uninterrupted_epoch_says_so_with_false():
    model = net()
    metrics = train_one_epoch(model, [labelled(2, 110)], torch.optim.SGD(model.parameters(), lr=0.0),
                              BatchAugment(STATS, CPU), epoch=0, num_steps=1, bf16=False)
    assert metrics["interrupted"] is False


def test_the_epoch_sums_are_kept_in_float64():
    """An epoch sums over a million images: the loss sum is kept in float64 (float32 keeps 7 digits)."""
    model = net()
    batches = [labelled(3 + k, 130 + k) for k in range(5)]
    expected = 0.0
    with torch.no_grad():
        for images, labels, _ in batches:
            x = BatchAugment(STATS, CPU, color_shift_std=0.0)(images, train=False)
            expected += torch.nn.functional.cross_entropy(model(x), labels).double().item() * len(labels)
    metrics = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0),
                              BatchAugment(STATS, CPU, color_shift_std=0.0), epoch=0, num_steps=5, log_every=100,
                              bf16=False)
    assert metrics["sums"][0] == pytest.approx(expected, rel=1e-13, abs=0)
