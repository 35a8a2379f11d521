"""Seeded image and video tasks for long-range vision: Pathfinder, arrow pointing, Moving MNIST.

Every generator is a pure function of ``(seed, index)``: item ``index`` of data set ``seed``
is drawn from ``default_rng(SeedSequence([seed, index, task]))``, so any item is reproducible
on its own (no stream to replay) and a data set is a range of indices. NumPy only (no PIL,
no SciPy, no downloads); shapes are drawn by supersampled coverage, so edges are anti-aliased.
Coordinates are ``(row, col)`` in pixels, pixel ``(i, j)`` covering ``[i, i+1) x [j, j+1)``.

* **Pathfinder** (Linsley et al., 2018, "Learning long-range spatial dependencies with
  horizontal gated recurrent units"; Long Range Arena, Tay et al., 2021, at 32x32, and
  Path-X at 128x128): :func:`pathfinder_example`, :func:`pathfinder_dataset`,
  :func:`cache_pathfinder`, and :func:`load_pathfinder_released` for the released LRA files
  (with :func:`read_png_gray8`, a minimal PNG decoder).
* **Arrow pointing** (Pöppel et al., 2025, "pLSTM: parallelizable Linear Source Transition
  Mark networks", the arrow-pointing extrapolation task): :func:`arrow_pointing_example`,
  :func:`arrow_pointing_dataset`, :func:`arrow_pointing_label`.
* **Moving MNIST** (Srivastava et al., 2015, "Unsupervised Learning of Video
  Representations using LSTMs"; the OpenSTL generator used by PredFormer):
  :func:`moving_mnist`, :func:`moving_mnist_batch`, :func:`moving_mnist_trajectories`,
  :func:`cached_moving_mnist_test`, :func:`load_moving_mnist_npy`, :func:`split_frames`.

Caches (``.npz``) are named by their generation parameters and store them; on reading, a
file whose stored parameters differ from the request is a ``ValueError``, never reused.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
import struct
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Per-task stream ids: item (seed, index) of two tasks never share random numbers.
_PATHFINDER_STREAM, _ARROW_STREAM, _MMNIST_STREAM = 1, 2, 3
_CACHE_VERSION = 1


# ----------------------------------------------------------------------------- shared helpers


def _nonneg_int(name: str, value: Any) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected a non-negative integer, got {value!r}") from None
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value}")
    return int(value)


def _positive_int(name: str, value: Any) -> int:
    if _nonneg_int(name, value) < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value}")
    return int(value)


def item_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The generator of item ``index`` of data set ``seed``; ``stream`` separates tasks."""
    seed, index, stream = _nonneg_int("seed", seed), _nonneg_int("index", index), _nonneg_int("stream", stream)
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


def _subpixel_grid(lo: float, hi: float, size: int, ss: int) -> tuple[int, int, np.ndarray]:
    """Supersample indices ``[a, b)`` covering ``[lo, hi]`` (pixels) on a ``size * ss`` axis,
    and their centres in pixel units."""
    a = max(int(math.floor(lo * ss)), 0)
    b = min(int(math.ceil(hi * ss)) + 1, size * ss)
    return a, b, (np.arange(a, b) + 0.5) / ss


def _stroke(canvas: np.ndarray, ss: int, p0: np.ndarray, p1: np.ndarray, half_width: float) -> None:
    """Paint (max with 1) the supersamples of ``canvas`` within ``half_width`` of segment p0-p1."""
    size = canvas.shape[0] // ss
    r0, r1, rows = _subpixel_grid(min(p0[0], p1[0]) - half_width, max(p0[0], p1[0]) + half_width, size, ss)
    c0, c1, cols = _subpixel_grid(min(p0[1], p1[1]) - half_width, max(p0[1], p1[1]) + half_width, size, ss)
    if r0 >= r1 or c0 >= c1:
        return
    d = p1 - p0
    length2 = float(d @ d)
    pr, pc = rows[:, None] - p0[0], cols[None, :] - p0[1]
    t = np.clip((pr * d[0] + pc * d[1]) / length2, 0.0, 1.0) if length2 > 0 else np.zeros_like(pr * pc)
    inside = (pr - t * d[0]) ** 2 + (pc - t * d[1]) ** 2 <= half_width ** 2
    canvas[r0:r1, c0:c1] = np.maximum(canvas[r0:r1, c0:c1], inside)


def _disk(canvas: np.ndarray, ss: int, centre: np.ndarray, radius: float) -> None:
    """Paint (max with 1) the supersamples of ``canvas`` within ``radius`` of ``centre``."""
    _stroke(canvas, ss, centre, centre, radius)


