"""FSMN: the "RNN-free recurrent" module of MossFormer2, a dilated feedforward sequential
memory network with dense connections inside a gated convolutional unit.

Zhao, Ma, Ni, Zhang, Wang, Nguyen, Zhou, Yip, Ng and Ma, 2024, "MossFormer2: Combining
Transformer and RNN-Free Recurrent Network for Enhanced Time-Domain Monaural Speech
Separation" (the recurrent module: bottleneck, gated convolutional unit around a dilated
FSMN block with dense connections, output layer); the memory block is that of Zhang et
al., 2015, "Feedforward Sequential Memory Networks": ``m_t = sum_j a_j * h_{t - j}``, a
learned per-channel filter over the past, i.e. a depthwise convolution. ``E`` =
``inner_channels``, ``N`` = ``memory_order``, ``K`` = ``conv_size``, ``L`` =
``memory_layers``; ``LN`` is LayerNorm over channels (weight and bias), ``PReLU`` has
learned negative slopes (init 0.25)::

    h = LN(PReLU(W_in x + b_in))                                  bottleneck (1x1 conv)
    u = FFConv_u(h),  v = FFConv_v(h)                             gated conv unit (GCU)
        FFConv(h) = z + dwconv_K(z),  z = silu(W LN(h) + b)
    u = u + Memory(W_p relu(W_f u + b_f))                         dilated FSMN
    g = v * u + h
    y = W_out LN(g) + b_out                                       output layer

    Memory(p):  f_0 = p
      for i = 0 .. L-1 (dilation 2^i, dense connections to every earlier feature):
        m_i[c]_t = sum_{l <= i} sum_{j=0}^{N-1} w_i[l, j, c] f_l[c]_{t - j 2^i}
        f_{i+1} = PReLU_i(LN_i(m_i))
      return f_L

Every tap looks back only (``causal``; the step form carries the convolution histories:
``K - 1`` frames for each GCU branch and ``(N - 1) 2^i`` frames of all ``i + 1`` dense
inputs for memory layer ``i``). ``bidirectional=True`` makes every filter symmetric
(``2N - 1`` memory taps at lags ``-(N-1) 2^i .. (N-1) 2^i``, a centred ``K``-tap GCU
convolution) as in the non-causal separation model; it has no state. All convolutions
are :func:`ssmjax.scan.conv.causal_conv1d` (a dilated filter runs undilated on the
``2^i`` interleaved phases of the sequence; a symmetric one is the causal one read
``lookahead`` frames later).

Departures from the released separation model: its memory layers normalise with
InstanceNorm over *time*, which is non-causal and has no step form; here they use LN over
channels per frame (the normalisation MossFormer2 uses everywhere else). The module
returns ``y`` without the input added (the backbone's residual block adds it).

Parameters (``d = d_model``)::

    (d + 1) E + 1 + 2 E                                   bottleneck + LN
    2 (2 E + (E + 1) E + K E)                             two FFConv branches
    (E + 1) E + E^2                                       W_f, W_p
    sum_i ((i + 1) E T + 3 E),  T = N (causal) or 2N - 1  memory layers (+ LN, PReLU)
    2 E + (E + 1) d                                       output LN + layer
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from ssmjax.layers.common import (
    StepByCall,
    check_layer_input,
    dilated_causal_conv,
    no_state_when_bidirectional,
    output_dropout,
    uniform_init,
)
from ssmjax.layers.registry import register


def prelu(x: Array, slope: Array) -> Array:
    return jnp.where(x >= 0, x, slope * x)


@register("fsmn")
class FSMN(StepByCall):
    """MossFormer2's dilated-FSMN recurrent module (module docstring); state: the
    convolution histories ``dict(conv_u, conv_v, memory=[...])``."""

    d_model: int
    inner_channels: int | None = None
    memory_order: int = 20
    memory_layers: int = 2
    conv_size: int = 17
    bidirectional: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def _inner(self) -> int:
        return self.inner_channels or self.d_model

    @property
    def _memory_taps(self) -> int:
        return 2 * self.memory_order - 1 if self.bidirectional else self.memory_order

    def _check(self) -> None:
        for name in ("memory_order", "memory_layers", "conv_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.bidirectional and self.conv_size % 2 == 0:
            raise ValueError(f"conv_size: a centred (bidirectional) filter needs an odd size, got {self.conv_size}")

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        e = self._inner
        conv = jnp.zeros((batch_size, self.conv_size - 1, e), dtype)
        memory = [jnp.zeros((batch_size, (self.memory_order - 1) * 2**i, (i + 1) * e), dtype)
                  for i in range(self.memory_layers)]
        return dict(conv_u=conv, conv_v=conv, memory=memory)

    def __call__(self, x, *, state=None, return_state: bool = False):
        """``x [batch, time, d_model]`` -> ``y`` (and the new convolution histories)."""
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        self._check()
        no_state_when_bidirectional("fsmn", self.bidirectional, state, return_state)
        if state is None and not self.bidirectional:
            state = self.init_state(x.shape[0], x.dtype)
        y, new_state = self.mix(x, state)
        y = output_dropout(self, y)
        return (y, new_state) if return_state else y

    def _dense(self, features: int, name: str, use_bias: bool = True) -> nn.Module:
        return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _norm(self, name: str) -> nn.Module:
        return nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _filter(self, x, name: str, taps: int, dilation: int, history, fan_in_groups: int = 1):
        weight = self.param(name, uniform_init(1.0 / math.sqrt(taps * fan_in_groups)), (taps, x.shape[-1]),
                            self.param_dtype)
        lookahead = (taps // 2) * dilation if self.bidirectional else 0
        y, new = dilated_causal_conv(x, weight, dilation, history, lookahead)
        return y, (None if new is None else new.astype(history.dtype))

    def _ffconv(self, h, branch: str, history):
        """``z + dwconv_K(z)``, ``z = silu(W LN(h) + b)`` (MossFormer2's FFConvM)."""
        z = jax.nn.silu(self._dense(self._inner, f"to_{branch}")(self._norm(f"to_{branch}_norm")(h)))
        conv, history = self._filter(z, f"conv_{branch}", self.conv_size, 1, history)
        return z + conv, history

    def _memory(self, p, histories):
        """The dilated FSMN block with dense connections (module docstring)."""
        features, new_histories = [p], []
        for i in range(self.memory_layers):
            dense_input = jnp.concatenate(features, axis=-1)  # [b, t, (i + 1) E]
            history = None if histories is None else histories[i]
            m, history = self._filter(dense_input, f"memory_{i}", self._memory_taps, 2**i, history, i + 1)
            m = m.reshape(m.shape[:-1] + (i + 1, self._inner)).sum(-2)
            slope = self.param(f"memory_{i}_prelu", nn.initializers.constant(0.25), (self._inner,), self.param_dtype)
            features.append(prelu(self._norm(f"memory_{i}_norm")(m), slope.astype(m.dtype)))
            new_histories.append(history)
        return features[-1], new_histories

    @nn.compact
    def mix(self, x, state):
        e = self._inner
        slope = self.param("in_prelu", nn.initializers.constant(0.25), (), self.param_dtype)
        h = self._norm("in_norm")(prelu(self._dense(e, "in_proj")(x), slope.astype(x.dtype)))
        u, conv_u = self._ffconv(h, "u", None if state is None else state["conv_u"])
        v, conv_v = self._ffconv(h, "v", None if state is None else state["conv_v"])
        p = self._dense(e, "fsmn_project", use_bias=False)(jax.nn.relu(self._dense(e, "fsmn_linear")(u)))
        memory, histories = self._memory(p, None if state is None else state["memory"])
        g = v * (u + memory) + h
        y = self._dense(self.d_model, "out_proj")(self._norm("out_norm")(g))
        new_state = None if state is None else dict(conv_u=conv_u, conv_v=conv_v, memory=histories)
        return y, new_state
