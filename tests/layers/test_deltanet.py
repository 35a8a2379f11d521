"""DeltaNet and Gated DeltaNet: contract, parameter counts, initialisation, float64
per-token loops of the (gated) delta rule written in the papers' orientation
(``S [dv, dk]``, ``S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``) on the
layers' own parameters, and a 3:1 Gated DeltaNet / attention hybrid whose ``generate()``
logits equal its forward logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.attention  # noqa: F401  (registers "attention")
import ssmjax.layers.deltanet  # noqa: F401  (registers "deltanet", "gated_deltanet")
from ssmjax.models import SequenceModel, generate
from tests.layers.contract import check_contract
from tests.layers.reference import (causal_conv, dense, heads, layer_in_f64, param_count, rms_norm, sigmoid, silu,
                                    softplus)

D, H = 16, 2
NAMES = ["deltanet", "gated_deltanet"]


def l2_normalize(u, eps=1e-6):
    return u / np.sqrt(np.sum(u * u, -1, keepdims=True) + eps)


def delta_oracle(p, x, gated, nh=H, allow_neg_eigval=False):
    """Short convs + SiLU, L2-normalised q/k, beta = sigmoid(W_b x), (alpha = exp(g) with
    g = -exp(A_log) softplus(W_a x + dt_bias)), the delta rule token by token, RMSNorm per
    head (times swish(W_g x) when gated), W_o."""
    qkv = silu(causal_conv(dense(x, p["qkv_proj"]["kernel"]), p["conv_w"]))
    dk_total = (qkv.shape[-1] - nh * p["norm_weight"].shape[0]) // 2  # channels [q, k, v], v: nh * dv
    q, k, v = (heads(u, nh) for u in np.split(qkv, [dk_total, 2 * dk_total], -1))
    q, k = l2_normalize(q), l2_normalize(k)
    beta = sigmoid(dense(x, p["b_proj"]["kernel"])) * (2.0 if allow_neg_eigval else 1.0)
    alpha = np.ones(beta.shape)
    if gated:
        alpha = np.exp(-np.exp(p["A_log"]) * softplus(dense(x, p["a_proj"]["kernel"]) + p["dt_bias"]))
    S = np.zeros((x.shape[0], nh, v.shape[-1], k.shape[-1]))
    out = np.zeros(v.shape)
    for t in range(x.shape[1]):
        k_t, b_t = k[:, t], beta[:, t, :, None, None]
        S = alpha[:, t, :, None, None] * (S - b_t * np.einsum("bhvk,bhk->bhv", S, k_t)[..., None] * k_t[:, :, None, :])
        S = S + b_t * v[:, t, :, :, None] * k_t[:, :, None, :]
        out[:, t] = np.einsum("bhvk,bhk->bhv", S, q[:, t]) * k.shape[-1] ** -0.5
    o = rms_norm(out, p["norm_weight"])
    if gated:
        o = o * silu(dense(x, p["g_proj"]["kernel"]))
    return dense(o, p["out_proj"]["kernel"], axes=2)


@pytest.mark.parametrize("name,fields", [
    # ("deltanet", {}), ("gated_deltanet", {}): test_contract.py
    pytest.param("gated_deltanet", {"allow_neg_eigval": True, "head_dim": 4}, marks=pytest.mark.slow),
])
def test_contract(name, fields):
    check_contract(name, num_heads=H, **fields)


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_d_model_alone(name):
    layer = ssmjax.layers.get(name, d_model=32)
    x = jnp.ones((1, 3, 32))
    assert jax.jit(layer.apply)(jax.jit(layer.init)(jax.random.PRNGKey(0), x), x).shape == x.shape


def count(name, **fields):
    layer = ssmjax.layers.get(name, d_model=D, **fields)
    return param_count(jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 3, D))))


def test_parameter_counts():
    d = D
    for nh, head_dim, ev, k in ((2, None, 1.0, 4), (4, 6, 2.0, 3), (1, 8, 1.5, 2)):
        dk = head_dim or d // nh
        dv = int(ev * dk)
        base = d * (2 * nh * dk + nh * dv + nh) + k * (2 * nh * dk + nh * dv) + dv + nh * dv * d
        fields = dict(num_heads=nh, head_dim=head_dim, expand_v=ev, conv_size=k)
        assert count("deltanet", **fields) == base
        assert count("gated_deltanet", **fields) == base + d * nh + 2 * nh + d * nh * dv


def test_gated_deltanet_initialisation():
    layer = ssmjax.layers.get("gated_deltanet", d_model=64, num_heads=64)
    p = jax.jit(layer.init)(jax.random.PRNGKey(0), jnp.ones((1, 2, 64)))["params"]
    A = np.exp(p["A_log"])
    assert 0 < A.min() and A.max() <= 16 and A.mean() > 4  # A ~ U(0, 16)
    dt = np.log1p(np.exp(p["dt_bias"]))  # softplus(dt_bias) = dt ~ exp(U(log 1e-3, log 0.1))
    assert 1e-3 * (1 - 1e-5) <= dt.min() and dt.max() <= 0.1 * (1 + 1e-5)


@pytest.mark.parametrize("name,fields", [("deltanet", {}), ("gated_deltanet", {}),
                                         ("gated_deltanet", {"allow_neg_eigval": True, "expand_v": 1.5})])
def test_matches_float64_oracle(name, fields):
    """Chunk 5 over 13 tokens (the WY chunked form with padding) == the token loop."""
    _, params, x, y = layer_in_f64(name, num_heads=H, time=13, chunk_size=5, **fields)
    expected = delta_oracle(params["params"], x, gated=name == "gated_deltanet",
                            allow_neg_eigval=fields.get("allow_neg_eigval", False))
    np.testing.assert_allclose(y, expected, rtol=1e-9, atol=1e-11)


def test_float32_error():
    """float32 vs float64 on the same parameters, 40 tokens, chunk 8: measured max relative
    error ~5e-7 (DeltaNet ~6e-7, same algorithm without the decay)."""
    for name in ["gated_deltanet"]:
        layer = ssmjax.layers.get(name, d_model=D, num_heads=H, chunk_size=8)
        x = jax.random.normal(jax.random.PRNGKey(3), (2, 40, D), jnp.float32)
        params = jax.jit(layer.init)(jax.random.PRNGKey(4), x)
        apply = jax.jit(layer.apply)
        y32, y64 = apply(params, x), apply(jax.tree.map(lambda a: a.astype(jnp.float64), params), x.astype(jnp.float64))
        assert float(jnp.max(jnp.abs(y32 - y64)) / jnp.max(jnp.abs(y64))) < 5e-6


def test_hybrid_generate_equals_forward():
    """``gated_deltanet*3,attention`` (4 layers): the prompt in parallel form, then ``step``
    decoding, gives the same logits as one forward pass over prompt + generated tokens."""
    model = SequenceModel(d_model=D, n_layers=4, mixers="gated_deltanet*3,attention", vocab_size=11,
                          mixer_fields={"attention": {"max_len": 32}, "gated_deltanet": {"num_heads": H}})
    prompt = jax.random.randint(jax.random.PRNGKey(0), (2, 7), 0, 11)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), prompt)
    tokens, logits = jax.jit(lambda p, x, k: generate(model, p, x, steps=6, key=k, temperature=1.0, top_k=5))(
        params, prompt, jax.random.PRNGKey(2))
    full = jax.jit(model.apply)(params, jnp.concatenate([prompt, tokens], 1))
    np.testing.assert_allclose(logits, full[:, prompt.shape[1] - 1:-1], rtol=1e-4, atol=1e-4)
