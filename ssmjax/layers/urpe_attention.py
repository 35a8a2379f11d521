"""Softmax attention with a relative position bias and a universal relative position
encoding (URPE; Luo et al., 2022, "Your Transformer May Not be as Powerful as You Expect").

Per head, with ``i`` the query and ``j`` the key position::

    A_ij = softmax_j( q_i . k_j / sqrt(d_head) + b_{j-i} )        (RPE attention)
    o_i  = sum_j A_ij c_{j-i} v_j,      i.e.  O = (A ⊙ C) V,  C_ij = c_{j-i}   (URPE)
    y    = W_o [o^1; ...; o^H]

``b_{j-i}`` is a learned scalar per head and relative offset (the relative position bias;
Shaw et al., 2018 / Raffel et al., 2020, without buckets) and ``C`` is a learned Toeplitz
matrix per head, multiplied elementwise with the attention probabilities *after* the
softmax. Luo et al. prove that attention with only relative positions in the logits
cannot approximate every continuous sequence-to-sequence function: every row of the
softmax matrix sums to one, so a sequence of identical tokens is mapped to a sequence of
identical outputs whatever the bias, and no position can be told apart. The Toeplitz
factor removes that limit (the rows of ``A ⊙ C`` need not sum to one), keeping the
layer relative (shift-equivariant up to the sequence boundary).

``urpe=False`` fixes ``C`` to ones (plain RPE attention, no ``c`` parameters): the
baseline of the paper's comparison. ``c`` starts at ones, so an untrained URPE layer is
the RPE layer. ``bidirectional=True`` lets every query see every key (offsets
``-(T-1) .. T-1``); causal (default) uses the offsets ``<= 0`` only.

Relative offsets are bounded by ``max_len`` (tables of ``2 max_len - 1`` entries per
head); the recurrent state is a key/value cache of ``max_len`` slots plus the position
of the next token, so ``step`` decodes one token at a time and ``__call__`` continues a
cached prefix. Parameters: ``4 d_model^2`` projections (no biases) plus
``num_heads (2 max_len - 1)`` for ``b`` and as many again for ``c`` when ``urpe``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Bool, Float, Int

from ssmjax.layers.common import StepByCall, check_heads, check_layer_input, no_state_when_bidirectional
from ssmjax.layers.registry import register


def toeplitz_gather(table: Float[Array, "h n"], q_pos: Int[Array, " t"], k_pos: Int[Array, " s"],
                    max_len: int) -> Float[Array, "h t s"]:
    """``M[h, i, j] = table[h, (k_pos[j] - q_pos[i]) + max_len - 1]``: the Toeplitz matrix of
    a per-head table indexed by the relative offset ``j - i`` in ``[-(max_len-1), max_len-1]``
    (offsets outside are clipped; callers mask them)."""
    offset = jnp.clip(k_pos[None, :] - q_pos[:, None] + max_len - 1, 0, 2 * max_len - 2)
    return table[:, offset]


def urpe_attention_core(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    bias: Float[Array, "h t s"],
    toeplitz: Float[Array, "h t s"],
    visible: Bool[Array, "t s"],
) -> Float[Array, "b t h e"]:
    """``o = (softmax(q k^T / sqrt(d) + bias, over visible keys) ⊙ toeplitz) v`` per head;
    every row must see at least one key."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = scale * jnp.einsum("bthd,bshd->bhts", q, k) + bias[None]
    logits = jnp.where(visible[None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bshe->bthe", probs * toeplitz[None], v)


@register("urpe_attention")
class URPEAttention(StepByCall):
    """Multi-head RPE softmax attention whose probabilities are multiplied by a learned
    Toeplitz matrix (URPE), causal with a KV-cache step unless ``bidirectional`` (module
    docstring)."""

    d_model: int
    num_heads: int = 4
    urpe: bool = True  # False: C = 1 (relative position bias only)
    bidirectional: bool = False
    max_len: int = 1024  # cache slots; relative offsets up to max_len - 1
    dtype: Any = None  # computation dtype; None: the input's (promoted with the params')
    param_dtype: Any = jnp.float32

    def setup(self):
        head_dim = check_heads("num_heads", self.d_model, self.num_heads)
        dense = lambda: nn.DenseGeneral(  # noqa: E731
            (self.num_heads, head_dim), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj, self.k_proj, self.v_proj = dense(), dense(), dense()
        self.out_proj = nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False,
                                        dtype=self.dtype, param_dtype=self.param_dtype)
        size = (self.num_heads, 2 * self.max_len - 1)
        self.rel_bias = self.param("rel_bias", nn.initializers.zeros_init(), size, self.param_dtype)
        self.toeplitz = (self.param("toeplitz", nn.initializers.ones_init(), size, self.param_dtype)
                         if self.urpe else None)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        shape = (batch_size, self.max_len, self.num_heads, self.d_model // self.num_heads)
        return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), pos=jnp.zeros((), jnp.int32))

    def _tables(self, q_pos, k_pos, dtype):
        bias = toeplitz_gather(self.rel_bias, q_pos, k_pos, self.max_len).astype(dtype)
        if self.toeplitz is None:
            return bias, jnp.ones_like(bias)
        return bias, toeplitz_gather(self.toeplitz, q_pos, k_pos, self.max_len).astype(dtype)

    def __call__(self, x: Float[Array, "b t d"], *, state: dict | None = None, return_state: bool = False):
        """``x [batch, time, d_model]`` -> ``y [batch, time, d_model]`` (and the new cache)."""
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        no_state_when_bidirectional("urpe_attention", self.bidirectional, state, return_state)
        batch, time, _ = x.shape
        if time > self.max_len:
            raise ValueError(f"x: expected at most max_len = {self.max_len} time steps, got shape {x.shape}")
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        positions = jnp.arange(time)
        if state is None and not return_state:
            visible = jnp.ones((time, time), bool) if self.bidirectional else positions[None, :] <= positions[:, None]
            bias, toeplitz = self._tables(positions, positions, q.dtype)
            o = urpe_attention_core(q, k, v, bias, toeplitz, visible)
        else:
            if state is None:
                state = self.init_state(batch, x.dtype)
            start = state["pos"]
            q_pos, slots = start + positions, jnp.arange(self.max_len)
            cache_k = jax.lax.dynamic_update_slice_in_dim(state["k"], k.astype(state["k"].dtype), start, axis=1)
            cache_v = jax.lax.dynamic_update_slice_in_dim(state["v"], v.astype(state["v"].dtype), start, axis=1)
            bias, toeplitz = self._tables(q_pos, slots, q.dtype)
            o = urpe_attention_core(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), bias, toeplitz,
                                    slots[None, :] <= q_pos[:, None])
            state = dict(k=cache_k, v=cache_v, pos=start + time)
        y = self.out_proj(o)
        return (y, state) if return_state else y
