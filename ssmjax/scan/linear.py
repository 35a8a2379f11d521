"""First-order linear recurrences ``h_t = A_t h_{t-1} + b_t``.

Two transition kinds share one implementation:

* ``linear_scan``: diagonal (elementwise) ``A_t``, ``h_t = a_t * h_{t-1} + b_t``;
* ``matrix_scan``: dense (or block-diagonal, via extra leading axes) ``A_t [..., n, n]``,
  ``h_t = A_t @ h_{t-1} + b_t``.

``complex_lti_scan`` is the diagonal recurrence with a complex decay constant in time (the
LRU's) on real/imaginary pairs ``[..., 2, N]``; on CPU it has its own loop and VJP without
the layout copies of the general path (its docstring).

Evaluations (``method=``):

* ``"sequential"``: ``lax.scan`` over time; the oracle.
* ``"associative"``: ``lax.associative_scan`` with the combine
  ``(A1, b1) . (A2, b2) = (A2 A1, A2 b1 + b2)`` (Blelloch 1990; S5, Smith et al. 2023).
* ``"chunked"``: sequential inside chunks of ``chunk_size`` steps for all chunks at once,
  then a sequential pass over the ``T / chunk_size`` chunk summaries, then a fix-up
  ``h = h_local + A_cum h_chunk_start``: ``O(T)`` work in ``~2 sqrt(T)`` loop steps.
* ``"pallas"`` (``linear_scan`` with real inputs only): the kernel of
  :mod:`pallas_kernels.linear_scan`, a grid over (batch, feature blocks) whose programs
  loop over time with the carry in registers; trailing feature axes are flattened into
  one. It compiles on GPU (Triton) and TPU (Mosaic); on CPU it runs under the Pallas
  interpreter (``interpret=True``, chosen automatically: correct but slow, for tests).
* ``"auto"``: ``"sequential"`` on CPU, where XLA compiles the loop tightly and it beat
  both parallel forms at every shape in ``experiments/speed.py`` (e.g. fwd+bwd at
  b=2, t=16k, d=256: 80 ms vs 125 ms chunked); elsewhere ``"pallas"`` where
  :data:`ssmjax.scan._dispatch.TABLE` lists the kernel as proven for the platform, dtype
  and length, ``"chunked"`` otherwise (complex inputs, ``matrix_scan``). The platform is
  the one the program is lowered for (``jax.lax.platform_dependent``).

Gradients never differentiate through the scan algorithm: a custom VJP runs the same
scan backwards with transposed transitions,
``g_t = dh_t + A_{t+1}^T g_{t+1}``, ``db_t = g_t``, ``dA_t = g_t h_{t-1}^T``,
``dh_0 = A_0^T g_0``, so the backward stores only the inputs and outputs (``O(T)``),
not the associative-scan tree. Complex inputs follow JAX's convention (transpose, not
conjugate transpose).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Inexact

from pallas_kernels.linear_scan import BlockSizes as LinearScanBlockSizes
from pallas_kernels.linear_scan import linear_scan as pallas_linear_scan

from ssmjax.scan import _dispatch
from ssmjax.scan._checks import (
    carry_cut_mask,
    check_broadcastable,
    check_chunk_size,
    check_floating,
    check_ndim,
    check_shape,
    expand_mask,
    flip_time,
    pad_time,
    state_dtype,
)


class _Transition(NamedTuple):
    """How a transition acts; diagonal and dense recurrences differ only here."""

    apply: Callable  # (A, h) -> A h
    compose: Callable  # (A_later, A_earlier) -> A_later A_earlier
    transpose: Callable  # A -> A^T
    outer: Callable  # (g, h) -> cotangent of A for h_t = A h + b: g h^T
    identity: Callable  # A -> identity transitions shaped like A


DIAGONAL = _Transition(
    apply=lambda a, h: a * h,
    compose=lambda a2, a1: a2 * a1,
    transpose=lambda a: a,
    outer=lambda g, h: g * h,
    identity=jnp.ones_like,
)

DENSE = _Transition(
    apply=lambda A, h: jnp.einsum("...ij,...j->...i", A, h),
    compose=lambda A2, A1: jnp.einsum("...ij,...jk->...ik", A2, A1),
    transpose=lambda A: jnp.swapaxes(A, -1, -2),
    outer=lambda g, h: g[..., :, None] * h[..., None, :],
    identity=lambda A: jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape),
)


def default_chunk_size(time: int) -> int:
    """``~sqrt(T)`` rounded to a power of two: balances the two sequential passes."""
    return max(1, 2 ** round(math.log2(max(1.0, math.sqrt(time)))))


# ----------------------------------------------------------------------------- forward
def _sequential(kind: _Transition, a: Array, b: Array, h0: Array) -> Array:
    def step(h, ab):
        a_t, b_t = ab
        h = kind.apply(a_t, h) + b_t
        return h, h

    _, hs = jax.lax.scan(step, h0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
    return jnp.swapaxes(hs, 0, 1)


def combine(kind: _Transition, earlier: tuple, later: tuple) -> tuple:
    """The associative operator of the scan: applying ``earlier`` then ``later`` is
    ``(A2 A1, A2 b1 + b2)``."""
    a1, b1 = earlier
    a2, b2 = later
    return kind.compose(a2, a1), kind.apply(a2, b1) + b2


def _associative(kind: _Transition, a: Array, b: Array, h0: Array) -> Array:
    b = b.at[:, 0].add(kind.apply(a[:, 0], h0))
    _, hs = jax.lax.associative_scan(functools.partial(combine, kind), (a, b), axis=1)
    return hs


def _chunked(kind: _Transition, a: Array, b: Array, h0: Array, chunk_size: int) -> Array:
    batch, time = b.shape[:2]
    c = min(chunk_size, time)
    pad = -time % c
    if pad:  # identity transitions and zero inputs leave the state unchanged
        a = jnp.concatenate([a, kind.identity(a[:, :pad])], axis=1)
    b = pad_time(b, c)
    n_chunks = b.shape[1] // c

    def by_position(x):  # [batch, n*c, ...] -> [c, batch, n, ...]
        return jnp.moveaxis(x.reshape((batch, n_chunks, c) + x.shape[2:]), 2, 0)

    def local_step(carry, ab):  # every chunk at once, starting from a zero state
        h, a_cum = carry
        a_t, b_t = ab
        h = kind.apply(a_t, h) + b_t
        a_cum = kind.compose(a_t, a_cum)
        return (h, a_cum), (h, a_cum)

    a_c, b_c = by_position(a), by_position(b)
    init = (jnp.zeros_like(b_c[0]), kind.identity(a_c[0]))
    _, (h_local, a_cum) = jax.lax.scan(local_step, init, (a_c, b_c))

    def across_chunks(h, summary):  # carry the true state from chunk to chunk
        a_total, h_end = summary
        return kind.apply(a_total, h) + h_end, h

    summaries = (jnp.swapaxes(a_cum[-1], 0, 1), jnp.swapaxes(h_local[-1], 0, 1))
    _, h_start = jax.lax.scan(across_chunks, h0, summaries)  # [n, batch, ...]
    h = h_local + kind.apply(a_cum, jnp.swapaxes(h_start, 0, 1)[None])
    h = jnp.moveaxis(h, 0, 2).reshape((batch, n_chunks * c) + b.shape[2:])
    return h[:, :time]


class _Options(NamedTuple):
    """Static settings of one evaluation: the XLA chunk and, for ``"pallas"``, the kernel
    tiling (``None``: the kernel's default) and the platform it is lowered for (``"cpu"``:
    the Pallas interpreter)."""

    chunk_size: int | None = None
    block_sizes: LinearScanBlockSizes | None = None
    platform: str = _dispatch.DEFAULT


def _pallas_diagonal(a: Array, b: Array, h0: Array, options: _Options) -> Array:
    """The Pallas kernel over ``[batch, time, features]``, trailing axes flattened."""
    batch, time = b.shape[:2]
    h, _ = pallas_linear_scan(
        a.reshape(batch, time, -1),
        b.reshape(batch, time, -1),
        h0.reshape(batch, -1),
        block_sizes=_dispatch.block_sizes_for(
            "linear_scan", options.block_sizes, options.platform
        ),
        interpret=options.platform == "cpu",
        platform=options.platform,
    )
    return h.reshape(b.shape)


def _forward(kind, method, options, a, b, h0):
    if method == "pallas":
        return _pallas_diagonal(a, b, h0, options)
    if method == "sequential":
        return _sequential(kind, a, b, h0)
    if method == "associative":
        return _associative(kind, a, b, h0)
    return _chunked(kind, a, b, h0, options.chunk_size or default_chunk_size(b.shape[1]))


# ----------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrence(kind, method, options, a, b, h0):
    h = _forward(kind, method, options, a, b, h0)
    return h, h[:, -1]


def _recurrence_fwd(kind, method, options, a, b, h0):
    h = _forward(kind, method, options, a, b, h0)
    return (h, h[:, -1]), (a, h, h0)


def _recurrence_bwd(kind, method, options, residuals, cotangents):
    a, h, h0 = residuals
    dh, dh_last = cotangents
    dh = jnp.asarray(dh).at[:, -1].add(dh_last)
    # g_t = dh_t + A_{t+1}^T g_{t+1}: a linear scan of the same kind, run backwards.
    a_next_t = kind.transpose(jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1))
    g = flip_time(
        _forward(kind, method, options, flip_time(a_next_t), flip_time(dh), jnp.zeros_like(h0))
    )
    h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
    da = kind.outer(g, h_prev)
    dh0 = kind.apply(kind.transpose(a[:, 0]), g[:, 0])
    return da, g, dh0


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _run(
    kind: _Transition,
    method: str,
    options: _Options,
    reverse: bool,
    a: Inexact[Array, "batch time *transition"],
    b: Inexact[Array, "batch time *state"],
    h0: Inexact[Array, "batch *state"],
    cut: Array | None,
) -> tuple[Inexact[Array, "batch time *state"], Inexact[Array, "batch *state"]]:
    if cut is not None:
        a = jnp.where(expand_mask(cut, a.ndim), jnp.zeros((), a.dtype), a)
    if reverse:
        a, b = flip_time((a, b))
    h, h_last = _recurrence(kind, method, options, a, b, h0)
    return (flip_time(h) if reverse else h), h_last


def _dispatch_run(
    op: str,
    kind: _Transition,
    method: str,
    a: Array,
    b: Array,
    h0: Array,
    cut: Array | None,
    reverse: bool,
    chunk_size: int | None,
    block_sizes: LinearScanBlockSizes | None,
    out_dtype,
) -> tuple[Array, Array]:
    """Run ``method`` (``"auto"`` resolved per lowering platform by the dispatch table)."""
    case = _dispatch.case(out_dtype, packed=cut is not None, time=b.shape[1])

    def branch(resolved: str, platform: str):
        options = _Options(chunk_size, block_sizes, platform)
        return functools.partial(_run, kind, resolved, options, reverse)

    return _dispatch.dispatch(_dispatch.plan(op, method, case), branch, a, b, h0, cut)


def _prepare(
    op: str,
    name_a: str,
    a: ArrayLike,
    b: ArrayLike,
    initial_state: ArrayLike | None,
    a_shape_of,
    a_layout: str,
    method: str,
    chunk_size: int | None,
):
    a, b = jnp.asarray(a), jnp.asarray(b)
    _dispatch.check_method(op, method)
    if chunk_size is not None:
        check_chunk_size(chunk_size)
    check_floating("b", b)
    check_floating(name_a, a)
    check_ndim("b", b, range(2 + (name_a == "A"), 64), "[batch, time, ...]")
    check_broadcastable(name_a, a, a_shape_of(b.shape), a_layout)
    out_dtype = jnp.result_type(a.dtype, b.dtype)
    dtype = state_dtype(a.dtype, b.dtype)
    if initial_state is None:
        h0 = jnp.zeros((b.shape[0],) + b.shape[2:], dtype)
    else:
        h0 = jnp.asarray(initial_state)
        check_floating("initial_state", h0)
        check_shape("initial_state", h0, (b.shape[0],) + b.shape[2:], "[batch, ...state]")
        dtype = state_dtype(dtype, h0.dtype)
        h0 = h0.astype(dtype)
    a = jnp.broadcast_to(a, a_shape_of(b.shape)).astype(dtype)
    return a, b.astype(dtype), h0, out_dtype


@_dispatch.sequence_parallel_route("linear_scan")
def linear_scan(
    a: ArrayLike,
    b: ArrayLike,
    *,
    initial_state: ArrayLike | None = None,
    reverse: bool = False,
    segment_ids: ArrayLike | None = None,
    reset: ArrayLike | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    block_sizes: LinearScanBlockSizes | None = None,
) -> tuple[Array, Array]:
    """Diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (elementwise).

    Args:
      a: decays, any shape broadcastable to ``b`` (e.g. ``[1, time, d]`` shared over the
        batch, or ``[d]`` constant); real or complex.
      b: inputs ``[batch, time, ...]``.
      initial_state: ``h_{-1}`` ``[batch, ...]``; zeros if ``None``.
      reverse: run from ``t = T-1`` down to ``0`` (``h_t = a_t h_{t+1} + b_t``).
      segment_ids: ``[batch, time]`` ints; the state restarts where the id changes.
      reset: ``[batch, time]`` bool; ``True`` starts a new document at that position
        (alternative to ``segment_ids``).
      method: ``"auto"``, ``"sequential"``, ``"associative"``, ``"chunked"`` or
        ``"pallas"`` (real inputs only; interpreted on CPU, see the module docstring).
      chunk_size: chunk length for ``"chunked"``; ``None`` picks ``~sqrt(T)``. Any ``T``
        works (the last chunk is padded with identity transitions).
      block_sizes: the kernel's tiling (:class:`LinearScanBlockSizes`) wherever the
        Pallas kernel runs; ``None``: the per-target default.

    Returns:
      ``(h, final_state)``: ``h`` ``[batch, time, ...]`` in the promoted input dtype and
      the state after the last step ``[batch, ...]``, accumulated in at least float32.

    Under :func:`ssmjax.distributed.sequence_parallel` this is
    :func:`ssmjax.distributed.linear_scan_sp` when ``time`` divides over the ``seq`` axis
    (unchanged otherwise; see :mod:`ssmjax.distributed.context`).
    """
    a, b, h0, out_dtype = _prepare(
        "linear_scan", "a", a, b, initial_state, lambda s: s, "b.shape [batch, time, ...]",
        method, chunk_size,
    )
    _dispatch.check_block_sizes("linear_scan", block_sizes, LinearScanBlockSizes)
    cut = carry_cut_mask(segment_ids, reset, b.shape[0], b.shape[1], reverse)
    if method == "pallas":
        case = _dispatch.case(out_dtype, packed=cut is not None, time=b.shape[1])
        _dispatch.check_pallas("linear_scan", case, "a, b")
    if b.shape[1] == 0:  # an empty sequence leaves the state as it was
        return b.astype(out_dtype), h0
    h, h_last = _dispatch_run(
        "linear_scan", DIAGONAL, method, a, b, h0, cut, reverse, chunk_size, block_sizes, out_dtype
    )
    return h.astype(out_dtype), h_last


def matrix_scan(
    A: ArrayLike,
    b: ArrayLike,
    *,
    initial_state: ArrayLike | None = None,
    reverse: bool = False,
    segment_ids: ArrayLike | None = None,
    reset: ArrayLike | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Array, Array]:
    """Dense linear recurrence ``h_t = A_t @ h_{t-1} + b_t``.

    ``b`` is ``[batch, time, ..., n]`` and ``A`` broadcastable to
    ``[batch, time, ..., n, n]``. Block-diagonal transitions are expressed with a block
    axis: ``A [batch, time, blocks, k, k]``, ``b [batch, time, blocks, k]``. Arguments and
    returns as in :func:`linear_scan`; the associative method costs ``O(n^3)`` per combine,
    the sequential and chunked ones ``O(n^2)`` per step plus ``O(n^3)`` per step for the
    chunk's cumulative transition.
    """
    a, b, h0, out_dtype = _prepare(
        "matrix_scan",
        "A",
        A,
        b,
        initial_state,
        lambda s: tuple(s) + (s[-1],),
        "[batch, time, ..., n, n] with b [batch, time, ..., n]",
        method,
        chunk_size,
    )
    if b.shape[1] == 0:  # an empty sequence leaves the state as it was
        return b.astype(out_dtype), h0
    cut = carry_cut_mask(segment_ids, reset, b.shape[0], b.shape[1], reverse)
    h, h_last = _dispatch_run(
        "matrix_scan", DENSE, method, a, b, h0, cut, reverse, chunk_size, None, out_dtype
    )
    return h.astype(out_dtype), h_last


# ------------------------------------------------- constant complex decays, real arithmetic
def _time_loop(time: int, reverse: bool, body: Callable, init):
    """``body(t, carry)`` for ``t = 0 .. time-1`` (``time-1 .. 0`` if ``reverse``)."""
    order = (lambda i: time - 1 - i) if reverse else (lambda i: i)  # noqa: E731
    return jax.lax.fori_loop(0, time, lambda i, carry: body(order(i), carry), init)


def _at(x: Array | None, t) -> Array | None:
    """``x[:, t]`` (a strided slice: no batch/time swap of ``x``)."""
    return None if x is None else jax.lax.dynamic_index_in_dim(x, t, 1, keepdims=False)


def _put(x: Array, value: Array, t) -> Array:
    """``x[:, t] = value`` in place."""
    return jax.lax.dynamic_update_index_in_dim(x, value, t, 1)


def _swap(x: Array) -> Array:
    """``[re, im] -> [im, re]`` along the pair axis (-2): a reversed read, no concatenate."""
    return jnp.flip(x, axis=-2)


def _pair_loop(reverse, a1, a2, b, h0, keep):
    """``h_t = a1 * h' + a2 * swap(h') + b_t`` with ``h' = keep_t h_{t-1}`` over axis 1 (the
    complex product ``a h'`` on real pairs for ``a1 = [Re a, Re a]``, ``a2 = [-Im a, Im a]``),
    ``a1, a2`` loop constants. Returns ``(h, last)``."""

    def body(t, carry):  # h_t overwrites b_t in the one buffer (read first; no zero-filled output)
        h, out = carry
        k = _at(keep, t)
        if k is not None:
            h = k * h
        h = a1 * h + a2 * _swap(h) + _at(out, t)
        return h, _put(out, h, t)

    last, h = _time_loop(b.shape[1], reverse, body, (h0, b))
    return h, last


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``x`` over the axes that ``shape`` broadcasts (the cotangent of a broadcast)."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, s in enumerate(shape) if s == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pair_recurrence(reverse, a1, a2, b, h0, keep):
    return _pair_loop(reverse, a1, a2, b, h0, keep)


def _pair_recurrence_fwd(reverse, a1, a2, b, h0, keep):
    h, last = _pair_loop(reverse, a1, a2, b, h0, keep)
    return (h, last), (a1, a2, h, h0, keep)


def _pair_recurrence_bwd(reverse, residuals, cotangents):
    """One loop in the opposite direction, no flips of arrays over time and no
    ``[batch, time, ...]`` decay: with ``m_t = keep_t g_t`` (``g_t`` the cotangent of
    ``h_t``), ``g_t = dh_t + a1 m_{t+1} + swap(a2 m_{t+1})`` (the transposed step),
    ``db_t = g_t``, ``da1 = sum_t m_t h_{t-1}``, ``da2 = sum_t m_t swap(h_{t-1})`` (accumulated
    in the carry: cheaper than a reduction over a shifted copy of ``h`` afterwards) and
    ``dh_{-1}`` what flows out of ``m_0``."""
    a1, a2, h, h0, keep = residuals
    dh, dlast = cotangents

    def body(t, carry):  # g_t overwrites dh_t in the one buffer
        f, m, acc1, acc2, g = carry  # f: what flows into h_t from the step after it
        h_t = _at(h, t)
        acc1, acc2 = acc1 + m * h_t, acc2 + m * _swap(h_t)
        g_t = _at(g, t) + f
        k = _at(keep, t)
        m = g_t if k is None else k * g_t
        return a1 * m + _swap(a2 * m), m, acc1, acc2, _put(g, g_t, t)

    zero = jnp.zeros_like(h0)
    f, m, acc1, acc2, g = _time_loop(h.shape[1], not reverse, body, (dlast + zero, zero, zero, zero, dh))
    da1 = _sum_to_shape(acc1 + m * h0, a1.shape)
    da2 = _sum_to_shape(acc2 + m * _swap(h0), a2.shape)
    return da1, da2, g, f, None


_pair_recurrence.defvjp(_pair_recurrence_fwd, _pair_recurrence_bwd)


def complex_lti_scan(
    a: ArrayLike,
    b: ArrayLike,
    *,
    initial_state: ArrayLike | None = None,
    reverse: bool = False,
    segment_ids: ArrayLike | None = None,
    reset: ArrayLike | None = None,
    method: str = "auto",
) -> tuple[Array, Array]:
    """:func:`linear_scan` with a complex decay constant in time, on real pairs:
    ``h_t = a * h_{t-1} + b_t`` where the axis before the last holds the real
    (index 0) and imaginary (index 1) parts: ``a = a[..., 0, :] + i a[..., 1, :]``,
    ``b_t = b[:, t, ..., 0, :] + i b[:, t, ..., 1, :]`` (the LRU's recurrence, whose
    projections in and out are then real matrix products with ``2 N`` columns).

    On CPU (``method="sequential"``, what ``"auto"`` picks there) it is one loop over time
    that reads ``b[:, t]`` and writes ``h[:, t]`` in place (strided slices: no batch/time
    swap of any array) with ``a`` a loop constant, and a custom VJP that runs one loop the
    other way and accumulates ``da`` in its carry: no ``[batch, time, ...]`` decay, no flip
    and no complex arithmetic (XLA's CPU transposes and complex products cost more than
    the recurrence). Other methods (and ``"auto"`` elsewhere, or under
    :func:`ssmjax.distributed.sequence_parallel`) run :func:`linear_scan` on complex
    arrays: the same results.

    Args:
      a: the decay as real pairs, broadcastable to ``[batch, ..., 2, N]`` (e.g. ``[2, N]``).
      b: inputs ``[batch, time, ..., 2, N]``, real.
      initial_state: ``h_{-1}`` ``[batch, ..., N]`` (complex), zeros if ``None``.
      reverse, segment_ids, reset: as in :func:`linear_scan`.
      method: ``"auto"``, ``"sequential"``, ``"associative"`` or ``"chunked"``.

    Returns:
      ``(h, final_state)``: ``h`` ``[batch, time, ..., 2, N]`` (real pairs, in the promoted
      real dtype, at least float32) and the complex state after the last step
      ``[batch, ..., N]``.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if method == "pallas":
        raise ValueError("method: the Pallas kernel takes real inputs only; expected one of "
                         "('auto', 'sequential', 'associative', 'chunked') for complex_lti_scan")
    _dispatch.check_method("linear_scan", method)
    for name, x in (("a", a), ("b", b)):
        check_floating(name, x)
        if jnp.iscomplexobj(x):
            raise ValueError(f"{name}: expected real pairs [..., 2, N] of a real floating dtype, got {x.dtype}")
    check_ndim("b", b, range(4, 64), "[batch, time, ..., 2, N]")
    if b.shape[-2] != 2:
        raise ValueError(f"b: expected real pairs [batch, time, ..., 2, N] (axis -2 of size 2), got {tuple(b.shape)}")
    batch, time = b.shape[:2]
    pairs_shape = (batch,) + b.shape[2:]
    check_broadcastable("a", a, pairs_shape, "[batch, ..., 2, N] (b without its time axis)")
    real = jnp.result_type(jnp.float32, a.dtype, b.dtype)
    state_shape = pairs_shape[:-2] + pairs_shape[-1:]
    if initial_state is None:
        h0 = jnp.zeros(pairs_shape, real)
    else:
        h0 = jnp.asarray(initial_state)
        check_floating("initial_state", h0)
        check_shape("initial_state", h0, state_shape, "[batch, ..., N]")
        real = jnp.result_type(real, jnp.real(h0).dtype)
        h0 = jnp.stack([jnp.real(h0), jnp.imag(h0)], axis=-2).astype(real)
    cut = carry_cut_mask(segment_ids, reset, batch, time, reverse)
    a, b = a.astype(real), b.astype(real)

    def as_complex(pairs):
        return jax.lax.complex(pairs[..., 0, :], pairs[..., 1, :])

    if time == 0:
        return b, as_complex(h0)

    def through_linear_scan(resolved: str, a, b, h0, keep):
        h, last = linear_scan(
            jnp.expand_dims(jnp.broadcast_to(as_complex(a), state_shape), 1), as_complex(b),
            initial_state=as_complex(h0), reverse=reverse, segment_ids=segment_ids, reset=reset, method=resolved,
        )
        return jnp.stack([h.real, h.imag], axis=-2), last

    if _dispatch.active_sequence_parallel() is not None:  # linear_scan routes itself
        return through_linear_scan(method, a, b, h0, None)
    keep = None if cut is None else expand_mask(~cut, b.ndim).astype(real)

    def loop(a, b, h0, keep):
        a_re, a_im = a[..., :1, :], a[..., 1:, :]
        h, last = _pair_recurrence(reverse, jnp.concatenate([a_re, a_re], -2), jnp.concatenate([-a_im, a_im], -2),
                                   b, h0, keep)
        return h, as_complex(last)

    def branch(resolved: str, platform: str):
        return loop if resolved == "sequential" else functools.partial(through_linear_scan, resolved)

    case = _dispatch.case(jnp.result_type(real, jnp.complex64), packed=cut is not None, time=time)
    return _dispatch.dispatch(_dispatch.plan("linear_scan", method, case), branch, a, b, h0, keep)
