"""Combiner (Ren, Dai, Dai, Yang, Leskovec, Schuurmans and Dai, 2021, "Combiner: Full
Attention Transformer with Sparse Computation Cost"): full attention in every head at
sub-quadratic cost through a structured factorisation of the attention distribution.

Attention is the conditional expectation ``o_i = E_{p(j|i)}[v_j]`` over the support
``Ω_i`` (``j <= i`` causal, every ``j`` bidirectional). Combiner partitions the support
into a direct part ``Ω_i^0`` and regions ``Ω_i^1 .. Ω_i^n`` and factorises::

    p(j | i) = exp(q_i . k_j) / Z_i                                   j in Ω_i^0
    p(j | i) = exp(q_i . k_Ω) / Z_i  *  q(j | Ω)                     j in Ω = Ω_i^r, r >= 1
    Z_i      = sum_{j in Ω_i^0} exp(q_i . k_j) + sum_{r>=1} exp(q_i . k_{Ω_i^r})

(dot products scaled by ``1/sqrt(d_head)``), so ``o_i = sum_{Ω_i^0} p(j|i) v_j +
sum_r p(Ω_i^r|i) v_{Ω_i^r}``: direct attention to the query's local region plus
attention to one abstraction per other region, ``v_Ω = sum_{j in Ω} q(j|Ω) v_j``, the
region's own local expectation. Every ``j`` of the support gets a positive probability
(full attention), and the rows of the implied ``T x T`` matrix sum to one. The region
abstraction uses max pooling (the paper's choice for the abstraction of a region)::

    q_Ω = max_{j in Ω} q_j,   k_Ω = max_{j in Ω} k_j   (elementwise)
    q(j|Ω) = softmax_{j in Ω}(q_Ω . k_j / sqrt(d_head)),   v_Ω = sum_{j in Ω} q(j|Ω) v_j

Two factorisations (``variant``), with ``s = span`` (``s ~ sqrt(T)`` gives ``O(T sqrt T)``):

* ``"fixed"`` (Combiner-Fixed, from the Sparse Transformer's fixed pattern): the sequence
  is cut into blocks of ``s`` tokens; ``Ω_i^0`` is the query's block (``j <= i`` when
  causal), each other block (every earlier one when causal) is one region.
* ``"axial"`` (Combiner-Axial, from the Axial Transformer): the sequence is a row-major
  grid of rows of ``s`` tokens, ``i = (a, c)`` (row ``a``, column ``c``); ``Ω_i^0`` is the
  query's row (columns ``<= c`` when causal) plus its column in the other rows (earlier
  rows when causal); each other column ``c' != c``, restricted to the other rows (earlier
  rows when causal), is one region. The abstraction of a column depends on the query's
  row (a prefix over rows when causal).

``bidirectional=True`` uses the whole sequence (the last block / row may be partial:
padding is masked out of every set). The causal recurrent state is a cache of
``max_len`` (a multiple of ``span``) query / key / value slots plus the next position:
``step`` and a continued ``__call__`` recompute the abstractions they need from the cache
(``O(max_len)`` per token, like a KV-cache attention); the whole-sequence call is the
sub-quadratic form. Queries are cached because the abstraction query ``q_Ω`` pools them.

Parameters: ``4 d_model^2`` (no biases).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Bool, Float, Int

from ssmjax.checks import check_choice, check_positive_int
from ssmjax.layers.common import StepByCall, check_heads, check_layer_input, no_state_when_bidirectional
from ssmjax.layers.registry import register

VARIANTS = ("fixed", "axial")


def masked_softmax(logits: Array, mask: Array, axis: int = -1) -> Array:
    """``softmax`` over the ``mask``-ed entries of ``axis`` (zero elsewhere; an empty row is
    all zeros, with finite gradients)."""
    logits = jnp.where(mask, logits, -jnp.inf)
    peak = jax.lax.stop_gradient(jnp.max(logits, axis, keepdims=True))
    peak = jnp.where(jnp.isfinite(peak), peak, 0)
    weights = jnp.where(mask, jnp.exp(logits - peak), 0)
    total = jnp.sum(weights, axis, keepdims=True)
    return weights / jnp.where(total > 0, total, 1)


def masked_max(x: Array, mask: Array, axis: int) -> Array:
    """Elementwise max of ``x`` over the ``mask``-ed entries of ``axis`` (zero if none)."""
    pooled = jnp.max(jnp.where(mask, x, -jnp.inf), axis)
    return jnp.where(jnp.isfinite(pooled), pooled, 0)


def region_abstraction(
    q: Float[Array, "*lead m h d"], k: Float[Array, "*lead m h d"], v: Float[Array, "*lead m h e"],
    member: Bool[Array, "*lead m"],
) -> tuple[Float[Array, "*lead h d"], Float[Array, "*lead h e"]]:
    """``(k_Ω, v_Ω)`` of the regions ``Ω = {m : member}`` (module docstring):
    ``k_Ω = max k``, ``v_Ω = sum softmax_m(max(q) . k_m / sqrt(d)) v_m`` (zeros if empty)."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    pool_mask = member[..., None, None]
    q_pool = masked_max(q, pool_mask, axis=-3)
    k_pool = masked_max(k, pool_mask, axis=-3)
    local = masked_softmax(scale * jnp.einsum("...mhd,...hd->...hm", k, q_pool), member[..., None, :])
    return k_pool, jnp.einsum("...hm,...mhe->...he", local, v)


