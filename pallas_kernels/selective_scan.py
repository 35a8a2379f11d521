"""Pallas kernels for the Mamba-1 selective scan, fused with discretisation and readout.

Gu & Dao (2023), "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
Algorithm 2. For every batch row, state index ``n`` and channel ``d``::

    decay_t[n, d] = exp(delta_t[d] * A[n, d])        (0 where keep_t is False)
    x_t[n, d]     = decay_t[n, d] * x_{t-1}[n, d] + delta_t[d] * u_t[d] * B_t[g(d), n]
    y_t[d]        = sum_n C_t[g(d), n] * x_t[n, d]

with ``x_{-1} = x0``. ``keep`` (``[batch, time]`` bool, optional) cuts the carry for packed
sequences; ``g(d)`` is the group of channel ``d`` (channels split into ``g`` equal
contiguous groups, as in mamba_ssm). ``delta`` is the step size *after* any bias and
softplus; ``D``, ``z`` and the softplus are elementwise and belong to the caller.

Layout: states are *state-major, channels minor*, ``x`` ``[batch, n, d]`` and ``A``
``[n, d]``, so every per-token row the kernels touch (``u_t``, ``delta_t``, ``y_t``:
``block_d`` contiguous channels; ``B_t``, ``C_t``: ``n`` contiguous values) is one
coalesced load or store. Shapes::

    u, delta     [batch, time, d]            real (float32 / bfloat16 / float64)
    A            [n, d]                      real (complex A is not supported: ValueError)
    B, C         [batch, time, n] or [batch, time, g, n]
    x0           [batch, n, d]               or None (zeros)
    keep         [batch, time] bool          or None (no cut)

Forward kernel (grid ``(batch, d_pad / block_d)``, one program per batch row and block of
channels): a ``lax.fori_loop`` over chunks of ``chunk`` tokens; per token it loads one row
of ``u``, ``delta``, ``B``, ``C``, forms ``exp(delta A)`` and ``delta B u`` for its
``[n, block_d]`` tile, updates the state held in registers (carry dtype, at least
float32), and stores one row of ``y``. The ``[b, t, n, d]`` tensors never reach memory.
It also stores the state entering every chunk, ``chunk_states`` ``[b, ceil(T / chunk), n,
d]``, the only residual of the backward besides the inputs: ``O(b t d n / chunk)`` memory
(``O(b t d)`` for ``chunk >= n``).

Backward kernel (same grid), the recompute strategy of mamba_ssm: chunks are visited last
to first; for each, the ``chunk + 1`` states are recomputed from its stored start state
into registers (the chunk is unrolled, so ``chunk * n * block_d`` values are live: keep
``chunk * n * block_d / (32 * num_warps)`` within the register budget), then walked
backwards with the adjoint recurrence (``g`` = cotangent of ``x_t`` from the future)::

    gx       = g + dy_t C_t                       [n, block_d]
    d_exp    = gx * x_{t-1} * decay_t             cotangent of delta_t * A
    d_in     = sum_n gx * B_t                     cotangent of delta_t * u_t   [block_d]
    du_t     = d_in * delta_t
    ddelta_t = sum_n d_exp * A + d_in * u_t
    dB_t     = sum_d gx * delta_t * u_t           (partial over this channel block)
    dC_t     = sum_d dy_t * x_t                   (partial over this channel block)
    dA      += d_exp * delta_t                    (per batch row)
    g        = decay_t * gx                       -> dx0 after t = 0

``dA`` comes out per batch row ``[b, n, d]`` and ``dB``/``dC`` per channel block
``[b, blocks, t, n]``; the wrappers sum them (no atomics, so the result is deterministic).

Padding (in the wrappers, only when needed): ``n`` to a power of two and the channels of
each group to a multiple of ``block_d`` with ``u = delta = A = B = C = x0 = 0`` (decay 1,
input 0: padded lanes stay zero and get zero gradients). ``T`` is never padded: the time
loop runs full chunks, then the remainder.

Backends: ``interpret=True`` everywhere (CPU tests). Compiled: Triton on GPUs (requested
explicitly; no scratch memory, no cross-program communication). With ``platform="tpu"``
(compiled, or interpreted with ``interpret=True``) the public functions run the Mosaic
TPU kernels of :mod:`pallas_kernels.selective_scan_tpu` instead (the same per-token math,
time tiled over a sequential grid axis with the carry in VMEM scratch, so VMEM does not
grow with ``T``; float32 and bfloat16 inputs).
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
    carry_dtype_of,
    compiler_params,
    i32,
    is_power_of_two,
    lane_multiple,
    next_power_of_two,
)

__all__ = ["BlockSizes", "selective_scan_backward", "selective_scan_forward"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the selective-scan kernels.

    Attributes:
      block_d: channels per program (power of two); lowered to fit a group's channel
        count when that is smaller.
      chunk: tokens per chunk (power of two): the forward stores one state per chunk and
        the backward holds ``chunk + 1`` states of ``[n, block_d]`` in registers.
      block_t_tpu: TPU only (:mod:`pallas_kernels.selective_scan_tpu`): tokens per
        sequential grid step (power of two); VMEM grows with it, not with ``T``.
        Lowered to the padded sequence length when that is smaller, raised to a
        multiple of ``chunk`` and of the sublane tile.
    """

    block_d: int = 32
    chunk: int = 16
    block_t_tpu: int = 256

    def __post_init__(self):
        for name in ("block_d", "chunk", "block_t_tpu"):
            if not is_power_of_two(getattr(self, name)):
                raise ValueError(
                    f"block_sizes.{name}: expected a positive power of two, "
                    f"got {getattr(self, name)!r}"
                )


