"""Seeded vision tasks of ssmjax.data.vision: Pathfinder (labels follow path identity, paths
stay apart, caches are checked, the released layout and its PNGs load), arrow pointing (the
label is the ray-circle geometry, with a margin, at every resolution) and Moving MNIST
(bouncing trajectories inside the canvas, max compositing, the released .npy layout)."""

import struct
import zlib

import numpy as np
import pytest

from ssmjax.data import vision as vis

# ----------------------------------------------------------------------------- Pathfinder


def _endpoint_owners(info, point, tol=1.0):
    """Indices of the paths with an endpoint within ``tol`` pixels of ``point``."""
    return {i for i, p in enumerate(info["paths"])
            if min(np.linalg.norm(p[0] - point), np.linalg.norm(p[-1] - point)) <= tol}


def _dense(path, spacing=0.25):
    return np.concatenate([a + np.linspace(0, 1, int(np.ceil(np.linalg.norm(b - a) / spacing)) + 1)[:, None] * (b - a)
                           for a, b in zip(path[:-1], path[1:])])


@pytest.mark.parametrize("resolution, difficulty, indices", [(32, "hard", range(6)), (32, "easy", range(6)),
                                                             (64, "intermediate", range(2)), (128, "hard", range(2))])
def test_pathfinder_markers_sit_on_path_ends_as_the_label_says(resolution, difficulty, indices):
    length = vis.PATHFINDER_DIFFICULTIES[difficulty]
    for index in indices:
        image, label, info = vis.pathfinder_example(7, index, resolution=resolution, difficulty=difficulty)
        again = vis.pathfinder_example(7, index, resolution=resolution, difficulty=difficulty)
        np.testing.assert_array_equal(image, again[0])
        assert label == again[1] and label in (0, 1)
        assert image.dtype == np.uint8 and image.shape == (resolution, resolution)
        paths, markers = info["paths"], info["markers"]
        assert [len(p) - 1 for p in paths[:2]] == [length, length]
        assert all(len(p) - 1 == length // 3 for p in paths[2:]) and len(paths) > 2
        a, b = _endpoint_owners(info, markers[0]), _endpoint_owners(info, markers[1])
        assert len(a) == 1 and len(b) == 1  # each marker on exactly one path's end
        if label == 1:
            (p,) = a
            assert a == b and {tuple(markers[0]), tuple(markers[1])} == {tuple(paths[p][0]), tuple(paths[p][-1])}
        else:
            assert a != b and a | b == {0, 1}
        for m in markers:  # a disk of radius >= 1.5 covers the pixel holding its centre
            assert image[int(m[0]), int(m[1])] == 255
        # distinct paths never cross or touch (no dash is pixel-linked to another path), nor
        # touch a marker on another path
        clearance = info["margin"] + info["line_width"]
        dense = [_dense(p) for p in paths]
        for i in range(len(dense)):
            for j in range(i + 1, len(dense)):
                d = np.sqrt(((dense[i][:, None] - dense[j][None]) ** 2).sum(-1)).min()
                assert d >= clearance - 0.5, (index, i, j, d)
        for m, owner in zip(markers, info["marker_paths"]):
            d = min(np.linalg.norm(dense[j] - m, axis=1).min() for j in range(len(paths)) if j != owner)
            assert d >= info["marker_radius"] + clearance - 0.5, (index, d)


def test_pathfinder_paths_are_dashed():
    image, _, info = vis.pathfinder_example(3, 0, resolution=128, difficulty="easy")
    path, margin = info["paths"][2], info["margin"]  # a distractor: no marker on it
    node = path[1]  # the gap of 2 * margin around an inner node is dark
    assert image[int(node[0]), int(node[1])] == 0
    mid = (path[1] + path[2]) / 2  # the middle of a dash is lit
    assert image[int(mid[0]), int(mid[1])] > 0 and margin > 0


def test_pathfinder_dataset_is_items_and_labels_are_balanced():
    images, labels = vis.pathfinder_dataset(1, 40, resolution=32, difficulty="easy")
    assert images.shape == (40, 32, 32) and images.dtype == np.uint8 and labels.dtype == np.int32
    assert 12 <= labels.sum() <= 28, labels
    img, lab, _ = vis.pathfinder_example(1, 33, resolution=32, difficulty="easy")
    tail_images, tail_labels = vis.pathfinder_dataset(1, 7, resolution=32, difficulty="easy", start=33)
    np.testing.assert_array_equal(tail_images, images[33:40])
    np.testing.assert_array_equal(tail_images[0], img)
    assert tail_labels[0] == lab and not np.array_equal(images[0], images[1])


def test_pathfinder_cache_round_trip_and_parameter_check(tmp_path, monkeypatch):
    path = vis.cache_pathfinder(tmp_path, 2, 4, resolution=32, difficulty="easy")
    images, labels = vis.load_pathfinder_cache(path)
    expected = vis.pathfinder_dataset(2, 4, resolution=32, difficulty="easy")
    np.testing.assert_array_equal(images, expected[0])
    np.testing.assert_array_equal(labels, expected[1])
    monkeypatch.setattr(vis, "pathfinder_dataset", lambda *a, **k: pytest.fail("regenerated a valid cache"))
    assert vis.cache_pathfinder(tmp_path, 2, 4, resolution=32, difficulty="easy") == path
    monkeypatch.undo()
    other = vis.cache_pathfinder(tmp_path, 2, 4, resolution=32, difficulty="intermediate")
    assert other != path and other.exists()
    path.replace(other)  # a file under the right name made with other parameters is refused
    with pytest.raises(ValueError, match=r"cache made with other parameters \(difficulty: stored 'easy', "
                                         r"requested 'intermediate'\)"):
        vis.cache_pathfinder(tmp_path, 2, 4, resolution=32, difficulty="intermediate")


def test_pathfinder_errors():
    with pytest.raises(ValueError, match=r"resolution: expected one of \(32, 64, 128\), got 48"):
        vis.pathfinder_example(0, 0, resolution=48)
    with pytest.raises(ValueError, match=r"difficulty: expected one of \('easy', 'intermediate', 'hard'\)"):
        vis.pathfinder_example(0, 0, difficulty="medium")
    with pytest.raises(ValueError, match="seed: expected a non-negative integer, got -1"):
        vis.pathfinder_example(-1, 0)
    with pytest.raises(ValueError, match="n: expected a positive integer, got 0"):
        vis.pathfinder_dataset(0, 0)


# ----------------------------------------------------------------------------- PNG and the released layout


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _write_png(path, image, filters=(0,), colour=0, depth=8, interlace=0):
    """A minimal PNG encoder: row ``y`` uses filter ``filters[y % len(filters)]``."""
    h, w = image.shape
    prior, rows = np.zeros(w, np.int64), []
    for y in range(h):
        x, kind = image[y].astype(np.int64), filters[y % len(filters)]
        left, upleft = np.concatenate([[0], x[:-1]]), np.concatenate([[0], prior[:-1]])
        pred = [0, left, prior, (left + prior) // 2, _paeth(left, prior, upleft)][kind]
        rows.append(bytes([kind]) + ((x - pred) & 0xFF).astype(np.uint8).tobytes())
        prior = x
    header = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(rows)))
                     + _chunk(b"IEND", b""))


