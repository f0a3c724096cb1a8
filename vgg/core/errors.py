"""The one exception the CLIs turn into a single clear line (no traceback), the range check of a number,
and out-of-memory and full-disk detection."""

import errno
import math
import re


class UserError(ValueError):
    """Bad input from the user: unknown config or net, missing data, wrong checkpoint, too-small image.

    `train.py` and `evaluate.py` catch it and print `error: <message>` with a non-zero exit, so every
    message must name what was wrong and what is allowed.
    """


# What the allocators say: CUDA's torch.OutOfMemoryError ("CUDA out of memory. Tried to allocate 2.00 GiB"),
# the CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N
# bytes"), also when raised in a DataLoader worker and re-raised in the main process as text.
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")
_OOM_SIZE = re.compile(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)")


def out_of_memory_message(error: BaseException, advice: str) -> str | None:
    """One line for an out-of-memory error ("out of memory (tried to allocate 37.25 GiB): <advice>"),
    or None when `error` is something else (which then keeps its traceback: it is a bug)."""
    if not isinstance(error, (MemoryError, RuntimeError)):
        return None
    text = str(error)
    if not isinstance(error, MemoryError) and not any(m in text.lower() for m in _OOM_MARKERS):
        return None
    size = _OOM_SIZE.search(text)
    if size and size.group(1).endswith(" bytes"):
        size_text = f"{int(size.group(1).split()[0]) / 2**30:.2f} GiB"
    else:
        size_text = size.group(1) if size else ""
    return f"out of memory{f' (tried to allocate {size_text})' if size_text else ''}: {advice}"


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain: torch.save reports a failed write as a RuntimeError."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


MAX_SEED = 2**32 - 1  # every command's --seed: numpy's classic range; torch's seeds are derived from it


def check_range(value, low, high=None, low_open: bool = False, high_open: bool = False, *, what: str,
                flag: str = "") -> None:
    """UserError "WHAT must be in [LOW, HIGH], got VALUE (FLAG)" unless `value` is a finite number in the range
    (an open end excludes its bound; high None: no upper bound)."""
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if (isinstance(value, float) and not math.isfinite(value)) or too_low or too_high:  # ints: any size
        if high is None:
            allowed = f"{'>' if low_open else '>='} {low}"
        else:
            allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        shown = repr(value)
        raise UserError(f"{what} must be {allowed}, got {shown if len(shown) <= 30 else shown[:20] + '...'}"
                        + (f" ({flag})" if flag else ""))


def check_ranges_in(values: dict, ranges: dict) -> None:
    """check_range for each of `values` (option name -> value; None: not given) that `ranges` bounds (name ->
    (low, high[, low_open, high_open])): one UserError naming the value and its flag, --name-with-dashes."""
    for name, value in values.items():
        if name in ranges and value is not None:
            check_range(value, *ranges[name], what=name, flag=f"--{name.replace('_', '-')}")
