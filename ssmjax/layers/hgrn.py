"""HGRN: the hierarchically gated recurrent unit (Qin, Yang and Zhong, 2023,
"Hierarchically Gated Recurrent Neural Network for Sequence Modeling").

An elementwise gated linear recurrence whose forget gate is bounded below by the layer's
lower bound ``lb`` (``0`` in the first layer, growing with depth in the paper, where it is
learned as a cumulative softmax shared by the stack; here it is the ``lower_bound`` field
set per layer), with input and forget gates tied. ``E = expand_ratio d``::

    lambda_t = lb + (1 - lb) sigmoid(W_f x_t)                  forget gate in [lb, 1]
    c_t      = swish(W_i x_t)                                   input
    h_t      = lambda_t * h_{t-1} + (1 - lambda_t) * c_t        (real, the default)
    y_t      = W_o (RMSNorm(h_t) * swish(W_g x_t))              output gate

``use_complex=True`` is the paper's complex-valued recurrence (Eq. 4): a data-independent
phase ``theta`` (one per channel, initialised to RoPE's frequencies ``10000^(-j/E)``),
``c_t = swish(W_re x_t) + i swish(W_im x_t)`` and
``h_t = lambda_t exp(i theta) h_{t-1} + (1 - lambda_t) c_t``; the output reads
``[Re h_t, Im h_t]`` (``2E`` channels). Gates and norms follow flash-linear-attention's
``HGRNAttention`` (no biases, gated RMSNorm). The recurrence is
:func:`ssmjax.scan.linear_scan` (real or complex).

Parameters (``d = d_model``): real ``4 d E + E``; complex ``7 d E + 3 E``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from ssmjax.layers.common import (
    RecurrentMixer,
    dense,
    gated_rms_norm,
    linear_scan_op,
    lower_bounded_log_forget,
    ones_param,
    scan_method,
    state_float,
)
from ssmjax.layers.registry import register


def rope_frequencies(key, shape, dtype=jnp.float32) -> Array:
    """``10000^(-j / E)`` for ``j = 0 .. E-1`` (the initial HGRN phases)."""
    return (10000.0 ** (-jnp.arange(shape[0], dtype=jnp.float32) / shape[0])).astype(dtype)


@register("hgrn")
class HGRN(RecurrentMixer):
    """HGRU token mixer (module docstring); parameters ``4 d E + E`` (real) or
    ``7 d E + 3 E`` (``use_complex=True``), ``E = expand_ratio d``."""

    d_model: int
    expand_ratio: int = 1
    lower_bound: float = 0.0
    use_complex: bool = False
    norm_eps: float = 1e-5
    method: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def inner(self) -> int:
        return self.expand_ratio * self.d_model

    @property
    def out_channels(self) -> int:
        return 2 * self.inner if self.use_complex else self.inner

    def setup(self):
        E = self.inner
        self.i_proj = dense(self.out_channels, self, "i_proj")
        self.f_proj = dense(E, self, "f_proj")
        self.g_proj = dense(self.out_channels, self, "g_proj")
        if self.use_complex:
            self.theta = self.param("theta", rope_frequencies, (E,), self.param_dtype)
        self.norm_weight = ones_param(self, "norm_weight", self.out_channels)
        self.out_proj = dense(self.d_model, self, "out_proj")

    def init_state(self, batch_size: int, dtype=jnp.float32) -> Array:
        real = state_float(dtype)
        return jnp.zeros((batch_size, self.inner), jnp.result_type(real, jnp.complex64) if self.use_complex else real)

    def mix(self, x, state):
        real = state_float(x.dtype)
        log_lambda = lower_bounded_log_forget(self.f_proj(x).astype(real), self.lower_bound)
        lam, one_minus_lam = jnp.exp(log_lambda), -jnp.expm1(log_lambda)
        c = jax.nn.silu(self.i_proj(x).astype(real))
        if self.use_complex:
            c_re, c_im = jnp.split(c, 2, axis=-1)
            a = lam * jnp.exp(1j * self.theta.astype(real))
            h, state = linear_scan_op(a, one_minus_lam * jax.lax.complex(c_re, c_im), initial_state=state,
                                   method=scan_method(self.method, x.shape[1]))
            h = jnp.concatenate([h.real, h.imag], axis=-1)
        else:
            h, state = linear_scan_op(lam, one_minus_lam * c, initial_state=state,
                                   method=scan_method(self.method, x.shape[1]))
        y = gated_rms_norm(h, self.g_proj(x).astype(real), self.norm_weight.astype(real), self.norm_eps)
        return self.out_proj(y.astype(x.dtype)), state
