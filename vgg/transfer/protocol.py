"""Appendix B end to end once the descriptors are cached: each net's descriptor, and with several nets
their stack (the paper's D & E), through the SVM on every split; the rows of the report.
"""

from pathlib import Path

import numpy as np
import torch

from vgg.transfer.classifier import C_GRID, CV_FOLDS, combine_scales, evaluate_split, stack_nets, summarise
from vgg.transfer.datasets import TransferSet
from vgg.transfer.features import FeatureNet, image_keys, load_descriptors


def classify(tset: TransferSet, fnets: list[FeatureNet], cache: Path, *, bf16: bool, combine: str,
             grid=C_GRID, folds: int = CV_FOLDS, seed: int = 0) -> dict:
    """The result rows (one a net, then the nets stacked), each with its mean, std, per-split and per-class
    figures, and the images left out (no descriptor: unreadable)."""
    keys = image_keys(tset.root, tset.images)
    present = torch.ones(len(keys), dtype=torch.bool)
    per_net = []
    for fnet in fnets:
        by_scale, found = load_descriptors(fnet, cache, keys, bf16)
        per_net.append(combine_scales([by_scale[q] for q in fnet.net.scales], combine))
        present &= found
    entries = [([i], fnet.name) for i, fnet in enumerate(fnets)]
    if len(fnets) > 1:
        entries.append((list(range(len(fnets))), " & ".join(fnet.name for fnet in fnets)))
    rows = []
    for members, name in entries:
        x = (per_net[members[0]] if len(members) == 1 else stack_nets([per_net[i] for i in members])).numpy()
        results = [evaluate_split(x, split, present.numpy(), classes=tset.classes, multilabel=tset.multilabel,
                                  year=tset.year, grid=grid, folds=folds, seed=seed) for split in tset.splits]
        archs = sorted(fnets[i].arch for i in members)
        rows.append({"net": name, "archs": archs, "test_q": ",".join(str(q) for q in _scales(fnets, members)),
                     "combine": combine, "dims": int(x.shape[1]), **summarise(results)})
    left_out = [tset.images[i] for i in np.flatnonzero(~present.numpy())]
    return {"rows": rows, "left_out": left_out}


def _scales(fnets: list[FeatureNet], members: list[int]) -> list[int]:
    return sorted({q for i in members for q in fnets[i].net.scales})
