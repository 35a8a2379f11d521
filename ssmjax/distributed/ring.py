"""Ring attention: exact causal softmax attention with the time axis split over the devices
of one mesh axis, and key/value blocks passed round a ring.

Ring Self-Attention (Li, Xue, Baranwal, Li and You, 2023, "Sequence Parallelism: Long
Sequence Training from System Perspective") as made blockwise and memory-efficient in
Ring Attention (Liu, Zaharia and Abbeel, 2023, "Ring Attention with Blockwise
Transformers for Near-Infinite Context"). With ``n`` devices on mesh ``axis``, device
``r`` holds the ``L = T / n`` queries, keys and values of shard ``r``. At step
``j = 0 .. n-1`` it holds the key/value block of shard ``s = (r - j) mod n`` (each step
passes the block to device ``r + 1`` with ``lax.ppermute``: ``n - 1`` sends) and folds that
block's scores ``S = scale q k_s^T`` into a running online-softmax summary per query
(Milakov and Gimelshein, 2018), with the associative combine of
:func:`ssmjax.scan.softmax_attention.softmax_scan_combine`::

    block:   m_b = max_j S_ij,   num_b = sum_j exp(S_ij - m_b) v_j,   den_b = sum_j exp(S_ij - m_b)
    combine: m = max(m_a, m_b),  num = num_a e^(m_a - m) + num_b e^(m_b - m),  den likewise
    output:  o_i = num_i / den_i,   logsumexp_i = m_i + log den_i

Causality: step ``0`` is the diagonal block (masked ``j <= i``); blocks of earlier shards
(``s < r``, i.e. ``j <= r``) are fully visible; blocks of later shards (``j > r``) are
skipped with ``lax.cond``, which does not run their (fully masked) block product at all
(a mask would compute it and discard it: about half of all ``n^2`` block products). The
price is the known load imbalance of contiguous causal sharding (device ``n - 1`` computes
``n`` blocks, device ``0`` one); a striped layout (Brandon et al., 2023, "Striped
Attention") would balance it and is not done here. Packed documents: ``segment_ids`` travel
round the ring with their keys, and a query sees only keys of its own id (a whole block
may then be masked for a query: its summary is the empty ``(-inf, 0, 0)``).

Backward (a ``jax.custom_vjp``): the ring runs again, recomputing every block's
probabilities from the saved ``(q, k, v, o, logsumexp)`` (FlashAttention-2, Dao, 2023)::

    P_ij = exp(S_ij - logsumexp_i),   D_i = dO_i . o_i
    dV_j += sum_i P_ij dO_i,   dS_ij = P_ij (dO_i . v_j - D_i)
    dQ_i += scale sum_j dS_ij k_j,   dK_j += scale sum_i dS_ij q_i

``dQ`` stays home; the ``(dK, dV)`` accumulator of a block travels with the block, each
device adding its queries' share, and one more send after the last step brings it back
to the block's own device (``n`` sends). The backward ring runs the other way round
(``r -> r - 1``): its sends would otherwise be the forward's exactly, and XLA merges
identical collectives when forward and backward are compiled together, which keeps all
``n`` received blocks alive from the forward to the backward (``O(T)`` per device, an
all-gather in effect; ``lax.optimization_barrier`` did not stop it on CPU). At ``n = 2``
both directions are the same swap and the merge remains (one send saved, one block kept).

Memory: nothing is all-gathered, forward or backward. Per device the memory is the
``O(T / n)`` shards, the travelling block and its accumulator, plus the scores of one
tile: ``[batch, heads, T/n, T/n]`` by default, ``[batch, heads, T/n, block_size]`` with
``block_size`` (the block's keys folded a tile at a time with the same combine, the
blockwise computation of Liu et al.), so ``O(T / n)`` for a fixed ``block_size``. The
single-device quadratic reference holds ``[batch, heads, T, T]``.

Collectives per call (``n`` = axis size, ``g = 1`` with ``segment_ids`` else ``0``):
forward ``(n - 1)(1 + g)`` collective-permutes (keys and values in one buffer, the ids in
another); backward ``(n - 1)(1 + g)`` for the blocks plus ``n`` for the accumulators. The
ring is unrolled in Python (``n`` is a small static mesh size), so the send of block
``j + 1`` is independent of block ``j``'s compute and may overlap it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jax.sharding import Mesh, PartitionSpec as P
from jax.typing import ArrayLike
from jaxtyping import Bool, Float

from ssmjax.checks import check_multihead_qkv, check_positive_int, check_shape
from ssmjax.distributed.sequence import _check_length
from ssmjax.scan._checks import state_dtype
from ssmjax.scan.softmax_attention import SoftmaxState, softmax_scan_combine


# ----------------------------------------------------------------------------- one block
def _block_scores(q: Float[Array, "batch lq heads dk"], k: Float[Array, "batch lk heads dk"], scale: float,
                  dtype) -> Float[Array, "batch heads lq lk"]:
    """``S_ij = scale q_i . k_j`` per row and head, in the accumulation ``dtype``."""
    return scale * jnp.einsum("bihd,bjhd->bhij", q.astype(dtype), k.astype(dtype))


def _block_mask(lq: int, lk: int, key_start: Array | int, diagonal: bool, seg_q: Array | None,
                seg_k: Array | None) -> Bool[Array, "#batch 1 lq lk"] | None:
    """Which of ``lk`` keys (from offset ``key_start`` of their shard) each of ``lq`` queries
    sees: ``key_start + j <= i`` when both come from the same shard (``diagonal``), and the
    same document when ids ``seg_q [batch, lq]``, ``seg_k [batch, lk]`` are given;
    ``None`` = all."""
    mask = None
    if diagonal:
        mask = (key_start + jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None])[None, None]
    if seg_q is not None:
        same = seg_q[:, None, :, None] == seg_k[:, None, None, :]
        mask = same if mask is None else mask & same
    return mask


def _block_summary(q: Float[Array, "batch lq heads dk"], k: Float[Array, "batch lk heads dk"],
                   v: Float[Array, "batch lk heads dv"], mask: Array | None, scale: float, dtype) -> SoftmaxState:
    """The online-softmax summary of one tile of keys for every query: ``m [batch, heads,
    lq]``, ``num [batch, heads, lq, dv]``, ``den [batch, heads, lq]`` (see the module
    docstring). A query that sees no key of the tile gets the empty ``(-inf, 0, 0)``; only
    exponents ``<= 0`` are evaluated."""
    scores = _block_scores(q, k, scale, dtype)
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1)
    p = jnp.exp(scores - jnp.where(m == -jnp.inf, 0.0, m)[..., None])  # exp(-inf) = 0 where masked
    return SoftmaxState(m, jnp.einsum("bhij,bjhe->bhie", p, v.astype(dtype)), jnp.sum(p, axis=-1))


def _block_grads(q: Float[Array, "batch lq heads dk"], k: Float[Array, "batch lk heads dk"],
                 v: Float[Array, "batch lk heads dv"], do: Float[Array, "batch lq heads dv"],
                 lse: Float[Array, "batch heads lq"], delta: Float[Array, "batch heads lq"], mask: Array | None,
                 scale: float, dtype) -> tuple[Array, Array, Array]:
    """One tile's share of ``(dQ [batch, lq, heads, dk], dK [batch, lk, heads, dk], dV
    [batch, lk, heads, dv])`` from the recomputed ``P = exp(S - logsumexp)`` (module
    docstring; ``delta = D``)."""
    scores = _block_scores(q, k, scale, dtype) - lse[..., None]
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    p = jnp.exp(scores)
    do = do.astype(dtype)
    dv = jnp.einsum("bhij,bihe->bjhe", p, do)
    ds = p * (jnp.einsum("bihe,bjhe->bhij", do, v.astype(dtype)) - delta[..., None])
    dq = scale * jnp.einsum("bhij,bjhd->bihd", ds, k.astype(dtype))
    dk = scale * jnp.einsum("bhij,bihd->bjhd", ds, q.astype(dtype))
    return dq, dk, dv


# ----------------------------------------------------------------------------- one block, tiled
def _tiles(x: Array | None, size: int) -> Array | None:
    """``[batch, L, ...] -> [L / size, batch, size, ...]``: the key tiles of a block."""
    if x is None:
        return None
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // size, size, *x.shape[2:]), 1, 0)


def _untile(x: Array) -> Array:
    """``[L / size, batch, size, ...] -> [batch, L, ...]`` (inverse of :func:`_tiles`)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _attend_block(q, k, v, seg_q, seg_k, *, diagonal: bool, scale: float, dtype, tile: int) -> SoftmaxState:
    """The summary of a whole key/value block ``k [batch, L, heads, dk]``, ``v [batch, L,
    heads, dv]`` for the queries ``q [batch, L, heads, dk]``: ``tile`` keys at a time, folded
    with the combine (``lax.scan``), so the scores held are ``[batch, heads, L, tile]``."""
    lq, lk = q.shape[1], k.shape[1]
    if tile >= lk:
        return _block_summary(q, k, v, _block_mask(lq, lk, 0, diagonal, seg_q, seg_k), scale, dtype)

    def fold(state, tile_inputs):
        start, k_t, v_t, seg_t = tile_inputs
        summary = _block_summary(q, k_t, v_t, _block_mask(lq, tile, start, diagonal, seg_q, seg_t), scale, dtype)
        return softmax_scan_combine(state, summary), None

    rows = (q.shape[0], q.shape[2], lq)  # [batch, heads, lq]
    empty = SoftmaxState(jnp.full(rows, -jnp.inf, dtype), jnp.zeros(rows + (v.shape[-1],), dtype),
                         jnp.zeros(rows, dtype))  # the combine's identity
    tiles = (jnp.arange(0, lk, tile), _tiles(k, tile), _tiles(v, tile), _tiles(seg_k, tile))
    return jax.lax.scan(fold, empty, tiles)[0]


