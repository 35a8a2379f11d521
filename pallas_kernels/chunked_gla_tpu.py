"""Mosaic TPU kernels for chunked gated linear attention (all three decay options).

The math is that of :mod:`pallas_kernels.chunked_gla` (its docstring writes out the
chunked forward and backward; the padded sizes, masked exponentials and dot products are
:mod:`pallas_kernels._chunked_common`'s, shared with it); only the tiling differs, to obey
Mosaic's block rule (the last two dims of every block divisible by ``(8, 128)``, 16 rows
for bfloat16, or equal to the array's):

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
    Layout,
    check_attention_inputs,
    masked_exp,
    output_scale,
    pad_axis,
    positions,
)
from pallas_kernels._common import (
    block_spec,
    carry_dtype_of,
    check_tpu_dtypes,
    i32,
    next_power_of_two,
    sublane_rows,
)
from pallas_kernels.chunked_gla import _Chunk, _decay_kind

__all__ = ["TPU_DTYPES", "TpuLayout", "chunked_gla_backward_tpu", "chunked_gla_forward_tpu"]

#: Input dtypes of the compiled TPU kernels.
TPU_DTYPES = (jnp.float32, jnp.bfloat16)
#: Smallest padded head dim (one sublane tile of float32 rows).
MIN_DIM = 8
#: Chunks per block of a per-token row array ``[b, h, n_chunks_8, C]`` (one sublane tile).
ROW_BLOCK = 8


# ----------------------------------------------------------------------------- layout
class TpuLayout:
    """The padded head-major layout of one call: :class:`Layout`'s sizes (one value block
    of the whole padded ``dv``) plus the block specs over the grid ``(b, h, step)``; the
    backward (``reverse``) visits chunk ``n_chunks - 1 - step`` at ``step``."""

    def __init__(self, q: jax.Array, v: jax.Array, chunk: int, reverse: bool = False):
        self.lay = Layout.of(q, v, chunk, next_power_of_two(max(v.shape[-1], MIN_DIM)), MIN_DIM)
        self.reverse = reverse

    def __getattr__(self, name):  # Layout's sizes and padding helpers
        if name == "lay":
            raise AttributeError(name)
        return getattr(self.lay, name)

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.lay.batch, self.lay.heads, self.lay.n_chunks)

    @property
    def row_blocks(self) -> int:
        return -(-self.lay.n_chunks // ROW_BLOCK)

    def chunk_of(self, step):
        """The chunk grid step ``step`` visits (the backward walks them last to first)."""
        return self.lay.n_chunks - 1 - step if self.reverse else step

    # [b, t, h, ...] <-> [b, h, t_pad, ...] operands
    def heads_k(self, x: jax.Array) -> jax.Array:
        return jnp.moveaxis(self.lay.pad_k(x), 2, 1)

    def heads_v(self, x: jax.Array) -> jax.Array:
        return jnp.moveaxis(self.lay.pad_v(x), 2, 1)

    def from_heads(self, x: jax.Array, dim: int) -> jax.Array:
        """``[b, h, t_pad, d_pad]`` -> ``[b, t, h, dim]``."""
        return jnp.moveaxis(x, 1, 2)[:, : self.lay.time, :, :dim]

    # per-token vectors [b, t, h] <-> rows [b, h, n_chunks_8, C]
    def token_rows(self, x: jax.Array) -> jax.Array:
        lay = self.lay
        x = jnp.moveaxis(lay.pad_time(x), 2, 1).reshape(lay.batch, lay.heads, lay.n_chunks, lay.chunk)
        return pad_axis(x, 2, self.row_blocks * ROW_BLOCK)

    def from_token_rows(self, x: jax.Array) -> jax.Array:
        lay = self.lay
        x = x[:, :, : lay.n_chunks].reshape(lay.batch, lay.heads, lay.time_pad)
        return jnp.moveaxis(x, 1, 2)[:, : lay.time]

    def token_rows_shape(self, dtype) -> jax.ShapeDtypeStruct:
        lay = self.lay
        return jax.ShapeDtypeStruct((lay.batch, lay.heads, self.row_blocks * ROW_BLOCK, lay.chunk), dtype)

    # block specs
    def seq_spec(self, dim: int) -> pl.BlockSpec:
        """A ``(C, dim)`` chunk of a ``[b, h, t_pad, dim]`` array."""
        return block_spec((None, None, self.lay.chunk, dim), lambda b, h, i: (b, h, self.chunk_of(i), 0))

    def token_rows_spec(self) -> pl.BlockSpec:
        """Eight chunks' rows ``(8, C)`` of a ``[b, h, n_chunks_8, C]`` array (read or
        write row ``chunk % 8``: :func:`token_row`)."""
        return block_spec(
            (None, None, ROW_BLOCK, self.lay.chunk),
            lambda b, h, i: (b, h, jax.lax.div(self.chunk_of(i), i32(ROW_BLOCK)), 0),
        )

    def states_spec(self) -> pl.BlockSpec:
        """The ``(dk, dv)`` entry state of a chunk in ``[b, h, n_chunks, dk, dv]``."""
        lay = self.lay
        return block_spec((None, None, None, lay.dk_pad, lay.dv_pad), lambda b, h, i: (b, h, self.chunk_of(i), 0, 0))

    def state_spec(self) -> pl.BlockSpec:
        """The ``[dk, dv]`` state of a head (the same block at every chunk: resident)."""
        return block_spec((None, None, self.lay.dk_pad, self.lay.dv_pad), lambda b, h, i: (b, h, 0, 0))

    def heads_shape(self, dim: int, dtype) -> jax.ShapeDtypeStruct:
        lay = self.lay
        return jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.time_pad, dim), dtype)

    def params(self, interpret: bool):
        if interpret:
            return None
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


# ----------------------------------------------------------------------------- in-kernel helpers
def token_row(n_chunks: int, reverse: bool):
    """The row of the current chunk in an ``(8, C)`` block of a per-token row array."""
    step = pl.program_id(2)
    c = n_chunks - 1 - step if reverse else step
    return pl.ds(jax.lax.rem(c, i32(ROW_BLOCK)), 1)


class Triangles:
    """Products with 0/1 matrices (``"highest"`` precision) that replace cumulative sums and
    transposes in a chunk (rows ``i``, columns ``j``; ``lower_ij = [i >= j]``): the
    transposes (one non-zero term) are exact, the sums accurate to float32 rounding of
    ``sum |x|`` (for log-decays ``g <= 0``: of ``|L|``, as a sequential cumulative sum)."""

    def __init__(self, chunk: int, dtype):
        rows, cols = positions(chunk)
        self.lower = (rows >= cols).astype(dtype)
        self.eye = (rows == cols).astype(dtype)
        self.dots = Dots(dtype, "highest")

    def cumsum_col(self, x_row):
        """``[1, C]`` -> ``[C, 1]``, ``L_i = x_0 + ... + x_i``."""
        return self.dots.nt(self.lower, x_row)

    def cumsum(self, x):
        """``[C, d]`` -> ``[C, d]``, cumulative sums down the rows."""
        return self.dots.nn(self.lower, x)

    def rev_cumsum_row(self, x_col):
        """``[C, 1]`` -> ``[1, C]``, ``y_j = x_j + ... + x_{C-1}`` (the cotangent map of
        :meth:`cumsum_col`)."""
        return self.dots.tn(x_col, self.lower)

    def rev_cumsum(self, x):
        """``[C, d]`` -> ``[C, d]``, reverse cumulative sums down the rows."""
        return self.dots.tn(self.lower, x)

    def col(self, x_row):
        """``[1, C]`` -> ``[C, 1]`` (the transpose, as a product with the identity)."""
        return self.dots.nt(self.eye, x_row)

    def row(self, x_col):
        """``[C, 1]`` -> ``[1, C]``."""
        return self.dots.tn(x_col, self.eye)


# ----------------------------------------------------------------------------- kernel math
def _scores_per_channel(x: _Chunk, k_ref, L_ref, chunk: int, dtype):
    """``A [C, C]``: column ``j`` is ``sum_d q_id k_jd exp(L_id - L_jd)`` (``i >= j``), one
    ``[C, dk]`` step per key position, ``k_j`` and ``L_j`` read as rows of the chunk's
    carry-dtype VMEM scratch (as the GPU kernels' loop, on one chunk)."""
    rows, cols = positions(chunk)

    def column(j, A):
        k_j = k_ref[pl.ds(j, 1), :]  # [1, dk]
        decay = masked_exp(x.L - L_ref[pl.ds(j, 1), :], rows >= j)  # [C, dk]
        a_j = jnp.sum(x.q * decay * k_j, axis=1, keepdims=True)  # [C, 1]
        return jnp.where(cols == j, a_j, A)

    return jax.lax.fori_loop(i32(0), i32(chunk), column, jnp.zeros((chunk, chunk), dtype))


def _intra_chunk_grads_per_channel(x: _Chunk, dA, k_ref, L_ref, chunk: int):
    """``dq_i = sum_j dA_ij exp(L_i - L_j) k_j`` and ``dk_j = sum_i dA_ij exp(L_i - L_j) q_i``
    (``i >= j``), one key position ``j`` per step as in :func:`_scores_per_channel`."""
    rows, cols = positions(chunk)

    def column(j, carry):
        dq, dk = carry
        k_j = k_ref[pl.ds(j, 1), :]
        decay = masked_exp(x.L - L_ref[pl.ds(j, 1), :], rows >= j)  # [C, dk]
        dA_j = jnp.sum(jnp.where(cols == j, dA, 0.0), axis=1, keepdims=True)  # [C, 1]
        weighted = dA_j * decay
        dk_j = jnp.sum(weighted * x.q, axis=0, keepdims=True)  # [1, dk]
        return dq + weighted * k_j, jnp.where(rows == j, dk_j, dk)

    zeros = jnp.zeros_like(x.q)
    return jax.lax.fori_loop(i32(0), i32(chunk), column, (zeros, zeros))


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

    def load(self, chunk: int, tri: Triangles, dtype) -> tuple[_Chunk, jax.Array, jax.Array | None]:
        """The chunk's operands, the state's whole-chunk decay ``[dk, 1]`` (or ``[1, 1]``)
        and, per head or without decay, the row form ``[1, C]`` of ``L``."""
        q = self.q[...].astype(dtype)
        k = self.k[...].astype(dtype)
        v = self.v[...].astype(dtype)
        if self.kind == "none":
            zero_row = jnp.zeros((1, chunk), dtype)
            return _Chunk(q, k, v, jnp.zeros((chunk, 1), dtype), jnp.zeros((1, 1), dtype)), jnp.ones((1, 1), dtype), zero_row
        if self.kind == "head":
            g_row = self.g[self.row(), :].astype(dtype)  # [1, C]
            L = tri.cumsum_col(g_row)
            L_row = tri.row(L)  # the same values (an exact copy): D_ii = 1
            last = L_row[:, chunk - 1 :]  # [1, 1]
            return _Chunk(q, k, v, L, last), jnp.exp(last), L_row
        L = tri.cumsum(self.g[...].astype(dtype))  # [C, dk]
        last = L[chunk - 1 :, :]  # [1, dk]
        through = jnp.exp(Triangles(last.shape[1], dtype).col(last))  # [dk, 1]
        self.k_scratch[...] = k
        self.L_scratch[...] = L
        return _Chunk(q, k, v, L, last), through, None


def _scores(x: _Chunk, L_row, step: _Step, chunk: int, dots: Dots):
    """``A [C, C]`` and, per head or without decay, the decay matrix ``D``."""
    if step.kind == "channel":
        return _scores_per_channel(x, step.k_scratch, step.L_scratch, chunk, dots.dtype), None
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
        dq_intra, dk_intra = _intra_chunk_grads_per_channel(x, dA, step.k_scratch, step.L_scratch, chunk)
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
    """Checks and the padded head-major operands: ``(tl, kind, carry, operands, specs)``."""
    kind = _decay_kind(g, q)
    check_tpu_dtypes("chunked_gla", platform, interpret, TPU_DTYPES, q=q, k=k, v=v, g=g, h0=h0)
    chunk = block_sizes.chunk_for(kind)
    # rows of the chunk blocks (g, the states and the gradients are in the carry dtype)
    rows = sublane_rows(*(x.dtype for x in (q, k, v, do) if x is not None))
    if not interpret and chunk % rows:
        raise ValueError(
            f"block_sizes.chunk: the compiled TPU chunked_gla kernels need a multiple of {rows} "
            f"rows for these dtypes, got {chunk}"
        )
    tl = TpuLayout(q, v, chunk, reverse)
    carry = carry_dtype_of(*(x.dtype for x in (q, k, v, g, h0) if x is not None))
    operands = [tl.heads_k(q), tl.heads_k(k), tl.heads_v(v)]
    specs = [tl.seq_spec(tl.dk_pad), tl.seq_spec(tl.dk_pad), tl.seq_spec(tl.dv_pad)]
    if kind == "head":
        operands.append(tl.token_rows(g.astype(carry)))
        specs.append(tl.token_rows_spec())
    elif kind == "channel":
        operands.append(tl.heads_k(g.astype(carry)))
        specs.append(tl.seq_spec(tl.dk_pad))
    return tl, kind, carry, operands, specs


def _scratch(tl: TpuLayout, kind: str, carry) -> list:
    scratch = [pltpu.VMEM((tl.dk_pad, tl.dv_pad), carry)]
    if kind == "channel":
        scratch += [pltpu.VMEM((tl.chunk, tl.dk_pad), carry)] * 2
    return scratch


def chunked_gla_forward_tpu(q, k, v, g, h0, *, scale, block_sizes, save_states, interpret, platform):
    """:func:`pallas_kernels.chunked_gla.chunked_gla_forward` on the TPU layout (same
    arguments and results; ``states`` in the padded layout ``[b, h, n_chunks, dk_pad,
    dv_pad]``)."""
    tl, kind, carry, operands, specs = _prepare(q, k, v, g, h0, block_sizes, interpret, platform, False)
    h0 = jnp.zeros(tl.state_shape(carry).shape, carry) if h0 is None else tl.pad_state(h0)
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    out_specs = [tl.seq_spec(tl.dv_pad), tl.state_spec()]
    out_shape = [tl.heads_shape(tl.dv_pad, out_dtype), tl.state_shape(carry)]
    if save_states:
        out_specs.append(tl.states_spec())
        out_shape.append(tl.states_shape(carry))
    outs = pl.pallas_call(
        functools.partial(
            _forward_kernel,
            kind=kind,
            chunk=tl.chunk,
            n_chunks=tl.n_chunks,
            scale=output_scale(scale, tl.dk),
            save_states=save_states,
            precision=block_sizes.dot_precision,
        ),
        grid=tl.grid,
        in_specs=specs + [tl.state_spec()],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=_scratch(tl, kind, carry),
        interpret=interpret,
        compiler_params=tl.params(interpret),
        name=f"chunked_gla_forward_tpu_{kind}",
    )(*operands, h0)
    o = tl.from_heads(outs[0], tl.dv)
    h_last = outs[1][:, :, : tl.dk, : tl.dv]
    return o, h_last, outs[2] if save_states else None


def chunked_gla_backward_tpu(q, k, v, g, states, do, dh_last, *, scale, block_sizes, interpret, platform):
    """:func:`pallas_kernels.chunked_gla.chunked_gla_backward` on the TPU layout."""
    check_tpu_dtypes("chunked_gla", platform, interpret, TPU_DTYPES, do=do, dh_last=dh_last)
    tl, kind, _, operands, specs = _prepare(q, k, v, g, None, block_sizes, interpret, platform, True, do)
    check_attention_inputs(q, k, v, None, states, tl.lay)
    carry = states.dtype
    out_specs = [tl.seq_spec(tl.dk_pad), tl.seq_spec(tl.dk_pad), tl.seq_spec(tl.dv_pad)]
    out_shape = [tl.heads_shape(tl.dk_pad, carry), tl.heads_shape(tl.dk_pad, carry), tl.heads_shape(tl.dv_pad, carry)]
    if kind == "head":
        out_specs.append(tl.token_rows_spec())
        out_shape.append(tl.token_rows_shape(carry))
    elif kind == "channel":
        out_specs.append(tl.seq_spec(tl.dk_pad))
        out_shape.append(tl.heads_shape(tl.dk_pad, carry))
    out_specs.append(tl.state_spec())
    out_shape.append(tl.state_shape(carry))
    outs = pl.pallas_call(
        functools.partial(
            _backward_kernel,
            kind=kind,
            chunk=tl.chunk,
            n_chunks=tl.n_chunks,
            scale=output_scale(scale, tl.dk),
            precision=block_sizes.dot_precision,
        ),
        grid=tl.grid,
        in_specs=specs + [tl.states_spec(), tl.seq_spec(tl.dv_pad), tl.state_spec()],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=_scratch(tl, kind, carry),
        interpret=interpret,
        compiler_params=tl.params(interpret),
        name=f"chunked_gla_backward_tpu_{kind}",
    )(*operands, states, tl.heads_v(do), tl.pad_state(dh_last.astype(carry)))
    dq, dk, dv = tl.from_heads(outs[0], tl.dk), tl.from_heads(outs[1], tl.dk), tl.from_heads(outs[2], tl.dv)
    dg = None
    if kind == "head":
        dg = tl.from_token_rows(outs[3])
    elif kind == "channel":
        dg = tl.from_heads(outs[3], tl.dk)
    dh0 = outs[-1][:, :, : tl.dk, : tl.dv]
    return dq, dk, dv, dg, dh0
