"""Issue 34, round 4, the training run: a stop or a crash at any step leaves a last.pt that --resume
continues from to the uninterrupted run's end, bit for bit (an epoch's last step and a --checkpoint-every
save there included); no diverged weights saved; a finished run resumed changes nothing; a training set
with no readable image refused; a crafted momentum buffer's layout checked; the run lock covers the log
folder. In-process runs of the tiny net (test_train.tiny_config), real checkpoints and real signals.
"""

import signal

import numpy as np
import pytest
from test_bit_exact import assert_same_run, finished
from test_train import tiny_config
from test_training_loop import solid_jpegs

from vgg.core.checkpoint import load_checkpoint
from vgg.core.launch import STOP_SIGNALS
from vgg.training import epochs as vepochs
from vgg.training import run as vrun

EPOCHS, STEPS = 2, 2  # test_bit_exact.assert_same_run's two epochs; a stop at step 2 is an epoch's last


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Three classes of noisy solid-colour JPEGs: 9 training images (two batches of 4 an epoch), 6 to validate."""
    root, rng = tmp_path_factory.mktemp("small"), np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        for split, count in (("train", 3), ("val", 2)):
            solid_jpegs(root / split / f"n0000000{c}", colour, count, rng)
    return root


def property_config(root, tmp_path, run_name: str, **overrides):
    """Every step a sync point (--log-every 1) and a --checkpoint-every save, the last steps included."""
    return tiny_config(root, tmp_path, run_name=run_name, epochs=EPOCHS, steps_per_epoch=STEPS, batch_size=4,
                       log_every=1, checkpoint_every=1, workers=0, stats="imagenet", **overrides)


class Crash(BaseException):
    """A kill -9 at a sync point, in-process: nothing of the run's own stop path runs."""


@pytest.fixture
def own_signal_handlers():
    """A stopped run keeps its StopFlag's handlers (its process exits next); pytest's come back here."""
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def interrupt_at(monkeypatch, global_step: int, how: str) -> None:
    """At the sync point after optimizer step `global_step` (counted from the run's start): a real SIGTERM
    to this process ("stop": the run's StopFlag asks for a stop there), or a Crash ("crash")."""
    real = vepochs.train_one_epoch

    def interrupting(*args, epoch, num_steps, start_step, stop_requested, **kwargs):
        steps = iter(range(epoch * num_steps + start_step + 1, 10**9))  # one sync a step (--log-every 1)

        def requested():
            if next(steps) == global_step:
                if how == "crash":
                    raise Crash
                signal.raise_signal(signal.SIGTERM)
            return stop_requested()

        return real(*args, epoch=epoch, num_steps=num_steps, start_step=start_step, stop_requested=requested,
                    **kwargs)

    monkeypatch.setattr(vepochs, "train_one_epoch", interrupting)


def crash_in_validation(monkeypatch) -> None:
    """A kill -9 during the first validation: after epoch 0's last step and its --checkpoint-every save."""
    def crashing(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(vepochs, "validate", crashing)


def test_a_stop_or_a_crash_at_any_step_resumes_to_the_same_run(small_root, tmp_path, own_signal_handlers):
    """#34.1, #34.2 and the property test: stop (SIGTERM) or crash after every step k of a 2 x 2-step run
    whose every step is a sync point and a --checkpoint-every save, or crash in the first validation, then
    --resume: last.pt always resumes, and the run ends bit-identical to the uninterrupted one (weights,
    momentum, schedule, rows)."""
    vrun.run(property_config(small_root, tmp_path, "straight"))
    reference = finished(tmp_path, "straight")
    # Each stop; a crash before the last step's save is confirmed, and one in the first validation after a
    # confirmed --checkpoint-every save (a crash earlier leaves nothing, or the epoch's own save: a resume
    # from either is a case above).
    cases = [*(("stop", k) for k in range(1, EPOCHS * STEPS + 1)), ("crash", EPOCHS * STEPS), ("validation", 0)]
    for how, k in cases:
        name = f"{how}{k}"
        config = property_config(small_root, tmp_path, name)
        with pytest.MonkeyPatch.context() as mp:
            if how == "validation":
                crash_in_validation(mp)
            else:
                interrupt_at(mp, k, how)
            with pytest.raises(SystemExit if how == "stop" else Crash) as stopped:
                vrun.run(config)
        saved = load_checkpoint(tmp_path / "checkpoints" / name / "last.pt")
        expected = {"stop": ((k - 1) // STEPS, (k - 1) % STEPS + 1), "crash": (1, 0), "validation": (0, 1)}[how]
        assert (saved["epoch"], saved["step"]) == expected, (name, saved["epoch"], saved["step"])
        if how == "stop":  # saved where it stopped: after step k, an epoch's last step too
            assert stopped.value.code == 128 + signal.SIGTERM
        vrun.run(config, resume="auto")
        assert_same_run(finished(tmp_path, name), reference)
