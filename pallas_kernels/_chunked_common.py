"""Pieces shared by the chunked attention kernels (:mod:`pallas_kernels.chunked_gla`,
:mod:`pallas_kernels.chunked_delta` and their Mosaic TPU versions
:mod:`pallas_kernels.chunked_gla_tpu`, :mod:`pallas_kernels.chunked_delta_tpu`): their
tiling, the padded layouts and block specs of both platforms (:class:`Layout` for the
Triton kernels, the head-major :class:`TpuLayout`), the ``pallas_call`` plumbing of the
wrappers (:func:`forward_call`, :func:`backward_call`), input checks, the chunk-local
cumulative log-decay and its transpose, the masked exponential, the in-kernel dot
products, products with 0/1 matrices (:class:`Triangles`) and chunk loops. Jax only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    block_spec,
    compiler_params,
    i32,
    is_power_of_two,
    next_power_of_two,
    sublane_rows,
)
from pallas_kernels._tpu_common import SequentialGrid

#: ``dot_precision`` values: ``"highest"`` (exact float32 products; on GPU Triton's IEEE
#: path without tensor cores) or ``"default"`` (Triton may use TF32 tensor cores for
#: float32 operands: faster, ~1e-3 relative error per product).
DOT_PRECISIONS = ("highest", "default")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the chunked kernels.

    Attributes:
      chunk: tokens per chunk (power of two; >= 16 when compiled for a GPU). ``None``:
        32 with a per-head (or no) decay, 16 with a per-channel decay (whose intra-chunk
        part costs ``C`` steps of ``[C, dk]`` exponentials per chunk).
      block_v: value columns per program (power of two); lowered to
        ``next_power_of_two(dv)`` when that is smaller.
        The state tile is ``[dk, block_v]`` and the backward carries two of them.

    The defaults fit the shared memory of an A100 and an H100 at head dim 128 (compiled
    ahead of time, ``tests/kernels/test_targets.py``): the backward stages the operand
    tiles of its dots in shared memory, 154 KiB at chunk 32 with 32 value columns, but
    355 KiB at chunk 64 / 64 columns and 267 KiB at chunk 64 / 32 columns (limits: H100
    227 KiB, A100 163 KiB).
      dot_precision: see :data:`DOT_PRECISIONS`.
      num_warps: warps per compiled Triton program (power of two). 8 by default, not
        tuned on hardware: a program holds several ``[C, dk]`` and ``[dk, block_v]`` float32
        tiles at once, more than 4 warps' registers hold without spilling.
      block_k: key channels per step of the forward kernels' ``dk`` contractions (power
        of two; lowered to the padded ``dk`` when that is smaller). The forward keeps its
        state as ``dk / block_k`` row blocks ``[block_k, block_v]`` and walks them once per
        chunk, loading ``q``, ``k`` (and a per-channel decay) ``block_k`` columns at a
        time: a float32 ``dot`` at ``"highest"`` precision is Triton's FMA path, whose
        operands sit in registers along the whole contraction, so ``[C, dk] @ [dk, ...]``
        at ``dk = 128`` spills registers where four ``block_k = 32`` steps do not
        (compiled for H100 / A100, ``tests/kernels/test_targets.py``). The sums are the
        same up to rounding order; the backward kernels do not use it.
    """

    chunk: int | None = None
    block_v: int = 32
    dot_precision: str = "highest"
    num_warps: int = 8
    block_k: int = 32

    def __post_init__(self):
        for name in ("chunk", "block_v", "num_warps", "block_k"):
            value = getattr(self, name)
            if value is not None and not is_power_of_two(value):
                raise ValueError(f"block_sizes.{name}: expected a positive power of two, got {value!r}")
        if self.dot_precision not in DOT_PRECISIONS:
            raise ValueError(
                f"block_sizes.dot_precision: expected one of {DOT_PRECISIONS}, got {self.dot_precision!r}"
            )

    def chunk_for(self, kind: str) -> int:
        if self.chunk is not None:
            return self.chunk
        return 16 if kind == "channel" else 32


