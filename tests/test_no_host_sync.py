"""Issue 16: a training step between log points makes the host wait for the device nowhere.

On CUDA a step stalls the host (a cudaStreamSynchronize) wherever it reads a device value (`.item()`,
`float(t)`, `.tolist()`, `.cpu()`: aten._local_scalar_dense or a device-to-host copy), makes a
blocking host-to-device copy, or builds a tensor on the device from host data (`torch.tensor(list,
device=...)`, `torch.as_tensor(tuple, device=...)`: a pageable copy, blocking too). No GPU here, so
the steps run on the 'meta' device, which has every op's shapes but no data: a `StepRecorder`
(a TorchDispatchMode) sees every aten op, fakes the device-to-host reads the log points need (zeros)
and, per step, records
  * the reads of device values (_local_scalar_dense, copies from the device to the CPU);
  * the copies from the CPU to the device, with their source tensor and whether non_blocking;
  * device tensors that no op made and no earlier step used: tensors built from host data outside
    the dispatcher (torch.as_tensor/torch.tensor on a device dispatch no op at all), i.e. a constant
    re-sent to the device every step.
Only the batch itself may cross (images, alphas, labels: one non_blocking copy each, from pinned
memory in training), and only the log points may read device values.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vgg.data.batches.decode import Unreadable
from vgg.data.batches.transforms import TrainCrop
from vgg.data.datasets.stats import IMAGENET_STATS
from vgg.models.vgg import build_vgg
from vgg.training.loop import train_one_epoch
from vgg.training.step import BatchAugment

aten = torch.ops.aten
DEVICE = torch.device("meta")  # stands in for CUDA: a device that is not the CPU
STEPS, LOG_EVERY, PLACEHOLDER_STEP = 8, 4, 5  # log points after steps 4 and 8 (1-based)


class Step:
    def __init__(self, batch: list[torch.Tensor]):
        self.batch = batch  # the loader's (CPU) tensors of this step: the only ones allowed to cross
        self.scalar_reads = 0  # _local_scalar_dense: .item(), float(t), bool(t), ...
        self.device_to_host = 0  # .cpu(), .tolist(), .to("cpu") of a device tensor
        self.host_to_device = []  # (source tensor, non_blocking)
        self.from_nowhere = []  # device tensors no op made and no earlier step used


class StepRecorder(TorchDispatchMode):
    """Records the host-device traffic of each step (a step starts when the loader hands out a batch)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.steps: list[Step] = []
        self.setup = Step([])  # ops before the first batch
        self.known: dict[int, torch.Tensor] = {}  # id -> device tensor made by an op or used in a step
        # (the dict holds them, so no id is reused while recording; meta tensors have no storage)

    def begin_step(self, batch: list[torch.Tensor]) -> None:
        self.steps.append(Step(batch))

    def _on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.device.type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        step = self.steps[-1] if self.steps else self.setup
        for t in tree_leaves((args, kwargs)):
            if self._on_device(t) and id(t) not in self.known:
                step.from_nowhere.append(t)
                self.known[id(t)] = t
        if func is aten._local_scalar_dense.default:
            step.scalar_reads += 1
            if self._on_device(args[0]):  # no data on meta: a zero of the right kind
                return 0
        if func is aten._to_copy.default and self._on_device(args[0]) \
                and torch.device(kwargs.get("device") or args[0].device).type == "cpu":
            step.device_to_host += 1
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        # (under inference_mode, Tensor.to reaches the dispatcher as aten.to.dtype_layout, not _to_copy)
        if func in (aten._to_copy.default, aten.to.dtype_layout) and isinstance(args[0], torch.Tensor) \
                and args[0].device.type == "cpu" and torch.device(kwargs.get("device") or "cpu").type == self.device.type:
            step.host_to_device.append((args[0], bool(kwargs.get("non_blocking", False))))
        if func is aten.copy_.default and self._on_device(args[0]) and args[1].device.type == "cpu":
            step.host_to_device.append((args[1], bool(args[2] if len(args) > 2 else kwargs.get("non_blocking"))))
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if self._on_device(t):
                self.known[id(t)] = t
        return out


def batches(recorder: StepRecorder, generator: torch.Generator):
    """STEPS training batches as the CPU loader yields them (TrainCrop, labels, unreadable), the one at
    PLACEHOLDER_STEP all unreadable (a zero-weight placeholder step); each tells the recorder a step begins."""
    made = []
    for i in range(STEPS):
        if i == PLACEHOLDER_STEP:
            made.append((torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
                         [Unreadable("gone.JPEG", "empty file")]))
            continue
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator)
        made.append((TrainCrop(images, torch.randn(4, 3, generator=generator)),
                     torch.randint(0, 4, (4,), generator=generator), []))
    for images, labels, unreadable in made:
        recorder.begin_step([*(images if isinstance(images, TrainCrop) else [images]), labels])
        yield images, labels, unreadable