def _block_gradients(q, k, v, do, lse, delta, seg_q, seg_k, *, diagonal: bool, scale: float, dtype,
                     tile: int) -> tuple[Array, Array, Array]:
    """``(dQ, dK, dV)`` of a whole key/value block, ``tile`` keys at a time (``dQ`` summed
    over the tiles, ``dK, dV`` stacked)."""
    lq, lk = q.shape[1], k.shape[1]
    if tile >= lk:
        mask = _block_mask(lq, lk, 0, diagonal, seg_q, seg_k)
        return _block_grads(q, k, v, do, lse, delta, mask, scale, dtype)

    def add(dq, tile_inputs):
        start, k_t, v_t, seg_t = tile_inputs
        mask = _block_mask(lq, tile, start, diagonal, seg_q, seg_t)
        dq_t, dk_t, dv_t = _block_grads(q, k_t, v_t, do, lse, delta, mask, scale, dtype)
        return dq + dq_t, (dk_t, dv_t)

    tiles = (jnp.arange(0, lk, tile), _tiles(k, tile), _tiles(v, tile), _tiles(seg_k, tile))
    dq, (dk, dv) = jax.lax.scan(add, jnp.zeros(q.shape, dtype), tiles)
    return dq, _untile(dk), _untile(dv)


# ----------------------------------------------------------------------------- the ring
def _send_on(x, axis: str, n: int, direction: int):
    """Every device's ``x`` (a pytree) to its neighbour on the ring, ``r -> r + direction
    mod n`` (``direction = +1`` forward, ``-1`` backward)."""
    return jax.lax.ppermute(x, axis, [(i, (i + direction) % n) for i in range(n)])


