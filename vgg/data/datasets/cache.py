"""Cache files beside the data, or in the user's cache folder when the data folder is read-only.

The file list of a split and the dataset statistics are cached as JSON: first beside the data
(`<split>/.vgg_filelist.json`, `<root>/vgg_stats_*.json`), else under ~/.cache/vgg-imagenet/. So are
each split's verdicts on its files (`<split>/.vgg_checks.npz`, vgg.data.datasets.checks).
"""

import hashlib
import json
import os
from pathlib import Path


def user_cache_dir() -> Path:
    """Where caches go when the data folder is read-only: $XDG_CACHE_HOME/vgg-imagenet or ~/.cache/..."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vgg-imagenet"


def cache_paths(folder: Path, name: str) -> list[Path]:
    """The cache file beside the data first, then a per-folder file in the user cache."""
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return [folder / name, user_cache_dir() / f"{key}-{name.lstrip('.')}"]


def read_json(paths: list[Path], is_valid) -> dict | None:
    """The first cache file (in `paths` order) that parses and passes `is_valid`."""
    for path in paths:
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8 or JSON, nested too deep
            continue
        if isinstance(content, dict) and is_valid(content):
            return content
    return None


def write_json(paths: list[Path], content) -> Path | None:
    """Write atomically to the first writable location; None if none is (the cache is then skipped)."""
    return write_bytes(paths, json.dumps(content).encode())


def write_bytes(paths: list[Path], content: bytes) -> Path | None:
    """Write atomically to the first writable location; None if none is (the cache is then skipped)."""
    for path in paths:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(content)
            os.replace(tmp, path)
            return path
        except OSError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    return None
