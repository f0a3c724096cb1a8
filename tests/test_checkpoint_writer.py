"""Checkpoint writes off the training thread: the save returns at once with a copy of the state, the
file appears whole when the background write ends, and a failed write is raised at the next save or wait."""

import threading

import pytest
import torch

from vgg.core import checkpoint as vcheckpoint
from vgg.core.checkpoint import CheckpointWriter, load_checkpoint
from vgg.core.errors import UserError


def test_save_returns_before_the_write_and_writes_the_state_as_it_was(tmp_path, monkeypatch):
    release, written = threading.Event(), threading.Event()
    real_save = vcheckpoint.save_checkpoint

    def blocked_save(path, **state):
        assert release.wait(timeout=60), "the test never released the write"
        real_save(path, **state)
        written.set()

    monkeypatch.setattr(vcheckpoint, "save_checkpoint", blocked_save)
    weight = torch.zeros(3)
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pt", model={"w": weight}, arch={"name": "A"}, step=1)
    assert not written.is_set()  # save() came back while the write still waits
    assert not (tmp_path / "last.pt").exists()
    weight += 1  # the next training step changes the weights in place
    release.set()
    writer.wait()
    assert written.is_set()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(ckpt["model"]["w"], torch.zeros(3)) and ckpt["step"] == 1  # the state at save time


def test_a_failed_write_is_raised_by_the_next_save_then_by_nothing_else(tmp_path, monkeypatch):
    def full_disk(path, **state):
        raise UserError(f"no space left on device while writing {path}")

    monkeypatch.setattr(vcheckpoint, "save_checkpoint", full_disk)
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pt", model={}, step=1)  # fails in the background
    with pytest.raises(UserError, match=f"no space left on device while writing {tmp_path / 'last.pt'}"):
        writer.save(tmp_path / "last.pt", model={}, step=2)
    writer.wait()  # reported once: nothing pending now
    writer.save(tmp_path / "last.pt", model={}, step=3)
    with pytest.raises(UserError, match="no space left"):  # and at exit, when no save follows
        writer.wait()