def _coverage(canvas: np.ndarray, ss: int) -> np.ndarray:
    """Mean over ``ss x ss`` blocks: the fraction of each pixel covered, float32 in [0, 1]."""
    n = canvas.shape[0] // ss
    return canvas.reshape(n, ss, n, ss).mean(axis=(1, 3), dtype=np.float32)


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` to a temporary file renamed into place (no torn caches)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_checked_npz(path: Path, params: dict[str, Any], keys: Sequence[str], load: bool = True
                      ) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of cache ``path`` (none unless ``load``) after checking its stored
    ``params`` and that it holds ``keys``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {k: data[f"param_{k}"].item() for k in params if f"param_{k}" in data}
            missing = [k for k in keys if k not in data]
            arrays = {k: data[k] for k in keys if k in data} if load else {}
    except (OSError, ValueError, zlib.error) as err:
        raise ValueError(f"{path}: cannot read the cache ({err}); delete it to regenerate") from err
    wrong = {k: (stored.get(k), v) for k, v in params.items() if stored.get(k) != v}
    if wrong or missing:
        detail = ", ".join(f"{k}: stored {s!r}, requested {v!r}" for k, (s, v) in wrong.items())
        detail += f"; missing arrays {missing}" if missing else ""
        raise ValueError(f"{path}: cache made with other parameters ({detail}); delete it to regenerate")
    return arrays


def _param_arrays(params: dict[str, Any]) -> dict[str, np.ndarray]:
    return {f"param_{k}": np.asarray(v) for k, v in params.items()}


# ----------------------------------------------------------------------------- Pathfinder

#: Contour length (segments of the two target paths) per difficulty, as in LRA: the released
#: ``curv_baseline`` / ``curv_contour_length_9`` / ``curv_contour_length_14`` directories.
PATHFINDER_DIFFICULTIES = {"easy": 6, "intermediate": 9, "hard": 14}
PATHFINDER_DIFFICULTY_DIRS = {"easy": "curv_baseline", "intermediate": "curv_contour_length_9",
                              "hard": "curv_contour_length_14"}

#: Per-resolution drawing parameters, from the LRA TFDS builders' docstrings
#: (``lra_benchmarks/data/pathfinder.py``; the rest are ``snakes2_wrapper.py`` defaults):
#: ``paddle_length`` (dash length), ``margins`` (half the gap between dashes; one is drawn per
#: image), ``line_width`` (max of the builder's paddle thickness and 1 px), ``marker_radius``,
#: ``seed_distance`` (between the two target paths' origins), ``padding`` (border kept
#: free), ``continuity`` (turning angles are drawn with density ~ cos^2(continuity * dtheta)
#: on |continuity * dtheta| < pi/2), ``distractor_budget`` (``num_distractors = budget //
#: distractor_length``; ``distractor_length = contour_length // 3``).
PATHFINDER_PRESETS: dict[int, dict[str, Any]] = {
    32: dict(paddle_length=2.0, margins=(1.0,), line_width=1.0, marker_radius=1.5, seed_distance=7.0,
             padding=1.0, continuity=1.0, distractor_budget=20),
    64: dict(paddle_length=5.0, margins=(1.0,), line_width=1.0, marker_radius=2.5, seed_distance=12.0,
             padding=1.0, continuity=1.8, distractor_budget=22),
    128: dict(paddle_length=5.0, margins=(2.0, 3.0), line_width=1.5, marker_radius=3.0, seed_distance=20.0,
              padding=1.0, continuity=1.8, distractor_budget=35),
}
_PF_SUPERSAMPLE = 4
_PF_PATH_TRIES = 8  # starts tried per distractor before it is dropped
_PF_IMAGE_TRIES = 200  # target pairs tried per image


def _check_pathfinder_args(resolution: int, difficulty: str) -> tuple[dict[str, Any], int]:
    if isinstance(resolution, bool) or resolution not in PATHFINDER_PRESETS:
        raise ValueError(f"resolution: expected one of {tuple(PATHFINDER_PRESETS)}, got {resolution!r}")
    if difficulty not in PATHFINDER_DIFFICULTIES:
        raise ValueError(f"difficulty: expected one of {tuple(PATHFINDER_DIFFICULTIES)}, got {difficulty!r}")
    return PATHFINDER_PRESETS[int(resolution)], PATHFINDER_DIFFICULTIES[difficulty]


def _turn_weights(deltas: np.ndarray, continuity: float) -> np.ndarray:
    """snakes2's continuity prior on a turn ``delta``: ``cos(min(continuity |delta|, pi/2))^2``."""
    return np.cos(np.minimum(continuity * np.abs(deltas), 0.5 * math.pi)) ** 2


class _Occupancy:
    """Points sampled every half pixel along the paths drawn so far, with each point's path
    id and segment number."""

    def __init__(self) -> None:
        self.points = np.zeros((0, 2))
        self.owner = np.zeros((0,), np.int64)
        self.segment = np.zeros((0,), np.int64)

    def copy(self) -> _Occupancy:
        other = _Occupancy()
        other.points, other.owner, other.segment = self.points, self.owner, self.segment
        return other

    def add(self, points: np.ndarray, owner: int, segment: int) -> None:
        self.points = np.concatenate([self.points, points])
        self.owner = np.concatenate([self.owner, np.full(len(points), owner)])
        self.segment = np.concatenate([self.segment, np.full(len(points), segment)])

    def remove(self, owner: int, segment: int) -> None:
        keep = (self.owner != owner) | (self.segment != segment)
        self.points, self.owner, self.segment = self.points[keep], self.owner[keep], self.segment[keep]

    def blocking(self, owner: int, segment: int) -> np.ndarray:
        """The points a new segment ``segment`` of path ``owner`` must keep clear of: those of
        other paths and of its own segments before ``segment - 1``."""
        return self.points[(self.owner != owner) | (self.segment < segment - 1)]


def _clear(points: np.ndarray, blocking: np.ndarray, clearance: float) -> np.ndarray:
    """``points [..., k, 2]`` -> ``[...]`` bool: all ``k`` points >= ``clearance`` from ``blocking``."""
    if not len(blocking):
        return np.ones(points.shape[:-2], bool)
    d2 = ((points[..., :, None, :] - blocking) ** 2).sum(-1)
    return np.asarray(d2.min(axis=(-2, -1)) >= clearance ** 2)


def _grow_paths(rng: np.random.Generator, starts: list[np.ndarray], num_segments: int, step: float,
                cfg: dict[str, Any], clearance: float, occupancy: _Occupancy, first_id: int,
                keep_out: list[tuple[np.ndarray, float, int]], size: int, backtracks: int, end_keep: float = 0.0
                ) -> list[np.ndarray] | None:
    """Grow one path from each start, a segment of length ``step`` each in turn (occupancy
    updated); ``None`` (occupancy unchanged) where they get stuck.

    As snakes2's ``get_coords_cmf``: the candidate ends lie on the circle of radius ``step``
    about the current node, about one pixel of arc apart (randomly offset); those inside the
    ``padding`` and clear of other paths, of the path's own older segments and of the
    ``keep_out`` disks ``(centre, radius, id of the path exempt)`` are drawn with probability
    ~ :func:`_turn_weights` of the turn (the first segment's direction is uniform). With
    ``end_keep``, each path's end also keeps that far from the other paths (ends are where
    markers go). A path with no such candidate drops its last segment and grows again (at
    most ``backtracks`` times in all; snakes2 restarts the image instead)."""
    lo, hi = cfg["padding"], size - cfg["padding"]
    trial = occupancy.copy()
    nodes = [[np.asarray(s, np.float64)] for s in starts]
    headings: list[list[float]] = [[] for _ in starts]
    bound = min(math.pi, 0.5 * math.pi / cfg["continuity"])  # the prior is 0 beyond
    pieces = int(math.ceil(step / 0.5))
    fractions = np.arange(1, pieces + 1) / pieces
    reach = step + clearance
    while True:
        k = min(range(len(starts)), key=lambda i: len(nodes[i]))
        segment = len(nodes[k]) - 1
        if segment == num_segments:
            break
        half = math.pi if segment == 0 else bound
        count = max(int(math.ceil(2 * half * step)), 8)
        deltas = (np.arange(count) + rng.random()) * (2 * half / count) - half
        weights = np.ones(count) if segment == 0 else _turn_weights(deltas, cfg["continuity"])
        directions = (headings[k][-1] if segment else 0.0) + deltas
        p0 = nodes[k][-1]
        ends = p0 + step * np.stack([np.sin(directions), np.cos(directions)], -1)
        ok = (weights > 0) & np.all((ends >= lo) & (ends <= hi), axis=-1)
        pts = p0 + fractions[None, :, None] * (ends - p0)[:, None, :]  # [count, pieces, 2]
        last = segment == num_segments - 1
        finished = [(nodes[j][-1], end_keep, -1) for j in range(len(starts))
                    if end_keep and j != k and len(nodes[j]) == num_segments + 1]
        for c, r, exempt in keep_out + finished:
            if exempt != first_id + k and np.abs(c - p0).max() < step + r:
                ok &= _clear(pts, c[None], r)
        if end_keep and last and ok.any():
            others = trial.points[trial.owner != first_id + k]
            others = others[np.abs(others - p0).max(-1) < step + end_keep]
            ok &= _clear(ends[:, None, :], others, end_keep)
        blocking = trial.blocking(first_id + k, segment)
        blocking = blocking[np.abs(blocking - p0).max(-1) < reach]
        idx = np.flatnonzero(ok)
        if len(idx) and len(blocking):
            ok[idx] = _clear(pts[idx], blocking, clearance)
        if ok.any():
            p = weights * ok
            j = int(rng.choice(count, p=p / p.sum()))
            trial.add(np.concatenate([p0[None], pts[j]]), first_id + k, segment)
            nodes[k].append(ends[j])
            headings[k].append(float(directions[j]))
            continue
        if segment == 0 or backtracks == 0:
            return None
        backtracks -= 1
        trial.remove(first_id + k, segment - 1)
        nodes[k].pop()
        headings[k].pop()
    occupancy.points, occupancy.owner, occupancy.segment = trial.points, trial.owner, trial.segment
    return [np.stack(n) for n in nodes]


def pathfinder_example(seed: int, index: int, *, resolution: int = 32, difficulty: str = "hard"
                       ) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Item ``index`` of Pathfinder data set ``seed``: ``(image uint8 [res, res], label, info)``.

    Pathfinder (Linsley et al., 2018; LRA, Tay et al., 2021), a fresh NumPy port in spirit of
    the ``snakes2`` generator (github.com/drewlinsley/pathfinder): two target paths of
    ``contour_length`` segments (6 / 9 / 14 for ``difficulty`` easy / intermediate / hard,
    LRA's ``curv_baseline`` / ``curv_contour_length_9`` / ``_14``) grow from origins
    ``seed_distance`` apart near the centre (kept ``2 * seed_distance`` from the border, as
    snakes2 does), a segment each in turn; then ``distractor_budget // (contour_length // 3)``
    distractor paths of ``contour_length // 3`` segments. Each segment is a dash of
    ``paddle_length`` with a gap of ``2 * margin`` to the next (paths are dashed: no path is
    pixel-connected), turning by a random angle (see :data:`PATHFINDER_PRESETS`); paths keep
    ``margin + line_width`` apart, and ``marker_radius`` more from the targets' ends (no
    marker touches another path). One marker (filled circle) sits on the origin of target
    ``k`` (a coin), the other on the end of target ``k`` (label 1) or of the other target
    (label 0). The label is a fair coin of the item's generator, as in snakes2.

    ``info``: ``paths`` (list of ``[segments + 1, 2]`` float arrays of (row, col) nodes, the
    two targets first), ``markers`` ``[2, 2]`` (row, col), ``marker_paths`` (the path index
    under each marker), ``num_targets`` (2), ``margin`` and the preset.
    """
    cfg, contour_length = _check_pathfinder_args(resolution, difficulty)
    rng = item_rng(seed, index, _PATHFINDER_STREAM)
    size, ss = int(resolution), _PF_SUPERSAMPLE
    label = int(rng.integers(2))
    margin = float(cfg["margins"][int(rng.integers(len(cfg["margins"])))])
    step = cfg["paddle_length"] + 2 * margin
    clearance = margin + cfg["line_width"]
    distractor_length = contour_length // 3
    keep = cfg["marker_radius"] + clearance  # other paths keep this far from a (possible) marker
    for _ in range(_PF_IMAGE_TRIES):
        occupancy = _Occupancy()
        border = 2 * cfg["seed_distance"]
        origin = rng.uniform(border, size - border, 2)
        angle = rng.uniform(-math.pi, math.pi)
        second = origin + cfg["seed_distance"] * np.array([math.sin(angle), math.cos(angle)])
        targets = _grow_paths(rng, [origin, second], contour_length, step, cfg, clearance, occupancy, 0,
                              [(origin, keep, 0), (second, keep, 1)], size, backtracks=4 * contour_length,
                              end_keep=keep)
        if targets is not None:
            break
    else:  # pragma: no cover - the presets succeed within a few tries
        raise RuntimeError(f"pathfinder: no pair of target paths found for seed {seed}, index {index}")
    ends = [(p[e], keep, -1) for p in targets for e in (0, -1)]
    paths = list(targets)
    for _ in range(cfg["distractor_budget"] // distractor_length):
        for _ in range(_PF_PATH_TRIES):
            start = rng.uniform(cfg["padding"], size - cfg["padding"], 2)
            if not _clear(start[None], occupancy.points, clearance):
                continue
            if any(np.linalg.norm(start - c) < r for c, r, _ in ends):
                continue
            grown = _grow_paths(rng, [start], distractor_length, step, cfg, clearance, occupancy,
                                len(paths), ends, size, backtracks=distractor_length)
            if grown is not None:
                paths.extend(grown)
                break
    k = int(rng.integers(2))
    other = k if label == 1 else 1 - k
    markers = np.stack([targets[k][0], targets[other][-1]])

    canvas = np.zeros((size * ss, size * ss), np.float32)
    half = cfg["line_width"] / 2
    for path in paths:
        for p0, p1 in zip(path[:-1], path[1:]):
            u = (p1 - p0) / np.linalg.norm(p1 - p0)
            _stroke(canvas, ss, p0 + margin * u, p1 - margin * u, half)
    for m in markers:
        _disk(canvas, ss, m, cfg["marker_radius"])
    image = np.round(_coverage(canvas, ss) * 255).astype(np.uint8)
    info = dict(paths=paths, markers=markers, marker_paths=(k, other), num_targets=2, margin=margin,
                contour_length=contour_length, **cfg)
    return image, label, info


def pathfinder_dataset(seed: int, n: int, *, resolution: int = 32, difficulty: str = "hard", start: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Items ``start .. start + n - 1`` of :func:`pathfinder_example` (Linsley et al., 2018;
    LRA): ``(images uint8 [n, res, res], labels int32 [n])``; labels are fair coins."""
    _check_pathfinder_args(resolution, difficulty)
    n, start = _positive_int("n", n), _nonneg_int("start", start)
    images = np.zeros((n, resolution, resolution), np.uint8)
    labels = np.zeros((n,), np.int32)
    for i in range(n):
        images[i], labels[i], _ = pathfinder_example(seed, start + i, resolution=resolution, difficulty=difficulty)
    return images, labels


def cache_pathfinder(cache_dir: str | Path, seed: int, n: int, *, resolution: int = 32, difficulty: str = "hard",
                     workers: int = 1) -> Path:
    """The ``.npz`` of :func:`pathfinder_dataset` ``(seed, n, resolution, difficulty)`` under
    ``cache_dir``, generated on the first call (arrays ``images`` uint8 ``[n, res, res]``,
    ``labels`` int32 ``[n]`` and the parameters). The file is named by the parameters; one
    whose stored parameters differ is a ``ValueError`` (never silently reused). ``workers``
    processes generate contiguous index ranges (items are independent, so the file is the
    same for any number of workers)."""
    _check_pathfinder_args(resolution, difficulty)
    seed, n = _nonneg_int("seed", seed), _positive_int("n", n)
    params = dict(task="pathfinder", version=_CACHE_VERSION, seed=seed, n=n, resolution=int(resolution),
                  difficulty=difficulty)
    path = Path(cache_dir) / f"pathfinder{resolution}_{difficulty}_seed{seed}_n{n}_v{_CACHE_VERSION}.npz"
    if path.exists():
        _read_checked_npz(path, params, ("images", "labels"), load=False)
        return path
    images, labels = _pathfinder_in_parallel(seed, n, resolution, difficulty, _positive_int("workers", workers))
    _atomic_savez(path, dict(images=images, labels=labels, **_param_arrays(params)))
    return path


def _pathfinder_range(args: tuple[int, int, int, int, str]) -> tuple[np.ndarray, np.ndarray]:
    seed, start, count, resolution, difficulty = args
    return pathfinder_dataset(seed, count, resolution=resolution, difficulty=difficulty, start=start)


def _pathfinder_in_parallel(seed: int, n: int, resolution: int, difficulty: str, workers: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pathfinder_dataset` ``(seed, n)`` from ``workers`` spawned processes (one range each)."""
    if workers == 1 or n < 2 * workers:
        return pathfinder_dataset(seed, n, resolution=resolution, difficulty=difficulty)
    import concurrent.futures
    import multiprocessing

    bounds = np.linspace(0, n, workers + 1).astype(int)
    ranges = [(seed, int(a), int(b - a), resolution, difficulty) for a, b in zip(bounds[:-1], bounds[1:])]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_pathfinder_range, ranges))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_pathfinder_cache(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a :func:`cache_pathfinder` file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    with np.load(path, allow_pickle=False) as data:
        if "images" not in data or "labels" not in data:
            raise ValueError(f"{path}: not a pathfinder cache (no 'images'/'labels' arrays)")
        return data["images"], data["labels"]


# ----------------------------------------------------------------------------- PNG and the released files

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _unfilter_row(kind: int, row: np.ndarray, prior: np.ndarray, path: Path, y: int) -> np.ndarray:
    """Undo PNG filter ``kind`` on one row of 1-byte pixels (``prior``: the decoded row above)."""
    if kind == 0:
        return row
    if kind == 1:  # Sub: x = f + left
        return (np.cumsum(row, dtype=np.int64) & 0xFF).astype(np.uint8)
    if kind == 2:  # Up: x = f + up
        return ((row.astype(np.int64) + prior) & 0xFF).astype(np.uint8)
    if kind in (3, 4):  # Average, Paeth: sequential within the row
        f, up, out = row.tolist(), prior.tolist(), [0] * len(row)
        left = upleft = 0
        for i, (fi, b) in enumerate(zip(f, up)):
            if kind == 3:
                pred = (left + b) >> 1
            else:
                p = left + b - upleft
                pa, pb, pc = abs(p - left), abs(p - b), abs(p - upleft)
                pred = left if pa <= pb and pa <= pc else (b if pb <= pc else upleft)
            left = out[i] = (fi + pred) & 0xFF
            upleft = b
        return np.asarray(out, np.uint8)
    raise ValueError(f"{path}: row {y}: unknown PNG filter type {kind}")


def read_png_gray8(path: str | Path) -> np.ndarray:
    """An 8-bit grayscale, non-interlaced PNG (the released Pathfinder images) as uint8
    ``[height, width]``: chunks (CRC-checked), zlib, the five row filters (None, Sub, Up,
    Average, Paeth; the last two in pure Python). ``ValueError`` naming the file for any
    other colour type, bit depth or interlace, and for a damaged file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: image file not found")
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file (bad signature{', empty file' if not data else ''})")
    pos, header, idat = len(_PNG_SIGNATURE), None, []
    while True:
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise ValueError(f"{path}: truncated PNG chunk {kind!r}")
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: CRC mismatch in PNG chunk {kind!r}")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError(f"{path}: PNG without an IHDR chunk")
    width, height, depth, colour, compression, filtering, interlace = header
    if depth != 8 or colour != 0:
        raise ValueError(f"{path}: unsupported PNG: bit depth {depth}, colour type {colour}; "
                         "expected 8-bit grayscale (colour type 0)")
    if interlace != 0 or compression != 0 or filtering != 0:
        raise ValueError(f"{path}: unsupported PNG: interlace {interlace}, compression {compression}, "
                         f"filter method {filtering}; expected 0, 0, 0")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as err:
        raise ValueError(f"{path}: corrupt PNG image data ({err})") from None
    if len(raw) != height * (width + 1):
        raise ValueError(f"{path}: PNG image data of {len(raw)} bytes, expected {height * (width + 1)} "
                         f"for {height}x{width}")
    rows = np.frombuffer(raw, np.uint8).reshape(height, width + 1)
    image = np.zeros((height, width), np.uint8)
    prior = np.zeros(width, np.int64)
    for y in range(height):
        image[y] = _unfilter_row(int(rows[y, 0]), rows[y, 1:], prior, path, y)
        prior = image[y].astype(np.int64)
    return image


