"""Pallas kernels for chunked gated linear attention (GLA / SSD / RetNet / linear attention).

Per batch row ``b`` and head ``h``, with a state ``S_t [dk, dv]``::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          (S_{-1} = h0)
    o_t = scale * S_t^T q_t

with the log-decay ``g`` either absent (plain causal linear attention; Katharopoulos et
al. 2020), one scalar per head (``g [b, t, h]``: RetNet, Mamba-2 / SSD with ``g = dt A``;
Sun et al. 2023, Dao and Gu 2024) or one value per key channel (``g [b, t, h, dk]``: GLA;
Yang, Wang, Shen, Panda and Kim 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training"). ``g <= 0`` and finite. The conventions are those of
``ssmjax.scan.gated_linear_attention``: decay first, then write; ``o_t`` reads the updated
state.

Chunked form (GLA paper section 3.3; SSD's chunked algorithm). Inside a chunk of ``C``
tokens with the *chunk-local* cumulative log-decay ``L_i = g_0 + ... + g_i`` (``i`` counted
from the chunk start, so ``L <= 0`` and ``L_{C-1}`` is the whole-chunk decay), and ``S``
the state entering the chunk::

    A_ij = sum_d q_id k_jd exp(L_id - L_jd)      (j <= i; 0 above the diagonal)
    o_i  = scale * (sum_j A_ij v_j + (exp(L_i) * q_i)^T S)
    S'   = diag(exp(L_{C-1})) S + sum_j (exp(L_{C-1} - L_j) * k_j) v_j^T

Numerics: every exponent is a difference ``L_i - L_j`` with ``j <= i`` (or ``L_i`` itself,
or ``L_{C-1} - L_j``), i.e. a sum of log-decays over a stretch of tokens inside one chunk:
``<= 0`` for ``g <= 0``, so nothing overflows; the masked entries (``j > i``) are replaced by
``-inf`` *before* ``exp``. No ``exp(-L_j)`` alone is ever formed (the factorisation
``(q exp(L)) (k exp(-L))^T`` overflows once a chunk's decay passes ``exp(-88)``). The
differences are of chunk-local cumulative sums, so their absolute error is a few ulps of
``|L|`` (at most ``C max|g|``); keep the chunk short for very strong decays. ``L`` is
computed in the wrapper (one XLA cumulative sum per chunk, as fla's ``chunk_local_cumsum``);
the backward kernel returns the cotangent of ``L`` and the wrapper turns it into that of
``g`` with the reverse chunk-local cumulative sum.

Kernels (the Triton pattern: a grid of independent programs, each looping over time with
its carry in registers; no scratch memory, no cross-program communication):

* grid ``(batch, heads, dv_pad / block_v)``; each program owns one ``[dk, block_v]``
  column block of one head's state, in the carry dtype (at least float32).
* forward: a ``fori_loop`` over the chunks; per chunk it loads ``q, k [C, dk]``,
  ``v [C, block_v]`` and ``L``, forms ``A`` (per head / no decay: ``(q k^T) * D`` with the
  ``[C, C]`` decay matrix ``D_ij = exp(L_i - L_j)``; per channel the decay cannot leave the
  ``dk`` contraction, so a loop over the ``C`` key positions ``j`` forms column ``j`` of
  ``A`` from ``q * exp(L - L_j) * k_j``, ``[C, dk]`` per step, as fla's intra-chunk
  kernels do), writes ``o`` and updates the state. The ``dk`` contractions (``q k^T``,
  ``(exp(L) q) S``) are summed over blocks of ``block_k`` key columns and the state is
  carried as ``[block_k, block_v]`` row blocks, one pass over the blocks per chunk
  (``BlockSizes.block_k``: whole-``dk`` float32 dots spill registers at ``dk = 128``).
  With ``save_states`` it also stores the state entering every chunk, ``states [b, h,
  n_chunks, dk, dv]`` (carry dtype): the residual of the backward, ``O(b h (T / C) dk
  dv)`` memory.
* backward: the same grid; chunks are visited last to first, carrying ``dS``, the
  cotangent of the state leaving the chunk, in registers (the reverse-time recurrence
  ``dS_in = diag(exp(L_{C-1})) dS + (exp(L) * q)^T do``). Each chunk reads its stored entry
  state and recomputes ``A``; with ``dA = do v^T`` (masked to ``j <= i``)::

      dv    = A^T do + (exp(L_{C-1} - L) * k) dS
      dq    = exp(L) * (do S^T) + sum_j dA_ij exp(L_i - L_j) * k_j
      dk    = exp(L_{C-1} - L) * (v dS^T) + sum_i dA_ij exp(L_i - L_j) * q_i
      dL    = q * dq - k * dk  (+ the whole-chunk decay terms on the chunk's last row)

  ``dq``, ``dk`` and ``dL`` sum over the value columns, so each program writes its
  ``block_v`` partial sums to ``[dv_pad / block_v, ...]`` buffers that the wrapper adds (no
  atomics: deterministic); ``dv`` and ``dh0`` (the final ``dS``) are complete per program.

Padding (wrappers, only when needed): ``T`` to a multiple of ``C`` with ``q = k = v = 0``
and ``g = 0`` (no write, no decay: the final state is that after the last real token);
``dk`` and ``dv`` to powers of two (at least 16 when compiled for a GPU: ``tl.dot``'s
minimum) with zeros. Inputs may be bfloat16 / float16 / float32 (float64 too, for exact
tests); everything is computed in the carry dtype.

Backends: ``interpret=True`` runs anywhere (the CPU tests). Compiled, the kernels target
the Triton lowering of ``pl.pallas_call`` on NVIDIA GPUs (see
``pallas_kernels._common.compiler_params``). They do not follow Mosaic TPU's block rules
(one head of a ``[b, t, h, d]`` array is a strided block): with ``platform="tpu"``
(compiled, or interpreted with ``interpret=True``) the public functions run the Mosaic
TPU kernels of :mod:`pallas_kernels.chunked_gla_tpu` instead (the same math on a
head-major layout, one chunk per sequential grid step, the state in VMEM scratch). There
is no Mosaic GPU version.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._chunked_common import (
    DOT_PRECISIONS,
    BlockSizes,
    Dots,
    backward_call,
    check_attention_inputs,
    chunk_rows,
    forward_call,
    gpu_launch,
    key_blocks,
    masked_exp,
    positions,
    reverse_chunk_loop,
)
from pallas_kernels._common import carry_dtype_of, check_triton_platform, i32

__all__ = ["DOT_PRECISIONS", "BlockSizes", "chunked_gla_backward", "chunked_gla_forward"]


def decay_kind(g, q) -> str:
    """``"none"``, ``"head"`` (``g [b, t, h]``) or ``"channel"`` (``g [b, t, h, dk]``)."""
    if g is None:
        return "none"
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise ValueError(f"g: expected a real floating dtype, got {g.dtype}")
    if g.shape == q.shape[:3]:
        return "head"
    if g.shape == q.shape:
        return "channel"
    raise ValueError(
        "g: expected shape [batch, time, heads] (per-head decay) or [batch, time, heads, dk] "
        f"(per-channel decay) = {q.shape[:3]} or {q.shape}, got {g.shape}"
    )


# ----------------------------------------------------------------------------- kernel math
# (Chunk, decay_kind and the per-channel loops are shared with chunked_gla_tpu)
class Chunk(NamedTuple):
    """One chunk's operands in the carry dtype, with its decays."""

    q: jax.Array  # [C, dk]
    k: jax.Array  # [C, dk]
    v: jax.Array  # [C, bv]
    L: jax.Array  # [C, 1] (none / head) or [C, dk] (channel): chunk-local cumulative log-decay
    last: jax.Array  # [1, 1] or [1, dk]: L at the chunk's last row

    @property
    def q_from_start(self):
        return self.q * jnp.exp(self.L)

    @property
    def k_to_end(self):
        return self.k * jnp.exp(self.last - self.L)

    @property
    def through(self):
        """Whole-chunk decay of the state's rows, ``[dk, 1]`` or ``[1, 1]``."""
        return jnp.exp(self.last).reshape(-1, 1)