def _from_earlier_shard(r: Array, j: int, n: int, direction: int) -> Array:
    """Whether the block held at step ``j >= 1`` comes from a shard before ``r`` (all its
    keys visible) rather than after it (none visible). Sending ``r -> r + direction``, the
    block is shard ``r - direction * j mod n``: earlier iff ``j <= r`` (``+1``) or
    ``j >= n - r`` (``-1``, where it is shard ``r + j - n``)."""
    return j <= r if direction == 1 else j >= n - r


def _pack(k: Array, v: Array) -> Array:
    """Keys and values in one buffer ``[batch, L, heads, dk + dv]`` (one send per step)."""
    dtype = jnp.result_type(k.dtype, v.dtype)
    return jnp.concatenate([k.astype(dtype), v.astype(dtype)], axis=-1)


def _forward_shard(q, k, v, seg, *, axis: str, n: int, scale: float, dtype, dk: int, tile: int):
    """One device's forward: ``(o [batch, L, heads, dv], logsumexp [batch, L, heads])`` of
    its queries against every key block, the blocks arriving round the ring."""
    r = jax.lax.axis_index(axis)
    block = (_pack(k, v), seg)
    state = None
    for j in range(n):
        upcoming = _send_on(block, axis, n, 1) if j < n - 1 else None  # independent of this step's compute
        kv, seg_k = block

        def fold(state, kv, seg_k, diagonal=False):
            summary = _attend_block(q, kv[..., :dk], kv[..., dk:], seg, seg_k, diagonal=diagonal, scale=scale,
                                    dtype=dtype, tile=tile)
            return summary if state is None else softmax_scan_combine(state, summary)

        if j == 0:
            state = fold(None, kv, seg_k, diagonal=True)  # every query sees at least itself
        else:  # the block of shard r - j; from a later shard (j > r) it is skipped
            state = jax.lax.cond(_from_earlier_shard(r, j, n, 1), fold, lambda state, *_: state, state, kv, seg_k)
        block = upcoming
    o = state.num / state.den[..., None]
    lse = state.m + jnp.log(state.den)
    return jnp.swapaxes(o, 1, 2), jnp.swapaxes(lse, 1, 2)


