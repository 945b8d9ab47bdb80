import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "studies" / "mnist" / "model.pth"
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(1)  # tiny sequential ops: one thread is fastest and never oversubscribes


@pytest.fixture(scope="session")
def model():
    from tarflow.checkpoint import load_checkpoint

    return load_checkpoint(BUNDLED)


@pytest.fixture(scope="session")
def model64():
    from tarflow.checkpoint import load_checkpoint

    return load_checkpoint(BUNDLED, dtype=torch.float64)


@pytest.fixture()
def mnist_npz():
    path = SHARED_DATA / "mnist.npz"
    if not path.is_file():
        pytest.skip("../shared/data/mnist.npz not available")
    return path
