"""Pallas kernel for the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t``.

Shapes (batch-first, time axis 1)::

    a            [batch or 1, time, d]   decays (real; float32 / bfloat16 / float64)
    b            [batch, time, d]        inputs
    h0           [batch, d]              state before the first step (zeros if None)
    h            [batch, time, d]        every state, in the dtype of ``a * b``
    h_last       [batch, d]              the state after the last step, in the carry dtype

Forward (``reverse=False``): ``h_t = a_t * h_{t-1} + b_t`` for ``t = 0 .. T-1`` from
``h_{-1} = h0``. Reverse (``reverse=True``): ``h_t = a_t * h_{t+1} + b_t`` for
``t = T-1 .. 0`` from ``h_T = h0``; ``h_last`` is then ``h_0``. The reverse direction is
the backward of the forward one (``g_t = dh_t + a_{t+1} g_{t+1}``), so a custom VJP needs
no second kernel: run this one with ``reverse=True`` (the wiring lives in
``ssmjax.scan.linear``, not here). This is the recurrentgemma design (De et al., 2024,
"Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language
Models").

Kernel layout (the Triton-style pattern: no scratch memory, no cross-program sync):

* grid ``(batch, d_pad / block_d)``: one program per batch row and block of ``block_d``
  features; programs are independent, so both grid axes are parallel.
* inside a program a ``lax.fori_loop`` walks the time axis in chunks of ``block_t``
  steps (unrolled, so the loads of a chunk do not wait on the carry and can be issued
  ahead of the dependent multiply-adds), then the ``T % block_t`` remaining steps: ``T``
  need not be a multiple of ``block_t`` and nothing is padded in time.
* the carry ``h`` ``[1, block_d]`` lives in registers in the carry dtype (at least
  float32); every step loads one row ``[1, block_d]`` of ``a`` and ``b`` (contiguous, so
  coalesced) and stores one row of ``h``. Each input element is read once and each output
  written once: the kernel is bandwidth bound by design.
* features are padded to a multiple of ``block_d`` in the wrapper (only when needed);
  ``block_d`` and ``block_t`` are powers of two, as the Triton lowering requires for the
  arrays it loads.

Backends: ``interpret=True`` runs the kernel with the Pallas interpreter on any backend
(the CPU test suite does this). Without it, ``pl.pallas_call`` lowers through Triton on
NVIDIA/AMD GPUs (the default GPU lowering of ``pallas_call``) and through Mosaic on TPU.
On TPU (``platform="tpu"``) the time axis is a third, sequential grid axis instead: each
program sees a ``[block_t_tpu, block_d]`` tile of every operand (so the VMEM Mosaic
stages, double buffered, is ``O(block_t_tpu * block_d)`` whatever ``T``) and carries ``h``
from one tile to the next in a ``[1, block_d]`` VMEM scratch buffer, initialised from
``h0`` at the first tile; ``T`` is padded to a multiple of the tile with ``a = 1, b = 0``
(steps that keep the state, so ``h_last`` and the reverse run are unchanged).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (
    block_spec,
    carry_dtype_of,
    check_tpu_dtypes,
    compiler_params,
    i32,
    is_power_of_two,
    lane_multiple,
    sublane_rows,
    time_loop,
    next_power_of_two,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the linear-scan kernel.

    Attributes:
      block_d: features per program (power of two). 128 fills a 4-warp Triton program
        with one float32 lane per thread; it is lowered to ``next_power_of_two(d)`` when
        ``d`` is smaller (and raised to 128 lanes on TPU).
      block_t: time steps per unrolled chunk of the time loop (power of two).
      block_t_tpu: TPU only: time steps per grid step (power of two, >= 8 sublanes); VMEM
        holds about ``2 * 3 * block_t_tpu * block_d`` elements. Lowered to the padded
        sequence length when that is smaller, raised to the slab of ``max(block_t, 8 or
        16 rows)`` steps the kernel loads at once.
    """

    block_d: int = 128
    block_t: int = 8
    block_t_tpu: int = 512

    def __post_init__(self):
        for name in ("block_d", "block_t", "block_t_tpu"):
            if not is_power_of_two(getattr(self, name)):
                raise ValueError(
                    f"block_sizes.{name}: expected a positive power of two, "
                    f"got {getattr(self, name)!r}"
                )
        if self.block_t_tpu < 8:
            raise ValueError(f"block_sizes.block_t_tpu: expected >= 8 (one TPU sublane tile), got {self.block_t_tpu}")


