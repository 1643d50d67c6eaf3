"""Where the tests find the shared MNIST IDX files, small slices of them, and a skip when absent."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "mnist"
TEST_IMAGES = MNIST / "t10k-images-idx3-ubyte.gz"


def needs_mnist() -> None:
    """Skip the calling test when the shared MNIST files are not on this machine."""
    if not TEST_IMAGES.is_file():
        pytest.skip(f"shared data set absent: {MNIST}")


@functools.cache
def _test_split() -> tuple[np.ndarray, np.ndarray]:
    from archipelago.domains.images import io

    return io.read_idx(TEST_IMAGES), io.read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")


def mnist_slice(n: int, start: int = 0) -> tuple[np.ndarray, list[str]]:
    """n MNIST test images [n, 28, 28] uint8 and their labels, as the (array, labels) source the image
    domain reads (skips where the files are absent)."""
    needs_mnist()
    images, labels = _test_split()
    return images[start:start + n], [str(v) for v in labels[start:start + n]]
