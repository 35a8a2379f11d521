"""Mosaic TPU kernels for chunked gated linear attention (all three decay options).

The math is that of :mod:`pallas_kernels.chunked_gla` (its docstring writes out the
chunked forward and backward; the chunk operands, decay kinds and per-channel loops are
its own, shared; the padded sizes, this head-major layout (:class:`TpuLayout`), masked
exponentials and dot products are :mod:`pallas_kernels._chunked_common`'s); only the
tiling differs, to obey Mosaic's block rule (the last two dims of every block divisible
by ``(8, 128)``, 16 rows for bfloat16, or equal to the array's):

* the wrapper transposes the operands to head-major ``[batch, heads, time, dim]``, so a
  block is one chunk of one head, ``(C, dim)`` with ``dim`` the whole (padded) head dim;
* grid ``(batch, heads, n_chunks)``: batch and heads ``"parallel"``, the chunk axis
  ``"arbitrary"`` (sequential); the state ``S [dk, dv]`` (the whole ``dv``: one value
  block, so no per-block partial sums of ``dq``, ``dk``, ``dg``) lives in a VMEM scratch
  in the carry dtype, initialised from ``h0`` at chunk 0; ``h_last`` is written at the
  last chunk; with ``save_states`` each step writes the state entering its chunk to a
  ``(dk, dv)`` block of ``states [b, h, n_chunks, dk, dv]`` (the backward's residual);
* the backward visits the chunks last to first (index maps ``n_chunks - 1 - i``),
  carrying ``dS`` in a VMEM scratch (initialised from ``dh_last``), reading each chunk's
  stored entry state, and writes ``dq``, ``dk``, ``dv``, ``dg`` per chunk and ``dh0`` at
  the end;
* decays: the log-decay ``g`` itself (carry dtype) goes to the kernels, which form the
  chunk-local cumulative sums ``L`` as products with the ``[C, C]`` lower-triangular ones
  matrix (``"highest"`` precision whatever ``dot_precision``), and the backward returns
  ``dg`` directly (the reverse chunk-local sum, the transposed product): no cumulative
  sums in XLA. Per-head ``g`` and ``dg`` are lane-dense rows ``[b, h, n_chunks_8, C]``
  (``n_chunks`` padded to a multiple of 8) in blocks ``(8, C)`` of eight chunks, of
  which a step reads or writes row ``chunk % 8``; the column forms ``[C, 1]`` a chunk
  needs are products with the identity (exact), so nothing is transposed in VMEM and no
  ``[T, 1]`` array (a lane per token) exists. Per-channel ``g`` and ``dg`` are
  ``[b, h, T, dk]`` in ``(C, dk)`` blocks; the per-channel intra-chunk loop over key
  positions (as on GPU) reads row ``j`` of ``k`` and ``L`` from ``[C, dk]`` VMEM
  scratch in the carry dtype (Mosaic proves single-row reads aligned for 32-bit rows).

On-chip memory is ``O(C dk + C dv + dk dv + C^2)`` per program, independent of ``T``.
``dk`` and ``dv`` are zero-padded to powers of two (>= 8), ``T`` to a multiple of ``C`` (as
on GPU); ``C`` must be a multiple of the sublane tile (8 rows, 16 with 16-bit inputs).
Of :class:`BlockSizes` the TPU kernels use ``chunk`` and ``dot_precision`` (``block_v``,
``block_k`` and ``num_warps`` are the Triton kernels'). Compiled kernels take float32
and bfloat16 inputs (Mosaic has no float64); the interpreter (``interpret=True``,
``platform="tpu"``) also runs float64, for exact tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._chunked_common import (
    BlockSizes,
    Dots,
    TpuLayout,
    Triangles,
    backward_call,
    forward_call,
    masked_exp,
    positions,
    token_row,
    tpu_launch,
)
from pallas_kernels._common import carry_dtype_of, check_tpu_dtypes
from pallas_kernels._tpu_common import TPU_DTYPES
from pallas_kernels.chunked_gla import Chunk, decay_kind, intra_chunk_grads_per_channel, scores_per_channel

__all__ = ["chunked_gla_backward_tpu", "chunked_gla_forward_tpu"]


# ----------------------------------------------------------------------------- kernel math
class _Step:
    """One grid step's refs by name and its chunk's operands (the decays depend on the
    kind: per head ``g`` rows ``(8, C)``, per channel ``g`` ``(C, dk)``)."""

    def __init__(self, refs, kind: str, names: tuple[str, ...], scratch: tuple[str, ...], *, n_chunks, reverse):
        names = names[:3] + (("g",) if kind != "none" else ()) + names[3:]
        if kind == "channel":
            scratch = scratch + ("k_scratch", "L_scratch")
        self.__dict__.update(zip(names, refs[: len(names)]))
        self.__dict__.update(zip(scratch, refs[len(refs) - len(scratch) :]))
        self.kind, self.n_chunks, self.reverse = kind, n_chunks, reverse

    def row(self):
        return token_row(self.n_chunks, self.reverse)

    def key_row(self, j):
        """Row ``j`` of the chunk's ``k`` and (per channel) ``L`` in VMEM scratch."""
        return self.k_scratch[pl.ds(j, 1), :], self.L_scratch[pl.ds(j, 1), :]

    def load(self, chunk: int, tri: Triangles, dtype) -> tuple[Chunk, jax.Array, jax.Array | None]:
        """The chunk's operands, the state's whole-chunk decay ``[dk, 1]`` (or ``[1, 1]``)
        and, per head or without decay, the row form ``[1, C]`` of ``L``."""
        q = self.q[...].astype(dtype)
        k = self.k[...].astype(dtype)
        v = self.v[...].astype(dtype)
        if self.kind == "none":
            zero_row = jnp.zeros((1, chunk), dtype)
            return Chunk(q, k, v, jnp.zeros((chunk, 1), dtype), jnp.zeros((1, 1), dtype)), jnp.ones((1, 1), dtype), zero_row
        if self.kind == "head":
            g_row = self.g[self.row(), :].astype(dtype)  # [1, C]
            L = tri.cumsum_col(g_row)
            L_row = tri.row(L)  # the same values (an exact copy): D_ii = 1
            last = L_row[:, chunk - 1 :]  # [1, 1]
            return Chunk(q, k, v, L, last), jnp.exp(last), L_row
        L = tri.cumsum(self.g[...].astype(dtype))  # [C, dk]
        last = L[chunk - 1 :, :]  # [1, dk]
        through = jnp.exp(Triangles(last.shape[1], dtype).col(last))  # [dk, 1]
        self.k_scratch[...] = k
        self.L_scratch[...] = L
        return Chunk(q, k, v, L, last), through, None