def _linear_scan_kernel(a_ref, b_ref, h0_ref, h_ref, last_ref, *, time, block_t, reverse):
    """One program: ``[time, block_d]`` slices of one batch row."""
    carry_dtype = last_ref.dtype

    def step(t, h):
        row = pl.ds(time - 1 - t if reverse else t, 1)
        h = a_ref[row, :].astype(carry_dtype) * h + b_ref[row, :].astype(carry_dtype)
        h_ref[row, :] = h.astype(h_ref.dtype)
        return h

    last_ref[...] = time_loop(time, block_t, step, h0_ref[...].astype(carry_dtype))


def _tiled_kernel(a_ref, b_ref, h0_ref, h_ref, last_ref, carry_ref, *, rows, reverse):
    """One grid step of the TPU kernel: a ``[tile, block_d]`` time tile, walked in aligned
    slabs of ``rows`` steps (a multiple of the sublane tiling, so every load and store is
    a whole ``[rows, block_d]`` slab: Mosaic cannot prove single-row accesses of packed
    dtypes aligned); the carry enters and leaves through ``carry_ref`` (VMEM scratch, kept
    across the sequential time axis)."""
    carry_dtype = carry_ref.dtype
    n_slabs = h_ref.shape[0] // rows
    row_ids = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)

    @pl.when(pl.program_id(2) == 0)
    def _():
        carry_ref[...] = h0_ref[...].astype(carry_dtype)

    def slab(c, h):
        start = (n_slabs - 1 - c) if reverse else c
        block = pl.ds(pl.multiple_of(start * rows, rows), rows)
        a = a_ref[block, :].astype(carry_dtype)
        b = b_ref[block, :].astype(carry_dtype)
        out = jnp.zeros(a.shape, carry_dtype)
        for i in reversed(range(rows)) if reverse else range(rows):
            h = a[i : i + 1] * h + b[i : i + 1]
            out = jnp.where(row_ids == i, h, out)
        h_ref[block, :] = out.astype(h_ref.dtype)
        return h

    carry_ref[...] = jax.lax.fori_loop(i32(0), i32(n_slabs), slab, carry_ref[...])
    last_ref[...] = carry_ref[...]


def _pad_last(x: jax.Array, size: int, value: float = 0.0) -> jax.Array:
    pad = size - x.shape[-1]
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=value)


