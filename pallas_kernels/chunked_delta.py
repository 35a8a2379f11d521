"""Pallas kernels for the chunked (gated) delta rule in the WY / UT representation.

Per batch row ``b`` and head ``h``, with a state ``S_t [dk, dv]``::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      (S_{-1} = h0)
    o_t = scale * S_t^T q_t

DeltaNet (Schlag, Irie and Schmidhuber 2021; Yang, Wang, Zhang, Shen and Kim 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length") is ``g = 0``
(``g=None`` here); Gated DeltaNet (Yang, Kautz and Hatamizadeh 2025, "Gated Delta
Networks: Improving Mamba2 with Delta Rule") adds the per-head log-decay ``g [b, t, h]``,
finite and ``<= 0``. The conventions are those of ``ssmjax.scan.delta_rule``: keys are used
as given (normalise them yourself), the output reads the updated state.

Chunked form (the WY / UT transform of Yang et al. 2024). Inside a chunk of ``C`` tokens
with the chunk-local cumulative log-decay ``L_i = g_0 + ... + g_i`` (from the chunk start,
``<= 0``), ``D_ij = exp(L_i - L_j)`` for ``j <= i`` (else ``0``) and ``S`` the state
entering the chunk::

    A     = strictly_lower(diag(beta) (K K^T * D))
    T     = (I + A)^{-1}                       (unit lower triangular)
    W     = T diag(beta exp(L)) K              [C, dk]
    U     = T diag(beta) V                     [C, dv]
    Delta = U - W S                            the values actually written
    O     = scale * (diag(exp L) Q S + (Q K^T * D) Delta)
    S'    = exp(L_{C-1}) S + (diag(exp(L_{C-1} - L)) K)^T Delta

``T`` is formed by forward substitution, row ``i`` of ``T`` being
``e_i - sum_{j < i} A_ij T_j`` (``C - 1`` steps of ``[C, C]`` elementwise work: the stable
triangular solve, no Neumann series whose terms grow like binomial coefficients when
keys repeat). All exponents are differences ``L_i - L_j`` with ``j <= i`` (or ``L_i``, or
``L_{C-1} - L_j``), masked to ``-inf`` before ``exp`` where ``j > i``: nothing overflows for
``g <= 0``. ``L`` is the wrapper's chunk-local cumulative sum (as in
:mod:`pallas_kernels.chunked_gla`; the layout and helpers of both are
:mod:`pallas_kernels._chunked_common`'s).

Kernels (Triton pattern; grid ``(batch, heads, dv_pad / block_v)``, each program carries a
``[dk, block_v]`` column block of one head's state in registers, carry dtype >= float32):

* forward: ``fori_loop`` over chunks; per chunk ``T``, then ``Delta`` as ``T diag(beta)
  (V - diag(exp L) K S)`` (``= U - W S``, the same products grouped so that ``W`` is
  never formed), the outputs and the state update above, every ``dk`` contraction
  summed over blocks of ``block_k`` key columns with the state carried as row blocks
  (``BlockSizes.block_k``; see ``_forward_kernel`` for what stays live across the
  forward substitution); with ``save_states`` the state entering every chunk is stored,
  ``[b, h, n_chunks, dk, dv]``, the residual of the backward.
* backward: chunks last to first, carrying ``dS`` (cotangent of the state leaving the
  chunk); each chunk reloads its entry state and recomputes ``D, A, T, W, U, Delta``, then
  (``dO`` already scaled, ``P = (Q K^T) * D``)::

      dDelta = P^T dO + (exp(L_{C-1} - L) K) dS
      dS_in  = exp(L_{C-1}) dS + (exp(L) Q)^T dO - W^T dDelta
      dW     = -dDelta S^T,    dKb = T^T dW,    dVb = T^T dDelta
      dA     = -strictly_lower(dVb U^T + dKb W^T)
      dv     = beta dVb
      dbeta  = rowsum(dVb V) + exp(L) rowsum(dKb K) + rowsum(dA K K^T D)
      dq     = exp(L) (dO S^T) + (dP D) K,                dP = lower(dO Delta^T)
      dk     = beta exp(L) dKb + exp(L_{C-1} - L) (Delta dS^T)
               + (beta dA D + (beta dA D)^T) K + (dP D)^T Q
      dL     = rowsum(dO S^T * exp(L) Q) - rowsum(Delta dS^T * exp(L_{C-1} - L) K)
               + rowsum(dKb * beta exp(L) K) + rowsum(E) - colsum(E),  E = dA A + dP P
               (+ the whole-chunk decay terms on the last row)

  ``dq, dk, dbeta, dL`` sum over value columns: each program writes its partial sums to
  ``[dv_pad / block_v, ...]`` buffers that the wrapper adds (deterministic, no atomics).

Padding (wrappers): ``T`` to a multiple of ``C`` with ``q = k = v = beta = g = 0`` (no
write, no decay), ``dk``/``dv`` to powers of two (>= 16 compiled) with zeros.

Backends: ``interpret=True`` anywhere (the CPU tests); compiled, the Triton lowering of
``pl.pallas_call`` on NVIDIA GPUs. With ``platform="tpu"`` (compiled, or interpreted with
``interpret=True``) the public functions run the Mosaic TPU kernels of
:mod:`pallas_kernels.chunked_delta_tpu` (the same math, one chunk per sequential grid
step, the state in VMEM scratch). No Mosaic GPU version.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._chunked_common import (
    DOT_PRECISIONS,
    Dots,
    backward_call,
    check_attention_inputs,
    chunk_rows,
    forward_call,
    gpu_launch,
    key_blocks,
    masked_exp,
    positions,
    reverse_chunk_loop,
)
from pallas_kernels._chunked_common import BlockSizes as _ChunkedBlockSizes
from pallas_kernels._common import carry_dtype_of, check_triton_platform, i32

__all__ = ["DOT_PRECISIONS", "BlockSizes", "chunked_delta_backward", "chunked_delta_forward"]


@dataclasses.dataclass(frozen=True)
class BlockSizes(_ChunkedBlockSizes):
    """Tiling of the delta-rule kernels: as :class:`pallas_kernels.chunked_gla.BlockSizes`,
    with ``chunk=None`` meaning 32 (the forward substitution costs ``3 C^2`` elementwise
    operations per token) and ``block_k`` 16 by default: the forward holds more ``[C, C]``
    and ``[C, block_v]`` tiles than the GLA one, and with 32 key columns per step it
    uses all 255 registers (and spills 8 bytes in bfloat16 at head dim 128 on H100)
    where 16 take about 175 (compiled for H100 / A100, ``tests/kernels/test_targets.py``)."""

    block_k: int = 16

    def chunk_for(self, kind: str) -> int:
        return 32 if self.chunk is None else self.chunk


# ----------------------------------------------------------------------------- kernel math
def unit_lower_inverse(A: jax.Array, chunk: int, transposed: bool = False) -> jax.Array:
    """``(I + A)^{-1}`` for strictly lower-triangular ``A [C, C]`` (given as ``A^T`` when
    ``transposed``), by forward substitution: row ``i`` of the inverse is ``e_i - sum_{j <
    i} A_ij X_j`` (rows ``j < i`` final), with ``A_ij`` at row ``j`` taken from row ``i`` of
    ``A``, or from column ``i`` of ``A^T`` by a lane reduction (the TPU kernels: no
    transpose)."""
    rows, cols = positions(chunk)

    def row(i, X):
        if transposed:
            a_i = jnp.sum(jnp.where(cols == i, A, 0.0), axis=1, keepdims=True)  # A[i, j] at row j
        else:
            a_i = jnp.sum(jnp.where(rows == i, A, 0.0), axis=0).reshape(chunk, 1)
        return jnp.where(rows == i, X - jnp.sum(a_i * X, axis=0, keepdims=True), X)

    identity = (rows == cols).astype(A.dtype)
    return jax.lax.fori_loop(i32(1), i32(chunk), row, identity)


class _Chunk(NamedTuple):
    q: jax.Array  # [C, dk]
    k: jax.Array  # [C, dk]
    v: jax.Array  # [C, bv]
    beta: jax.Array  # [C, 1]
    L: jax.Array  # [C, 1]: chunk-local cumulative log-decay (zeros without decay)
    last: jax.Array  # [1, 1]


def _load_gates(beta_ref, L_ref, rows, c, chunk, dtype):
    """Chunk ``c``'s (``rows``) ``beta`` and ``L`` ``[C, 1]`` and ``L``'s last row ``[1, 1]``
    (``L_ref`` ``None``: no decay, zeros)."""
    beta = beta_ref[rows].astype(dtype)[:, None]
    if L_ref is None:
        return beta, jnp.zeros((chunk, 1), dtype), jnp.zeros((1, 1), dtype)
    L = L_ref[rows].astype(dtype)[:, None]
    return beta, L, L_ref[pl.ds(c * chunk + chunk - 1, 1)].astype(dtype)[:, None]


def _load_chunk(refs, c, chunk, dtype) -> _Chunk:
    q_ref, k_ref, v_ref, beta_ref, L_ref = refs
    rows = chunk_rows(c, chunk)
    load = lambda ref: ref[rows, :].astype(dtype)
    beta, L, last = _load_gates(beta_ref, L_ref, rows, c, chunk, dtype)
    return _Chunk(load(q_ref), load(k_ref), load(v_ref), beta, L, last)


class WY(NamedTuple):
    """The chunk's decays and WY representation (everything but the state terms; the TPU
    kernels form the same)."""

    D: jax.Array  # [C, C] exp(L_i - L_j), j <= i
    KK: jax.Array  # [C, C] K K^T
    A: jax.Array  # [C, C] strictly lower
    T: jax.Array  # [C, C] (I + A)^{-1}
    W: jax.Array  # [C, dk]
    U: jax.Array  # [C, bv]
    P: jax.Array  # [C, C] (Q K^T) * D


def _wy(x: _Chunk, chunk: int, dots: Dots) -> WY:
    rows, cols = positions(chunk)
    D = masked_exp(x.L - x.L.reshape(1, chunk), rows >= cols)
    KK = dots.nt(x.k, x.k)
    A = jnp.where(rows > cols, x.beta * KK * D, 0.0)
    T = unit_lower_inverse(A, chunk)
    W = dots.nn(T, (x.beta * jnp.exp(x.L)) * x.k)
    U = dots.nn(T, x.beta * x.v)
    P = dots.nt(x.q, x.k) * D
    return WY(D, KK, A, T, W, U, P)


def _forward_kernel(*refs, n_chunks, chunk, gated, scale, save_states, precision, block_k):
    """The chunk loop, with the state carried as row blocks ``S_b [block_k, block_v]``
    and every ``dk`` contraction summed over the key blocks (``q_b, k_b [C, block_k]``,
    see ``BlockSizes.block_k``). Per chunk: ``K K^T`` and ``T``; then ``Q K^T``,
    ``K S`` and ``Q S``; ``Delta = T diag(beta) (V - diag(exp L) K S)`` (``= U - W S``);
    the outputs; each ``S_b``'s update.

    Only ``K K^T`` is formed before the forward substitution's loop: a value formed
    before it and used only after is kept live across it (the compiler moves the
    ``dot`` to its use, with its operands), and so is a load merged with one before the
    loop. The loads after the loop use an index expression of their own (without the
    ``multiple_of`` hint) so they are not merged with those before: measured on H100 /
    A100, either costs 0.5-1 KB of register spills."""
    q_ref, k_ref, v_ref, beta_ref = refs[:4]
    L_ref = refs[4] if gated else None
    h0_ref, o_ref, last_ref = refs[4 + gated : 7 + gated]
    states_ref = refs[7 + gated] if save_states else None
    dtype = last_ref.dtype
    dots = Dots(dtype, precision)
    blocks = key_blocks(q_ref.shape[-1], block_k)
    rows_idx, cols_idx = positions(chunk)
    add = lambda acc, x: x if acc is None else acc + x  # noqa: E731

    def body(c, S):
        rows = chunk_rows(c, chunk)
        again = pl.ds(c * chunk, chunk)  # the same rows, loaded anew after the loop
        beta, L, last = _load_gates(beta_ref, L_ref, rows, c, chunk, dtype)
        KK = None
        for keys, S_b in zip(blocks, S):
            if states_ref is not None:
                states_ref[pl.ds(c, 1), keys, :] = S_b[None].astype(states_ref.dtype)
            k = k_ref[rows, keys].astype(dtype)
            KK = add(KK, dots.nt(k, k))
        D = masked_exp(L - L.reshape(1, chunk), rows_idx >= cols_idx)
        T = unit_lower_inverse(jnp.where(rows_idx > cols_idx, beta * KK * D, 0.0), chunk)
        QK = KS = QS = None
        for keys, S_b in zip(blocks, S):
            q, k = q_ref[again, keys].astype(dtype), k_ref[again, keys].astype(dtype)
            QK, KS, QS = add(QK, dots.nt(q, k)), add(KS, dots.nn(k, S_b)), add(QS, dots.nn(q, S_b))
        decay_in = jnp.exp(L)
        delta = dots.nn(T, beta * (v_ref[again, :].astype(dtype) - decay_in * KS))
        o = decay_in * QS + dots.nn(QK * D, delta)
        o_ref[rows, :] = (scale * o).astype(o_ref.dtype)
        decay_out = jnp.exp(last - L)
        return tuple(
            jnp.exp(last) * S_b + dots.tn(k_ref[again, keys].astype(dtype) * decay_out, delta)
            for keys, S_b in zip(blocks, S)
        )

    S = tuple(h0_ref[keys, :].astype(dtype) for keys in blocks)
    S = jax.lax.fori_loop(i32(0), i32(n_chunks), body, S)
    for keys, S_b in zip(blocks, S):
        last_ref[keys, :] = S_b.astype(last_ref.dtype)


class Cotangents(NamedTuple):
    """A chunk's backward terms (the module docstring's; ``dKb``, ``dVb``: the cotangents
    of ``diag(beta exp L) K`` and ``diag(beta) V``), from :func:`chunk_cotangents`. The
    GPU and TPU kernels store ``dv = beta dVb`` and the methods' results as each is
    formed (a value stored late stays live)."""

    decay_in: jax.Array  # [C, 1] exp(L)
    decay_out: jax.Array  # [C, 1] exp(L_{C-1} - L)
    through: jax.Array  # [1, 1] exp(L_{C-1})
    q_from_start: jax.Array  # [C, dk] exp(L) Q
    k_to_end: jax.Array  # [C, dk] exp(L_{C-1} - L) K
    k_written: jax.Array  # [C, dk] the K of W = T diag(beta exp L) K
    d_delta: jax.Array  # [C, bv]
    dP: jax.Array  # [C, C]
    d_q_from_start: jax.Array  # [C, dk] dO S^T
    d_k_to_end: jax.Array  # [C, dk] Delta dS^T
    dVb: jax.Array  # [C, bv]
    dKb: jax.Array  # [C, dk]
    dA: jax.Array  # [C, C]

    def dbeta(self, x, wy: WY) -> jax.Array:
        """``[C, 1]``."""
        return (
            jnp.sum(self.dVb * x.v, axis=1, keepdims=True)
            + self.decay_in * jnp.sum(self.dKb * x.k, axis=1, keepdims=True)
            + jnp.sum(self.dA * wy.KK * wy.D, axis=1, keepdims=True)
        )

    def dq_dk(self, x, wy: WY, dots: Dots) -> tuple[jax.Array, jax.Array]:
        """``dq``, ``dk`` ``[C, dk]``."""
        dKK = x.beta * self.dA * wy.D
        dPD = self.dP * wy.D
        dq = self.d_q_from_start * self.decay_in + dots.nn(dPD, x.k)
        dk = (
            x.beta * self.decay_in * self.dKb
            + self.decay_out * self.d_k_to_end
            + dots.nn(dKK, x.k)
            + dots.tn(dKK, x.k)
            + dots.tn(dPD, x.q)
        )
        return dq, dk

    def dL_row_sums(self, E: jax.Array) -> jax.Array:
        """``[C, 1]``: ``dL`` but for ``colsum(E)`` and the last row's whole-chunk terms,
        ``E = dA A + dP P`` the cotangent of the decay matrix, times ``D``."""
        return jnp.sum(
            self.d_q_from_start * self.q_from_start - self.d_k_to_end * self.k_to_end + self.dKb * self.k_written,
            axis=1,
            keepdims=True,
        ) + jnp.sum(E, axis=1, keepdims=True)

    def dS_in(self, dS: jax.Array, do: jax.Array, wy: WY, dots: Dots) -> jax.Array:
        """The cotangent of the state entering the chunk."""
        return self.through * dS + dots.tn(self.q_from_start, do) - dots.tn(wy.W, self.d_delta)


def chunk_cotangents(x, wy: WY, S, dS, do, dots: Dots, rows_idx, cols_idx) -> Cotangents:
    """The backward of one chunk (``x``: its operands, ``S`` the state entering it, ``dS``
    the cotangent of the one leaving it, ``do`` scaled) up to ``dA``; ``rows_idx``,
    ``cols_idx``: the chunk's :func:`~pallas_kernels._chunked_common.positions`."""
    delta = wy.U - dots.nn(wy.W, S)
    decay_in, decay_out, through = jnp.exp(x.L), jnp.exp(x.last - x.L), jnp.exp(x.last)
    q_from_start, k_to_end = x.q * decay_in, x.k * decay_out
    k_written = x.beta * decay_in * x.k

    d_delta = dots.tn(wy.P, do) + dots.nn(k_to_end, dS)  # [C, bv]
    dP = jnp.where(rows_idx >= cols_idx, dots.nt(do, delta), 0.0)
    d_q_from_start = dots.nt(do, S)  # [C, dk]
    d_k_to_end = dots.nt(delta, dS)  # [C, dk]
    dVb = dots.tn(wy.T, d_delta)  # [C, bv]
    dKb = -dots.tn(wy.T, dots.nt(d_delta, S))  # T^T dW, dW = -dDelta S^T
    dA = -jnp.where(rows_idx > cols_idx, dots.nt(dVb, wy.U) + dots.nt(dKb, wy.W), 0.0)
    return Cotangents(
        decay_in, decay_out, through, q_from_start, k_to_end, k_written, d_delta, dP, d_q_from_start, d_k_to_end,
        dVb, dKb, dA,
    )


