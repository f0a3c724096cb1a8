"""Every file of a dataset checked for damage once, not once an epoch (issue 35).

vgg.data.batches.jpeg.check decodes a JPEG's last pixel (every row of every scan entropy-decoded) and reads
libjpeg's warnings: a file cut short, with or without its end marker, or with corrupt entropy data, is
DAMAGED (never trained on or evaluated: vgg.data.datasets.folders.ImageFolder hands it on as Unreadable, and the
run lists it in skipped.txt when it meets it); a harmless oddity (a PNG or CMYK file named .JPEG, extraneous
bytes before a marker) is a QUIRK, decoded by PIL as PIL decodes it; the rest is OK, decoded by
nvImageCodec. The check costs about a decode; once done, the training transform need not repeat it.

The verdicts are cached beside the split's file list (`<split>/.vgg_checks.npz`, or under
~/.cache/vgg-imagenet/ when the data folder is read-only), one per file with the size and modification
time it was checked at: a file rewritten since is checked again, the others never. The run's rank 0 checks
(vgg.training.run builds the datasets on rank 0 first), the other ranks and every DataLoader worker use its
verdicts (workers inherit them with the dataset, as numpy arrays: no per-file Python objects).
"""

import collections
import io
import logging
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vgg.data.batches import jpeg as vjpeg
from vgg.data.batches.jpeg import Check
from vgg.data.datasets.cache import cache_paths, write_bytes

CHECKS_NAME = ".vgg_checks.npz"
CHECKS_VERSION = 1  # raise when vgg.data.batches.jpeg.check changes its verdicts: every file is checked again
IN_PROCESS = 256  # fewer files to check than this: checked here, without starting a pool of processes
CHUNK = 64  # files a pool process checks per task
log = logging.getLogger(__name__)


class Checks(NamedTuple):
    """Per file (in the dataset's order): its Check (uint8 [N]) and, for quirks and damaged files, why."""

    kinds: np.ndarray
    notes: dict[int, str]

    def verdict(self, index: int) -> vjpeg.Verdict:
        return vjpeg.Verdict(Check(int(self.kinds[index])), self.notes.get(index, ""))


def check_files(root: Path, names: np.ndarray, offsets: np.ndarray) -> Checks:
    """The verdicts on the files `root/<name>`, their names as one byte buffer with offsets (as
    vgg.data.datasets.folders.ImageFolder holds them): from the cache where a file's size and modification time
    are those it was checked at, checked now otherwise (in processes of their own when many), and cached."""
    count = len(offsets) - 1
    paths = [os.path.join(root, os.fsdecode(names[offsets[i]:offsets[i + 1]].tobytes())) for i in range(count)]
    sizes, mtimes = _stat(paths)
    kinds, notes = _cached(root, names, offsets, sizes, mtimes)
    todo = [i for i in range(count) if kinds[i] == Check.UNCHECKED and sizes[i] >= 0]
    if todo:
        if len(todo) >= IN_PROCESS:
            log.info(f"checking {len(todo)} files of {root} for damage, once (cached in {CHECKS_NAME})")
        for i, verdict in zip(todo, _check_paths([paths[i] for i in todo])):
            kinds[i] = verdict.check
            if verdict.note:
                notes[i] = verdict.note
        _save(root, names, offsets, sizes, mtimes, kinds, notes)
    _log_counts(root, kinds, notes)
    return Checks(kinds, notes)


def _stat(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each file's size and modification time (ns); -1 for a file that cannot be read (it is reported
    as unreadable when met, as before)."""
    sizes, mtimes = np.full(len(paths), -1, np.int64), np.full(len(paths), -1, np.int64)
    for i, path in enumerate(paths):
        try:
            stat = os.stat(path)
        except OSError:
            continue
        sizes[i], mtimes[i] = stat.st_size, stat.st_mtime_ns
    return sizes, mtimes


def check_path(path: str) -> vjpeg.Verdict:
    """One file's verdict (vgg.data.batches.jpeg.check); DAMAGED if it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return vjpeg.Verdict(Check.DAMAGED, f"{type(e).__name__}: {e}")
    return vjpeg.check(data)