# ----------------------------------------------------------------------------- helpers
def min_dot_size(platform: str | None, interpret: bool) -> int:
    """The smallest matrix dimension a compiled kernel may feed to a dot: Triton's
    ``tl.dot`` wants ``M, N, K >= 16``. Interpreted kernels have no minimum."""
    return 1 if interpret else 16


def triton_params(platform: str | None, interpret: bool, num_warps: int):
    """``pallas_kernels._common.compiler_params`` with this kernel's number of warps."""
    params = compiler_params(platform, interpret)
    return None if params is None else dataclasses.replace(params, num_warps=num_warps)


def padded_dim(n: int, minimum: int) -> int:
    return max(next_power_of_two(n), minimum)


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad ``x`` at the end of ``axis`` up to ``size``."""
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def chunk_local_cumsum(g: jax.Array, chunk: int) -> jax.Array:
    """``L`` with ``L_i = g_{c0} + ... + g_i`` over axis 1 (time), restarting at every
    chunk start ``c0`` (``time`` a multiple of ``chunk``)."""
    b, t = g.shape[:2]
    x = g.reshape((b, t // chunk, chunk) + g.shape[2:])
    return jnp.cumsum(x, axis=2).reshape(g.shape)


def chunk_local_cumsum_transpose(dL: jax.Array, chunk: int) -> jax.Array:
    """The cotangent map of :func:`chunk_local_cumsum`: a reverse cumulative sum inside
    every chunk, ``dg_t = dL_t + ... + dL_{chunk end}``."""
    b, t = dL.shape[:2]
    x = dL.reshape((b, t // chunk, chunk) + dL.shape[2:])
    return jax.lax.cumsum(x, axis=2, reverse=True).reshape(dL.shape)


class Dots:
    """Matrix products of kernel values in the carry dtype, at a fixed precision."""

    def __init__(self, dtype, precision: str):
        self.dtype = dtype
        self.precision = jax.lax.Precision.HIGHEST if precision == "highest" else None

    def _dot(self, a, b, dims):
        return jax.lax.dot_general(
            a, b, (dims, ((), ())), precision=self.precision, preferred_element_type=self.dtype
        )

    def nn(self, a, b):
        """``a @ b``."""
        return self._dot(a, b, ((1,), (0,)))

    def tn(self, a, b):
        """``a^T @ b``."""
        return self._dot(a, b, ((0,), (0,)))

    def nt(self, a, b):
        """``a @ b^T``."""
        return self._dot(a, b, ((1,), (1,)))


def positions(chunk: int):
    """Row and column indices ``[C, 1]``, ``[1, C]`` of a chunk's ``[C, C]`` matrices."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    return rows, cols


def masked_exp(x: jax.Array, keep: jax.Array) -> jax.Array:
    """``exp(x)`` where ``keep``, else ``0``; masked entries become ``-inf`` before ``exp``."""
    return jnp.exp(jnp.where(keep, x, -jnp.inf))


def reverse_chunk_loop(n_chunks: int, body, carry):
    """``carry = body(c, carry)`` for ``c = n_chunks - 1 .. 0``."""
    return jax.lax.fori_loop(i32(0), i32(n_chunks), lambda i, x: body(n_chunks - 1 - i, x), carry)


def chunk_rows(c, chunk: int):
    return pl.ds(pl.multiple_of(c * chunk, chunk), chunk)


