"""TCNCA / MEGA-chunk layer: contract (any split), parameter counts, the dilated convolution,
and a float64 per-token loop of the block's equations for both temporal mixers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.tcnca  # noqa: F401  (registers "tcnca")
from ssmjax.layers.common import dilated_causal_conv
from tests.layers.contract import check_contract


@pytest.mark.parametrize("fields", [
    dict(chunk_size=4),  # split = 5 falls mid-chunk: the state carries the partial chunk's keys/values
    pytest.param(dict(chunk_size=3, temporal="ema"), marks=pytest.mark.slow),
])
def test_contract(fields):
    check_contract("tcnca", **fields)


def param_count(d, temporal="tcn", z=None, expansion=2, depth=4, kernel=3, ema_dim=16):
    z = z or d // 4
    v = expansion * d
    core = 2 * d * v + v + (d + 1) * (z + v + 2 * d) + 4 * z + d
    return core + (depth * (kernel + 1) * d if temporal == "tcn" else 4 * d * ema_dim + d)


@pytest.mark.parametrize("fields", [dict(), dict(temporal="ema"), dict(qk_dim=6, expansion=1, tcn_depth=2,
                                                                       tcn_kernel_size=2, ema_dim=4)])
def test_builds_and_param_count(fields):
    layer = ssmjax.layers.get("tcnca", d_model=16, **fields)
    x = jnp.ones((1, 5, 16), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
    assert jax.jit(layer.apply)(params, x).shape == x.shape
    count = param_count(16, fields.get("temporal", "tcn"), fields.get("qk_dim"), fields.get("expansion", 2),
                        fields.get("tcn_depth", 4), fields.get("tcn_kernel_size", 3), fields.get("ema_dim", 16))
    assert sum(a.size for a in jax.tree.leaves(params)) == count


def dilated_reference(u, w, f):
    u, w = np.asarray(u), np.asarray(w)
    k, out = w.shape[0], np.zeros_like(u)
    for t in range(u.shape[1]):
        for j in range(k):
            s = t - (k - 1 - j) * f
            if s >= 0:
                out[:, t] += w[j] * u[:, s]
    return out


@pytest.mark.parametrize("k,f,split", [(3, 1, 4), (3, 4, 6), (2, 8, 3), (4, 3, 10)])
def test_dilated_conv(k, f, split):
    rng = np.random.default_rng(0)
    u, w = rng.normal(size=(2, 13, 3)), rng.normal(size=(k, 3))
    want = dilated_reference(u, w, f)
    u, w, history = jnp.asarray(u), jnp.asarray(w), jnp.zeros((2, (k - 1) * f, 3))
    y, _ = dilated_causal_conv(u, w, f, history)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    y1, h = dilated_causal_conv(u[:, :split], w, f, history)
    y2, _ = dilated_causal_conv(u[:, split:], w, f, h)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), want, rtol=1e-12, atol=1e-12)


def silu(x):
    return x / (1 + np.exp(-x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference(params, x, temporal, chunk, base=2, depth=4):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(x, np.float64)
    b, t, d = x.shape
    if temporal == "tcn":
        u = x
        for i in range(depth):
            u = u + silu(dilated_reference(u, p[f"tcn_{i}"], base**i) + p[f"tcn_bias_{i}"])
        mixed = u
    else:
        alpha, delta = sigmoid(p["ema_alpha"]), sigmoid(p["ema_delta"])
        n = alpha.shape[1]
        h, ema = np.zeros((b, d, n)), np.zeros_like(x)
        for ti in range(t):
            h = (1 - alpha * delta) * h + alpha * p["ema_beta"] * x[:, ti, :, None]
            ema[:, ti] = (p["ema_eta"] * h).sum(-1) / np.sqrt(n)
        mixed = silu(ema + p["ema_omega"] * x)
    dense = lambda name, a: a @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731
    v = silu(dense("v_proj", x))
    z_dim, e = p["qk_scale"].shape[1], v.shape[-1]
    base_ = dense("mx_proj", mixed)
    phi, z = sigmoid(base_[..., :d]), silu(base_[..., d : d + z_dim])
    r, hx = silu(base_[..., d + z_dim : d + z_dim + e]), base_[..., d + z_dim + e :]
    q = z * p["qk_scale"][0] + p["qk_offset"][0]
    k = z * p["qk_scale"][1] + p["qk_offset"][1]
    o = np.zeros_like(v)
    for ti in range(t):
        lo = (ti // chunk) * chunk
        s = np.einsum("bz,bsz->bs", q[:, ti], k[:, lo : ti + 1]) / np.sqrt(z_dim)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o[:, ti] = np.einsum("bs,bse->be", w, v[:, lo : ti + 1])
    h = silu(hx + dense("h_proj", r * o))
    return phi * h + (1 - phi) * x


@pytest.mark.parametrize("temporal,chunk", [("tcn", 4), ("ema", 3)])
def test_matches_reference(temporal, chunk):
    """float64 layer == the loop, in one call and split mid-chunk with the carried state."""
    layer = ssmjax.layers.get("tcnca", d_model=8, temporal=temporal, chunk_size=chunk, ema_dim=4,
                              dtype=jnp.float64, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 14, 8), jnp.float64)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)  # jitted: one compile, not one per op
    apply = jax.jit(layer.apply, static_argnames="return_state")
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape, a.dtype), params)
    want = reference(params, x, temporal, chunk)
    np.testing.assert_allclose(apply(params, x), want, rtol=1e-10, atol=1e-10)
    y1, state = apply(params, x[:, :6], return_state=True)
    y2, _ = apply(params, x[:, 6:], state=state, return_state=True)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), want, rtol=1e-10, atol=1e-10)


def test_bad_temporal():
    with pytest.raises(ValueError, match="temporal"):
        ssmjax.layers.get("tcnca", d_model=8, temporal="fft").init(jax.random.PRNGKey(0), jnp.ones((1, 3, 8)))
