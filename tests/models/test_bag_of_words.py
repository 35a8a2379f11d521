"""Bag-of-words embeddings: tiles, k-means (against brute force, in float64), histograms."""

import numpy as np
import pytest

from ssmjax.models import bag_of_words as bow


def rng(seed):
    return np.random.default_rng(seed)


def test_tiles_are_the_strided_windows_in_row_major_order():
    spec = np.arange(2 * 7 * 6, dtype=np.float64).reshape(2, 7, 6)
    out = bow.tiles(spec, (3, 2), (2, 3))
    expected = [[spec[b, a:a + 3, f:f + 2].ravel() for a in range(0, 5, 2) for f in range(0, 5, 3)] for b in range(2)]
    np.testing.assert_array_equal(out, np.array(expected))
    tile, stride = bow.slice_shape(6, frames=2)
    slices = bow.tiles(spec, tile, stride)
    assert slices.shape == (2, 6, 12)
    np.testing.assert_array_equal(slices[1, 4], spec[1, 4:6].ravel())  # frames 4 and 5, every frequency
    with pytest.raises(ValueError, match="tile: \\(8, 2\\) does not fit a spectrogram of \\(7, 6\\)"):
        bow.tiles(spec, (8, 2), (1, 1))
    with pytest.raises(ValueError, match="stride: expected a positive int"):
        bow.tiles(spec, (2, 2), (0, 1))


def test_assign_and_lloyd_step_match_brute_force():
    points, centroids = rng(0).standard_normal((50, 3)), rng(1).standard_normal((4, 3))
    distances = np.array([[sum((p - c) ** 2) for c in centroids] for p in points])  # loops, from the definition
    codes = distances.argmin(1)
    np.testing.assert_array_equal(bow.assign(points, centroids), codes)
    new, inertia = bow.lloyd_step(points, centroids)
    np.testing.assert_allclose(inertia, distances.min(1).sum(), rtol=1e-12)
    for j in range(4):
        expected = points[codes == j].mean(0) if np.any(codes == j) else centroids[j]
        np.testing.assert_allclose(new[j], expected, atol=1e-12)


def test_an_empty_codeword_stays_put():
    new, _ = bow.lloyd_step(np.array([[0.0], [0.1], [10.0]]), np.array([[0.0], [10.0], [100.0]]))
    np.testing.assert_allclose(new[:, 0], [0.05, 10.0, 100.0])


def test_kmeans_inertia_never_increases_and_is_seeded():
    points = rng(2).standard_normal((300, 2))
    result = bow.kmeans(rng(0), points, 8, iterations=15)
    assert result.inertia.shape == (15,) and result.inertia[-1] < 0.9 * result.inertia[0]
    assert np.all(np.diff(result.inertia) <= 1e-12 * result.inertia[0])
    np.testing.assert_array_equal(bow.kmeans(rng(0), points, 8, iterations=15).centroids, result.centroids)
    assert not np.allclose(bow.kmeans(rng(1), points, 8, iterations=15).centroids, result.centroids)


def test_kmeans_plus_plus_finds_separated_blobs():
    means = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    labels = np.repeat(np.arange(4), 30)
    points = means[labels] + rng(3).standard_normal((120, 2))
    seeds = bow.kmeans_plus_plus(rng(4), points, 4)
    assert sorted(np.linalg.norm(seeds[:, None] - means[None], axis=-1).argmin(1)) == [0, 1, 2, 3]
    centroids = bow.kmeans(rng(4), points, 4, iterations=3).centroids  # the same seeding, then exact blob means
    blob_means = np.array([points[labels == j].mean(0) for j in range(4)])
    order = np.linalg.norm(centroids[:, None] - blob_means[None], axis=-1).argmin(1)
    np.testing.assert_allclose(centroids, blob_means[order], atol=1e-12)


def test_kmeans_errors():
    with pytest.raises(ValueError, match="k: 4 codewords need at least 4 points, got 3"):
        bow.kmeans(rng(0), np.zeros((3, 2)), 4, iterations=1)
    with pytest.raises(ValueError, match="points: expected shape \\[n, d\\], got \\(3,\\)"):
        bow.kmeans_plus_plus(rng(0), np.zeros(3), 1)
    with pytest.raises(ValueError, match="iterations: expected a positive int"):
        bow.kmeans(rng(0), np.zeros((3, 2)), 2, iterations=0)
    assert np.all(np.isfinite(bow.kmeans_plus_plus(rng(0), np.zeros((3, 2)), 3)))  # no distinct point left


def test_embedding_is_the_concatenated_normalised_histograms():
    np.testing.assert_allclose(bow.histograms(np.array([[0, 2, 2, 1], [1, 1, 1, 1]]), 3),
                               [[0.25, 0.25, 0.5], [0.0, 1.0, 0.0]])
    spec = rng(5).standard_normal((3, 6, 4))
    micro, inertia = bow.fit_codebook(rng(0), spec, 5, (2, 2), (2, 2), iterations=2, max_points=10)
    assert micro.centroids.shape == (5, 4) and inertia.shape == (2,)
    macro = bow.Codebook(spec[0, :3], *bow.slice_shape(4))  # 3 codewords: the first clip's first 3 frames
    embedding = bow.embed(spec, [micro, macro])
    assert embedding.shape == (3, 8)
    np.testing.assert_allclose(embedding[:, :5].sum(1), 1.0)
    np.testing.assert_allclose(embedding[:, 5:].sum(1), 1.0)
    assert np.all(embedding[0, 5:] >= 1 / 6)  # clip 0's frames 0, 1, 2 are the codewords themselves
    codes = bow.assign(bow.tiles(spec, (2, 2), (2, 2))[1], micro.centroids)  # clip 1, its 6 patches
    np.testing.assert_allclose(embedding[1, :5], np.bincount(codes, minlength=5) / 6)
