"""One way to write and read checkpoints.

A checkpoint is a dict with the keys below; `save_checkpoint` writes it atomically (temp file in the
same folder, fsync, rename), so a crash or `kill -9` mid-write leaves the previous file intact.

    model      state dict of the unwrapped, uncompiled VGG (torchvision-compatible keys)
    arch       model.arch_kwargs(): rebuilds the net with build_vgg(**arch)
    optimizer, scheduler   their state dicts
    epoch      epochs completed before this one; step: optimizer steps done within `epoch`
    rng        every RNG state (python, numpy, torch CPU, CUDA) for an exact resume
    config     the resolved run config (dict)
    stats      DatasetStats.to_dict(): mean RGB and colour PCA used in training and evaluation
    classes    the sorted wnids; class index i is classes[i]
    best_top1  best validation top-1 accuracy so far
"""

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from vgg.errors import UserError
from vgg.models import VGG, build_vgg


def save_checkpoint(path, **state) -> None:
    """Write `state` to `path` atomically (no partial file is ever visible under `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`; UserError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated file, not a torch file, ...
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise UserError(f"{path} is not a vgg-imagenet checkpoint (no 'model'/'arch' entries)")
    return ckpt


def build_model_from_checkpoint(ckpt: dict) -> VGG:
    """Rebuild the net the checkpoint was trained as and load its weights."""
    model = build_vgg(**ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    return model


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
