"""Appendix B's classifier and measures: descriptors combined over scales and nets, a linear SVM with C
chosen by cross-validation on the training split only, VOC's average precision and Caltech's mean class
recall.

Normalisation: each scale's pooled descriptor is L2-normalised, the scales are averaged or stacked, and the
result L2-normalised again ("the resulting image descriptor is L2-normalised"); several nets' descriptors
are stacked (the paper's D & E) and L2-normalised once more, so every net counts alike and every
descriptor fed to the SVM has unit norm.

SVM: scikit-learn's LinearSVC (squared hinge, L2 penalty, liblinear) one-vs-rest: for one label an image,
its own one-vs-rest over the classes; for VOC one binary SVM a class, trained without the images whose
only objects of that class are "difficult" (label 0). C: the value of `grid` with the best mean over k
folds of the training split (the paper held out 20% of the training images, one fold of five), the smaller
C on a tie; then refitted on the whole training split.
"""

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from vgg.core.errors import UserError

COMBINE = ("average", "stack")
C_GRID = (0.01, 0.1, 1.0, 10.0)
CV_FOLDS = 5


# --- Descriptors ----------------------------------------------------------------------------------

def combine_scales(per_scale: list[torch.Tensor], how: str) -> torch.Tensor:
    """[N, D] pooled descriptors, one per scale -> [N, D] (average) or [N, D * scales] (stack), unit rows."""
    if how not in COMBINE:
        raise UserError(f"--combine {how!r}; allowed: {', '.join(COMBINE)}")
    normed = [F.normalize(x.float(), dim=1) for x in per_scale]
    joined = torch.stack(normed).mean(dim=0) if how == "average" else torch.cat(normed, dim=1)
    return F.normalize(joined, dim=1)


def stack_nets(descriptors: list[torch.Tensor]) -> torch.Tensor:
    """Late fusion (Appendix B, D & E): the nets' unit descriptors stacked, then made unit again."""
    return F.normalize(torch.cat(descriptors, dim=1), dim=1)


# --- Measures -------------------------------------------------------------------------------------

