import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gradcon_core.idx import load_mnist

MNIST_DIR = Path(os.environ.get("GRADCON_MNIST_DIR", Path(__file__).resolve().parents[1] / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_train() -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST (make data puts it in data/mnist); the tests fail, not skip, without it."""
    return load_mnist(MNIST_DIR, "train")


@pytest.fixture(scope="session")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(MNIST_DIR, "test")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