def _load_chunk(refs, c, chunk, kind, dtype) -> Chunk:
    q_ref, k_ref, v_ref, L_ref = refs
    rows = chunk_rows(c, chunk)
    q = q_ref[rows, :].astype(dtype)
    k = k_ref[rows, :].astype(dtype)
    v = v_ref[rows, :].astype(dtype)
    if kind == "none":
        L = jnp.zeros((chunk, 1), dtype)
        last = jnp.zeros((1, 1), dtype)
    elif kind == "head":
        L = L_ref[rows].astype(dtype)[:, None]
        last = L_ref[pl.ds(c * chunk + chunk - 1, 1)].astype(dtype)[:, None]
    else:
        L = L_ref[rows, :].astype(dtype)
        last = L_ref[pl.ds(c * chunk + chunk - 1, 1), :].astype(dtype)
    return Chunk(q, k, v, L, last)


def _key_rows(refs, c, chunk, dtype):
    """``key_row(j)``: row ``j`` of chunk ``c``'s ``k`` and ``L`` (per channel), read from
    the refs in the carry dtype, for the per-channel loops."""
    _, k_ref, _, L_ref = refs

    def key_row(j):
        row = pl.ds(c * chunk + j, 1)
        return k_ref[row, :].astype(dtype), L_ref[row, :].astype(dtype)

    return key_row


