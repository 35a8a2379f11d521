"""H3 (``"h3"``) and Gated State Space (``"gss"``): gated layers built from LTI SSM kernels.

**H3** (Fu, Dao, Saab, Thomas, Rudra and Re, 2023, "Hungry Hungry Hippos: Towards Language
Modeling with State Space Models"), with the equations of HazyResearch/H3: for ``d = d_model``
split into ``H = d / head_dim`` heads of size ``m = head_dim``::

    q, k, v = W_q x + b_q,  W_k x + b_k,  W_v x + b_v
    kbar_t  = sum_{i < N} Cs[i] * k_{t-i} + Ds * k_t           shift SSM on K (per channel)
    z_t     = kbar_t[h, :, None] * v_t[h, None, :]            outer product per head [H, m, m]
    s_t     = SSM_h(z)_t + D_h z_t                             diagonal SSM on K V (per head)
    o_t[h, j] = sum_i q_t[h, i] s_t[h, i, j]
    y_t     = W_o o_t + b_o

The shift SSM has ``A`` the ``N x N`` down-shift matrix, ``B = e_0`` and a learned ``C``, so
its kernel (:func:`ssmjax.scan.lti.shift_kernel`) is ``Cs`` itself: a causal depthwise
convolution of width ``N`` whose state is the last ``N - 1`` keys (computed by FFT,
:func:`ssmjax.scan.conv.fft_causal_convolution`, over ``[state, k]``). The diagonal SSM is S4D's (``N/2`` conjugate pairs, S4D-Lin,
bilinear by default as in H3), one per head, shared by the head's ``m^2`` channels,
evaluated by FFT convolution (:func:`ssmjax.scan.lti.diagonal_ssm_convolution`).
``head_dim = 1`` (H3's default) makes ``z = kbar * v`` and ``o = q * s``.

**GSS** (Mehta, Gupta, Cutkosky and Neyshabur, 2023, "Long Range Language Modeling via
Gated State Spaces"), following the paper's pseudocode (residual and pre-norm belong to
the backbone)::

    v = GELU(W_v x + b_v)                  F = expansion * d
    u = GELU(W_u x + b_u)                  H = d / reduction  (dimensionality reduction)
    u = LayerNorm(u)
    s = K * u + D u                        simplified DSS on H channels
    y = W_o ((W_g s + b_g) * v) + b_o      gate, back to d

with the simplified DSS kernel ``K_{h,k} = Re(sum_n C_{hn} (exp(Lambda_n) - 1) / Lambda_n
exp(k Lambda_n))``: ``N`` modes ``Lambda = -exp(Lambda_log_neg_re) + i exp(Lambda_log_im)``
shared by the channels, ``dt = 1`` (no timescale parameter), ``B = 1``. The log-parameters
start ``N(0, 1)`` and ``C`` is complex ``N(0, 1)`` per component, as in the PyTorch port
of the paper's pseudocode (lucidrains/gated-state-spaces-pytorch). The state is the DSS
state ``[b, H, N]`` (complex).

Parameters (``d = d_model``; H3: ``N = d_state``, ``Hh = d / head_dim``; GSS:
``F = expansion d``, ``Hr = d / reduction``, ``N = d_state``)::

    h3:   4 d^2 + 4 d + d N + d + Hh (3 N + 2)
    gss:  (d + 1) F + (d + 1) Hr + 3 Hr + 2 N + 2 Hr N + (Hr + 1) F + (F + 1) d
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssmjax.checks import check_choice
from ssmjax.layers.hippo import S4D_INITS, s4d_init
from ssmjax.layers.common import (
    as_complex,
    check_layer_input,
    complex_pairs,
    constant,
    state_float,
    uniform_log_init,
)
from ssmjax.layers.registry import register
from ssmjax.scan.conv import fft_causal_convolution
from ssmjax.scan.lti import (
    DISCRETISATIONS,
    diagonal_ssm_convolution,
    diagonal_ssm_step,
    discretize_diagonal,
    shift_kernel,
)


@jax.jit
def shift_ssm(k, shift_C, history):
    """The H3 shift SSM over ``k [b, t, d]`` with ``B = e_0`` and ``C = shift_C [d, N]``:
    ``y_t = sum_{i < N} K_i k_{t-i}`` with the shift kernel ``K`` (= ``shift_C``). The state is
    the last ``N - 1`` inputs ``[b, N - 1, d]``; the sequence ``[history, k]`` is convolved
    by FFT and the outputs at the history positions dropped. Returns ``(y, new_history)``."""
    n = shift_C.shape[-1]
    e0 = jnp.zeros((n,), shift_C.dtype).at[0].set(1)
    padded = jnp.concatenate([history, k], axis=1)
    kernel = shift_kernel(e0, shift_C, padded.shape[1]).T  # [t + N - 1, d]
    y = fft_causal_convolution(padded, kernel)[:, n - 1 :]
    return y, padded[:, padded.shape[1] - (n - 1) :]


@register("h3")
class H3(nn.Module):
    """H3 layer (module docstring); parameters ``4 d^2 + 4 d + d N + d + Hh (3 N + 2)``."""

    d_model: int
    d_state: int = 64
    head_dim: int = 1
    a_init: str = "lin"
    discretization: str = "bilinear"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def heads(self) -> int:
        return self.d_model // self.head_dim

    def setup(self):
        d, n = self.d_model, self.d_state
        if self.head_dim < 1 or d % self.head_dim:
            raise ValueError(f"head_dim: must divide d_model = {d}, got {self.head_dim}")
        if n < 2 or n % 2:
            raise ValueError(f"d_state: expected an even int >= 2, got {n!r}")
        check_choice("a_init", self.a_init, S4D_INITS)
        check_choice("discretization", self.discretization, DISCRETISATIONS)
        dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj = dense("q_proj"), dense("k_proj"), dense("v_proj")
        self.output_linear = dense("output_linear")
        bound = 1 / math.sqrt(n)  # torch Conv1d default (kaiming_uniform, a = sqrt(5))
        self.shift_C = self.param(
            "shift_C", lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
            (d, n), self.param_dtype,
        )
        self.shift_D = self.param("shift_D", nn.initializers.normal(1.0), (d,), self.param_dtype)
        h, half = self.heads, n // 2
        Lambda, b = s4d_init(self.a_init, n)
        self.log_A_real = self.param("log_A_real", constant(np.log(-Lambda.real)), (h, half), self.param_dtype)
        self.A_imag = self.param("A_imag", constant(Lambda.imag), (h, half), self.param_dtype)
        self.B = self.param("B", constant(complex_pairs(b)), (h, half, 2), self.param_dtype)
        self.C = self.param("C", nn.initializers.normal(math.sqrt(0.5)), (h, half, 2), self.param_dtype)
        self.log_dt = self.param("log_dt", uniform_log_init(self.dt_min, self.dt_max), (h,), self.param_dtype)
        self.D = self.param("D", nn.initializers.normal(1.0), (h,), self.param_dtype)
        self.drop = nn.Dropout(self.dropout)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        m = self.head_dim
        return dict(
            shift=jnp.zeros((batch_size, self.d_state - 1, self.d_model), state_float(dtype)),
            ssm=jnp.zeros((batch_size, self.heads, m, m, self.d_state // 2), jnp.result_type(dtype, jnp.complex64)),
        )


    def diagonal_ssm(self, real_dtype):
        """``(log_Abar, Bbar, 2 C)`` ``[H, 1, 1, N/2]`` (broadcast over the head's channels)."""
        Lambda = jax.lax.complex(-jnp.exp(self.log_A_real.astype(real_dtype)), self.A_imag.astype(real_dtype))
        dt = jnp.exp(self.log_dt.astype(real_dtype))[:, None]
        log_A_bar, B_bar = discretize_diagonal(Lambda, as_complex(self.B.astype(real_dtype)), dt, self.discretization)
        C = 2 * as_complex(self.C.astype(real_dtype))
        return tuple(a[:, None, None, :] for a in (log_A_bar, B_bar, C))

    def project(self, x):
        rdt = state_float(x.dtype)
        return tuple(p(x).astype(rdt) for p in (self.q_proj, self.k_proj, self.v_proj))

    def readout(self, q, kv, s, out_dtype):
        """``o[h, j] = sum_i q[h, i] (s + D z)[h, i, j]`` then the output projection."""
        s = s + self.D.astype(s.dtype)[:, None, None] * kv
        heads = q.reshape(q.shape[:-1] + (self.heads, self.head_dim))
        o = jnp.einsum("...hi,...hij->...hj", heads, s).reshape(q.shape)
        return self.drop(self.output_linear(o.astype(out_dtype)), deterministic=self.deterministic)

    def outer(self, k, v):
        m = self.head_dim
        k = k.reshape(k.shape[:-1] + (self.heads, m, 1))
        return k * v.reshape(v.shape[:-1] + (self.heads, 1, m))

    def __call__(self, x, *, state=None, return_state=False):
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        out_dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        q, k, v = self.project(x)
        if state is None:
            shift0, ssm0 = jnp.zeros((x.shape[0], self.d_state - 1, self.d_model), k.dtype), None
        else:
            shift0, ssm0 = state["shift"].astype(k.dtype), state["ssm"]
        k_shift, conv_state = shift_ssm(k, self.shift_C.astype(k.dtype), shift0)
        kv = self.outer(k_shift + self.shift_D.astype(k.dtype) * k, v)  # [b, t, H, m, m]
        log_A_bar, B_bar, C = self.diagonal_ssm(k.dtype)
        s, ssm_state = diagonal_ssm_convolution(kv, log_A_bar, B_bar, C, initial_state=ssm0)
        y = self.readout(q, kv, s, out_dtype)
        return (y, dict(shift=conv_state, ssm=ssm_state)) if return_state else y

    def step(self, x_t, state):
        """One token with the diagonal SSM in recurrent mode (``diagonal_ssm_step``) instead
        of ``__call__``'s convolution mode, which would build a kernel and an FFT per token."""
        x_t = jnp.asarray(x_t)
        out_dtype = self.dtype or jnp.result_type(x_t.dtype, self.param_dtype)
        q, k, v = self.project(x_t)
        k_shift, conv_state = shift_ssm(k[:, None], self.shift_C.astype(k.dtype), state["shift"].astype(k.dtype))
        k_shift = k_shift[:, 0]
        kv = self.outer(k_shift + self.shift_D.astype(k.dtype) * k, v)  # [b, H, m, m]
        log_A_bar, B_bar, C = self.diagonal_ssm(k.dtype)
        s, ssm_state = diagonal_ssm_step(kv, log_A_bar, B_bar, C, state["ssm"])
        return self.readout(q, kv, s, out_dtype), dict(shift=conv_state, ssm=ssm_state)


@register("gss")
class GSS(nn.Module):
    """Gated State Space layer (module docstring); parameters
    ``(d + 1) F + (d + 1) Hr + 3 Hr + 2 N + 2 Hr N + (Hr + 1) F + (F + 1) d``."""

    d_model: int
    expansion: int = 4
    reduction: int = 4
    d_state: int = 512
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def ssm_width(self) -> int:
        return max(1, self.d_model // self.reduction)

    def setup(self):
        d, hr, n, f = self.d_model, self.ssm_width, self.d_state, self.expansion * self.d_model
        dense = lambda width, name: nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        self.to_v, self.to_u = dense(f, "to_v"), dense(hr, "to_u")
        self.to_gate, self.to_out = dense(f, "to_gate"), dense(d, "to_out")
        self.norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")
        normal = nn.initializers.normal(1.0)
        self.Lambda_log_neg_re = self.param("Lambda_log_neg_re", normal, (n,), self.param_dtype)
        self.Lambda_log_im = self.param("Lambda_log_im", normal, (n,), self.param_dtype)
        self.C = self.param("C", normal, (hr, n, 2), self.param_dtype)
        self.D = self.param("D", normal, (hr,), self.param_dtype)
        self.drop = nn.Dropout(self.dropout)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        return dict(x=jnp.zeros((batch_size, self.ssm_width, self.d_state), jnp.result_type(dtype, jnp.complex64)))

    def simplified_dss(self, real_dtype):
        """``(log_Abar = Lambda, Bbar = (exp(Lambda) - 1) / Lambda, C)``: ZOH at ``dt = 1``."""
        Lambda = jax.lax.complex(
            -jnp.exp(self.Lambda_log_neg_re.astype(real_dtype)), jnp.exp(self.Lambda_log_im.astype(real_dtype))
        )
        log_A_bar, B_bar = discretize_diagonal(Lambda, jnp.ones((), Lambda.dtype), jnp.ones((), real_dtype), "zoh")
        return log_A_bar, B_bar, as_complex(self.C.astype(real_dtype))

    def branches(self, x):
        rdt = state_float(x.dtype)
        v = jax.nn.gelu(self.to_v(x), approximate=False)
        u = self.norm(jax.nn.gelu(self.to_u(x), approximate=False)).astype(rdt)
        return v, u

    def gate(self, s, u, v, out_dtype):
        s = (s + self.D.astype(u.dtype) * u).astype(out_dtype)
        y = self.to_out(self.drop(self.to_gate(s) * v, deterministic=self.deterministic))
        return y

    def __call__(self, x, *, state=None, return_state=False):
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        out_dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        v, u = self.branches(x)
        log_A_bar, B_bar, C = self.simplified_dss(u.dtype)
        s, x_last = diagonal_ssm_convolution(
            u, log_A_bar, B_bar, C, initial_state=None if state is None else state["x"]
        )
        y = self.gate(s, u, v, out_dtype)
        return (y, dict(x=x_last)) if return_state else y

    def step(self, x_t, state):
        """One token with the DSS in recurrent mode (``diagonal_ssm_step``) instead of
        ``__call__``'s convolution mode, which would build a kernel and an FFT per token."""
        x_t = jnp.asarray(x_t)
        out_dtype = self.dtype or jnp.result_type(x_t.dtype, self.param_dtype)
        v, u = self.branches(x_t)
        log_A_bar, B_bar, C = self.simplified_dss(u.dtype)
        s, x_new = diagonal_ssm_step(u, log_A_bar, B_bar, C, state["x"])
        return self.gate(s, u, v, out_dtype), dict(x=x_new)
