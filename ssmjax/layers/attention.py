"""Softmax attention (Vaswani et al., 2017, "Attention Is All You Need") with rotary
position embeddings (Su et al., 2021, "RoFormer") and an optional sliding window
(Beltagy et al., 2020, "Longformer"), as the full-attention mixer of hybrids.

    q_i, k_j = RoPE(W_q x_i, i), RoPE(W_k x_j, j)
    o_i = sum_{j in window(i)} softmax_j(q_i . k_j / sqrt(d_head)) W_v x_j,   y = W_o o

``window(i) = {j : i - window < j <= i}`` (all ``j <= i`` when ``window`` is ``None``).
``bidirectional=True`` lets every position attend to every other (the encoder of the LRA
Transformer baseline and of ViT; no window, no recurrent state).
The recurrent state is a key/value cache of ``max_len`` slots plus the position of the
next token, so ``step`` decodes one token at a time and ``__call__`` continues a cached
prefix. Without a cache the computation is :func:`ssmjax.scan.causal_softmax_attention`
(ring attention under :func:`ssmjax.distributed.sequence_parallel`); with one,
``jax.nn.dot_product_attention`` over the cache slots.

Parameters: ``4 d_model^2`` (no biases).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float

from ssmjax.layers.common import StepByCall, no_state_when_bidirectional, rotary_embedding
from ssmjax.layers.registry import register
from ssmjax.scan.softmax_attention import causal_softmax_attention, causal_softmax_attention_core


@register("attention")
class Attention(StepByCall):
    """Multi-head softmax attention with RoPE and a KV-cache step, causal unless
    ``bidirectional`` (module docstring)."""

    d_model: int
    num_heads: int = 4
    window: int | None = None
    bidirectional: bool = False
    rope_base: float = 10000.0
    max_len: int = 2048
    dtype: Any = None  # computation dtype; None: the input's (promoted with the params')
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads: must divide d_model = {self.d_model}, got {self.num_heads}")
        dense = lambda: nn.DenseGeneral(  # noqa: E731
            (self.num_heads, self.d_model // self.num_heads), use_bias=False,
            dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj, self.k_proj, self.v_proj = dense(), dense(), dense()
        self.out_proj = nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False,
                                        dtype=self.dtype, param_dtype=self.param_dtype)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        shape = (batch_size, self.max_len, self.num_heads, self.d_model // self.num_heads)
        return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), pos=jnp.zeros((), jnp.int32))

    def __call__(self, x: Float[Array, "b t d"], *, state: dict | None = None, return_state: bool = False):
        batch, time, _ = x.shape
        no_state_when_bidirectional("attention", self.bidirectional, state, return_state)
        if self.bidirectional and self.window is not None:
            raise ValueError(f"window: a bidirectional attention has no sliding window, got window={self.window}")
        start = jnp.zeros((), jnp.int32) if state is None else state["pos"]
        positions = start + jnp.arange(time)
        q = rotary_embedding(self.q_proj(x), positions, self.rope_base)
        k = rotary_embedding(self.k_proj(x), positions, self.rope_base)
        v = self.v_proj(x)
        if self.bidirectional:  # the masked core with every key visible (float64 stays float64)
            scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
            o = causal_softmax_attention_core(q, k, v, jnp.ones((1, 1, time, time), bool), scale)
        elif state is None and not return_state:
            o = causal_softmax_attention(q, k, v, window=self.window)
        else:
            if state is None:
                state = self.init_state(batch, x.dtype)
            cache_k = jax.lax.dynamic_update_slice_in_dim(state["k"], k.astype(state["k"].dtype), start, axis=1)
            cache_v = jax.lax.dynamic_update_slice_in_dim(state["v"], v.astype(state["v"].dtype), start, axis=1)
            slots = jnp.arange(self.max_len)
            o = self._attend(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), positions, slots)
            state = dict(k=cache_k, v=cache_v, pos=start + time)
        y = self.out_proj(o)
        return (y, state) if return_state else y

    def _attend(self, q, k, v, q_pos, k_pos):
        visible = k_pos[None, :] <= q_pos[:, None]
        if self.window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - self.window
        # the masked core rather than jax.nn.dot_product_attention, whose softmax runs in float32 even for float64
        return causal_softmax_attention_core(q, k, v, visible[None, None], jnp.asarray(q.shape[-1] ** -0.5, q.dtype))