def key_blocks(dk_pad: int, block_k: int) -> list:
    """The column slices ``[block_k]`` (at most ``dk_pad``) that tile the padded key dim."""
    size = min(block_k, dk_pad)
    return [pl.ds(i * size, size) for i in range(dk_pad // size)]


# ----------------------------------------------------------------------------- GPU layout
class Layout(NamedTuple):
    """Static padded sizes shared by the forward and backward wrappers, and the Triton
    kernels' operands and block specs over the grid ``(batch, heads, value blocks)``."""

    batch: int
    time: int
    heads: int
    dk: int
    dv: int
    chunk: int
    dk_pad: int
    block_v: int
    dv_pad: int

    @property
    def time_pad(self) -> int:
        return self.n_chunks * self.chunk

    @property
    def n_chunks(self) -> int:
        return -(-self.time // self.chunk)

    @property
    def v_blocks(self) -> int:
        return self.dv_pad // self.block_v

    @staticmethod
    def of(q: jax.Array, v: jax.Array, chunk: int, block_v: int, min_dot: int) -> Layout:
        batch, time, heads, dk = q.shape
        dv = v.shape[-1]
        dk_pad = padded_dim(dk, min_dot)
        block_v = max(min(block_v, next_power_of_two(dv)), min_dot)
        dv_pad = -(-dv // block_v) * block_v
        return Layout(batch, time, heads, dk, dv, chunk, dk_pad, block_v, dv_pad)

    # [b, t, h, d] operands
    def pad_k(self, x: jax.Array) -> jax.Array:
        return pad_axis(pad_axis(x, 1, self.time_pad), 3, self.dk_pad)

    def pad_v(self, x: jax.Array) -> jax.Array:
        return pad_axis(pad_axis(x, 1, self.time_pad), 3, self.dv_pad)

    def pad_time(self, x: jax.Array) -> jax.Array:
        return pad_axis(x, 1, self.time_pad)

    def pad_state(self, x: jax.Array) -> jax.Array:
        return pad_axis(pad_axis(x, 2, self.dk_pad), 3, self.dv_pad)

    def unpad_state(self, x: jax.Array) -> jax.Array:
        """``[b, h, dk_pad, dv_pad]`` -> ``[b, h, dk, dv]``."""
        return x[:, :, : self.dk, : self.dv]

    # BlockSpecs over the grid (batch, heads, value blocks)
    def k_spec(self) -> pl.BlockSpec:
        return block_spec((None, self.time_pad, None, self.dk_pad), lambda b, h, j: (b, 0, h, 0))

    def v_spec(self) -> pl.BlockSpec:
        return block_spec((None, self.time_pad, None, self.block_v), lambda b, h, j: (b, 0, h, j))

    def head_spec(self) -> pl.BlockSpec:
        """``[b, t, h]`` (per-head decay, beta)."""
        return block_spec((None, self.time_pad, None), lambda b, h, j: (b, 0, h))

    def state_spec(self) -> pl.BlockSpec:
        return block_spec((None, None, self.dk_pad, self.block_v), lambda b, h, j: (b, h, 0, j))

    def states_spec(self) -> pl.BlockSpec:
        return block_spec(
            (None, None, self.n_chunks, self.dk_pad, self.block_v), lambda b, h, j: (b, h, 0, 0, j)
        )

    def partial_k_spec(self) -> pl.BlockSpec:
        """``[v_blocks, b, t, h, dk]`` per-value-block partial sums."""
        return block_spec((None, None, self.time_pad, None, self.dk_pad), lambda b, h, j: (j, b, 0, h, 0))

    def partial_head_spec(self) -> pl.BlockSpec:
        """``[v_blocks, b, t, h]`` per-value-block partial sums."""
        return block_spec((None, None, self.time_pad, None), lambda b, h, j: (j, b, 0, h))

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.batch, self.heads, self.v_blocks)

    def states_shape(self, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.batch, self.heads, self.n_chunks, self.dk_pad, self.dv_pad), dtype)

    def state_shape(self, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.batch, self.heads, self.dk_pad, self.dv_pad), dtype)

    def seq_shape(self, dim: int, dtype, partial: bool = False) -> jax.ShapeDtypeStruct:
        lead = (self.v_blocks,) if partial else ()
        return jax.ShapeDtypeStruct(lead + (self.batch, self.time_pad, self.heads, dim), dtype)

    def head_shape(self, dtype, partial: bool = False) -> jax.ShapeDtypeStruct:
        lead = (self.v_blocks,) if partial else ()
        return jax.ShapeDtypeStruct(lead + (self.batch, self.time_pad, self.heads), dtype)

    # the kernels' inputs (operand, block spec) and outputs (shape, block spec); a gate is
    # a per-token input: "token" (beta), "head" or "channel" (log-decay per head or key
    # channel), see :meth:`Launch.with_gate`
    def k_input(self, x: jax.Array) -> tuple:
        return self.pad_k(x), self.k_spec()

    def v_input(self, x: jax.Array) -> tuple:
        return self.pad_v(x), self.v_spec()

    def gate_input(self, kind: str, x: jax.Array) -> tuple:
        """``beta`` as given; a log-decay as the kernels read it, its chunk-local
        cumulative sum ``L``."""
        if kind == "token":
            return self.pad_time(x), self.head_spec()
        if kind == "head":
            return chunk_local_cumsum(self.pad_time(x), self.chunk), self.head_spec()
        return chunk_local_cumsum(self.pad_k(x), self.chunk), self.k_spec()

    def v_output(self, dtype) -> tuple:
        return self.seq_shape(self.dv_pad, dtype), self.v_spec()

    def key_grad_output(self, dtype) -> tuple:
        """A ``[b, t, h, dk]`` gradient, in per-value-block partial sums."""
        return self.seq_shape(self.dk_pad, dtype, partial=True), self.partial_k_spec()

    def gate_grad_output(self, kind: str, dtype) -> tuple:
        """A gate's gradient (a log-decay's: that of ``L``), in per-value-block partial sums."""
        if kind == "channel":
            return self.key_grad_output(dtype)
        return self.head_shape(dtype, partial=True), self.partial_head_spec()

    # outputs back to [b, t, h, ...]
    def from_seq(self, x: jax.Array, dim: int) -> jax.Array:
        return x[:, : self.time, :, :dim]

    def from_key_grad(self, x: jax.Array) -> jax.Array:
        return jnp.sum(x, axis=0)[:, : self.time, :, : self.dk]

    def from_gate_grad(self, kind: str, x: jax.Array) -> jax.Array:
        """The partial sums added; a log-decay's gradient is that of ``L`` through the
        chunk-local cumulative sum."""
        x = jnp.sum(x, axis=0)
        if kind == "token":
            return x[:, : self.time]
        dg = chunk_local_cumsum_transpose(x, self.chunk)[:, : self.time]
        return dg[..., : self.dk] if kind == "channel" else dg


# ----------------------------------------------------------------------------- TPU layout
#: Smallest padded head dim of the TPU layout (one sublane tile of float32 rows).
MIN_DIM = 8
#: Chunks per block of a per-token row array ``[b, h, n_chunks_8, C]`` (one sublane tile).
ROW_BLOCK = 8


class TpuLayout(SequentialGrid):
    """The padded head-major layout of one TPU call: :class:`Layout`'s sizes (one value
    block of the whole padded ``dv``) and the Mosaic kernels' operands and block specs over
    the grid ``(b, h, chunk)``; the backward (``reverse``) visits chunk ``n_chunks - 1 -
    i`` at step ``i``. Per-token vectors (gates and their gradients) are lane-dense rows
    ``[b, h, n_chunks_8, C]`` in blocks of :data:`ROW_BLOCK` chunks."""

    def __init__(self, q: jax.Array, v: jax.Array, chunk: int, reverse: bool = False):
        lay = Layout.of(q, v, chunk, next_power_of_two(max(v.shape[-1], MIN_DIM)), MIN_DIM)
        super().__init__(lay, (lay.batch, lay.heads), lay.n_chunks, reverse)

    @property
    def row_blocks(self) -> int:
        return -(-self.lay.n_chunks // ROW_BLOCK)

    # [b, t, h, ...] <-> [b, h, t_pad, ...] operands
    def heads_k(self, x: jax.Array) -> jax.Array:
        return jnp.moveaxis(self.lay.pad_k(x), 2, 1)

    def heads_v(self, x: jax.Array) -> jax.Array:
        return jnp.moveaxis(self.lay.pad_v(x), 2, 1)

    def from_seq(self, x: jax.Array, dim: int) -> jax.Array:
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
        return block_spec((None, None, self.lay.chunk, dim), lambda b, h, i: (b, h, self.step_of(i), 0))

    def token_rows_spec(self) -> pl.BlockSpec:
        """Eight chunks' rows ``(8, C)`` of a ``[b, h, n_chunks_8, C]`` array (read or
        write row ``chunk % 8``: :func:`token_row`)."""
        return block_spec(
            (None, None, ROW_BLOCK, self.lay.chunk),
            lambda b, h, i: (b, h, jax.lax.div(self.step_of(i), i32(ROW_BLOCK)), 0),
        )

    def states_spec(self) -> pl.BlockSpec:
        """The ``(dk, dv)`` entry state of a chunk in ``[b, h, n_chunks, dk, dv]``."""
        lay = self.lay
        return block_spec((None, None, None, lay.dk_pad, lay.dv_pad), lambda b, h, i: (b, h, self.step_of(i), 0, 0))

    def state_spec(self) -> pl.BlockSpec:
        """The ``[dk, dv]`` state of a head (the same block at every chunk: resident)."""
        return block_spec((None, None, self.lay.dk_pad, self.lay.dv_pad), lambda b, h, i: (b, h, 0, 0))

    def seq_shape(self, dim: int, dtype) -> jax.ShapeDtypeStruct:
        lay = self.lay
        return jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.time_pad, dim), dtype)

    # the kernels' inputs and outputs (as :class:`Layout`'s)
    def k_input(self, x: jax.Array) -> tuple:
        return self.heads_k(x), self.seq_spec(self.lay.dk_pad)

    def v_input(self, x: jax.Array) -> tuple:
        return self.heads_v(x), self.seq_spec(self.lay.dv_pad)

    def gate_input(self, kind: str, x: jax.Array) -> tuple:
        """A gate as given (the kernels form a log-decay's chunk-local sums ``L``)."""
        if kind == "channel":
            return self.k_input(x)
        return self.token_rows(x), self.token_rows_spec()

    def v_output(self, dtype) -> tuple:
        return self.seq_shape(self.lay.dv_pad, dtype), self.seq_spec(self.lay.dv_pad)

    def key_grad_output(self, dtype) -> tuple:
        return self.seq_shape(self.lay.dk_pad, dtype), self.seq_spec(self.lay.dk_pad)

    def gate_grad_output(self, kind: str, dtype) -> tuple:
        """A gate's gradient (the kernels return a log-decay's, not that of ``L``)."""
        if kind == "channel":
            return self.key_grad_output(dtype)
        return self.token_rows_shape(dtype), self.token_rows_spec()

    def from_key_grad(self, x: jax.Array) -> jax.Array:
        return self.from_seq(x, self.lay.dk)

    def from_gate_grad(self, kind: str, x: jax.Array) -> jax.Array:
        return self.from_seq(x, self.lay.dk) if kind == "channel" else self.from_token_rows(x)


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


