"""S4, S4D and DSS: LTI state-space layers evaluated as long FFT convolutions.

Each of the ``H = d_model`` channels runs its own single-input single-output SSM
(``x_t = Abar x_{t-1} + Bbar u_t``, ``y_t = Re(C x_t)``); the layer is the standard S4 block
of the state-spaces repository::

    y = GLU(W (GELU(K * u + D u)) + b),        GLU(a, g) = a * sigmoid(g),  W [2H, H]

``__call__`` computes the length-``T`` kernel ``K_k = C Abar^k Bbar`` and convolves by FFT
(:mod:`ssmjax.scan.lti`, :func:`ssmjax.scan.conv.fft_causal_convolution`); a carried state
adds its zero-input response and the final state is computed in parallel, so
``__call__(x[:, :s])`` then ``__call__(x[:, s:], state=...)`` equals one pass. ``step``
runs the discretised recurrence for one token (:func:`ssmjax.scan.linear_scan` /
:func:`ssmjax.scan.matrix_scan` with ``T = 1``). ``bidirectional=True`` adds a second
output vector ``C'`` (A, B, dt shared, as in the reference implementation) whose kernel
runs backwards in time, non-causally: ``y_t = sum_{s<=t} K[t-s] u_s + sum_{s>t} K'[s-t-1] u_s``.

Models (``N = d_state``; complex parameters are stored as ``[..., 2]`` real pairs):

* ``"s4"`` (Gu, Goel and Re, 2022, "Efficiently Modeling Long Sequences with Structured
  State Spaces"): ``A = diag(Lambda) - P P^*`` (DPLR, rank ``R``) initialised from the
  NPLR form of HiPPO-LegS (:mod:`ssmjax.layers.hippo`), bilinear discretisation, the
  kernel by the Cauchy-kernel / generating-function algorithm
  (:func:`ssmjax.scan.lti.dplr_ssm_convolution`); ``C`` is the parameter and
  ``Ctilde = C (I - Abar^T)`` is formed for each call length. The real ``N``-dimensional
  system keeps ``N/2`` conjugate pairs (``Lambda, P, B, C`` and their conjugates); the
  state carried between calls is the first half ``[b, H, N/2]`` (complex64), the other
  half being its conjugate. ``step`` uses the dense ``N x N`` discretised matrix.
* ``"s4d"`` (Gu, Gupta, Goel and Re, 2022, "On the Parameterization and Initialization of
  Diagonal State Space Models"): ``A = diag(Lambda)`` with ``N/2`` modes,
  ``Lambda = -exp(log_A_real) + i A_imag`` initialised by S4D-Lin / S4D-Inv / S4D-LegS,
  ZOH or bilinear, Vandermonde kernel ``K = 2 Re(sum_n C_n Bbar_n Abar_n^k)``; state
  ``[b, H, N/2]`` complex.
* ``"dss"`` (Gupta, Gu and Berant, 2022, "Diagonal State Spaces are as Effective as
  Structured State Spaces"), the ``DSS_exp`` variant: ``N`` modes
  ``Lambda = -exp(Lambda_log_neg_re) + i Lambda_im`` shared by the ``H`` channels,
  initialised with the Skew-HiPPO eigenvalues (the ``Im > 0`` half of HiPPO-LegS's
  normal part of size ``2N``), ``B = 1``, ZOH with one ``dt`` per channel (the reference
  code can also use separate steps for the real and imaginary parts; not provided),
  ``K_k = Re(sum_n W_n (exp(Lambda_n dt) - 1) / Lambda_n exp(k Lambda_n dt))`` (Prop. 1 of
  the paper); state ``[b, H, N]`` complex. (``DSS_softmax`` normalises the kernel over the
  call length and therefore has no streaming form; it is not provided.)

Parameters (``H = d_model``, ``N = d_state``, ``R = rank``, ``c = 2`` if bidirectional
else 1; the block adds ``D`` and the GLU output linear, ``2 H^2 + 3 H``)::

    s4:   H N (2 + R + c) + 2 H^2 + 4 H
    s4d:  H N (2 + c)     + 2 H^2 + 4 H
    dss:  2 N + 2 c H N   + 2 H^2 + 4 H
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import Float, Inexact

from ssmjax.checks import check_choice
from ssmjax.layers.hippo import S4D_INITS, hippo_legs_dplr, s4d_init
from ssmjax.layers.common import (
    as_complex,
    check_layer_input,
    complex_pairs,
    constant,
    no_state_when_bidirectional,
    state_float,
    uniform_log_init,
)
from ssmjax.layers.registry import register
from ssmjax.scan.lti import (
    DISCRETISATIONS,
    bidirectional_convolution,
    diagonal_ssm_convolution,
    diagonal_ssm_step,
    discretize_diagonal,
    dplr_ssm_convolution,
    dplr_ssm_kernel,
    dplr_ssm_step,
    vandermonde_kernel,
)


def conjugate_extend(z: Array) -> Array:
    """``[..., N/2]`` -> ``[..., N]``: the kept modes followed by their conjugates."""
    return jnp.concatenate([z, jnp.conj(z)], axis=-1)


class ConvSSMBlock(nn.Module):
    """The S4 block around an LTI SSM (module docstring); subclasses define the SSM through
    ``setup_ssm``, ``ssm_call``, ``ssm_kernels``, ``ssm_step`` and ``state_shape``."""

    d_model: int
    d_state: int = 64
    bidirectional: bool = False
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def n_outputs(self) -> int:
        return 2 if self.bidirectional else 1

    def setup(self):
        if not isinstance(self.d_state, int) or self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"d_state: expected an even int >= 2, got {self.d_state!r}")
        self.setup_ssm()
        self.D = self.param("D", nn.initializers.normal(1.0), (self.d_model,), self.param_dtype)
        self.output_linear = nn.Dense(
            2 * self.d_model, dtype=self.dtype, param_dtype=self.param_dtype, name="output_linear"
        )
        self.drop = nn.Dropout(self.dropout)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        return dict(x=jnp.zeros((batch_size,) + self.state_shape(), jnp.result_type(dtype, jnp.complex64)))

    def block_output(self, y_ssm: Array, u: Array, out_dtype) -> Array:
        y = jax.nn.gelu(y_ssm + self.D.astype(u.dtype) * u, approximate=False)
        y = self.drop(y, deterministic=self.deterministic)
        # The product on [rows, H] (a free reshape): on a 3-d operand XLA transposes the
        # output's cotangent for the weight gradient (a slow fused copy on CPU).
        rows = y.astype(out_dtype).reshape(-1, y.shape[-1])
        a, gate = jnp.split(self.output_linear(rows), 2, axis=-1)
        return (a * jax.nn.sigmoid(gate)).reshape(y.shape[:-1] + (a.shape[-1],))

    def __call__(self, x, *, state=None, return_state=False):
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        no_state_when_bidirectional(self.name or type(self).__name__, self.bidirectional, state, return_state)
        out_dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        u = x.astype(state_float(x.dtype))
        if self.bidirectional:
            forward, backward = self.ssm_kernels(x.shape[1], u.dtype)  # [H, T] each
            y = bidirectional_convolution(u, forward.T.astype(u.dtype), backward.T.astype(u.dtype))
            return self.block_output(y, u, out_dtype)
        x0 = None if state is None else state["x"]
        y, x_last = self.ssm_call(u, x0, return_state)
        y = self.block_output(y.astype(u.dtype), u, out_dtype)
        return (y, dict(x=x_last)) if return_state else y

    def step(self, x_t, state):
        """One token in recurrent mode (``ssm_step``, the discretised recurrence) instead of
        ``__call__``'s convolution mode, which would build a kernel and an FFT per token."""
        no_state_when_bidirectional(self.name or type(self).__name__, self.bidirectional, state, True)
        x_t = jnp.asarray(x_t)
        out_dtype = self.dtype or jnp.result_type(x_t.dtype, self.param_dtype)
        u = x_t.astype(state_float(x_t.dtype))
        y, x_new = self.ssm_step(u, state["x"])
        return self.block_output(y.astype(u.dtype), u, out_dtype), dict(x=x_new)


