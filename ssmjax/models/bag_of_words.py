"""Bag-of-words audio embeddings: k-means codebooks over spectrogram tiles, a clip embedded
as the normalised histogram of its tiles' codewords, an MLP head on top.

After Verma, 2021, "Attention is All You Need? Good Embeddings with Statistics are enough:
Large Scale Audio Understanding without Transformers/Convolutions/BERTs/Mixers/Attention/
RNNs or ...." (arXiv:2110.03183): a clip's spectrogram is cut into small time-frequency
patches (the "micro" level) and full-frequency slices (the "macro" level); each kind of tile
is vector-quantised with its own k-means codebook; the clip is the concatenation of the
codeword-count histograms (a bag of words: order is forgotten); a feed-forward head
classifies it. The paper clusters the bottlenecks of feed-forward autoencoders of the tiles
(and of spectral envelopes and multi-resolution spectra); here the tiles themselves are
clustered (see ``experiments/notes/bow_audio.md``). Codebooks are fitted and applied in NumPy
(a preprocessing step outside any gradient; nothing to compile per data shape) with an
explicit ``numpy.random.Generator``; the head is a Flax module.

Equations, for a spectrogram ``S [T, F]`` (time x frequency):

* tiles of size ``(p, q)`` and stride ``(u, v)``: ``x_{a,b} = vec S[a u : a u + p, b v : b v + q]``
  for ``a = 0 .. (T - p) // u``, ``b = 0 .. (F - q) // v`` (row-major in ``(a, b)``);
  patches are small ``(p, q)`` tiles, slices are ``(s, F)`` tiles at stride ``(1, F)``: ``s``
  consecutive full-frequency frames, one slice per frame (:func:`tiles`, :func:`slice_shape`);
* k-means over tile vectors ``x_1 .. x_n`` minimises the inertia
  ``J = sum_i min_j ||x_i - c_j||^2``. Lloyd's iteration alternates the assignment
  ``a_i = argmin_j ||x_i - c_j||^2`` and the update ``c_j = mean{x_i : a_i = j}`` (a
  codeword with no points stays where it is), so ``J`` never increases;
* k-means++ initialisation (Arthur & Vassilvitskii, 2007): ``c_1`` uniform over the points,
  then ``c_{m+1} = x_i`` with probability ``D_m(x_i)^2 / sum_l D_m(x_l)^2``,
  ``D_m(x) = min_{j <= m} ||x - c_j||``;
* the embedding of a clip with tiles ``x_1 .. x_M`` under codebook ``C``:
  ``h_j = (1 / M) #{m : a(x_m) = j}``, and ``e = [h^(1); h^(2); ...]`` over the codebooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import numpy as np
from jax import Array
from jaxtyping import Float, Int

from ssmjax.checks import check_positive_int


class Codebook(NamedTuple):
    """A k-means codebook over tiles of size ``tile`` (frames, frequency bins) taken every
    ``stride``: ``centroids [k, p * q]``."""

    centroids: np.ndarray
    tile: tuple[int, int]
    stride: tuple[int, int]


class KMeansResult(NamedTuple):
    """``centroids [k, d]`` after the last update; ``inertia [iterations]``: ``J`` at each
    assignment step (non-increasing)."""

    centroids: np.ndarray
    inertia: np.ndarray


def _check_tile(spec_shape: tuple[int, ...], tile: Sequence[int], stride: Sequence[int]) -> None:
    if len(tile) != 2 or len(stride) != 2:
        raise ValueError(f"tile, stride: expected (time, frequency) pairs, got {tuple(tile)}, {tuple(stride)}")
    for name, pair in (("tile", tile), ("stride", stride)):
        for value in pair:
            check_positive_int(name, value)
    if tile[0] > spec_shape[-2] or tile[1] > spec_shape[-1]:
        raise ValueError(f"tile: {tuple(tile)} does not fit a spectrogram of {tuple(spec_shape[-2:])} "
                         "(frames, frequency bins)")


def tiles(spec: Float[np.ndarray, "b t f"], tile: Sequence[int], stride: Sequence[int]) -> Float[np.ndarray, "b n d"]:
    """Every ``tile = (p, q)`` window of ``spec`` at ``stride = (u, v)``, flattened:
    ``[b, T, F] -> [b, n_t n_f, p q]``, ``n_t = (T - p) // u + 1`` (module docstring)."""
    _check_tile(spec.shape, tile, stride)
    (p, q), (u, v) = tile, stride
    windows = np.lib.stride_tricks.sliding_window_view(spec, (p, q), axis=(1, 2))[:, ::u, ::v]  # [b, n_t, n_f, p, q]
    return windows.reshape(spec.shape[0], -1, p * q)