# ----------------------------------------------------------------------------- calls
class Launch(NamedTuple):
    """A chunked kernel call as the wrappers prepare it: the layout (:class:`Layout` or
    :class:`TpuLayout`), the padded inputs as ``(operand, block spec)`` pairs (``q, k, v``,
    then the gates), the gates' kinds and the ``pallas_call`` options of the platform."""

    lay: Any
    inputs: tuple
    gates: tuple
    interpret: bool
    compiler_params: Any

    @staticmethod
    def start(lay, q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool, params) -> Launch:
        return Launch(lay, (lay.k_input(q), lay.k_input(k), lay.v_input(v)), (), interpret, params)

    def with_gate(self, kind: str, x: jax.Array) -> Launch:
        """Add the per-token input ``x``: ``"token"`` (``beta [b, t, h]``), ``"head"``
        (log-decay ``[b, t, h]``) or ``"channel"`` (log-decay ``[b, t, h, dk]``); the
        backward kernel writes the gradient of each gate after ``dv``, in this order."""
        return self._replace(inputs=self.inputs + (self.lay.gate_input(kind, x),), gates=self.gates + (kind,))


def gpu_launch(
    q: jax.Array, k: jax.Array, v: jax.Array, chunk: int, block_sizes: BlockSizes, interpret: bool, platform
) -> Launch:
    """The Triton kernels' launch of ``q, k, v`` at ``chunk`` tokens a chunk (compiled:
    ``chunk`` and the padded head dims at least ``tl.dot``'s minimum)."""
    min_dot = min_dot_size(platform, interpret)
    if chunk < min_dot:
        raise ValueError(f"block_sizes.chunk: compiled kernels need chunk >= {min_dot}, got {chunk}")
    lay = Layout.of(q, v, chunk, block_sizes.block_v, min_dot)
    return Launch.start(lay, q, k, v, interpret, triton_params(platform, interpret, block_sizes.num_warps))


