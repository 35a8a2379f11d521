"""RAT layer: contract (any split, mid-chunk included), parameter count, gate initialisation,
and a float64 per-token loop of the paper's equations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.rat  # noqa: F401  (registers "rat")
from tests.layers.contract import check_contract


@pytest.mark.parametrize("fields", [
    dict(chunk_size=4, max_len=32),  # split = 5 falls mid-chunk: the state carries the partial chunk
    pytest.param(dict(chunk_size=3, qk_groups=4, rope_base=None, max_len=16), marks=pytest.mark.slow),
])
def test_contract(fields):
    check_contract("rat", **fields)


def param_count(d, heads=4, groups=2):
    head = d // heads
    return 4 * d * d + 2 * groups * head * d + d


@pytest.mark.parametrize("d,heads,groups", [(16, 4, 2), (24, 2, 1)])
def test_builds_and_param_count(d, heads, groups):
    layer = ssmjax.layers.get("rat", d_model=d, num_heads=heads, qk_groups=groups)
    x = jnp.ones((1, 5, d), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
    assert jax.jit(layer.apply)(params, x).shape == x.shape
    assert sum(a.size for a in jax.tree.leaves(params)) == param_count(d, heads, groups)


def test_default_build_and_gate_init():
    layer = ssmjax.layers.get("rat", d_model=32)
    params = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 32)))
    gate = jax.nn.sigmoid(params["params"]["gate_bias"])  # sigmoid(log u) = u / (1 + u), u ~ U(1, L-1)
    L = layer.chunk_size
    assert float(gate.min()) >= 0.5 and float(gate.max()) <= (L - 1) / L
    state = layer.apply(params, 2, method="init_state")
    assert state["k"].shape == (2, math.ceil(layer.max_len / L), 4, 8)  # summaries only


def rope(z, pos, base):
    half = z.shape[-1] // 2
    ang = pos * base ** (-np.arange(half) / half)
    z1, z2 = z[..., :half], z[..., half:]
    return np.concatenate([z1 * np.cos(ang) - z2 * np.sin(ang), z1 * np.sin(ang) + z2 * np.cos(ang)], -1)


def reference(params, x, heads, groups, L, base):
    """Token loop: gated running (k, v) reset at chunk starts, softmax over the summaries
    of the earlier chunks plus the running state, output gate, out projection."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(x, np.float64)
    b, t, d = x.shape
    hd = d // heads
    proj = x @ p["in_proj"]["kernel"]
    z = 1 / (1 + np.exp(-proj[..., :d]))
    vals = proj[..., d : 2 * d]
    g = 1 / (1 + np.exp(-(proj[..., 2 * d : 3 * d] + p["gate_bias"])))
    q = proj[..., 3 * d : 3 * d + groups * hd].reshape(b, t, groups, hd)
    k = proj[..., 3 * d + groups * hd :].reshape(b, t, groups, hd)
    rot = (lambda u, c: u) if base is None else (lambda u, c: rope(u, c, base))
    out = np.zeros((b, t, d))
    for bi in range(b):
        kt, vt = np.zeros((heads, hd)), np.zeros((heads, hd))
        summaries = []
        for ti in range(t):
            c = ti // L
            if ti % L == 0:
                kt, vt = np.zeros((heads, hd)), np.zeros((heads, hd))
            gh = g[bi, ti].reshape(heads, hd)
            k_heads = np.stack([k[bi, ti, h % groups] for h in range(heads)])
            kt = gh * kt + (1 - gh) * k_heads
            vt = gh * vt + (1 - gh) * vals[bi, ti].reshape(heads, hd)
            for h in range(heads):
                qh = rot(q[bi, ti, h % groups], c)
                keys = [rot(K[h], j) for j, (K, _) in enumerate(summaries)] + [rot(kt[h], c)]
                vs = [V[h] for _, V in summaries] + [vt[h]]
                s = np.array([qh @ kk for kk in keys]) / np.sqrt(hd)
                w = np.exp(s - s.max())
                w /= w.sum()
                out[bi, ti, h * hd : (h + 1) * hd] = w @ np.stack(vs)
            if ti % L == L - 1:
                summaries.append((kt.copy(), vt.copy()))
    return (z * out) @ p["out_proj"]["kernel"]


@pytest.mark.parametrize("L,groups,base", [(4, 2, 10000.0), (3, 4, None)])
def test_matches_reference(L, groups, base):
    """float64 layer == the loop, through the parallel call and through the cached state."""
    layer = ssmjax.layers.get("rat", d_model=16, chunk_size=L, qk_groups=groups, rope_base=base,
                              max_len=24, dtype=jnp.float64, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 14, 16), jnp.float64)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)  # jitted: one compile, not one per op
    apply = jax.jit(layer.apply, static_argnames="return_state")
    params = jax.tree.map(lambda a: a * 3.0, params)  # sharper attention than at init
    want = reference(params, x, 4, groups, L, base)
    # The shared rotary_embedding (ssmjax.layers.attention) evaluates cos/sin in float32
    # whatever the input dtype, so with RoPE the float64 layer carries float32 angle errors.
    tol = 1e-10 if base is None else 1e-5
    np.testing.assert_allclose(apply(params, x), want, rtol=tol, atol=tol)
    y1, state = apply(params, x[:, :6], return_state=True)
    y2, _ = apply(params, x[:, 6:], state=state, return_state=True)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), want, rtol=tol, atol=tol)


def test_bad_fields():
    x = jnp.ones((1, 3, 16))
    with pytest.raises(ValueError, match="qk_groups"):
        ssmjax.layers.get("rat", d_model=16, qk_groups=3).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="num_heads"):
        ssmjax.layers.get("rat", d_model=10).init(jax.random.PRNGKey(0), jnp.ones((1, 3, 10)))
