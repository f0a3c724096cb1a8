"""Stop requests: SIGINT, SIGTERM and SIGUSR1 set a flag the training loop reads at its sync points, so
every rank stops at the same step and the run saves there.
"""

import os
import signal

from vgg.core.distributed import all_reduce_max
from vgg.core.progress import get_logger

log = get_logger()


# The signals that ask a run to stop at its next sync point, save last.pt and exit with 128 + signal:
# Ctrl-C; SIGTERM (kill, and SLURM's preemption or scancel); SIGUSR1 (the warning SLURM sends before
# the time limit, as scripts/slurm/ ask for it: that exit, 138, means "requeue me").
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """A STOP_SIGNALS signal asks the loop to stop at its next sync point, save, and exit cleanly.

    One rank's signal is enough: the loop agrees on the stop at every sync point, and `exit_code`
    agrees on the signal. DataLoader workers are forked with this handler installed, and Ctrl-C signals
    the terminal's whole process group (as SLURM's signals reach every process of a job step): the
    handler acts in the process that installed it only (workers ignore the signal; the main process
    shuts them down), so the message is printed once.
    """

    def __init__(self):
        self.signal = None
        self.pid = os.getpid()
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker
            return
        if self.signal is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop right away
                raise KeyboardInterrupt
            return  # (a batch script's forwarded USR1 and SLURM's own, say: one stop is enough)
        self.signal = signum
        log.warning(f"{signal.Signals(signum).name} received: saving a checkpoint at the next step, then stopping")

    def __call__(self) -> bool:
        return self.signal is not None

    def exit_code(self) -> int:
        """128 + the signal, the same on every rank (the highest any rank got; SIGINT on none): called by
        every rank once the loop has agreed to stop, so a rank that got no signal exits like the one that did."""
        return 128 + all_reduce_max(int(self.signal or signal.SIGINT))
