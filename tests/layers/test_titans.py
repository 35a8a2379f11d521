"""Titans / ATLAS memory layer: contract (any split, the partial chunk is in the state),
parameter counts, and a float64 re-implementation (numpy projections + the token loop of
tests/scan/test_memory.py for the memory), Titans and ATLAS's Omega rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.titans  # noqa: F401  (registers "titans")
from tests.layers.contract import check_contract
from tests.scan.test_memory import reference_memory


@pytest.mark.parametrize("fields", [
    dict(chunk_size=4),  # split = 5 falls mid-chunk
    pytest.param(dict(chunk_size=3, omega_window=3, memory_depth=1), marks=pytest.mark.slow),
])
def test_contract(fields):
    check_contract("titans", **fields)


def param_count(d, heads=4, depth=2, expansion=2, conv=4):
    head = d // heads
    widths = [head] + [expansion * head] * (depth - 1) + [head]
    memory = heads * sum(a * b for a, b in zip(widths, widths[1:]))
    return 5 * d * d + 3 * conv * d + 3 * (d * heads + heads) + d + memory


@pytest.mark.parametrize("fields", [dict(), dict(memory_depth=1, num_heads=2), dict(memory_depth=3, conv_size=2)])
def test_builds_and_param_count(fields):
    layer = ssmjax.layers.get("titans", d_model=16, **fields)
    x = jnp.ones((1, 5, 16), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
    assert jax.jit(layer.apply)(params, x).shape == x.shape
    assert sum(a.size for a in jax.tree.leaves(params)) == param_count(16, **{
        {"num_heads": "heads", "memory_depth": "depth", "conv_size": "conv"}[k]: v for k, v in fields.items()})


def test_default_formula_at_128():
    assert param_count(128) == 5 * 128**2 + 3 * 4 * 128 + 3 * (128 * 4 + 4) + 128 + 2 * 2 * 128 * 32


def silu(x):
    return x / (1 + np.exp(-x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference(params, x, heads, chunk, window, max_lr=0.1):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(x, np.float64)
    b, t, d = x.shape

    def conv(u, w):  # depthwise causal: y_t = sum_j w[j] u_{t - K + 1 + j}
        k, out = w.shape[0], np.zeros_like(u)
        for ti in range(t):
            for j in range(k):
                if ti - k + 1 + j >= 0:
                    out[:, ti] += w[j] * u[:, ti - k + 1 + j]
        return out

    def l2n(u):
        return u / np.sqrt((u * u).sum(-1, keepdims=True) + 1e-6)

    split = lambda u: u.reshape(b, t, heads, d // heads)  # noqa: E731
    q = split(l2n(silu(conv(x @ p["q_proj"]["kernel"], p["conv_q"]))))
    k = split(l2n(silu(conv(x @ p["k_proj"]["kernel"], p["conv_k"]))))
    v = split(silu(conv(x @ p["v_proj"]["kernel"], p["conv_v"])))
    gate = lambda name: sigmoid(x @ p[name]["kernel"] + p[name]["bias"])  # noqa: E731
    memory0 = tuple(p[f"memory_{i}"] for i in range(sum(n.startswith("memory_") for n in p)))
    y, _ = reference_memory(memory0, q, k, v, max_lr * gate("lr_proj"), gate("momentum_proj"),
                            gate("decay_proj"), chunk, window)
    y = np.asarray(y).reshape(b, t, d)
    y = y / np.sqrt((y * y).mean(-1, keepdims=True) + 1e-6) * p["norm"]["scale"]
    return (y * silu(x @ p["gate_proj"]["kernel"])) @ p["out_proj"]["kernel"]


@pytest.mark.parametrize("chunk,window", [(4, 1), (3, 3)])
def test_matches_reference(chunk, window):
    """float64 layer == re-implementation, in one call and split mid-chunk with the state;
    ``window = 3`` is ATLAS's Omega rule."""
    layer = ssmjax.layers.get("titans", d_model=8, num_heads=2, chunk_size=chunk, omega_window=window,
                              dtype=jnp.float64, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 8), jnp.float64)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)  # jitted: one compile, not one per op
    apply = jax.jit(layer.apply, static_argnames="return_state")
    want = reference(params, x, 2, chunk, window)
    np.testing.assert_allclose(apply(params, x), want, rtol=1e-10, atol=1e-10)
    y1, state = apply(params, x[:, :5], return_state=True)
    y2, _ = apply(params, x[:, 5:], state=state, return_state=True)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), want, rtol=1e-10, atol=1e-10)
