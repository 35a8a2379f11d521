"""Pieces shared by the chunked attention kernels (:mod:`pallas_kernels.chunked_gla`,
:mod:`pallas_kernels.chunked_delta`): their tiling, padded layout and block specs,
input checks, the chunk-local cumulative log-decay and its transpose, the masked
exponential, the in-kernel dot products and chunk loops. Jax only.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    block_spec,
    compiler_params,
    i32,
    is_power_of_two,
    next_power_of_two,
)

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


class Layout(NamedTuple):
    """Static padded sizes shared by the forward and backward wrappers."""

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


def check_attention_inputs(q, k, v, h0, states=None, layout: Layout | None = None) -> None:
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
    if states is not None and layout is not None:
        want = layout.states_shape(states.dtype).shape
        if states.shape != want:
            raise ValueError(
                f"states: expected the forward's saved chunk states of shape {want}, got {states.shape}"
            )
    for name, x in (("q", q), ("k", k), ("v", v), ("h0", h0)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a real floating dtype, got {x.dtype}")


def output_scale(scale: float | None, dk: int) -> float:
    """The output scale as a static Python float: ``scale``, or ``dk ** -0.5`` if ``None``."""
    return float(dk**-0.5 if scale is None else scale)
