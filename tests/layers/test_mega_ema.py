"""Mega's damped EMA layer: contract, parameter count, initialisation, and a float64
per-token loop of the paper's recurrence compared with the layer on its own parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.mega_ema  # noqa: F401  (registers "mega_ema")

D = 16


def count(**fields):
    layer = ssmjax.layers.get("mega_ema", d_model=D, **fields)
    shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 3, D)))
    return sum(a.size for a in jax.tree.leaves(shapes))


def rand(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


# The default-config contract (float32 and float64) is tests/layers/test_contract.py.


@pytest.mark.parametrize("bidirectional", [False, True])
def test_parameter_count(bidirectional):
    dirs = 2 if bidirectional else 1
    assert count(ndim=4, bidirectional=bidirectional) == dirs * 4 * D * 4 + D
    assert count() == 4 * D * 16 + D  # builds from d_model alone


def test_initialisation():
    layer = ssmjax.layers.get("mega_ema", d_model=D, ndim=6)
    p = jax.jit(layer.init)(jax.random.PRNGKey(3), jnp.ones((1, 2, D)))["params"]["forward"]
    signs = np.sign(np.asarray(p["beta"]))
    np.testing.assert_array_equal(signs, np.broadcast_to([1, -1, 1, -1, 1, -1], (D, 6)))
    assert abs(float(jnp.std(p["alpha"])) - 0.2) < 0.05 and abs(float(jnp.std(p["eta"])) - 1.0) < 0.25


def ema_reference(p, x, bidirectional, segment_ids=None):
    """s_t = alpha beta x_t + (1 - alpha delta) s_{t-1} per channel, eta . s / sqrt(h),
    silu(ema + omega x); the backward direction runs the same loop on reversed time."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    ids = np.zeros(x.shape[:2], int) if segment_ids is None else np.asarray(segment_ids)

    def direction(q, xs, ids):
        alpha, delta = 1 / (1 + np.exp(-q["alpha"])), 1 / (1 + np.exp(-q["delta"]))
        s = np.zeros(xs.shape[:1] + alpha.shape)
        out = []
        for t in range(xs.shape[1]):
            new_doc = (ids[:, t] != ids[:, t - 1]) if t else np.zeros(xs.shape[0], bool)
            s = np.where(new_doc[:, None, None], 0.0, s)
            s = alpha * q["beta"] * xs[:, t, :, None] + (1 - alpha * delta) * s
            out.append(np.einsum("bdh,dh->bd", s, q["eta"]) / np.sqrt(alpha.shape[1]))
        return np.stack(out, 1), s

    ema, s = direction(p["forward"], x, ids)
    if bidirectional:
        ema = ema + direction(p["backward"], x[:, ::-1], ids[:, ::-1])[0][:, ::-1]
    z = ema + p["omega"] * x
    return z / (1 + np.exp(-z)), s


@pytest.mark.parametrize("method", ["fft", "scan"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_matches_loop(bidirectional, method):
    x = rand((2, 13, D))
    layer = ssmjax.layers.get("mega_ema", d_model=D, ndim=3, bidirectional=bidirectional, method=method)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    y_ref, s_ref = ema_reference(params["params"], x, bidirectional)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), y_ref, rtol=1e-10, atol=1e-10)
    segment_ids = jnp.array([[0] * 5 + [1] * 8, [2] * 13])
    y_seg, _ = ema_reference(params["params"], x, bidirectional, segment_ids)
    y_packed = jax.jit(lambda p, x, ids: layer.apply(p, x, segment_ids=ids))(params, x, segment_ids)
    np.testing.assert_allclose(y_packed, y_seg, rtol=1e-10, atol=1e-10)
    if bidirectional:
        with pytest.raises(ValueError, match="bidirectional"):
            layer.apply(params, x, return_state=True)
        return
    call = jax.jit(lambda p, x, s: layer.apply(p, x, state=s, return_state=True))
    _, state = call(params, x, None)
    np.testing.assert_allclose(state["s"], s_ref, rtol=1e-10, atol=1e-10)
    # continuing a carried state (the fft form's closed-form state terms)
    y1, mid = call(params, x[:, :6], None)
    y2, last = call(params, x[:, 6:], mid)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(last["s"], s_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["fft", "scan"])
def test_float32_error_vs_float64_loop(method):
    """float32 layer vs the float64 loop: one EMA over 64 tokens, |decay| < 1, so the
    error stays at a few float32 roundings of O(1) activations (measured 1.4e-7 scan,
    1.7e-7 fft)."""
    x = rand((2, 64, D))
    layer = ssmjax.layers.get("mega_ema", d_model=D, method=method)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x[:, :2])
    y32 = jax.jit(layer.apply)(params, x.astype(jnp.float32))
    y_ref, _ = ema_reference(params["params"], x, False)
    err = np.max(np.abs(np.asarray(y32, np.float64) - y_ref)) / np.max(np.abs(y_ref))
    assert y32.dtype == jnp.float32 and err < 1e-5, err