# ------------------------------------------------------------------------------- S4
@register("s4")
class S4(ConvSSMBlock):
    """S4 block with a DPLR (HiPPO-LegS) SSM per channel (module docstring); parameters
    ``H N (2 + R + c) + 2 H^2 + 4 H``."""

    rank: int = 1

    SSM_PARAMETERS: ClassVar[frozenset[str]] = frozenset({"log_A_real", "A_imag", "P", "B", "log_dt"})

    def state_shape(self) -> tuple[int, ...]:
        return (self.d_model, self.d_state // 2)

    def setup_ssm(self):
        h, n, r = self.d_model, self.d_state // 2, self.rank
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"rank: expected a positive int, got {r!r}")
        Lambda, p, b, _ = hippo_legs_dplr(self.d_state)
        b = b.real + 1j * np.clip(b.imag, -2.0, 2.0)  # the reference implementation's B_clip
        P = np.zeros((r, n), np.complex128)
        P[0] = p
        self.log_A_real = self.param("log_A_real", constant(np.log(-Lambda.real)), (h, n), self.param_dtype)
        self.A_imag = self.param("A_imag", constant(Lambda.imag), (h, n), self.param_dtype)
        self.P = self.param("P", constant(complex_pairs(P)), (h, r, n, 2), self.param_dtype)
        self.B = self.param("B", constant(complex_pairs(b)), (h, n, 2), self.param_dtype)
        self.C = self.param("C", nn.initializers.normal(math.sqrt(0.5)), (self.n_outputs, h, n, 2), self.param_dtype)
        self.log_dt = self.param("log_dt", uniform_log_init(self.dt_min, self.dt_max), (h,), self.param_dtype)

    def system(self, real_dtype) -> tuple[Array, Array, Array, Array, Array]:
        """The full conjugate-extended system ``(Lambda [H, N], P [H, R, N], B [H, N],
        C [c, H, N], dt [H])``."""

        def get(p):
            return p.astype(real_dtype)

        Lambda = jax.lax.complex(-jnp.exp(get(self.log_A_real)), get(self.A_imag))
        return (
            conjugate_extend(Lambda),
            conjugate_extend(as_complex(get(self.P))),
            conjugate_extend(as_complex(get(self.B))),
            conjugate_extend(as_complex(get(self.C))),
            jnp.exp(get(self.log_dt)),
        )

    def ssm_call(self, u, x0, return_state):
        Lambda, P, B, C, dt = self.system(u.dtype)
        initial = None if x0 is None else conjugate_extend(x0)
        y, x_last = dplr_ssm_convolution(
            u, Lambda, P, B, C[0], dt, initial_state=initial, compute_final_state=return_state
        )
        return y, None if x_last is None else x_last[..., : self.d_state // 2]

    def ssm_kernels(self, length: int, real_dtype) -> Array:
        Lambda, P, B, C, dt = self.system(real_dtype)
        return dplr_ssm_kernel(Lambda, P, B, C, dt, length)

    def ssm_step(
        self, u: Float[Array, "b h"], x: Inexact[Array, "b h n"]
    ) -> tuple[Float[Array, "b h"], Inexact[Array, "b h n"]]:
        Lambda, P, B, C, dt = self.system(u.dtype)
        y, x_new = dplr_ssm_step(u, Lambda, P, B, C[0], dt, conjugate_extend(x))
        return y, x_new[..., : self.d_state // 2]


# ------------------------------------------------------------------ diagonal S4D / DSS
class DiagonalConvSSMBlock(ConvSSMBlock):
    """An S4 block whose SSM is diagonal; subclasses give ``discretized(real_dtype)`` ->
    ``(log_Abar [H, M], Bbar [H, M], Cout [c, H, M])`` with ``y = Re(Cout x)``."""

    def ssm_call(self, u, x0, return_state):
        log_A_bar, B_bar, C = self.discretized(u.dtype)
        return diagonal_ssm_convolution(u, log_A_bar, B_bar, C[0], initial_state=x0)

    def ssm_kernels(self, length: int, real_dtype) -> Array:
        log_A_bar, B_bar, C = self.discretized(real_dtype)
        return vandermonde_kernel(log_A_bar, C * B_bar, length).real

    def ssm_step(
        self, u: Float[Array, "b h"], x: Inexact[Array, "b h m"]
    ) -> tuple[Float[Array, "b h"], Inexact[Array, "b h m"]]:
        log_A_bar, B_bar, C = self.discretized(u.dtype)
        return diagonal_ssm_step(u, log_A_bar, B_bar, C[0], x)


@register("s4d")
class S4D(DiagonalConvSSMBlock):
    """S4D block (module docstring): ``a_init`` in ``("lin", "inv", "legs")``,
    ``discretization`` in ``("zoh", "bilinear")``; parameters ``H N (2 + c) + 2 H^2 + 4 H``."""

    a_init: str = "lin"
    discretization: str = "zoh"

    SSM_PARAMETERS: ClassVar[frozenset[str]] = frozenset({"log_A_real", "A_imag", "B", "log_dt"})

    def state_shape(self) -> tuple[int, ...]:
        return (self.d_model, self.d_state // 2)

    def setup_ssm(self):
        check_choice("a_init", self.a_init, S4D_INITS)
        check_choice("discretization", self.discretization, DISCRETISATIONS)
        h, n = self.d_model, self.d_state // 2
        Lambda, b = s4d_init(self.a_init, self.d_state)
        self.log_A_real = self.param("log_A_real", constant(np.log(-Lambda.real)), (h, n), self.param_dtype)
        self.A_imag = self.param("A_imag", constant(Lambda.imag), (h, n), self.param_dtype)
        self.B = self.param("B", constant(complex_pairs(b)), (h, n, 2), self.param_dtype)
        self.C = self.param("C", nn.initializers.normal(math.sqrt(0.5)), (self.n_outputs, h, n, 2), self.param_dtype)
        self.log_dt = self.param("log_dt", uniform_log_init(self.dt_min, self.dt_max), (h,), self.param_dtype)

    def discretized(self, real_dtype):
        Lambda = jax.lax.complex(-jnp.exp(self.log_A_real.astype(real_dtype)), self.A_imag.astype(real_dtype))
        dt = jnp.exp(self.log_dt.astype(real_dtype))[:, None]
        log_A_bar, B_bar = discretize_diagonal(Lambda, as_complex(self.B.astype(real_dtype)), dt, self.discretization)
        return log_A_bar, B_bar, 2 * as_complex(self.C.astype(real_dtype))  # 2 Re: conjugate pairs


def skew_hippo_eigenvalues(n_modes: int) -> np.ndarray:
    """DSS's Skew-HiPPO init: the ``Im > 0`` eigenvalues ``-1/2 + i omega`` ``[n_modes]`` of the
    normal part of HiPPO-LegS of size ``2 n_modes``."""
    Lambda, _, _, _ = hippo_legs_dplr(2 * n_modes)
    return Lambda


@register("dss")
class DSS(DiagonalConvSSMBlock):
    """DSS_exp block (module docstring): ``N = d_state`` complex modes shared by the
    channels; parameters ``2 N + 2 c H N + 2 H^2 + 4 H``."""

    SSM_PARAMETERS: ClassVar[frozenset[str]] = frozenset({"Lambda_log_neg_re", "Lambda_im", "log_dt"})

    def state_shape(self) -> tuple[int, ...]:
        return (self.d_model, self.d_state)

    def setup_ssm(self):
        h, n = self.d_model, self.d_state
        Lambda = skew_hippo_eigenvalues(n)
        self.Lambda_log_neg_re = self.param("Lambda_log_neg_re", constant(np.log(-Lambda.real)), (n,), self.param_dtype)
        self.Lambda_im = self.param("Lambda_im", constant(Lambda.imag), (n,), self.param_dtype)
        self.W = self.param("W", nn.initializers.normal(1.0), (self.n_outputs, h, n, 2), self.param_dtype)
        self.log_dt = self.param("log_dt", uniform_log_init(self.dt_min, self.dt_max), (h,), self.param_dtype)

    def discretized(self, real_dtype):
        Lambda = jax.lax.complex(
            -jnp.exp(self.Lambda_log_neg_re.astype(real_dtype)), self.Lambda_im.astype(real_dtype)
        )
        dt = jnp.exp(self.log_dt.astype(real_dtype))[:, None]
        log_A_bar, B_bar = discretize_diagonal(Lambda, jnp.ones((), Lambda.dtype), dt, "zoh")
        return log_A_bar, B_bar, as_complex(self.W.astype(real_dtype))