def test_png_reader_undoes_all_five_filters(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (9, 13)).astype(np.uint8)
    image[2:5] = 250  # runs and wrap-around in the filtered bytes
    for filters in [(0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4)]:
        _write_png(tmp_path / "a.png", image, filters)
        np.testing.assert_array_equal(vis.read_png_gray8(tmp_path / "a.png"), image)
    _write_png(tmp_path / "rgb.png", image, colour=2)
    with pytest.raises(ValueError, match=r"rgb.png: unsupported PNG: bit depth 8, colour type 2"):
        vis.read_png_gray8(tmp_path / "rgb.png")
    _write_png(tmp_path / "inter.png", image, interlace=1)
    with pytest.raises(ValueError, match=r"inter.png: unsupported PNG: interlace 1"):
        vis.read_png_gray8(tmp_path / "inter.png")
    _write_png(tmp_path / "deep.png", image, depth=16)
    with pytest.raises(ValueError, match=r"deep.png: unsupported PNG: bit depth 16"):
        vis.read_png_gray8(tmp_path / "deep.png")
    raw = bytearray((tmp_path / "a.png").read_bytes())
    raw[40] ^= 0xFF
    (tmp_path / "bad.png").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"bad.png: CRC mismatch"):
        vis.read_png_gray8(tmp_path / "bad.png")


