"""One live run per run folder: a lock a crashed run does not leave behind, and the folders a refused run made.

Two runs on one --run-name would interleave metrics.jsonl and overwrite each other's last.pt, best.pt and
config.yaml. The run holds a POSIX record lock (`fcntl.lockf`) on RUN_LOCK in its folder while it lives:
the kernel drops it when the process ends, however it ends (kill -9 and an out-of-memory kill included),
so no stale lock ever needs removing by hand. Not `flock`: its lock belongs to the open file, which the
run's forked DataLoader workers share, so a run killed with -9 would stay locked until its orphaned
workers noticed (seconds); a record lock belongs to the process alone. The file holds the holder's pid,
for the refusal's line.
"""

import errno
import fcntl
import os
from pathlib import Path

from vgg.core.errors import UserError

RUN_LOCK = ".run.lock"


class RunLock:
    """`RunLock(folder)` holds the folder's lock until `release()` (or the process ends); UserError naming
    the holder's pid if a live process holds it."""

    def __init__(self, folder: Path):
        self.folder, self.fd = Path(folder), None
        self.path = self.folder / RUN_LOCK
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._open()
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks: run unguarded
                    os.close(fd)
                    return
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(f"{self.folder} is in use by a live run (pid {holder}): wait for it to end, "
                                "or pass another --run-name") from None
            if _same_file(fd, self.path):  # not a file the former holder removed as we opened it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise UserError(f"{self.path} is a folder, not the run's lock file: remove it, or pass another "
                            "--run-name") from None
        except OSError as e:
            raise UserError(f"cannot open the run's lock file {self.path}: {e.strerror}") from None

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (a run that opens the removed file tries again)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def missing_dirs(*paths) -> list[Path]:
    """Each path and those of its parents that do not exist yet, deepest first: what creating them makes."""
    missing = []
    for path in map(Path, paths):
        while not path.exists() and path not in missing and path != path.parent:
            missing.append(path)
            path = path.parent
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)


def remove_empty_dirs(paths) -> None:
    """Remove those of `paths` (deepest first) that are empty: what a refused run made and left unused."""
    for path in paths:
        try:
            path.rmdir()
        except OSError:  # not empty (the run wrote there), or gone
            pass
