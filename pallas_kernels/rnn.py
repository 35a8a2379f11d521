"""Pallas kernels for sequential head-wise non-linear RNNs (Elman, GRU, LSTM, sLSTM).

The FlashRNN idea (Pöppel, Beck and Hochreiter 2024, "FlashRNN: I/O-Aware Optimization of
Traditional RNNs on modern hardware"): a head-wise RNN's recurrent matrix is
block-diagonal, one ``[dh, dh]`` block per head and gate, so every head is an independent
small RNN. One kernel launch runs the whole sequence: a program per (batch block, head)
loads its head's recurrent blocks once and keeps them resident while it loops over time
with the state in registers; per step it reads one row of input pre-activations and
writes one row of outputs. Nothing else touches memory.

Shapes (``S`` = number of state parts: 1 for elman/gru, 2 for lstm, 4 for slstm)::

    gx       [batch, time, gates, heads, dh]   pre-activations from the input (e.g. bf16)
    R        [gates, heads, dh, dh]            recurrent blocks, r_g = h R_g
    bias     [gates, heads, dh]                recurrent-side bias
    state0   [batch, S, heads, dh]             initial state (parts in the order below)
    keep     [batch, time] bool or None        False: the state entering t is zeroed
    h        [batch, time, heads, dh]          outputs, in result_type(gx, R, bias)
    final    [batch, S, heads, dh]             last state, carry dtype (>= float32)

Cells per head (``sigma`` the logistic function, ``g~ = gx_g + r_g``, ``r_g = h_{t-1} R_g
+ b_g``; the math of ``ssmjax.scan.rnn``, written again here on ``[block_b, dh]`` tiles,
which the tests compare against it)::

    elman  (h):         h = tanh(gx + r)
    gru    (h):         r = sigma(r~), z = sigma(z~), n = tanh(gx_n + r * r_n),
                        h = (1 - z) n + z h
    lstm   (h, c):      c = sigma(f~) c + sigma(i~) tanh(z~),  h = sigma(o~) tanh(c)
    slstm  (h, c, n, m) and slstm_exp: log f = log sigma(f~) (slstm) or f~ (slstm_exp),
                        m' = max(log f + m, i~), i = exp(i~ - m'), f = exp(log f + m - m'),
                        c = f c + i tanh(z~),  n = f n + i,  h = sigma(o~) c / n

Forward kernel, grid ``(batch_pad / block_b, heads)``: the program loads ``R[:, head]``
``[gates, dh, dh]`` and the bias once, then for ``t = 0 .. T-1`` (chunks of ``block_t``
unrolled steps, then the remainder; ``T`` is never padded) computes the ``gates``
products ``[block_b, dh] @ [dh, dh]`` of the recurrent contribution, the cell's
point-wise update, and stores ``h_t``. The state and ``R`` are held in ``block_h``-wide
column blocks and each product is summed over ``block_h``-long contractions (see
``BlockSizes.block_h``). Where ``R`` is too large to stay resident (LSTM / sLSTM, GRU at
``dh = 128``; ``BlockSizes.resident``) its blocks are re-read from global memory at every
step, and the streamed forward (``_forward_loop_kernel``) keeps the state in memory
instead of registers and loops over the column blocks, as the backward does. With
``save_states`` it also stores every state part at every step, ``states [batch_pad, T, S,
heads, dh_pad]`` in the carry dtype: the residual of the backward.

Backward kernel (same grid; the strategy of FlashRNN: store the states in the forward,
run the adjoint as a reverse-time loop): for ``t = T-1 .. 0`` it reads the state entering
``t`` (``states[t - 1]``, or ``state0``), recomputes the pre-activations (one step of the
forward: ``gates`` small matmuls), differentiates the point-wise update with ``jax.vjp``
traced inside the kernel (element-wise ops only), and propagates::

    (dgx_t, dr_t, d state_prev) = vjp(pointwise)(d state_t + [dh_t, 0, ...])
    dh_prev += sum_g dr_g R_g^T

It works on ``block_h``-wide column blocks in loops (``_backward_kernel``), keeps the
running state cotangent in its output ref and writes ``dr`` for every step; the wrapper
then forms ``dR_g = sum_{b,t} h_prev^T dr_g`` and ``db_g = sum_{b,t} dr_g`` as one
matmul / sum over (batch, time): no atomics, deterministic. Memory of the residual:
``S`` times the outputs, in float32.

Padding (wrappers, only when needed): the batch to a multiple of ``block_b`` and ``dh``
to a power of two (at least 16 when compiled, the smallest Triton ``dot``) with zeros;
zero weights, inputs and states keep padded units at ``h = c = 0`` (sLSTM: ``n > 0``) and
give them zero gradients. On-chip budget: the resident ``R`` is ``gates * dh^2`` floats
per program (64 KiB at ``dh = 64``, LSTM), staged in shared memory; at ``dh = 128`` (256
KiB for an LSTM) the forward streams it instead, and the backward always streams its
``[block_h, block_h]`` blocks (6 KiB of shared memory for every streamed program at ``dh =
64`` and ``128``, ``tests/kernels/test_targets.py``). FlashRNN splits a head over several
cooperating programs instead (not done here).

Backends: ``interpret=True`` anywhere (the CPU tests); compiled through Triton on GPUs
(``platform="gpu"``; the tests check the lowering to Triton IR, no GPU run yet). The
matmuls use ``precision=HIGHEST`` (no TF32). Not for TPU: Mosaic wants the last two block
dimensions whole or (8, 128)-aligned, and blocking ``gx [b, t, gates, heads, dh]`` by head
squeezes the second-to-last one (a head-major input layout would be needed).

The time loop is :func:`pallas_kernels._common.time_loop` (chunks of ``block_t``
unrolled steps in a ``fori_loop``, then the remainder).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    block_spec,
    carry_dtype_of,
    check_triton_platform,
    compiler_params,
    i32,
    is_power_of_two,
    next_power_of_two,
    time_loop,
)

#: Cells with a kernel, their gate counts and state parts.
GATES = {"elman": 1, "gru": 3, "lstm": 4, "slstm": 4, "slstm_exp": 4}
STATE_PARTS = {"elman": 1, "gru": 1, "lstm": 2, "slstm": 4, "slstm_exp": 4}
CELLS = tuple(GATES)
#: Largest float32 ``R`` of a head (bytes) the forward keeps resident by default.
RESIDENT_BYTES = 64 * 1024
#: Warps of the streamed forward (``_forward_loop_kernel``; at 4 the sLSTM at ``dh = 128``
#: takes 167 registers per thread, at 8 it takes 128, neither spills).
_STREAMED_WARPS = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the RNN kernels.

    Attributes:
      block_b: batch rows per program (power of two); the rows of the per-step matmul.
        Lowered to ``next_power_of_two(batch)`` in interpret mode, at least 16 when
        compiled (Triton's smallest ``dot``).
      block_t: time steps per unrolled chunk of the time loop (power of two). 1 by
        default: compiled for an A100 / H100 (LSTM, head dim 64), unrolling 4 steps keeps
        4 steps of gate tiles live at once, 164 KiB of shared memory in the forward (A100
        limit 163 KiB); one step per iteration takes 66 KiB
        (``tests/kernels/test_targets.py``).
      block_h: columns per block of the forward's recurrent products (power of two;
        lowered to the padded ``dh`` when that is smaller). The forward keeps the state
        and the resident ``R`` in ``[block_b, block_h]`` / ``[block_h, block_h]`` blocks
        and sums each gate's ``h R_g`` over ``dh / block_h`` products with a
        ``block_h``-long contraction: a float32 ``dot`` at ``HIGHEST`` precision is
        Triton's FMA path, whose operands sit in registers along the whole contraction,
        and one ``[16, 64] @ [64, 64]`` product per gate spills registers at ``dh = 64``
        (LSTM, GRU, sLSTM; H100 and A100) where blocks of 32 do not. The backward
        loops over the same blocks (``_backward_kernel``).
      resident: whether the forward loads ``R`` once and keeps it resident (in shared
        memory, as the compiler stages it) or re-reads its blocks from global memory
        (L1 / L2) at every step. ``None``: resident when the float32 ``R`` of a head,
        ``gates * dh_pad^2 * 4`` bytes, is at most :data:`RESIDENT_BYTES` (every cell at
        ``dh = 64``, Elman at 128); LSTM / sLSTM at ``dh = 128`` take 256 KiB, over the
        shared memory of an H100 (227 KiB) and an A100 (163 KiB), GRU 192 KiB. A
        streamed forward (``_forward_loop_kernel``: the state in memory, loops over the
        column blocks) compiles with 8 warps and one pipeline stage (more stages would
        prefetch blocks the program writes in the step before); a resident one with 4
        (at 8 the LSTM spills registers). A streamed forward without ``save_states``
        keeps its state in a ring of two steps, an extra ``[batch, 2, S, heads, dh]``
        output the wrapper drops.
    """

    block_b: int = 16
    block_t: int = 1
    block_h: int = 32
    resident: bool | None = None

    def __post_init__(self):
        for name in ("block_b", "block_t", "block_h"):
            if not is_power_of_two(getattr(self, name)):
                raise ValueError(
                    f"block_sizes.{name}: expected a positive power of two, got {getattr(self, name)!r}"
                )