def _backward_shard(q, k, v, seg, o, lse, do, *, axis: str, n: int, scale: float, dtype, dk: int, tile: int):
    """One device's backward: ``(dq, dk, dv)`` of its shard. Blocks travel the ring the
    other way round (``r -> r - 1``; see the module docstring for why); each block's
    ``(dK, dV)`` accumulator travels with it and is sent home after the last step."""
    r = jax.lax.axis_index(axis)
    lse = jnp.swapaxes(lse, 1, 2)  # [batch, heads, L]
    delta = jnp.swapaxes(jnp.sum(do.astype(dtype) * o.astype(dtype), axis=-1), 1, 2)
    block = (_pack(k, v), seg)
    dq = jnp.zeros(q.shape, dtype)
    acc = jnp.zeros(k.shape[:-1] + (dk + v.shape[-1],), dtype)  # (dK, dV) of the block held
    for j in range(n):
        upcoming = _send_on(block, axis, n, -1) if j < n - 1 else None
        kv, seg_k = block

        def add(dq, acc, kv, seg_k, diagonal=False):
            dq_b, dk_b, dv_b = _block_gradients(q, kv[..., :dk], kv[..., dk:], do, lse, delta, seg, seg_k,
                                                diagonal=diagonal, scale=scale, dtype=dtype, tile=tile)
            return dq + dq_b, acc + jnp.concatenate([dk_b, dv_b], axis=-1)

        if j == 0:
            dq, acc = add(dq, acc, kv, seg_k, diagonal=True)
        else:
            dq, acc = jax.lax.cond(_from_earlier_shard(r, j, n, -1), add, lambda dq, acc, *_: (dq, acc), dq, acc,
                                   kv, seg_k)
        acc = _send_on(acc, axis, n, -1)  # on with the block; after step n - 1: home
        block = upcoming
    return dq.astype(q.dtype), acc[..., :dk].astype(k.dtype), acc[..., dk:].astype(v.dtype)


