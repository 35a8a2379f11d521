"""HGRN: contract (real, complex, lower-bounded), parameter counts, the lower bound on the
forget gate, and a float64 per-token loop of the paper's HGRU recurrence on the layer's
own parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.hgrn  # noqa: F401  (registers "hgrn")
from tests.layers.contract import check_contract
from tests.layers.reference import dense, layer_in_f64, param_count, rms_norm, sigmoid, silu

D = 16
VARIANTS = [{}, {"use_complex": True}, {"lower_bound": 0.5},
            {"use_complex": True, "lower_bound": 0.9, "expand_ratio": 2}]


def hgrn_oracle(p, x, lower_bound=0.0, use_complex=False, expand_ratio=1):
    """HGRU (Qin, Yang and Zhong 2023, Eq. 4 and Fig. 1): lambda = lb + (1 - lb) sigmoid(.),
    h_t = lambda_t [exp(i theta)] h_{t-1} + (1 - lambda_t) c_t, y = W_o (RMSNorm(h) swish(W_g x))."""
    lam = lower_bound + (1 - lower_bound) * sigmoid(dense(x, p["f_proj"]["kernel"]))
    i = dense(x, p["i_proj"]["kernel"])
    if use_complex:
        E = lam.shape[-1]
        c, rotation = silu(i[..., :E]) + 1j * silu(i[..., E:]), np.exp(1j * np.asarray(p["theta"]))
    else:
        c, rotation = silu(i), 1.0
    h, out = np.zeros(c[:, 0].shape, c.dtype), []
    for t in range(x.shape[1]):
        h = lam[:, t] * rotation * h + (1 - lam[:, t]) * c[:, t]
        out.append(np.concatenate([h.real, h.imag], -1) if use_complex else h)
    y = rms_norm(np.stack(out, 1), p["norm_weight"]) * silu(dense(x, p["g_proj"]["kernel"]))
    return dense(y, p["out_proj"]["kernel"])


@pytest.mark.parametrize("fields", VARIANTS[1:3])  # VARIANTS[0]: test_contract.py
def test_contract(fields):
    check_contract("hgrn", **fields)


def test_builds_with_d_model_alone():
    layer = ssmjax.layers.get("hgrn", d_model=24)
    x = jnp.ones((1, 3, 24))
    assert jax.jit(layer.apply)(jax.jit(layer.init)(jax.random.PRNGKey(0), x), x).shape == x.shape


def test_parameter_counts():
    def shapes(**fields):
        layer = ssmjax.layers.get("hgrn", d_model=D, **fields)
        return jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 2, D)))

    for expand in (1, 2, 3):
        E = expand * D
        assert param_count(shapes(expand_ratio=expand)) == 4 * D * E + E
        assert param_count(shapes(expand_ratio=expand, use_complex=True)) == 7 * D * E + 3 * E


@pytest.mark.parametrize("fields", VARIANTS)
def test_matches_float64_oracle(fields):
    _, params, x, y = layer_in_f64("hgrn", time=13, **fields)
    np.testing.assert_allclose(y, hgrn_oracle(params["params"], x, **fields), rtol=1e-10, atol=1e-12)


def test_forget_gate_respects_the_lower_bound_and_phases_init():
    layer = ssmjax.layers.get("hgrn", d_model=D, lower_bound=0.9, use_complex=True)
    x = 5.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 7, D))
    p = jax.jit(layer.init)(jax.random.PRNGKey(1), x)["params"]
    lam = 0.9 + 0.1 * sigmoid(dense(np.asarray(x, np.float64), p["f_proj"]["kernel"]))
    assert lam.min() >= 0.9 and lam.max() <= 1.0
    np.testing.assert_allclose(p["theta"], 10000.0 ** (-np.arange(D) / D), rtol=1e-6)


def test_float32_error():
    """float32 vs float64 (same parameters, 64 tokens): measured max relative error
    ~2e-7 (real) / ~3e-7 (complex)."""
    for fields in VARIANTS[:2]:
        layer = ssmjax.layers.get("hgrn", d_model=D, **fields)
        x = jax.random.normal(jax.random.PRNGKey(3), (2, 64, D), jnp.float32)
        params = jax.jit(layer.init)(jax.random.PRNGKey(4), x)
        apply = jax.jit(layer.apply)
        y32, y64 = apply(params, x), apply(jax.tree.map(lambda a: a.astype(jnp.float64), params), x.astype(jnp.float64))
        assert y32.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(y32 - y64)) / jnp.max(jnp.abs(y64))) < 5e-6


def test_bad_lower_bound_raises():
    layer = ssmjax.layers.get("hgrn", d_model=D, lower_bound=-0.1)
    with pytest.raises(ValueError, match="lower_bound"):
        layer.init(jax.random.PRNGKey(0), jnp.ones((1, 2, D)))