def _combine(q, direct_k, direct_v, direct_mask, region_k, region_v, region_mask):
    """``o = sum_direct p v + sum_regions p v_Ω`` with one softmax over direct keys and
    region abstractions (``*_k [b, t, n, h, d]``, masks broadcastable to ``[b, t, n]``)."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    keys = jnp.concatenate(direct_k + region_k, axis=2)
    values = jnp.concatenate(direct_v + region_v, axis=2)
    mask = jnp.concatenate([jnp.broadcast_to(m, keys.shape[:2] + m.shape[-1:]) for m in direct_mask + region_mask], -1)
    probs = masked_softmax(scale * jnp.einsum("bthd,btnhd->bthn", q, keys), mask[:, :, None, :])
    return jnp.einsum("bthn,btnhe->bthe", probs, values)


def combiner_fixed(
    q: Float[Array, "b t h d"], q_pos: Int[Array, " t"], q_all: Float[Array, "b n h d"],
    k_all: Float[Array, "b n h d"], v_all: Float[Array, "b n h e"], valid: Bool[Array, " n"],
    span: int, bidirectional: bool,
) -> Float[Array, "b t h e"]:
    """Combiner-Fixed for queries ``q`` at positions ``q_pos`` over the sequence ``*_all``
    (``n`` a multiple of ``span``; ``valid`` marks real tokens): direct attention inside the
    query's block, one abstraction per other (earlier when causal) block."""
    batch, n, heads, _ = k_all.shape
    blocks = n // span
    as_blocks = lambda a: a.reshape(batch, blocks, span, heads, a.shape[-1])  # noqa: E731
    members = valid.reshape(blocks, span)
    region_k, region_v = region_abstraction(as_blocks(q_all), as_blocks(k_all), as_blocks(v_all),
                                            jnp.broadcast_to(members, (batch, blocks, span)))
    block = q_pos // span
    key_pos = block[:, None] * span + jnp.arange(span)  # [t, span]: the query's block
    direct = valid[key_pos] & (bidirectional | (key_pos <= q_pos[:, None]))
    others = jnp.arange(blocks)[None, :]
    region = (others != block[:, None]) if bidirectional else (others < block[:, None])
    region &= members.any(-1)[None, :]
    expand = lambda a: jnp.broadcast_to(a[:, None], (batch, q.shape[1]) + a.shape[1:])  # noqa: E731
    return _combine(q, [as_blocks(k_all)[:, block]], [as_blocks(v_all)[:, block]], [direct[None]],
                    [expand(region_k)], [expand(region_v)], [region[None]])


def combiner_axial(
    q: Float[Array, "b t h d"], q_pos: Int[Array, " t"], q_all: Float[Array, "b n h d"],
    k_all: Float[Array, "b n h d"], v_all: Float[Array, "b n h e"], valid: Bool[Array, " n"],
    span: int, bidirectional: bool, first_row: Array, num_rows: int,
) -> Float[Array, "b t h e"]:
    """Combiner-Axial for queries ``q`` at positions ``q_pos`` over the row-major grid of
    ``*_all`` (rows of ``span``): direct attention to the query's row and column, one
    abstraction per other column. The column abstractions are computed for the rows
    ``first_row .. first_row + num_rows - 1``, which must hold every query's row."""
    batch, n, heads, _ = k_all.shape
    rows = n // span
    grid = lambda a: a.reshape(batch, rows, span, heads, a.shape[-1])  # noqa: E731
    q2, k2, v2 = grid(q_all), grid(k_all), grid(v_all)
    valid2 = valid.reshape(rows, span)
    row, col = q_pos // span, q_pos % span
    all_rows, all_cols = jnp.arange(rows), jnp.arange(span)
    other_rows = lambda r: (all_rows[None, :] != r[:, None]) if bidirectional else (all_rows[None, :] < r[:, None])  # noqa: E731
    row_mask = valid2[row] & (bidirectional | (all_cols[None, :] <= col[:, None]))  # [t, span]
    col_mask = valid2[:, col].T & other_rows(row)  # [t, rows]
    col_k, col_v = k2[:, :, col].swapaxes(1, 2), v2[:, :, col].swapaxes(1, 2)  # [b, t, rows, h, .]
    # Abstractions of every column over the member rows of each needed query row.
    needed = jnp.minimum(first_row + jnp.arange(num_rows), rows - 1)
    members = other_rows(needed)[:, None, :] & valid2.T[None]  # [num_rows, span (column), rows]
    shape = (batch, num_rows, span, rows)
    by_column = lambda a: jnp.broadcast_to(a.swapaxes(1, 2)[:, None], shape + a.shape[-2:])  # noqa: E731
    region_k, region_v = region_abstraction(by_column(q2), by_column(k2), by_column(v2),
                                            jnp.broadcast_to(members, shape))  # [b, num_rows, span, h, .]
    index = row - first_row
    region_mask = members.any(-1)[index] & (all_cols[None, :] != col[:, None])  # [t, span]
    return _combine(q, [k2[:, row], col_k], [v2[:, row], col_v], [row_mask[None], col_mask[None]],
                    [region_k[:, index]], [region_v[:, index]], [region_mask[None]])


