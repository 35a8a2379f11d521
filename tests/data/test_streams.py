"""Non-stationary streams for online continual learning: determinism per seed, the switch
points and permutations of permuted MNIST, the class pairs of split MNIST, the piecewise
linear maps, the (x_t, y_{t-1}) tokens, and argument errors."""

import numpy as np
import pytest

from ssmjax.data import streams

SIDE = 4  # tiny "digits": 4 x 4


def labelled_images(n=40):
    """Images whose pixel values name the image and the pixel: ``image i, pixel p = 16 i + p``
    (so any permuted copy reveals both), labels ``i mod 10``."""
    images = np.arange(n * SIDE * SIDE, dtype=np.float32).reshape(n, SIDE, SIDE)
    return images, np.arange(n) % 10


def decode(x):
    """``(source image [T], permutation [T, 16])`` of rows built from :func:`labelled_images` at pool 1."""
    source = (x.min(1) // (SIDE * SIDE)).astype(int)
    return source, (x - SIDE * SIDE * source[:, None]).astype(int)


def test_streams_are_deterministic_per_seed():
    images, labels = labelled_images()
    makers = [lambda seed: streams.permuted_mnist_stream(images, labels, 30, 10, seed),
              lambda seed: streams.split_mnist_stream(images, labels, 30, 10, seed),
              lambda seed: streams.piecewise_regression_stream(30, 10, seed)]
    for make in makers:
        a, b, c = make(3), make(3), make(4)
        for field in ("x", "y", "task"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert not np.array_equal(a.x, c.x)


def test_permuted_stream_switches_permutation_every_piece():
    images, labels = labelled_images()
    stream = streams.permuted_mnist_stream(images, labels, steps=50, switch_every=20, seed=0, pool=1)
    np.testing.assert_array_equal(stream.task, np.arange(50) // 20)
    assert stream.x.shape == (50, 16) and stream.num_classes == 10
    source, perm = decode(stream.x)
    np.testing.assert_array_equal(stream.y, labels[source])
    assert all(np.array_equal(np.sort(p), np.arange(16)) for p in perm)
    for k in range(3):  # one permutation per piece ...
        assert (perm[stream.task == k] == perm[20 * k]).all()
    assert not np.array_equal(perm[0], perm[20]) and not np.array_equal(perm[20], perm[40])  # ... a new one each
    assert len(set(source[:40].tolist())) == 40  # no image repeats before the pool of 40 is used up


def test_downsample_is_mean_pooling():
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_array_equal(streams.downsample(image, 2), [[2.5, 4.5, 10.5, 12.5]])
    images, labels = labelled_images()
    assert streams.permuted_mnist_stream(images, labels, 5, 5, 0, pool=2).x.shape == (5, 4)


def test_split_stream_draws_the_pair_of_each_piece_and_cycles():
    images, labels = labelled_images()
    stream = streams.split_mnist_stream(images, labels, steps=70, switch_every=10, seed=1, pool=1)
    source, perm = decode(stream.x)
    assert (perm == np.arange(16)).all()  # no permutation: the pooled image itself
    np.testing.assert_array_equal(stream.y, labels[source])
    pair = stream.task % 5
    assert ((stream.y // 2) == pair).all()  # piece k: digits 2j, 2j + 1 with j = k mod 5
    assert set(stream.y[stream.task == 5].tolist()) == {0, 1}  # the sixth piece brings the first pair back


def test_piecewise_regression_is_one_linear_map_per_piece():
    stream = streams.piecewise_regression_stream(steps=60, switch_every=20, seed=2, dim_x=3, dim_y=2, noise=0.0)
    assert stream.x.shape == (60, 3) and stream.y.shape == (60, 2) and stream.num_classes is None
    maps = []
    for k in range(3):
        x, y = stream.x[stream.task == k], stream.y[stream.task == k]
        w, residual, *_ = np.linalg.lstsq(x, y, rcond=None)
        assert residual.max() < 1e-8  # noiseless: y = W_k x exactly within the piece
        maps.append(w)
    assert np.abs(maps[0] - maps[1]).max() > 0.1 and np.abs(maps[1] - maps[2]).max() > 0.1
    noisy = streams.piecewise_regression_stream(steps=60, switch_every=20, seed=2, dim_x=3, dim_y=2, noise=0.5)
    np.testing.assert_array_equal(noisy.x, stream.x)
    assert 0.2 < np.std(noisy.y - stream.y) < 0.8


def test_context_tokens_pair_x_t_with_the_previous_label():
    images, labels = labelled_images()
    stream = streams.split_mnist_stream(images, labels, 12, 4, 0, pool=2)
    tokens = streams.context_tokens(stream)
    assert tokens.shape == (12, 4 + 10)
    np.testing.assert_array_equal(tokens[:, :4], stream.x)
    np.testing.assert_array_equal(tokens[0, 4:], np.zeros(10))
    np.testing.assert_array_equal(tokens[1:, 4:].argmax(1), stream.y[:-1])
    assert (tokens[1:, 4:].sum(1) == 1).all()
    regression = streams.piecewise_regression_stream(5, 5, 0, dim_x=2, dim_y=3)
    tokens = streams.context_tokens(regression)
    np.testing.assert_array_equal(tokens[1:, 2:], regression.y[:-1])
    np.testing.assert_array_equal(tokens[0, 2:], np.zeros(3))


def test_errors_name_the_argument():
    images, labels = labelled_images()
    with pytest.raises(ValueError, match="switch_every"):
        streams.permuted_mnist_stream(images, labels, 10, 0, 0)
    with pytest.raises(ValueError, match="steps"):
        streams.piecewise_regression_stream(0, 5, 0)
    with pytest.raises(ValueError, match="pool = 3"):
        streams.permuted_mnist_stream(images, labels, 10, 5, 0, pool=3)
    with pytest.raises(ValueError, match="labels: expected shape"):
        streams.permuted_mnist_stream(images, labels[:5], 10, 5, 0)
    with pytest.raises(ValueError, match=r"missing \[9\]"):
        streams.split_mnist_stream(images[labels < 9], labels[labels < 9], 10, 5, 0)
    with pytest.raises(ValueError, match="noise"):
        streams.piecewise_regression_stream(10, 5, 0, noise=-1.0)
