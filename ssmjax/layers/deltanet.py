"""DeltaNet and Gated DeltaNet layers: a matrix memory written with the delta rule,
evaluated by :func:`ssmjax.scan.delta.delta_rule` (chunked WY form in ``__call__``, one
token in ``step``).

``deltanet`` (Yang, Wang, Zhang, Shen and Kim, 2024, "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length"; layer as flash-linear-attention's ``DeltaNet``),
``H`` heads of key size ``dk`` and value size ``dv = expand_v dk``, ``d = d_model``::

    q, k, v  = swish(conv_4(W_q x)), swish(conv_4(W_k x)), swish(conv_4(W_v x))   (short convs)
    q, k     = q / |q|, k / |k|                                (L2 per head)
    beta_t   = sigmoid(W_b x_t)                                one per head
    S_t      = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t      = dk^-1/2 S_t^T q_t
    y        = W_o RMSNorm_head(o)
    params   d (2 H dk + H dv + H) + conv_size (2 H dk + H dv) + dv + H dv d

``gated_deltanet`` (Yang, Kautz and Hatamizadeh, 2025, "Gated Delta Networks: Improving
Mamba2 with Delta Rule") adds a per-head scalar decay with Mamba-2's parameterisation and an
output gate::

    alpha_t  = exp(g_t),  g_t = -exp(A_log) softplus(W_a x_t + dt_bias)
    S_t      = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    y        = W_o (RMSNorm_head(o) * swish(W_g x))
    params   deltanet's + d H + 2 H + d H dv

``A ~ U(0, 16)`` (``A_log = log A``), ``dt_bias`` the inverse softplus of
``dt ~ exp(U(log 0.001, log 0.1))`` floored at ``1e-4``; ``expand_v = 2`` by default
(``1`` for ``deltanet``). ``allow_neg_eigval=True`` doubles ``beta`` (eigenvalues of
``I - beta k k^T`` in ``[-1, 1]``; Grazzi et al., 2024). The three short convolutions are
one depthwise convolution over the concatenated ``[q, k, v]`` channels (same parameters,
one state).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ssmjax.layers.common import (
    dt_bias_init,
    log_uniform_init,
    RecurrentMixer,
    check_heads,
    delta_rule_op,
    dense,
    gated_rms_norm,
    l2_normalize,
    ones_param,
    rms_norm,
    scan_method,
    short_conv,
    short_conv_params,
    split_heads,
    state_float,
)
from ssmjax.layers.registry import register


class _DeltaRuleMixer(RecurrentMixer):
    """Shared DeltaNet / Gated DeltaNet layer; ``gated`` switches the decay and output gate."""

    gated = False

    @property
    def head_dims(self) -> tuple[int, int]:
        dk = self.head_dim or check_heads("num_heads", self.d_model, self.num_heads)
        dv = int(self.expand_v * dk)
        if dv != self.expand_v * dk:
            raise ValueError(f"expand_v: expand_v * head_dim must be an integer, got {self.expand_v} * {dk}")
        return dk, dv

    @property
    def conv_channels(self) -> int:
        dk, dv = self.head_dims
        return self.num_heads * (2 * dk + dv)

    def setup(self):
        dk, dv = self.head_dims
        H = self.num_heads
        self.qkv_proj = dense(self.conv_channels, self, "qkv_proj")
        self.conv_w, _ = short_conv_params(self, self.conv_size, self.conv_channels, bias=False)
        self.b_proj = dense(H, self, "b_proj")
        self.norm_weight = ones_param(self, "norm_weight", dv)
        if self.gated:
            self.a_proj = dense(H, self, "a_proj")
            self.A_log = self.param("A_log", log_uniform_init(0.0, 16.0), (H,), self.param_dtype)
            self.dt_bias = self.param("dt_bias", dt_bias_init(0.001, 0.1, 1e-4), (H,), self.param_dtype)
            self.g_proj = dense((H, dv), self, "g_proj")
        self.out_proj = dense(self.d_model, self, "out_proj", axis=(-2, -1))

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        dk, dv = self.head_dims
        return dict(conv=jnp.zeros((batch_size, self.conv_size - 1, self.conv_channels), dtype),
                    S=jnp.zeros((batch_size, self.num_heads, dk, dv), state_float(dtype)))

    def log_decay(self, x):
        """``g = -exp(A_log) softplus(W_a x + dt_bias)`` ``[batch, time, heads]``."""
        real = state_float(x.dtype)
        dt = jax.nn.softplus(self.a_proj(x).astype(real) + self.dt_bias.astype(real))
        return -jnp.exp(self.A_log.astype(real)) * dt

    def mix(self, x, state):
        dk, dv = self.head_dims
        H = self.num_heads
        real = state_float(x.dtype)
        qkv, conv_state = short_conv(self.qkv_proj(x), self.conv_w, None, state["conv"])
        q, k, v = jnp.split(qkv, [H * dk, 2 * H * dk], axis=-1)
        q, k = l2_normalize(split_heads(q, H)), l2_normalize(split_heads(k, H))
        beta = jax.nn.sigmoid(self.b_proj(x).astype(real)) * (2.0 if self.allow_neg_eigval else 1.0)
        o, S = delta_rule_op(q, k, split_heads(v, H), beta, log_decay=self.log_decay(x) if self.gated else None,
                          initial_state=state["S"], chunk_size=self.chunk_size,
                          method=scan_method(self.method, x.shape[1]))
        weight = self.norm_weight.astype(real)
        if self.gated:
            o = gated_rms_norm(o, self.g_proj(x).astype(real), weight, self.norm_eps)
        else:
            o = rms_norm(o, weight, self.norm_eps)
        return self.out_proj(o.astype(x.dtype)), dict(conv=conv_state, S=S)


@register("deltanet")
class DeltaNet(_DeltaRuleMixer):
    """DeltaNet layer (module docstring); parameters
    ``d (2 H dk + H dv + H) + conv_size (2 H dk + H dv) + dv + H dv d``."""

    d_model: int
    num_heads: int = 4
    head_dim: int | None = None
    expand_v: float = 1.0
    conv_size: int = 4
    allow_neg_eigval: bool = False
    norm_eps: float = 1e-5
    chunk_size: int = 64
    method: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32


@register("gated_deltanet")
class GatedDeltaNet(_DeltaRuleMixer):
    """Gated DeltaNet layer (module docstring); parameters DeltaNet's
    ``+ d H + 2 H + d H dv``."""

    gated = True

    d_model: int
    num_heads: int = 4
    head_dim: int | None = None
    expand_v: float = 2.0
    conv_size: int = 4
    allow_neg_eigval: bool = False
    norm_eps: float = 1e-5
    chunk_size: int = 64
    method: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