def tpu_launch(
    kernel: str, q: jax.Array, k: jax.Array, v: jax.Array, do, chunk: int, interpret: bool, reverse: bool
) -> Launch:
    """The Mosaic kernels' launch of ``q, k, v`` (and the backward's ``do``) at ``chunk``
    tokens a chunk, which compiled must be whole sublane tiles of their rows (the gates,
    states and gradients are in the carry dtype, at least 32-bit)."""
    rows = sublane_rows(*(x.dtype for x in (q, k, v, do) if x is not None))
    if not interpret and chunk % rows:
        raise ValueError(
            f"block_sizes.chunk: the compiled TPU {kernel} kernels need a multiple of {rows} "
            f"rows for these dtypes, got {chunk}"
        )
    tl = TpuLayout(q, v, chunk, reverse)
    return Launch.start(tl, q, k, v, interpret, tl.params(interpret))


def _with_statics(kernel, lay, scale: float | None, block_sizes: BlockSizes, **statics):
    """``kernel`` with the static arguments every chunked kernel takes bound."""
    return functools.partial(
        kernel,
        n_chunks=lay.n_chunks,
        chunk=lay.chunk,
        scale=output_scale(scale, lay.dk),
        precision=block_sizes.dot_precision,
        **statics,
    )


def _call(kernel, launch: Launch, inputs: list, outputs: list, name: str, scratch):
    """``pl.pallas_call`` of ``kernel`` over the layout's grid on the launch's inputs, then
    ``inputs`` (``(operand, block spec)``), with ``outputs`` (``(shape, block spec)``)."""
    operands, in_specs = zip(*(list(launch.inputs) + inputs))
    out_shape, out_specs = zip(*outputs)
    return pl.pallas_call(
        kernel,
        grid=launch.lay.grid,
        in_specs=list(in_specs),
        out_specs=list(out_specs),
        out_shape=list(out_shape),
        scratch_shapes=scratch,
        interpret=launch.interpret,
        compiler_params=launch.compiler_params,
        name=name,
    )(*operands)