def slice_shape(frequency_bins: int, frames: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(tile, stride)`` of full-frequency slices of ``frames`` frames, one per frame."""
    return (frames, frequency_bins), (1, frequency_bins)


def squared_distances(points: Float[np.ndarray, "n d"],
                      centroids: Float[np.ndarray, "k d"]) -> Float[np.ndarray, "n k"]:
    """``||x_i - c_j||^2`` as ``|x|^2 - 2 x.c + |c|^2``, clipped at 0 (rounding)."""
    cross = points @ centroids.T
    return np.maximum((points ** 2).sum(-1, keepdims=True) - 2 * cross + (centroids ** 2).sum(-1), 0.0)


def assign(points: Float[np.ndarray, "n d"], centroids: Float[np.ndarray, "k d"]) -> Int[np.ndarray, "n"]:
    """The nearest codeword of each point (squared Euclidean distance)."""
    return squared_distances(points, centroids).argmin(-1)


def _check_points(points: np.ndarray, k: int) -> None:
    if np.ndim(points) != 2:
        raise ValueError(f"points: expected shape [n, d], got {np.shape(points)}")
    check_positive_int("k", k)
    if k > len(points):
        raise ValueError(f"k: {k} codewords need at least {k} points, got {len(points)}")


def kmeans_plus_plus(rng: np.random.Generator, points: np.ndarray, k: int) -> Float[np.ndarray, "k d"]:
    """k-means++ seeding of ``k`` codewords among ``points [n, d]`` (module docstring), drawn
    with ``rng``. When every point already is a codeword (fewer distinct points than ``k``)
    the next one is drawn uniformly."""
    _check_points(points, k)
    n = len(points)
    centroids = [points[rng.integers(n)]]
    nearest = ((points - centroids[0]) ** 2).sum(-1, dtype=np.float64)  # D_1(x)^2
    for _ in range(1, k):
        total = nearest.sum()
        chosen = points[rng.choice(n, p=nearest / total) if total > 0 else rng.integers(n)]
        centroids.append(chosen)
        nearest = np.minimum(nearest, ((points - chosen) ** 2).sum(-1, dtype=np.float64))
    return np.stack(centroids)


def lloyd_step(points: Float[np.ndarray, "n d"],
               centroids: Float[np.ndarray, "k d"]) -> tuple[Float[np.ndarray, "k d"], float]:
    """One assignment + update (module docstring): ``(new centroids, inertia J of the
    assignment to the old centroids)``."""
    distances = squared_distances(points, centroids)
    codes = distances.argmin(-1)
    inertia = float(distances[np.arange(len(points)), codes].sum())
    k = len(centroids)
    counts = np.bincount(codes, minlength=k)
    sums = np.stack([np.bincount(codes, weights=column, minlength=k) for column in points.T], axis=1)
    new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
    return new.astype(centroids.dtype), inertia


def kmeans(rng: np.random.Generator, points: np.ndarray, k: int, iterations: int) -> KMeansResult:
    """``iterations`` Lloyd steps over ``points [n, d]`` from a k-means++ seeding drawn with ``rng``."""
    check_positive_int("iterations", iterations)
    centroids = kmeans_plus_plus(rng, points, k)
    inertia = []
    for _ in range(iterations):
        centroids, value = lloyd_step(points, centroids)
        inertia.append(value)
    return KMeansResult(centroids, np.asarray(inertia))


def fit_codebook(rng: np.random.Generator, spec: Float[np.ndarray, "b t f"], k: int, tile: Sequence[int],
                 stride: Sequence[int], *, iterations: int = 30, max_points: int | None = None
                 ) -> tuple[Codebook, np.ndarray]:
    """k-means over the ``tile`` windows of ``spec`` (at most ``max_points`` of them, drawn
    without replacement with ``rng``); returns ``(codebook, inertia per iteration)``."""
    points = tiles(spec, tile, stride).reshape(-1, tile[0] * tile[1])
    if max_points is not None and max_points < len(points):
        points = points[rng.choice(len(points), max_points, replace=False)]
    result = kmeans(rng, points, k, iterations)
    return Codebook(result.centroids, tuple(tile), tuple(stride)), result.inertia


def histograms(codes: Int[np.ndarray, "b m"], k: int) -> Float[np.ndarray, "b k"]:
    """``h_j = #{m : codes_m = j} / M`` per row (module docstring)."""
    counts = np.stack([np.bincount(row, minlength=k) for row in codes])
    return counts / codes.shape[1]


def embed(spec: Float[np.ndarray, "b t f"], codebooks: Sequence[Codebook]) -> Float[np.ndarray, "b e"]:
    """The bag-of-words embedding ``[h^(1); h^(2); ...]``: ``[b, T, F] -> [b, sum_c k_c]``."""
    parts = []
    for book in codebooks:
        windows = tiles(spec, book.tile, book.stride)  # [b, m, d]
        codes = assign(windows.reshape(-1, windows.shape[-1]), book.centroids.astype(spec.dtype))
        parts.append(histograms(codes.reshape(windows.shape[:2]), len(book.centroids)))
    return np.concatenate(parts, axis=-1)


class MLPHead(nn.Module):
    """The classifier on the embeddings: ``Dense(hidden) -> ReLU -> Dense(num_classes)``
    (the paper's feed-forward head), ``[b, e] -> [b, num_classes]`` logits."""

    hidden: int
    num_classes: int

    @nn.compact
    def __call__(self, x: Float[Array, "b e"]) -> Float[Array, "b c"]:
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.hidden)(x)))
