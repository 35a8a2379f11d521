"""Aaren: attention with a learned query, computed as an RNN (Feng, Tung, Ahmed, Bengio and
Hajimirsadeghi, 2024, "Attention as an RNN").

Per head ``h`` (``H`` heads of size ``dh = d / H``, ``d = d_model``), a learned query
token ``q_h`` attends over the prefix of keys and values computed from the inputs::

    k_t, v_t = W_k x_t, W_v x_t
    s_t      = q_h . k_t / sqrt(dh)
    o_t      = sum_{i <= t} exp(s_i) v_i / sum_{i <= t} exp(s_i)
    y_t      = W_o o_t

The prefix softmax is :func:`ssmjax.scan.prefix_softmax_attention`: the state is the
stabilised summary ``(m, num, den)`` (running max, ``sum exp(s_i - m) v_i``,
``sum exp(s_i - m)``) of ``O(H dh)`` floats, whatever the length, so ``step`` runs in
constant memory (the paper's many-to-many RNN), and ``__call__`` evaluates all prefixes
(sequentially on CPU, by the associative scan elsewhere).

Parameters: ``3 d^2 + d`` (the queries ``[H, dh]`` and three projections, no biases).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssmjax.layers.common import RecurrentMixer, check_heads, dense, prefix_softmax_op, state_float
from ssmjax.layers.registry import register
from ssmjax.scan.softmax_attention import SoftmaxState, empty_softmax_state


@register("aaren")
class Aaren(RecurrentMixer):
    """Aaren layer (module docstring); parameters ``3 d^2 + d``."""

    d_model: int
    num_heads: int = 4
    method: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        dh = check_heads("num_heads", self.d_model, self.num_heads)
        self.query = self.param("query", nn.initializers.normal(1.0), (self.num_heads, dh), self.param_dtype)
        self.k_proj = dense((self.num_heads, dh), self, "k_proj")
        self.v_proj = dense((self.num_heads, dh), self, "v_proj")
        self.out_proj = dense(self.d_model, self, "out_proj", axis=(-2, -1))

    def init_state(self, batch_size: int, dtype=jnp.float32) -> SoftmaxState:
        return empty_softmax_state(batch_size, self.num_heads, self.d_model // self.num_heads, state_float(dtype))

    def mix(self, x, state):
        k, v = self.k_proj(x), self.v_proj(x)
        scores = jnp.einsum("bthd,hd->bth", k, self.query.astype(k.dtype)) * (k.shape[-1] ** -0.5)
        o, state = prefix_softmax_op(scores, v, initial_state=state, method=self.method)
        return self.out_proj(o.astype(x.dtype)), state