def _release_tree(root):
    """root/curv_baseline: metadata 0.npy (text rows, as released) and 1.npy (a .npy array)."""
    base = root / "curv_baseline"
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (8, 8)).astype(np.uint8) for _ in range(3)]
    for i, (image, filters) in enumerate(zip(images, [(0, 1), (2, 3), (4, 0)])):
        _write_png(base / "imgs" / str(i // 2) / f"sample_{i}.png", image, filters)
    (base / "metadata").mkdir(parents=True)
    (base / "metadata" / "0.npy").write_text("imgs/0 sample_0.png 0 1 1.0 6 2 2 0.5 1 1\n"
                                            "imgs/0 sample_1.png 1 0 1.0 6 2 2 0.5 1 1\n")
    np.save(base / "metadata" / "1.npy", np.array([["imgs/1", "sample_2.png", "2", "1", "1.0", "6"]]))
    return base, images


def test_released_pathfinder_layout_loads(tmp_path):
    base, images = _release_tree(tmp_path)
    got, labels = vis.load_pathfinder_released(tmp_path, "curv_baseline")
    np.testing.assert_array_equal(got, np.stack(images))
    assert labels.dtype == np.int32 and labels.tolist() == [1, 0, 1]
    got, labels = vis.load_pathfinder_released(tmp_path, "easy", limit=2)  # our name for curv_baseline
    assert got.shape == (2, 8, 8) and labels.tolist() == [1, 0]
    (base / "imgs" / "0" / "sample_1.png").write_bytes(b"")  # the release's one empty file
    assert vis.load_pathfinder_released(tmp_path, "curv_baseline")[1].tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"sample_1.png: not a PNG file \(bad signature, empty file\)"):
        vis.load_pathfinder_released(tmp_path, "curv_baseline", skip_empty=False)


def test_released_pathfinder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"curv_contour_length_14/metadata: metadata directory not found"):
        vis.load_pathfinder_released(tmp_path, "hard")
    base, _ = _release_tree(tmp_path)
    meta = base / "metadata" / "0.npy"
    meta.write_text("imgs/0 sample_0.png 0 1\nimgs/0 sample_1.png 1 yes\n")
    with pytest.raises(ValueError, match=r"0.npy: row 2: label \(field 4\) must be 0 or 1, got 'yes'"):
        vis.load_pathfinder_released(tmp_path, "curv_baseline")
    meta.write_text("imgs/0 sample_0.png 0\n")
    with pytest.raises(ValueError, match=r"0.npy: row 1: expected at least 4 fields"):
        vis.load_pathfinder_released(tmp_path, "curv_baseline")
    meta.write_text("imgs/0 sample_9.png 0 1\n")
    with pytest.raises(ValueError, match=r"sample_9.png: image file not found \(listed in .*0.npy, row 1\)"):
        vis.load_pathfinder_released(tmp_path, "curv_baseline")


# ----------------------------------------------------------------------------- arrow pointing


@pytest.mark.parametrize("resolution, base", [(32, None), (64, None), (48, None), (64, 32)])
def test_arrow_label_is_the_ray_circle_geometry_with_a_margin(resolution, base):
    labels = []
    for index in range(100):
        image, label, info = vis.arrow_pointing_example(5, index, resolution=resolution, base_resolution=base)
        assert image.dtype == np.float32 and image.shape == (resolution, resolution)
        assert image.min() >= 0.0 and image.max() <= 1.0
        tail, tip, centre, r = info["tail"], info["tip"], info["centre"], info["radius"]
        # recompute: distance from the centre to the half-line tail + t (tip - tail), t >= 0
        u = (tip - tail) / np.linalg.norm(tip - tail)
        t = max(float((centre - tail) @ u), 0.0)
        distance = np.linalg.norm(centre - tail - t * u)
        assert label == int(distance < r)
        assert abs(distance - r) >= info["margin"] * (1 - 1e-9)  # unambiguous by >= margin
        assert info["margin"] == pytest.approx((base or resolution) / 32)  # 1 px at base 32
        assert np.linalg.norm(centre - (tail + tip) / 2) > np.linalg.norm(tip - tail) / 2 + r  # apart
        assert image[int(centre[0]), int(centre[1])] == 1.0 and image[int(tip[0]), int(tip[1])] > 0
        labels.append(label)
    assert 0 < sum(labels) < len(labels)