def forward_call(
    kernel, launch: Launch, h0, carry, out_dtype, *, scale, block_sizes, save_states: bool, name: str, scratch=()
):
    """Run a forward ``kernel`` (refs: the launch's inputs, ``h0``; ``o``, ``h_last`` and,
    with ``save_states``, the states) from ``h0`` (``None``: zeros): ``(o, h_last,
    states)``, ``states`` (``None`` unless ``save_states``) in the padded layout ``[b, h,
    n_chunks, dk_pad, dv_pad]`` and the carry dtype."""
    lay = launch.lay
    h0 = jnp.zeros(lay.state_shape(carry).shape, carry) if h0 is None else lay.pad_state(h0)
    outputs = [lay.v_output(out_dtype), (lay.state_shape(carry), lay.state_spec())]
    if save_states:
        outputs.append((lay.states_shape(carry), lay.states_spec()))
    kernel = _with_statics(kernel, lay, scale, block_sizes, save_states=save_states)
    outs = _call(kernel, launch, [(h0, lay.state_spec())], outputs, name, scratch)
    return lay.from_seq(outs[0], lay.dv), lay.unpad_state(outs[1]), outs[2] if save_states else None


def backward_call(
    kernel, launch: Launch, states: jax.Array, do: jax.Array, dh_last: jax.Array, *, scale, block_sizes, name: str,
    scratch=(),
) -> tuple:
    """Run a backward ``kernel`` (refs: the launch's inputs, ``states``, ``do``,
    ``dh_last``; ``dq``, ``dk``, ``dv``, the gates' gradients, ``dh0``) on the forward's
    ``states``: ``(dq, dk, dv, *gate_grads, dh0)`` in the carry dtype (``states``')."""
    lay = launch.lay
    check_states(states, lay)
    carry = states.dtype
    residuals = [(states, lay.states_spec()), lay.v_input(do), (lay.pad_state(dh_last.astype(carry)), lay.state_spec())]
    outputs = [lay.key_grad_output(carry), lay.key_grad_output(carry), lay.v_output(carry)]
    outputs += [lay.gate_grad_output(kind, carry) for kind in launch.gates]
    outputs.append((lay.state_shape(carry), lay.state_spec()))
    outs = _call(_with_statics(kernel, lay, scale, block_sizes), launch, residuals, outputs, name, scratch)
    grads = [lay.from_key_grad(outs[0]), lay.from_key_grad(outs[1]), lay.from_seq(outs[2], lay.dv)]
    grads += [lay.from_gate_grad(kind, x) for kind, x in zip(launch.gates, outs[3:-1])]
    return (*grads, lay.unpad_state(outs[-1]))


