import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The generated sample dataset (real JPEGs, awkward files included), made once per test session."""
    from vgg.sample_data import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("data") / "sample")


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env