def _decay_matrix(L, chunk):
    """``D_ij = exp(L_i - L_j)`` for ``j <= i``, else ``0`` (``L [C, 1]``)."""
    rows, cols = positions(chunk)
    return masked_exp(L - L.reshape(1, chunk), rows >= cols)


def scores_per_channel(q, L, key_row, chunk, dtype):
    """``A [C, C]``: column ``j`` is ``sum_d q_id k_jd exp(L_id - L_jd)`` (``i >= j``),
    one ``[C, dk]`` step per key position, ``k_j`` and ``L_j`` read by ``key_row(j)``."""
    rows, cols = positions(chunk)

    def column(j, A):
        k_j, L_j = key_row(j)  # [1, dk]
        decay = masked_exp(L - L_j, rows >= j)  # [C, dk]
        a_j = jnp.sum(q * decay * k_j, axis=1, keepdims=True)  # [C, 1]
        return jnp.where(cols == j, a_j, A)

    return jax.lax.fori_loop(i32(0), i32(chunk), column, jnp.zeros((chunk, chunk), dtype))


def _scores(x: Chunk, key_row, chunk, kind, dots: Dots):
    """The intra-chunk scores ``A`` and, for per-head / no decay, the decay matrix."""
    if kind == "channel":
        return scores_per_channel(x.q, x.L, key_row, chunk, dots.dtype), None
    D = _decay_matrix(x.L, chunk)
    return dots.nt(x.q, x.k) * D, D


