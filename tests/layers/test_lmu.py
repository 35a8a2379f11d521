"""LMU: the LegT matrices against their formulas, the ZOH discretisation and the impulse
response, the delay-line property of the memory, the contract for both evaluations, and
a float64 loop of the recurrent form compared with the layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import ssmjax.layers
from ssmjax.layers import lmu
from tests.layers.contract import check_contract

D = 16


def count(**fields):
    layer = ssmjax.layers.get("lmu", d_model=D, **fields)
    shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 3, D)))
    return sum(a.size for a in jax.tree.leaves(shapes))


def test_contract_scan():  # the default method="fft": test_contract.py
    check_contract("lmu", method="scan", order=8, theta=6.0)


def test_parameter_count():
    q, du = 8, 2
    assert count(order=q, memory_dim=du) == (D + 1) * du + (du * q + D + 1) * D + (D + 1) * D
    assert count() == (D + 1) + (D + D + 1) * D + (D + 1) * D  # order = d_model, d_u = 1


def test_legendre_matrices_match_the_formulas():
    q, theta = 6, 5.0
    A, B = lmu.legendre_state_space(q, theta)
    for i in range(q):
        assert B[i] == pytest.approx((2 * i + 1) * (-1) ** i / theta)
        for j in range(q):
            expected = (2 * i + 1) / theta * (-1.0 if i < j else (-1.0) ** (i - j + 1))
            assert A[i, j] == pytest.approx(expected)
    A_bar, B_bar = lmu.legendre_memory(q, theta)
    np.testing.assert_allclose(A_bar, scipy.linalg.expm(A), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(B_bar, np.linalg.solve(A, (A_bar - np.eye(q)) @ B), rtol=1e-9, atol=1e-12)
    H = lmu.legendre_impulse_response(q, theta, 37)
    powers = np.stack([np.linalg.matrix_power(A_bar, t) @ B_bar for t in range(37)])
    np.testing.assert_allclose(H, powers, rtol=1e-9, atol=1e-13)


def test_memory_is_a_delay_line():
    """Legendre decoding of the memory: sum_i m_i ~ u(t - theta) (P_i(1) = 1) and
    sum_i (-1)^i m_i ~ u(t) (P_i(-1) = (-1)^i). Measured errors 0.039 and 0.0014: the
    first is the half-sample delay of the ZOH hold, max |du/dt| / 2 = pi / 80."""
    q, theta, T = 12, 20.0, 200
    t = np.arange(T)
    u = np.sin(2 * np.pi * t / 80.0)
    H = lmu.legendre_impulse_response(q, theta, T)
    m = np.stack([sum(H[k] * u[s - k] for k in range(s + 1)) for s in range(T)])
    late = t >= 2 * theta
    np.testing.assert_allclose(m[late].sum(1), u[t[late] - int(theta)], atol=0.05)
    np.testing.assert_allclose(m[late] @ (-1.0) ** np.arange(q), u[late], atol=0.003)


def lmu_reference(p, x, order, theta, segment_ids=None):
    """u = relu(W_u x); m_t = Abar m_{t-1} + Bbar u_t (restarting at document starts);
    y = W_o relu(W_h [m; x])."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    ids = np.zeros(x.shape[:2], int) if segment_ids is None else np.asarray(segment_ids)
    A_bar, B_bar = lmu.legendre_memory(order, theta)
    u = np.maximum(x @ p["W_u"]["kernel"] + p["W_u"]["bias"], 0)
    m = np.zeros((x.shape[0], u.shape[-1], order))
    ms = []
    for t in range(x.shape[1]):
        if t:
            m = np.where((ids[:, t] != ids[:, t - 1])[:, None, None], 0.0, m)
        m = m @ A_bar.T + u[:, t, :, None] * B_bar
        ms.append(m.reshape(x.shape[0], -1))
    feats = np.concatenate([np.stack(ms, 1), x], -1)
    o = np.maximum(feats @ p["W_h"]["kernel"] + p["W_h"]["bias"], 0)
    return o @ p["out_proj"]["kernel"] + p["out_proj"]["bias"], m


@pytest.mark.parametrize("method", ["fft", "scan"])
def test_matches_loop(method):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 21, D), jnp.float64)
    layer = ssmjax.layers.get("lmu", d_model=D, order=6, theta=9.0, memory_dim=2, method=method)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    y, state = jax.jit(lambda p, x: layer.apply(p, x, return_state=True))(params, x)
    y_ref, m_ref = lmu_reference(params["params"], x, 6, 9.0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(state["m"], m_ref, rtol=1e-9, atol=1e-9)
    segment_ids = jnp.array([[0] * 8 + [1] * 13, [3] * 21])
    y_ref, _ = lmu_reference(params["params"], x, 6, 9.0, segment_ids)
    y_packed = jax.jit(lambda p, x, ids: layer.apply(p, x, segment_ids=ids))(params, x, segment_ids)
    np.testing.assert_allclose(y_packed, y_ref, rtol=1e-9, atol=1e-9)


def test_float32_fft_error():
    """float32 FFT memory vs the float64 loop at T = 256, q = theta-sized memory:
    the FFT's error is relative to the largest term, a few 1e-7 times log T (measured 8e-8
    at T = 64)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 256, D), jnp.float64)
    layer = ssmjax.layers.get("lmu", d_model=D, theta=64.0)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    y32 = jax.jit(layer.apply)(params, x.astype(jnp.float32))
    y_ref, _ = lmu_reference(params["params"], x, D, 64.0)
    err = np.max(np.abs(np.asarray(y32, np.float64) - y_ref)) / np.max(np.abs(y_ref))
    assert err < 1e-5, err


def test_bad_method():
    layer = ssmjax.layers.get("lmu", d_model=D, method="cauchy")
    with pytest.raises(ValueError, match="method"):
        layer.init(jax.random.PRNGKey(0), jnp.ones((1, 3, D)))
