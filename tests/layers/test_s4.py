"""S4, S4D and DSS: the layer contract, parameter counts, the HiPPO / S4D initialisations,
and float64 per-token loops written from the papers' equations compared with the layers on
their own parameters (causal and bidirectional)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import ssmjax.layers
import ssmjax.layers.s4  # noqa: F401  (registers "s4", "s4d", "dss")
from ssmjax.layers import hippo

D, N = 16, 8


def n_params(params):
    return sum(a.size for a in jax.tree.leaves(params))


def count(name, d=D, **fields):
    layer = ssmjax.layers.get(name, d_model=d, **fields)
    return n_params(jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 3, d))))


def rand(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def init64(name, x, **fields):
    layer = ssmjax.layers.get(name, d_model=x.shape[-1], param_dtype=jnp.float64, **fields)
    return layer, jax.jit(layer.init)(jax.random.PRNGKey(1), x)


def cplx(p):
    p = np.asarray(p, np.float64)
    return p[..., 0] + 1j * p[..., 1]


def gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def s4_block(p, y_ssm, u):
    """GLU(W GELU(y + D u) + b)."""
    z = gelu(y_ssm + np.asarray(p["D"]) * u) @ np.asarray(p["output_linear"]["kernel"])
    z = z + np.asarray(p["output_linear"]["bias"])
    a, g = np.split(z, 2, axis=-1)
    return a / (1 + np.exp(-g))


# ---------------------------------------------------------------------------- contract
# The default-config contract (float32 and float64) is tests/layers/test_contract.py.


@pytest.mark.parametrize("name", ["s4", "s4d", "dss"])
def test_builds_from_d_model_alone(name):
    layer = ssmjax.layers.get(name, d_model=D)
    x = rand((2, 5, D), dtype=jnp.float32)
    y = jax.jit(lambda x: layer.apply(layer.init(jax.random.PRNGKey(0), x), x))(x)
    assert y.shape == x.shape and y.dtype == jnp.float32 and bool(jnp.isfinite(y).all())


@pytest.mark.parametrize("bidirectional", [False, True])
def test_parameter_counts(bidirectional):
    c = 2 if bidirectional else 1
    block = 2 * D * D + 4 * D
    assert count("s4", d_state=N, bidirectional=bidirectional) == D * N * (2 + 1 + c) + block
    assert count("s4", d_state=N, rank=2, bidirectional=bidirectional) == D * N * (2 + 2 + c) + block
    assert count("s4d", d_state=N, bidirectional=bidirectional) == D * N * (2 + c) + block
    assert count("dss", d_state=N, bidirectional=bidirectional) == 2 * N + 2 * c * D * N + block
    assert count("s4") == D * 64 * 4 + block  # defaults: d_state = 64


# ---------------------------------------------------------------------- initialisations
def test_hippo_legs_entries_and_nplr_identity():
    n = 12
    A, B = hippo.hippo_legs(n)
    for i in range(n):
        for k in range(n):
            expected = -math.sqrt(2 * i + 1) * math.sqrt(2 * k + 1) if i > k else (-(i + 1) if i == k else 0.0)
            assert A[i, k] == pytest.approx(expected, rel=1e-14, abs=0)
        assert B[i] == pytest.approx(math.sqrt(2 * i + 1))
    Lambda, p, b, V = hippo.hippo_legs_nplr(n)
    np.testing.assert_allclose(V @ V.conj().T, np.eye(n), atol=1e-12)  # unitary
    np.testing.assert_allclose(V @ (np.diag(Lambda) - np.outer(p, p.conj())) @ V.conj().T, A, atol=1e-11)
    np.testing.assert_allclose(V @ b, B, atol=1e-12)
    np.testing.assert_allclose(Lambda.real, -0.5, atol=1e-12)
    # HiPPO-N = A + P P^T is normal with these eigenvalues
    S = hippo.hippo_n(n)
    np.testing.assert_allclose(S @ S.T, S.T @ S, atol=1e-10)
    eig = np.linalg.eigvals(S)
    np.testing.assert_allclose(np.sort(eig.imag), np.sort(Lambda.imag), atol=1e-10)
    np.testing.assert_allclose(eig.real, -0.5, atol=1e-10)


def test_s4_dplr_half_reconstructs_the_real_system():
    """The kept Im > 0 half and its conjugates are the full spectrum, and
    2 Re(V_h diag(Lambda_h) V_h^*) = A + P P^T (HiPPO-N)."""
    n = 10
    Lambda, _, _, V = hippo.hippo_legs_dplr(n)
    assert Lambda.shape == (n // 2,) and np.all(Lambda.imag > 0)
    full = hippo.hippo_legs_nplr(n)[0]
    both = np.concatenate([Lambda, Lambda.conj()])
    np.testing.assert_allclose(np.sort(both.imag), np.sort(full.imag), atol=1e-12)
    normal = V @ np.diag(Lambda) @ V.conj().T
    np.testing.assert_allclose(2 * normal.real, hippo.hippo_n(n), atol=1e-10)


def test_s4d_initialisations():
    n = 16
    k = np.arange(n // 2)
    np.testing.assert_allclose(hippo.s4d_lin(n).imag, math.pi * k)
    np.testing.assert_allclose(hippo.s4d_inv(n).imag, n / math.pi * (n / (2 * k + 1) - 1))
    for init in ("lin", "inv"):
        np.testing.assert_allclose(hippo.s4d_init(init, n)[0].real, -0.5)
    np.testing.assert_allclose(hippo.s4d_legs(n)[0], hippo.hippo_legs_dplr(n)[0])
    # the layer starts from them
    _, params = init64("s4d", rand((1, 3, D)), d_state=n, a_init="lin")
    p = params["params"]
    np.testing.assert_allclose(p["A_imag"], np.tile(math.pi * k, (D, 1)))
    np.testing.assert_allclose(-np.exp(p["log_A_real"]), -0.5)
    _, params = init64("s4d", rand((1, 3, D)), d_state=n, a_init="inv")
    np.testing.assert_allclose(params["params"]["A_imag"][3], n / math.pi * (n / (2 * k + 1) - 1))


def test_s4_and_dss_initial_spectra():
    _, params = init64("s4", rand((1, 3, D)), d_state=N)
    p = params["params"]
    Lambda = -np.exp(p["log_A_real"]) + 1j * np.asarray(p["A_imag"])
    expected, pvec, _, _ = hippo.hippo_legs_dplr(N)
    np.testing.assert_allclose(Lambda, np.tile(expected, (D, 1)), atol=1e-12)
    np.testing.assert_allclose(cplx(p["P"])[:, 0], np.tile(pvec, (D, 1)), atol=1e-12)
    # DSS: Skew-HiPPO, the Im > 0 eigenvalues of HiPPO-N of size 2N
    _, params = init64("dss", rand((1, 3, D)), d_state=N)
    p = params["params"]
    Lambda = -np.exp(p["Lambda_log_neg_re"]) + 1j * np.asarray(p["Lambda_im"])
    eig = np.linalg.eigvals(hippo.hippo_n(2 * N))
    np.testing.assert_allclose(np.sort(Lambda.imag), np.sort(eig.imag[eig.imag > 0]), atol=1e-10)
    np.testing.assert_allclose(Lambda.real, -0.5, atol=1e-12)


# ---------------------------------------------------------------------------- oracles
def s4_reference(p, x, bidirectional=False):
    """Per-channel dense recurrence of the bilinear-discretised A = Lambda - P P^* on the
    full conjugate-extended state (S4 eq. 3), float64 python loops."""
    x = np.asarray(x, np.float64)
    b, t, h = x.shape
    Lambda = -np.exp(np.asarray(p["log_A_real"])) + 1j * np.asarray(p["A_imag"])
    P, B, C = cplx(p["P"]), cplx(p["B"]), cplx(p["C"])
    dt = np.exp(np.asarray(p["log_dt"]))
    ext = lambda z: np.concatenate([z, z.conj()], axis=-1)  # noqa: E731
    y = np.zeros_like(x)
    for c in range(h):
        A = np.diag(ext(Lambda[c])) - sum(np.outer(ext(P[c, r]), ext(P[c, r]).conj()) for r in range(P.shape[1]))
        inv = np.linalg.inv(np.eye(len(A)) - dt[c] / 2 * A)
        A_bar, B_bar = inv @ (np.eye(len(A)) + dt[c] / 2 * A), inv @ (dt[c] * ext(B[c]))
        state = np.zeros((b, len(A)), complex)
        for s in range(t):
            state = state @ A_bar.T + B_bar * x[:, s, c, None]
            y[:, s, c] = (state @ ext(C[0, c])).real
        if bidirectional:  # y_t += sum_{s > t} K'[s - t - 1] u_s: the same recurrence run backwards, delayed
            state = np.zeros((b, len(A)), complex)
            for s in reversed(range(t - 1)):
                state = state @ A_bar.T + B_bar * x[:, s + 1, c, None]
                y[:, s, c] += (state @ ext(C[1, c])).real
    return s4_block(p, y, x)


def diagonal_reference(Lambda, B, C, dt, x, method, scale, bidirectional=False):
    """x_t = Abar x_{t-1} + Bbar u_t per mode, y = scale Re(C x), float64 loops.
    Lambda, B [H, M]; C [c, H, M]; dt [H]."""
    dtA = dt[:, None] * Lambda
    if method == "zoh":
        A_bar, B_bar = np.exp(dtA), (np.exp(dtA) - 1) / Lambda * B
    else:
        A_bar, B_bar = (1 + dtA / 2) / (1 - dtA / 2), dt[:, None] / (1 - dtA / 2) * B
    x = np.asarray(x, np.float64)
    b, t, h = x.shape
    y = np.zeros_like(x)
    state = np.zeros((b, h, Lambda.shape[-1]), complex)
    for s in range(t):
        state = A_bar * state + B_bar * x[:, s, :, None]
        y[:, s] = scale * np.sum(C[0] * state, -1).real
    if bidirectional:
        state = np.zeros((b, h, Lambda.shape[-1]), complex)
        for s in reversed(range(t - 1)):
            state = A_bar * state + B_bar * x[:, s + 1, :, None]
            y[:, s] += scale * np.sum(C[1] * state, -1).real
    return y


@pytest.mark.parametrize("bidirectional", [False, True])
def test_s4_matches_float64_recurrence(bidirectional):
    x = rand((2, 14, D))
    layer, params = init64("s4", x, d_state=N, bidirectional=bidirectional)
    p = params["params"]
    # move away from the symmetric initialisation so every parameter matters
    p = jax.tree.map(lambda a: a + 0.05 * rand(a.shape, seed=a.size), p)
    y = jax.jit(layer.apply)({"params": p}, x)
    np.testing.assert_allclose(y, s4_reference(p, x, bidirectional), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("a_init", "method"), [("lin", "zoh"), ("inv", "bilinear"), ("legs", "zoh")])
def test_s4d_matches_float64_recurrence(a_init, method):
    x = rand((2, 13, D))
    layer, params = init64("s4d", x, d_state=N, a_init=a_init, discretization=method)
    p = params["params"]
    Lambda = -np.exp(np.asarray(p["log_A_real"])) + 1j * np.asarray(p["A_imag"])
    y_ssm = diagonal_reference(Lambda, cplx(p["B"]), cplx(p["C"]), np.exp(np.asarray(p["log_dt"])), x, method, 2.0)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), s4_block(p, y_ssm, np.asarray(x)), rtol=1e-9,
                               atol=1e-10)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_dss_matches_float64_recurrence(bidirectional):
    x = rand((2, 13, D))
    layer, params = init64("dss", x, d_state=N, bidirectional=bidirectional)
    p = params["params"]
    Lambda = -np.exp(np.asarray(p["Lambda_log_neg_re"])) + 1j * np.asarray(p["Lambda_im"])
    Lambda = np.tile(Lambda, (D, 1))
    y_ssm = diagonal_reference(Lambda, np.ones_like(Lambda), cplx(p["W"]), np.exp(np.asarray(p["log_dt"])), x,
                               "zoh", 1.0, bidirectional)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), s4_block(p, y_ssm, np.asarray(x)), rtol=1e-9,
                               atol=1e-10)


def test_bidirectional_sees_the_future():
    """Bidirectional outputs depend on later inputs (causality of the default layers is
    implied by the contract's call == steps); no state or step form when bidirectional."""
    x = rand((1, 10, D), dtype=jnp.float32)
    x_changed = x.at[:, -1].add(1.0)
    for name in ("s4", "s4d", "dss"):
        layer = ssmjax.layers.get(name, d_model=D, d_state=N, bidirectional=True)
        params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
        apply = jax.jit(layer.apply)
        delta = np.abs(apply(params, x_changed)[:, :-1] - apply(params, x)[:, :-1]).max()
        assert delta > 1e-3, (name, delta)
    with pytest.raises(ValueError, match="state"):
        layer.apply(params, x, return_state=True)
    with pytest.raises(ValueError, match="state"):
        layer.apply(params, x[:, 0], layer.init_state(1), method="step")


def test_float32_layer_error_and_jit_vmap():
    """float32 S4 layer vs the same parameters in float64 at t = 128 under jit (measured
    ~2e-7 relative; the op's float32 error at long T is analysed in tests/scan/test_lti.py);
    vmap over an extra leading axis (jit of grad is part of the contract)."""
    x = rand((2, 128, D), dtype=jnp.float32)
    layer = ssmjax.layers.get("s4", d_model=D, d_state=N)
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
    layer64 = ssmjax.layers.get("s4", d_model=D, d_state=N, param_dtype=jnp.float64)
    y64 = jax.jit(layer64.apply)(jax.tree.map(lambda a: a.astype(jnp.float64), params), x.astype(jnp.float64))
    y32 = jax.jit(layer.apply)(params, x)
    err = float(jnp.abs(y32 - y64).max() / jnp.abs(y64).max())
    print(f"s4 float32 relative error at t=128: {err:.1e}")
    assert y32.dtype == jnp.float32 and err < 2e-6
    xs = jnp.stack([x[:, :16], 2 * x[:, :16]])
    ys = jax.jit(jax.vmap(lambda v: layer.apply(params, v)))(xs)
    np.testing.assert_allclose(ys[1], jax.jit(layer.apply)(params, 2 * x[:, :16]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["s4d", "h3"])
@pytest.mark.parametrize("field", ["a_init", "discretization"])
def test_a_bad_choice_names_its_argument(name, field):
    x = jnp.zeros((1, 3, D), jnp.float32)
    with pytest.raises(ValueError, match=f"^{field}: expected one of"):
        ssmjax.layers.get(name, d_model=D, **{field: "nonsense"}).init(jax.random.PRNGKey(0), x)