def test_arrow_labels_are_balanced():
    _, labels = vis.arrow_pointing_dataset(0, 1000, resolution=32)
    assert 0.45 <= labels.mean() <= 0.55  # a fair coin per item: 0.5 +- 3 standard errors


def test_arrow_geometry_is_resolution_relative():
    for index in range(20):
        _, label32, a = vis.arrow_pointing_example(9, index, resolution=32)
        _, label64, b = vis.arrow_pointing_example(9, index, resolution=64)
        _, label48, c = vis.arrow_pointing_example(9, index, resolution=48)
        assert label32 == label64 == label48
        for key in ("tail", "tip", "centre", "radius", "line_width", "margin"):
            np.testing.assert_allclose(np.asarray(a[key]) / 32, np.asarray(b[key]) / 64, rtol=1e-12)
            np.testing.assert_allclose(np.asarray(a[key]) / 32, np.asarray(c[key]) / 48, rtol=1e-12)
        # pLSTM-style extrapolation: objects keep their pixel size on a larger canvas
        _, _, d = vis.arrow_pointing_example(9, index, resolution=64, base_resolution=32)
        assert d["radius"] == pytest.approx(a["radius"]) and d["line_width"] == pytest.approx(a["line_width"])
        assert np.linalg.norm(d["tip"] - d["tail"]) == pytest.approx(np.linalg.norm(a["tip"] - a["tail"]))
    image, _, _ = vis.arrow_pointing_example(9, 0, resolution=32)
    np.testing.assert_array_equal(image, vis.arrow_pointing_example(9, 0, resolution=32)[0])
    images, labels = vis.arrow_pointing_dataset(9, 3, resolution=32, start=0)
    np.testing.assert_array_equal(images[0], image)
    assert images.shape == (3, 32, 32) and labels.dtype == np.int32


def test_arrow_errors():
    with pytest.raises(ValueError, match="resolution: expected >= 8 pixels, got 4"):
        vis.arrow_pointing_example(0, 0, resolution=4)
    with pytest.raises(ValueError, match="base_resolution: expected <= resolution = 32, got 64"):
        vis.arrow_pointing_example(0, 0, resolution=32, base_resolution=64)
    with pytest.raises(ValueError, match="index: expected a non-negative integer"):
        vis.arrow_pointing_example(0, -3)


# ----------------------------------------------------------------------------- Moving MNIST


def _digits():
    square = np.zeros((28, 28), np.uint8)
    square[4:24, 4:24] = 200
    cross = np.zeros((28, 28), np.uint8)
    cross[13:15, :] = 255
    cross[:, 13:15] = 120
    return np.stack([square, cross])


def _turns(row):
    """Values of ``row`` where it reverses direction (runs of equal values merged)."""
    vals = row[np.r_[0, np.flatnonzero(np.diff(row)) + 1]]
    return vals[1:-1][(vals[1:-1] - vals[:-2]) * (vals[2:] - vals[1:-1]) < 0]


def test_moving_mnist_trajectories_stay_inside_and_bounce():
    for index in range(5):
        ids, tops, lefts = vis.moving_mnist_trajectories(0, index, 2, frames=200)
        assert ids.shape == (2,) and tops.shape == lefts.shape == (2, 200) and set(ids.tolist()) <= {0, 1}
        assert tops.min() >= 0 and lefts.min() >= 0 and tops.max() <= 64 - 28 and lefts.max() <= 64 - 28
        assert np.hypot(np.diff(tops), np.diff(lefts)).max() <= 3.6 + 1.5  # 0.1 of the 36 px free side per frame
        for k in range(2):  # 20 sides' worth of travel: every digit bounces, and only off the edges
            turns = np.concatenate([_turns(tops[k]), _turns(lefts[k])])
            assert len(turns) >= 2 and set(turns.tolist()) <= {0, 36}, turns
    a = vis.moving_mnist_trajectories(0, 1, 2)
    b = vis.moving_mnist_trajectories(0, 1, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], vis.moving_mnist_trajectories(0, 2, 2)[1])


