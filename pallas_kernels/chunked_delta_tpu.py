"""Mosaic TPU kernels for the chunked (gated) delta rule.

The math is that of :mod:`pallas_kernels.chunked_delta` (its docstring writes out the WY /
UT chunked forward and backward); the tiling is that of
:mod:`pallas_kernels.chunked_gla_tpu` (whose layout this module shares): head-major
operands, grid ``(batch, heads, n_chunks)`` with the chunk axis sequential, one chunk of
one head per grid step, the state ``S [dk, dv]`` (backward: ``dS``) in a VMEM scratch
across the chunk axis, the backward's chunks last to first.

Per-token vectors (``beta``, the log-decay ``g``; ``dbeta``, ``dg``) are lane-dense rows
``[b, h, n_chunks_8, C]`` in the carry dtype, blocks of eight chunks (as the per-head decay
of :mod:`pallas_kernels.chunked_gla_tpu`); the kernels form the chunk-local cumulative
sum ``L`` and the column forms ``[C, 1]`` as exact products with 0/1 matrices
(:class:`pallas_kernels.chunked_gla_tpu.Triangles`), and return ``dg`` as the reverse
chunk-local sum. Nothing is transposed in VMEM: the forward substitution for
``T = (I + A)^{-1}`` needs row ``i`` of ``A`` as a column, which is column ``i`` of
``A^T = strictly_upper(beta_row (K K^T) D^T)``, formed directly from the row forms;
column sums become columns as products with a ones vector.

On-chip memory is ``O(C (dk + dv) + dk dv + C^2)`` per program, independent of ``T``.
``C`` must be a multiple of the sublane tile (8 rows, 16 with 16-bit inputs). Compiled
kernels take float32 and bfloat16 inputs; the interpreter also runs float64.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._chunked_common import (
    Dots,
    check_attention_inputs,
    masked_exp,
    output_scale,
    positions,
)
from pallas_kernels._common import carry_dtype_of, check_tpu_dtypes, i32, sublane_rows
from pallas_kernels.chunked_gla_tpu import TPU_DTYPES, Triangles, TpuLayout, token_row

__all__ = ["chunked_delta_backward_tpu", "chunked_delta_forward_tpu"]


# ----------------------------------------------------------------------------- kernel math
def unit_lower_inverse_from_transpose(AT: jax.Array, chunk: int) -> jax.Array:
    """``(I + A)^{-1}`` for strictly lower-triangular ``A`` given ``A^T [C, C]``, by forward
    substitution (as :func:`pallas_kernels.chunked_delta.unit_lower_inverse`): row ``i``
    of the inverse is ``e_i - sum_{j < i} A_ij X_j``, with ``A_ij`` at row ``j`` taken
    from column ``i`` of ``A^T`` (a lane reduction, no transpose)."""
    rows, cols = positions(chunk)

    def row(i, X):
        a_i = jnp.sum(jnp.where(cols == i, AT, 0.0), axis=1, keepdims=True)  # A[i, j] at row j
        return jnp.where(rows == i, X - jnp.sum(a_i * X, axis=0, keepdims=True), X)

    identity = (rows == cols).astype(AT.dtype)
    return jax.lax.fori_loop(i32(1), i32(chunk), row, identity)


class _Chunk(NamedTuple):
    q: jax.Array  # [C, dk]
    k: jax.Array  # [C, dk]
    v: jax.Array  # [C, dv]
    beta: jax.Array  # [C, 1]
    beta_row: jax.Array  # [1, C]
    L: jax.Array  # [C, 1]: chunk-local cumulative log-decay (zeros without decay)
    L_row: jax.Array  # [1, C]
    last: jax.Array  # [1, 1]


class _WY(NamedTuple):
    """The chunk's decays and WY representation (as the GPU kernels')."""

    D: jax.Array  # [C, C] exp(L_i - L_j), j <= i
    KK: jax.Array  # [C, C] K K^T
    A: jax.Array  # [C, C] strictly lower
    T: jax.Array  # [C, C] (I + A)^{-1}
    W: jax.Array  # [C, dk]
    U: jax.Array  # [C, dv]
    P: jax.Array  # [C, C] (Q K^T) * D


def _load(refs, gated: bool, chunk: int, tri: Triangles, row, dtype) -> _Chunk:
    q_ref, k_ref, v_ref, beta_ref = refs[:4]
    load = lambda ref: ref[...].astype(dtype)  # noqa: E731
    beta_row = beta_ref[row, :].astype(dtype)  # [1, C]
    if gated:
        g_row = refs[4][row, :].astype(dtype)
        L = tri.cumsum_col(g_row)
        L_row = tri.row(L)  # the same values (an exact copy): D_ii = 1
        last = L_row[:, chunk - 1 :]
    else:
        L, L_row = jnp.zeros((chunk, 1), dtype), jnp.zeros((1, chunk), dtype)
        last = jnp.zeros((1, 1), dtype)
    return _Chunk(load(q_ref), load(k_ref), load(v_ref), tri.col(beta_row), beta_row, L, L_row, last)


def _wy(x: _Chunk, chunk: int, dots: Dots) -> _WY:
    rows, cols = positions(chunk)
    D = masked_exp(x.L - x.L_row, rows >= cols)
    DT = masked_exp(x.L_row - x.L, cols >= rows)  # D^T
    KK = dots.nt(x.k, x.k)
    A = jnp.where(rows > cols, x.beta * KK * D, 0.0)
    AT = jnp.where(cols > rows, x.beta_row * KK * DT, 0.0)  # K K^T is symmetric
    T = unit_lower_inverse_from_transpose(AT, chunk)
    W = dots.nn(T, (x.beta * jnp.exp(x.L)) * x.k)
    U = dots.nn(T, x.beta * x.v)
    P = dots.nt(x.q, x.k) * D
    return _WY(D, KK, A, T, W, U, P)


def _forward_kernel(*refs, gated, chunk, n_chunks, scale, save_states, precision):
    n = 5 if gated else 4
    h0_ref, o_ref, last_ref = refs[n : n + 3]
    states_ref = refs[n + 3] if save_states else None
    S_ref = refs[-1]
    dtype = S_ref.dtype
    dots = Dots(dtype, precision)
    tri = Triangles(chunk, dtype)
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        S_ref[...] = h0_ref[...].astype(dtype)

    S = S_ref[...]
    if states_ref is not None:
        states_ref[...] = S.astype(states_ref.dtype)
    x = _load(refs, gated, chunk, tri, token_row(n_chunks, False), dtype)
    wy = _wy(x, chunk, dots)
    delta = wy.U - dots.nn(wy.W, S)
    o = dots.nn(x.q * jnp.exp(x.L), S) + dots.nn(wy.P, delta)
    o_ref[...] = (scale * o).astype(o_ref.dtype)
    S = jnp.exp(x.last) * S + dots.tn(x.k * jnp.exp(x.last - x.L), delta)
    S_ref[...] = S

    @pl.when(i == n_chunks - 1)
    def _():
        last_ref[...] = S.astype(last_ref.dtype)


def _backward_kernel(*refs, gated, chunk, n_chunks, scale, precision):
    n = 5 if gated else 4
    states_ref, do_ref, dlast_ref, dq_ref, dk_ref, dv_ref, dbeta_ref = refs[n : n + 7]
    dg_ref = refs[n + 7] if gated else None
    dh0_ref, dS_ref = refs[-2:]
    dtype = dS_ref.dtype
    dots = Dots(dtype, precision)
    tri = Triangles(chunk, dtype)
    row = token_row(n_chunks, True)
    rows_idx, cols_idx = positions(chunk)
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        dS_ref[...] = dlast_ref[...].astype(dtype)

    dS = dS_ref[...]  # cotangent of the state leaving this chunk
    x = _load(refs, gated, chunk, tri, row, dtype)
    S = states_ref[...].astype(dtype)
    do = scale * do_ref[...].astype(dtype)
    wy = _wy(x, chunk, dots)
    delta = wy.U - dots.nn(wy.W, S)
    decay_in, decay_out, through = jnp.exp(x.L), jnp.exp(x.last - x.L), jnp.exp(x.last)
    q_from_start, k_to_end = x.q * decay_in, x.k * decay_out
    k_written = x.beta * decay_in * x.k  # the K of W = T diag(beta exp L) K

    d_delta = dots.tn(wy.P, do) + dots.nn(k_to_end, dS)  # [C, dv]
    dP = jnp.where(rows_idx >= cols_idx, dots.nt(do, delta), 0.0)
    d_q_from_start = dots.nt(do, S)  # [C, dk]
    d_k_to_end = dots.nt(delta, dS)  # [C, dk]
    dVb = dots.tn(wy.T, d_delta)  # [C, dv]
    dKb = -dots.tn(wy.T, dots.nt(d_delta, S))  # T^T dW, dW = -dDelta S^T
    dA = -jnp.where(rows_idx > cols_idx, dots.nt(dVb, wy.U) + dots.nt(dKb, wy.W), 0.0)

    dv_ref[...] = (x.beta * dVb).astype(dv_ref.dtype)
    dbeta = (
        jnp.sum(dVb * x.v, axis=1, keepdims=True)
        + decay_in * jnp.sum(dKb * x.k, axis=1, keepdims=True)
        + jnp.sum(dA * wy.KK * wy.D, axis=1, keepdims=True)
    )
    dbeta_ref[row, :] = tri.row(dbeta).astype(dbeta_ref.dtype)
    dKK = x.beta * dA * wy.D
    dPD = dP * wy.D
    dq = d_q_from_start * decay_in + dots.nn(dPD, x.k)
    dk = (
        x.beta * decay_in * dKb
        + decay_out * d_k_to_end
        + dots.nn(dKK, x.k)
        + dots.tn(dKK, x.k)
        + dots.tn(dPD, x.q)
    )
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    if dg_ref is not None:
        E = dA * wy.A + dP * wy.P  # cotangent of the decay matrix, times D
        col_sums = tri.dots.tn(E, jnp.ones((chunk, 1), dtype))  # [C, 1]: sum_i E_ij at row j
        dL = (
            jnp.sum(d_q_from_start * q_from_start - d_k_to_end * k_to_end + dKb * k_written, axis=1, keepdims=True)
            + jnp.sum(E, axis=1, keepdims=True)
            - col_sums
        )
        d_last = jnp.sum(d_k_to_end * k_to_end, keepdims=True) + through * jnp.sum(dS * S, keepdims=True)
        dL = dL + jnp.where(rows_idx == chunk - 1, d_last, 0.0)
        dg_ref[row, :] = tri.rev_cumsum_row(dL).astype(dg_ref.dtype)  # cotangent of g
    dS = through * dS + dots.tn(q_from_start, do) - dots.tn(wy.W, d_delta)
    dS_ref[...] = dS

    @pl.when(i == n_chunks - 1)
    def _():
        dh0_ref[...] = dS.astype(dh0_ref.dtype)


# ----------------------------------------------------------------------------- wrappers
def _prepare(q, k, v, beta, g, h0, block_sizes, interpret: bool, platform, reverse: bool, do=None):
    """Checks and the padded head-major operands: ``(tl, carry, operands, specs)``."""
    check_tpu_dtypes("chunked_delta", platform, interpret, TPU_DTYPES, q=q, k=k, v=v, beta=beta, g=g, h0=h0)
    chunk = block_sizes.chunk_for("head")
    rows = sublane_rows(*(x.dtype for x in (q, k, v, do) if x is not None))
    if not interpret and chunk % rows:
        raise ValueError(
            f"block_sizes.chunk: the compiled TPU chunked_delta kernels need a multiple of {rows} "
            f"rows for these dtypes, got {chunk}"
        )
    tl = TpuLayout(q, v, chunk, reverse)
    carry = carry_dtype_of(*(x.dtype for x in (q, k, v, beta, g, h0) if x is not None))
    operands = [tl.heads_k(q), tl.heads_k(k), tl.heads_v(v), tl.token_rows(beta.astype(carry))]
    specs = [tl.seq_spec(tl.dk_pad), tl.seq_spec(tl.dk_pad), tl.seq_spec(tl.dv_pad), tl.token_rows_spec()]
    if g is not None:
        operands.append(tl.token_rows(g.astype(carry)))
        specs.append(tl.token_rows_spec())
    return tl, carry, operands, specs


def chunked_delta_forward_tpu(q, k, v, beta, g, h0, *, scale, block_sizes, save_states, interpret, platform):
    """:func:`pallas_kernels.chunked_delta.chunked_delta_forward` on the TPU layout (same
    arguments and results; ``states`` ``[b, h, n_chunks, dk_pad, dv_pad]``)."""
    tl, carry, operands, specs = _prepare(q, k, v, beta, g, h0, block_sizes, interpret, platform, False)
    h0 = jnp.zeros(tl.state_shape(carry).shape, carry) if h0 is None else tl.pad_state(h0)
    gated = g is not None
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, beta.dtype)
    out_specs = [tl.seq_spec(tl.dv_pad), tl.state_spec()]
    out_shape = [tl.heads_shape(tl.dv_pad, out_dtype), tl.state_shape(carry)]
    if save_states:
        out_specs.append(tl.states_spec())
        out_shape.append(tl.states_shape(carry))
    outs = pl.pallas_call(
        functools.partial(
            _forward_kernel,
            gated=gated,
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
        scratch_shapes=[pltpu.VMEM((tl.dk_pad, tl.dv_pad), carry)],
        interpret=interpret,
        compiler_params=tl.params(interpret),
        name="chunked_gated_delta_forward_tpu" if gated else "chunked_delta_forward_tpu",
    )(*operands, h0)
    o = tl.from_heads(outs[0], tl.dv)
    h_last = outs[1][:, :, : tl.dk, : tl.dv]
    return o, h_last, outs[2] if save_states else None


def chunked_delta_backward_tpu(q, k, v, beta, g, states, do, dh_last, *, scale, block_sizes, interpret, platform):
    """:func:`pallas_kernels.chunked_delta.chunked_delta_backward` on the TPU layout."""
    check_tpu_dtypes("chunked_delta", platform, interpret, TPU_DTYPES, do=do, dh_last=dh_last)
    tl, _, operands, specs = _prepare(q, k, v, beta, g, None, block_sizes, interpret, platform, True, do)
    check_attention_inputs(q, k, v, None, states, tl.lay)
    carry = states.dtype
    gated = g is not None
    out_specs = [tl.seq_spec(tl.dk_pad), tl.seq_spec(tl.dk_pad), tl.seq_spec(tl.dv_pad)]
    out_shape = [tl.heads_shape(tl.dk_pad, carry), tl.heads_shape(tl.dk_pad, carry), tl.heads_shape(tl.dv_pad, carry)]
    for _ in range(1 + gated):  # dbeta[, dg]
        out_specs.append(tl.token_rows_spec())
        out_shape.append(tl.token_rows_shape(carry))
    out_specs.append(tl.state_spec())
    out_shape.append(tl.state_shape(carry))
    outs = pl.pallas_call(
        functools.partial(
            _backward_kernel,
            gated=gated,
            chunk=tl.chunk,
            n_chunks=tl.n_chunks,
            scale=output_scale(scale, tl.dk),
            precision=block_sizes.dot_precision,
        ),
        grid=tl.grid,
        in_specs=specs + [tl.states_spec(), tl.seq_spec(tl.dv_pad), tl.state_spec()],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((tl.dk_pad, tl.dv_pad), carry)],
        interpret=interpret,
        compiler_params=tl.params(interpret),
        name="chunked_gated_delta_backward_tpu" if gated else "chunked_delta_backward_tpu",
    )(*operands, states, tl.heads_v(do), tl.pad_state(dh_last.astype(carry)))
    dq, dk, dv = tl.from_heads(outs[0], tl.dk), tl.from_heads(outs[1], tl.dk), tl.from_heads(outs[2], tl.dv)
    dbeta = tl.from_token_rows(outs[3])
    dg = tl.from_token_rows(outs[4]) if gated else None
    dh0 = outs[-1][:, :, : tl.dk, : tl.dv]
    return dq, dk, dv, dbeta, dg, dh0
