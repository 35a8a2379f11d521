"""pLSTM recurrences (1-D line graph and 2-D grid) against float64 numpy oracles.

Oracles, written from the paper's definitions (Pöppel et al., 2025):
* ``loop_1d`` / ``loop_2d``: the DAG recurrence node by node (edge states ``C``, source,
  transition, mark, direct);
* ``gating_1d`` / ``gating_2d_paths``: the unrolled form ``y_n = sum_m G_nm (q_n . k_m) v_m``
  with ``G_nm`` = the sum over all DAG paths ``m -> n`` of ``M T ... T S`` (explicit path
  enumeration on the grid) and ``G_nn = D``.
The chunked (1-D) and tiled (2-D) evaluations must equal the sequential DAG recurrence in
float64 to ~1e-12 for every chunk / tile size (dividing or not), with initial and final
boundary states, and their gradients must equal the sequential ones.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from ssmjax.scan import plstm as plstm_module

TOL = dict(rtol=1e-11, atol=1e-11)
# jit-compiled once per shape and configuration (eager dispatch of the nested scans is slow)
plstm_1d = jax.jit(plstm_module.plstm_1d, static_argnames=("method", "chunk_size", "reverse"))
plstm_2d = jax.jit(plstm_module.plstm_2d, static_argnames=("method", "tile_size"))


# ----------------------------------------------------------------------------- oracles
def loop_1d(q, k, v, s, T, m, d, c0):
    """C_t = T_t C_{t-1} + S_t k_t v_t^T;  y_t = q_t^T (M_t . C_{t-1}) + D_t (q_t . k_t) v_t."""
    b, t, h, _ = q.shape
    C, y = np.array(c0, np.float64), np.zeros((b, t, h, v.shape[-1]))
    for i in range(t):
        read = np.einsum("bhj,bhjkv->bhkv", m[:, i], C)
        y[:, i] = np.einsum("bhk,bhkv->bhv", q[:, i], read) + (d[:, i] * np.sum(q[:, i] * k[:, i], -1))[..., None] * v[:, i]
        kv = k[:, i, :, :, None] * v[:, i, :, None, :]
        C = np.einsum("bhij,bhjkv->bhikv", T[:, i], C) + s[:, i, :, :, None, None] * kv[:, :, None]
    return y, C


def gating_1d(q, k, v, s, T, m, d):
    """Unrolled 1-D form from a zero state: G_ts = M_t^T T_{t-1} ... T_{s+1} S_s (s < t), G_tt = D_t."""
    b, t, h, _ = q.shape
    y = np.zeros((b, t, h, v.shape[-1]))
    for i in range(t):
        for r in range(i + 1):
            if r == i:
                g = d[:, i]
            else:
                vec = s[:, r]  # [b, h, J]
                for u in range(r + 1, i):
                    vec = np.einsum("bhij,bhj->bhi", T[:, u], vec)
                g = np.einsum("bhj,bhj->bh", m[:, i], vec)
            y[:, i] += (g * np.sum(q[:, i] * k[:, r], -1))[..., None] * v[:, r]
    return y


def loop_2d(q, k, v, s, T, m, d, left, top):
    """Raster-order DAG recurrence; edges (right, down) out, (left, up) in."""
    b, H, W, h, _ = q.shape
    J, dk, dv = s.shape[-1], q.shape[-1], v.shape[-1]
    R, D = np.zeros((b, H, W, h, J, dk, dv)), np.zeros((b, H, W, h, J, dk, dv))
    y = np.zeros((b, H, W, h, dv))
    for i in range(H):
        for j in range(W):
            L = left[:, i] if j == 0 else R[:, i, j - 1]
            U = top[:, j] if i == 0 else D[:, i - 1, j]
            read = np.einsum("bhj,bhjkv->bhkv", m[:, i, j, :, 0], L) + np.einsum("bhj,bhjkv->bhkv", m[:, i, j, :, 1], U)
            qn, kn, vn = q[:, i, j], k[:, i, j], v[:, i, j]
            y[:, i, j] = np.einsum("bhk,bhkv->bhv", qn, read) + (d[:, i, j] * np.sum(qn * kn, -1))[..., None] * vn
            kv = (kn[..., :, None] * vn[..., None, :])[:, :, None]
            Tn, sn = T[:, i, j], s[:, i, j]
            R[:, i, j] = (np.einsum("bhij,bhjkv->bhikv", Tn[:, :, 0, 0], L) + np.einsum("bhij,bhjkv->bhikv", Tn[:, :, 0, 1], U)
                          + sn[:, :, 0, :, None, None] * kv)
            D[:, i, j] = (np.einsum("bhij,bhjkv->bhikv", Tn[:, :, 1, 0], L) + np.einsum("bhij,bhjkv->bhikv", Tn[:, :, 1, 1], U)
                          + sn[:, :, 1, :, None, None] * kv)
    return y, R[:, :, -1], D[:, -1]


def gating_2d_paths(s, T, m, d):
    """G[(i,j), (i',j')] by enumerating every monotone path (scalar gates, J = 1, one batch
    row and head): leave the source through edge e0, take transitions at every node
    passed, arrive through edge e_last and apply the mark. Returns [H*W, H*W]."""
    H, W = d.shape
    G = np.zeros((H * W, H * W))
    for (i0, j0) in itertools.product(range(H), range(W)):
        G[i0 * W + j0, i0 * W + j0] = d[i0, j0]
        # stack of (node, incoming edge, weight): walk every path
        frontier = []
        for e0, (di, dj) in enumerate([(0, 1), (1, 0)]):  # 0 = right, 1 = down
            if i0 + di < H and j0 + dj < W:
                frontier.append((i0 + di, j0 + dj, e0, s[i0, j0, e0]))
        while frontier:
            i, j, out_edge, w = frontier.pop()
            incoming = 0 if out_edge == 0 else 1  # arrived through left (from a right edge) or up
            G[i * W + j, i0 * W + j0] += m[i, j, incoming] * w
            for e, (di, dj) in enumerate([(0, 1), (1, 0)]):
                if i + di < H and j + dj < W:
                    frontier.append((i + di, j + dj, e, w * T[i, j, e, incoming]))
    return G


# ----------------------------------------------------------------------------- inputs
def inputs_1d(seed, b=2, t=23, h=2, dk=3, dv=4, j=2, gate_scale=0.6):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, b, t, h, dk))
    v = rng.normal(size=(b, t, h, dv))
    s, m = rng.normal(size=(2, b, t, h, j))
    T = gate_scale * rng.normal(size=(b, t, h, j, j)) / np.sqrt(j)
    d = rng.normal(size=(b, t, h))
    c0 = rng.normal(size=(b, h, j, dk, dv))
    return q, k, v, s, T, m, d, c0


def inputs_2d(seed, b=2, H=5, W=6, h=2, dk=3, dv=2, j=2):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, b, H, W, h, dk))
    v = rng.normal(size=(b, H, W, h, dv))
    s, m = rng.normal(size=(2, b, H, W, h, 2, j))
    T = 0.4 * rng.normal(size=(b, H, W, h, 2, 2, j, j)) / np.sqrt(j)
    d = rng.normal(size=(b, H, W, h))
    left = rng.normal(size=(b, H, h, j, dk, dv))
    top = rng.normal(size=(b, W, h, j, dk, dv))
    return q, k, v, s, T, m, d, left, top


# ----------------------------------------------------------------------------- 1-D
@pytest.mark.parametrize("j", [1, 2])
@pytest.mark.parametrize("method,chunk", [("sequential", 64), ("chunked", 1), ("chunked", 5), ("chunked", 64)])
def test_1d_equals_the_dag_recurrence(j, method, chunk):
    *args, c0 = inputs_1d(0, j=j)
    y, last = plstm_1d(*args, initial_state=c0, method=method, chunk_size=chunk)
    y_ref, last_ref = loop_1d(*args, c0)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(last, last_ref, **TOL)


def test_1d_unrolled_gating_form():
    args = inputs_1d(1, t=9, j=3)[:-1]
    y, _ = plstm_1d(*args, method="chunked", chunk_size=4)
    np.testing.assert_allclose(y, gating_1d(*args), **TOL)


@settings(max_examples=4, deadline=None)
@given(t=st.integers(1, 20), chunk=st.integers(1, 8))
def test_1d_chunk_size_invariance(t, chunk):
    *args, c0 = inputs_1d(2, b=1, t=t, h=1, dk=2, dv=2, j=2)
    y, last = plstm_1d(*args, initial_state=c0, method="chunked", chunk_size=chunk)
    y_ref, last_ref = loop_1d(*args, c0)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(last, last_ref, **TOL)


def test_1d_split_sequence_and_documents():
    *args, c0 = inputs_1d(3, t=17)
    y, last = plstm_1d(*args, initial_state=c0, chunk_size=4)
    first, mid = plstm_1d(*(a[:, :6] for a in args), initial_state=c0, chunk_size=4)
    second, end = plstm_1d(*(a[:, 6:] for a in args), initial_state=mid, chunk_size=4)
    np.testing.assert_allclose(np.concatenate([first, second], 1), y, **TOL)
    np.testing.assert_allclose(end, last, **TOL)
    # packed documents: the state restarts at 6 and at 11 (and reset[:, 0] drops c0)
    ids = np.repeat(np.array([[0] * 6 + [1] * 5 + [2] * 6]), 2, 0)
    for method in ("sequential", "chunked"):
        packed, _ = plstm_1d(*args, initial_state=c0, segment_ids=ids, method=method, chunk_size=4)
        for lo, hi in [(0, 6), (6, 11), (11, 17)]:
            start = c0 if lo == 0 else np.zeros_like(c0)
            np.testing.assert_allclose(packed[:, lo:hi], loop_1d(*(a[:, lo:hi] for a in args), start)[0], **TOL)
    reset = np.zeros((2, 17), bool)
    reset[:, 0] = True
    dropped, _ = plstm_1d(*args, initial_state=c0, reset=reset, chunk_size=4)
    np.testing.assert_allclose(dropped, loop_1d(*args, np.zeros_like(c0))[0], **TOL)


def test_1d_reverse():
    *args, c0 = inputs_1d(4, t=11)
    y, last = plstm_1d(*args, initial_state=c0, reverse=True, chunk_size=4)
    y_ref, last_ref = loop_1d(*(np.flip(a, 1) for a in args), c0)
    np.testing.assert_allclose(y, np.flip(y_ref, 1), **TOL)
    np.testing.assert_allclose(last, last_ref, **TOL)


def test_1d_gradients():
    *args, c0 = inputs_1d(5, b=1, t=7, h=1, dk=2, dv=2, j=2)
    args = [jnp.asarray(a) for a in args] + [jnp.asarray(c0)]

    def loss(method):
        @jax.jit
        def f(*a):
            y, last = plstm_1d(*a[:-1], initial_state=a[-1], method=method, chunk_size=3)
            return jnp.sum(jnp.sin(y)) + jnp.sum(last**2)
        return f

    grads = jax.jit(jax.grad(loss("chunked"), argnums=tuple(range(8))))(*args)
    grads_ref = jax.jit(jax.grad(loss("sequential"), argnums=tuple(range(8))))(*args)
    for g, r in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, r, **TOL)
    check_grads(loss("chunked"), args, order=1, modes=["rev"])


def test_1d_argument_errors():
    q, k, v, s, T, m, d, c0 = inputs_1d(6)
    with pytest.raises(ValueError, match="method"):
        plstm_1d(q, k, v, s, T, m, d, method="associative")
    with pytest.raises(ValueError, match="transition"):
        plstm_1d(q, k, v, s, T[..., :1], m, d)
    with pytest.raises(ValueError, match="initial_state"):
        plstm_1d(q, k, v, s, T, m, d, initial_state=c0[:, :, :1])
    with pytest.raises(ValueError, match="direct"):
        plstm_1d(q, k, v, s, T, m, d[..., None])
    with pytest.raises(ValueError, match="chunk_size"):
        plstm_1d(q, k, v, s, T, m, d, chunk_size=0)


# ----------------------------------------------------------------------------- 2-D
@pytest.mark.parametrize("method,tile", [("sequential", 8), ("tiled", 1), ("tiled", (2, 3)), ("tiled", (4, 4)),
                                         ("tiled", 8)])
def test_2d_equals_the_dag_recurrence(method, tile):
    *args, left, top = inputs_2d(0)
    y, (right, bottom) = plstm_2d(*args, initial_state=(left, top), method=method, tile_size=tile)
    y_ref, right_ref, bottom_ref = loop_2d(*args, left, top)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(right, right_ref, **TOL)
    np.testing.assert_allclose(bottom, bottom_ref, **TOL)


def test_2d_gating_is_a_sum_over_paths():
    q, k, v, s, T, m, d, _, _ = inputs_2d(1, b=1, H=3, W=4, h=1, j=1)
    y, _ = plstm_2d(q, k, v, s, T, m, d, tile_size=2)
    G = gating_2d_paths(s[0, :, :, 0, :, 0], T[0, :, :, 0, :, :, 0, 0], m[0, :, :, 0, :, 0], d[0, :, :, 0])
    qf, kf, vf = (a[0, :, :, 0].reshape(12, -1) for a in (q, k, v))
    np.testing.assert_allclose(y[0, :, :, 0].reshape(12, -1), (G * (qf @ kf.T)) @ vf, **TOL)


def test_2d_column_grid_is_the_1d_recurrence():
    """W = 1 with only the down edges live: the grid is the line graph."""
    *args, c0 = inputs_1d(7, t=9, j=2)
    q, k, v, s, T, m, d = args
    zero = np.zeros_like(s)
    s2 = np.stack([zero, s], -2)[:, :, None]  # source only into the down edge
    m2 = np.stack([zero, m], -2)[:, :, None]  # mark only from the up edge
    T2 = np.zeros(T.shape[:3] + (2, 2) + T.shape[-2:])
    T2[..., 1, 1, :, :] = T
    top = c0[:, None]
    y, (_, bottom) = plstm_2d(q[:, :, None], k[:, :, None], v[:, :, None], s2, T2[:, :, None], m2, d[:, :, None],
                              initial_state=(np.zeros((2, 9) + c0.shape[1:]), top), tile_size=4)
    y_ref, last_ref = loop_1d(*args, c0)
    np.testing.assert_allclose(y[:, :, 0], y_ref, **TOL)
    np.testing.assert_allclose(bottom[:, 0], last_ref, **TOL)


def test_2d_stitching_grids_with_boundary_states():
    *args, left, top = inputs_2d(2)
    y, (right, bottom) = plstm_2d(*args, initial_state=(left, top), tile_size=(2, 4))
    # left | right halves: the right edge states of the left half enter the right half
    y_l, (mid, bottom_l) = plstm_2d(*(a[:, :, :2] for a in args), initial_state=(left, top[:, :2]), tile_size=(2, 4))
    y_r, (right_r, bottom_r) = plstm_2d(*(a[:, :, 2:] for a in args), initial_state=(mid, top[:, 2:]), tile_size=(2, 4))
    np.testing.assert_allclose(np.concatenate([y_l, y_r], 2), y, **TOL)
    np.testing.assert_allclose(right_r, right, **TOL)
    np.testing.assert_allclose(np.concatenate([bottom_l, bottom_r], 1), bottom, **TOL)
    # top / bottom halves
    y_t, (right_t, seam) = plstm_2d(*(a[:, :3] for a in args), initial_state=(left[:, :3], top), method="sequential")
    y_b, (right_b, bottom_b) = plstm_2d(*(a[:, 3:] for a in args), initial_state=(left[:, 3:], seam), tile_size=3)
    np.testing.assert_allclose(np.concatenate([y_t, y_b], 1), y, **TOL)
    np.testing.assert_allclose(np.concatenate([right_t, right_b], 1), right, **TOL)
    np.testing.assert_allclose(bottom_b, bottom, **TOL)


def test_2d_gradients():
    args = [jnp.asarray(a) for a in inputs_2d(3, b=1, H=3, W=4, h=1, dk=2, dv=2, j=1)]

    def loss(method):
        @jax.jit
        def f(*a):
            y, (right, bottom) = plstm_2d(*a[:-2], initial_state=(a[-2], a[-1]), method=method, tile_size=2)
            return jnp.sum(jnp.sin(y)) + jnp.sum(right**2) + jnp.sum(bottom**2)
        return f

    grads = jax.jit(jax.grad(loss("tiled"), argnums=tuple(range(9))))(*args)
    grads_ref = jax.jit(jax.grad(loss("sequential"), argnums=tuple(range(9))))(*args)
    for g, r in zip(grads, grads_ref, strict=True):  # (sequential: autodiff of the oracle's lax.scan)
        np.testing.assert_allclose(g, r, **TOL)


def test_2d_float32_close_to_float64():
    args = inputs_2d(4, H=16, W=16, dk=8, dv=8, j=1)
    y_ref = loop_2d(*args)[0]
    *gates, left, top = (a.astype(np.float32) for a in args)
    y, _ = plstm_2d(*gates, initial_state=(left, top), tile_size=4)
    assert y.dtype == jnp.float32
    err = np.max(np.abs(np.asarray(y, np.float64) - y_ref)) / np.max(np.abs(y_ref))
    assert err < 1e-5, err


def test_2d_argument_errors():
    q, k, v, s, T, m, d, left, top = inputs_2d(5)
    with pytest.raises(ValueError, match="method"):
        plstm_2d(q, k, v, s, T, m, d, method="chunked")
    with pytest.raises(ValueError, match="tile_size"):
        plstm_2d(q, k, v, s, T, m, d, tile_size=(2, 0))
    with pytest.raises(ValueError, match="transition"):
        plstm_2d(q, k, v, s, T[..., 0, :, :], m, d)
    with pytest.raises(ValueError, match=r"initial_state\[1\]"):
        plstm_2d(q, k, v, s, T, m, d, initial_state=(left, top[:, :2]))
    with pytest.raises(ValueError, match="mark"):
        plstm_2d(q, k, v, s, T, m[..., :1, :], d)
