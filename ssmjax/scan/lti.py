"""Linear time-invariant (LTI) state-space models: discretisation and convolution kernels.

A continuous SSM ``x'(t) = A x(t) + B u(t)``, ``y(t) = C x(t)`` sampled with step ``dt``
becomes the recurrence::

    x_k = Abar x_{k-1} + Bbar u_k,      y_k = C x_k,          k = 0, 1, ...

whose zero-state output is the causal convolution ``y = K * u`` with the kernel::

    K_k = C Abar^k Bbar,                k = 0 .. L - 1.

Discretisations (Gu, Goel and Re, 2022, "Efficiently Modeling Long Sequences with
Structured State Spaces" (S4), eq. 3; Gu, Gupta, Goel and Re, 2022, "On the
Parameterization and Initialization of Diagonal State Space Models" (S4D), Sec. 3):

* zero-order hold (ZOH): ``Abar = exp(dt A)``, ``Bbar = A^{-1} (Abar - I) B``;
* bilinear: ``Abar = (I - dt/2 A)^{-1} (I + dt/2 A)``, ``Bbar = (I - dt/2 A)^{-1} dt B``.

Kernels computed here (all of them pure functions, complex-valued; a layer takes the real
part):

* :func:`vandermonde_kernel` for a diagonal ``A = diag(Lambda)`` (S4D, DSS, S5, H3, GSS):
  ``K_k = sum_n c_n Abar_n^k`` is a Vandermonde matrix-vector product (S4D, eq. 5), with
  ``Abar_n^k = exp(k log Abar_n)``; :func:`vandermonde_transpose` is the transposed
  product ``sum_k Abar_n^k w_k`` that carries a whole sequence into a final state.
* :func:`dplr_kernel` for a diagonal-plus-low-rank ``A = Lambda - P P^*`` with the
  bilinear discretisation (S4, Algorithm 1): the truncated generating function
  ``Khat(z) = sum_{k<L} Ctilde Abar^k Bbar z^k = Ctilde (I - Abar z)^{-1} Bbar`` evaluated at
  the roots of unity ``z_j = exp(-2 pi i j / L)`` (``Ctilde = C (I - Abar^L)`` absorbs the
  truncation, :func:`truncated_output_matrix`), the resolvent of the DPLR matrix reduced
  to Cauchy kernels ``sum_n v_n / (g_j - (1 + z_j) lambda_n)`` by the Woodbury identity,
  and an inverse FFT.
* :func:`shift_kernel` for the shift SSM of H3 (``A`` the down-shift matrix).
* :func:`diagonal_ssm_convolution` / :func:`dplr_ssm_convolution`: the whole SSM over a
  sequence (kernel, FFT convolution, zero-input response of an initial state, final state
  in parallel), with their one-token forms :func:`diagonal_ssm_step` /
  :func:`dplr_ssm_step`.
* :func:`unrolled_kernel`: the oracle -- ``K_k = C Abar^k Bbar`` by running the
  discretised recurrence step by step (``lax.scan``), dense or diagonal ``Abar``.

Shapes: a trailing state axis ``N`` (``[..., N]``); leading axes broadcast (heads,
channels, batch). Low-rank factors are ``P [..., R, N]``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Inexact

from ssmjax.scan._checks import check_floating, check_method, check_ndim
from ssmjax.scan.conv import fft_causal_convolution
from ssmjax.scan.linear import linear_scan, matrix_scan

DISCRETISATIONS = ("zoh", "bilinear")


def _complex_dtype(*arrays) -> jnp.dtype:
    """complex64 for float32 inputs, complex128 for float64 ones."""
    return jnp.result_type(jnp.complex64, *[a.dtype for a in arrays])


def _check_length(length: int) -> int:
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length: expected a positive int, got {length!r}")
    return length


def _check_state_axis(name: str, x: Array, n: int, layout: str) -> None:
    if x.ndim < 1 or x.shape[-1] != n:
        raise ValueError(f"{name}: expected shape {layout} with N = {n}, got {tuple(x.shape)}")


# ----------------------------------------------------------------------- discretisation
def discretize_diagonal(
    Lambda: ArrayLike, B: ArrayLike, dt: ArrayLike, method: str = "zoh"
) -> tuple[Array, Array]:
    """Discretise a diagonal SSM ``x' = diag(Lambda) x + B u``.

    Args:
      Lambda: eigenvalues ``[..., N]`` (complex; real part < 0 for stability).
      B: input vector ``[..., N]`` (broadcastable against ``Lambda``).
      dt: step sizes broadcastable against ``Lambda`` (e.g. ``[H, 1]`` per head or
        ``[..., N]`` per state).
      method: ``"zoh"`` (``Abar = exp(dt Lambda)``, ``Bbar = (Abar - 1) / Lambda B``) or
        ``"bilinear"`` (``Abar = (1 + dt Lambda / 2) / (1 - dt Lambda / 2)``,
        ``Bbar = dt / (1 - dt Lambda / 2) B``).

    Returns:
      ``(log_Abar, Bbar)``: ``log Abar`` (exactly ``dt Lambda`` for ZOH, the principal
      logarithm for bilinear; ``Abar^k = exp(k log Abar)`` for integer ``k`` either way)
      and ``Bbar``, both complex.
    """
    check_method(method, DISCRETISATIONS)
    Lambda, B, dt = jnp.asarray(Lambda), jnp.asarray(B), jnp.asarray(dt)
    for name, x in (("Lambda", Lambda), ("B", B), ("dt", dt)):
        check_floating(name, x)
    ctype = _complex_dtype(Lambda, B, dt)
    return _discretize_diagonal(Lambda.astype(ctype), B.astype(ctype), dt.astype(ctype), method)


def _discretize_diagonal(
    Lambda: Inexact[Array, "*a"], B: Inexact[Array, "*b"], dt: Inexact[Array, "*c"], method: str
) -> tuple[Inexact[Array, "*d"], Inexact[Array, "*e"]]:
    dtA = dt * Lambda
    if method == "zoh":
        return dtA, jnp.expm1(dtA) / Lambda * B
    half = dtA / 2
    return jnp.log((1 + half) / (1 - half)), dt / (1 - half) * B


def dplr_matrix(Lambda: ArrayLike, P: ArrayLike) -> Array:
    """Dense ``A = diag(Lambda) - sum_r P_r P_r^*`` ``[..., N, N]`` from ``Lambda [..., N]``
    and the low-rank factor ``P [..., R, N]`` (S4's DPLR parameterisation, ``Q = P``)."""
    Lambda, P = jnp.asarray(Lambda), jnp.asarray(P)
    check_ndim("P", P, range(2, 64), "[..., R, N]")
    _check_state_axis("P", P, Lambda.shape[-1], "[..., R, N]")
    return _dplr_matrix(Lambda, P)


def _dplr_matrix(
    Lambda: Inexact[Array, "*h n"], P: Inexact[Array, "*h r n"]
) -> Inexact[Array, "*h n n"]:
    low_rank = jnp.einsum("...rn,...rm->...nm", P, jnp.conj(P))
    return Lambda[..., :, None] * jnp.eye(Lambda.shape[-1], dtype=Lambda.dtype) - low_rank


def discretize_dplr_bilinear(
    Lambda: ArrayLike, P: ArrayLike, B: ArrayLike, dt: ArrayLike
) -> tuple[Array, Array]:
    """Bilinear discretisation of ``A = diag(Lambda) - P P^*`` (S4, eq. 3), densely:
    ``Abar = (I - dt/2 A)^{-1} (I + dt/2 A)``, ``Bbar = (I - dt/2 A)^{-1} dt B``.

    Args:
      Lambda: ``[..., N]``; P: ``[..., R, N]``; B: ``[..., N]``; dt: ``[...]`` (one step
      per system, e.g. per head).

    Returns:
      ``(Abar [..., N, N], Bbar [..., N])`` complex.
    """
    Lambda, P, B, dt = (jnp.asarray(a) for a in (Lambda, P, B, dt))
    n = Lambda.shape[-1]
    _check_state_axis("B", B, n, "[..., N]")
    check_ndim("P", P, range(2, 64), "[..., R, N]")
    _check_state_axis("P", P, n, "[..., R, N]")
    ctype = _complex_dtype(Lambda, P, B, dt)
    return _discretize_dplr_bilinear(*(a.astype(ctype) for a in (Lambda, P, B, dt)))


def _small_inverse(M: Inexact[Array, "*b r r"]) -> Inexact[Array, "*b r r"]:
    """Inverse of a batch of ``R x R`` matrices (a division for ``R = 1``, the S4 case)."""
    if M.shape[-1] == 1:
        return 1 / M
    return jnp.linalg.inv(M)


def _discretize_dplr_bilinear(
    Lambda: Inexact[Array, "*h n"],
    P: Inexact[Array, "*h r n"],
    B: Inexact[Array, "*h n"],
    dt: Inexact[Array, "*h"],
) -> tuple[Inexact[Array, "*h n n"], Inexact[Array, "*h n"]]:
    # M = I - dt/2 A = diag(d) + (dt/2) P P^*, d = 1 - dt Lambda / 2; by Woodbury
    # M^{-1} = diag(1/d) - (dt/2) (P/d)^T W (P^*/d), W = (I_R + (dt/2) P^* diag(1/d) P)^{-1},
    # and since I + dt/2 A = 2 I - M:  Abar = 2 M^{-1} - I,  Bbar = dt M^{-1} B.
    half = (dt / 2)[..., None]
    d_inv = 1 / (1 - half * Lambda)
    P_scaled = P * d_inv[..., None, :]  # [..., R, N]
    Q_scaled = jnp.conj(P) * d_inv[..., None, :]
    W = _small_inverse(
        jnp.eye(P.shape[-2], dtype=P.dtype) + half[..., None] * jnp.einsum("...rn,...sn->...rs", jnp.conj(P), P_scaled)
    )
    low_rank = half[..., None] * jnp.einsum("...rn,...rs,...sm->...nm", P_scaled, W, Q_scaled)
    eye = jnp.eye(Lambda.shape[-1], dtype=Lambda.dtype)
    M_inv = d_inv[..., :, None] * eye - low_rank
    return 2 * M_inv - eye, dt[..., None] * jnp.einsum("...nm,...m->...n", M_inv, B)


def matrix_power(A: ArrayLike, n: int) -> Array:
    """``A^n`` ``[..., N, N]`` for a static ``n >= 0`` by repeated squaring
    (``~2 log2 n`` matrix products)."""
    A = jnp.asarray(A)
    check_ndim("A", A, range(2, 64), "[..., N, N]")
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A: expected square matrices [..., N, N], got {tuple(A.shape)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    result, power = None, A
    while n:
        if n & 1:
            result = power if result is None else power @ result
        n >>= 1
        if n:
            power = power @ power
    return jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape) if result is None else result


def conjugate_symmetric_matrix_power(A: ArrayLike, n: int) -> Array:
    """``A^n`` for ``A [..., N, N]`` that maps conjugate-symmetric vectors ``[x; conj(x)]`` to
    conjugate-symmetric vectors (``A_22 = conj(A_11)``, ``A_21 = conj(A_12)`` in ``N/2``
    blocks; e.g. the discretised S4 matrix of a conjugate-extended system), in real
    arithmetic: on ``r = [Re x; Im x]`` it acts as the real matrix
    ``[[Re S, -Im Dm], [Im S, Re Dm]]`` with ``S = A_11 + A_12``, ``Dm = A_11 - A_12``; its
    power (:func:`matrix_power`, ~4x cheaper than complex) is mapped back blockwise."""
    A = jnp.asarray(A)
    check_ndim("A", A, range(2, 64), "[..., N, N]")
    size = A.shape[-1]
    if A.shape[-2] != size or size % 2:
        raise ValueError(f"A: expected square matrices [..., N, N] with N even, got {tuple(A.shape)}")
    h = size // 2
    A11, A12 = A[..., :h, :h], A[..., :h, h:]
    S, Dm = A11 + A12, A11 - A12
    real = jnp.concatenate(
        [jnp.concatenate([S.real, -Dm.imag], axis=-1), jnp.concatenate([S.imag, Dm.real], axis=-1)], axis=-2
    )
    R = matrix_power(real, n)
    S_n = jax.lax.complex(R[..., :h, :h], R[..., h:, :h])
    Dm_n = jax.lax.complex(R[..., h:, h:], -R[..., :h, h:])
    B11, B12 = (S_n + Dm_n) / 2, (S_n - Dm_n) / 2
    return jnp.concatenate(
        [jnp.concatenate([B11, B12], axis=-1), jnp.concatenate([jnp.conj(B12), jnp.conj(B11)], axis=-1)], axis=-2
    )


def truncated_output_matrix(C: ArrayLike, A_bar_power: ArrayLike) -> Array:
    """``Ctilde = C (I - Abar^L)`` ``[..., N]`` from ``C [..., N]`` and ``Abar^L [..., N, N]``:
    the output vector for which the generating function at the ``L``-th roots of unity is
    exactly the DFT of the length-``L`` kernel (S4, Lemma C.2)."""
    C, A_bar_power = jnp.asarray(C), jnp.asarray(A_bar_power)
    _check_state_axis("C", C, A_bar_power.shape[-1], "[..., N]")
    return C - jnp.einsum("...n,...nm->...m", C, A_bar_power)


def bilinear_state_as_input(x0: ArrayLike, Lambda: ArrayLike, P: ArrayLike, dt: ArrayLike) -> Array:
    """The input vector ``B0`` whose bilinear discretisation is ``Abar x0``:
    ``(I - dt/2 A)^{-1} dt B0 = Abar x0`` for ``B0 = x0 / dt + A x0 / 2``.

    With it the zero-input response ``y_k = C Abar^{k+1} x0`` of an initial state is the
    kernel of the SSM ``(A, B0, C)`` and goes through the same Cauchy-kernel algorithm as
    the main kernel (as in the S4 reference implementation). ``x0 [..., N]``,
    ``Lambda [H, N]``, ``P [H, R, N]``, ``dt [H]`` with ``x0``'s trailing axes ``[H, N]``.
    """
    x0, Lambda, P, dt = (jnp.asarray(a) for a in (x0, Lambda, P, dt))
    Ax0 = Lambda * x0 - jnp.einsum("hrn,...hm,hrm->...hn", P, x0, jnp.conj(P))
    return x0 / dt[:, None] + Ax0 / 2


# ----------------------------------------------------------------------------- kernels
def vandermonde_matrix(log_A_bar: ArrayLike, length: int) -> Array:
    """``V [..., N, L]`` with ``V_nk = exp(k log Abar_n)`` (``Abar_n^k``); the kernels below
    never form it (:func:`vandermonde_kernel`)."""
    log_A_bar = jnp.asarray(log_A_bar)
    check_floating("log_A_bar", log_A_bar)
    _check_length(length)
    return jnp.exp(log_A_bar[..., None] * jnp.arange(length, dtype=jnp.finfo(log_A_bar.dtype).dtype))


def _power_tables(log_A_bar: Array, length: int) -> tuple[Array, Array, int]:
    """``Abar^k`` for ``k = s j + i`` as ``fine [..., N, s]`` (``Abar^i``) and
    ``coarse [..., N, blocks]`` (``Abar^{s j}``) with ``s ~ sqrt(L)``."""
    real = jnp.finfo(log_A_bar.dtype).dtype
    step = math.isqrt(length - 1) + 1
    blocks = -(-length // step)
    fine = jnp.exp(log_A_bar[..., None] * jnp.arange(step, dtype=real))
    coarse = jnp.exp(log_A_bar[..., None] * (step * jnp.arange(blocks, dtype=real)))
    return fine, coarse, step


@functools.partial(jax.jit, static_argnames=("length",))
def vandermonde_kernel(log_A_bar: ArrayLike, coeffs: ArrayLike, length: int) -> Array:
    """``K_k = sum_n coeffs_n Abar_n^k`` ``[..., L]`` (complex), for ``k = 0 .. L-1``.

    The diagonal SSM kernel with ``coeffs = C * Bbar`` (S4D, eq. 5); with
    ``coeffs = C * Abar * x0`` it is the zero-input response ``C Abar^{k+1} x0`` of an
    initial state. ``log_A_bar [..., N]`` and ``coeffs [..., N]`` broadcast against each
    other (e.g. ``[H, N]`` and ``[batch, H, N]``).

    The ``[..., N, L]`` Vandermonde matrix is never formed: with ``k = s j + i``
    (``s ~ sqrt(L)``), ``K_{sj+i} = sum_n (coeffs_n Abar_n^{sj}) Abar_n^i`` is a matrix
    product ``[blocks, N] @ [N, s]``, and only ``~2 sqrt(L)`` powers per mode are
    exponentiated.
    """
    log_A_bar, coeffs = jnp.asarray(log_A_bar), jnp.asarray(coeffs)
    check_floating("log_A_bar", log_A_bar)
    check_floating("coeffs", coeffs)
    _check_state_axis("coeffs", coeffs, log_A_bar.shape[-1], "[..., N] (N of log_A_bar)")
    _check_length(length)
    ctype = _complex_dtype(log_A_bar, coeffs)
    fine, coarse, _ = _power_tables(log_A_bar.astype(ctype), length)
    weighted = coeffs.astype(ctype)[..., :, None] * coarse  # [..., N, blocks]
    K = jnp.matmul(jnp.swapaxes(weighted, -1, -2), fine)  # [..., blocks, s]
    return K.reshape(K.shape[:-2] + (-1,))[..., :length]


def vandermonde_transpose(log_A_bar: ArrayLike, w: ArrayLike) -> Array:
    """``s_n = sum_k Abar_n^k w_k`` ``[..., N]`` for ``w [..., L]``.

    With ``w_k = u_{T-1-k}`` this is ``sum_s Abar^{T-1-s} u_s``: the state a diagonal SSM
    reaches after a whole sequence (times ``Bbar``), computed in parallel -- as
    ``sum_j Abar^{sj} (sum_i Abar^i w_{sj+i})``, a matrix product per block (no
    ``[..., N, L]`` tensor).
    """
    log_A_bar, w = jnp.asarray(log_A_bar), jnp.asarray(w)
    check_floating("log_A_bar", log_A_bar)
    check_floating("w", w)
    check_ndim("w", w, range(1, 64), "[..., L]")
    length = _check_length(w.shape[-1])
    ctype = _complex_dtype(log_A_bar, w)
    fine, coarse, step = _power_tables(log_A_bar.astype(ctype), length)
    blocks = coarse.shape[-1]
    w = jnp.pad(w.astype(ctype), [(0, 0)] * (w.ndim - 1) + [(0, blocks * step - length)])
    w = w.reshape(w.shape[:-1] + (blocks, step))  # [..., blocks, s]
    inner = jnp.matmul(fine, jnp.swapaxes(w, -1, -2))  # [..., N, blocks]
    return jnp.sum(coarse * inner, axis=-1)


@functools.partial(jax.jit, static_argnames=("length", "method"))
def diagonal_kernel(
    Lambda: ArrayLike, B: ArrayLike, C: ArrayLike, dt: ArrayLike, length: int, method: str = "zoh"
) -> Array:
    """Kernel ``K_k = sum_n C_n Bbar_n Abar_n^k`` ``[..., L]`` (complex) of the diagonal SSM
    ``(diag(Lambda), B, C)`` discretised with ``method`` (:func:`discretize_diagonal`).
    A real SSM stored as one half of its conjugate pairs has the kernel ``2 Re K``."""
    log_A_bar, B_bar = discretize_diagonal(Lambda, B, dt, method)
    C = jnp.asarray(C)
    return vandermonde_kernel(log_A_bar, C * B_bar, length)


def _roots_of_unity(length: int, count: int, ctype) -> Array:
    j = jnp.arange(count, dtype=jnp.finfo(ctype).dtype)
    return jnp.exp(-2j * math.pi * j / length).astype(ctype)


@functools.partial(jax.jit, static_argnames=("length", "real"))
def dplr_kernel(
    Lambda: ArrayLike,
    P: ArrayLike,
    B: ArrayLike,
    C_tilde: ArrayLike,
    dt: ArrayLike,
    length: int,
    *,
    real: bool = True,
) -> Array:
    """S4 convolution kernel of the bilinear-discretised DPLR SSM ``A = diag(Lambda) - P P^*``
    through its truncated generating function and Cauchy kernels (S4, Algorithm 1).

    For ``z`` an ``L``-th root of unity, the truncated generating function is
    ``Khat(z) = sum_{k<L} Ctilde Abar^k Bbar z^k = Ctilde (I - Abar z)^{-1} Bbar`` and for
    the bilinear ``(Abar, Bbar)``::

        Khat(z) = 2 Ctilde [g(z) I - (1 + z) A]^{-1} B,        g(z) = (2 / dt) (1 - z).

    With ``D(z) = diag(1 / (g(z) - (1 + z) lambda_n))`` (a Cauchy kernel) the Woodbury
    identity gives ``Khat = 2 [k_CB - (1 + z) k_CP (I + (1 + z) k_PP)^{-1} k_PB]`` with
    ``k_XY = sum_n X_n Y_n D_n(z)`` over the rows ``{Ctilde, conj(P)}`` and columns
    ``{B, P}``. (Multiplying the resolvent through by ``1 + z`` keeps the node ``z = -1``
    finite.) ``K = IFFT(Khat)``.

    Args:
      Lambda: ``[H, N]``; P: ``[H, R, N]``; dt: ``[H]``.
      B: ``[..., H, N]``; C_tilde: ``[..., H, N]`` = ``C (I - Abar^L)``
        (:func:`truncated_output_matrix`); their leading axes broadcast.
      length: ``L``.
      real: the system is conjugate-symmetric (the last ``N/2`` entries of ``Lambda, P, B,
        C_tilde`` are the conjugates of the first ``N/2``), so ``K`` is real: evaluate
        ``L // 2 + 1`` nodes, sum each mode with its conjugate in one fraction (half the
        Cauchy kernel), and use ``irfft``. Otherwise all ``L`` nodes, all ``N`` modes, ``ifft``.

    Returns:
      ``K [..., H, L]``: real if ``real`` else complex.
    """
    Lambda, P, B, C_tilde, dt = (jnp.asarray(a) for a in (Lambda, P, B, C_tilde, dt))
    check_ndim("Lambda", Lambda, 2, "[H, N]")
    h, n = Lambda.shape
    check_ndim("P", P, 3, "[H, R, N]")
    if P.shape[0] != h or P.shape[2] != n:
        raise ValueError(f"P: expected shape [H, R, N] = [{h}, R, {n}], got {tuple(P.shape)}")
    if dt.shape != (h,):
        raise ValueError(f"dt: expected shape [H] = ({h},), got {tuple(dt.shape)}")
    for name, x in (("B", B), ("C_tilde", C_tilde)):
        check_floating(name, x)
        if x.ndim < 2 or x.shape[-2:] != (h, n):
            raise ValueError(f"{name}: expected shape [..., H, N] = [..., {h}, {n}], got {tuple(x.shape)}")
    _check_length(length)
    ctype = _complex_dtype(Lambda, P, B, C_tilde, dt)
    Lambda, P, B, C_tilde = (a.astype(ctype) for a in (Lambda, P, B, C_tilde))
    return _dplr_kernel(Lambda, P, B, C_tilde, dt.astype(ctype), length, real)


def _dplr_kernel(
    Lambda: Inexact[Array, "h n"],
    P: Inexact[Array, "h r n"],
    B: Inexact[Array, "*b h n"],
    C_tilde: Inexact[Array, "*c h n"],
    dt: Inexact[Array, " h"],
    length: int,
    real: bool,
) -> Inexact[Array, "*k h l"]:
    nodes = length // 2 + 1 if real else length
    z = _roots_of_unity(length, nodes, Lambda.dtype)  # [J]
    a, b = (2 / dt)[:, None] * (1 - z), 1 + z  # [H, J], [J]
    rank = P.shape[1]
    lead = jnp.broadcast_shapes(B.shape[:-2], C_tilde.shape[:-2])
    B = jnp.broadcast_to(B, lead + B.shape[-2:])[..., None, :, :]
    C_tilde = jnp.broadcast_to(C_tilde, lead + C_tilde.shape[-2:])[..., None, :, :]
    P_rows = jnp.swapaxes(P, 0, 1)  # [R, H, N]
    Q_rows = jnp.conj(P_rows)
    PP = (Q_rows[:, None] * P_rows[None]).reshape((rank * rank,) + P_rows.shape[1:])
    # All numerators x_n y_n of the Woodbury terms, stacked: [..., K, H, N], K = 1 + 2R + R^2
    # rows CB, CP_r, PB_r, PP_rs, so that one matmul (and one in the backward pass) does them.
    numerators = jnp.concatenate(
        [C_tilde * B, C_tilde * P_rows, Q_rows * B, jnp.broadcast_to(PP, lead + PP.shape)], axis=-3
    )
    if real:
        # Conjugate pairs: v / (a - b lam) + conj(v) / (a - b conj(lam))
        #   = (2 a Re(v) - 2 b Re(v conj(lam))) / (a^2 - 2 a b Re(lam) + b^2 |lam|^2),
        # so only the first N/2 modes and one division per pair are needed.
        half = Lambda.shape[-1] // 2
        lam = Lambda[:, :half]
        inverse = 1 / (
            (a**2)[:, None, :] - 2 * (a * b)[:, None, :] * lam.real[..., None] + b**2 * (jnp.abs(lam) ** 2)[..., None]
        )  # [H, N/2, J]
        v = numerators[..., :half]
        real_parts = jnp.concatenate([v.real, (v * jnp.conj(lam)).real], axis=-3)  # [..., 2K, H, N/2]
        projected = jax.lax.complex(
            jnp.einsum("...khn,hnj->...khj", real_parts, inverse.real),
            jnp.einsum("...khn,hnj->...khj", real_parts, inverse.imag),
        )
        count = numerators.shape[-3]
        sums = 2 * a * projected[..., :count, :, :] - 2 * b * projected[..., count:, :, :]
    else:
        cauchy = 1 / (a[:, None, :] - b * Lambda[:, :, None])  # [H, N, J]
        sums = jnp.einsum("...khn,hnj->...khj", numerators, cauchy)
    k_CB = sums[..., 0, :, :]
    k_CP, k_PB = sums[..., 1 : 1 + rank, :, :], sums[..., 1 + rank : 1 + 2 * rank, :, :]
    k_PP = sums[..., 1 + 2 * rank :, :, :].reshape(lead + (rank, rank) + sums.shape[-2:])
    k_PP = jnp.moveaxis(k_PP, (-4, -3), (-2, -1))  # [..., H, J, R, R]
    woodbury = _small_inverse(jnp.eye(rank, dtype=k_PP.dtype) + b[:, None, None] * k_PP)
    correction = jnp.einsum("...rhj,...hjrs,...shj->...hj", k_CP, woodbury, k_PB)
    k_hat = 2 * (k_CB - b * correction)
    if real:
        return jnp.fft.irfft(k_hat, n=length, axis=-1)
    return jnp.fft.ifft(k_hat, axis=-1)


def shift_kernel(B: ArrayLike, C: ArrayLike, length: int) -> Array:
    """Kernel of the shift SSM (H3): ``x_k = S x_{k-1} + B u_k`` with ``S`` the down-shift
    (``(S x)_n = x_{n-1}``, ``(S x)_0 = 0``), ``y_k = C x_k``:
    ``K_k = C S^k B = sum_{n >= k} C_n B_{n-k}`` (zero for ``k >= N``). ``B, C [..., N]``;
    returns ``[..., L]``. With ``B = e_0`` (H3's choice) ``K_k = C_k``."""
    B, C = jnp.asarray(B), jnp.asarray(C)
    n = B.shape[-1]
    _check_state_axis("C", C, n, "[..., N]")
    _check_length(length)
    taps = [jnp.sum(C[..., k:] * B[..., : n - k], axis=-1) for k in range(min(n, length))]
    K = jnp.stack(taps, axis=-1)
    if length > n:
        K = jnp.concatenate([K, jnp.zeros(K.shape[:-1] + (length - n,), K.dtype)], axis=-1)
    return K


def unrolled_kernel(
    A_bar: ArrayLike, B_bar: ArrayLike, C: ArrayLike, length: int, *, dense: bool | None = None
) -> Array:
    """Oracle: ``K_k = C Abar^k Bbar`` ``[..., L]`` by running ``x_0 = Bbar``,
    ``x_k = Abar x_{k-1}`` step by step (``lax.scan``), for a dense ``Abar [..., N, N]`` or
    a diagonal one ``[..., N]`` (``dense=None`` infers it: dense when ``Abar`` has one more
    axis than ``B_bar [..., N]``)."""
    A_bar, B_bar, C = jnp.asarray(A_bar), jnp.asarray(B_bar), jnp.asarray(C)
    _check_length(length)
    if dense is None:
        dense = A_bar.ndim == B_bar.ndim + 1
    dtype = jnp.result_type(A_bar, B_bar, C)
    state_shape = jnp.broadcast_shapes(B_bar.shape, A_bar.shape[:-1] if dense else A_bar.shape)
    x0 = jnp.broadcast_to(B_bar, state_shape).astype(dtype)

    def step(x, _):
        y = jnp.sum(C * x, axis=-1)
        x = jnp.einsum("...nm,...m->...n", A_bar, x) if dense else A_bar * x
        return x, y

    _, ys = jax.lax.scan(step, x0, None, length=length)
    return jnp.moveaxis(ys, 0, -1)


# ------------------------------------------------------------------------ convolutions
def bidirectional_convolution(u: ArrayLike, kernel_forward: ArrayLike, kernel_backward: ArrayLike) -> Array:
    """Non-causal convolution of S4's bidirectional layer:
    ``y_t = sum_{s <= t} kf[t - s] u_s + sum_{s > t} kb[s - t - 1] u_s``.

    ``u [batch, time, channels]``, kernels ``[length, channels]``. The backward half is
    the causal convolution of the time-reversed input with ``kb`` delayed by one step.
    """
    u, kb = jnp.asarray(u), jnp.asarray(kernel_backward)
    check_ndim("u", u, 3, "[batch, time, channels]")
    check_ndim("kernel_backward", kb, 2, "[length, channels]")
    delayed = jnp.concatenate([jnp.zeros_like(kb[:1]), kb[:-1]], axis=0)
    backward = jnp.flip(fft_causal_convolution(jnp.flip(u, axis=1), delayed), axis=1)
    return fft_causal_convolution(u, kernel_forward) + backward


# --------------------------------------------------------------------------- SSM ops
@functools.partial(jax.jit, static_argnames=("length",))
def dplr_ssm_kernel(
    Lambda: ArrayLike, P: ArrayLike, B: ArrayLike, C: ArrayLike, dt: ArrayLike, length: int
) -> Array:
    """The real S4 kernel ``K_k = C Abar^k Bbar`` ``[..., H, L]`` of a conjugate-symmetric DPLR
    SSM (``Lambda [H, N]``, ``P [H, R, N]``, ``B [H, N]``, ``C [..., H, N]``, ``dt [H]``;
    bilinear): discretise, ``Ctilde = C (I - Abar^L)``, :func:`dplr_kernel`.

    Conjugate-symmetric means the last ``N/2`` modes are the conjugates of the first
    ``N/2`` (``Lambda = [lam, conj(lam)]`` and likewise ``P, B, C``): the system is real and
    ``Abar^L`` is computed in real arithmetic (:func:`conjugate_symmetric_matrix_power`)."""
    A_bar, _ = discretize_dplr_bilinear(Lambda, P, B, dt)
    C_tilde = truncated_output_matrix(C, conjugate_symmetric_matrix_power(A_bar, _check_length(length)))
    return dplr_kernel(Lambda, P, B, C_tilde, dt, length, real=True)


def _check_conv_input(u: Array, initial_state, state_shape: tuple, layout: str):
    check_floating("u", u)
    if jnp.iscomplexobj(u):
        raise ValueError(f"u: expected a real floating dtype, got {u.dtype}")
    if initial_state is None:
        return None
    x0 = jnp.asarray(initial_state)
    check_floating("initial_state", x0)
    if tuple(x0.shape) != tuple(state_shape):
        raise ValueError(f"initial_state: expected shape {layout} = {tuple(state_shape)}, got {tuple(x0.shape)}")
    return x0


def _flat_channels_conv(u: Array, kernel: Array) -> Array:
    """``fft_causal_convolution`` over ``u [b, t, *ch]`` with ``kernel [*ch, t]``."""
    batch, time = u.shape[:2]
    k = jnp.broadcast_to(kernel, u.shape[2:] + (time,)).reshape(-1, time).T
    return fft_causal_convolution(u.reshape(batch, time, -1), k).reshape(u.shape)


@jax.jit
def diagonal_ssm_convolution(
    u: ArrayLike,
    log_A_bar: ArrayLike,
    B_bar: ArrayLike,
    C: ArrayLike,
    *,
    initial_state: ArrayLike | None = None,
) -> tuple[Array, Array]:
    """A discretised diagonal SSM over a whole sequence by FFT convolution::

        x_t = Abar * x_{t-1} + Bbar u_t,      y_t = Re(sum_n C_n x_{t,n})       (per channel)

    ``y = K * u + Re(C Abar^{t+1} x_{-1})`` with ``K = Re(vandermonde_kernel(log Abar,
    C Bbar))``; the final state ``x_{T-1} = Abar^T x_{-1} + Bbar sum_s Abar^{T-1-s} u_s``
    is a transposed Vandermonde product (:func:`vandermonde_transpose`), so nothing of
    size ``[batch, time, ..., N]`` is formed. A real SSM stored as one half of its
    conjugate pairs passes ``2 C``.

    Args:
      u: ``[batch, time, *channels]`` real.
      log_A_bar, B_bar, C: broadcastable to ``[*channels, N]`` (from
        :func:`discretize_diagonal`).
      initial_state: ``x_{-1}`` ``[batch, *channels, N]`` complex, or ``None`` (zeros).

    Returns:
      ``(y [batch, time, *channels], final_state [batch, *channels, N])``.
    """
    u, log_A_bar, B_bar, C = (jnp.asarray(a) for a in (u, log_A_bar, B_bar, C))
    check_ndim("u", u, range(3, 64), "[batch, time, *channels]")
    batch, time = u.shape[:2]
    n = max(a.shape[-1] if a.ndim else 1 for a in (log_A_bar, B_bar, C))
    try:
        param_shape = jnp.broadcast_shapes(log_A_bar.shape, B_bar.shape, C.shape, u.shape[2:] + (n,))
    except ValueError:
        param_shape = None
    if param_shape != u.shape[2:] + (n,):
        raise ValueError(
            "log_A_bar, B_bar, C: expected shapes broadcastable to [*channels, N] with channels "
            f"{tuple(u.shape[2:])}, got {tuple(log_A_bar.shape)}, {tuple(B_bar.shape)}, {tuple(C.shape)}"
        )
    x0 = _check_conv_input(u, initial_state, (batch,) + param_shape, "[batch, *channels, N]")
    ctype = _complex_dtype(u, log_A_bar, B_bar, C, *(() if x0 is None else (x0,)))
    rtype = jnp.finfo(ctype).dtype
    log_A_bar, B_bar, C = (a.astype(ctype) for a in (log_A_bar, B_bar, C))
    u = u.astype(jnp.promote_types(u.dtype, jnp.float32))
    return _diagonal_ssm_convolution(u, log_A_bar, B_bar, C, None if x0 is None else x0.astype(ctype), rtype)


def _diagonal_ssm_convolution(
    u: Inexact[Array, "batch time *ch"],
    log_A_bar: Inexact[Array, "*pa n"],
    B_bar: Inexact[Array, "*pb n"],
    C: Inexact[Array, "*pc n"],
    x0: Inexact[Array, "batch *ch n"] | None,
    rtype,
) -> tuple[Inexact[Array, "batch time *ch"], Inexact[Array, "batch *ch n"]]:
    time = u.shape[1]
    kernel = vandermonde_kernel(log_A_bar, C * B_bar, time).real.astype(rtype)
    y = _flat_channels_conv(u.astype(rtype), kernel)
    u_reversed = jnp.flip(jnp.moveaxis(u, 1, -1), axis=-1)  # [b, *ch, t]: u_{T-1-k}
    x_last = B_bar * vandermonde_transpose(log_A_bar, u_reversed)
    if x0 is not None:
        free = vandermonde_kernel(log_A_bar, C * jnp.exp(log_A_bar) * x0, time).real  # [b, *ch, t]
        y = y + jnp.moveaxis(free, -1, 1).astype(y.dtype)
        x_last = x_last + jnp.exp(time * log_A_bar) * x0
    return y.astype(u.dtype), jnp.broadcast_to(x_last, u.shape[:1] + u.shape[2:] + x_last.shape[-1:])


@functools.partial(jax.jit, static_argnames=("compute_final_state",))
def dplr_ssm_convolution(
    u: ArrayLike,
    Lambda: ArrayLike,
    P: ArrayLike,
    B: ArrayLike,
    C: ArrayLike,
    dt: ArrayLike,
    *,
    initial_state: ArrayLike | None = None,
    compute_final_state: bool = True,
) -> tuple[Array, Array | None]:
    """The S4 SSM (bilinear-discretised DPLR ``A = diag(Lambda) - P P^*``) over a whole
    sequence, per channel ``h``::

        x_t = Abar x_{t-1} + Bbar u_t,      y_t = Re(C x_t)

    for a conjugate-symmetric system (the last ``N/2`` modes of ``Lambda, P, B, C`` and of the
    state are the conjugates of the first ``N/2``; the output is real). ``y = K * u`` with the Cauchy
    kernel :func:`dplr_ssm_kernel`; an initial state adds ``C Abar^{t+1} x_{-1}``, the
    kernel of the input vector ``B0`` with ``Bbar0 = Abar x_{-1}``
    (:func:`bilinear_state_as_input`); the final state
    ``Abar^T x_{-1} + sum_k (Abar^k Bbar) u_{T-1-k}`` uses the "state kernel"
    ``e_n^T Abar^k Bbar`` (the same Cauchy algorithm with the rows of ``I`` as outputs) and
    ``Abar^T`` from the repeated squaring that ``Ctilde`` needs anyway.

    Args:
      u: ``[batch, time, H]`` real.
      Lambda: ``[H, N]``; P: ``[H, R, N]``; B, C: ``[H, N]``; dt: ``[H]``.
      initial_state: ``[batch, H, N]`` complex (conjugate-symmetric) or ``None``.
      compute_final_state: ``False`` skips the state kernel and returns ``None`` for it.

    Returns:
      ``(y [batch, time, H], final_state [batch, H, N] or None)``.
    """
    u, Lambda, P, B, C, dt = (jnp.asarray(a) for a in (u, Lambda, P, B, C, dt))
    check_ndim("u", u, 3, "[batch, time, H]")
    batch, time, h = u.shape
    check_ndim("Lambda", Lambda, 2, "[H, N]")
    if Lambda.shape[0] != h:
        raise ValueError(f"Lambda: expected shape [H, N] with H = {h}, got {tuple(Lambda.shape)}")
    n = Lambda.shape[1]
    for name, x in (("B", B), ("C", C)):
        if tuple(x.shape) != (h, n):
            raise ValueError(f"{name}: expected shape [H, N] = ({h}, {n}), got {tuple(x.shape)}")
    x0 = _check_conv_input(u, initial_state, (batch, h, n), "[batch, H, N]")
    ctype = _complex_dtype(u, Lambda, P, B, C, dt)
    rtype = jnp.finfo(ctype).dtype
    A_bar, B_bar = discretize_dplr_bilinear(Lambda, P, B, dt)
    A_bar_T = conjugate_symmetric_matrix_power(A_bar, time)
    C_tilde = truncated_output_matrix(C.astype(ctype), A_bar_T)
    kernel = dplr_kernel(Lambda, P, B, C_tilde, dt, time, real=True)  # [H, T]
    ur = u.astype(rtype)
    y = fft_causal_convolution(ur, kernel.T)
    if x0 is not None:
        x0 = x0.astype(ctype)
        B0 = bilinear_state_as_input(x0, Lambda.astype(ctype), P.astype(ctype), dt.astype(ctype))
        y = y + jnp.swapaxes(dplr_kernel(Lambda, P, B0, C_tilde, dt, time, real=True), 1, 2)
    if not compute_final_state:
        return y.astype(u.dtype), None
    rows = jnp.eye(n, dtype=ctype) - A_bar_T  # [H, N, N]: row m is e_m^T (I - Abar^T)
    state_kernel = dplr_kernel(Lambda, P, B, jnp.swapaxes(rows, 0, 1), dt, time, real=False)  # [N, H, T]
    x_last = jnp.einsum("nht,bth->bhn", state_kernel, jnp.flip(ur, axis=1).astype(ctype))
    if x0 is not None:
        x_last = x_last + jnp.einsum("hnm,bhm->bhn", A_bar_T, x0)
    return y.astype(u.dtype), x_last


@jax.jit
def diagonal_ssm_step(
    u_t: ArrayLike, log_A_bar: ArrayLike, B_bar: ArrayLike, C: ArrayLike, state: ArrayLike
) -> tuple[Array, Array]:
    """One token of :func:`diagonal_ssm_convolution`: ``x = Abar x + Bbar u_t``,
    ``y = Re(sum_n C_n x_n)`` (a :func:`ssmjax.scan.linear_scan` of length 1).
    ``u_t [batch, *channels]``, parameters ``[*channels, N]``, ``state [batch, *channels, N]``.
    Returns ``(y [batch, *channels], new_state)``."""
    u_t, log_A_bar, B_bar, C, state = (jnp.asarray(a) for a in (u_t, log_A_bar, B_bar, C, state))
    check_ndim("u_t", u_t, range(2, 64), "[batch, *channels]")
    check_ndim("state", state, u_t.ndim + 1, "[batch, *channels, N]")
    _, x_new = linear_scan(jnp.exp(log_A_bar), (B_bar * u_t[..., None])[:, None], initial_state=state)
    return jnp.sum(C * x_new, axis=-1).real.astype(jnp.promote_types(u_t.dtype, jnp.float32)), x_new.astype(state.dtype)


@jax.jit
def dplr_ssm_step(
    u_t: ArrayLike, Lambda: ArrayLike, P: ArrayLike, B: ArrayLike, C: ArrayLike, dt: ArrayLike, state: ArrayLike
) -> tuple[Array, Array]:
    """One token of :func:`dplr_ssm_convolution` with the dense bilinear ``(Abar, Bbar)``:
    ``x = Abar x + Bbar u_t``, ``y = Re(C x)`` (a :func:`ssmjax.scan.matrix_scan` of length 1).
    ``u_t [batch, H]``, ``Lambda, B, C [H, N]``, ``P [H, R, N]``, ``dt [H]``,
    ``state [batch, H, N]``. Returns ``(y [batch, H], new_state)``."""
    u_t, state = jnp.asarray(u_t), jnp.asarray(state)
    check_ndim("u_t", u_t, 2, "[batch, H]")
    check_ndim("state", state, 3, "[batch, H, N]")
    A_bar, B_bar = discretize_dplr_bilinear(Lambda, P, B, dt)
    _, x_new = matrix_scan(A_bar, (B_bar * u_t[..., None])[:, None], initial_state=state)
    y = jnp.einsum("hn,bhn->bh", jnp.asarray(C), x_new).real
    return y.astype(jnp.promote_types(u_t.dtype, jnp.float32)), x_new.astype(state.dtype)