def _metadata_rows(path: Path) -> list[list[str]]:
    """Rows of one released metadata file: whitespace-separated text lines (what the LRA
    TFDS builder and S4 read, despite the ``.npy`` name) or a real ``.npy`` string array."""
    raw = path.read_bytes()
    if raw.startswith(b"\x93NUMPY"):
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path}: cannot read the metadata array ({err})") from None
        if array.ndim != 2:
            raise ValueError(f"{path}: expected a 2-d metadata array of rows, got shape {array.shape}")
        return [[str(c) for c in row] for row in array]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: metadata is neither text nor a .npy array ({err})") from None
    return [line.split() for line in text.splitlines()]


def load_pathfinder_released(root: str | Path, difficulty_dir: str, *, limit: int | None = None,
                             skip_empty: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The released LRA Pathfinder images (Linsley et al., 2018; ``lra_release``): ``(images
    uint8 [n, res, res], labels int32 [n])``.

    ``root`` is a ``pathfinder{32,64,128,256}`` directory, ``difficulty_dir`` one of
    ``curv_baseline`` / ``curv_contour_length_9`` / ``curv_contour_length_14`` (or easy /
    intermediate / hard). Reads ``root/difficulty_dir/metadata/*.npy`` in numeric order; each
    row is ``[subdir, filename, image index, label, continuity, contour_length, ...]`` (the
    ``snakes2`` ``accumulate_meta`` layout) and names the image ``root/difficulty_dir/subdir/
    filename`` (a PNG under ``imgs/``) with label ``int(row[3])``, as LRA's TFDS builder and
    S4's ``PathFinderDataset`` do. ``limit`` stops after that many rows. Zero-byte images (the
    release has one, ``pathfinder32/curv_baseline/imgs/0/sample_172.png``, which S4
    blacklists) are skipped when ``skip_empty``. ``ValueError`` naming the file for a missing
    metadata directory, a short row, a label not in {0, 1}, a missing or unreadable image, or
    images of different sizes.
    """
    base = Path(root) / PATHFINDER_DIFFICULTY_DIRS.get(difficulty_dir, difficulty_dir)
    meta_dir = base / "metadata"
    if not meta_dir.is_dir():
        raise ValueError(f"{meta_dir}: metadata directory not found (root={str(root)!r}, "
                         f"difficulty_dir={difficulty_dir!r})")
    files = sorted(meta_dir.glob("*.npy"), key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem))
    if not files:
        raise ValueError(f"{meta_dir}: no metadata/*.npy files")
    if limit is not None:
        limit = _nonneg_int("limit", limit)
    images, labels, shape = [], [], None
    for meta in files:
        if limit is not None and len(labels) >= limit:
            break
        for line, row in enumerate(_metadata_rows(meta), start=1):
            if limit is not None and len(labels) >= limit:
                break
            if not row:
                continue
            if len(row) < 4:
                raise ValueError(f"{meta}: row {line}: expected at least 4 fields [subdir, filename, index, "
                                 f"label, ...], got {row}")
            if row[3] not in ("0", "1"):
                raise ValueError(f"{meta}: row {line}: label (field 4) must be 0 or 1, got {row[3]!r}")
            image_path = base / row[0] / row[1]
            if not image_path.is_file():
                raise ValueError(f"{image_path}: image file not found (listed in {meta}, row {line})")
            if skip_empty and image_path.stat().st_size == 0:
                continue
            image = read_png_gray8(image_path)
            if shape is None:
                shape = image.shape
            elif image.shape != shape:
                raise ValueError(f"{image_path}: image of shape {image.shape}, the others are {shape}")
            images.append(image)
            labels.append(int(row[3]))
    if not images:
        raise ValueError(f"{meta_dir}: no images listed")
    return np.stack(images), np.asarray(labels, np.int32)


# ----------------------------------------------------------------------------- arrow pointing

#: Arrow-pointing geometry in units of the base resolution ``R`` (the canvas side unless
#: ``base_resolution`` is given). The pLSTM generator (github.com/ml-jku/arrow_pointing_dataset,
#: 192 px images) draws arrow length 15-30 px, width 2-4 px, radius 15-30 px, padding 30 px;
#: those scaled to 32 px would give 3-5 px arrows, so the arrow is longer here (7-11 px at 32).
ARROW_GEOMETRY = dict(
    arrow_length=(0.22, 0.34),  # L, tail to tip
    line_width=(1.0 / 32, 1.5 / 32),
    radius=(0.07, 0.13),
    padding=0.18,  # arrow centre and circle centre lie in [padding, 1 - padding] of the canvas
    margin=1.0 / 32,  # the ray passes >= margin inside (label 1) / outside (label 0) the circle
    head_length=0.35,  # of L, two strokes back from the tip at +-head_angle
    head_angle=0.5,  # radians (pLSTM: L / 2.5 at +-0.5 rad)
)
_ARROW_SUPERSAMPLE = 4


def arrow_pointing_label(tail: np.ndarray, tip: np.ndarray, centre: np.ndarray, radius: float
                         ) -> tuple[int, float]:
    """``(label, distance)``: the distance from ``centre`` to the ray from ``tail`` through
    ``tip`` (the half-line, extended beyond the tip), and ``label = distance < radius``."""
    tail, tip, centre = (np.asarray(p, np.float64) for p in (tail, tip, centre))
    u = (tip - tail) / np.linalg.norm(tip - tail)
    t = max(float((centre - tail) @ u), 0.0)
    distance = float(np.linalg.norm(centre - (tail + t * u)))
    return int(distance < radius), distance


def arrow_pointing_example(seed: int, index: int, *, resolution: int = 32, base_resolution: int | None = None
                           ) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Item ``index`` of arrow-pointing data set ``seed``: ``(image float32 [res, res] in
    [0, 1], label, info)``.

    Arrow pointing (Pöppel et al., 2025, "pLSTM", the extrapolation task): an arrow (shaft
    and a two-stroke head at the tip) and a filled circle on a black background (1 =
    foreground; pLSTM draws black on white RGB); label 1 when the ray from the arrow's tail
    through its tip hits the circle. As in pLSTM's generator, the label is a fair coin drawn
    first, the arrow centre ``A`` and circle centre ``C`` are drawn uniformly (here with
    ``|C - A| >= L/2 + r + 2 margin + width`` so the circle never touches the arrow), and the
    direction is drawn uniformly inside the cone of rays passing ``<= r - margin`` from ``C``
    (label 1) or outside the cone of rays passing ``< r + margin`` (label 0): positions carry
    no label information and the ray misses or hits by at least ``margin`` (1 px at 32).

    Sizes are fractions of ``base_resolution`` (default: ``resolution``, so the same
    ``(seed, index)`` is the same picture at every resolution) while positions span the
    canvas: ``base_resolution=32, resolution=64`` keeps the objects' pixel sizes and doubles
    the distances, pLSTM's extrapolation protocol (objects of fixed pixel size, trained at
    192 px and tested at 384 px). See :data:`ARROW_GEOMETRY`.

    ``info``: ``tail``, ``tip``, ``centre`` (row, col pixels), ``radius``, ``line_width``,
    ``margin`` (pixels) and ``distance`` (centre to ray); see :func:`arrow_pointing_label`.
    """
    size = _positive_int("resolution", resolution)
    if size < 8:
        raise ValueError(f"resolution: expected >= 8 pixels, got {size}")
    base = size if base_resolution is None else _positive_int("base_resolution", base_resolution)
    if base > size:
        raise ValueError(f"base_resolution: expected <= resolution = {size}, got {base}")
    g, scale = ARROW_GEOMETRY, base / size  # sizes in fractions of the canvas
    rng = item_rng(seed, index, _ARROW_STREAM)
    label = int(rng.random() < 0.5)
    length = rng.uniform(*g["arrow_length"]) * scale
    width = rng.uniform(*g["line_width"]) * scale
    radius = rng.uniform(*g["radius"]) * scale
    pad, margin = g["padding"] * scale, g["margin"] * scale
    min_distance = length / 2 + radius + 2 * margin + width
    while True:
        a, c = rng.uniform(pad, 1 - pad, 2), rng.uniform(pad, 1 - pad, 2)
        distance = float(np.linalg.norm(c - a))
        if distance >= min_distance:
            break
    phi0 = math.atan2(c[0] - a[0], c[1] - a[1])
    if label:
        half = math.asin((radius - margin) / distance)
        theta = phi0 + rng.uniform(-half, half)
    else:
        half = math.asin(min(1.0, (radius + margin) / distance))
        theta = phi0 + half + rng.uniform(0.0, 2 * math.pi - 2 * half)
    u = np.array([math.sin(theta), math.cos(theta)])
    tail, tip, centre = (a - length / 2 * u) * size, (a + length / 2 * u) * size, c * size
    r_px, w_px = radius * size, width * size

    ss = _ARROW_SUPERSAMPLE
    canvas = np.zeros((size * ss, size * ss), np.float32)
    _stroke(canvas, ss, tail, tip, w_px / 2)
    for sign in (-1.0, 1.0):
        back = theta + math.pi + sign * g["head_angle"]
        end = tip + g["head_length"] * length * size * np.array([math.sin(back), math.cos(back)])
        _stroke(canvas, ss, tip, end, w_px / 2)
    _disk(canvas, ss, centre, r_px)
    image = _coverage(canvas, ss)
    _, ray_distance = arrow_pointing_label(tail, tip, centre, r_px)
    info = dict(tail=tail, tip=tip, centre=centre, radius=r_px, line_width=w_px, margin=margin * size,
                distance=ray_distance, resolution=size, base_resolution=base)
    return image, label, info


def arrow_pointing_dataset(seed: int, n: int, *, resolution: int = 32, base_resolution: int | None = None,
                           start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Items ``start .. start + n - 1`` of :func:`arrow_pointing_example` (Pöppel et al.,
    2025, pLSTM): ``(images float32 [n, res, res], labels int32 [n])``."""
    n, start = _positive_int("n", n), _nonneg_int("start", start)
    first = arrow_pointing_example(seed, start, resolution=resolution, base_resolution=base_resolution)
    images = np.zeros((n,) + first[0].shape, np.float32)
    labels = np.zeros((n,), np.int32)
    images[0], labels[0] = first[0], first[1]
    for i in range(1, n):
        images[i], labels[i], _ = arrow_pointing_example(seed, start + i, resolution=resolution,
                                                         base_resolution=base_resolution)
    return images, labels


# ----------------------------------------------------------------------------- Moving MNIST

MMNIST_STEP_LENGTH = 0.1  # per frame, in units of the free canvas side (size - digit size): 3.6 px at 64


def _check_digits(digits: Any, size: int) -> np.ndarray:
    digits = np.asarray(digits)
    if digits.ndim != 3 or digits.shape[1] != digits.shape[2] or digits.shape[0] < 1:
        raise ValueError(f"digits: expected shape [n, d, d] (MNIST: [n, 28, 28]), got {digits.shape}")
    if digits.shape[1] > size:
        raise ValueError(f"digits: digit size {digits.shape[1]} exceeds the canvas size {size}")
    if digits.dtype != np.uint8 and not np.issubdtype(digits.dtype, np.floating):
        raise ValueError(f"digits: expected uint8 in [0, 255] or float in [0, 1], got dtype {digits.dtype}")
    return digits


def _digit_uint8(digits: np.ndarray, i: int) -> np.ndarray:
    d = digits[i]
    if d.dtype == np.uint8:
        return d
    if not (np.all(np.isfinite(d)) and d.min() >= 0.0 and d.max() <= 1.0):
        raise ValueError(f"digits: float digits must lie in [0, 1]; digit {i} spans [{d.min()}, {d.max()}]")
    return np.round(d * 255.0).astype(np.uint8)


def _check_video_args(num_digits: int, size: int, frames: int) -> tuple[int, int, int]:
    return _positive_int("num_digits", num_digits), _positive_int("size", size), _positive_int("frames", frames)


def moving_mnist_trajectories(seed: int, index: int, num_source_digits: int, *, num_digits: int = 2,
                              size: int = 64, frames: int = 20, digit_size: int = 28
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The random part of :func:`moving_mnist` item ``index``: ``(digit ids int64
    [num_digits], tops int64 [num_digits, frames], lefts int64 [num_digits, frames])``.

    OpenSTL's ``MovingMNIST.get_random_trajectory`` (Srivastava et al., 2015): per digit, a
    position ``(x, y)`` uniform in ``[0, 1]^2`` and a direction ``theta`` uniform in
    ``[0, 2 pi)``; every frame first steps ``0.1 (cos theta, sin theta)``, then a coordinate
    past 0 or 1 is clamped there and its velocity reversed (a bounce); the frame's top-left
    is ``int((size - digit_size) * (y, x))``, so every digit stays inside the canvas. Then
    the digit is one of ``num_source_digits``, uniformly.
    """
    num_digits, size, frames = _check_video_args(num_digits, size, frames)
    num_source_digits, digit_size = _positive_int("num_source_digits", num_source_digits), \
        _positive_int("digit_size", digit_size)
    if digit_size > size:
        raise ValueError(f"digit_size: {digit_size} exceeds the canvas size {size}")
    rng = item_rng(seed, index, _MMNIST_STREAM)
    canvas = size - digit_size
    ids = np.zeros(num_digits, np.int64)
    tops, lefts = np.zeros((num_digits, frames), np.int64), np.zeros((num_digits, frames), np.int64)
    for k in range(num_digits):
        x, y = rng.random(), rng.random()
        theta = rng.random() * 2 * math.pi
        vx, vy = math.cos(theta), math.sin(theta)
        for t in range(frames):
            x, y = x + vx * MMNIST_STEP_LENGTH, y + vy * MMNIST_STEP_LENGTH
            if x <= 0.0:
                x, vx = 0.0, -vx
            if x >= 1.0:
                x, vx = 1.0, -vx
            if y <= 0.0:
                y, vy = 0.0, -vy
            if y >= 1.0:
                y, vy = 1.0, -vy
            tops[k, t], lefts[k, t] = int(canvas * y), int(canvas * x)
        ids[k] = rng.integers(num_source_digits)
    return ids, tops, lefts


def _render_video(digits: np.ndarray, seed: int, index: int, num_digits: int, size: int, frames: int
                  ) -> np.ndarray:
    d = digits.shape[1]
    ids, tops, lefts = moving_mnist_trajectories(seed, index, len(digits), num_digits=num_digits, size=size,
                                                 frames=frames, digit_size=d)
    video = np.zeros((frames, size, size), np.uint8)
    for k in range(num_digits):
        digit = _digit_uint8(digits, int(ids[k]))
        for t in range(frames):
            top, left = tops[k, t], lefts[k, t]
            np.maximum(video[t, top:top + d, left:left + d], digit, out=video[t, top:top + d, left:left + d])
    return video


def moving_mnist(digits: np.ndarray, seed: int, index: int, *, num_digits: int = 2, size: int = 64,
                 frames: int = 20) -> np.ndarray:
    """Item ``index`` of Moving MNIST data set ``seed``: uint8 ``[frames, size, size]``
    (Srivastava et al., 2015; the OpenSTL generator PredFormer trains on).

    ``digits``: ``[n, d, d]`` source images (MNIST: ``[60000, 28, 28]``, the training
    digits for training data), uint8 in 0..255 or float in [0, 1] (scaled by 255 and
    rounded). ``num_digits`` digits move and bounce as in :func:`moving_mnist_trajectories`
    and are composited by per-pixel max, as OpenSTL's ``generate_moving_mnist`` does.
    """
    num_digits, size, frames = _check_video_args(num_digits, size, frames)
    return _render_video(_check_digits(digits, size), seed, index, num_digits, size, frames)


def moving_mnist_batch(digits: np.ndarray, seed: int, indices: Sequence[int] | np.ndarray, *, num_digits: int = 2,
                       size: int = 64, frames: int = 20) -> np.ndarray:
    """:func:`moving_mnist` for each of ``indices``: uint8 ``[b, frames, size, size]``
    (Srivastava et al., 2015)."""
    num_digits, size, frames = _check_video_args(num_digits, size, frames)
    digits = _check_digits(digits, size)
    indices = [_nonneg_int("indices", i) for i in np.asarray(indices).reshape(-1).tolist()]
    out = np.zeros((len(indices), frames, size, size), np.uint8)
    for b, i in enumerate(indices):
        out[b] = _render_video(digits, seed, i, num_digits, size, frames)
    return out


def cached_moving_mnist_test(cache_dir: str | Path, digits: np.ndarray, *, seed: int = 0, n: int = 10000,
                             num_digits: int = 2, size: int = 64, frames: int = 20) -> np.ndarray:
    """A fixed Moving MNIST test set, uint8 ``[n, frames, size, size]``: items ``0 .. n-1`` of
    :func:`moving_mnist` ``seed`` (Srivastava et al., 2015), generated into an ``.npz`` under
    ``cache_dir`` on the first call and read afterwards. The stand-in for the released
    ``mnist_test_seq.npy`` (:func:`load_moving_mnist_npy`) where that file is absent; pass
    MNIST *test* digits and a seed no training run uses. The file name and the stored
    parameters include a SHA-256 of ``digits``: a cache made with other digits or parameters
    is a ``ValueError``, never reused."""
    num_digits, size, frames = _check_video_args(num_digits, size, frames)
    digits = _check_digits(digits, size)
    seed, n = _nonneg_int("seed", seed), _positive_int("n", n)
    digest = hashlib.sha256(np.ascontiguousarray(digits).tobytes() + str((digits.dtype, digits.shape)).encode()
                            ).hexdigest()[:16]
    params = dict(task="moving_mnist", version=_CACHE_VERSION, seed=seed, n=n, num_digits=num_digits, size=size,
                  frames=frames, digits_sha256=digest)
    name = f"moving_mnist_seed{seed}_n{n}_d{num_digits}_s{size}_t{frames}_{digest}_v{_CACHE_VERSION}.npz"
    path = Path(cache_dir) / name
    if path.exists():
        return _read_checked_npz(path, params, ("videos",))["videos"]
    videos = moving_mnist_batch(digits, seed, np.arange(n), num_digits=num_digits, size=size, frames=frames)
    _atomic_savez(path, dict(videos=videos, **_param_arrays(params)))
    return videos


def load_moving_mnist_npy(path: str | Path, *, frames: int | None = 20, size: int | None = 64) -> np.ndarray:
    """The released Moving MNIST test set (Srivastava et al., 2015): ``mnist_test_seq.npy`` is
    uint8 ``[20, 10000, 64, 64]``, time first; returns ``[10000, 20, 64, 64]`` (contiguous).
    ``ValueError`` naming the file for another dtype, rank, frame count (``frames``, ``None``
    to skip) or frame size (``size``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: cannot read as a .npy array ({err})") from None
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[2] != data.shape[3]:
        raise ValueError(f"{path}: expected uint8 [frames, n, size, size] (mnist_test_seq.npy: [20, 10000, 64, 64]), "
                         f"got {data.dtype} {tuple(data.shape)}")
    if frames is not None and data.shape[0] != frames:
        raise ValueError(f"{path}: expected {frames} frames on axis 0 (time first), got shape {tuple(data.shape)}")
    if size is not None and data.shape[2] != size:
        raise ValueError(f"{path}: expected {size}x{size} frames, got shape {tuple(data.shape)}")
    return np.ascontiguousarray(np.swapaxes(data, 0, 1))


def split_frames(videos: np.ndarray, num_input: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)``: the first ``num_input`` frames and the rest, along axis -3 of
    ``[..., frames, h, w]`` (the Moving MNIST protocol: 10 frames in, 10 predicted)."""
    videos = np.asarray(videos)
    if videos.ndim < 3:
        raise ValueError(f"videos: expected shape [..., frames, h, w], got {videos.shape}")
    frames = videos.shape[-3]
    if not 0 < _nonneg_int("num_input", num_input) < frames:
        raise ValueError(f"num_input: expected 0 < num_input < {frames} frames, got {num_input}")
    return videos[..., :num_input, :, :], videos[..., num_input:, :, :]
