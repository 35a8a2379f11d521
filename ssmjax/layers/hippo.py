"""HiPPO matrices and the initialisations of the S4 family (computed once, in float64 numpy).

HiPPO-LegS (Gu, Dao, Ermon, Rudra and Re, 2020, "HiPPO: Recurrent Memory with Optimal
Polynomial Projections"; S4 appendix C.1, Gu, Goel and Re, 2022)::

    A_nk = -sqrt(2n + 1) sqrt(2k + 1)   if n > k
           -(n + 1)                      if n = k
           0                             if n < k,          B_n = sqrt(2n + 1).

Normal plus low rank (NPLR, S4 Theorem 1): with ``P_n = sqrt(n + 1/2)``,
``A + P P^T = -1/2 I + S`` with ``S`` skew-symmetric: this normal matrix is HiPPO-N (S5).
Diagonalising it unitarily, ``A + P P^T = V diag(Lambda) V^*`` with
``Lambda = -1/2 + i omega``, gives::

    A = V (diag(Lambda) - p p^*) V^*,     p = V^* P,   b = V^* B.

The real system has its eigenvalues in conjugate pairs, so the layers keep one half
(``Im Lambda > 0``) and take ``2 Re`` of the output (S4, S4D, S5).

Diagonal initialisations (Gu, Gupta, Goel and Re, 2022, "On the Parameterization and
Initialization of Diagonal State Space Models", Sec. 4), ``n = 0 .. N/2 - 1``:

* S4D-LegS: the diagonal ``Lambda`` of the NPLR form above (= DSS's Skew-HiPPO init);
* S4D-Lin:  ``Lambda_n = -1/2 + i pi n``;
* S4D-Inv:  ``Lambda_n = -1/2 + i (N / pi) (N / (2n + 1) - 1)``.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax import Array
from jaxtyping import Float

from ssmjax.checks import check_choice
from ssmjax.scan.conv import fft_causal_convolution
from ssmjax.scan.linear import matrix_scan


def _check_even(name: str, n: int) -> None:
    if not isinstance(n, int) or n < 2 or n % 2:
        raise ValueError(f"{name}: expected an even int >= 2 (conjugate pairs), got {n!r}")


def hippo_legs(N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LegS ``(A [N, N], B [N])`` (module docstring)."""
    r = np.sqrt(2 * np.arange(N, dtype=np.float64) + 1)
    A = -np.tril(r[:, None] * r[None, :], k=-1) - np.diag(np.arange(1, N + 1, dtype=np.float64))
    return A, r.copy()


def hippo_legs_rank_correction(N: int) -> np.ndarray:
    """``P [N]`` with ``P_n = sqrt(n + 1/2)``: ``A + P P^T`` is normal."""
    return np.sqrt(np.arange(N, dtype=np.float64) + 0.5)


def hippo_n(N: int) -> np.ndarray:
    """HiPPO-N ``A + P P^T`` ``[N, N]``: the normal part of HiPPO-LegS (S5, Sec. 4.1)."""
    A, _ = hippo_legs(N)
    P = hippo_legs_rank_correction(N)
    return A + np.outer(P, P)