def _forward_kernel(*refs, n_chunks, chunk, kind, scale, save_states, precision, block_k):
    """The chunk loop, with the state carried as row blocks ``S_b [block_k, block_v]``:
    per chunk, one pass over the key blocks loads ``q_b, k_b`` (and ``L_b``) and adds
    block ``b``'s part of every ``dk`` contraction (``A``, ``(exp(L) q) S``) and writes
    ``S_b``'s update, so only one block's ``[C, block_k]`` operands are live at a time."""
    has_L = kind != "none"
    q_ref, k_ref, v_ref = refs[:3]
    L_ref = refs[3] if has_L else None
    h0_ref, o_ref, last_ref = refs[3 + has_L : 6 + has_L]
    states_ref = refs[6 + has_L] if save_states else None
    dtype = last_ref.dtype
    dots = Dots(dtype, precision)
    in_refs = (q_ref, k_ref, v_ref, L_ref)
    blocks = key_blocks(q_ref.shape[-1], block_k)

    def body(c, S):
        rows = chunk_rows(c, chunk)
        end = pl.ds(c * chunk + chunk - 1, 1)
        v = v_ref[rows, :].astype(dtype)
        if kind == "none":
            L, last = jnp.zeros((chunk, 1), dtype), jnp.zeros((1, 1), dtype)
        elif kind == "head":
            L = L_ref[rows].astype(dtype)[:, None]
            last = L_ref[end].astype(dtype)[:, None]
        A = o_state = None
        if kind == "channel":  # the whole key width per step of its loop (no dot)
            key_row = _key_rows(in_refs, c, chunk, dtype)
            A = scores_per_channel(q_ref[rows, :].astype(dtype), L_ref[rows, :].astype(dtype), key_row, chunk, dtype)
        S_next = []
        for keys, S_b in zip(blocks, S):
            if states_ref is not None:
                states_ref[pl.ds(c, 1), keys, :] = S_b[None].astype(states_ref.dtype)
            q = q_ref[rows, keys].astype(dtype)
            k = k_ref[rows, keys].astype(dtype)
            if kind == "channel":
                L = L_ref[rows, keys].astype(dtype)
                last = L_ref[end, keys].astype(dtype)
            else:
                A_b = dots.nt(q, k)
                A = A_b if A is None else A + A_b
            o_b = dots.nn(q * jnp.exp(L), S_b)
            o_state = o_b if o_state is None else o_state + o_b
            S_next.append(jnp.exp(last).reshape(-1, 1) * S_b + dots.tn(k * jnp.exp(last - L), v))
        if kind != "channel":
            A = A * _decay_matrix(L, chunk)
        o = dots.nn(A, v) + o_state
        o_ref[rows, :] = (scale * o).astype(o_ref.dtype)
        return tuple(S_next)

    S = tuple(h0_ref[keys, :].astype(dtype) for keys in blocks)
    S = jax.lax.fori_loop(i32(0), i32(n_chunks), body, S)
    for keys, S_b in zip(blocks, S):
        last_ref[keys, :] = S_b.astype(last_ref.dtype)


def intra_chunk_grads_per_channel(x: Chunk, dA, key_row, chunk):
    """``dq_i = sum_j dA_ij exp(L_i - L_j) k_j`` and ``dk_j = sum_i dA_ij exp(L_i - L_j) q_i``
    (``i >= j``), one key position ``j`` per step as in :func:`scores_per_channel`."""
    rows, cols = positions(chunk)

    def column(j, carry):
        dq, dk = carry
        k_j, L_j = key_row(j)
        decay = masked_exp(x.L - L_j, rows >= j)  # [C, dk]
        dA_j = jnp.sum(jnp.where(cols == j, dA, 0.0), axis=1, keepdims=True)  # [C, 1]
        weighted = dA_j * decay
        dk_j = jnp.sum(weighted * x.q, axis=0, keepdims=True)  # [1, dk]
        return dq + weighted * k_j, jnp.where(rows == j, dk_j, dk)

    zeros = jnp.zeros_like(x.q)
    return jax.lax.fori_loop(i32(0), i32(chunk), column, (zeros, zeros))