def _backward_kernel(*refs, n_chunks, chunk, gated, scale, precision):
    q_ref, k_ref, v_ref, beta_ref = refs[:4]
    L_ref = refs[4] if gated else None
    states_ref, do_ref, dlast_ref, dq_ref, dk_ref, dv_ref, dbeta_ref = refs[4 + gated : 11 + gated]
    dL_ref = refs[11 + gated] if gated else None
    dh0_ref = refs[-1]
    dtype = dh0_ref.dtype
    dots = Dots(dtype, precision)
    in_refs = (q_ref, k_ref, v_ref, beta_ref, L_ref)
    rows_idx, cols_idx = positions(chunk)

    def body(c, dS):
        """``dS``: cotangent of the state leaving chunk ``c``."""
        x = _load_chunk(in_refs, c, chunk, dtype)
        S = states_ref[c].astype(dtype)
        rows = chunk_rows(c, chunk)
        do = scale * do_ref[rows, :].astype(dtype)
        wy = _wy(x, chunk, dots)
        a = chunk_cotangents(x, wy, S, dS, do, dots, rows_idx, cols_idx)
        dv_ref[rows, :] = (x.beta * a.dVb).astype(dv_ref.dtype)
        dbeta_ref[rows] = a.dbeta(x, wy)[:, 0].astype(dbeta_ref.dtype)
        dq, dk = a.dq_dk(x, wy, dots)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        if dL_ref is not None:
            E = a.dA * wy.A + a.dP * wy.P
            dL = a.dL_row_sums(E) - jnp.sum(E, axis=0).reshape(chunk, 1)
            d_last = jnp.sum(a.d_k_to_end * a.k_to_end) + a.through * jnp.sum(dS * S)  # [1, 1]
            dL = dL + jnp.where(rows_idx == chunk - 1, d_last, 0.0)
            dL_ref[rows] = dL[:, 0].astype(dL_ref.dtype)
        return a.dS_in(dS, do, wy, dots)

    dS = reverse_chunk_loop(n_chunks, body, dlast_ref[...].astype(dtype))
    dh0_ref[...] = dS.astype(dh0_ref.dtype)


