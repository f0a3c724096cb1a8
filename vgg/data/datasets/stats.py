"""Dataset statistics (paper §2.1; AlexNet §4.1): mean RGB and the eigen-decomposition of the RGB
covariance, computed once from a sample of training images and cached as `<root>/vgg_stats_<images>_seed<seed>.json`.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vgg.core.errors import UserError
from vgg.core.progress import progress_bar
from vgg.data.batches.loaders import build_loader, collate_list
from vgg.data.batches.transforms import EvalTransform
from vgg.data.datasets.cache import cache_paths, read_json, write_json
from vgg.data.datasets.folders import ImageFolder, warn_unreadable

log = logging.getLogger(__name__)  # a child of the "vgg" logger that vgg.core.progress sets up
STATS_NAME = "vgg_stats_{num_images}_seed{seed}.json"  # one file per setting: runs that sample the same
# data differently (the demo and `reproduce.py --scale demo`, say) each keep their own, not one they rewrite


def stats_cache_name(num_images: int, seed: int) -> str:
    return STATS_NAME.format(num_images=num_images, seed=seed)
STATS_SIDE = 64  # images are rescaled to this smallest side for the statistics (each weighs alike)


# --------------------------------------------------------------------------------------------------
# Dataset statistics (paper §2.1 mean subtraction; AlexNet §4.1 PCA colour shift)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetStats:
    """The training set's colour statistics.

    mean_rgb: mean R, G, B on the 0..255 scale (subtracted from every pixel, paper §2.1).
    eigval, eigvec: eigenvalues (descending) and eigenvectors of the 3x3 RGB covariance of pixel
    values scaled to [0, 1] (AlexNet §4.1's convention); eigvec[i][j] is component i (R, G, B) of
    eigenvector j, i.e. the columns are the eigenvectors. Their signs are arbitrary (the colour
    shift's alphas are symmetric).
    """

    mean_rgb: tuple[float, float, float]
    eigval: tuple[float, float, float]
    eigvec: tuple[tuple[float, float, float], ...]

    def to_dict(self) -> dict:
        return {"mean_rgb": list(self.mean_rgb), "eigval": list(self.eigval),
                "eigvec": [list(row) for row in self.eigvec]}

    @classmethod
    def from_dict(cls, d) -> "DatasetStats":
        """From `to_dict()`'s output (a checkpoint's "stats", a JSON file); extra keys of the stats
        cache (num_images, seed, train_dir, skipped) are allowed, anything else is an error."""
        allowed = {"mean_rgb", "eigval", "eigvec", "num_images", "seed", "train_dir", "skipped"}
        if not isinstance(d, dict):
            raise UserError(f"dataset statistics must be a mapping with keys mean_rgb, eigval, eigvec; got {d!r}")
        unknown = sorted(set(d) - allowed)
        missing = sorted({"mean_rgb", "eigval", "eigvec"} - set(d))
        if unknown or missing:
            raise UserError(f"dataset statistics: unknown keys {unknown}, missing keys {missing}; "
                            f"allowed: mean_rgb, eigval, eigvec (+ {sorted(allowed - {'mean_rgb', 'eigval', 'eigvec'})})")
        try:
            mean = np.asarray(d["mean_rgb"], dtype=np.float64)
            eigval = np.asarray(d["eigval"], dtype=np.float64)
            eigvec = np.asarray(d["eigvec"], dtype=np.float64)
        except (TypeError, ValueError):
            raise UserError(f"dataset statistics must hold numbers: {d!r}") from None
        if mean.shape != (3,) or eigval.shape != (3,) or eigvec.shape != (3, 3) or not (
                np.isfinite(mean).all() and np.isfinite(eigval).all() and np.isfinite(eigvec).all()):
            raise UserError("dataset statistics must be mean_rgb: 3 numbers, eigval: 3 numbers, "
                            f"eigvec: 3x3 numbers; got {d['mean_rgb']!r}, {d['eigval']!r}, {d['eigvec']!r}")
        return cls(mean_rgb=tuple(mean.tolist()), eigval=tuple(eigval.tolist()),
                   eigvec=tuple(tuple(row) for row in eigvec.tolist()))


def _unique_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"key {duplicates[0]!r} given twice")
    return dict(pairs)


def read_stats_file(path) -> DatasetStats:
    """A `--stats FILE`: JSON as `DatasetStats.to_dict` writes it; UserError naming the file for anything
    else (not UTF-8, not JSON, nested too deep, a key given twice, wrong values)."""
    path = Path(path)
    try:
        content = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
        return DatasetStats.from_dict(content)
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = "nested too deep" if isinstance(e, RecursionError) else " ".join(f"{type(e).__name__}: {e}".split())
        raise UserError(f"stats file {path} is not a JSON file of mean_rgb, eigval, eigvec ({reason[:200]})") from None
    except UserError as e:
        raise UserError(f"stats file {path}: {e}") from None


def is_valid_cache(content: dict, *, num_images: int, seed: int) -> bool:
    """Whether a statistics cache holds sound statistics made with num_images and seed (a damaged one is
    computed again)."""
    try:
        DatasetStats.from_dict(content)
    except UserError:
        return False
    return content.get("num_images") == num_images and content.get("seed") == seed


# The well-known ImageNet values: mean RGB as in the Caffe VGG release; the PCA of AlexNet §4.1 as
# published with fb.resnet.torch (pixels scaled to [0, 1]). Use them with `--stats imagenet`.
IMAGENET_STATS = DatasetStats(
    mean_rgb=(123.68, 116.78, 103.94),
    eigval=(0.2175, 0.0188, 0.0045),
    eigvec=((-0.5675, 0.7192, 0.4009),
            (-0.5808, -0.0045, -0.8140),
            (-0.5836, -0.6948, 0.4203)),
)


def compute_stats(train_dir, *, num_images: int, seed: int = 0, workers: int | None = None,
                  progress_every_s: float = 30.0) -> tuple[DatasetStats, int, int]:
    """Mean RGB and RGB-covariance PCA from `num_images` random training images (all if fewer).

    Each image is rescaled to a smallest side of STATS_SIDE pixels first (decoded at a reduced
    scale, so this is fast), so every image weighs about the same. Unreadable images are skipped
    (one warning each). Returns (stats, number of images used, number of images skipped).
    """
    dataset = ImageFolder(train_dir, EvalTransform(scale=STATS_SIDE))
    count = min(_check_positive("num_images", num_images), len(dataset))
    chosen = np.sort(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False))
    return stats_of_images(torch.utils.data.Subset(dataset, chosen.tolist()), where=f"the {count} sampled images in "
                           f"{train_dir}", seed=seed, workers=workers, progress_every_s=progress_every_s)


def stats_of_images(dataset, *, where: str, seed: int = 0, workers: int | None = None,
                    progress_every_s: float = 30.0) -> tuple[DatasetStats, int, int]:
    """The statistics of every image of `dataset` ((uint8 [3,H,W], label) items; unreadable ones
    skipped with one warning each) -> (stats, images used, images skipped). `where` names the
    images in the progress bar and the error raised when none can be decoded."""
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    loader = build_loader(dataset, batch_size=32, workers=workers, collate_fn=collate_list, seed=seed)
    total = np.zeros(3)
    outer = np.zeros((3, 3))
    pixels, used, skipped = 0, 0, 0
    with progress_bar(total=len(dataset), desc=f"dataset statistics ({where})", unit="img",
                      every_s=progress_every_s) as bar:
        for images, _, unreadable in loader:
            warn_unreadable(unreadable)
            for image in images:
                x = image.reshape(3, -1).double().numpy() / 255.0
                total += x.sum(axis=1)
                outer += x @ x.T
                pixels += x.shape[1]
            used, skipped = used + len(images), skipped + len(unreadable)
            bar.update(len(images) + len(unreadable))
    if pixels == 0:
        raise UserError(f"none of {where} could be decoded")
    mean = total / pixels
    cov = outer / pixels - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    eigval, eigvec = eigval[::-1].clip(min=0), eigvec[:, ::-1]
    eigvec = eigvec * np.where(eigvec[0] < 0, -1.0, 1.0)  # a fixed sign: first component >= 0
    stats = DatasetStats(mean_rgb=tuple((255.0 * mean).tolist()), eigval=tuple(eigval.tolist()),
                         eigvec=tuple(tuple(row) for row in eigvec.tolist()))
    return stats, used, skipped


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def load_or_compute_stats(train_dir, *, num_images: int, seed: int = 0, workers: int | None = None,
                          progress_every_s: float = 30.0) -> DatasetStats:
    """The training set's statistics from `<root>/vgg_stats_<num_images>_seed<seed>.json` (root: train_dir's
    parent), or computed by `compute_stats` (with a progress bar) and cached there (or under
    ~/.cache/vgg-imagenet/ when the data folder is read-only): one file for each setting."""
    train_dir = Path(train_dir)
    paths = cache_paths(train_dir.parent, stats_cache_name(num_images, seed))
    cached = read_json(paths, lambda content: is_valid_cache(content, num_images=num_images, seed=seed))
    if cached is not None:
        return DatasetStats.from_dict(cached)
    stats, used, skipped = compute_stats(train_dir, num_images=num_images, seed=seed, workers=workers,
                                         progress_every_s=progress_every_s)
    where = write_json(paths, {**stats.to_dict(), "num_images": num_images, "seed": seed,
                                "train_dir": str(train_dir), "skipped": skipped})
    # The images actually used: fewer than asked for when the folder holds fewer, minus unreadable ones.
    log.info(f"dataset statistics from {used} images of {train_dir}"
             + (f" ({skipped} unreadable skipped)" if skipped else "") + ": mean RGB "
             f"{', '.join(f'{v:.2f}' for v in stats.mean_rgb)}; eigenvalues "
             f"{', '.join(f'{v:.4f}' for v in stats.eigval)}" + (f"; cached in {where}" if where else ""))
    return stats