# ----------------------------------------------------------------------------- point-wise cells
def _sigmoid(x):
    return jax.lax.logistic(x)


def _log_sigmoid(x):
    """``log sigma(x) = min(x, 0) - log1p(exp(-|x|))`` (no overflow, element-wise ops only)."""
    return jnp.minimum(x, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


def _pointwise(cell: str, gx: list, r: list, state: list) -> list:
    """One step of ``cell`` given the input pre-activations ``gx[g]``, the recurrent
    contributions ``r[g] = h_prev R_g + b_g`` and the previous state parts (all tiles of
    the same shape); returns the new state parts, ``h`` first."""
    if cell == "elman":
        return [jnp.tanh(gx[0] + r[0])]
    if cell == "gru":
        reset = _sigmoid(gx[0] + r[0])
        update = _sigmoid(gx[1] + r[1])
        candidate = jnp.tanh(gx[2] + reset * r[2])
        return [(1.0 - update) * candidate + update * state[0]]
    i_pre, f_pre, z_pre, o_pre = (gx[g] + r[g] for g in range(4))
    if cell == "lstm":
        c = _sigmoid(f_pre) * state[1] + _sigmoid(i_pre) * jnp.tanh(z_pre)
        return [_sigmoid(o_pre) * jnp.tanh(c), c]
    _, c, n, m = state
    log_f = _log_sigmoid(f_pre) if cell == "slstm" else f_pre
    m_new = jnp.maximum(log_f + m, i_pre)
    i = jnp.exp(i_pre - m_new)
    f = jnp.exp(log_f + m - m_new)
    c = f * c + i * jnp.tanh(z_pre)
    n = f * n + i
    return [_sigmoid(o_pre) * c / n, c, n, m_new]


def _dot(a, b):
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=a.dtype)