def _backward_kernel(*refs, n_chunks, chunk, kind, scale, precision):
    has_L = kind != "none"
    q_ref, k_ref, v_ref = refs[:3]
    L_ref = refs[3] if has_L else None
    states_ref, do_ref, dlast_ref, dq_ref, dk_ref, dv_ref = refs[3 + has_L : 9 + has_L]
    dL_ref = refs[9 + has_L] if has_L else None
    dh0_ref = refs[-1]
    dtype = dh0_ref.dtype
    dots = Dots(dtype, precision)
    in_refs = (q_ref, k_ref, v_ref, L_ref)
    rows_idx, cols_idx = positions(chunk)

    def body(c, dS):
        """``dS``: cotangent of the state leaving chunk ``c``."""
        x = _load_chunk(in_refs, c, chunk, kind, dtype)
        S = states_ref[c].astype(dtype)
        rows = chunk_rows(c, chunk)
        do = scale * do_ref[rows, :].astype(dtype)
        key_row = _key_rows(in_refs, c, chunk, dtype)
        A, D = _scores(x, key_row, chunk, kind, dots)
        dA = jnp.where(rows_idx >= cols_idx, dots.nt(do, x.v), 0.0)
        q_from_start, k_to_end = x.q_from_start, x.k_to_end
        d_q_from_start = dots.nt(do, S)  # [C, dk]
        d_k_to_end = dots.nt(x.v, dS)  # [C, dk]
        dv_ref[rows, :] = (dots.tn(A, do) + dots.nn(k_to_end, dS)).astype(dv_ref.dtype)
        dq = d_q_from_start * jnp.exp(x.L)
        dk = d_k_to_end * jnp.exp(x.last - x.L)
        if kind == "channel":
            dq_intra, dk_intra = intra_chunk_grads_per_channel(x, dA, key_row, chunk)
        else:
            dAD = dA * D
            dq_intra, dk_intra = dots.nn(dAD, x.k), dots.tn(dAD, x.q)
        dq_ref[rows, :] = (dq + dq_intra).astype(dq_ref.dtype)
        dk_ref[rows, :] = (dk + dk_intra).astype(dk_ref.dtype)
        if dL_ref is not None:
            # cotangent of L: state terms, intra-chunk terms, and on the chunk's last row
            # the whole-chunk decay (of the keys written and of the state passed on)
            dL = d_q_from_start * q_from_start - d_k_to_end * k_to_end
            d_last = jnp.sum(d_k_to_end * k_to_end, axis=0, keepdims=True) + jnp.sum(
                dS * S, axis=1, keepdims=True
            ).reshape(1, -1) * jnp.exp(x.last)
            if kind == "channel":
                dL = dL + x.q * dq_intra - x.k * dk_intra
                dL_ref[rows, :] = (dL + jnp.where(rows_idx == chunk - 1, d_last, 0.0)).astype(dL_ref.dtype)
            else:  # per head: sum over the key channels
                dAA = dA * A
                dL = jnp.sum(dL, axis=1, keepdims=True) + (
                    jnp.sum(dAA, axis=1, keepdims=True) - jnp.sum(dAA, axis=0).reshape(chunk, 1)
                )
                d_last = jnp.sum(d_last, axis=1, keepdims=True)
                dL = dL + jnp.where(rows_idx == chunk - 1, d_last, 0.0)
                dL_ref[rows] = dL[:, 0].astype(dL_ref.dtype)
        return x.through * dS + dots.tn(q_from_start, do)

    dS = reverse_chunk_loop(n_chunks, body, dlast_ref[...].astype(dtype))
    dh0_ref[...] = dS.astype(dh0_ref.dtype)


# ----------------------------------------------------------------------------- wrappers
def _prepare(q, k, v, g, block_sizes: BlockSizes, interpret: bool, platform):
    """The launch on the padded kernel layout: ``(launch, kind)``, inputs ``q, k, v[, L]``."""
    check_triton_platform(platform, interpret, "chunked_gla")
    kind = decay_kind(g, q)
    launch = gpu_launch(q, k, v, block_sizes.chunk_for(kind), block_sizes, interpret, platform)
    if kind == "none":
        return launch, kind
    carry = carry_dtype_of(q.dtype, k.dtype, v.dtype, g.dtype)
    return launch.with_gate(kind, g.astype(carry)), kind


