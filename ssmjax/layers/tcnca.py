"""TCNCA: a dilated temporal convolution network with chunked attention, and the MEGA block.

Terzic, Hersche, Karunaratne, Benini, Sebastian and Rahimi, 2023, "TCNCA: Temporal
Convolution Network with Chunked Attention for Scalable Sequence Processing", replaces the
damped-EMA of MEGA (Ma et al., 2023, "Mega: Moving Average Equipped Gated Attention") by a
dilated causal temporal convolution network and keeps MEGA's gated, chunked attention.
``temporal = "tcn"`` (default) is TCNCA, ``temporal = "ema"`` the MEGA-chunk block.

Temporal mixing ``x' = T(x)``:

* ``"tcn"``: ``D = tcn_depth`` residual blocks of depthwise causal convolutions of width
  ``K = tcn_kernel_size`` and dilation ``f^i`` (``f = tcn_dilation_base``),
  ``u_{i+1} = u_i + silu(conv_{f^i}(u_i) + b_i)``, ``x' = u_D`` (receptive field
  ``1 + (K - 1)(f^D - 1)/(f - 1)``). Each dilated convolution is
  :func:`ssmjax.layers.common.dilated_causal_conv` (undilated convolutions over ``f^i`` phases).
* ``"ema"``: MEGA's multi-dimensional damped EMA (``N = ema_dim`` per channel),
  ``h_t = alpha * (beta x_t) + (1 - alpha delta) * h_{t-1}``, ``y_t = eta . h_t / sqrt(N)``,
  ``x' = silu(y + omega x)``, with ``alpha, delta = sigmoid(.)``; the recurrence is
  :func:`ssmjax.scan.linear.linear_scan`.

Gated chunked attention (MEGA, single head, ``Z = qk_dim``, ``V = expansion * d``)::

    v = silu(x W_v + b_v)                              [V]
    phi, z, r, hx = split(x' W_x + b_x)               [d], [Z], [V], [d]
    phi = sigmoid(phi), z = silu(z), r = silu(r)
    q = z * g_q + m_q,  k = z * g_k + m_k
    o_t = softmax_{s in chunk(t), s <= t}(q_t . k_s / sqrt(Z)) v_s       (chunks of chunk_size)
    h = silu(hx + (r * o) W_h + b_h)
    y = phi * h + (1 - phi) * x

The attention is :func:`ssmjax.scan.chunk_attention.chunked_attention_with_cache`.
The array helpers are jitted (static dilation / chunk) so that eager decoding reuses them.
MEGA's relative position bias is not used (the temporal mixer carries position). The step
state holds the convolution histories (or the EMA state) and the keys/values of the
current partial chunk (the local KV window), so any split of a sequence continues exactly.

Parameters (``Z = qk_dim``, ``V = expansion * d``):
``2 d V + V + (d + 1)(Z + V + 2 d) + 4 Z + d`` plus ``D (K + 1) d`` for ``"tcn"`` or
``4 d N + d`` for ``"ema"``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float

from ssmjax.layers.common import StepByCall, compiled, dilated_causal_conv
from ssmjax.layers.registry import register
from ssmjax.scan.chunk_attention import chunked_attention_with_cache
from ssmjax.scan.linear import linear_scan


#: :func:`ssmjax.scan.chunk_attention.chunked_attention_with_cache` compiled per shape.
chunked_attention_op = compiled(chunked_attention_with_cache, "chunk")


@jax.jit
def damped_ema(
    decay: Float[Array, "d n"], inputs: Float[Array, "b t d n"], initial_state: Float[Array, "b d n"] | None
) -> tuple[Float[Array, "b t d n"], Float[Array, "b d n"]]:
    """``h_t = decay * h_{t-1} + inputs_t`` (MEGA's EMA after the input scaling); jitted so
    that eager step-by-step decoding reuses the compiled scan."""
    return linear_scan(decay, inputs, initial_state=initial_state)


@register("tcnca")
class TCNCA(StepByCall):
    """TCNCA / MEGA-chunk layer (module docstring)."""

    d_model: int
    temporal: str = "tcn"
    qk_dim: int | None = None  # default max(1, d_model // 4)
    expansion: int = 2
    chunk_size: int = 16
    tcn_kernel_size: int = 3
    tcn_dilation_base: int = 2
    tcn_depth: int = 4
    ema_dim: int = 16
    dtype: Any = None  # computation dtype; None: the input's (promoted with the params')
    param_dtype: Any = jnp.float32

    @property
    def _z(self) -> int:
        return self.qk_dim or max(1, self.d_model // 4)

    @property
    def _dilations(self) -> list[int]:
        return [self.tcn_dilation_base**i for i in range(self.tcn_depth)]

    def setup(self):
        if self.temporal not in ("tcn", "ema"):
            raise ValueError(f"temporal: expected 'tcn' or 'ema', got {self.temporal!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive int, got {self.chunk_size}")
        d, e = self.d_model, self.expansion * self.d_model
        dense = lambda n: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype)  # noqa: E731
        self.v_proj = dense(e)
        self.mx_proj = dense(2 * d + self._z + e)
        self.h_proj = dense(d)
        self.qk_scale = self.param("qk_scale", nn.initializers.normal(0.02), (2, self._z), self.param_dtype)
        self.qk_offset = self.param("qk_offset", nn.initializers.zeros, (2, self._z), self.param_dtype)
        if self.temporal == "tcn":
            conv_init = nn.initializers.lecun_normal(in_axis=0, out_axis=1)
            self.tcn_weights = [self.param(f"tcn_{i}", conv_init, (self.tcn_kernel_size, d), self.param_dtype)
                                for i in range(self.tcn_depth)]
            self.tcn_biases = [self.param(f"tcn_bias_{i}", nn.initializers.zeros, (d,), self.param_dtype)
                               for i in range(self.tcn_depth)]
        else:  # MEGA's initialisation
            n = self.ema_dim
            self.ema_alpha = self.param("ema_alpha", nn.initializers.normal(0.2), (d, n), self.param_dtype)
            self.ema_delta = self.param("ema_delta", nn.initializers.normal(0.2), (d, n), self.param_dtype)
            signs = jnp.where(jnp.arange(n) % 2 == 1, -1.0, 1.0)
            self.ema_beta = self.param(
                "ema_beta", lambda key, s, dt: (signs + 0.02 * jax.random.normal(key, s)).astype(dt), (d, n),
                self.param_dtype)
            self.ema_eta = self.param("ema_eta", nn.initializers.normal(1.0), (d, n), self.param_dtype)
            self.ema_omega = self.param("ema_omega", nn.initializers.normal(1.0), (d,), self.param_dtype)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        d, e, c = self.d_model, self.expansion * self.d_model, self.chunk_size
        if self.temporal == "tcn":
            temporal = tuple(jnp.zeros((batch_size, (self.tcn_kernel_size - 1) * f, d), dtype)
                             for f in self._dilations)
        else:
            temporal = jnp.zeros((batch_size, d, self.ema_dim), jnp.promote_types(jnp.float32, dtype))
        return dict(temporal=temporal, k=jnp.zeros((batch_size, c, self._z), dtype),
                    v=jnp.zeros((batch_size, c, e), dtype), pos=jnp.zeros((), jnp.int32))

    def _tcn(self, x, histories):
        new = []
        for w, b, f, h in zip(self.tcn_weights, self.tcn_biases, self._dilations, histories, strict=True):
            y, h = dilated_causal_conv(x, w, f, h)
            x = x + nn.silu(y + b.astype(x.dtype))
            new.append(h)
        return x, tuple(new)

    def _ema(self, x, state):
        alpha, delta = nn.sigmoid(self.ema_alpha), nn.sigmoid(self.ema_delta)
        acc = jnp.promote_types(jnp.float32, x.dtype)  # the EMA state accumulates in >= float32
        inputs = (alpha * self.ema_beta).astype(acc) * x.astype(acc)[..., None]  # [b, t, d, N]
        h, h_last = damped_ema((1.0 - alpha * delta).astype(acc), inputs, state)
        y = jnp.einsum("btdn,dn->btd", h, self.ema_eta) / jnp.sqrt(self.ema_dim)
        return nn.silu(y.astype(x.dtype) + self.ema_omega.astype(x.dtype) * x), h_last

    def __call__(self, x: Float[Array, "b t d"], *, state: dict | None = None, return_state: bool = False):
        batch, time, d = x.shape
        e, z_dim = self.expansion * d, self._z
        stateful = state is not None or return_state
        if stateful and state is None:
            state = self.init_state(batch, x.dtype)
        if self.temporal == "tcn":
            histories = state["temporal"] if stateful else tuple(
                jnp.zeros((batch, (self.tcn_kernel_size - 1) * f, d), x.dtype) for f in self._dilations)
            mixed, temporal = self._tcn(x, histories)
        else:
            mixed, temporal = self._ema(x, state["temporal"] if stateful else None)
        v = nn.silu(self.v_proj(x))
        phi, z, r, hx = jnp.split(self.mx_proj(mixed), [d, d + z_dim, d + z_dim + e], -1)
        phi, z, r = nn.sigmoid(phi), nn.silu(z), nn.silu(r)
        q = z * self.qk_scale[0] + self.qk_offset[0]
        k = z * self.qk_scale[1] + self.qk_offset[1]
        if stateful:
            o, cache_k, cache_v = chunked_attention_op(
                q, k, v, state["k"], state["v"], state["pos"], self.chunk_size)
        else:
            o, _, _ = chunked_attention_op(q, k, v, None, None, jnp.zeros((), jnp.int32), self.chunk_size)
        h = nn.silu(hx + self.h_proj(r * o))
        y = phi * h + (1.0 - phi) * x
        if not return_state:
            return y
        return y, dict(temporal=temporal, k=cache_k, v=cache_v, pos=state["pos"] + time)
