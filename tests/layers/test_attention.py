"""Softmax attention layer: contract, RoPE, window, against a plain float64 loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.attention  # noqa: F401  (registers "attention")
from tests.layers.contract import check_contract


def test_contract_sliding_window():  # window=None: test_contract.py
    check_contract("attention", window=4, max_len=32)


def reference(params, x, num_heads, window=None, base=10000.0, bidirectional=False):
    """Per-query loop: softmax over the visible keys of RoPE-rotated projections (every key
    when ``bidirectional``)."""
    p = {k: np.asarray(v["kernel"], np.float64) for k, v in params["params"].items()}
    x = np.asarray(x, np.float64)
    b, t, d = x.shape
    hd = d // num_heads
    half = hd // 2
    freqs = base ** (-np.arange(half) / half)

    def rope(z, pos):
        ang = pos * freqs
        z1, z2 = z[..., :half], z[..., half:]
        return np.concatenate([z1 * np.cos(ang) - z2 * np.sin(ang), z1 * np.sin(ang) + z2 * np.cos(ang)], -1)

    q = np.einsum("btd,dhe->bthe", x, p["q_proj"])
    k = np.einsum("btd,dhe->bthe", x, p["k_proj"])
    v = np.einsum("btd,dhe->bthe", x, p["v_proj"])
    out = np.zeros((b, t, num_heads, hd))
    for i in range(t):
        lo = 0 if window is None else max(0, i - window + 1)
        hi = t if bidirectional else i + 1
        qi = rope(q[:, i], i)
        ks = np.stack([rope(k[:, j], j) for j in range(lo, hi)], 1)
        s = np.einsum("bhe,bjhe->bhj", qi, ks) / np.sqrt(hd)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[:, i] = np.einsum("bhj,bjhe->bhe", w, v[:, lo:hi])
    return np.einsum("bthe,hed->btd", out, p["out_proj"])


@pytest.mark.parametrize("window", [None, 3])
def test_matches_reference(window):
    layer = ssmjax.layers.get("attention", d_model=16, window=window)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), reference(params, x, 4, window), rtol=2e-5, atol=2e-5)
    assert sum(a.size for a in jax.tree.leaves(params)) == 4 * 16 * 16


@pytest.mark.parametrize("window", [None, 3])
def test_cached_decode_matches_reference_in_float64(window):
    """Token by token through the KV cache (the ``step`` path) equals the float64 loop to
    1e-12: the cache's softmax runs in the input's precision (float32 would miss by ~1e-8)."""
    layer = ssmjax.layers.get("attention", d_model=16, window=window, max_len=12)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16), jnp.float64)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    state, outs = layer.init_state(2, jnp.float64), []
    for t in range(x.shape[1]):
        y, state = layer.apply(params, x[:, t:t + 1], state=state, return_state=True)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), reference(params, x, 4, window), rtol=1e-12, atol=1e-12)


def test_bidirectional_attends_to_every_position_and_has_no_state():
    layer = ssmjax.layers.get("attention", d_model=16, bidirectional=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 16), jnp.float64)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    np.testing.assert_allclose(layer.apply(params, x), reference(params, x, 4, bidirectional=True), rtol=1e-12,
                               atol=1e-12)
    with pytest.raises(ValueError, match="no recurrent state"):
        layer.apply(params, x, return_state=True)
    with pytest.raises(ValueError, match="window"):
        ssmjax.layers.get("attention", d_model=16, bidirectional=True, window=3).apply(params, x)


def test_bad_heads():
    layer = ssmjax.layers.get("attention", d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        layer.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 10)))