@functools.partial(
    jax.jit, static_argnames=("scale", "block_sizes", "save_states", "interpret", "platform")
)
def chunked_gla_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None = None,
    h0: jax.Array | None = None,
    *,
    scale: float | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    save_states: bool = True,
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Chunked gated linear attention (see the module docstring).

    Args:
      q, k: ``[batch, time, heads, dk]``.
      v: ``[batch, time, heads, dv]``.
      g: log-decay, ``None`` (no decay), ``[batch, time, heads]`` (per head) or
        ``[batch, time, heads, dk]`` (per key channel); finite, ``<= 0``.
      h0: ``[batch, heads, dk, dv]`` or ``None`` (zeros).
      scale: output scale (a Python float, static); ``None``: ``dk ** -0.5``.
      block_sizes: see :class:`BlockSizes`.
      save_states: also return the chunk-entry states (the backward's residual).
      interpret: run under the Pallas interpreter (CPU tests).
      platform: backend to lower for (``None``: ``jax.default_backend()``).

    Returns:
      ``(o, h_last, states)``: ``o [batch, time, heads, dv]`` in ``result_type(q, k, v)``;
      ``h_last [batch, heads, dk, dv]`` in the carry dtype (at least float32); ``states``
      (``None`` unless ``save_states``) in the padded kernel layout ``[batch, heads,
      n_chunks, dk_pad, dv_pad]``: pass it unchanged to :func:`chunked_gla_backward`.
    """
    check_attention_inputs(q, k, v, h0)
    if (platform or jax.default_backend()) == "tpu":  # Mosaic TPU (or its interpreter)
        from pallas_kernels.chunked_gla_tpu import chunked_gla_forward_tpu

        return chunked_gla_forward_tpu(
            q, k, v, g, h0, scale=scale, block_sizes=block_sizes, save_states=save_states,
            interpret=interpret, platform=platform,
        )
    launch, kind = _prepare(q, k, v, g, block_sizes, interpret, platform)
    carry = carry_dtype_of(*(x.dtype for x in (q, k, v, g, h0) if x is not None))
    return forward_call(
        functools.partial(_forward_kernel, kind=kind, block_k=block_sizes.block_k), launch, h0, carry,
        jnp.result_type(q.dtype, k.dtype, v.dtype), scale=scale, block_sizes=block_sizes,
        save_states=save_states, name=f"chunked_gla_forward_{kind}",
    )


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret", "platform"))
def chunked_gla_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None,
    states: jax.Array,
    do: jax.Array,
    dh_last: jax.Array,
    *,
    scale: float | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """Cotangents of :func:`chunked_gla_forward` (same ``scale`` and ``block_sizes``).

    Args:
      q, k, v, g: the forward's inputs.
      states: the forward's ``states`` (``save_states=True``).
      do: cotangent of ``o``, ``[batch, time, heads, dv]``.
      dh_last: cotangent of ``h_last``, ``[batch, heads, dk, dv]``.

    Returns:
      ``(dq, dk, dv, dg, dh0)`` in the carry dtype (``dg`` is ``None`` when ``g`` is).
    """
    check_attention_inputs(q, k, v, dh_last)
    if do.shape != v.shape:
        raise ValueError(f"do: expected shape v.shape = {v.shape}, got {do.shape}")
    if (platform or jax.default_backend()) == "tpu":  # Mosaic TPU (or its interpreter)
        from pallas_kernels.chunked_gla_tpu import chunked_gla_backward_tpu

        return chunked_gla_backward_tpu(
            q, k, v, g, states, do, dh_last, scale=scale, block_sizes=block_sizes,
            interpret=interpret, platform=platform,
        )
    launch, kind = _prepare(q, k, v, g, block_sizes, interpret, platform)
    dq, dk, dv, *dg, dh0 = backward_call(
        functools.partial(_backward_kernel, kind=kind), launch, states, do, dh_last, scale=scale,
        block_sizes=block_sizes, name=f"chunked_gla_backward_{kind}",
    )
    return dq, dk, dv, dg[0] if dg else None, dh0
