"""linear_attention, retnet, gla, hgrn2: the layer contract, parameter counts, and float64
per-token loops written from each paper's equations, run on the layer's own parameters
(mlstm, in the same module, is tested in test_mlstm.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.linear_attention  # noqa: F401  (registers the layers)
from ssmjax.layers.linear_attention import retention_log_decays
from tests.layers.contract import check_contract
from tests.layers.reference import (
    dense,
    layer_in_f64,
    layer_norm,
    param_count,
    rms_norm,
    rope,
    sigmoid,
    silu,
)

D, H = 16, 2
NAMES = ["linear_attention", "retnet", "gla", "hgrn2"]  # mlstm: test_mlstm.py


def outer(k, v):
    return k[..., :, None] * v[..., None, :]


def read(q, S):
    return np.einsum("bhk,bhkv->bhv", q, S)


# ----------------------------------------------------------------------------- oracles
def linear_attention_oracle(p, x, feature_map="elu+1", normalize=True, eps=1e-6):
    phi = (lambda u: np.where(u > 0, u + 1.0, np.exp(np.minimum(u, 0.0)))) if feature_map == "elu+1" else (lambda u: u)
    q, k = phi(dense(x, p["q_proj"]["kernel"])), phi(dense(x, p["k_proj"]["kernel"]))
    v = dense(x, p["v_proj"]["kernel"])
    S, z, out = np.zeros(q.shape[:1] + q.shape[2:] + v.shape[-1:]), np.zeros(k[:, 0].shape), np.zeros(v.shape)
    for t in range(x.shape[1]):
        S = S + outer(k[:, t], v[:, t])
        z = z + k[:, t]
        num = read(q[:, t], S)
        if normalize:
            out[:, t] = num / (np.sum(q[:, t] * z, -1, keepdims=True) + eps)
        else:
            out[:, t] = num * q.shape[-1] ** -0.5
    return dense(out, p["out_proj"]["kernel"], axes=2)


def retnet_oracle(p, x, use_rope=True):
    q, k, v = (dense(x, p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj"))
    nh, dk = q.shape[-2:]
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(nh))
    S, out = np.zeros(q.shape[:1] + (nh, dk, v.shape[-1])), np.zeros(v.shape)
    for t in range(x.shape[1]):
        q_t, k_t = (rope(u[:, t], t) if use_rope else u[:, t] for u in (q, k))
        S = gamma[:, None, None] * S + outer(k_t, v[:, t])
        out[:, t] = read(q_t, S) * dk ** -0.5
    y = silu(dense(x, p["g_proj"]["kernel"])) * layer_norm(out)
    return dense(y, p["out_proj"]["kernel"], axes=2)


def gla_oracle(p, x):
    q, k, v, g = (dense(x, p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj", "g_proj"))
    alpha = sigmoid(dense(dense(x, p["gk_down"]["kernel"]), p["gk_up"]["kernel"], p["gk_up"]["bias"])) ** (1 / 16)
    S, out = np.zeros(q.shape[:1] + q.shape[2:] + v.shape[-1:]), np.zeros(v.shape)
    for t in range(x.shape[1]):
        S = alpha[:, t, :, :, None] * S + outer(k[:, t], v[:, t])
        out[:, t] = read(q[:, t], S) * q.shape[-1] ** -0.5
    o = rms_norm(out, p["norm_weight"]) * silu(g)
    return dense(o, p["out_proj"]["kernel"], axes=2)


def hgrn2_oracle(p, x, lower_bound=0.0):
    f = lower_bound + (1 - lower_bound) * sigmoid(dense(x, p["f_proj"]["kernel"]))
    q, k, v = silu(dense(x, p["q_proj"]["kernel"])), 1.0 - f, dense(x, p["i_proj"]["kernel"])
    S, out = np.zeros(q.shape[:1] + q.shape[2:] + v.shape[-1:]), np.zeros(v.shape)
    for t in range(x.shape[1]):
        S = f[:, t, :, :, None] * S + outer(k[:, t], v[:, t])
        out[:, t] = read(q[:, t], S) * q.shape[-1] ** -0.5
    o = rms_norm(out.reshape(x.shape[:2] + (-1,)), p["norm_weight"])
    return dense(o, p["out_proj"]["kernel"])


ORACLES = {
    "linear_attention": (linear_attention_oracle, [({}, {}), ({"feature_map": "identity", "normalize": False},
                                                                {"feature_map": "identity", "normalize": False})]),
    "retnet": (retnet_oracle, [({}, {}), ({"rope": False}, {"use_rope": False})]),
    "gla": (gla_oracle, [({}, {})]),
    "hgrn2": (hgrn2_oracle, [({}, {}), ({"lower_bound": 0.4, "expand_ratio": 4}, {"lower_bound": 0.4})]),
}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name,fields", [
    # the default configs: test_contract.py
    ("linear_attention", {"feature_map": "identity", "normalize": False}), ("hgrn2", {"lower_bound": 0.3}),
])
def test_contract(name, fields):
    check_contract(name, num_heads=H, **fields)


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_d_model_alone(name):
    layer = ssmjax.layers.get(name, d_model=32)
    x = jnp.ones((1, 3, 32), jnp.float32)
    assert jax.jit(layer.apply)(jax.jit(layer.init)(jax.random.PRNGKey(0), x), x).shape == x.shape


def count(name, **fields):
    layer = ssmjax.layers.get(name, d_model=D, **fields)
    return param_count(jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 3, D))))


def test_parameter_counts():
    d = D
    assert count("linear_attention", num_heads=H) == 4 * d * d
    for ev in (1, 2, 3):
        assert count("retnet", num_heads=H, expand_v=ev) == d * d * (2 + 3 * ev)
    for ek, ev, r in ((0.5, 1.0, 16), (1.0, 2.0, 4)):
        dk, dv = int(ek * d) // H, int(ev * d) // H
        assert count("gla", num_heads=H, expand_k=ek, expand_v=ev, gate_low_rank_dim=r) == (
            d * (2 * H * dk + 2 * H * dv) + d * r + r * H * dk + H * dk + dv + H * dv * d)
    for dk in (None, 4, 32):
        dk_ = dk or d // H
        assert count("hgrn2", num_heads=H, expand_ratio=dk) == 2 * d * H * dk_ + 2 * d * d + d


@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_oracle(name):
    """The layer (chunked, chunk 5 over 12 tokens) == the paper's per-token loop.

    RetNet with RoPE is held to 1e-6: the shared ``attention.rotary_embedding`` rotates in
    float32 whatever the input dtype (measured error ~2e-7); without RoPE it is 1e-9."""
    oracle, cases = ORACLES[name]
    for layer_fields, oracle_fields in cases:
        _, params, x, y = layer_in_f64(name, num_heads=H, chunk_size=5, **layer_fields)
        tol = 1e-6 if name == "retnet" and layer_fields.get("rope", True) else 1e-9
        np.testing.assert_allclose(y, oracle(params["params"], x, **oracle_fields), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_float32_error(name):
    """float32 vs float64 on the same parameters; measured max relative errors (of the
    output's max magnitude) are ~1e-7 .. 5e-7: summation-order rounding only."""
    layer = ssmjax.layers.get(name, d_model=D, num_heads=H, chunk_size=8)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 40, D), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(4), x)
    apply = jax.jit(layer.apply)
    y32 = apply(params, x)
    y64 = apply(jax.tree.map(lambda a: a.astype(jnp.float64), params), x.astype(jnp.float64))
    assert y32.dtype == jnp.float32
    error = float(jnp.max(jnp.abs(y32 - y64)) / jnp.max(jnp.abs(y64)))
    assert error < 5e-6, error


def test_retention_decays():
    np.testing.assert_allclose(np.exp(retention_log_decays(4)), [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256],
                               rtol=1e-7)


def test_bfloat16_inputs_keep_float32_states():
    layer = ssmjax.layers.get("gla", d_model=D, num_heads=H, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, D)).astype(jnp.bfloat16)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    y, state = jax.jit(lambda p, x: layer.apply(p, x, return_state=True))(params, x)
    assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())
    assert state.dtype == jnp.float32


def test_bad_fields_raise():
    x = jnp.ones((1, 3, D))
    for name, fields, message in [("linear_attention", {"feature_map": "relu"}, "feature_map"),
                                  ("gla", {"num_heads": 3}, "num_heads"),
                                  ("hgrn2", {"lower_bound": 1.0}, "lower_bound")]:
        layer = ssmjax.layers.get(name, d_model=D, **fields)
        with pytest.raises(ValueError, match=message):
            layer.init(jax.random.PRNGKey(0), x)
    layer = ssmjax.layers.get("gla", d_model=D)
    with pytest.raises(ValueError, match="x"):
        layer.init(jax.random.PRNGKey(0), jnp.ones((1, 3, D + 1)))