def _check_chunk(paths: list[str]) -> list[tuple[int, str]]:
    return [tuple(check_path(path)) for path in paths]


def _check_paths(paths: list[str]) -> list[vjpeg.Verdict]:
    """check_path of each, in this process for a few, else in a pool of one process per core."""
    if len(paths) < IN_PROCESS:
        return [check_path(path) for path in paths]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    with ProcessPoolExecutor(max_workers=cores, mp_context=context) as pool:
        return [vjpeg.Verdict(Check(kind), note) for chunk in pool.map(_check_chunk, chunks)
                for kind, note in chunk]


def _cached(root: Path, names, offsets, sizes, mtimes) -> tuple[np.ndarray, dict[int, str]]:
    """The cached verdicts still true of the files (same size and modification time), UNCHECKED for the others."""
    kinds, notes = np.zeros(len(sizes), np.uint8), {}
    for path in cache_paths(root, CHECKS_NAME):
        try:
            with np.load(path, allow_pickle=False) as cache:
                saved = {key: cache[key] for key in cache.files}
            if int(saved["version"]) != CHECKS_VERSION:
                continue
        except (OSError, ValueError, KeyError, EOFError):  # absent, damaged, or of another layout
            continue
        if np.array_equal(saved["names"], names) and np.array_equal(saved["offsets"], offsets):
            where = np.arange(len(sizes))
        else:  # files added or removed since: match by name
            old = saved["names"].tobytes()
            position = {old[a:b]: i for i, (a, b) in enumerate(zip(saved["offsets"][:-1], saved["offsets"][1:]))}
            where = np.array([position.get(names[offsets[i]:offsets[i + 1]].tobytes(), -1) for i in range(len(sizes))])
        found = where >= 0
        same = np.zeros(len(sizes), bool)
        same[found] = (saved["sizes"][where[found]] == sizes[found]) & (saved["mtimes"][where[found]] == mtimes[found])
        kinds[same] = saved["kinds"][where[same]]
        old_notes = dict(zip(saved["note_index"].tolist(), saved["notes"].tolist()))
        notes = {i: old_notes[int(where[i])] for i in np.flatnonzero(same).tolist() if int(where[i]) in old_notes}
        return kinds, notes
    return kinds, notes


def _save(root: Path, names, offsets, sizes, mtimes, kinds, notes: dict[int, str]) -> None:
    buffer = io.BytesIO()
    index = sorted(notes)
    np.savez(buffer, version=np.int64(CHECKS_VERSION), names=names, offsets=offsets, sizes=sizes, mtimes=mtimes,
             kinds=kinds, note_index=np.array(index, np.int64), notes=np.array([notes[i] for i in index], dtype=str))
    write_bytes(cache_paths(root, CHECKS_NAME), buffer.getvalue())


_logged: set[str] = set()


def _log_counts(root: Path, kinds: np.ndarray, notes: dict[int, str]) -> None:
    """One line per split and process counting the harmless quirks (the damaged files are listed one by one
    in skipped.txt when met)."""
    quirks = collections.Counter(re.sub(r"0x[0-9a-f]+|\d+", "N", notes.get(i, "?"))  # "N extraneous bytes before marker 0xN"
                                 for i in np.flatnonzero(kinds == Check.QUIRK).tolist())
    damaged = int((kinds == Check.DAMAGED).sum())
    if (quirks or damaged) and str(root) not in _logged:
        _logged.add(str(root))
        kinds_text = ", ".join(f"{n} {note}" for note, n in quirks.most_common(5))
        log.info(f"{root}: {sum(quirks.values())} files with harmless quirks, decoded as PIL decodes them"
                 + (f" ({kinds_text}{', ...' if len(quirks) > 5 else ''})" if quirks else "")
                 + f"; {damaged} damaged files, skipped")