def record_epoch() -> StepRecorder:
    with torch.device(DEVICE):
        model = build_vgg("A", num_classes=4, width=0.0625, fc_width=16, image_size=32, init="xavier")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    augment = BatchAugment(IMAGENET_STATS, DEVICE, color_shift_std=0.1, generator=torch.Generator().manual_seed(0))
    recorder = StepRecorder(DEVICE)
    with recorder:
        metrics = train_one_epoch(model, batches(recorder, torch.Generator().manual_seed(1)), optimizer, augment,
                                  epoch=0, num_steps=STEPS, log_every=LOG_EVERY, bf16=False, progress_every_s=0)
    assert metrics["step"] == STEPS  # (the metrics themselves are the recorder's zeros)
    assert len(recorder.steps) == STEPS
    return recorder


@pytest.fixture(scope="module")
def recorded() -> StepRecorder:
    return record_epoch()


def test_the_recorder_sees_the_log_points_syncs(recorded):
    """The log points read the sums back (and send the host's counters): proof that the recorder sees
    device reads, which the other steps must not make."""
    for k in (LOG_EVERY - 1, STEPS - 1):
        assert recorded.steps[k].device_to_host + recorded.steps[k].scalar_reads >= 1, k


def test_no_step_reads_the_device_between_log_points(recorded):
    for k, step in enumerate(recorded.steps):
        if (k + 1) % LOG_EVERY:
            assert step.scalar_reads == 0 and step.device_to_host == 0, (k, step.scalar_reads, step.device_to_host)


def test_only_the_batch_crosses_to_the_device_and_without_blocking(recorded):
    """Between log points the only host-to-device copies are the batch's own tensors, non_blocking;
    the zero-weight placeholder step copies nothing (its black image is made on the device)."""
    for k, step in enumerate(recorded.steps):
        if (k + 1) % LOG_EVERY == 0:
            continue
        sources = [src for src, _ in step.host_to_device]
        assert all(any(src is own for own in step.batch) for src in sources), (k, [s.shape for s in sources])
        assert all(non_blocking for _, non_blocking in step.host_to_device), k
        if k == PLACEHOLDER_STEP:
            assert sources == [], [s.shape for s in sources]
        else:  # images, alphas and labels, each once
            assert len(sources) == 3 and {id(s) for s in sources} == {id(t) for t in step.batch}, k


def test_no_constant_is_sent_to_the_device_each_step(recorded):
    """After the first step every device tensor a step uses was made by an op or used before (the net's
    weights, the optimizer's buffers, the mean RGB and PCA basis made once): nothing new from host data."""
    assert recorded.steps[0].from_nowhere  # the weights, first seen in step 1: the recorder tracks them
    for k, step in enumerate(recorded.steps[1:], start=1):
        assert step.from_nowhere == [], (k, [(tuple(t.shape), t.dtype) for t in step.from_nowhere])


def test_the_evaluator_sends_each_batch_and_nothing_else():
    """The evaluator's per-batch work (vgg.evaluation.runner._NetRunner.evaluate: normalise once, dense and
    multi-crop) copies the batch to the device and nothing else: the mean RGB goes there once, when
    the runner is built, not as a list of numbers on every batch."""
    from pathlib import Path

    from vgg.evaluation.methods import DENSE, MULTI_CROP
    from vgg.evaluation.nets import EvalNet
    from vgg.evaluation.runner import _NetRunner

    torch.manual_seed(0)
    model = build_vgg("A", num_classes=5, width=1 / 16, fc_width=32, image_size=32).eval()
    net = EvalNet(name="A", path=Path("a.pt"), model=model, classes=list("abcde"), mean_rgb=[120.0, 110.0, 100.0],
                  crop_size=32, scale_min=36, scale_max=36, scales=[36], config={})
    recorder = StepRecorder(DEVICE)
    with recorder, torch.inference_mode():
        runner = _NetRunner(net, DEVICE, channels_last=True)
        for _ in range(3):
            batch = torch.zeros(2, 3, 36, 48, dtype=torch.uint8)
            recorder.begin_step([batch])
            runner.evaluate(batch, [DENSE, MULTI_CROP])
    assert len(recorder.steps) == 3
    # (the first batch also copies the multi-crop net's weights over: it is made on first use)
    assert any(source is recorder.steps[0].batch[0] for source, _ in recorder.steps[0].host_to_device)
    for step in recorder.steps[1:]:
        assert [(source is step.batch[0], non_blocking) for source, non_blocking in step.host_to_device] \
            == [(True, True)]
    assert all(step.scalar_reads == 0 and step.device_to_host == 0 for step in recorder.steps)
    assert [len(step.from_nowhere) for step in recorder.steps[1:]] == [0, 0]  # no constant re-sent