def _scores(x: Chunk, L_row, step: _Step, chunk: int, dots: Dots):
    """``A [C, C]`` and, per head or without decay, the decay matrix ``D``."""
    if step.kind == "channel":
        return scores_per_channel(x.q, x.L, step.key_row, chunk, dots.dtype), None
    rows, cols = positions(chunk)
    D = masked_exp(x.L - L_row, rows >= cols)
    return dots.nt(x.q, x.k) * D, D


def _forward_kernel(*refs, kind, chunk, n_chunks, scale, save_states, precision):
    outs = ("o", "h_last") + (("states",) if save_states else ())
    step = _Step(refs, kind, ("q", "k", "v", "h0") + outs, ("S",), n_chunks=n_chunks, reverse=False)
    dtype = step.S.dtype
    dots = Dots(dtype, precision)
    tri = Triangles(chunk, dtype)
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        step.S[...] = step.h0[...].astype(dtype)

    S = step.S[...]
    if save_states:
        step.states[...] = S.astype(step.states.dtype)
    x, through, L_row = step.load(chunk, tri, dtype)
    A, _ = _scores(x, L_row, step, chunk, dots)
    o = dots.nn(A, x.v) + dots.nn(x.q_from_start, S)
    step.o[...] = (scale * o).astype(step.o.dtype)
    S = through * S + dots.tn(x.k_to_end, x.v)
    step.S[...] = S

    @pl.when(i == n_chunks - 1)
    def _():
        step.h_last[...] = S.astype(step.h_last.dtype)