# ----------------------------------------------------------------------------- wrappers
def _check_beta_g(q, beta, g) -> None:
    for name, x in (("beta", beta), ("g", g)):
        if x is None:
            continue
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name}: expected shape [batch, time, heads] = {q.shape[:3]}, got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a real floating dtype, got {x.dtype}")


def _prepare(q, k, v, beta, g, block_sizes: BlockSizes, interpret, platform):
    """The launch on the padded kernel layout, inputs ``q, k, v, beta[, L]``."""
    check_triton_platform(platform, interpret, "chunked_delta")
    launch = gpu_launch(q, k, v, block_sizes.chunk_for("head"), block_sizes, interpret, platform)
    launch = launch.with_gate("token", beta)
    if g is None:
        return launch
    carry = carry_dtype_of(q.dtype, k.dtype, v.dtype, beta.dtype, g.dtype)
    return launch.with_gate("head", g.astype(carry))


@functools.partial(
    jax.jit, static_argnames=("scale", "block_sizes", "save_states", "interpret", "platform")
)
def chunked_delta_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None = None,
    h0: jax.Array | None = None,
    *,
    scale: float | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    save_states: bool = True,
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The chunked (gated) delta rule (see the module docstring).

    Args:
      q, k: ``[batch, time, heads, dk]``.
      v: ``[batch, time, heads, dv]``.
      beta: writing strengths ``[batch, time, heads]``.
      g: per-head log-decay ``[batch, time, heads]`` (finite, ``<= 0``) or ``None``
        (DeltaNet).
      h0: ``[batch, heads, dk, dv]`` or ``None`` (zeros).
      scale: output scale (static Python float); ``None``: ``dk ** -0.5``.
      block_sizes: see :class:`BlockSizes`.
      save_states: also return the chunk-entry states (the backward's residual).
      interpret: run under the Pallas interpreter (CPU tests).
      platform: backend to lower for (``None``: ``jax.default_backend()``).

    Returns:
      ``(o, h_last, states)`` as :func:`pallas_kernels.chunked_gla.chunked_gla_forward`.
    """
    check_attention_inputs(q, k, v, h0)
    _check_beta_g(q, beta, g)
    if (platform or jax.default_backend()) == "tpu":  # Mosaic TPU (or its interpreter)
        from pallas_kernels.chunked_delta_tpu import chunked_delta_forward_tpu

        return chunked_delta_forward_tpu(
            q, k, v, beta, g, h0, scale=scale, block_sizes=block_sizes, save_states=save_states,
            interpret=interpret, platform=platform,
        )
    launch = _prepare(q, k, v, beta, g, block_sizes, interpret, platform)
    carry = carry_dtype_of(*(x.dtype for x in (q, k, v, beta, g, h0) if x is not None))
    return forward_call(
        functools.partial(_forward_kernel, gated=g is not None, block_k=block_sizes.block_k), launch, h0, carry,
        jnp.result_type(q.dtype, k.dtype, v.dtype, beta.dtype), scale=scale, block_sizes=block_sizes,
        save_states=save_states, name="chunked_gated_delta_forward" if g is not None else "chunked_delta_forward",
    )


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret", "platform"))
def chunked_delta_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None,
    states: jax.Array,
    do: jax.Array,
    dh_last: jax.Array,
    *,
    scale: float | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """Cotangents of :func:`chunked_delta_forward` (same ``scale`` and ``block_sizes``).

    Returns:
      ``(dq, dk, dv, dbeta, dg, dh0)`` in the carry dtype (``dg`` is ``None`` when ``g`` is).
    """
    check_attention_inputs(q, k, v, dh_last)
    _check_beta_g(q, beta, g)
    if do.shape != v.shape:
        raise ValueError(f"do: expected shape v.shape = {v.shape}, got {do.shape}")
    if (platform or jax.default_backend()) == "tpu":  # Mosaic TPU (or its interpreter)
        from pallas_kernels.chunked_delta_tpu import chunked_delta_backward_tpu

        return chunked_delta_backward_tpu(
            q, k, v, beta, g, states, do, dh_last, scale=scale, block_sizes=block_sizes,
            interpret=interpret, platform=platform,
        )
    launch = _prepare(q, k, v, beta, g, block_sizes, interpret, platform)
    dq, dk, dv, dbeta, *dg, dh0 = backward_call(
        functools.partial(_backward_kernel, gated=g is not None), launch, states, do, dh_last, scale=scale,
        block_sizes=block_sizes, name="chunked_gated_delta_backward" if g is not None else "chunked_delta_backward",
    )
    return dq, dk, dv, dbeta, dg[0] if dg else None, dh0
