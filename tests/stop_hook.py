"""A stop signal at a chosen optimizer step of a real train.py subprocess, for tests that resume from it.

Sending the signal when the run prints a progress line races the run: the line is printed before that
step's sync, where a stop is agreed on, and the test process needs time to read it and send the signal,
so the stop lands at that step or at a later one depending on the machine's load (tests/test_bit_exact.py's
`epoch 0: 4/4 steps` case once stopped at the epoch's last step under load, and on the next step after
validation when rerun). Here the run sends the signal to itself, inside its N-th optimizer step (a
`sitecustomize` on PYTHONPATH wraps torch.optim.SGD.step): a real signal, through the run's own handler,
agreed on at the sync that follows that step (`--log-every 1`), whatever the load.
"""

import os
import signal
import textwrap
from pathlib import Path

from conftest import subprocess_env

HOOK = textwrap.dedent("""
    # Test hook (tests/stop_hook.py): send VGG_TEST_STOP_SIGNAL to this process during its
    # VGG_TEST_STOP_AT-th optimizer step, on rank VGG_TEST_STOP_RANK only.
    import os

    import torch

    _step, _calls = torch.optim.SGD.step, [0]

    def step(self, *args, **kwargs):
        _calls[0] += 1
        if (_calls[0] == int(os.environ["VGG_TEST_STOP_AT"])
                and os.environ.get("RANK", "0") == os.environ["VGG_TEST_STOP_RANK"]):
            os.kill(os.getpid(), int(os.environ["VGG_TEST_STOP_SIGNAL"]))
        return _step(self, *args, **kwargs)

    torch.optim.SGD.step = step
""")


def stop_env(folder: Path, at_step: int, sig: signal.Signals = signal.SIGTERM, rank: int = 0) -> dict:
    """subprocess_env() for a train.py whose process of `rank` gets `sig` in its `at_step`-th optimizer step
    (counted from 1 in that process, resumed steps not counted: a resumed run runs without this env)."""
    hook = folder / "stop-hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = subprocess_env()
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
    env.update(VGG_TEST_STOP_AT=str(at_step), VGG_TEST_STOP_SIGNAL=str(int(sig)), VGG_TEST_STOP_RANK=str(rank))
    return env