class Layout(NamedTuple):
    """Static padded sizes shared by the forward and backward wrappers (and the TPU
    layout, :mod:`pallas_kernels.selective_scan_tpu`)."""

    batch: int
    time: int
    d: int
    n: int
    groups: int
    block_d: int
    group_pad: int  # padded channels per group (multiple of block_d)
    n_pad: int
    chunk: int

    @property
    def d_pad(self) -> int:
        return self.groups * self.group_pad

    @property
    def blocks(self) -> int:
        return self.d_pad // self.block_d

    @property
    def n_chunks(self) -> int:
        return -(-self.time // self.chunk)

    def pad_channels(self, x: jax.Array) -> jax.Array:
        """``[..., d]`` -> ``[..., d_pad]``, zero-padding every group's channels."""
        per_group = self.d // self.groups
        if per_group == self.group_pad:
            return x
        x = x.reshape(x.shape[:-1] + (self.groups, per_group))
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.group_pad - per_group)])
        return x.reshape(x.shape[:-2] + (self.d_pad,))

    def unpad_channels(self, x: jax.Array) -> jax.Array:
        per_group = self.d // self.groups
        if per_group == self.group_pad:
            return x
        x = x.reshape(x.shape[:-1] + (self.groups, self.group_pad))[..., :per_group]
        return x.reshape(x.shape[:-2] + (self.d,))

    def pad_state(self, x: jax.Array) -> jax.Array:
        """``[..., n, d]`` -> ``[..., n_pad, d_pad]``."""
        x = self.pad_channels(x)
        pad = self.n_pad - self.n
        return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)])

    def unpad_state(self, x: jax.Array) -> jax.Array:
        return self.unpad_channels(x[..., : self.n, :])

    def pad_bc(self, x: jax.Array) -> jax.Array:
        """``[b, t, g, n]`` -> ``[b, g, t, n_pad]`` (a free reshape when ``g = 1``)."""
        pad = self.n_pad - self.n
        x = x if pad == 0 else jnp.pad(x, [(0, 0)] * 3 + [(0, pad)])
        return jnp.swapaxes(x, 1, 2)

    def from_seq(self, x: jax.Array) -> jax.Array:
        """A kernel's ``[b, time, d_pad]`` output -> ``[b, time, d]``."""
        return self.unpad_channels(x)

    def sum_groups(self, x: jax.Array, like: jax.Array) -> jax.Array:
        """``dB`` or ``dC`` per channel block ``[b, blocks, time, n_pad]`` -> ``like``'s
        shape and dtype, summed over each group's blocks."""
        x = x.reshape((self.batch, self.groups, self.blocks // self.groups, self.time, self.n_pad))
        x = jnp.swapaxes(x.sum(2)[..., : self.n], 1, 2)  # [b, t, g, n]
        return (x if like.ndim == 4 else x[:, :, 0]).astype(like.dtype)


def _layout(u, A, B, block_sizes: BlockSizes, min_block_d: int) -> Layout:
    batch, time, d = u.shape
    n = A.shape[0]
    groups = B.shape[2]
    block_d = min(max(block_sizes.block_d, min_block_d), next_power_of_two(d // groups))
    group_pad = -(-(d // groups) // block_d) * block_d
    return Layout(batch, time, d, n, groups, block_d, group_pad, next_power_of_two(n), block_sizes.chunk)


def check_inputs(u, delta, A, B, C, x0, keep):
    if u.ndim != 3:
        raise ValueError(f"u: expected shape [batch, time, d], got {u.shape}")
    batch, time, d = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta: expected shape u.shape [batch, time, d] = {u.shape}, got {delta.shape}")
    if A.ndim != 2 or A.shape[1] != d:
        raise ValueError(f"A: expected shape [n, d] with d = {d}, got {A.shape}")
    n = A.shape[0]
    if B.ndim not in (3, 4) or B.shape[:2] != (batch, time) or B.shape[-1] != n:
        raise ValueError(f"B: expected shape [batch, time, n] or [batch, time, g, n] = [{batch}, {time}, (g,) {n}], got {B.shape}")
    if C.shape != B.shape:
        raise ValueError(f"C: expected shape B.shape = {B.shape}, got {C.shape}")
    if B.ndim == 4 and d % B.shape[2]:
        raise ValueError(f"B: the number of groups g = {B.shape[2]} must divide d = {d}")
    if x0 is not None and x0.shape != (batch, n, d):
        raise ValueError(f"x0: expected shape [batch, n, d] = {(batch, n, d)}, got {x0.shape}")
    if keep is not None and keep.shape != (batch, time):
        raise ValueError(f"keep: expected shape [batch, time] = {(batch, time)}, got {keep.shape}")
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("x0", x0)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{name}: expected a real floating dtype, got {x.dtype}"
                + (" (the Pallas selective scan has no complex kernel)" if jnp.iscomplexobj(x) else "")
            )


# ----------------------------------------------------------------------------- kernels
# (Rows, load_token and the steps are shared with selective_scan_tpu)
class Rows(NamedTuple):
    """The refs whose per-token rows a step reads (``u``, ``delta``, ``B``, ``C``, the
    optional ``keep``; the backward's ``dy``) and writes (``y``; ``du``, ``ddelta``,
    ``dB``, ``dC``), by name."""

    u: Any
    delta: Any
    B: Any
    C: Any
    keep: Any = None
    y: Any = None
    dy: Any = None
    du: Any = None
    ddelta: Any = None
    dB: Any = None
    dC: Any = None


class Token(NamedTuple):
    """One token's inputs for an ``[n, block_d]`` tile, in the carry dtype."""

    u: jax.Array  # [1, block_d]
    delta: jax.Array  # [1, block_d]
    B: jax.Array  # [n, 1]
    decay: jax.Array  # [n, block_d], zero where the carry is cut

    @property
    def inp(self) -> jax.Array:
        return self.B * (self.delta * self.u)


def load_token(rows: Rows, A, t, carry_dtype) -> Token:
    row = pl.ds(t, 1)
    u = rows.u[row, :].astype(carry_dtype)
    delta = rows.delta[row, :].astype(carry_dtype)
    B = rows.B[t, :].astype(carry_dtype)[:, None]
    decay = jnp.exp(delta * A)
    if rows.keep is not None:
        decay = jnp.where(rows.keep[row, :] != 0, decay, jnp.zeros_like(decay))
    return Token(u, delta, B, decay)


def _read_row_C(C_ref, t, carry_dtype):
    return C_ref[t, :].astype(carry_dtype)[:, None]  # [n, 1]


def forward_step(rows: Rows, A, carry_dtype, t, x):
    """Token ``t`` of the recurrence: the state after it (``x``: the one before); writes
    ``y_t``."""
    tok = load_token(rows, A, t, carry_dtype)
    x = tok.decay * x + tok.inp
    y = jnp.sum(x * _read_row_C(rows.C, t, carry_dtype), axis=0, keepdims=True)
    rows.y[pl.ds(t, 1), :] = y.astype(rows.y.dtype)
    return x


def backward_step(rows: Rows, A, carry_dtype, store_channel_sum, t, x_prev, x, carry):
    """Token ``t`` of the adjoint recurrence: ``(g, dA)`` before it (``carry``: after it;
    ``x_prev``, ``x``: the states before and after it); writes ``du_t``, ``ddelta_t`` and,
    by ``store_channel_sum(ref, t, v)`` (row ``t`` of ``ref``: the sum of ``v [n,
    block_d]`` over the channels), ``dB_t`` and ``dC_t``."""
    g, dA = carry
    tok = load_token(rows, A, t, carry_dtype)
    C = _read_row_C(rows.C, t, carry_dtype)
    row = pl.ds(t, 1)
    dy = rows.dy[row, :].astype(carry_dtype)  # [1, block_d]
    gx = g + dy * C
    d_exp = gx * x_prev * tok.decay
    d_in = jnp.sum(gx * tok.B, axis=0, keepdims=True)  # [1, block_d]
    rows.du[row, :] = (d_in * tok.delta).astype(rows.du.dtype)
    ddelta = jnp.sum(d_exp * A, axis=0, keepdims=True) + d_in * tok.u
    rows.ddelta[row, :] = ddelta.astype(rows.ddelta.dtype)
    store_channel_sum(rows.dB, t, gx * (tok.delta * tok.u))
    store_channel_sum(rows.dC, t, dy * x)
    return tok.decay * gx, dA + d_exp * tok.delta


def _store_channel_sum(ref, t, x):
    """Row ``t`` of ``ref``: the sum of ``x [n, block_d]`` over the channels."""
    ref[t, :] = jnp.sum(x, axis=1).astype(ref.dtype)


def _forward_kernel(*refs, time, chunk, has_keep, save_chunk_states):
    u_ref, delta_ref, A_ref, B_ref, C_ref = refs[:5]
    keep_ref = refs[5] if has_keep else None
    x0_ref, y_ref, last_ref = refs[5 + has_keep : 8 + has_keep]
    states_ref = refs[8 + has_keep] if save_chunk_states else None
    carry_dtype = last_ref.dtype
    A = A_ref[...].astype(carry_dtype)
    step = functools.partial(forward_step, Rows(u_ref, delta_ref, B_ref, C_ref, keep_ref, y=y_ref), A, carry_dtype)

    def run_chunk(c, start, length, x):
        if states_ref is not None:
            states_ref[pl.ds(c, 1), :, :] = x[None].astype(states_ref.dtype)
        return jax.lax.fori_loop(i32(start), i32(start) + length, step, x)

    n_full, rest = divmod(time, chunk)
    x = x0_ref[...].astype(carry_dtype)
    if n_full:
        x = jax.lax.fori_loop(i32(0), i32(n_full), lambda c, x: run_chunk(c, c * chunk, chunk, x), x)
    if rest:
        x = run_chunk(n_full, n_full * chunk, rest, x)
    last_ref[...] = x.astype(last_ref.dtype)


def _backward_kernel(*refs, time, chunk, has_keep):
    u_ref, delta_ref, A_ref, B_ref, C_ref = refs[:5]
    keep_ref = refs[5] if has_keep else None
    (states_ref, dy_ref, dlast_ref, du_ref, ddelta_ref, dA_ref, dB_ref, dC_ref, dx0_ref) = refs[
        5 + has_keep :
    ]
    carry_dtype = dx0_ref.dtype
    A = A_ref[...].astype(carry_dtype)
    rows = Rows(u_ref, delta_ref, B_ref, C_ref, keep_ref, dy=dy_ref, du=du_ref, ddelta=ddelta_ref, dB=dB_ref, dC=dC_ref)

    def chunk_backward(c, start, length, carry):
        """Recompute the chunk's states from its stored start (unrolled: they stay in
        registers), then walk them backwards."""
        xs = [states_ref[c].astype(carry_dtype)]
        for i in range(length):
            tok = load_token(rows, A, start + i, carry_dtype)
            xs.append(tok.decay * xs[-1] + tok.inp)
        for i in reversed(range(length)):
            carry = backward_step(rows, A, carry_dtype, _store_channel_sum, start + i, xs[i], xs[i + 1], carry)
        return carry

    n_full, rest = divmod(time, chunk)
    carry = (dlast_ref[...].astype(carry_dtype), jnp.zeros_like(A))
    if rest:
        carry = chunk_backward(n_full, n_full * chunk, rest, carry)
    if n_full:

        def body(k, carry):
            c = n_full - 1 - k
            return chunk_backward(c, c * chunk, chunk, carry)

        carry = jax.lax.fori_loop(i32(0), i32(n_full), body, carry)
    g, dA = carry
    dx0_ref[...] = g.astype(dx0_ref.dtype)
    dA_ref[...] = dA.astype(dA_ref.dtype)


# ----------------------------------------------------------------------------- wrappers
def _specs(lay: Layout):
    """BlockSpecs of the inputs shared by both kernels: u, delta, A, B, C, keep."""
    blocks_per_group = lay.group_pad // lay.block_d
    seq = block_spec((None, lay.time, lay.block_d), lambda i, j: (i, 0, j))
    # B, C as [batch, g, time, n]: the block's last two dims are whole (Mosaic TPU rule);
    # j >= 0, so truncating division is floor division (no sign op in the index map).
    bc = block_spec((None, None, lay.time, lay.n_pad), lambda i, j: (i, jax.lax.div(j, jnp.asarray(blocks_per_group, j.dtype)), 0, 0))
    A = block_spec((lay.n_pad, lay.block_d), lambda i, j: (0, j))
    keep = block_spec((None, lay.time, 1), lambda i, j: (i, 0, 0))
    state = block_spec((None, lay.n_pad, lay.block_d), lambda i, j: (i, 0, j))
    return seq, A, bc, keep, state


def _prepare(u, delta, A, B, C, keep, block_sizes, platform, interpret):
    """Pad to the kernel layout; returns the layout and the padded kernel operands."""
    if B.ndim == 3:
        B, C = B[:, :, None, :], C[:, :, None, :]
    lay = _layout(u, A, B, block_sizes, lane_multiple(platform, interpret))
    operands = [
        lay.pad_channels(u),
        lay.pad_channels(delta),
        lay.pad_state(A),
        lay.pad_bc(B),
        lay.pad_bc(C),
    ]
    if keep is not None:
        operands.append(keep.astype(jnp.float32)[..., None])
    return lay, operands


@functools.partial(
    jax.jit, static_argnames=("block_sizes", "save_chunk_states", "interpret", "platform")
)
def selective_scan_forward(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    x0: jax.Array | None = None,
    keep: jax.Array | None = None,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    save_chunk_states: bool = True,
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The fused selective scan (see the module docstring for shapes and recurrence).

    Returns:
      ``(y, x_last, chunk_states)``: ``y`` ``[batch, time, d]`` in
      ``result_type(u, delta, B, C)``; ``x_last`` ``[batch, n, d]`` and the residual
      ``chunk_states`` (``None`` unless ``save_chunk_states``; padded kernel layout
      ``[batch, ceil(time / chunk), n_pad, d_pad]``; on TPU ``time_pad / chunk`` states,
      :mod:`pallas_kernels.selective_scan_tpu`; pass it unchanged to
      :func:`selective_scan_backward`) in the carry dtype, at least float32.
    """
    check_inputs(u, delta, A, B, C, x0, keep)
    if (platform or jax.default_backend()) == "tpu":  # Mosaic TPU (or its interpreter)
        from pallas_kernels.selective_scan_tpu import selective_scan_forward_tpu

        return selective_scan_forward_tpu(
            u, delta, A, B, C, x0, keep, block_sizes=block_sizes,
            save_chunk_states=save_chunk_states, interpret=interpret, platform=platform,
        )
    carry_dtype = carry_dtype_of(u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype, *(() if x0 is None else (x0.dtype,)))
    y_dtype = jnp.result_type(u.dtype, delta.dtype, B.dtype, C.dtype)
    lay, operands = _prepare(u, delta, A, B, C, keep, block_sizes, platform, interpret)
    if x0 is None:
        x0 = jnp.zeros((lay.batch, lay.n_pad, lay.d_pad), carry_dtype)
    else:
        x0 = lay.pad_state(x0)
    seq, A_spec, bc, keep_spec, state = _specs(lay)
    out_specs = [seq, state]
    out_shape = [
        jax.ShapeDtypeStruct((lay.batch, lay.time, lay.d_pad), y_dtype),
        jax.ShapeDtypeStruct((lay.batch, lay.n_pad, lay.d_pad), carry_dtype),
    ]
    if save_chunk_states:
        out_specs.append(
            block_spec((None, lay.n_chunks, lay.n_pad, lay.block_d), lambda i, j: (i, 0, 0, j))
        )
        out_shape.append(
            jax.ShapeDtypeStruct((lay.batch, lay.n_chunks, lay.n_pad, lay.d_pad), carry_dtype)
        )
    outs = pl.pallas_call(
        functools.partial(
            _forward_kernel,
            time=lay.time,
            chunk=lay.chunk,
            has_keep=keep is not None,
            save_chunk_states=save_chunk_states,
        ),
        grid=(lay.batch, lay.blocks),
        in_specs=[seq, seq, A_spec, bc, bc] + ([keep_spec] if keep is not None else []) + [state],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=compiler_params(platform, interpret),
        name="selective_scan_forward",
    )(*operands, x0)
    states = outs[2] if save_chunk_states else None
    return lay.from_seq(outs[0]), lay.unpad_state(outs[1]), states


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "platform"))
def selective_scan_backward(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    keep: jax.Array | None,
    chunk_states: jax.Array,
    dy: jax.Array,
    dx_last: jax.Array,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jax.Array, ...]:
    """Cotangents of :func:`selective_scan_forward` (recompute per chunk, see module doc).

    Args:
      u, delta, A, B, C, keep: the forward's inputs.
      chunk_states: the forward's residual (same ``block_sizes``).
      dy: cotangent of ``y`` ``[batch, time, d]``; dx_last: of ``x_last`` ``[batch, n, d]``.

    Returns:
      ``(du, ddelta, dA, dB, dC, dx0)`` shaped and typed like ``u, delta, A, B, C`` and
      ``x0`` (carry dtype).
    """
    check_inputs(u, delta, A, B, C, None, keep)
    if (platform or jax.default_backend()) == "tpu":  # Mosaic TPU (or its interpreter)
        from pallas_kernels.selective_scan_tpu import selective_scan_backward_tpu

        return selective_scan_backward_tpu(
            u, delta, A, B, C, keep, chunk_states, dy, dx_last, block_sizes=block_sizes,
            interpret=interpret, platform=platform,
        )
    carry_dtype = chunk_states.dtype
    lay, operands = _prepare(u, delta, A, B, C, keep, block_sizes, platform, interpret)
    expected = (lay.batch, lay.n_chunks, lay.n_pad, lay.d_pad)
    if chunk_states.shape != expected:
        raise ValueError(f"chunk_states: expected shape {expected} (same block_sizes as the forward), got {chunk_states.shape}")
    if dy.shape != u.shape:
        raise ValueError(f"dy: expected shape u.shape = {u.shape}, got {dy.shape}")
    seq, A_spec, bc, keep_spec, state = _specs(lay)
    partial_bc = block_spec((None, None, lay.time, lay.n_pad), lambda i, j: (i, j, 0, 0))
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, time=lay.time, chunk=lay.chunk, has_keep=keep is not None),
        grid=(lay.batch, lay.blocks),
        in_specs=[seq, seq, A_spec, bc, bc]
        + ([keep_spec] if keep is not None else [])
        + [block_spec((None, lay.n_chunks, lay.n_pad, lay.block_d), lambda i, j: (i, 0, 0, j)), seq, state],
        out_specs=[seq, seq, state, partial_bc, partial_bc, state],
        out_shape=[
            jax.ShapeDtypeStruct((lay.batch, lay.time, lay.d_pad), u.dtype),
            jax.ShapeDtypeStruct((lay.batch, lay.time, lay.d_pad), delta.dtype),
            jax.ShapeDtypeStruct((lay.batch, lay.n_pad, lay.d_pad), carry_dtype),
            jax.ShapeDtypeStruct((lay.batch, lay.blocks, lay.time, lay.n_pad), carry_dtype),
            jax.ShapeDtypeStruct((lay.batch, lay.blocks, lay.time, lay.n_pad), carry_dtype),
            jax.ShapeDtypeStruct((lay.batch, lay.n_pad, lay.d_pad), carry_dtype),
        ],
        interpret=interpret,
        compiler_params=compiler_params(platform, interpret),
        name="selective_scan_backward",
    )(*operands, chunk_states, lay.pad_channels(dy), lay.pad_state(dx_last.astype(carry_dtype)))
    return unpad_gradients(lay, outs, A, B, C)


def unpad_gradients(lay, outs, A: jax.Array, B: jax.Array, C: jax.Array) -> tuple[jax.Array, ...]:
    """The backward kernel's ``du, ddelta``, ``dA`` (per batch row), ``dB, dC`` (per
    channel block) and ``dx0`` on layout ``lay`` (or the TPU one) -> the cotangents of
    ``u, delta, A, B, C, x0``."""
    du, ddelta, dA, dB, dC, dx0 = outs
    return (
        lay.from_seq(du),
        lay.from_seq(ddelta),
        lay.unpad_state(dA.sum(0)).astype(A.dtype),
        lay.sum_groups(dB, B),
        lay.sum_groups(dC, C),
        lay.unpad_state(dx0),
    )