def _cut(keep_ref, t, parts: list) -> list:
    """Zero the state entering ``t`` where ``keep`` is 0 (``[block_b, 1]`` per row)."""
    if keep_ref is None:
        return parts
    keep = keep_ref[:, t, :] != 0
    return [jnp.where(keep, p, jnp.zeros_like(p)) for p in parts]


def _col(j, size: int):
    """Column block ``j`` (a Python int or a traced loop index) of width ``size``."""
    return pl.ds(j * size if isinstance(j, int) else pl.multiple_of(j * size, size), size)


def _barrier(sync: bool):
    """A barrier of the program's threads (compiled: ``bar.sync``, which also orders its
    global memory accesses); a no-op where the kernel runs in order (interpreted)."""
    if not sync:
        return lambda: None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.debug_barrier


def _prev_block(s0_ref, states_ref, keep_ref, t, k, c, dtype, slot=lambda t: t):
    """Column block ``c`` of state part ``k`` entering step ``t`` (cut where ``keep`` is
    0): ``state0`` at ``t = 0``, else the stored state of step ``t - 1`` (at index
    ``slot(t - 1)`` of ``states_ref``)."""
    if isinstance(t, int):
        x = s0_ref[:, k, c] if t == 0 else states_ref[:, slot(t - 1), k, c]
    else:
        x = jnp.where(t == 0, s0_ref[:, k, c], states_ref[:, slot(jnp.maximum(t - 1, 0)), k, c])
    return _cut(keep_ref, t, [x.astype(dtype)])[0]


