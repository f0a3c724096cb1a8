"""Putting ImageNet's files in place for vgg.data.datasets.prepare: the `Writer` (DEST/<split>/<wnid>/<name>,
each file linked, copied or written out of an archive under a hidden name and renamed into place; a
repeated run leaves what is there alone), the tar archives read as a stream, with one line for an
archive cut short.
"""

import contextlib
import itertools
import json
import lzma
import os
import shutil
import tarfile
import zlib
from collections import Counter
from pathlib import Path

from vgg.core.errors import UserError
from vgg.core.progress import get_logger, progress_bar
from vgg.data.datasets.folders import IMG_EXTENSIONS
from vgg.data.datasets.labels import _check_name

log = get_logger()

DONE_NAME = ".vgg_prepared.json"


def is_image(name: str) -> bool:
    """An image file's name (by its extension, as ImageFolder takes it), not a hidden file's."""
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


class Writer:
    """Puts files at DEST/<split>/<wnid>/<name> and counts what it did (linked, symlinked, copied,
    extracted, present). Every file is written under a hidden temporary name and renamed into
    place, so an interrupted run leaves no half file under a real name."""

    def __init__(self, dest, copy: bool = False):
        self.dest, self.copy, self.counts = Path(dest), copy, Counter()
        self.dest.mkdir(parents=True, exist_ok=True)

    def target(self, split: str, wnid: str, name: str) -> Path | None:
        """DEST/split/wnid/name, its folder made; both names must be plain."""
        folder = self.dest / split / _check_name("wnid", wnid, str(self.dest))
        folder.mkdir(parents=True, exist_ok=True)
        return folder / _check_name("file name", name, str(folder))

    def _present(self, path: Path, size: int) -> bool:
        if path.exists() and path.stat().st_size == size:
            self.counts["present"] += 1
            return True
        return False

    def link(self, split: str, wnid: str, source: Path, name: str | None = None) -> None:
        path = self.target(split, wnid, name or source.name)
        if self._present(path, source.stat().st_size):
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        how = "copied"
        if not self.copy:
            try:
                os.link(source, tmp)
                how = "linked"
            except OSError:  # another file system, or one without hard links
                try:
                    os.symlink(source.resolve(), tmp)
                    how = "symlinked"
                except OSError:
                    pass
        if how == "copied":
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
        self.counts[how] += 1

    def extract(self, split: str, wnid: str, name: str, fileobj, size: int, where: str = "") -> None:
        """An archive member -> DEST/split/wnid/name. A file already there (files are renamed into place
        whole, so it is complete) with the same bytes is left alone: a rerun, or the same image in two
        archives. One with other bytes is another image of the same name (two of Hugging Face's
        tarballs holding one `<name>_<wnid>.JPEG`): this one is kept as `<name>_2.JPEG` (`_3`, ...: the
        first name free or holding these bytes, the same on a rerun), with one warning line."""
        data, path = None, None
        for n in itertools.count(1):
            path = self.target(split, wnid, name if n == 1 else "{0}_{2}{1}".format(*os.path.splitext(name), n))
            if not path.exists():
                break
            if path.stat().st_size == size:
                data = fileobj.read() if data is None else data
                if path.read_bytes() == data:
                    self.counts["present"] += 1
                    return
        if path.name != name:
            log.warning(f"warning: {where or 'the archive'} holds a second {name} for {split}/{wnid}/ with other "
                        f"bytes than the one already there: kept as {path.name}")
            self.counts["renamed"] += 1
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                if data is None:
                    shutil.copyfileobj(fileobj, f)
                else:
                    f.write(data)
            os.replace(tmp, path)
        finally:  # an archive cut short (or an interrupt) leaves no half file behind, hidden or not
            tmp.unlink(missing_ok=True)
        self.counts["extracted"] += 1

    # An archive unpacked whole is recorded (name, size, mtime), so a repeated run skips it unread.
    def _done(self) -> dict:
        try:
            return json.loads((self.dest / DONE_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def archive_done(self, archive: Path) -> bool:
        return self._done().get(archive.name) == [archive.stat().st_size, archive.stat().st_mtime_ns]

    def mark_done(self, archive: Path) -> None:
        done = self._done()
        done[archive.name] = [archive.stat().st_size, archive.stat().st_mtime_ns]
        (self.dest / DONE_NAME).write_text(json.dumps(done, indent=1, sort_keys=True))


def link_all(writer: Writer, split: str, files: list[tuple[str, Path]], every_s: float) -> None:
    """(wnid, file) pairs -> DEST/split/wnid/file, with a progress bar."""
    with progress_bar(total=len(files), desc=f"{split}: linking", unit="img", every_s=every_s) as bar:
        for wnid, path in files:
            writer.link(split, wnid, path)
            bar.update(1)


def tar_members(archive: Path, every_s: float, desc: str):
    """(base name, file object, size) of every regular file in a tar (any compression), streamed in
    order, with a progress bar over the archive's bytes."""
    with open(archive, "rb") as raw, progress_bar(total=archive.stat().st_size, desc=desc, unit="B",
                                                   every_s=every_s) as bar:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    if member.isfile():
                        yield os.path.basename(member.name), tar.extractfile(member), member.size
                    bar.update(raw.tell() - bar.n)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"{archive} is not a readable tar archive: {e}") from None


def unpack(writer: Writer, split: str, archive: Path, name_to_wnid, every_s: float) -> None:
    """Every image in `archive` -> DEST/split/<wnid>/<name>, with (wnid, name) = name_to_wnid(member name)."""
    if writer.archive_done(archive):
        log.info(f"{archive.name}: unpacked by an earlier run, skipped")
        return
    with reading(archive):
        for member_name, fileobj, size in tar_members(archive, every_s, f"{split}: {archive.name}"):
            if is_image(member_name):
                wnid, name = name_to_wnid(member_name)
                writer.extract(split, wnid, name, fileobj, size, where=f"{archive.name}")
    writer.mark_done(archive)


@contextlib.contextmanager
def reading(archive: Path):
    """One line for an archive cut short or damaged while its members are read (tar_members reports only
    what tarfile raises between members; a member's bytes are read by its consumer)."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise UserError(f"{archive} is cut short or damaged ({type(e).__name__}: {' '.join(str(e).split())}): "
                        "download it again") from None