@functools.partial(jax.jit, static_argnames=("reverse", "block_sizes", "interpret", "platform"))
def linear_scan(
    a: jax.Array,
    b: jax.Array,
    h0: jax.Array | None = None,
    *,
    reverse: bool = False,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``h_t = a_t * h_{t-1} + b_t`` over ``[batch, time, d]`` (see the module docstring).

    Args:
      a: ``[batch, time, d]`` or ``[1, time, d]`` (shared over the batch), real.
      b: ``[batch, time, d]``, real.
      h0: ``[batch, d]`` or ``None`` (zeros).
      reverse: scan from ``t = T-1`` down to ``0``.
      block_sizes: kernel tiling, see :class:`BlockSizes`.
      interpret: run with the Pallas interpreter (CPU, debugging).
      platform: the backend to compile for (``"gpu"``: Triton, ``"tpu"``: Mosaic);
        ``None``: ``jax.default_backend()``. Only needed to lower for another backend.

    Returns:
      ``(h, h_last)``: ``h`` ``[batch, time, d]`` in ``result_type(a, b)``, ``h_last``
      ``[batch, d]`` in the carry dtype (``result_type(float32, a, b, h0)``).
    """
    if b.ndim != 3:
        raise ValueError(f"b: expected shape [batch, time, d], got {b.shape}")
    batch, time, d = b.shape
    if a.ndim != 3 or a.shape[1:] != b.shape[1:] or a.shape[0] not in (1, batch):
        raise ValueError(f"a: expected shape [batch or 1, time, d] = [{batch}, {time}, {d}], got {a.shape}")
    if h0 is not None and h0.shape != (batch, d):
        raise ValueError(f"h0: expected shape [batch, d] = {(batch, d)}, got {h0.shape}")
    for name, x in (("a", a), ("b", b), ("h0", h0)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a real floating dtype, got {x.dtype}")
    check_tpu_dtypes("linear_scan", platform, interpret, (jnp.float32, jnp.bfloat16), a=a, b=b, h0=h0)
    carry_dtype = carry_dtype_of(a.dtype, b.dtype, *(() if h0 is None else (h0.dtype,)))
    out_dtype = jnp.result_type(a.dtype, b.dtype)
    if h0 is None:
        h0 = jnp.zeros((batch, d), carry_dtype)

    block_d = min(max(block_sizes.block_d, lane_multiple(platform, interpret)), next_power_of_two(d))
    d_pad = -(-d // block_d) * block_d
    a, b = _pad_last(a, d_pad, 1.0), _pad_last(b, d_pad)
    h0 = _pad_last(h0, d_pad)[:, None, :]

    shared_a = a.shape[0] == 1 and batch > 1
    call = _tiled_call if (platform or jax.default_backend()) == "tpu" else _untiled_call
    h, last = call(
        a, b, h0, shared_a=shared_a, out_dtype=out_dtype, carry_dtype=carry_dtype, block_d=block_d,
        block_sizes=block_sizes, reverse=reverse, interpret=interpret, platform=platform,
    )
    return h[:, :time, :d], last[:, 0, :d]


def _untiled_call(a, b, h0, *, shared_a, out_dtype, carry_dtype, block_d, block_sizes, reverse, interpret, platform):
    """Grid ``(batch, d_pad / block_d)``; each program walks the whole sequence."""
    batch, time, d_pad = b.shape
    seq_block = (None, time, block_d)
    state_block = block_spec((None, 1, block_d), lambda i, j: (i, 0, j))
    return pl.pallas_call(
        functools.partial(
            _linear_scan_kernel, time=time, block_t=block_sizes.block_t, reverse=reverse
        ),
        grid=(batch, d_pad // block_d),
        in_specs=[
            block_spec(seq_block, (lambda i, j: (0, 0, j)) if shared_a else (lambda i, j: (i, 0, j))),
            block_spec(seq_block, lambda i, j: (i, 0, j)),
            state_block,
        ],
        out_specs=[block_spec(seq_block, lambda i, j: (i, 0, j)), state_block],
        out_shape=[
            jax.ShapeDtypeStruct((batch, time, d_pad), out_dtype),
            jax.ShapeDtypeStruct((batch, 1, d_pad), carry_dtype),
        ],
        interpret=interpret,
        compiler_params=compiler_params(platform, interpret),
        name="linear_scan_reverse" if reverse else "linear_scan",
    )(a, b, h0)


def _tiled_call(a, b, h0, *, shared_a, out_dtype, carry_dtype, block_d, block_sizes, reverse, interpret, platform):
    """Grid ``(batch, d_pad / block_d, time_pad / tile)`` (TPU): the time axis is sequential
    and the carry lives in VMEM scratch between tiles (see the module docstring)."""
    batch, time, d_pad = b.shape
    rows = max(block_sizes.block_t, sublane_rows(a.dtype, b.dtype, out_dtype))
    tile = max(min(block_sizes.block_t_tpu, -(-time // rows) * rows), rows)
    n_tiles = -(-time // tile)
    a, b = _pad_time(a, n_tiles * tile, 1.0), _pad_time(b, n_tiles * tile)

    def tile_of(k):  # the reverse run visits the time tiles last to first
        return n_tiles - 1 - k if reverse else k

    seq_block = (None, tile, block_d)
    state_block = block_spec((None, 1, block_d), lambda i, j, k: (i, 0, j))
    params = None
    if not interpret:
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    return pl.pallas_call(
        functools.partial(_tiled_kernel, rows=rows, reverse=reverse),
        grid=(batch, d_pad // block_d, n_tiles),
        in_specs=[
            block_spec(seq_block, lambda i, j, k: (0 if shared_a else i, tile_of(k), j)),
            block_spec(seq_block, lambda i, j, k: (i, tile_of(k), j)),
            state_block,
        ],
        out_specs=[block_spec(seq_block, lambda i, j, k: (i, tile_of(k), j)), state_block],
        out_shape=[
            jax.ShapeDtypeStruct((batch, n_tiles * tile, d_pad), out_dtype),
            jax.ShapeDtypeStruct((batch, 1, d_pad), carry_dtype),
        ],
        scratch_shapes=[pltpu.VMEM((1, block_d), carry_dtype)],
        interpret=interpret,
        compiler_params=params,
        name="linear_scan_reverse" if reverse else "linear_scan",
    )(a, b, h0)


def _pad_time(x: jax.Array, size: int, value: float = 0.0) -> jax.Array:
    pad = size - x.shape[1]
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, pad), (0, 0)], constant_values=value)