def voc_ap(scores, labels, year: int) -> float:
    """Average precision of one class as VOC's devkit (VOCevalcls.m) computes it, in [0, 1].

    labels: 1 (the class is in the image), -1 (it is not), 0 (only difficult objects): the 0s count as
    neither a hit nor a false alarm. Ranked by score, highest first (ties in the given order, as MATLAB's
    sort). VOC-2007 to 2009: 11-point interpolated AP, the mean over recall thresholds t = 0, 0.1, ..., 1 of
    the highest precision at recall >= t. 2010 on: the area under the precision-recall curve made monotone
    (precision at each recall the highest at that recall or beyond).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    ranked = labels[np.argsort(-scores, kind="stable")]
    ranked = ranked[ranked != 0]  # difficult: changes neither count (the devkit's tp and fp skip them)
    positives = int((ranked > 0).sum())
    if positives == 0:
        raise UserError("no positive image to compute an AP over")
    tp, fp = np.cumsum(ranked > 0), np.cumsum(ranked < 0)
    recall, precision = tp / positives, tp / (tp + fp)
    if year < 2010:
        return float(sum(precision[recall >= t].max(initial=0.0) for t in np.arange(11) / 10) / 11)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(((recall[steps] - recall[steps - 1]) * precision[steps]).sum())


def class_recalls(predicted, labels, num_classes: int) -> np.ndarray:
    """Per-class recall (the share of each class's test images given that class); NaN for an absent class."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    hits = np.bincount(labels[predicted == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / counts, np.nan)


# --- SVMs -----------------------------------------------------------------------------------------

def _svm(c: float, seed: int):
    from sklearn.svm import LinearSVC  # scikit-learn loads in a second: only when an SVM is trained

    return LinearSVC(C=c, dual="auto", max_iter=10000, random_state=seed)


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():  # noted in the result instead (see `converged`)
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _svm(c, seed).fit(x, y)


def fit_score(x_train, y_train, x_test, c: float, seed: int, multilabel: bool) -> np.ndarray:
    """Scores [N_test, classes]: one-vs-rest SVM decision values (for VOC, one binary SVM a class)."""
    if not multilabel:
        scores = _fit(x_train, y_train, c, seed).decision_function(x_test)
        return scores[:, None] if scores.ndim == 1 else scores  # two classes: one column, for class 1
    columns = []
    for k in range(y_train.shape[1]):
        keep = y_train[:, k] != 0  # difficult-only images train no SVM of that class
        target = y_train[keep, k] > 0
        if target.all() or not target.any():  # a cross-validation fold without one side: a constant score
            columns.append(np.full(len(x_test), 1.0 if target.any() else -1.0))
            continue
        columns.append(_fit(x_train[keep], target, c, seed).decision_function(x_test))
    return np.stack(columns, axis=1)


def predictions(scores: np.ndarray) -> np.ndarray:
    """Class indices from one-vs-rest scores (one column: two classes, positive score = class 1)."""
    return (scores[:, 0] > 0).astype(np.int64) if scores.shape[1] == 1 else scores.argmax(axis=1)


def measure(scores: np.ndarray, labels: np.ndarray, num_classes: int, multilabel: bool, year: int | None):
    """Per-class AP (VOC) or recall, in percent, and their mean (classes without test positives: None)."""
    if multilabel:
        per_class = [100 * voc_ap(scores[:, k], labels[:, k], year) if (labels[:, k] > 0).any() else np.nan
                     for k in range(num_classes)]
    else:
        per_class = list(100 * class_recalls(predictions(scores), labels, num_classes))
    values = np.array(per_class, dtype=np.float64)
    if np.isnan(values).all():
        raise UserError("no class has a test image to measure")
    return float(np.nanmean(values)), [None if np.isnan(v) else float(v) for v in values]


def choose_c(x, y, num_classes: int, *, multilabel: bool, year: int | None, grid=C_GRID, folds: int = CV_FOLDS,
             seed: int = 0) -> tuple[float, dict[float, float]]:
    """C by k-fold cross-validation on the training split: (the chosen C, {C: mean validation measure})."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if multilabel:
        splitter = KFold(n_splits=min(folds, len(x)), shuffle=True, random_state=seed)
        fold_list = list(splitter.split(x))
    else:
        smallest = int(np.bincount(y, minlength=num_classes).min())
        if smallest < 2:
            raise UserError("too few training images per class to choose C by cross-validation (2 at least)")
        splitter = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
        fold_list = list(splitter.split(x, y))
    results = {}
    for c in sorted(grid):
        values = []
        for fit_on, check_on in fold_list:
            scores = fit_score(x[fit_on], y[fit_on], x[check_on], c, seed, multilabel)
            values.append(measure(scores, y[check_on], num_classes, multilabel, year)[0])
        results[c] = float(np.mean(values))
    best = max(results.values())
    return next(c for c in sorted(results) if results[c] == best), results


def evaluate_split(x: np.ndarray, split, present: np.ndarray, *, classes: list[str], multilabel: bool,
                   year: int | None, grid=C_GRID, folds: int = CV_FOLDS, seed: int = 0) -> dict:
    """One split: C chosen on its training images, the SVM refitted on all of them, measured on its test
    images. `present`: bool [N], the images with descriptors (unreadable ones are left out)."""
    train_keep, test_keep = present[split.train], present[split.test]
    train, y_train = split.train[train_keep], split.train_labels[train_keep]
    test, y_test = split.test[test_keep], split.test_labels[test_keep]
    num_classes = len(classes)
    _check_classes(y_train, y_test, classes, multilabel)
    c, cv = choose_c(x[train], y_train, num_classes, multilabel=multilabel, year=year, grid=grid, folds=folds,
                     seed=seed)
    scores = fit_score(x[train], y_train, x[test], c, seed, multilabel)
    value, per_class = measure(scores, y_test, num_classes, multilabel, year)
    return {"split": split.name, "C": c, "cv": {str(k): v for k, v in cv.items()}, "value": value,
            "per_class": per_class, "train_images": int(len(train)), "test_images": int(len(test))}


def _check_classes(y_train, y_test, classes: list[str], multilabel: bool) -> None:
    """Never a silently empty class: each needs training and test images (for VOC: positives) once the
    unreadable images are left out."""
    if multilabel:
        counts = (y_train > 0).sum(axis=0), (y_test > 0).sum(axis=0)
    else:
        counts = np.bincount(y_train, minlength=len(classes)), np.bincount(y_test, minlength=len(classes))
    for side, per_class in zip(("training", "test"), counts):
        empty = [cls for cls, n in zip(classes, per_class) if n == 0]
        if empty:
            raise UserError(f"no readable {side} image (positive, for VOC) left of class(es) {', '.join(empty[:5])}"
                            f"{' ...' if len(empty) > 5 else ''}: every class needs both")


def summarise(results: list[dict]) -> dict:
    """Mean and standard deviation (sample, n-1; 0 for one split) over the splits, per class too."""
    values = np.array([r["value"] for r in results])
    per_class = np.array([[np.nan if v is None else v for v in r["per_class"]] for r in results])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class without test images in every split
        mean_per_class = np.nanmean(per_class, axis=0)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "per_class": [None if np.isnan(v) else float(v) for v in mean_per_class], "splits": results}