@register("combiner")
class Combiner(StepByCall):
    """Multi-head Combiner attention (``variant`` ``"fixed"`` or ``"axial"``), causal with a
    query/key/value cache step unless ``bidirectional`` (module docstring)."""

    d_model: int
    num_heads: int = 4
    variant: str = "fixed"
    span: int = 32  # block length (fixed) / row length (axial); ~sqrt(T) gives O(T sqrt T)
    bidirectional: bool = False
    max_len: int = 1024  # cache slots of the causal state; a multiple of span
    dtype: Any = None  # computation dtype; None: the input's (promoted with the params')
    param_dtype: Any = jnp.float32

    def setup(self):
        check_choice("variant", self.variant, VARIANTS)
        check_positive_int("span", self.span)
        head_dim = check_heads("num_heads", self.d_model, self.num_heads)
        if self.max_len % self.span:
            raise ValueError(f"max_len: expected a multiple of span = {self.span}, got {self.max_len}")
        dense = lambda: nn.DenseGeneral(  # noqa: E731
            (self.num_heads, head_dim), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj, self.k_proj, self.v_proj = dense(), dense(), dense()
        self.out_proj = nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False,
                                        dtype=self.dtype, param_dtype=self.param_dtype)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        shape = (batch_size, self.max_len, self.num_heads, self.d_model // self.num_heads)
        zeros = jnp.zeros(shape, dtype)
        return dict(q=zeros, k=zeros, v=zeros, pos=jnp.zeros((), jnp.int32))

    def _attend(self, q, q_pos, q_all, k_all, v_all, valid, first_row, num_rows):
        if self.variant == "fixed":
            return combiner_fixed(q, q_pos, q_all, k_all, v_all, valid, self.span, self.bidirectional)
        return combiner_axial(q, q_pos, q_all, k_all, v_all, valid, self.span, self.bidirectional,
                              first_row, num_rows)

    def __call__(self, x: Float[Array, "b t d"], *, state: dict | None = None, return_state: bool = False):
        """``x [batch, time, d_model]`` -> ``y [batch, time, d_model]`` (and the new cache)."""
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        no_state_when_bidirectional("combiner", self.bidirectional, state, return_state)
        batch, time, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if state is None and not return_state:  # the whole sequence, padded to whole blocks
            padded = -(-time // self.span) * self.span
            pad = lambda a: jnp.pad(a, ((0, 0), (0, padded - time), (0, 0), (0, 0)))  # noqa: E731
            positions = jnp.arange(padded)
            o = self._attend(pad(q), positions, pad(q), pad(k), pad(v), positions < time,
                             jnp.zeros((), jnp.int32), padded // self.span)[:, :time]
        else:
            if time > self.max_len:
                raise ValueError(f"x: expected at most max_len = {self.max_len} time steps, got shape {x.shape}")
            if state is None:
                state = self.init_state(batch, x.dtype)
            start = state["pos"]
            write = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                cache, new.astype(cache.dtype), start, axis=1)
            caches = {name: write(state[name], new) for name, new in (("q", q), ("k", k), ("v", v))}
            slots = jnp.arange(self.max_len)
            num_rows = min(-(-time // self.span) + 1, self.max_len // self.span)
            o = self._attend(q, start + jnp.arange(time), *(caches[n].astype(q.dtype) for n in "qkv"),
                             slots < start + time, start // self.span, num_rows)
            state = dict(caches, pos=start + time)
        y = self.out_proj(o)
        return (y, state) if return_state else y
