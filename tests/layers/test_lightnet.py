"""LightNet: contract, parameter counts, the additive recurrence written as in the paper
(unnormalised sums ``M_t``, ``Z_t``) in float64 on the layer's own parameters, scan-order
invariance of its state (the "single scan" property), MD-LRPE's relative-position
property and MD-TPE on a 2-D grid, and the bidirectional grid layer against a direct float64
formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.lightnet  # noqa: F401  (registers "lightnet")
import ssmjax.layers.linear_attention  # noqa: F401  (registers "gla", the multiplicative contrast)
from ssmjax.layers.lightnet import grid_coordinates, md_lrpe
from tests.layers.contract import check_contract
from tests.layers.reference import dense, heads, layer_in_f64, param_count, rms_norm, rope, sigmoid, silu

D, H = 16, 2
GRID = (3, 4)


# ----------------------------------------------------------------------------- oracles
def toeplitz_encoding(p, x, axis, bidirectional, nh=H):
    """MD-TPE term of grid axis ``a``: ``W_a GroupRMSNorm(sum_j lambda^|i-j| x_j)`` along
    ``axis`` of ``x [b, n_1, .., n_D, d]`` (``j <= i`` when causal), as explicit Toeplitz
    matrices."""
    tpe = p["md_tpe"]
    lam = np.repeat(sigmoid(np.asarray(tpe["decay_logit"][axis])), x.shape[-1] // nh)  # [d]
    n = x.shape[axis + 1]
    gap = np.arange(n)[:, None] - np.arange(n)[None, :]
    T = lam ** np.abs(gap)[..., None] * ((gap >= 0) | bidirectional)[..., None]  # [n, n, d]
    u = np.moveaxis(x, axis + 1, 1)
    y = np.moveaxis(np.einsum("ijc,bj...c->bi...c", T, u), 1, axis + 1)
    y = rms_norm(heads(y, nh), heads(np.asarray(tpe["norm_weight"][axis]), nh)).reshape(y.shape)
    return dense(y, tpe[f"out_proj_{axis}"]["kernel"])


def output(p, x, o):
    gate = silu(dense(dense(x, p["g_down"]["kernel"]), p["g_up"]["kernel"]))
    return dense(rms_norm(o.reshape(x.shape[:2] + (-1,)), p["norm_weight"]) * gate, p["out_proj"]["kernel"])


def causal_oracle(p, x, tpe=False, lrpe=False):
    """The paper's additive recurrence token by token: M_t = M_{t-1} + exp(k~_t) v_t^T,
    Z_t = Z_{t-1} + exp(k~_t), o_t = dk^-1/2 q_t^T (M_t / Z_t) (keys, after division by
    Z_t, rotated by MD-LRPE at position t when ``lrpe``)."""
    if tpe:
        x = x + toeplitz_encoding(p, x, 0, bidirectional=False)
    q, kl, v = silu(dense(x, p["q_proj"]["kernel"])), dense(x, p["k_proj"]["kernel"]), dense(x, p["v_proj"]["kernel"])
    dk = q.shape[-1]
    M, Z = np.zeros(q[:, 0].shape + v.shape[-1:]), np.zeros(q[:, 0].shape)
    out = np.zeros(v.shape)
    S = np.zeros(M.shape)
    for t in range(x.shape[1]):
        if lrpe:  # the normalised recurrence with rotated keys: decays act on rotated channels
            Z_new = Z + np.exp(kl[:, t])
            S = (Z / Z_new)[..., None] * S + rope(np.exp(kl[:, t]) / Z_new, t)[..., None] * v[:, t, :, None, :]
            Z = Z_new
            out[:, t] = np.einsum("bhk,bhkv->bhv", rope(q[:, t], t), S) * dk ** -0.5
        else:
            M = M + np.exp(kl[:, t])[..., None] * v[:, t, :, None, :]
            Z = Z + np.exp(kl[:, t])
            out[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], M / Z[..., None]) * dk ** -0.5
    return output(p, x, out)


def grid_oracle(p, x, grid=GRID, tpe=True, lrpe=True):
    """Bidirectional LightNet on a row-major flattened grid: softmax over all tokens per key
    channel, keys and queries rotated by (row, column) on the two channel halves."""
    b, T, d = x.shape
    if tpe:
        g = x.reshape((b,) + grid + (d,))
        x = x + sum(toeplitz_encoding(p, g, a, bidirectional=True) for a in range(len(grid))).reshape(x.shape)
    q, kl, v = silu(dense(x, p["q_proj"]["kernel"])), dense(x, p["k_proj"]["kernel"]), dense(x, p["v_proj"]["kernel"])
    k = np.exp(kl - kl.max(1, keepdims=True))
    k = k / k.sum(1, keepdims=True)
    if lrpe:
        half = q.shape[-1] // 2
        rows, cols = np.divmod(np.arange(T), grid[1])
        rotate = lambda u: np.stack([np.concatenate([rope(u[:, t, :, :half], rows[t]),  # noqa: E731
                                                     rope(u[:, t, :, half:], cols[t])], -1) for t in range(T)], 1)
        q, k = rotate(q), rotate(k)
    S = np.einsum("bthk,bthv->bhkv", k, v)
    return output(p, x, np.einsum("bthk,bhkv->bthv", q, S) * q.shape[-1] ** -0.5)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("fields", [{"lrpe": True, "tpe": True}])  # {}: test_contract.py
def test_contract(fields):
    check_contract("lightnet", num_heads=H, **fields)


def test_builds_with_d_model_alone():
    layer = ssmjax.layers.get("lightnet", d_model=32)
    x = jnp.ones((1, 3, 32))
    assert jax.jit(layer.apply)(jax.jit(layer.init)(jax.random.PRNGKey(0), x), x).shape == x.shape


def test_parameter_counts():
    for d, nh, r in ((16, 2, 16), (24, 3, 4)):
        def count(**fields):
            layer = ssmjax.layers.get("lightnet", d_model=d, num_heads=nh, gate_low_rank_dim=r, **fields)
            return param_count(jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 12, d))))

        base = 4 * d * d + 2 * d * r + d
        assert count() == base
        assert count(tpe=True) == base + (nh + d + d * d)
        assert count(tpe=True, bidirectional=True, grid_shape=(3, 4)) == base + 2 * (nh + d + d * d)


@pytest.mark.parametrize("fields", [{}, {"tpe": True}, {"lrpe": True}])
def test_matches_float64_oracle(fields):
    _, params, x, y = layer_in_f64("lightnet", num_heads=H, time=13, chunk_size=5, **fields)
    np.testing.assert_allclose(y, causal_oracle(params["params"], x, **fields), rtol=1e-6 if "lrpe" in fields else 1e-9,
                               atol=1e-6 if "lrpe" in fields else 1e-11)  # RoPE rotates in float32 (shared helper)


def test_grid_layer_matches_float64_formula():
    _, params, x, y = layer_in_f64("lightnet", num_heads=H, time=12, bidirectional=True, grid_shape=GRID,
                                   lrpe=True, tpe=True)
    np.testing.assert_allclose(y, grid_oracle(params["params"], x), rtol=1e-6, atol=1e-6)  # float32 RoPE
    _, params, x, y = layer_in_f64("lightnet", num_heads=H, time=12, bidirectional=True, grid_shape=GRID)
    np.testing.assert_allclose(y, grid_oracle(params["params"], x, tpe=False, lrpe=False), rtol=1e-9, atol=1e-11)


def test_single_scan_any_order():
    """The additive recurrence's state after all tokens does not depend on the scan order
    (a flattened image scanned row- or column-major gives the same global context); the
    bidirectional output at the last token is the causal one (both read the full state)."""
    layer = ssmjax.layers.get("lightnet", d_model=D, num_heads=H, chunk_size=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, D))
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    call = jax.jit(lambda p, x: layer.apply(p, x, return_state=True))
    column_major = np.arange(12).reshape(GRID).T.reshape(-1)
    (y, state), (_, permuted) = call(params, x), call(params, x[:, column_major])
    np.testing.assert_allclose(permuted["S"], state["S"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(permuted["z"], state["z"], rtol=1e-12)
    both = ssmjax.layers.get("lightnet", d_model=D, num_heads=H, bidirectional=True)
    np.testing.assert_allclose(jax.jit(both.apply)(params, x)[:, -1], y[:, -1], rtol=1e-9, atol=1e-12)
    # a multiplicative (decaying) recurrence is order dependent: GLA's state changes
    gla = ssmjax.layers.get("gla", d_model=D, num_heads=H)
    gp = jax.jit(gla.init)(jax.random.PRNGKey(1), x)
    gcall = jax.jit(lambda p, x: gla.apply(p, x, return_state=True)[1])
    assert np.abs(gcall(gp, x) - gcall(gp, x[:, column_major])).max() > 1e-3


# additive_gates (the recurrence): tests/scan/test_lightnet.py.


def test_md_lrpe_is_relative_on_a_grid():
    """md_lrpe(q, p) . md_lrpe(k, p') depends on p' - p only (2-D coordinates)."""
    q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 12, 1, 8))
    coords = grid_coordinates(GRID)
    np.testing.assert_array_equal(coords[5], [1, 1])

    def scores(shift):
        return jnp.einsum("bshd,bthd->st", md_lrpe(q, coords + shift), md_lrpe(k, coords + shift))

    np.testing.assert_allclose(scores(jnp.array([7, -3])), scores(0), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(scores(0) - jnp.einsum("bshd,bthd->st", q, k)).max()) > 1e-2
    with pytest.raises(ValueError, match="head size"):
        md_lrpe(q[..., :6], coords)


def test_non_causal_forms_have_no_state():
    x = jnp.ones((1, 12, D))
    both = ssmjax.layers.get("lightnet", d_model=D, bidirectional=True)
    params = jax.jit(both.init)(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="state"):
        both.apply(params, x, return_state=True)
    with pytest.raises(ValueError, match="step"):
        both.apply(params, x[:, 0], None, method="step")
    with pytest.raises(ValueError, match="grid_shape"):
        ssmjax.layers.get("lightnet", d_model=D, grid_shape=GRID).init(jax.random.PRNGKey(0), x)
    grid = ssmjax.layers.get("lightnet", d_model=D, bidirectional=True, grid_shape=GRID)
    with pytest.raises(ValueError, match="tokens"):
        grid.init(jax.random.PRNGKey(0), jnp.ones((1, 11, D)))
