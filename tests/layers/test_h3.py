"""H3 and GSS: the layer contract, parameter counts, and float64 per-token loops written
from the papers' equations (shift SSM, diagonal SSM on K V, multiplicative Q; gated
simplified DSS) compared with the layers on their own parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import ssmjax.layers
import ssmjax.layers.h3  # noqa: F401  (registers "h3", "gss")
from tests.layers.contract import check_contract

D = 16


def count(name, **fields):
    layer = ssmjax.layers.get(name, d_model=D, **fields)
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 3, D)))
    return sum(a.size for a in jax.tree.leaves(params))


def rand(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def cplx(p):
    p = np.asarray(p, np.float64)
    return p[..., 0] + 1j * p[..., 1]


def dense(p, v):
    return v @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def test_contract_multi_head():  # the default h3 and gss: test_contract.py
    check_contract("h3", d_state=6, head_dim=4)


@pytest.mark.parametrize("name", ["h3", "gss"])
def test_builds_from_d_model_alone(name):
    layer = ssmjax.layers.get(name, d_model=D)
    x = rand((2, 5, D), dtype=jnp.float32)
    y = jax.jit(lambda x: layer.apply(layer.init(jax.random.PRNGKey(0), x), x))(x)
    assert y.shape == x.shape and y.dtype == jnp.float32 and bool(jnp.isfinite(y).all())


def test_parameter_counts():
    for n, head_dim in ((8, 1), (6, 4), (64, 1)):
        hh = D // head_dim
        expected = 4 * D * D + 4 * D + D * n + D + hh * (3 * n + 2)
        assert count("h3", d_state=n, head_dim=head_dim) == expected
    assert count("h3") == 4 * D * D + 4 * D + D * 64 + D + D * (3 * 64 + 2)
    for expansion, reduction, n in ((4, 4, 512), (2, 8, 16)):
        f, hr = expansion * D, D // reduction
        expected = (D + 1) * f + (D + 1) * hr + 3 * hr + 2 * n + 2 * hr * n + (hr + 1) * f + (f + 1) * D
        assert count("gss", expansion=expansion, reduction=reduction, d_state=n) == expected


def h3_reference(p, x, n, head_dim, method):
    """H3 per token: shift SSM on K, diagonal SSM per head on the K V outer products, Q."""
    x = np.asarray(x, np.float64)
    b, t, d = x.shape
    hh, m = d // head_dim, head_dim
    q, k, v = (dense(p[name], x) for name in ("q_proj", "k_proj", "v_proj"))
    Cs, Ds = np.asarray(p["shift_C"]), np.asarray(p["shift_D"])
    k_bar = np.zeros_like(k)
    for s in range(t):  # shift SSM: state = the last N keys, y = Cs . state
        for i in range(min(n, s + 1)):
            k_bar[:, s] += Cs[:, i] * k[:, s - i]
    k_bar += Ds * k
    Lambda = -np.exp(np.asarray(p["log_A_real"])) + 1j * np.asarray(p["A_imag"])  # [H, N/2]
    B, C, dt = cplx(p["B"]), cplx(p["C"]), np.exp(np.asarray(p["log_dt"]))[:, None]
    if method == "bilinear":
        A_bar, B_bar = (1 + dt * Lambda / 2) / (1 - dt * Lambda / 2), dt / (1 - dt * Lambda / 2) * B
    else:
        A_bar, B_bar = np.exp(dt * Lambda), (np.exp(dt * Lambda) - 1) / Lambda * B
    state = np.zeros((b, hh, m, m, n // 2), complex)
    out = np.zeros((b, t, hh, m))
    for s in range(t):
        z = k_bar[:, s].reshape(b, hh, m, 1) * v[:, s].reshape(b, hh, 1, m)
        state = A_bar[:, None, None] * state + B_bar[:, None, None] * z[..., None]
        y = 2 * np.sum(C[:, None, None] * state, -1).real + np.asarray(p["D"])[:, None, None] * z
        out[:, s] = np.einsum("bhi,bhij->bhj", q[:, s].reshape(b, hh, m), y)
    return dense(p["output_linear"], out.reshape(b, t, d))


@pytest.mark.parametrize(("n", "head_dim", "method"), [(8, 1, "bilinear"), (6, 4, "zoh"), (4, 2, "bilinear")])
def test_h3_matches_float64_recurrence(n, head_dim, method):
    x = rand((2, 13, D))
    layer = ssmjax.layers.get("h3", d_model=D, d_state=n, head_dim=head_dim, discretization=method,
                              param_dtype=jnp.float64)
    params = jax.jit(layer.init)(jax.random.PRNGKey(3), x)
    expected = h3_reference(params["params"], x, n, head_dim, method)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), expected, rtol=1e-10, atol=1e-10)


def gss_reference(p, x):
    """GSS pseudocode per token: gates, LayerNorm, simplified DSS (dt = 1, B = 1, shared Lambda)."""
    x = np.asarray(x, np.float64)
    v = gelu(dense(p["to_v"], x))
    u = gelu(dense(p["to_u"], x))
    mu, var = u.mean(-1, keepdims=True), u.var(-1, keepdims=True)
    u = (u - mu) / np.sqrt(var + 1e-5) * np.asarray(p["norm"]["scale"]) + np.asarray(p["norm"]["bias"])
    Lambda = -np.exp(np.asarray(p["Lambda_log_neg_re"])) + 1j * np.exp(np.asarray(p["Lambda_log_im"]))
    C = cplx(p["C"])  # [H, N]
    state = np.zeros(u.shape + Lambda.shape, complex)[:, 0]
    s = np.zeros_like(u)
    for t in range(u.shape[1]):
        state = np.exp(Lambda) * state + (np.exp(Lambda) - 1) / Lambda * u[:, t, :, None]
        s[:, t] = np.sum(C * state, -1).real
    s = s + np.asarray(p["D"]) * u
    return dense(p["to_out"], dense(p["to_gate"], s) * v)


def test_gss_matches_float64_recurrence():
    x = rand((2, 13, D))
    layer = ssmjax.layers.get("gss", d_model=D, d_state=16, param_dtype=jnp.float64)
    params = jax.jit(layer.init)(jax.random.PRNGKey(4), x)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), gss_reference(params["params"], x), rtol=1e-10,
                               atol=1e-10)


def test_h3_shift_kernel_is_a_short_causal_memory():
    """The shift SSM has a finite memory of N steps: its outputs at t >= N do not depend on
    the input at t = 0 (those at t < N do), and its state is the last N - 1 inputs."""
    from ssmjax.layers.h3 import shift_ssm

    n = 4
    k = rand((1, 9, 3))
    C = rand((3, n), seed=1)
    history = jnp.zeros((1, n - 1, 3))
    y, state = shift_ssm(k, C, history)
    y2, _ = shift_ssm(k.at[:, 0].add(1.0), C, history)
    np.testing.assert_allclose(y2[:, n:], y[:, n:], atol=1e-12)
    assert np.abs(y2[:, : n] - y[:, : n]).max() > 1e-3
    np.testing.assert_allclose(state, k[:, -(n - 1):])


def test_jit_vmap():
    """(jit of grad is part of the contract.)"""
    x = rand((2, 9, D), dtype=jnp.float32)
    for name in ("h3", "gss"):
        layer = ssmjax.layers.get(name, d_model=D, d_state=8)
        params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
        ys = jax.jit(jax.vmap(lambda v, layer=layer, params=params: layer.apply(params, v)))(jnp.stack([x, -x]))
        np.testing.assert_allclose(ys[1], jax.jit(layer.apply)(params, -x), rtol=1e-5, atol=1e-5)
