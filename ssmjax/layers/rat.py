"""RAT: recurrence inside chunks, softmax attention across chunk summaries.

Wei, Yadav, Pascanu and Gulcehre, 2025, "RAT: Bridging RNN Efficiency and Attention
Accuracy in Language Modeling" (NeurIPS 2025 as "... via Chunk-based Sequence Modeling").
The sequence is cut into chunks of ``L = chunk_size`` tokens (aligned to absolute
positions). With ``c(t)`` the chunk of token ``t`` and per-channel forget gate ``g_t``::

    z_t, x_t, g_t, q_t, k_t = split(W_in x_t)          (q, k: G shared groups of d_h channels)
    g_t = sigmoid(g_t + b_g)                            (b_g = log U(1, L - 1) at init)
    kt_t = g_t * kt_{t-1} + (1 - g_t) * k_t             (reset at every chunk start)
    vt_t = g_t * vt_{t-1} + (1 - g_t) * x_t
    K_c, V_c = kt, vt at the last token of chunk c      (chunk summaries)
    o_t = softmax([q_t . R(K_j)]_{j < c(t)} ++ [q_t . R(kt_t)]) [V_j ; vt_t] / sqrt(d_h)
    y_t = W_out (sigmoid(z_t) * o_t)

per head (head ``h`` uses q/k group ``h mod G``; the gate acts on each head's own
channels). ``R`` is the chunk-level rotary embedding of the paper's code ("inter-chunk
RoPE"): queries, own states and summaries of chunk ``c`` are rotated by angle ``c``.
The intra-chunk recurrence is :func:`ssmjax.scan.linear.linear_scan` with resets at chunk
starts; the attention over summaries is
:func:`ssmjax.scan.chunk_summary.attend_chunk_summaries` (a masked softmax with one extra,
per-query key: the running state).

Step form / state: only the chunk summaries are cached (``max_len / L`` slots), plus the
running ``(kt, vt)`` of the current chunk and the absolute position, so generation needs
``O(T / L)`` memory and any split of a sequence continues exactly. The cache has
``ceil(max_len / L)`` slots: stateful calls and ``step`` support ``max_len`` tokens (the
stateless parallel call has no limit).

Parameters: ``4 d^2 + 2 G d_h d + d`` (``W_in``: ``d (3 d + 2 G d_h)``, gate bias ``d``,
``W_out``: ``d^2``; no other biases).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Bool, Float

from ssmjax.layers.common import StepByCall, rotary_embedding
from ssmjax.layers.registry import register
from ssmjax.scan.chunk_summary import attend_chunk_summaries
from ssmjax.scan.linear import linear_scan


@jax.jit
def intra_chunk_recurrence(
    gate: Float[Array, "b t d"], inputs: Float[Array, "b t 2 d"], chunk_start: Bool[Array, "b t"], initial_state
):
    """``h_t = g_t * h_{t-1} + (1 - g_t) * u_t`` for ``u = (values, keys)``, restarting where
    ``chunk_start``; jitted so that eager step-by-step decoding reuses the compiled scan."""
    return linear_scan(gate[:, :, None], (1.0 - gate[:, :, None]) * inputs, reset=chunk_start,
                       initial_state=initial_state)


@register("rat")
class RAT(StepByCall):
    """RAT layer (module docstring)."""

    d_model: int
    num_heads: int = 4
    qk_groups: int = 2
    chunk_size: int = 16
    max_len: int = 2048
    rope_base: float | None = 10000.0
    dtype: Any = None  # computation dtype; None: the input's (promoted with the params')
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads: must divide d_model = {self.d_model}, got {self.num_heads}")
        if self.num_heads % self.qk_groups:
            raise ValueError(f"qk_groups: must divide num_heads = {self.num_heads}, got {self.qk_groups}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive int, got {self.chunk_size}")
        d, head = self.d_model, self.d_model // self.num_heads
        self.in_proj = nn.Dense(3 * d + 2 * self.qk_groups * head, use_bias=False,
                                dtype=self.dtype, param_dtype=self.param_dtype)
        self.gate_bias = self.param("gate_bias", self._gate_bias_init, (d,), self.param_dtype)
        self.out_proj = nn.Dense(d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)

    def _gate_bias_init(self, key, shape, dtype):
        """``log U(1, L - 1)``: initial gates sigmoid(b) in [1/2, (L-1)/L] (paper's code)."""
        if self.chunk_size <= 2:
            return jnp.zeros(shape, dtype)
        return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, self.chunk_size - 1.0))

    @property
    def _max_chunks(self) -> int:
        return math.ceil(self.max_len / self.chunk_size)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        head = self.d_model // self.num_heads
        cache = jnp.zeros((batch_size, self._max_chunks, self.num_heads, head), dtype)
        return dict(k=cache, v=cache, h=jnp.zeros((batch_size, 2, self.d_model), jnp.promote_types(jnp.float32, dtype)),
                    pos=jnp.zeros((), jnp.int32))

    def _project(self, x):
        batch, time, d = x.shape
        head, groups = d // self.num_heads, self.qk_groups
        z, values, gate, q, k = jnp.split(self.in_proj(x), [d, 2 * d, 3 * d, 3 * d + groups * head], -1)
        tile = lambda u: jnp.tile(u, (1, 1, self.num_heads // groups))  # noqa: E731  head h <- group h % G
        gate = nn.sigmoid((gate + self.gate_bias).astype(jnp.promote_types(jnp.float32, gate.dtype)))
        return nn.sigmoid(z), values, gate, tile(q).reshape(batch, time, self.num_heads, head), tile(k)

    def __call__(self, x: Float[Array, "b t d"], *, state: dict | None = None, return_state: bool = False):
        batch, time, d = x.shape
        head, L = d // self.num_heads, self.chunk_size
        z, values, gate, q, k = self._project(x)
        start = jnp.zeros((), jnp.int32) if state is None else state["pos"]
        positions = start + jnp.arange(time)
        chunk_of = positions // L
        chunk_start = jnp.broadcast_to(positions % L == 0, (batch, time))
        # Intra-chunk recurrence of values and keys, one gate per channel.
        inputs = jnp.stack([values, k], 2).astype(gate.dtype)  # [b, t, 2, d], at least float32
        running, h_last = intra_chunk_recurrence(gate, inputs, chunk_start, None if state is None else state["h"])
        running = running.astype(values.dtype).reshape(batch, time, 2, self.num_heads, head)
        v_run, k_run = running[:, :, 0], running[:, :, 1]
        q, k_run = self._rotate(q, chunk_of), self._rotate(k_run, chunk_of)
        complete = positions % L == L - 1
        if state is None and not return_state:
            n = time // L  # summaries written by this call only
            k_sum, v_sum = k_run[:, L - 1 :: L], v_run[:, L - 1 :: L]
            o = attend_chunk_summaries(q, k_sum, v_sum, jnp.arange(n)[None] < chunk_of[:, None], k_run, v_run)
        else:
            if state is None:
                state = self.init_state(batch, x.dtype)
            slot = jnp.where(complete, chunk_of, self._max_chunks)  # out of range: dropped
            cache_k = state["k"].at[:, slot].set(k_run.astype(state["k"].dtype), mode="drop")
            cache_v = state["v"].at[:, slot].set(v_run.astype(state["v"].dtype), mode="drop")
            visible = jnp.arange(self._max_chunks)[None] < chunk_of[:, None]
            o = attend_chunk_summaries(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), visible, k_run, v_run)
            state = dict(k=cache_k, v=cache_v, h=h_last, pos=start + time)
        y = self.out_proj(z * o.reshape(batch, time, d))
        return (y, state) if return_state else y

    def _rotate(self, x, chunk_of):
        return x if self.rope_base is None else rotary_embedding(x, chunk_of, self.rope_base)
