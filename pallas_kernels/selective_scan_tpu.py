"""Mosaic TPU kernels for the Mamba-1 selective scan, tiled over time.

The math is that of :mod:`pallas_kernels.selective_scan` (its docstring writes out the
recurrence, the chunk-state residual and the adjoint recurrence of the backward; the
per-token loads and discretisation, ``load_token``, and the steps of both recurrences,
``forward_step`` and ``backward_step``, are its own, shared); only the tiling differs, so
that on-chip memory does not grow with ``T`` and every access obeys Mosaic's rules:

* grid ``(batch, d_pad / block_d, n_tiles)``: batch and channel blocks ``"parallel"``,
  the time tiles of ``tile`` tokens ``"arbitrary"`` (sequential). Every operand is seen
  one ``[tile, block_d]`` (``u``, ``delta``, ``y``, ``dy``, ``du``, ``ddelta``) or
  ``[tile, n_pad]`` (``B``, ``C``, ``dB``, ``dC``; the group's block) time tile at a
  time, so VMEM is ``O(tile (block_d + n) + (tile / chunk + chunk) n block_d)``, whatever
  ``T``. ``block_d`` is at least 128 lanes when compiled.
* forward: the state ``x [n_pad, block_d]`` (carry dtype, at least float32) enters and
  leaves each grid step through a VMEM scratch, initialised from ``x0`` at the first
  tile; inside a tile a ``fori_loop`` walks its ``tile / chunk`` chunks, storing the state
  entering each (``chunk_states``, a ``(tile / chunk, n_pad, block_d)`` block of ``[b,
  time_pad / chunk, n_pad, d_pad]``) and then the chunk's tokens one at a time (the
  GPU kernel's step: load one row of ``u``, ``delta``, ``B``, ``C``, update the state,
  store one row of ``y``); ``x_last`` is written at the last tile.
* backward: the tiles are visited last to first (index maps ``n_tiles - 1 - k``), the
  cotangent ``g`` of the state and the ``dA`` sum carried between them in VMEM scratch
  (from ``dx_last`` and zeros at the first step visited; ``dx0`` and ``dA`` written at the
  last). Within a tile the chunks run last to first: the ``chunk + 1`` states of a chunk
  are recomputed from its stored start state into a ``[chunk + 1, n_pad, block_d]``
  VMEM scratch, then its tokens are walked backwards reading ``x_{t-1}``, ``x_t`` from
  it by a (dynamic) leading index: no state is gathered along sublanes (which TPU v4
  cannot do).
* per-token rows are read and written with ``pl.ds(t, 1)`` from 32-bit refs only:
  Mosaic proves such accesses aligned for 32-bit rows, not for packed ones. A 16-bit
  (bfloat16) input block is first copied whole into a carry-dtype scratch; a 16-bit
  output tile (``y``, ``du``, ``ddelta``) is built in one and converted whole. ``dB_t``
  and ``dC_t`` (sums over the channels, ``[n, 1]`` columns) are stored as rows through a
  transpose (``.T``): storing the ``[n]`` vector directly needs a sublane gather.

Padding (in the wrappers): as on GPU, ``n`` to a power of two (at least 8 when compiled)
and each group's channels to a multiple of ``block_d`` with zeros; time to a multiple of
``tile`` with ``u = delta = B = C = dy = 0`` and ``keep = 1`` (decay 1, input 0: the
state passes through unchanged, no gradient flows in). ``tile`` is ``block_t_tpu`` of
:class:`~pallas_kernels.selective_scan.BlockSizes` (lowered to the padded length when
that is smaller), a multiple of ``chunk`` and of the sublane tile (8 rows, 16 with
16-bit inputs or outputs). The residual ``chunk_states`` has ``time_pad / chunk``
states (the GPU one ``ceil(time / chunk)``): pass it unchanged from
:func:`selective_scan_forward_tpu` to :func:`selective_scan_backward_tpu`.

Compiled kernels take float32 and bfloat16 inputs (Mosaic has no float64); the
interpreter (``interpret=True``, ``platform="tpu"``) also runs float64, for exact tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (
    block_spec,
    carry_dtype_of,
    check_tpu_dtypes,
    i32,
    next_power_of_two,
    sublane_rows,
)
from pallas_kernels._tpu_common import TPU_DTYPES, SequentialGrid
from pallas_kernels.selective_scan import (
    BlockSizes,
    Layout,
    Rows,
    backward_step,
    check_inputs,
    forward_step,
    load_token,
    unpad_gradients,
)

__all__ = ["TpuLayout", "selective_scan_backward_tpu", "selective_scan_forward_tpu"]

#: Lanes of a compiled channel block (Mosaic: the last block dim is a multiple of 128).
LANES = 128
#: Smallest padded state size when compiled (one sublane tile of float32 rows).
MIN_STATES = 8


# ----------------------------------------------------------------------------- layout
class TpuLayout(SequentialGrid):
    """The padded layout of one call (:class:`~pallas_kernels.selective_scan.Layout`'s
    sizes and padding helpers) plus the time tiling and the block specs over the grid
    ``(batch, blocks, n_tiles)``; the backward (``reverse``) visits tile ``n_tiles - 1 - k``
    at step ``k``."""

    def __init__(self, u, A, B4, block_sizes: BlockSizes, dtypes, interpret: bool, reverse: bool = False):
        batch, time, d = u.shape
        n, groups = A.shape[0], B4.shape[2]
        per_group = d // groups
        block_d = min(block_sizes.block_d, next_power_of_two(per_group))
        n_pad = next_power_of_two(n)
        if not interpret:  # Mosaic's block rule: whole lane tiles of channels
            block_d, n_pad = max(block_d, LANES), max(n_pad, MIN_STATES)
        group_pad = -(-per_group // block_d) * block_d
        chunk = block_sizes.chunk
        lay = Layout(batch, time, d, n, groups, block_d, group_pad, n_pad, chunk)
        unit = max(chunk, sublane_rows(*dtypes))
        self.tile = max(min(block_sizes.block_t_tpu, -(-time // unit) * unit), unit)
        self.n_tiles = -(-time // self.tile)
        super().__init__(lay, (batch, lay.blocks), self.n_tiles, reverse)

    @property
    def time_pad(self) -> int:
        return self.n_tiles * self.tile

    @property
    def chunks_per_tile(self) -> int:
        return self.tile // self.lay.chunk

    @property
    def n_chunks(self) -> int:
        return self.time_pad // self.lay.chunk

    def pad_time(self, x: jax.Array, axis: int = 1, value: float = 0.0) -> jax.Array:
        pad = self.time_pad - x.shape[axis]
        if pad == 0:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        return jnp.pad(x, widths, constant_values=value)

    # operands: [b, time_pad, d_pad] sequences, [b, g, time_pad, n_pad] B and C
    def seq(self, x: jax.Array) -> jax.Array:
        return self.pad_time(self.lay.pad_channels(x))

    def bc(self, x: jax.Array) -> jax.Array:
        """``[b, t, n]`` or ``[b, t, g, n]`` -> ``[b, g, time_pad, n_pad]``."""
        x = x[:, :, None, :] if x.ndim == 3 else x
        return self.pad_time(self.lay.pad_bc(x), axis=2)

    def keep(self, keep: jax.Array) -> jax.Array:
        return self.pad_time(keep.astype(jnp.float32)[..., None], value=1.0)

    # block specs
    def seq_spec(self) -> pl.BlockSpec:
        return block_spec((None, self.tile, self.lay.block_d), lambda i, j, k: (i, self.step_of(k), j))

    def bc_spec(self) -> pl.BlockSpec:
        """The time tile of the channel block's group (``j >= 0``: truncating division is
        floor division)."""
        per_group = self.lay.group_pad // self.lay.block_d
        return block_spec(
            (None, None, self.tile, self.lay.n_pad),
            lambda i, j, k: (i, jax.lax.div(j, jnp.asarray(per_group, j.dtype)), self.step_of(k), 0),
        )

    def partial_bc_spec(self) -> pl.BlockSpec:
        """``dB``, ``dC`` per channel block ``[b, blocks, time_pad, n_pad]``."""
        return block_spec((None, None, self.tile, self.lay.n_pad), lambda i, j, k: (i, j, self.step_of(k), 0))

    def keep_spec(self) -> pl.BlockSpec:
        return block_spec((None, self.tile, 1), lambda i, j, k: (i, self.step_of(k), 0))

    def A_spec(self) -> pl.BlockSpec:
        return block_spec((self.lay.n_pad, self.lay.block_d), lambda i, j, k: (0, j))

    def state_spec(self) -> pl.BlockSpec:
        """A ``[n_pad, block_d]`` state (the same block at every tile: resident)."""
        return block_spec((None, self.lay.n_pad, self.lay.block_d), lambda i, j, k: (i, 0, j))

    def states_spec(self) -> pl.BlockSpec:
        """The tile's chunk states ``(tile / chunk, n_pad, block_d)``."""
        return block_spec(
            (None, self.chunks_per_tile, self.lay.n_pad, self.lay.block_d),
            lambda i, j, k: (i, self.step_of(k), 0, j),
        )

    def seq_shape(self, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.lay.batch, self.time_pad, self.lay.d_pad), dtype)

    def state_shape(self, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.lay.batch, self.lay.n_pad, self.lay.d_pad), dtype)

    def states_shape(self, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.lay.batch, self.n_chunks, self.lay.n_pad, self.lay.d_pad), dtype)

    def from_seq(self, x: jax.Array) -> jax.Array:
        return self.lay.unpad_channels(x[:, : self.lay.time])

    def sum_groups(self, x: jax.Array, like: jax.Array) -> jax.Array:
        """``dB`` or ``dC`` per channel block ``[b, blocks, time_pad, n_pad]`` -> ``like``'s
        shape and dtype, summed over each group's blocks."""
        lay = self.lay
        x = x[:, :, : lay.time, : lay.n].reshape((lay.batch, lay.groups, lay.blocks // lay.groups, lay.time, lay.n))
        x = jnp.swapaxes(x.sum(2), 1, 2)  # [b, t, g, n]
        return (x if like.ndim == 4 else x[:, :, 0]).astype(like.dtype)


def _narrow(dtype) -> bool:
    """Rows of ``dtype`` are packed (several per sublane): not read or written one at a
    time, but through a carry-dtype scratch."""
    return jnp.dtype(dtype).itemsize < 4


# ----------------------------------------------------------------------------- kernels
class _Refs:
    """A kernel's refs by name: inputs and outputs in ``names`` order, then the scratch.
    ``wide[name]`` is the 32-bit ref a token reads or writes rows of: the block itself,
    or (16-bit blocks) its carry-dtype copy in scratch."""

    def __init__(self, refs, names, scratch, narrow):
        refs = list(refs)
        self.__dict__.update(zip(names, refs[: len(names)]))
        rest = refs[len(names) :]
        self.__dict__.update(zip(scratch, rest[: len(scratch)]))
        copies = dict(zip(narrow, rest[len(scratch) :]))
        self.wide = {name: copies.get(name, getattr(self, name)) for name in names}

    def load_inputs(self, names):
        """Copy the 16-bit input blocks among ``names`` into their scratch."""
        for name in names:
            block, wide = getattr(self, name), self.wide[name]
            if wide is not block:
                wide[...] = block[...].astype(wide.dtype)

    def store_outputs(self, names):
        """Convert the 16-bit output tiles among ``names`` from their scratch."""
        for name in names:
            block, wide = getattr(self, name), self.wide[name]
            if wide is not block:
                block[...] = wide[...].astype(block.dtype)

    def rows(self) -> Rows:
        """The 32-bit refs a token step reads and writes rows of."""
        return Rows(**{name: self.wide.get(name) for name in Rows._fields})


def _store_channel_sum(ref, t, x):
    """Row ``t`` of ``ref``: the sum of ``x [n, block_d]`` over the channels, an ``[n, 1]``
    column stored as a row through a transpose (storing the ``[n]`` vector directly needs a
    sublane gather)."""
    ref[pl.ds(t, 1), :] = jnp.sum(x, axis=1, keepdims=True).T.astype(ref.dtype)


def _forward_kernel(*refs, chunk, n_tiles, has_keep, save_states, narrow):
    names = ("u", "delta", "A", "B", "C") + (("keep",) if has_keep else ()) + ("x0", "y", "x_last")
    names += ("states",) if save_states else ()
    r = _Refs(refs, names, ("carry",), narrow)
    dtype = r.carry.dtype
    tile = r.y.shape[0]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        r.carry[...] = r.x0[...].astype(dtype)

    r.load_inputs(("u", "delta", "B", "C"))
    A = r.A[...].astype(dtype)
    step = functools.partial(forward_step, r.rows(), A, dtype)

    def run_chunk(c, x):
        if save_states:
            r.states[c] = x.astype(r.states.dtype)
        start = c * chunk
        return jax.lax.fori_loop(start, start + chunk, step, x)

    x = jax.lax.fori_loop(i32(0), i32(tile // chunk), run_chunk, r.carry[...])
    r.carry[...] = x
    r.store_outputs(("y",))

    @pl.when(k == n_tiles - 1)
    def _():
        r.x_last[...] = x.astype(r.x_last.dtype)


def _backward_kernel(*refs, chunk, n_tiles, has_keep, narrow):
    names = ("u", "delta", "A", "B", "C") + (("keep",) if has_keep else ())
    names += ("states", "dy", "dx_last", "du", "ddelta", "dA", "dB", "dC", "dx0")
    r = _Refs(refs, names, ("g", "dA_sum", "xs"), narrow)
    dtype = r.g.dtype
    tile = r.du.shape[0]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        r.g[...] = r.dx_last[...].astype(dtype)
        r.dA_sum[...] = jnp.zeros(r.dA_sum.shape, dtype)

    r.load_inputs(("u", "delta", "B", "C", "dy"))
    A = r.A[...].astype(dtype)
    rows = r.rows()

    def recompute(i, start):
        """``xs[i + 1]`` = the state after token ``start + i``."""
        tok = load_token(rows, A, start + i, dtype)
        r.xs[i + 1] = tok.decay * r.xs[i] + tok.inp
        return start

    def chunk_backward(kc, carry):
        c = tile // chunk - 1 - kc
        start = c * chunk
        r.xs[0] = r.states[c].astype(dtype)
        jax.lax.fori_loop(i32(0), i32(chunk), recompute, start)

        def body(ki, carry):
            i = chunk - 1 - ki
            return backward_step(rows, A, dtype, _store_channel_sum, start + i, r.xs[i], r.xs[i + 1], carry)

        return jax.lax.fori_loop(i32(0), i32(chunk), body, carry)

    g, dA = jax.lax.fori_loop(i32(0), i32(tile // chunk), chunk_backward, (r.g[...], r.dA_sum[...]))
    r.g[...] = g
    r.dA_sum[...] = dA
    r.store_outputs(("du", "ddelta"))

    @pl.when(k == n_tiles - 1)
    def _():
        r.dx0[...] = g.astype(r.dx0.dtype)
        r.dA[...] = dA.astype(r.dA.dtype)


# ----------------------------------------------------------------------------- wrappers
def _narrow_scratch(tl: TpuLayout, carry, arrays: dict) -> tuple[tuple[str, ...], list]:
    """The 16-bit blocks among ``arrays`` (name -> dtype, in kernel ref order) and their
    carry-dtype scratch: ``[tile, block_d]`` sequences, ``[tile, n_pad]`` for B and C."""
    names, scratch = [], []
    for name, dtype in arrays.items():
        if _narrow(dtype):
            width = tl.n_pad if name in ("B", "C") else tl.block_d
            names.append(name)
            scratch.append(pltpu.VMEM((tl.tile, width), carry))
    return tuple(names), scratch


def _prepare(u, delta, A, B, C, keep, tl: TpuLayout):
    """The padded kernel operands u, delta, A (in the carry dtype), B, C (and keep) and
    their block specs."""
    operands = [tl.seq(u), tl.seq(delta), tl.lay.pad_state(A), tl.bc(B), tl.bc(C)]
    if keep is not None:
        operands.append(tl.keep(keep))
    specs = [tl.seq_spec(), tl.seq_spec(), tl.A_spec(), tl.bc_spec(), tl.bc_spec()]
    if keep is not None:
        specs.append(tl.keep_spec())
    return operands, specs


def selective_scan_forward_tpu(u, delta, A, B, C, x0, keep, *, block_sizes, save_chunk_states, interpret, platform):
    """:func:`pallas_kernels.selective_scan.selective_scan_forward` on the TPU tiling (same
    arguments and results; ``chunk_states`` ``[batch, time_pad / chunk, n_pad, d_pad]``)."""
    check_inputs(u, delta, A, B, C, x0, keep)
    check_tpu_dtypes("selective_scan", platform, interpret, TPU_DTYPES, u=u, delta=delta, A=A, B=B, C=C, x0=x0)
    carry = carry_dtype_of(u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype, *(() if x0 is None else (x0.dtype,)))
    y_dtype = jnp.result_type(u.dtype, delta.dtype, B.dtype, C.dtype)
    B4 = B if B.ndim == 4 else B[:, :, None, :]
    dtypes = (u.dtype, delta.dtype, B.dtype, C.dtype, y_dtype)
    tl = TpuLayout(u, A, B4, block_sizes, dtypes, interpret)
    operands, specs = _prepare(u, delta, A.astype(carry), B, C, keep, tl)
    x0 = jnp.zeros(tl.state_shape(carry).shape, carry) if x0 is None else tl.pad_state(x0.astype(carry))
    narrow, narrow_scratch = _narrow_scratch(
        tl, carry, {"u": u.dtype, "delta": delta.dtype, "B": B.dtype, "C": C.dtype, "y": y_dtype}
    )
    out_specs = [tl.seq_spec(), tl.state_spec()]
    out_shape = [tl.seq_shape(y_dtype), tl.state_shape(carry)]
    if save_chunk_states:
        out_specs.append(tl.states_spec())
        out_shape.append(tl.states_shape(carry))
    outs = pl.pallas_call(
        functools.partial(
            _forward_kernel,
            chunk=tl.chunk,
            n_tiles=tl.n_tiles,
            has_keep=keep is not None,
            save_states=save_chunk_states,
            narrow=narrow,
        ),
        grid=tl.grid,
        in_specs=specs + [tl.state_spec()],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((tl.n_pad, tl.block_d), carry)] + narrow_scratch,
        interpret=interpret,
        compiler_params=tl.params(interpret),
        name="selective_scan_forward_tpu",
    )(*operands, x0)
    states = outs[2] if save_chunk_states else None
    return tl.from_seq(outs[0]), tl.unpad_state(outs[1]), states


def selective_scan_backward_tpu(u, delta, A, B, C, keep, chunk_states, dy, dx_last, *, block_sizes, interpret, platform):
    """:func:`pallas_kernels.selective_scan.selective_scan_backward` on the TPU tiling
    (``chunk_states``: the residual of :func:`selective_scan_forward_tpu`)."""
    check_inputs(u, delta, A, B, C, None, keep)
    check_tpu_dtypes("selective_scan", platform, interpret, TPU_DTYPES, u=u, delta=delta, A=A, B=B, C=C, dy=dy)
    if dy.shape != u.shape:
        raise ValueError(f"dy: expected shape u.shape = {u.shape}, got {dy.shape}")
    carry = chunk_states.dtype
    B4 = B if B.ndim == 4 else B[:, :, None, :]
    dtypes = (u.dtype, delta.dtype, B.dtype, C.dtype, dy.dtype)
    tl = TpuLayout(u, A, B4, block_sizes, dtypes, interpret, reverse=True)
    expected = tl.states_shape(carry).shape
    if chunk_states.shape != expected:
        raise ValueError(
            f"chunk_states: expected shape {expected} (the TPU forward's, same block_sizes), "
            f"got {chunk_states.shape}"
        )
    operands, specs = _prepare(u, delta, A.astype(carry), B, C, keep, tl)
    narrow, narrow_scratch = _narrow_scratch(
        tl, carry,
        {"u": u.dtype, "delta": delta.dtype, "B": B.dtype, "C": C.dtype, "dy": dy.dtype,
         "du": u.dtype, "ddelta": delta.dtype},
    )
    partial_bc = jax.ShapeDtypeStruct((tl.batch, tl.blocks, tl.time_pad, tl.n_pad), carry)
    outs = pl.pallas_call(
        functools.partial(
            _backward_kernel, chunk=tl.chunk, n_tiles=tl.n_tiles, has_keep=keep is not None, narrow=narrow
        ),
        grid=tl.grid,
        in_specs=specs + [tl.states_spec(), tl.seq_spec(), tl.state_spec()],
        out_specs=[
            tl.seq_spec(), tl.seq_spec(), tl.state_spec(), tl.partial_bc_spec(), tl.partial_bc_spec(), tl.state_spec()
        ],
        out_shape=[
            tl.seq_shape(u.dtype), tl.seq_shape(delta.dtype), tl.state_shape(carry), partial_bc, partial_bc,
            tl.state_shape(carry),
        ],
        scratch_shapes=[
            pltpu.VMEM((tl.n_pad, tl.block_d), carry),
            pltpu.VMEM((tl.n_pad, tl.block_d), carry),
            pltpu.VMEM((tl.chunk + 1, tl.n_pad, tl.block_d), carry),
        ]
        + narrow_scratch,
        interpret=interpret,
        compiler_params=tl.params(interpret),
        name="selective_scan_backward_tpu",
    )(*operands, chunk_states, tl.seq(dy), tl.pad_state(dx_last.astype(carry)))
    return unpad_gradients(tl, outs, A, B, C)