def test_moving_mnist_is_the_max_composite_of_the_placed_digits():
    digits = _digits()
    for index in range(4):
        video = vis.moving_mnist(digits, 3, index, num_digits=2, frames=12)
        ids, tops, lefts = vis.moving_mnist_trajectories(3, index, 2, frames=12)
        expected = np.zeros((12, 64, 64), np.uint8)
        for k in range(2):
            for t in range(12):
                window = expected[t, tops[k, t]:tops[k, t] + 28, lefts[k, t]:lefts[k, t] + 28]
                window[...] = np.maximum(window, digits[ids[k]])
        assert video.dtype == np.uint8 and video.shape == (12, 64, 64)
        np.testing.assert_array_equal(video, expected)
        np.testing.assert_array_equal(vis.moving_mnist(digits / 255.0, 3, index, frames=12), video)  # [0, 1] floats
    batch = vis.moving_mnist_batch(digits, 3, [2, 0], frames=12)
    np.testing.assert_array_equal(batch[1], vis.moving_mnist(digits, 3, 0, frames=12))
    inputs, targets = vis.split_frames(vis.moving_mnist_batch(digits, 3, [0, 1]))
    assert inputs.shape == targets.shape == (2, 10, 64, 64)


def test_moving_mnist_errors():
    with pytest.raises(ValueError, match=r"digits: expected shape \[n, d, d\]"):
        vis.moving_mnist(np.zeros((5, 28)), 0, 0)
    with pytest.raises(ValueError, match="digits: float digits must lie in"):
        vis.moving_mnist(np.full((1, 28, 28), 3.0), 0, 0)
    with pytest.raises(ValueError, match="digits: digit size 28 exceeds the canvas size 20"):
        vis.moving_mnist(_digits(), 0, 0, size=20)
    with pytest.raises(ValueError, match=r"num_input: expected 0 < num_input < 20 frames, got 20"):
        vis.split_frames(np.zeros((20, 4, 4)), 20)


def test_load_moving_mnist_npy_transposes_and_checks(tmp_path):
    seq = np.random.default_rng(0).integers(0, 256, (20, 3, 64, 64)).astype(np.uint8)
    np.save(tmp_path / "mnist_test_seq.npy", seq)
    videos = vis.load_moving_mnist_npy(tmp_path / "mnist_test_seq.npy")
    assert videos.shape == (3, 20, 64, 64) and videos.flags.c_contiguous
    np.testing.assert_array_equal(videos[1, 5], seq[5, 1])
    np.save(tmp_path / "batch_first.npy", seq.transpose(1, 0, 2, 3))
    with pytest.raises(ValueError, match=r"batch_first.npy: expected 20 frames on axis 0"):
        vis.load_moving_mnist_npy(tmp_path / "batch_first.npy")
    np.save(tmp_path / "float.npy", seq.astype(np.float32))
    with pytest.raises(ValueError, match=r"float.npy: expected uint8 \[frames, n, size, size\]"):
        vis.load_moving_mnist_npy(tmp_path / "float.npy")
    with pytest.raises(ValueError, match=r"missing.npy: file not found"):
        vis.load_moving_mnist_npy(tmp_path / "missing.npy")


def test_cached_moving_mnist_test_round_trip(tmp_path, monkeypatch):
    digits = _digits()
    videos = vis.cached_moving_mnist_test(tmp_path, digits, seed=4, n=3, frames=6)
    np.testing.assert_array_equal(videos, vis.moving_mnist_batch(digits, 4, [0, 1, 2], frames=6))
    (path,) = tmp_path.glob("*.npz")
    monkeypatch.setattr(vis, "moving_mnist_batch", lambda *a, **k: pytest.fail("regenerated a valid cache"))
    np.testing.assert_array_equal(vis.cached_moving_mnist_test(tmp_path, digits, seed=4, n=3, frames=6), videos)
    monkeypatch.undo()
    vis.cached_moving_mnist_test(tmp_path, digits[::-1], seed=4, n=3, frames=6)  # other digits: another file
    other = [p for p in tmp_path.glob("*.npz") if p != path]
    assert len(other) == 1
    path.replace(other[0])
    with pytest.raises(ValueError, match=r"cache made with other parameters \(digits_sha256"):
        vis.cached_moving_mnist_test(tmp_path, digits[::-1], seed=4, n=3, frames=6)


@pytest.mark.slow  # spawns two processes
def test_pathfinder_cache_is_the_same_from_parallel_workers(tmp_path):
    one = vis.load_pathfinder_cache(vis.cache_pathfinder(tmp_path / "a", 3, 8, difficulty="easy"))
    two = vis.load_pathfinder_cache(vis.cache_pathfinder(tmp_path / "b", 3, 8, difficulty="easy", workers=2))
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