@functools.lru_cache(maxsize=64)
def _hippo_legs_nplr(N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    S = hippo_n(N)
    real = np.mean(np.diag(S))  # -1/2: S = -1/2 I + skew-symmetric
    omega, V = np.linalg.eigh(-1j * (S - real * np.eye(N)))  # Hermitian: -i * skew
    Lambda = real + 1j * omega
    _, B = hippo_legs(N)
    P = hippo_legs_rank_correction(N)
    return Lambda, V.conj().T @ P, V.conj().T @ B, V


def hippo_legs_nplr(N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full NPLR form of HiPPO-LegS: ``(Lambda [N], p [N], b [N], V [N, N])`` complex with
    ``A = V (diag(Lambda) - p p^*) V^*``, ``B = V b``, ``V`` unitary."""
    return tuple(a.copy() for a in _hippo_legs_nplr(N))


def hippo_legs_dplr(N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The half of the NPLR form that S4 keeps: the ``N/2`` modes with ``Im Lambda > 0``,
    sorted by ``Im Lambda``: ``(Lambda, p, b, V [N, N/2])``."""
    _check_even("N", N)
    Lambda, p, b, V = _hippo_legs_nplr(N)
    keep = np.argsort(Lambda.imag)[N // 2 :]
    if np.any(Lambda.imag[keep] <= 0):
        raise ValueError(f"N: HiPPO-LegS of size {N} has a zero eigenvalue pair; use another N")
    return Lambda[keep].copy(), p[keep].copy(), b[keep].copy(), V[:, keep].copy()


def s4d_lin(N: int) -> np.ndarray:
    """S4D-Lin ``Lambda [N/2]``: ``-1/2 + i pi n``."""
    _check_even("N", N)
    return -0.5 + 1j * math.pi * np.arange(N // 2)


def s4d_inv(N: int) -> np.ndarray:
    """S4D-Inv ``Lambda [N/2]``: ``-1/2 + i (N / pi) (N / (2n + 1) - 1)``."""
    _check_even("N", N)
    n = np.arange(N // 2)
    return -0.5 + 1j * (N / math.pi) * (N / (2 * n + 1) - 1)


def s4d_legs(N: int) -> tuple[np.ndarray, np.ndarray]:
    """S4D-LegS ``(Lambda [N/2], b [N/2])``: the diagonal of HiPPO-LegS's DPLR form and the
    matching ``V^* B`` (the S4 reference implementation's ``diag-legs`` init)."""
    Lambda, _, b, _ = hippo_legs_dplr(N)
    return Lambda, b


S4D_INITS = ("lin", "inv", "legs")


def s4d_init(init: str, N: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Lambda [N/2], B [N/2])`` for ``init`` in ``("lin", "inv", "legs")``; ``B = 1``
    except for LegS (HiPPO's ``V^* B``)."""
    if init == "legs":
        return s4d_legs(N)
    if init == "lin":
        return s4d_lin(N), np.ones(N // 2, np.complex128)
    if init == "inv":
        return s4d_inv(N), np.ones(N // 2, np.complex128)
    raise ValueError(f"init: expected one of {S4D_INITS}, got {init!r}")


def s5_hippo_n_init(P: int, blocks: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S5's block-diagonal HiPPO-N initialisation with the conjugate-symmetry trick
    (Smith, Warrington and Linderman, 2023, "Simplified State Space Layers for Sequence
    Modeling", Sec. 4.1 and appendix B.1).

    ``A`` is block-diagonal with ``blocks`` copies of HiPPO-N of size ``P / blocks``;
    each block keeps the half of its eigenvalues with ``Im > 0``.

    Returns:
      ``(Lambda [P/2], V [P, P/2], V_inv [P/2, P])``: eigenvalues and the (block-diagonal)
      eigenvectors used to map the initial real ``B [P, H]`` to ``V_inv B`` and ``C [H, P]``
      to ``C V``.
    """
    if not isinstance(blocks, int) or blocks < 1 or P % blocks or (P // blocks) % 2:
        raise ValueError(f"blocks: expected a positive int with P / blocks even, got P={P}, blocks={blocks}")
    Lambda, _, _, V = hippo_legs_dplr(P // blocks)
    V_all = scipy.linalg.block_diag(*([V] * blocks))
    return np.tile(Lambda, blocks), V_all, V_all.conj().T


# --- LegT: the Legendre Memory Unit's sliding-window memory (Voelker, Kajic and Eliasmith,
# 2019, "Legendre Memory Units"), shared by the ``lmu`` and ``lmuformer`` layers.

LEGENDRE_METHODS = ("fft", "scan")


def legendre_state_space(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Continuous LegT ``(A [q, q], B [q])`` of ``dm/dt = A m + B u`` (``1 / theta`` included)."""
    i = np.arange(order, dtype=np.float64)[:, None]
    j = np.arange(order, dtype=np.float64)[None, :]
    A = (2 * i + 1) * np.where(i < j, -1.0, (-1.0) ** (i - j + 1)) / theta
    B = (2 * i[:, 0] + 1) * (-1.0) ** i[:, 0] / theta
    return A, B


@functools.lru_cache(maxsize=32)
def legendre_memory(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """ZOH discretisation at ``dt = 1``: ``(Abar, Bbar)`` in float64, from
    ``expm([[A, B], [0, 0]]) = [[Abar, Bbar], [0, 1]]``."""
    A, B = legendre_state_space(order, theta)
    block = np.zeros((order + 1, order + 1))
    block[:order, :order], block[:order, order] = A, B
    expm = scipy.linalg.expm(block)
    return expm[:order, :order], expm[:order, order]


@functools.lru_cache(maxsize=32)
def legendre_impulse_response(order: int, theta: float, length: int) -> np.ndarray:
    """``H [length, q]`` with ``H_t = Abar^t Bbar``, by doubling: ``H[L:2L] = Abar^L H[:L]``."""
    A_bar, B_bar = legendre_memory(order, theta)
    H, power = B_bar[None, :], A_bar
    while H.shape[0] < length:
        H = np.concatenate([H, H @ power.T], axis=0)
        power = power @ power
    return H[:length]


def legendre_memory_sequence(
    u: Float[Array, "b t du"],
    order: int,
    theta: float,
    *,
    initial_state: Float[Array, "b du q"] | None = None,
    method: str = "fft",
    segment_ids=None,
    reset=None,
) -> tuple[Float[Array, "b t du q"], Float[Array, "b du q"]]:
    """The LegT memory of every input channel, ``m_t[i] = Abar m_{t-1}[i] + Bbar u_t[i]``
    (``m [b, t, du, q]`` and the last state ``[b, du, q]``).

    ``method="fft"``: ``m = H * u`` with ``H_t = Abar^t Bbar`` by
    :func:`ssmjax.scan.conv.fft_causal_convolution` (from a zero state only); ``"scan"``,
    and every call that continues a state or gets ``segment_ids`` / ``reset``, runs the
    recurrence with :func:`ssmjax.scan.matrix_scan`.
    """
    check_choice("method", method, LEGENDRE_METHODS)
    batch, time, du = u.shape
    continuing = initial_state is not None or segment_ids is not None or reset is not None
    if method == "fft" and not continuing and time > 0:
        H = jnp.asarray(legendre_impulse_response(order, float(theta), time), u.dtype)
        m = fft_causal_convolution(jnp.repeat(u, order, axis=-1), jnp.tile(H, (1, du)))
        m = m.reshape(batch, time, du, order)
        return m, m[:, -1]
    A_bar, B_bar = (jnp.asarray(a, u.dtype) for a in legendre_memory(order, float(theta)))
    return matrix_scan(A_bar, u[..., None] * B_bar, initial_state=initial_state, segment_ids=segment_ids, reset=reset)
