"""Legendre Memory Unit (``"lmu"``) in its parallel, LTI-memory form.

Memory (Voelker, Kajic and Eliasmith, 2019, "Legendre Memory Units: Continuous-Time
Representation in Recurrent Neural Networks"): a fixed linear system that keeps the
Legendre coefficients (order ``q``) of a sliding window of length ``theta`` of a scalar
signal ``u``, the LegT state-space model::

    theta dm/dt = A m + B u,   A_ij = (2i + 1) * (-1 if i < j else (-1)^(i - j + 1)),
                               B_i  = (2i + 1) (-1)^i,           i, j = 0 .. q - 1

discretised with zero-order hold at ``dt = 1``: ``Abar = expm(A / theta)``,
``Bbar = (A / theta)^{-1} (Abar - I) B / theta``, ``m_t = Abar m_{t-1} + Bbar u_t``.

Layer (Chilkuri and Eliasmith, 2021, "Parallelizing Legendre Memory Unit Training"; as
used by LMUFormer, Liu, Datta, Kundu, Beerel et al., 2024, "LMUFormer: Low Complexity
Yet Powerful Spiking Model With Legendre Memory Units"): the recurrent connections of
the original LMU are dropped, so the memory is LTI and ``m = H * u`` is a causal
convolution with the impulse response ``H_t = Abar^t Bbar``::

    u_t = relu(W_u x_t + b_u)                       u in R^{d_u} (d_u = memory_dim, one
    m_t[i] = sum_{s <= t} H_{t-s} u_s[i]            memory of order q per input dim)
    o_t = relu(W_h [m_t; x_t] + b_h)
    y_t = W_o o_t + b_o                             (LMUFormer's output projection, no BN)

Evaluation (``method``): ``"fft"`` convolves with ``H`` by FFT
(:func:`ssmjax.scan.conv.fft_causal_convolution`; ``H`` computed once per length in
float64 by repeated squaring of ``Abar``); ``"scan"`` runs the recurrence with
:func:`ssmjax.scan.matrix_scan`. ``step`` and calls that continue a carried state, or
receive ``segment_ids`` / ``reset``, use the recurrence (matrix_scan).

Parameters (``d = d_model``, ``q = order``, ``d_u = memory_dim``)::

    (d + 1) d_u + (d_u q + d + 1) d + (d + 1) d
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssmjax.checks import check_choice
from ssmjax.layers.common import StepByCall, check_layer_input, state_float
from ssmjax.layers.hippo import (  # noqa: F401  (the LegT pieces live in hippo, shared with lmuformer)
    LEGENDRE_METHODS,
    legendre_impulse_response,
    legendre_memory,
    legendre_memory_sequence,
    legendre_state_space,
)
from ssmjax.layers.registry import register

LMU_METHODS = LEGENDRE_METHODS


@register("lmu")
class LMU(StepByCall):
    """Parallel Legendre Memory Unit (module docstring); ``order`` defaults to ``d_model``
    (LMUFormer's ``memory_size = dim``); parameters
    ``(d + 1) d_u + (d_u q + d + 1) d + (d + 1) d``."""

    d_model: int
    order: int | None = None
    theta: float = 128.0
    memory_dim: int = 1
    method: str = "fft"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def q(self) -> int:
        return self.order or self.d_model

    def setup(self):
        check_choice("method", self.method, LMU_METHODS)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        self.W_u = dense(self.memory_dim, name="W_u")
        self.W_h = dense(self.d_model, name="W_h")
        self.out_proj = dense(self.d_model, name="out_proj")
        self.drop = nn.Dropout(self.dropout)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        return dict(m=jnp.zeros((batch_size, self.memory_dim, self.q), state_float(dtype)))

    def __call__(self, x, *, state=None, return_state=False, segment_ids=None, reset=None):
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        batch, time, _ = x.shape
        u = jax.nn.relu(self.W_u(x))
        u = u.astype(state_float(u.dtype))
        m, m_last = legendre_memory_sequence(
            u, self.q, float(self.theta), initial_state=None if state is None else state["m"],
            method=self.method, segment_ids=segment_ids, reset=reset,
        )
        features = jnp.concatenate([m.reshape(batch, time, -1).astype(x.dtype), x], axis=-1)
        y = self.out_proj(jax.nn.relu(self.W_h(features)))
        y = self.drop(y, deterministic=self.deterministic)
        return (y, dict(m=m_last)) if return_state else y
