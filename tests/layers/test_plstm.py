"""plstm (1-D) and plstm2d: the layer contract, float64 oracles of the layers on their own
parameters (gates from the module docstring, the DAG recurrence of tests/scan/test_plstm),
the P-mode / D-mode stability properties, the 2-D layer's row-block state and parameter
counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.plstm  # noqa: F401  (registers "plstm", "plstm2d")
from ssmjax.layers.plstm import column_normalise, d_mode_grid, p_mode_block, p_mode_grid, square_grid
from ssmjax.scan.plstm import plstm_2d
from tests.layers.contract import check_contract
from tests.layers.reference import dense, layer_in_f64, param_count, rms_norm, sigmoid, silu
from tests.scan.test_plstm import loop_1d, loop_2d

D, H = 16, 2
TOL = dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- oracles
def gate(x, p, name):
    return sigmoid(dense(x, p[name]["kernel"], p[name]["bias"]))


def normalised_block(x, p, decay, j):
    """P-mode ``decay * R / max(1, column L1 norms)``, ``R = I + W_R x`` (``decay`` alone if J = 1)."""
    if j == 1:
        return decay[..., None, None]
    raw = dense(x, p["raw_proj"]["kernel"], p["raw_proj"]["bias"])
    return decay[..., None, None] * raw / np.maximum(1.0, np.abs(raw).sum(-2, keepdims=True))


def qkv(x, p):
    q, k, v = (dense(x, p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj"))
    return q * q.shape[-1] ** -0.5, k, v


def finish(o, x, p, eps=1e-6):
    weight = p["norm_weight"].reshape(o.shape[-2:])
    return dense(rms_norm(o, weight, eps) * silu(dense(x, p["g_proj"]["kernel"])), p["out_proj"]["kernel"], axes=2)


def plstm_oracle(p, x, mode, j):
    q, k, v = qkv(x, p)
    s, m, d = gate(x, p, "source_proj"), gate(x, p, "mark_proj"), gate(x, p, "direct_proj")
    if mode == "P":
        T = normalised_block(x, p, gate(x, p, "decay_proj"), j)
    else:
        T = gate(x, p, "decay_proj")[..., :, None] * np.eye(j)
    b, t, h, dh = q.shape
    o, _ = loop_1d(q, k, v, s, np.broadcast_to(T, (b, t, h, j, j)), m, d, np.zeros((b, h, j, dh, dh)))
    return finish(o, x, p)


def plstm2d_oracle(p, x, grid, mode, j, orientations):
    b, t, d_model = x.shape
    x = x.reshape(b, *grid, d_model)
    q, k, v = qkv(x, p)
    h, dh = q.shape[-2:]
    d = gate(x, p, "direct_proj")  # [b, H, W, n, h]
    if mode == "P":
        o_ = gate(x, p, "orientation_proj")
        split = np.stack([o_, 1 - o_], -1)  # out edges (right, down)
        block = normalised_block(x, p, gate(x, p, "decay_proj"), j)
        T = split[..., :, None, None, None] * np.broadcast_to(block, o_.shape + (j, j))[..., None, None, :, :]
        T = np.broadcast_to(T, o_.shape + (2, 2, j, j))
        S = split[..., None] * gate(x, p, "source_proj")[..., None, :]
        M = np.stack([gate(x, p, "mark_proj")] * 2, -2)
    else:
        a = gate(x, p, "decay_proj")  # [..., 3, J]: (right<-left, down<-up, down<-left)
        T = np.zeros(a.shape[:-2] + (2, 2, j, j))
        eye = np.eye(j)
        T[..., 0, 0, :, :] = a[..., 0, :, None] * eye
        T[..., 1, 1, :, :] = a[..., 1, :, None] * eye
        T[..., 1, 0, :, :] = a[..., 2, :, None] * eye
        S, M = gate(x, p, "source_proj"), gate(x, p, "mark_proj")
    zeros_l, zeros_t = np.zeros((b, grid[0], h, j, dh, dh)), np.zeros((b, grid[1], h, j, dh, dh))
    total = 0.0
    for i in range(orientations):
        axes = tuple(a for a, bit in ((1, 1), (2, 2)) if i & bit)

        def flip(arr, axes=axes):
            return np.flip(arr, axes) if axes else arr

        o, _, _ = loop_2d(flip(q), flip(k), flip(v), flip(S[:, :, :, i]), flip(T[:, :, :, i]), flip(M[:, :, :, i]),
                          flip(d[:, :, :, i]), zeros_l, zeros_t)
        total = total + flip(o)
    return finish(total / orientations, x, p).reshape(b, t, d_model)


# ----------------------------------------------------------------------------- 1-D
@pytest.mark.parametrize("fields", [{}, {"mode": "D", "transition_dim": 2}])
def test_contract(fields):
    check_contract("plstm", num_heads=H, chunk_size=4, **fields)


@pytest.mark.parametrize("mode,j", [("P", 1), ("P", 3), ("D", 2)])
def test_layer_equals_oracle(mode, j):
    _, params, x, y = layer_in_f64("plstm", D, num_heads=H, mode=mode, transition_dim=j, chunk_size=5)
    np.testing.assert_allclose(y, plstm_oracle(params["params"], x, mode, j), **TOL)


# ----------------------------------------------------------------------------- 2-D
@pytest.mark.parametrize("mode,j,bidirectional", [("P", 2, False), ("D", 2, False), ("P", 1, True)])
def test_2d_layer_equals_oracle(mode, j, bidirectional):
    fields = dict(num_heads=H, mode=mode, transition_dim=j, bidirectional=bidirectional, tile_size=2)
    _, params, x, y = layer_in_f64("plstm2d", D, **fields)  # t = 12 -> the 3 x 4 grid
    assert square_grid(12) == (3, 4)
    expected = plstm2d_oracle(params["params"], x, (3, 4), mode, j, 4 if bidirectional else 1)
    np.testing.assert_allclose(y, expected, **TOL)


def test_2d_row_blocks_continue_with_the_state():
    layer = ssmjax.layers.get("plstm2d", d_model=D, num_heads=H, grid_shape=(5, 3), tile_size=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 15, D))
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    call = jax.jit(lambda p, x, s: layer.apply(p, x, state=s, return_state=True))
    y, state = call(params, x, None)
    y1, mid = call(params, x[:, :6], None)  # rows 0-1
    y2, last = call(params, x[:, 6:], mid)  # rows 2-4
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(last, state, rtol=2e-5, atol=2e-5)
    # the errors are raised while tracing: shapes only (eval_shape), nothing is run
    with pytest.raises(ValueError, match="grid rows"):
        jax.eval_shape(layer.apply, params, x[:, :7])
    with pytest.raises(ValueError, match="step"):
        jax.eval_shape(lambda p, x, s: layer.apply(p, x, s, method="step"), params, x[:, 0], state)
    bidirectional = ssmjax.layers.get("plstm2d", d_model=D, bidirectional=True)
    with pytest.raises(ValueError, match="state"):
        jax.eval_shape(lambda key, x: bidirectional.init(key, x, return_state=True), jax.random.PRNGKey(1), x)


@pytest.mark.slow
def test_2d_gradients_are_finite():
    layer = ssmjax.layers.get("plstm2d", d_model=D, num_heads=H, mode="D", transition_dim=2, tile_size=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 15, D))
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------------------- stability modes
def grid_gating(source, transition, mark, grid):
    """G [H*W, H*W] of one head: q = k = 1 (dk = 1), v = one-hot of the node, direct = 0."""
    h_, w_ = grid
    n = h_ * w_
    ones = jnp.ones((1, h_, w_, 1, 1))
    v = jnp.eye(n).reshape(1, h_, w_, 1, n)
    y, _ = jax.jit(plstm_2d, static_argnames="tile_size")(ones, ones, v, source, transition, mark,
                                                          jnp.zeros((1, h_, w_, 1)), tile_size=4)
    return np.asarray(y).reshape(n, n)


def test_p_mode_keeps_path_sums_bounded_where_plain_transitions_explode():
    grid, j = (8, 8), 1
    key = jax.random.PRNGKey(0)
    orientation = jax.random.uniform(key, (1, *grid, 1))
    ones = jnp.ones((1, *grid, 1, j))
    block = p_mode_block(jnp.ones((1, *grid, 1)), None, j)  # the largest decay: 1
    source, transition, mark = p_mode_grid(orientation, block, ones, ones)
    G = grid_gating(source, transition, mark, grid)
    assert np.max(np.abs(G)) <= 1.0 + 1e-12
    # unit transitions on every edge pair: G counts the monotone paths (binomial coefficients)
    plain = jnp.ones((1, *grid, 1, 2, 2, j, j))
    G_plain = grid_gating(jnp.ones((1, *grid, 1, 2, j)), plain, jnp.ones((1, *grid, 1, 2, j)), grid)
    assert np.max(G_plain) > 1e3  # C(14, 7) = 3432


def test_d_mode_is_a_multitree_with_bounded_transitions():
    grid = (5, 6)
    ones = jnp.ones((1, *grid, 1, 2, 1))
    source, transition, mark = d_mode_grid(jnp.ones((1, *grid, 1, 3, 1)), ones, ones)
    G = grid_gating(source, transition, mark, grid)
    # with every remaining transition at its bound 1, G counts paths: exactly one between
    # every (earlier, later) pair in the quadrant, none elsewhere
    rows, cols = np.divmod(np.arange(30), 6)
    reachable = (rows[:, None] >= rows[None, :]) & (cols[:, None] >= cols[None, :]) & ~np.eye(30, dtype=bool)
    np.testing.assert_array_equal(G, reachable.astype(float))
    assert float(transition[..., 0, 1, :, :].max()) == 0.0  # no up -> right turn


def test_p_mode_block_columns_have_l1_norm_at_most_one():
    raw = jax.random.normal(jax.random.PRNGKey(0), (50, 3, 3)) * 3
    decay = jax.random.uniform(jax.random.PRNGKey(1), (50,))
    block = p_mode_block(decay, raw, 3)
    assert float(jnp.abs(column_normalise(raw)).sum(-2).max()) <= 1.0 + 1e-12
    orientation = jax.random.uniform(jax.random.PRNGKey(2), (50,))
    _, transition, _ = p_mode_grid(orientation, block, jnp.ones((50, 3)), jnp.ones((50, 3)))
    # for every incoming edge and component: sum over outgoing edges and components <= decay
    outflow = jnp.abs(transition).sum(axis=(-4, -2))  # [50, in_edge, j]
    assert bool(jnp.all(outflow <= decay[:, None, None] + 1e-12))


# ----------------------------------------------------------------------------- counts
def count(name, **fields):
    layer = ssmjax.layers.get(name, d_model=D, **fields)
    return param_count(jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 12, D))))


@pytest.mark.parametrize("mode,j", [("P", 1), ("P", 2), ("D", 3)])
def test_parameter_counts(mode, j):
    h = 4
    r = 1 if (mode == "P" and j > 1) else 0
    j_a = 1 if mode == "P" else j
    gates = h * (2 * j + 1) + h * j_a + r * h * j * j
    assert count("plstm", mode=mode, transition_dim=j) == 5 * D**2 + (D + 1) * gates + D
    for n, bidirectional in [(1, False), (4, True)]:
        g = h * (2 * j + 3 + r * j * j) if mode == "P" else h * (7 * j + 1)
        expected = 5 * D**2 + n * (D + 1) * g + D
        assert count("plstm2d", mode=mode, transition_dim=j, bidirectional=bidirectional) == expected


def test_mode_errors():
    x = jnp.ones((1, 4, D))
    with pytest.raises(ValueError, match="mode"):
        ssmjax.layers.get("plstm", d_model=D, mode="X").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="num_heads"):
        ssmjax.layers.get("plstm", d_model=D, num_heads=3).init(jax.random.PRNGKey(0), x)
