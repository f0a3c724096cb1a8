"""Stop requests: SIGINT, SIGTERM and SIGUSR1 set a flag the training loop reads at its sync points, so
every rank stops at the same step and the run saves there.
"""

import contextlib
import multiprocessing
import os
import signal
import sys
import time

from vgg.core.distributed import all_reduce_max
from vgg.core.launch import STOP_SIGNALS, report
from vgg.core.progress import get_logger

log = get_logger()


# A second SIGINT this soon after the first is the same Ctrl-C delivered twice (to the process and, through
# a launcher or a cluster's job step, again), not a second press.
SECOND_PRESS_AFTER_S = 0.5


STOPPED_AT_ONCE = "stopped at once by a second Ctrl-C, without saving: last.pt holds the last save before it"


class StopFlag:
    """A STOP_SIGNALS signal asks the loop to stop at its next sync point, save, and exit cleanly.

    One rank's signal is enough: the loop agrees on the stop at every sync point, and `exit_code`
    agrees on the signal. DataLoader workers are forked with this handler installed, and Ctrl-C signals
    the terminal's whole process group (as SLURM's signals reach every process of a job step): the
    handler acts in the process that installed it only (workers ignore the signal; the main process
    shuts them down), so the message is printed once.

    A Ctrl-C once a stop was asked for (and SECOND_PRESS_AFTER_S or more after any Ctrl-C before it)
    ends the process at once, in the handler, with one line and exit 130: no exception unwinds through
    whatever was running (a DataLoader wait, a collective, the interpreter's exit). Checkpoints are
    written atomically, so last.pt is then the last save that finished. Once a stop was asked for,
    `restore` keeps the handler: the process is on its way out, and a Ctrl-C during its exit is a
    second one too.
    """

    def __init__(self):
        self.signal = None
        self.last_ctrl_c = -SECOND_PRESS_AFTER_S  # when SIGINT last came (time.monotonic())
        self.pid = os.getpid()
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def restore(self) -> None:
        if self.signal is not None:  # stopping: the process exits next (see above)
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker
            return
        now = time.monotonic()
        since_ctrl_c, self.last_ctrl_c = now - self.last_ctrl_c, now if signum == signal.SIGINT else self.last_ctrl_c
        if self.signal is not None:
            if signum == signal.SIGINT and since_ctrl_c >= SECOND_PRESS_AFTER_S:
                self._stop_at_once()
            return  # (a batch script's forwarded USR1 and SLURM's own, say: one stop is enough)
        self.signal = signum
        again = " (Ctrl-C again: stop at once, without saving)" if signum == signal.SIGINT else ""
        log.warning(f"{signal.Signals(signum).name} received: saving a checkpoint at the next step, then "
                    f"stopping{again}")

    @staticmethod
    def _stop_at_once() -> None:
        """A second Ctrl-C: the DataLoader workers killed first (left behind, one would print a traceback
        when its talk with this process broke off), one line, exit 130."""
        for child in multiprocessing.active_children():
            with contextlib.suppress(OSError):
                child.kill()
        report(STOPPED_AT_ONCE)
        sys.stdout.flush()
        os._exit(128 + signal.SIGINT)

    def __call__(self) -> bool:
        return self.signal is not None

    def exit_code(self) -> int:
        """128 + the signal, the same on every rank (the highest any rank got; SIGINT on none): called by
        every rank once the loop has agreed to stop, so a rank that got no signal exits like the one that did."""
        return 128 + all_reduce_max(int(self.signal or signal.SIGINT))
