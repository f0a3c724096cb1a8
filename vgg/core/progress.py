"""What a person watches: the rank-aware 'vgg' logger and progress bars (tqdm on a terminal, a plain
line every few seconds in a log file).
"""

import logging
import os
import sys
import time

from tqdm import tqdm


def rank_prefix() -> str:
    """"[rank k] " in a process other than rank 0 of a torchrun job (for its error lines), else ""."""
    rank = int(os.environ.get("RANK", "0"))
    return f"[rank {rank}] " if rank else ""


def get_logger() -> logging.Logger:
    return logging.getLogger("vgg")


class _TqdmHandler(logging.StreamHandler):
    """Writes each record with tqdm.write: a live progress bar is cleared, the line printed, the bar
    redrawn below it, so a log line never splits a bar mid-line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO and up; other ranks only WARNING and up, tagged with their rank."""
    logger = get_logger()
    if logger.handlers:
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        return
    handler = _TqdmHandler(sys.stderr)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


class PlainProgress:
    """A progress bar for logs that are files (`> log.txt`, SLURM): no carriage-return redraws, but one
    plain line every `every_s` seconds (0: at every update), and a last one at close if any was printed.

    Has the part of tqdm's interface the loops use: update, set_postfix, close, and `with`.
    """

    def __init__(self, *, total: int, desc: str, unit: str, every_s: float, initial: int = 0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n, self.postfix = initial, ""
        self.start = self.last_print = time.perf_counter()
        self.printed_n = None  # the count at the last printed line; None: nothing printed yet

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last_print >= self.every_s:
            self._print()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _print(self) -> None:
        self.last_print = time.perf_counter()
        self.printed_n = self.n
        elapsed = self.last_print - self.start
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        get_logger().info(f"{self.desc}: {done}, {elapsed:.0f} s" + (f", {self.postfix}" if self.postfix else ""))

    def close(self) -> None:
        if self.printed_n is not None and self.printed_n != self.n:
            self._print()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(*, total: int, desc: str, unit: str, every_s: float = 30.0, initial: int = 0,
                 enabled: bool = True):
    """A tqdm bar when stderr is a terminal; plain lines every `every_s` seconds when it is a file
    (PlainProgress); nothing shown when not `enabled` (ranks other than 0)."""
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total=total, desc=desc, unit=unit, every_s=every_s, initial=initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                leave=False)
