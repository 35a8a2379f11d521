"""Non-stationary supervised streams ``(x_t, y_t), t = 0 .. T-1`` for online continual
learning, and their sequence form for an in-context learner.

A stream is piecewise stationary: the example at step ``t`` comes from the stationary piece
(task) ``task[t] = t // switch_every``. Every generator is a pure function of its arguments
and ``seed`` (NumPy ``Generator``), so a stream is reproduced exactly from its settings.

* :func:`permuted_mnist_stream`: digits downsampled by ``pool x pool`` mean pooling
  (28 x 28 -> 14 x 14 = 196 features for ``pool = 2``); piece ``k`` shows every image
  with its pixels reordered by its own random permutation ``pi_k`` (a fresh one per piece):
  ``x_t = pool(image_{i_t})[pi_{task[t]}]``, ``y_t = label_{i_t}``.
* :func:`split_mnist_stream`: the ten classes arrive in pairs, piece ``k`` draws only the
  digits ``{2j, 2j + 1}`` with ``j = k mod 5`` (after the fifth pair the pairs come round
  again, so earlier tasks recur); labels stay the ten original classes (class-incremental).
* :func:`piecewise_regression_stream`: ``x_t ~ N(0, I_{d_x})``,
  ``y_t = W_{task[t]} x_t + sigma eps_t`` with ``eps_t ~ N(0, I_{d_y})`` and a fresh
  ``W_k ~ N(0, 1 / d_x)`` (entries, ``[d_y, d_x]``) per piece: ``E|W x|^2 = d_y``.

Sequence form (Bornschein, Li & Rannen-Triki, 2024, "Transformers for Supervised Online
Continual Learning", arXiv:2403.01554): the learner reads token
``u_t = [x_t, e(y_{t-1})]`` (:func:`context_tokens`; ``e`` one-hot for classes, the value
itself for regression, ``e(y_{-1}) = 0``) and predicts ``y_t`` from ``u_{<=t}``. A causal
model therefore sees every earlier label, but never ``y_t``, before predicting ``y_t``, and
can learn the current piece's map in context.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ssmjax.checks import check_positive_int

STREAMS = ("permuted_mnist", "split_mnist", "piecewise_regression")
#: Classes per piece of the split-MNIST stream.
SPLIT_CLASSES = 2


class Stream(NamedTuple):
    """``x`` float32 ``[T, d_x]``; ``y`` int32 ``[T]`` (classes) or float32 ``[T, d_y]``
    (regression); ``task`` int32 ``[T]``, the stationary piece of each step;
    ``num_classes`` (``None`` for regression)."""

    x: np.ndarray
    y: np.ndarray
    task: np.ndarray
    num_classes: int | None


def task_index(steps: int, switch_every: int) -> np.ndarray:
    """``[steps]`` int32: ``t // switch_every``."""
    check_positive_int("steps", steps)
    check_positive_int("switch_every", switch_every)
    return (np.arange(steps) // switch_every).astype(np.int32)


def downsample(images: np.ndarray, pool: int) -> np.ndarray:
    """``[n, h, w] -> [n, (h / pool) * (w / pool)]`` float32 by ``pool x pool`` mean pooling
    (row-major flattening); ``pool`` must divide ``h`` and ``w``."""
    images = np.asarray(images, np.float32)
    check_positive_int("pool", pool)
    if images.ndim != 3 or images.shape[1] % pool or images.shape[2] % pool:
        raise ValueError(f"images: expected [n, h, w] with h, w multiples of pool = {pool}, got {images.shape}")
    n, h, w = images.shape
    return images.reshape(n, h // pool, pool, w // pool, pool).mean((2, 4)).reshape(n, -1)


def _check_labelled(images: np.ndarray, labels: np.ndarray) -> None:
    if len(images) == 0 or np.shape(labels) != (len(images),):
        raise ValueError(f"labels: expected shape [n] matching images [n, h, w] with n >= 1, got {np.shape(labels)} "
                         f"for images {np.shape(images)}")


def _draw(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
    """``count`` entries of ``pool`` in a random order, without repeats until the pool is used up."""
    order = rng.permutation(pool)
    return np.resize(order, count)


def permuted_mnist_stream(images: np.ndarray, labels: np.ndarray, steps: int, switch_every: int, seed: int,
                          pool: int = 2) -> Stream:
    """Permuted MNIST (module docstring): ``images [n, h, w]`` in ``[0, 1]``, ``labels [n]``
    in ``[0, 10)``; a fresh pixel permutation every ``switch_every`` steps."""
    _check_labelled(images, labels)
    task = task_index(steps, switch_every)
    pixels = downsample(images, pool)
    rng = np.random.default_rng(seed)
    source = _draw(rng, np.arange(len(images)), steps)
    permutations = np.stack([rng.permutation(pixels.shape[1]) for _ in range(task[-1] + 1)])  # [tasks, p]
    x = np.take_along_axis(pixels[source], permutations[task], axis=1)
    return Stream(x, np.asarray(labels, np.int32)[source], task, 10)


def split_mnist_stream(images: np.ndarray, labels: np.ndarray, steps: int, switch_every: int, seed: int,
                       pool: int = 2) -> Stream:
    """Split MNIST (module docstring): piece ``k`` draws the digits ``{2j, 2j + 1}``,
    ``j = k mod 5``; every class must occur in ``labels``."""
    _check_labelled(images, labels)
    labels = np.asarray(labels, np.int32)
    missing = sorted(set(range(10)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"labels: split MNIST needs every class 0..9, missing {missing}")
    task = task_index(steps, switch_every)
    groups = 10 // SPLIT_CLASSES
    rng = np.random.default_rng(seed)
    source = np.empty(steps, np.int64)
    for j in range(groups):
        at = np.flatnonzero(task % groups == j)
        source[at] = _draw(rng, np.flatnonzero(labels // SPLIT_CLASSES == j), len(at))
    return Stream(downsample(images, pool)[source], labels[source], task, 10)


def piecewise_regression_stream(steps: int, switch_every: int, seed: int, dim_x: int = 4, dim_y: int = 1,
                                noise: float = 0.1) -> Stream:
    """Piecewise-stationary linear regression (module docstring)."""
    check_positive_int("dim_x", dim_x)
    check_positive_int("dim_y", dim_y)
    if noise < 0:
        raise ValueError(f"noise: expected >= 0, got {noise}")
    task = task_index(steps, switch_every)
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((task[-1] + 1, dim_y, dim_x)) / np.sqrt(dim_x)  # [tasks, d_y, d_x]
    x = rng.standard_normal((steps, dim_x))
    y = np.einsum("tyx,tx->ty", maps[task], x) + noise * rng.standard_normal((steps, dim_y))
    return Stream(x.astype(np.float32), y.astype(np.float32), task, None)


def label_features(y: np.ndarray, num_classes: int | None) -> np.ndarray:
    """``e(y)``: one-hot ``[T, num_classes]`` float32 for classes, ``y [T, d_y]`` itself for regression."""
    if num_classes is None:
        return np.asarray(y, np.float32)
    return np.eye(num_classes, dtype=np.float32)[np.asarray(y)]


def context_tokens(stream: Stream) -> np.ndarray:
    """``[T, d_x + d_label]`` float32: ``u_t = [x_t, e(y_{t-1})]``, ``e(y_{-1}) = 0`` (module docstring)."""
    labels = label_features(stream.y, stream.num_classes)
    previous = np.concatenate([np.zeros_like(labels[:1]), labels[:-1]])
    return np.concatenate([stream.x, previous], axis=1)