def _backward_kernel(*refs, kind, chunk, n_chunks, scale, precision):
    outs = ("dq", "dk", "dv") + (("dg",) if kind != "none" else ()) + ("dh0",)
    names = ("q", "k", "v", "states", "do", "dh_last") + outs
    step = _Step(refs, kind, names, ("dS",), n_chunks=n_chunks, reverse=True)
    dtype = step.dS.dtype
    dots = Dots(dtype, precision)
    tri = Triangles(chunk, dtype)
    rows_idx, cols_idx = positions(chunk)
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        step.dS[...] = step.dh_last[...].astype(dtype)

    dS = step.dS[...]  # cotangent of the state leaving this chunk
    x, through, L_row = step.load(chunk, tri, dtype)
    S = step.states[...].astype(dtype)
    do = scale * step.do[...].astype(dtype)
    A, D = _scores(x, L_row, step, chunk, dots)
    dA = jnp.where(rows_idx >= cols_idx, dots.nt(do, x.v), 0.0)
    q_from_start, k_to_end = x.q_from_start, x.k_to_end
    d_q_from_start = dots.nt(do, S)  # [C, dk]
    d_k_to_end = dots.nt(x.v, dS)  # [C, dk]
    step.dv[...] = (dots.tn(A, do) + dots.nn(k_to_end, dS)).astype(step.dv.dtype)
    dq = d_q_from_start * jnp.exp(x.L)
    dk = d_k_to_end * jnp.exp(x.last - x.L)
    if kind == "channel":
        dq_intra, dk_intra = intra_chunk_grads_per_channel(x, dA, step.key_row, chunk)
    else:
        dAD = dA * D
        dq_intra, dk_intra = dots.nn(dAD, x.k), dots.tn(dAD, x.q)
    step.dq[...] = (dq + dq_intra).astype(step.dq.dtype)
    step.dk[...] = (dk + dk_intra).astype(step.dk.dtype)
    if kind != "none":
        # cotangent of L: state terms, intra-chunk terms, and on the chunk's last row the
        # whole-chunk decay (of the keys written and of the state passed on); dg is its
        # reverse chunk-local sum
        dL = d_q_from_start * q_from_start - d_k_to_end * k_to_end
        kept = dS * S  # [dk, dv]: summed over dv, the state rows' decay terms
        last_row = rows_idx == chunk - 1
        if kind == "channel":
            kept_row = dots.nt(jnp.ones((1, kept.shape[1]), dtype), kept)  # [1, dk]: sum over dv
            d_last = jnp.sum(d_k_to_end * k_to_end, axis=0, keepdims=True) + kept_row * jnp.exp(x.last)
            dL = dL + x.q * dq_intra - x.k * dk_intra + jnp.where(last_row, d_last, 0.0)
            step.dg[...] = tri.rev_cumsum(dL).astype(step.dg.dtype)
        else:  # per head: sum over the key channels
            dAA = dA * A
            col_sums = tri.dots.tn(dAA, jnp.ones((chunk, 1), dtype))  # [C, 1]: sum_i dAA_ij at row j
            dL = jnp.sum(dL, axis=1, keepdims=True) + (jnp.sum(dAA, axis=1, keepdims=True) - col_sums)
            d_last = jnp.sum(d_k_to_end * k_to_end, keepdims=True) + jnp.sum(kept, keepdims=True) * through
            dL = dL + jnp.where(last_row, d_last, 0.0)
            step.dg[step.row(), :] = tri.rev_cumsum_row(dL).astype(step.dg.dtype)
    dS = through * dS + dots.tn(q_from_start, do)
    step.dS[...] = dS

    @pl.when(i == n_chunks - 1)
    def _():
        step.dh0[...] = dS.astype(step.dh0.dtype)


# ----------------------------------------------------------------------------- wrappers
def _prepare(q, k, v, g, h0, block_sizes: BlockSizes, interpret: bool, platform, reverse: bool, do=None):
    """Checks and the launch on the padded head-major layout: ``(launch, kind, carry)``,
    inputs ``q, k, v[, g]``."""
    kind = decay_kind(g, q)
    check_tpu_dtypes("chunked_gla", platform, interpret, TPU_DTYPES, q=q, k=k, v=v, g=g, h0=h0)
    launch = tpu_launch("chunked_gla", q, k, v, do, block_sizes.chunk_for(kind), interpret, reverse)
    carry = carry_dtype_of(*(x.dtype for x in (q, k, v, g, h0) if x is not None))
    if kind != "none":
        launch = launch.with_gate(kind, g.astype(carry))
    return launch, kind, carry


def _scratch(tl: TpuLayout, kind: str, carry) -> list:
    scratch = [pltpu.VMEM((tl.dk_pad, tl.dv_pad), carry)]
    if kind == "channel":
        scratch += [pltpu.VMEM((tl.chunk, tl.dk_pad), carry)] * 2
    return scratch


def chunked_gla_forward_tpu(q, k, v, g, h0, *, scale, block_sizes, save_states, interpret, platform):
    """:func:`pallas_kernels.chunked_gla.chunked_gla_forward` on the TPU layout (same
    arguments and results; ``states`` in the padded layout ``[b, h, n_chunks, dk_pad,
    dv_pad]``)."""
    launch, kind, carry = _prepare(q, k, v, g, h0, block_sizes, interpret, platform, False)
    return forward_call(
        functools.partial(_forward_kernel, kind=kind), launch, h0, carry, jnp.result_type(q.dtype, k.dtype, v.dtype),
        scale=scale, block_sizes=block_sizes, save_states=save_states, name=f"chunked_gla_forward_tpu_{kind}",
        scratch=_scratch(launch.lay, kind, carry),
    )


def chunked_gla_backward_tpu(q, k, v, g, states, do, dh_last, *, scale, block_sizes, interpret, platform):
    """:func:`pallas_kernels.chunked_gla.chunked_gla_backward` on the TPU layout."""
    check_tpu_dtypes("chunked_gla", platform, interpret, TPU_DTYPES, do=do, dh_last=dh_last)
    launch, kind, _ = _prepare(q, k, v, g, None, block_sizes, interpret, platform, True, do)
    dq, dk, dv, *dg, dh0 = backward_call(
        functools.partial(_backward_kernel, kind=kind), launch, states, do, dh_last, scale=scale,
        block_sizes=block_sizes, name=f"chunked_gla_backward_tpu_{kind}",
        scratch=_scratch(launch.lay, kind, states.dtype),
    )
    return dq, dk, dv, dg[0] if dg else None, dh0