def _ring_fn(mesh: Mesh, axis: str, batch_axes: Any, scale: float, has_segments: bool, dtype, out_dtype, dk: int,
             tile: int):
    """``f(q, k, v, seg) -> o`` with its custom VJP, both ``shard_map``s over ``axis``."""
    n = mesh.shape[axis]
    x_spec, seg_spec, lse_spec = P(batch_axes, axis, None, None), P(batch_axes, axis), P(batch_axes, axis, None)
    statics = dict(axis=axis, n=n, scale=scale, dtype=dtype, dk=dk, tile=tile)

    def sharded(body, in_specs, out_specs):
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def forward_body(q, k, v, *seg):
        o, lse = _forward_shard(q, k, v, seg[0] if seg else None, **statics)
        return o.astype(out_dtype), lse

    def backward_body(q, k, v, o, lse, do, *seg):
        return _backward_shard(q, k, v, seg[0] if seg else None, o, lse, do, **statics)

    seg_specs = (seg_spec,) if has_segments else ()
    forward = sharded(forward_body, (x_spec,) * 3 + seg_specs, (x_spec, lse_spec))
    backward = sharded(backward_body, (x_spec,) * 4 + (lse_spec, x_spec) + seg_specs, (x_spec,) * 3)

    def segs(seg):
        return (seg,) if has_segments else ()

    @jax.custom_vjp
    def attend(q, k, v, seg):
        return forward(q, k, v, *segs(seg))[0]

    def attend_fwd(q, k, v, seg):
        o, lse = forward(q, k, v, *segs(seg))
        return o, (q, k, v, seg, o, lse)

    def attend_bwd(residuals, do):
        q, k, v, seg, o, lse = residuals
        return (*backward(q, k, v, o, lse, do, *segs(seg)), None)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def _static_scale(scale, dk: int) -> float:
    """``scale`` as a Python float (``dk ** -0.5`` for ``None``); a traced value is refused."""
    if scale is None:
        return dk ** -0.5
    try:
        return float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"scale: expected a Python float (a constant, not traced) or None, got {scale!r}") from None


def ring_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, mesh: Mesh, *, axis: str = "seq",
                   batch_axes: Any = None, scale: float | ArrayLike | None = None,
                   segment_ids: ArrayLike | None = None, block_size: int | None = None) -> Array:
    """Causal softmax attention with time sharded over mesh ``axis``, by ring attention.

    Equals :func:`ssmjax.scan.causal_softmax_attention` (``o_i = sum_{j <= i} softmax_j(scale
    q_i . k_j) v_j``, within ``i``'s document) while each device holds only ``T / n``
    tokens: key/value blocks travel round the ring (Li et al., 2023; Liu et al., 2023; see
    the module docstring for the maths, the causal block skipping and the collectives).
    Gradients come from a custom VJP that runs the ring again (no all-gather anywhere).

    Args:
      q: queries ``[batch, time, heads, dk]``, ``time`` divisible by the size of ``axis``.
      k: keys ``[batch, time, heads, dk]``.
      v: values ``[batch, time, heads, dv]`` (``dv`` may differ from ``dk``).
      mesh: the device mesh (axis types ``Auto``, as for :mod:`ssmjax.distributed.sequence`);
        ``time`` is sharded over ``axis`` and ``batch`` over ``batch_axes`` (``None``:
        replicated over the other axes).
      axis: the mesh axis of the ring.
      batch_axes: mesh axis name(s) for the batch dimension, or ``None``.
      scale: logit scale, a constant (not traced: no gradient wrt it); ``dk ** -0.5`` if
        ``None``.
      segment_ids: ``[batch, time]`` ints; queries only see keys of the same id.
      block_size: keys per score tile inside a device (the blockwise part of Liu et al.):
        each key/value block is folded in ``block_size`` keys at a time, so the scores held
        are ``[batch, heads, T/n, block_size]``; must divide ``T / n``. ``None``: the whole
        block at once (``[batch, heads, T/n, T/n]``; fewest, largest matrix products).

    Returns:
      ``o [batch, time, heads, dv]`` in the promoted dtype of ``q, k, v``, sharded like
      ``q``; logits and softmax run in at least float32.
    """
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    batch, time, _, dk, _ = check_multihead_qkv(q, k, v)
    _check_length("q", q, mesh, axis)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        check_shape("segment_ids", segment_ids, (batch, time), "[batch, time]")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype}")
    shard = time // mesh.shape[axis]
    tile = shard if block_size is None else check_positive_int("block_size", block_size)
    if shard % tile:
        raise ValueError(f"block_size: {block_size} must divide the {shard} tokens of each shard "
                         f"(time {time} / {mesh.shape[axis]} devices)")
    attend = _ring_fn(mesh, axis, batch_axes, _static_scale(scale, dk), segment_ids is not None,
                      state_dtype(q.dtype, k.dtype, v.dtype), jnp.result_type(q.dtype, k.dtype, v.dtype), dk, tile)
    return attend(q, k, v, segment_ids)