# ----------------------------------------------------------------------------- kernels
def _forward_kernel(*refs, cell, time, block_t, has_keep, save_states, block_h):
    """The forward with ``R`` resident, on column blocks: every state part is a tuple of
    ``[block_b, block_h]`` blocks (in registers), ``R_g`` is read once as ``[block_h,
    block_h]`` blocks, and column block ``j`` of ``h R_g`` is the sum over row blocks
    ``i`` of ``h_i R_g[i, j]``, accumulated row block by row block (so one ``h_i`` is a
    ``dot`` operand at a time; see ``BlockSizes.block_h``); the point-wise cell then runs
    column block by column block. The step is unrolled over the ``(dh / block_h)^2``
    block products (static indices into the resident blocks): used where ``R`` fits,
    ``dh <= 64`` (Elman: 128); the streamed forward is :func:`_forward_loop_kernel`."""
    gx_ref, R_ref, b_ref = refs[:3]
    keep_ref = refs[3] if has_keep else None
    s0_ref, h_ref, last_ref = refs[3 + has_keep : 6 + has_keep]
    states_ref = refs[6 + has_keep] if save_states else None
    dtype = last_ref.dtype
    gates, parts = GATES[cell], STATE_PARTS[cell]
    dh = R_ref.shape[-1]
    size = min(block_h, dh)
    cols = [pl.ds(j * size, size) for j in range(dh // size)]
    R = [[[R_ref[g, a, b].astype(dtype) for b in cols] for a in cols] for g in range(gates)]
    bias = [[b_ref[pl.ds(g, 1), c].astype(dtype) for c in cols] for g in range(gates)]

    def step(t, state):
        state = [_cut(keep_ref, t, list(part)) for part in state]
        # r[g][j] = bias + sum_i h_i R_g[i, j], row block by row block (one h_i at a time)
        r = [[None] * len(cols) for _ in range(gates)]
        for i, h_i in enumerate(state[0]):
            for g in range(gates):
                for j in range(len(cols)):
                    r_gij = _dot(h_i, R[g][i][j])
                    r[g][j] = r_gij if i == 0 else r[g][j] + r_gij
        new = [[] for _ in range(parts)]
        for j, c in enumerate(cols):
            gx = [gx_ref[:, t, g, c].astype(dtype) for g in range(gates)]
            r_j = [r[g][j] + bias[g][j] for g in range(gates)]
            out = _pointwise(cell, gx, r_j, [part[j] for part in state])
            h_ref[:, t, c] = out[0].astype(h_ref.dtype)
            for k in range(parts):
                new[k].append(out[k])
                if states_ref is not None:
                    states_ref[:, t, k, c] = out[k]
        return tuple(tuple(part) for part in new)

    state = tuple(tuple(s0_ref[:, k, c].astype(dtype) for c in cols) for k in range(parts))
    state = time_loop(time, block_t, step, state)
    for k in range(parts):
        for c, x in zip(cols, state[k]):
            last_ref[:, k, c] = x


def _blocks(n: int, body, carry=()):
    """``carry = body(j, carry)`` for the column blocks ``j = 0 .. n-1``: a ``fori_loop``
    (an ``scf.for`` in the Triton lowering: one copy of ``body`` in the program), or one
    static call when there is one block."""
    if n == 1:
        return body(0, carry)
    return jax.lax.fori_loop(i32(0), i32(n), body, carry)


def _forward_loop_kernel(*refs, cell, time, block_t, has_keep, block_h, ring, sync):
    """The streamed forward (``R`` re-read at every step) with the state in memory and
    the column blocks in loops, as in the backward: per step ``t``, for each column block
    ``j`` (a loop), ``r_g[j] = b_g[j] + sum_i h_prev[i] R_g[i, j]`` (an inner loop over
    ``i``), then the point-wise cell on column block ``j``, which writes ``h_t[j]`` and
    the new state parts to ``states_ref``: the residual ``[block_b, T, S, dh]`` (slot
    ``t``), or without ``save_states`` a ring of ``ring`` slots (``t % ring``). The state
    entering ``t`` is read back from slot ``t - 1`` (``state0`` at ``t = 0``), so one
    copy of each loop body makes the program whatever ``dh``: unrolled, with the state in
    registers, the sLSTM at ``dh = 128`` spilled registers (four state parts live across
    ``gates * (dh / block_h)^2`` block products). A barrier at the start of every step
    orders the reads of slot ``t - 1`` after the writes of step ``t - 1`` by other
    threads, and (ring) the writes of slot ``t`` after the reads of it in step ``t - 1``.
    """
    gx_ref, R_ref, b_ref = refs[:3]
    keep_ref = refs[3] if has_keep else None
    s0_ref, h_ref, last_ref, states_ref = refs[3 + has_keep : 7 + has_keep]
    dtype = last_ref.dtype
    gates, parts = GATES[cell], STATE_PARTS[cell]
    rows, dh = last_ref.shape[0], R_ref.shape[-1]
    size = min(block_h, dh)
    n = dh // size
    barrier = _barrier(sync)
    col = functools.partial(_col, size=size)
    slot = (lambda t: t) if ring is None else (lambda t: t % ring)

    def prev_block(t, k, c):
        return _prev_block(s0_ref, states_ref, keep_ref, t, k, c, dtype, slot)

    def column(t, j, carry):
        c = col(j)

        def recurrent(i, r):
            h_i = prev_block(t, 0, col(i))
            return tuple(r[g] + _dot(h_i, R_ref[g, col(i), c].astype(dtype)) for g in range(gates))

        r = _blocks(n, recurrent, (jnp.zeros((rows, size), dtype),) * gates)
        r = [r[g] + b_ref[pl.ds(g, 1), c].astype(dtype) for g in range(gates)]
        gx = [gx_ref[:, t, g, c].astype(dtype) for g in range(gates)]
        out = _pointwise(cell, gx, r, [prev_block(t, k, c) for k in range(parts)])
        h_ref[:, t, c] = out[0].astype(h_ref.dtype)
        for k in range(parts):
            states_ref[:, slot(t), k, c] = out[k]
        return carry

    def step(t, carry):
        barrier()
        _blocks(n, functools.partial(column, t))
        return carry

    time_loop(time, block_t, step, ())
    barrier()
    for k in range(parts):
        last_ref[:, k, :] = states_ref[:, slot(time - 1), k, :]


def _backward_kernel(*refs, cell, time, block_t, has_keep, block_h, sync):
    """The reverse-time loop with every ``[dh]``-wide quantity in refs and the column
    blocks in loops. Per step ``t``, with ``n = dh / block_h`` column blocks and ``R_g``
    read as ``[block_h, block_h]`` blocks from global memory (L1 / L2):

    A. for each column block ``j`` (a loop): ``r_g[j] = b_g[j] + sum_i h_prev[i] R_g[i,
       j]`` (an inner loop over ``i``), then the point-wise adjoint of column block ``j``,
       which writes ``dr_g[j]`` (output ``dr``, also this step's scratch), ``dgx`` (GRU)
       and the cut ``d state_prev[j]`` over ``d state_t[j]`` in ``ds`` (the running
       cotangent of the state; at the end, that of ``state0``).
    B. for each row block ``i`` (a loop): ``ds[0][i] += cut(sum_j sum_g dr_g[j] R_g[i,
       j]^T)`` (an inner loop over ``j``).

    The program holds one column block of each quantity at a time, and its code is one
    copy of each loop body whatever ``dh``, so neither shared memory nor compile time
    grows with ``(dh / block_h)^2`` (unrolled, the LSTM at ``dh = 128`` took 45-94 s to
    compile). Phase B reads blocks that other threads wrote in phase A, and phase A those
    of the previous step's B: compiled, a barrier (``bar.sync``, which also orders the
    program's global memory accesses) separates the phases (``sync``; the interpreter runs
    in order). ``dR`` and ``db`` are not accumulated here: the wrapper computes them from
    ``dr`` and the stored states as one matmul over (batch, time)."""
    gx_ref, R_ref, b_ref = refs[:3]
    keep_ref = refs[3] if has_keep else None
    s0_ref, states_ref, dh_ref, dlast_ref, dr_ref, ds_ref = refs[3 + has_keep : 9 + has_keep]
    dgx_ref = refs[9 + has_keep] if cell == "gru" else None
    dtype = ds_ref.dtype
    gates, parts = GATES[cell], STATE_PARTS[cell]
    rows, dh = ds_ref.shape[0], R_ref.shape[-1]
    size = min(block_h, dh)
    n = dh // size
    barrier = _barrier(sync)
    col = functools.partial(_col, size=size)

    def R_block(g, i, j):
        return R_ref[g, col(i), col(j)].astype(dtype)

    def prev_block(t, k, c):
        return _prev_block(s0_ref, states_ref, keep_ref, t, k, c, dtype)

    def adjoint(t, j, carry):
        c = col(j)

        def recurrent(i, r):
            h_i = prev_block(t, 0, col(i))
            return tuple(r[g] + _dot(h_i, R_block(g, i, j)) for g in range(gates))

        r = _blocks(n, recurrent, (jnp.zeros((rows, size), dtype),) * gates)
        r = [r[g] + b_ref[pl.ds(g, 1), c].astype(dtype) for g in range(gates)]
        gx = [gx_ref[:, t, g, c].astype(dtype) for g in range(gates)]
        prev = [prev_block(t, k, c) for k in range(parts)]
        _, pullback = jax.vjp(lambda gx, r, prev: _pointwise(cell, gx, r, prev), gx, r, prev)
        d_new = [ds_ref[:, k, c] for k in range(parts)]
        d_new[0] = d_new[0] + dh_ref[:, t, c].astype(dtype)
        dgx, dr, d_prev = pullback(d_new)
        for g in range(gates):
            dr_ref[:, t, g, c] = dr[g]
            if dgx_ref is not None:
                dgx_ref[:, t, g, c] = dgx[g].astype(dgx_ref.dtype)
        for k, x in enumerate(_cut(keep_ref, t, d_prev)):
            ds_ref[:, k, c] = x
        return carry

    def propagate(t, i, carry):
        def transposed(j, acc):
            for g in range(gates):
                acc = acc + _dot(dr_ref[:, t, g, col(j)], R_block(g, i, j).T)
            return acc

        acc = _blocks(n, transposed, jnp.zeros((rows, size), dtype))
        c = col(i)
        ds_ref[:, 0, c] = ds_ref[:, 0, c] + _cut(keep_ref, t, [acc])[0]
        return carry

    def step(k, carry):
        t = time - 1 - k
        barrier()
        _blocks(n, functools.partial(adjoint, t))
        barrier()
        _blocks(n, functools.partial(propagate, t))
        return carry

    for k in range(parts):
        ds_ref[:, k, :] = dlast_ref[:, k, :].astype(dtype)
    time_loop(time, block_t, step, ())


# ----------------------------------------------------------------------------- wrappers
class _Layout(NamedTuple):
    batch: int
    time: int
    heads: int
    dh: int
    block_b: int
    batch_pad: int
    dh_pad: int
    gates: int
    parts: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.batch_pad // self.block_b, self.heads

    def pad(self, x: jax.Array, batch_axis: int | None, dh_axes: tuple[int, ...]) -> jax.Array:
        widths = [(0, 0)] * x.ndim
        if batch_axis is not None:
            widths[batch_axis] = (0, self.batch_pad - self.batch)
        for axis in dh_axes:
            widths[axis] = (0, self.dh_pad - self.dh)
        return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths)

    def specs(self):
        """BlockSpecs of gx, R, bias, keep, and a state-like ``[batch, S, heads, dh]``."""
        bb, T, G, S, dh = self.block_b, self.time, self.gates, self.parts, self.dh_pad
        gx = block_spec((bb, T, G, None, dh), lambda i, j: (i, 0, 0, j, 0))
        R = block_spec((G, None, dh, dh), lambda i, j: (0, j, 0, 0))
        bias = block_spec((G, None, dh), lambda i, j: (0, j, 0))
        keep = block_spec((bb, T, 1), lambda i, j: (i, 0, 0))
        state = block_spec((bb, S, None, dh), lambda i, j: (i, 0, j, 0))
        return gx, R, bias, keep, state

    def seq_spec(self, *inner: int):
        """``[batch, time, *inner, heads, dh]`` blocked by (batch block, head)."""
        shape = (self.block_b, self.time, *inner, None, self.dh_pad)
        return block_spec(shape, lambda i, j: (i, 0) + (0,) * len(inner) + (j, 0))


def _check_inputs(cell, gx, R, bias, state0, keep):
    if cell not in GATES:
        raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
    if gx.ndim != 5:
        raise ValueError(f"gx: expected shape [batch, time, gates, heads, dh], got {gx.shape}")
    batch, time, gates, heads, dh = gx.shape
    if gates != GATES[cell]:
        raise ValueError(f"gx: expected {GATES[cell]} gates for cell {cell!r}, got shape {gx.shape}")
    if time < 1:
        raise ValueError(f"gx: expected time >= 1, got shape {gx.shape}")
    if R.shape != (gates, heads, dh, dh):
        raise ValueError(f"R: expected shape [gates, heads, dh, dh] = {(gates, heads, dh, dh)}, got {R.shape}")
    if bias.shape != (gates, heads, dh):
        raise ValueError(f"bias: expected shape [gates, heads, dh] = {(gates, heads, dh)}, got {bias.shape}")
    expected = (batch, STATE_PARTS[cell], heads, dh)
    if state0.shape != expected:
        raise ValueError(f"state0: expected shape [batch, S, heads, dh] = {expected}, got {state0.shape}")
    if keep is not None and keep.shape != (batch, time):
        raise ValueError(f"keep: expected shape [batch, time] = {(batch, time)}, got {keep.shape}")
    for name, x in (("gx", gx), ("R", R), ("bias", bias), ("state0", state0)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a real floating dtype, got {x.dtype}")


def _layout(cell, gx, block_sizes: BlockSizes, interpret: bool) -> _Layout:
    batch, time, gates, heads, dh = gx.shape
    min_size = 1 if interpret else 16
    block_b = max(min(block_sizes.block_b, next_power_of_two(batch)), min_size)
    return _Layout(
        batch, time, heads, dh, block_b, -(-batch // block_b) * block_b,
        max(next_power_of_two(dh), min_size), gates, STATE_PARTS[cell],
    )


def _operands(lay: _Layout, gx, R, bias, keep):
    ops = [lay.pad(gx, 0, (4,)), lay.pad(R, None, (2, 3)), lay.pad(bias, None, (2,))]
    if keep is not None:
        ops.append(lay.pad(keep.astype(jnp.float32)[..., None], 0, ()))
    return ops


@functools.partial(
    jax.jit, static_argnames=("cell", "block_sizes", "save_states", "interpret", "platform")
)
def rnn_forward(
    gx: jax.Array,
    R: jax.Array,
    bias: jax.Array,
    state0: jax.Array,
    keep: jax.Array | None = None,
    *,
    cell: str,
    block_sizes: BlockSizes = BlockSizes(),
    save_states: bool = True,
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The sequential head-wise RNN in one launch (see the module docstring).

    Returns:
      ``(h, final, states)``: ``h`` ``[batch, time, heads, dh]`` in
      ``result_type(gx, R, bias)``; ``final`` ``[batch, S, heads, dh]`` and the residual
      ``states`` (``None`` unless ``save_states``; padded kernel layout, pass it unchanged
      to :func:`rnn_backward`) in the carry dtype ``result_type(float32, gx, R, bias,
      state0)``.
    """
    _check_inputs(cell, gx, R, bias, state0, keep)
    check_triton_platform(platform, interpret, "rnn")
    carry = carry_dtype_of(gx.dtype, R.dtype, bias.dtype, state0.dtype)
    out_dtype = jnp.result_type(gx.dtype, R.dtype, bias.dtype)
    lay = _layout(cell, gx, block_sizes, interpret)
    resident = block_sizes.resident
    if resident is None:
        resident = lay.gates * lay.dh_pad**2 * 4 <= RESIDENT_BYTES
    params = compiler_params(platform, interpret)
    if params is not None and not resident:
        params = dataclasses.replace(params, num_warps=_STREAMED_WARPS, num_stages=1)
    gx_spec, R_spec, b_spec, keep_spec, state_spec = lay.specs()
    out_specs = [lay.seq_spec(), state_spec]
    out_shape = [
        jax.ShapeDtypeStruct((lay.batch_pad, lay.time, lay.heads, lay.dh_pad), out_dtype),
        jax.ShapeDtypeStruct((lay.batch_pad, lay.parts, lay.heads, lay.dh_pad), carry),
    ]
    # the streamed forward keeps its state in memory: the residual, else a ring of 2 steps
    ring = None if save_states or resident else 2
    if save_states or not resident:
        slots = lay.time if ring is None else ring
        out_specs.append(block_spec((lay.block_b, slots, lay.parts, None, lay.dh_pad), lambda i, j: (i, 0, 0, j, 0)))
        out_shape.append(jax.ShapeDtypeStruct((lay.batch_pad, slots, lay.parts, lay.heads, lay.dh_pad), carry))
    if resident:
        kernel = functools.partial(_forward_kernel, save_states=save_states)
    else:
        kernel = functools.partial(_forward_loop_kernel, ring=ring, sync=not interpret)
    outs = pl.pallas_call(
        functools.partial(
            kernel, cell=cell, time=lay.time, block_t=block_sizes.block_t,
            has_keep=keep is not None, block_h=block_sizes.block_h,
        ),
        grid=lay.grid,
        in_specs=[gx_spec, R_spec, b_spec] + ([keep_spec] if keep is not None else []) + [state_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=params,
        name=f"rnn_{cell}_forward",
    )(*_operands(lay, gx, R, bias, keep), lay.pad(state0.astype(carry), 0, (3,)))
    h, final = outs[0][: lay.batch, ..., : lay.dh], outs[1][: lay.batch, ..., : lay.dh]
    return h, final, outs[2] if save_states else None


def _backward_params(platform, interpret):
    """The backward's compiler parameters: one pipeline stage. Its loops read blocks the
    program itself wrote earlier in the step (after a barrier); more stages would have
    Triton prefetch the loop's loads asynchronously into shared memory."""
    params = compiler_params(platform, interpret)
    return params if params is None else dataclasses.replace(params, num_stages=1)


@functools.partial(jax.jit, static_argnames=("cell", "block_sizes", "interpret", "platform"))
def rnn_backward(
    gx: jax.Array,
    R: jax.Array,
    bias: jax.Array,
    state0: jax.Array,
    keep: jax.Array | None,
    states: jax.Array,
    dh: jax.Array,
    dfinal: jax.Array,
    *,
    cell: str,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Cotangents of :func:`rnn_forward` by a reverse-time loop over the stored states.

    Args:
      gx, R, bias, state0, keep: the forward's inputs.
      states: the forward's residual (same ``block_sizes`` and ``interpret``).
      dh: cotangent of ``h`` ``[batch, time, heads, dh]``; dfinal: of ``final``.

    Returns:
      ``(dgx, dR, dbias, dstate0)`` shaped and typed like ``gx, R, bias, state0``.
    """
    _check_inputs(cell, gx, R, bias, state0, keep)
    check_triton_platform(platform, interpret, "rnn")
    lay = _layout(cell, gx, block_sizes, interpret)
    carry = states.dtype
    expected = (lay.batch_pad, lay.time, lay.parts, lay.heads, lay.dh_pad)
    if states.shape != expected:
        raise ValueError(f"states: expected shape {expected} (the forward's residual), got {states.shape}")
    if dh.shape != gx.shape[:2] + gx.shape[3:]:
        raise ValueError(f"dh: expected shape [batch, time, heads, dh] = {gx.shape[:2] + gx.shape[3:]}, got {dh.shape}")
    gx_spec, R_spec, b_spec, keep_spec, state_spec = lay.specs()
    gru = cell == "gru"  # the one cell whose dgx differs from dr (the reset gate scales r_n)
    outs = pl.pallas_call(
        functools.partial(
            _backward_kernel, cell=cell, time=lay.time, block_t=block_sizes.block_t,
            has_keep=keep is not None, block_h=block_sizes.block_h, sync=not interpret,
        ),
        grid=lay.grid,
        in_specs=[gx_spec, R_spec, b_spec] + ([keep_spec] if keep is not None else [])
        + [state_spec, lay.seq_spec(lay.parts), lay.seq_spec(), state_spec],
        out_specs=[gx_spec, state_spec] + ([gx_spec] if gru else []),
        out_shape=[
            jax.ShapeDtypeStruct((lay.batch_pad, lay.time, lay.gates, lay.heads, lay.dh_pad), carry),
            jax.ShapeDtypeStruct((lay.batch_pad, lay.parts, lay.heads, lay.dh_pad), carry),
        ] + ([jax.ShapeDtypeStruct((lay.batch_pad, lay.time, lay.gates, lay.heads, lay.dh_pad), gx.dtype)] if gru else []),
        interpret=interpret,
        compiler_params=_backward_params(platform, interpret),
        name=f"rnn_{cell}_backward",
    )(
        *_operands(lay, gx, R, bias, keep),
        lay.pad(state0.astype(carry), 0, (3,)),
        states,
        lay.pad(dh, 0, (3,)),
        lay.pad(dfinal.astype(carry), 0, (3,)),
    )
    b, d = lay.batch, lay.dh
    dr, ds0 = outs[0][:b, ..., :d], outs[1][:b, ..., :d]
    dgx = outs[2][:b, ..., :d] if gru else dr.astype(gx.dtype)
    # dR_g = sum over (batch, time) of h_prev^T dr_g: one matmul (h_prev: the state
    # entering each step, cut where keep is False; state0 at t = 0)
    h_prev = jnp.concatenate([state0[:, None, 0].astype(carry), states[:b, :-1, 0, :, :d]], axis=1)
    if keep is not None:
        h_prev = jnp.where(keep[:, :, None, None], h_prev, jnp.zeros_like(h_prev))
    dR = jnp.einsum(
        "bthk,btghj->ghkj", h_prev, dr, precision=jax.lax.Precision.HIGHEST, preferred_element_type=carry
    )
    return dgx, dR.astype(R.dtype), dr.sum((0, 1)).astype(bias.dtype), ds0.astype(state0.dtype)