# ----------------------------------------------------------------------------- checks
def check_attention_inputs(q, k, v, h0) -> None:
    """Shapes and dtypes of ``q, k [b, t, h, dk]``, ``v [b, t, h, dv]``, ``h0 [b, h, dk, dv]``."""
    if q.ndim != 4:
        raise ValueError(f"q: expected shape [batch, time, heads, dk], got {q.shape}")
    batch, time, heads, dk = q.shape
    if time == 0:
        raise ValueError(f"q: expected at least one time step, got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape q.shape [batch, time, heads, dk] = {q.shape}, got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected shape [batch, time, heads, dv] = [{batch}, {time}, {heads}, dv], got {v.shape}")
    if h0 is not None and h0.shape != (batch, heads, dk, v.shape[-1]):
        raise ValueError(
            f"h0: expected shape [batch, heads, dk, dv] = {(batch, heads, dk, v.shape[-1])}, got {h0.shape}"
        )
    for name, x in (("q", q), ("k", k), ("v", v), ("h0", h0)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a real floating dtype, got {x.dtype}")


def check_states(states, lay) -> None:
    """``ValueError`` unless ``states`` has the shape of the forward's saved chunk states."""
    want = lay.states_shape(states.dtype).shape
    if states.shape != want:
        raise ValueError(f"states: expected the forward's saved chunk states of shape {want}, got {states.shape}")


def output_scale(scale: float | None, dk: int) -> float:
    """The output scale as a static Python float: ``scale``, or ``dk ** -0.5`` if ``None``."""
    return float(dk**-0.5 if scale is None else scale)
