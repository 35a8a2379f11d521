"""Mosaic TPU kernels for the chunked (gated) delta rule.

The math is that of :mod:`pallas_kernels.chunked_delta` (its docstring writes out the WY /
UT chunked forward and backward; the backward's terms up to ``dA`` are its own, shared);
the tiling is that of :mod:`pallas_kernels.chunked_gla_tpu` (the layout of both is
:mod:`pallas_kernels._chunked_common`'s :class:`~pallas_kernels._chunked_common.TpuLayout`): head-major
operands, grid ``(batch, heads, n_chunks)`` with the chunk axis sequential, one chunk of
one head per grid step, the state ``S [dk, dv]`` (backward: ``dS``) in a VMEM scratch
across the chunk axis, the backward's chunks last to first.

Per-token vectors (``beta``, the log-decay ``g``; ``dbeta``, ``dg``) are lane-dense rows
``[b, h, n_chunks_8, C]`` in the carry dtype, blocks of eight chunks (as the per-head decay
of :mod:`pallas_kernels.chunked_gla_tpu`); the kernels form the chunk-local cumulative
sum ``L`` and the column forms ``[C, 1]`` as exact products with 0/1 matrices
(:class:`pallas_kernels._chunked_common.Triangles`), and return ``dg`` as the reverse
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
from pallas_kernels.chunked_delta import WY, chunk_cotangents, unit_lower_inverse

__all__ = ["chunked_delta_backward_tpu", "chunked_delta_forward_tpu"]


# ----------------------------------------------------------------------------- kernel math
class _Chunk(NamedTuple):
    q: jax.Array  # [C, dk]
    k: jax.Array  # [C, dk]
    v: jax.Array  # [C, dv]
    beta: jax.Array  # [C, 1]
    beta_row: jax.Array  # [1, C]
    L: jax.Array  # [C, 1]: chunk-local cumulative log-decay (zeros without decay)
    L_row: jax.Array  # [1, C]
    last: jax.Array  # [1, 1]


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


def _wy(x: _Chunk, chunk: int, dots: Dots) -> WY:
    rows, cols = positions(chunk)
    D = masked_exp(x.L - x.L_row, rows >= cols)
    DT = masked_exp(x.L_row - x.L, cols >= rows)  # D^T
    KK = dots.nt(x.k, x.k)
    A = jnp.where(rows > cols, x.beta * KK * D, 0.0)
    AT = jnp.where(cols > rows, x.beta_row * KK * DT, 0.0)  # K K^T is symmetric
    T = unit_lower_inverse(AT, chunk, transposed=True)
    W = dots.nn(T, (x.beta * jnp.exp(x.L)) * x.k)
    U = dots.nn(T, x.beta * x.v)
    P = dots.nt(x.q, x.k) * D
    return WY(D, KK, A, T, W, U, P)


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
    a = chunk_cotangents(x, wy, S, dS, do, dots, rows_idx, cols_idx)
    dv_ref[...] = (x.beta * a.dVb).astype(dv_ref.dtype)
    dbeta_ref[row, :] = tri.row(a.dbeta(x, wy)).astype(dbeta_ref.dtype)
    dq, dk = a.dq_dk(x, wy, dots)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    if dg_ref is not None:
        E = a.dA * wy.A + a.dP * wy.P
        col_sums = tri.dots.tn(E, jnp.ones((chunk, 1), dtype))  # [C, 1]: sum_i E_ij at row j
        dL = a.dL_row_sums(E) - col_sums
        d_last = jnp.sum(a.d_k_to_end * a.k_to_end, keepdims=True) + a.through * jnp.sum(dS * S, keepdims=True)
        dL = dL + jnp.where(rows_idx == chunk - 1, d_last, 0.0)
        dg_ref[row, :] = tri.rev_cumsum_row(dL).astype(dg_ref.dtype)  # cotangent of g
    dS = a.dS_in(dS, do, wy, dots)
    dS_ref[...] = dS

    @pl.when(i == n_chunks - 1)
    def _():
        dh0_ref[...] = dS.astype(dh0_ref.dtype)


# ----------------------------------------------------------------------------- wrappers
def _prepare(q, k, v, beta, g, h0, block_sizes, interpret: bool, platform, reverse: bool, do=None):
    """Checks and the launch on the padded head-major layout: ``(launch, carry)``, inputs
    ``q, k, v, beta[, g]``."""
    check_tpu_dtypes("chunked_delta", platform, interpret, TPU_DTYPES, q=q, k=k, v=v, beta=beta, g=g, h0=h0)
    launch = tpu_launch("chunked_delta", q, k, v, do, block_sizes.chunk_for("head"), interpret, reverse)
    carry = carry_dtype_of(*(x.dtype for x in (q, k, v, beta, g, h0) if x is not None))
    launch = launch.with_gate("token", beta.astype(carry))
    if g is not None:
        launch = launch.with_gate("head", g.astype(carry))
    return launch, carry


def chunked_delta_forward_tpu(q, k, v, beta, g, h0, *, scale, block_sizes, save_states, interpret, platform):
    """:func:`pallas_kernels.chunked_delta.chunked_delta_forward` on the TPU layout (same
    arguments and results; ``states`` ``[b, h, n_chunks, dk_pad, dv_pad]``)."""
    launch, carry = _prepare(q, k, v, beta, g, h0, block_sizes, interpret, platform, False)
    return forward_call(
        functools.partial(_forward_kernel, gated=g is not None), launch, h0, carry,
        jnp.result_type(q.dtype, k.dtype, v.dtype, beta.dtype), scale=scale, block_sizes=block_sizes,
        save_states=save_states,
        name="chunked_gated_delta_forward_tpu" if g is not None else "chunked_delta_forward_tpu",
        scratch=[pltpu.VMEM((launch.lay.dk_pad, launch.lay.dv_pad), carry)],
    )


def chunked_delta_backward_tpu(q, k, v, beta, g, states, do, dh_last, *, scale, block_sizes, interpret, platform):
    """:func:`pallas_kernels.chunked_delta.chunked_delta_backward` on the TPU layout."""
    check_tpu_dtypes("chunked_delta", platform, interpret, TPU_DTYPES, do=do, dh_last=dh_last)
    launch, _ = _prepare(q, k, v, beta, g, None, block_sizes, interpret, platform, True, do)
    dq, dk, dv, dbeta, *dg, dh0 = backward_call(
        functools.partial(_backward_kernel, gated=g is not None), launch, states, do, dh_last, scale=scale,
        block_sizes=block_sizes,
        name="chunked_gated_delta_backward_tpu" if g is not None else "chunked_delta_backward_tpu",
        scratch=[pltpu.VMEM((launch.lay.dk_pad, launch.lay.dv_pad), states.dtype)],
    )
    return dq, dk, dv, dbeta, dg[0] if dg else None, dh0
