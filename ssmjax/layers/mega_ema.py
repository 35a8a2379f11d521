"""Multi-dimensional damped exponential moving average (``"mega_ema"``), the EMA
sub-layer of Mega (Ma, Zhou, Kong, He, Gui, Neubig, May and Zettlemoyer, 2023, "Mega:
Moving Average Equipped Gated Attention").

Every channel ``j`` of ``x in R^d`` is expanded to ``h = ndim`` dimensions and smoothed by a
damped EMA, then projected back (paper, eq. 2-3)::

    u_t^(j)  = beta_j * x_t[j]                                      beta_j  in R^h
    s_t^(j)  = alpha_j * u_t^(j) + (1 - alpha_j * delta_j) * s_{t-1}^(j)
    ema_t[j] = sqrt(1 / h) * eta_j . s_t^(j)
    y_t[j]   = silu(ema_t[j] + omega_j * x_t[j])

with ``alpha = sigmoid(alpha_param)``, ``delta = sigmoid(delta_param)`` in ``(0, 1)^{d x h}``.
The ``sqrt(1 / h)`` scale, the ``omega`` residual and the SiLU are those of Mega's
reference implementation (its ``MultiHeadEMA``; note that it names the paper's ``alpha``
``delta`` and vice versa). Initialisation as there: ``alpha, delta ~ N(0, 0.2)`` (logits),
``beta ~ N(+-1, 0.02)`` with signs ``+1, -1, +1, ...`` along ``h``, ``eta, omega ~ N(0, 1)``.

``bidirectional=True`` (Mega's bidirectional EMA, for classification) adds a second EMA
with its own ``alpha, delta, beta, eta`` run backwards in time; both directions include
the current token and their outputs are summed before the residual.

Evaluation (``method``): ``"scan"`` runs the recurrence as a real diagonal
:func:`ssmjax.scan.linear_scan` over the ``[b, t, d, h]`` states; ``"fft"`` (default) uses
that the EMA is LTI, as Mega does: ``ema = K * x`` with the kernel
``K_t[j] = sqrt(1/h) sum_h eta alpha beta q^t``, ``q = 1 - alpha delta``, by
:func:`ssmjax.scan.conv.fft_causal_convolution`, plus the closed forms of the carried
state, ``sqrt(1/h) sum_h eta q^(t+1) s_{-1}`` in the output and
``s_{T-1} = q^T s_{-1} + sum_t q^(T-1-t) alpha beta x_t``. It never forms the
``[b, t, d, h]`` states (at ``b, t, d, h = 8, 1024, 128, 16`` fwd+bwd: ~1.0 s scan vs
~0.23 s fft on 2 shared CPU cores). Packed sequences (``segment_ids`` / ``reset``) and
single steps use the scan.

Parameters: ``dirs * 4 d h + d`` (``dirs = 2`` if bidirectional else 1).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssmjax.checks import check_choice
from ssmjax.layers.common import DampedEMA, StepByCall, check_layer_input, no_state_when_bidirectional
from ssmjax.layers.registry import register

EMA_METHODS = ("fft", "scan")


@register("mega_ema")
class MegaEMA(StepByCall):
    """Mega's damped EMA sub-layer (module docstring); parameters ``dirs 4 d h + d``."""

    d_model: int
    ndim: int = 16
    bidirectional: bool = False
    method: str = "fft"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        check_choice("method", self.method, EMA_METHODS)
        make = functools.partial(DampedEMA, self.d_model, self.ndim, self.param_dtype)
        self.forward_ema = make(name="forward")
        self.backward_ema = make(name="backward") if self.bidirectional else None
        self.omega = self.param("omega", nn.initializers.normal(1.0), (self.d_model,), self.param_dtype)
        self.drop = nn.Dropout(self.dropout)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        return dict(s=jnp.zeros((batch_size, self.d_model, self.ndim), jnp.result_type(dtype, jnp.float32)))

    def __call__(self, x, *, state=None, return_state=False, segment_ids=None, reset=None):
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        no_state_when_bidirectional("mega_ema", self.bidirectional, state, return_state)
        out_dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        xr = x.astype(jnp.result_type(x.dtype, jnp.float32))
        s0 = None if state is None else state["s"]
        ema, s_last = self.forward_ema(xr, s0, False, segment_ids, reset, self.method)
        if self.backward_ema is not None:
            ema = ema + self.backward_ema(xr, None, True, segment_ids, reset, self.method)[0]
        y = jax.nn.silu(ema + self.omega.astype(xr.dtype) * xr).astype(out_dtype)
        y = self.drop(y, deterministic=self.deterministic)
        return (y, dict(s=s_last)) if return_state else y
