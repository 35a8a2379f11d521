"""LTI state-space kernels (ssmjax.scan.lti): every kernel and op against the discretised
recurrence run step by step in float64 (values, final states, gradients), split-sequence
invariance, the step forms, float32 error, and argument checking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.layers.hippo import hippo_legs_dplr
from ssmjax.scan.linear import matrix_scan
from ssmjax.scan.lti import (
    conjugate_symmetric_matrix_power,
    bidirectional_convolution,
    diagonal_kernel,
    diagonal_ssm_convolution,
    diagonal_ssm_step,
    discretize_diagonal,
    discretize_dplr_bilinear,
    dplr_kernel,
    dplr_matrix,
    dplr_ssm_convolution,
    dplr_ssm_kernel,
    dplr_ssm_step,
    matrix_power,
    shift_kernel,
    truncated_output_matrix,
    unrolled_kernel,
    vandermonde_kernel,
    vandermonde_transpose,
)
from tests.scan.compiled import compiled

RNG = np.random.default_rng(0)
# The ops under jit in the tests of values (op by op they dispatch slowly).
dplr_conv, dplr_step = compiled(dplr_ssm_convolution), compiled(dplr_ssm_step)
diag_conv, diag_step = compiled(diagonal_ssm_convolution), compiled(diagonal_ssm_step)


def vjp_at(f, primals, cotangents):
    """``vjp(f, *primals)(cotangents)`` compiled as one ``jit``."""
    return jax.jit(lambda primals, cotangents: jax.vjp(f, *primals)[1](cotangents))(primals, cotangents)


def crandn(*shape, scale=1.0, rng=RNG):
    return scale * (rng.normal(size=shape) + 1j * rng.normal(size=shape))


def dplr_system(h=3, n=8, rank=1, perturb=0.3, rng=RNG):
    """A conjugate-symmetric DPLR system: HiPPO-LegS's half plus random perturbations,
    extended with the conjugates. Returns full ``(Lambda, P, B, C, dt)``."""
    Lambda, p, b, _ = hippo_legs_dplr(n)
    Lh = np.tile(Lambda, (h, 1)) + perturb * (0.3 * rng.normal(size=(h, n // 2)) + 5j * rng.normal(size=(h, n // 2)))
    Lh = -np.abs(Lh.real) + 1j * Lh.imag  # Re < 0; with -P P^* the whole A stays stable
    Ph = np.tile(p, (h, rank, 1)) + perturb * crandn(h, rank, n // 2, rng=rng)
    Bh = np.tile(b, (h, 1)) + perturb * crandn(h, n // 2, rng=rng)
    Ch = crandn(h, n // 2, rng=rng)

    def ext(z):
        return np.concatenate([z, z.conj()], axis=-1)

    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), size=h))
    return ext(Lh), ext(Ph), ext(Bh), ext(Ch), dt


def dense_oracle(u, A_bar, B_bar, C, x0=None):
    """x_t = Abar x_{t-1} + Bbar u_t, y_t = Re(C x_t), per channel h: python loop in float64."""
    b, t, h = u.shape
    n = B_bar.shape[-1]
    x = np.zeros((b, h, n), complex) if x0 is None else np.array(x0, complex)
    ys = np.zeros((b, t, h))
    for s in range(t):
        x = np.einsum("hnm,bhm->bhn", A_bar, x) + B_bar * u[:, s, :, None]
        ys[:, s] = np.einsum("hn,bhn->bh", C, x).real
    return ys, x


def diagonal_oracle(u, A_bar, B_bar, C, x0=None):
    """x_t = Abar * x_{t-1} + Bbar u_t, y_t = Re(sum_n C x_t) over u [b, t, *ch]."""
    shape = u.shape[:1] + u.shape[2:] + A_bar.shape[-1:]
    x = np.zeros(shape, complex) if x0 is None else np.array(x0, complex)
    ys = np.zeros(u.shape)
    for s in range(u.shape[1]):
        x = A_bar * x + B_bar * u[:, s, ..., None]
        ys[:, s] = np.sum(C * x, axis=-1).real
    return ys, x


# ------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("length", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("rank", [1, 2])
def test_s4_cauchy_kernel_equals_unrolled_recurrence(length, rank):
    Lambda, P, B, C, dt = dplr_system(rank=rank)
    A_bar, B_bar = discretize_dplr_bilinear(Lambda, P, B, dt)
    expected = unrolled_kernel(A_bar, B_bar, C, length)
    assert np.abs(np.asarray(expected).imag).max() < 1e-12  # conjugate-symmetric: real kernel
    K = dplr_ssm_kernel(Lambda, P, B, C, dt, length)
    np.testing.assert_allclose(K, expected.real, rtol=1e-10, atol=1e-12)


def test_dplr_kernel_complex_nodes_for_non_symmetric_outputs():
    """``real=False`` (all L nodes, ifft) reproduces C Abar^k Bbar for any complex C."""
    Lambda, P, B, _, dt = dplr_system()
    C = crandn(2, 3, 8)  # leading axis of outputs, not conjugate-symmetric
    A_bar, B_bar = discretize_dplr_bilinear(Lambda, P, B, dt)
    length = 11
    C_tilde = truncated_output_matrix(C, matrix_power(A_bar, length))
    K = dplr_kernel(Lambda, P, B, C_tilde, dt, length, real=False)
    np.testing.assert_allclose(K, unrolled_kernel(A_bar, B_bar, C, length), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_vandermonde_kernel_equals_unrolled_recurrence(method):
    Lambda = -np.exp(RNG.normal(size=(3, 5))) + 1j * RNG.normal(size=(3, 5)) * 5
    B, C = crandn(3, 5), crandn(3, 5)
    dt = np.exp(RNG.uniform(np.log(1e-3), np.log(1.0), size=(3, 1)))
    log_A_bar, B_bar = discretize_diagonal(Lambda, B, dt, method)
    expected = unrolled_kernel(jnp.exp(log_A_bar), B_bar, C, 20)
    np.testing.assert_allclose(vandermonde_kernel(log_A_bar, C * B_bar, 20), expected, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(diagonal_kernel(Lambda, B, C, dt, 20, method), expected, rtol=1e-11, atol=1e-13)
    # the discretisations themselves, from their definitions
    if method == "zoh":
        np.testing.assert_allclose(np.exp(log_A_bar), np.exp(dt * Lambda), rtol=1e-14)
        np.testing.assert_allclose(B_bar, (np.exp(dt * Lambda) - 1) / Lambda * B, rtol=1e-12)
    else:
        np.testing.assert_allclose(np.exp(log_A_bar), (1 + dt * Lambda / 2) / (1 - dt * Lambda / 2), rtol=1e-13)
        np.testing.assert_allclose(B_bar, dt / (1 - dt * Lambda / 2) * B, rtol=1e-13)


def test_dplr_bilinear_discretisation_definition():
    Lambda, P, B, _, dt = dplr_system(h=2)
    A_bar, B_bar = discretize_dplr_bilinear(Lambda, P, B, dt)
    for h in range(2):
        A = np.diag(Lambda[h]) - sum(np.outer(P[h, r], P[h, r].conj()) for r in range(P.shape[1]))
        np.testing.assert_allclose(dplr_matrix(Lambda, P)[h], A, atol=1e-14)
        inv = np.linalg.inv(np.eye(8) - dt[h] / 2 * A)
        np.testing.assert_allclose(A_bar[h], inv @ (np.eye(8) + dt[h] / 2 * A), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(B_bar[h], inv @ (dt[h] * B[h]), rtol=1e-12, atol=1e-13)


def test_shift_kernel_equals_unrolled_recurrence():
    B, C = RNG.normal(size=(2, 6)), RNG.normal(size=(2, 6))
    shift = np.eye(6, k=-1)  # (S x)_n = x_{n-1}
    for length in (3, 6, 10):
        np.testing.assert_allclose(shift_kernel(B, C, length), unrolled_kernel(shift, B, C, length, dense=True),
                                   atol=1e-14)
    e0 = np.eye(6)[0]
    np.testing.assert_allclose(shift_kernel(e0, C, 6), C)  # H3's B = e_0: the kernel is C


def test_matrix_power_and_vandermonde_transpose():
    A = RNG.normal(size=(2, 4, 4)) / 3
    for n in (0, 1, 5, 16):
        np.testing.assert_allclose(matrix_power(A, n), np.linalg.matrix_power(A, n), rtol=1e-12, atol=1e-14)
    Lambda, P, B, _, dt = dplr_system()
    A_bar, _ = discretize_dplr_bilinear(Lambda, P, B, dt)
    for n in (0, 1, 7, 64):
        np.testing.assert_allclose(conjugate_symmetric_matrix_power(A_bar, n), matrix_power(A_bar, n),
                                   rtol=1e-11, atol=1e-13)
    log_a = -np.exp(RNG.normal(size=(3, 4))) + 1j * RNG.normal(size=(3, 4))
    w = RNG.normal(size=(2, 3, 9))
    expected = np.einsum("hnk,bhk->bhn", np.exp(log_a[..., None] * np.arange(9)), w)
    np.testing.assert_allclose(vandermonde_transpose(log_a, w), expected, rtol=1e-12)


# ----------------------------------------------------------------------------- SSM ops
def test_dplr_ssm_convolution_equals_recurrence_with_states():
    Lambda, P, B, C, dt = dplr_system()
    A_bar, B_bar = discretize_dplr_bilinear(Lambda, P, B, dt)
    u = RNG.normal(size=(2, 13, 3))
    half = crandn(2, 3, 4)
    x0 = np.concatenate([half, half.conj()], axis=-1)
    for init in (None, x0):
        y, x_last = dplr_conv(u, Lambda, P, B, C, dt, initial_state=init)
        y_ref, x_ref = dense_oracle(u, np.asarray(A_bar), np.asarray(B_bar), C, init)
        np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(x_last, x_ref, rtol=1e-9, atol=1e-11)
    y_only, none = dplr_conv(u, Lambda, P, B, C, dt, compute_final_state=False)
    assert none is None
    np.testing.assert_allclose(y_only, dense_oracle(u, np.asarray(A_bar), np.asarray(B_bar), C)[0], atol=1e-11)


def test_dplr_ssm_split_sequence_and_steps():
    Lambda, P, B, C, dt = dplr_system()
    u = RNG.normal(size=(2, 12, 3))
    y, x_last = dplr_conv(u, Lambda, P, B, C, dt)
    y1, mid = dplr_conv(u[:, :5], Lambda, P, B, C, dt)
    y2, last = dplr_conv(u[:, 5:], Lambda, P, B, C, dt, initial_state=mid)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), y, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(last, x_last, rtol=1e-9, atol=1e-11)
    x = jnp.zeros((2, 3, 8), jnp.complex128)
    for t in range(12):
        y_t, x = dplr_step(u[:, t], Lambda, P, B, C, dt, x)
        np.testing.assert_allclose(y_t, y[:, t], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(x, x_last, rtol=1e-9, atol=1e-11)


def test_diagonal_ssm_convolution_equals_recurrence_multichannel():
    """Channels ``[H, m, m]`` sharing per-head parameters ``[H, 1, 1, N]`` (the H3 layout)."""
    h, m, n = 2, 2, 3
    Lambda = -np.exp(RNG.normal(size=(h, 1, 1, n))) + 3j * RNG.normal(size=(h, 1, 1, n))
    log_A_bar, B_bar = discretize_diagonal(Lambda, crandn(h, 1, 1, n), np.full((h, 1, 1, 1), 0.3), "bilinear")
    C = crandn(h, 1, 1, n)
    u = RNG.normal(size=(2, 10, h, m, m))
    x0 = crandn(2, h, m, m, n)
    for init in (None, x0):
        y, x_last = diag_conv(u, log_A_bar, B_bar, C, initial_state=init)
        y_ref, x_ref = diagonal_oracle(u, np.exp(log_A_bar), np.asarray(B_bar), C, init)
        np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(x_last, x_ref, rtol=1e-10, atol=1e-12)
    y1, mid = diag_conv(u[:, :4], log_A_bar, B_bar, C)
    y2, last = diag_conv(u[:, 4:], log_A_bar, B_bar, C, initial_state=mid)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), diagonal_oracle(u, np.exp(log_A_bar), B_bar, C)[0],
                               atol=1e-11)
    x = jnp.zeros((2, h, m, m, n), jnp.complex128)
    for t in range(10):
        y_t, x = diag_step(u[:, t], log_A_bar, B_bar, C, x)
    np.testing.assert_allclose(x, diagonal_oracle(u, np.exp(log_A_bar), B_bar, C)[1], atol=1e-11)


def sequential_dplr(u, Lambda, P, B, C, dt, x0):
    """A differentiable oracle: lax.scan over the dense bilinear recurrence."""
    A_bar, B_bar = discretize_dplr_bilinear(Lambda, P, B, dt)

    def step(x, u_t):
        x = jnp.einsum("hnm,bhm->bhn", A_bar, x) + B_bar * u_t[..., None]
        return x, jnp.einsum("hn,bhn->bh", C, x).real

    x_last, ys = jax.lax.scan(step, x0, jnp.swapaxes(u, 0, 1))
    return jnp.swapaxes(ys, 0, 1), x_last


def test_dplr_ssm_gradients_match_sequential_oracle():
    """All gradients (u, Lambda, P, B, C, dt, initial state) of output and final state,
    through random cotangents, against autodiff of the sequential loop. The op assumes a
    conjugate-symmetric system, so both sides are functions of the kept half of the modes
    (extended with the conjugates inside), as in the S4 layer."""
    Lambda, P, B, C, dt = dplr_system(h=2)
    u = RNG.normal(size=(2, 9, 2))
    halves = [a[..., :4] for a in (Lambda, P, B, C)] + [crandn(2, 2, 4)]
    args = tuple(jnp.asarray(a) for a in [u, *halves, dt])

    def extended(fn):
        def f(u, Lambda, P, B, C, x0, dt):
            ext = [jnp.concatenate([a, jnp.conj(a)], -1) for a in (Lambda, P, B, C, x0)]
            return fn(u, *ext[:4], dt, ext[4])

        return f

    def fast(u, Lambda, P, B, C, dt, x0):
        return dplr_ssm_convolution(u, Lambda, P, B, C, dt, initial_state=x0)

    out, ref_out = jax.jit(lambda args: (extended(fast)(*args), extended(sequential_dplr)(*args)))(args)
    np.testing.assert_allclose(out[0], ref_out[0], rtol=1e-9, atol=1e-11)
    cot = (RNG.normal(size=out[0].shape), crandn(*out[1].shape))
    for g, r in zip(vjp_at(extended(fast), args, cot), vjp_at(extended(sequential_dplr), args, cot), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-10)


def test_diagonal_ssm_gradients_match_sequential_oracle():
    Lambda = -np.exp(RNG.normal(size=(3, 4))) + 2j * RNG.normal(size=(3, 4))
    log_A_bar, B_bar = discretize_diagonal(Lambda, crandn(3, 4), np.full((3, 1), 0.2), "zoh")
    u, C, x0 = RNG.normal(size=(2, 8, 3)), crandn(3, 4), crandn(2, 3, 4)
    args = tuple(jnp.asarray(a) for a in (u, log_A_bar, B_bar, C, x0))

    def fast(u, log_a, b, c, x0):
        return diagonal_ssm_convolution(u, log_a, b, c, initial_state=x0)

    def oracle(u, log_a, b, c, x0):
        def step(x, u_t):
            x = jnp.exp(log_a) * x + b * u_t[..., None]
            return x, jnp.sum(c * x, -1).real

        x_last, ys = jax.lax.scan(step, x0, jnp.swapaxes(u, 0, 1))
        return jnp.swapaxes(ys, 0, 1), x_last

    out = jax.eval_shape(fast, *args)
    cot = (RNG.normal(size=out[0].shape), crandn(*out[1].shape))
    for g, r in zip(vjp_at(fast, args, cot), vjp_at(oracle, args, cot), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-11)


def test_bidirectional_convolution_definition():
    u, kf, kb = RNG.normal(size=(2, 7, 3)), RNG.normal(size=(7, 3)), RNG.normal(size=(7, 3))
    expected = np.zeros_like(u)
    for t in range(7):
        for s in range(7):
            expected[:, t] += (kf[t - s] if s <= t else kb[s - t - 1]) * u[:, s]
    np.testing.assert_allclose(bidirectional_convolution(u, kf, kb), expected, atol=1e-12)


def test_float32_error_of_the_s4_kernel_algorithm():
    """float32 vs float64 at t = 1024 with the HiPPO-LegS init, dt in [1e-3, 1e-1].

    The float32 error is set by the problem, not the algorithm: at dt = 1e-3 the entries of
    Abar are 1 - O(dt) and their rounding (~1e-7) accumulates over the 1024 steps, so even
    the float32 *sequential* recurrence is off by ~1e-5 relative there (measured: outputs
    ~8e-6, final state ~2e-5..7e-5; the Cauchy algorithm ~3e-5 and ~6e-5). We require the
    FFT/Cauchy op to stay within 8x the float32 sequential error (+1e-6 floor) and below
    3e-4 overall; an algorithmic error would be O(1)."""
    rng = np.random.default_rng(1234)
    Lambda, P, B, C, _ = dplr_system(h=4, n=16, perturb=0.0, rng=rng)
    dt = np.array([1e-3, 1e-2, 3e-2, 1e-1])
    u = rng.normal(size=(2, 1024, 4))
    half = crandn(2, 4, 8, scale=0.3, rng=rng)
    x0 = np.concatenate([half, half.conj()], axis=-1)
    y64, x64 = dplr_conv(u, Lambda, P, B, C, dt, initial_state=x0)
    c64 = [jnp.asarray(a, jnp.complex64) for a in (Lambda, P, B, C, x0)]
    u32, dt32 = jnp.asarray(u, jnp.float32), jnp.asarray(dt, jnp.float32)
    y32, x32 = dplr_conv(u32, *c64[:4], dt32, initial_state=c64[4])
    assert y32.dtype == jnp.float32 and x32.dtype == jnp.complex64
    A_bar, B_bar = discretize_dplr_bilinear(*c64[:3], dt32)
    xs, x_seq = compiled(matrix_scan)(A_bar, B_bar * u32[..., None], initial_state=c64[4], method="sequential")
    y_seq = jnp.einsum("hn,bthn->bth", c64[3], xs).real

    def rel(a, ref):
        return np.abs(np.asarray(a).astype(ref.dtype) - ref).max() / np.abs(ref).max()

    errors = dict(y=rel(y32, y64), x=rel(x32, x64), y_seq=rel(y_seq, y64), x_seq=rel(x_seq, x64))
    print("float32 relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert errors["y"] < 8 * errors["y_seq"] + 1e-6 and errors["y"] < 3e-4
    assert errors["x"] < 8 * errors["x_seq"] + 1e-6 and errors["x"] < 3e-4


def test_jit_vmap():
    Lambda, P, B, C, dt = dplr_system(h=2)
    u = RNG.normal(size=(3, 2, 6, 2))
    f = jax.jit(jax.vmap(lambda v: dplr_ssm_convolution(v, Lambda, P, B, C, dt)[0]))
    np.testing.assert_allclose(f(u)[1], dplr_conv(u[1], Lambda, P, B, C, dt)[0], atol=1e-12)


def test_bad_arguments_raise_value_errors():
    Lambda, P, B, C, dt = dplr_system(h=2)
    u = RNG.normal(size=(2, 5, 2))
    with pytest.raises(ValueError, match="u"):
        dplr_ssm_convolution(u[0], Lambda, P, B, C, dt)
    with pytest.raises(ValueError, match="C"):
        dplr_ssm_convolution(u, Lambda, P, B, C[:, :4], dt)
    with pytest.raises(ValueError, match="initial_state"):
        dplr_ssm_convolution(u, Lambda, P, B, C, dt, initial_state=np.zeros((2, 2, 4), complex))
    with pytest.raises(ValueError, match="u"):
        dplr_ssm_convolution(np.ones((2, 5, 2), np.int32), Lambda, P, B, C, dt)
    with pytest.raises(ValueError, match="method"):
        discretize_diagonal(Lambda, B, 0.1, "euler")
    with pytest.raises(ValueError, match="length"):
        vandermonde_kernel(Lambda, B, 0)
    with pytest.raises(ValueError, match="log_A_bar, B_bar, C"):
        diagonal_ssm_convolution(u, Lambda[:, :3], B[:, :3], C)
    with pytest.raises(ValueError, match="P"):
        dplr_kernel(Lambda, P[:, :, :4], B, C, dt, 5)
    with pytest.raises(ValueError, match="A"):
        matrix_power(np.ones((2, 3)), 2)
