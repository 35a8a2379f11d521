"""Softmax attention as a recurrence (prefix softmax) and as a quadratic reference.

Prefix softmax attention (one query, or one query per head): with scores ``s_t`` and
values ``v_t``::

    o_t = sum_{i <= t} exp(s_i) v_i / sum_{i <= t} exp(s_i)

is a recurrence over the stabilised triple ``(m, num, den)`` with ``m`` the running
maximum, ``num = sum_i exp(s_i - m) v_i`` and ``den = sum_i exp(s_i - m)``; two such
summaries of consecutive stretches merge with the associative operator
(:func:`softmax_scan_combine`)::

    m   = max(m_a, m_b)
    num = num_a exp(m_a - m) + num_b exp(m_b - m)
    den = den_a exp(m_a - m) + den_b exp(m_b - m)

so all prefixes come out of one parallel scan (Feng, Tung, Ahmed, Bengio and Hajimirsadeghi,
2024, "Attention as an RNN", the Aaren many-to-many formulation; the same
rescaling trick as online softmax, Milakov and Gimelshein, 2018, "Online normalizer
calculation for softmax"). Only exponents ``<= 0`` are evaluated.

Evaluations (``method=``): ``"sequential"`` (``lax.scan`` merging one token at a time; the
oracle), ``"associative"`` (``lax.associative_scan`` with the combine above, ``O(log T)``
depth) and ``"auto"``: ``"sequential"`` on CPU, where its jitted forward+backward was faster at
every measured shape (float32: 5.9 vs 7.4 ms at ``[2, 1024, 4, dv=64]``, 64 vs 163 ms at
``[8, 4096, 8, dv=16]``; the associative forward alone wins at the first, 1.6 vs 2.4
ms), ``"associative"`` on accelerators. Packed sequences (``segment_ids`` / ``reset``) drop the summary carried into
a new document, which keeps the combine associative (a segmented scan).

:func:`causal_softmax_attention` is the plain quadratic causal softmax attention, with an
optional sliding window and document masking, for hybrids and as a reference.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Bool, Float

from ssmjax.checks import check_multihead_qkv
from ssmjax.scan import _dispatch
from ssmjax.scan._checks import (
    carry_cut_mask,
    check_ndim,
    check_real_floating,
    check_shape,
    state_dtype,
)

PREFIX_METHODS = _dispatch.TABLE["prefix_softmax_attention"].methods


class SoftmaxState(NamedTuple):
    """Summary of a stretch of tokens: running max ``m [batch, heads]``, rescaled
    numerator ``num [batch, heads, dv] = sum exp(s_i - m) v_i`` and denominator
    ``den [batch, heads] = sum exp(s_i - m)``. The empty summary is ``(-inf, 0, 0)``."""

    m: Array
    num: Array
    den: Array


def empty_softmax_state(batch: int, heads: int, dv: int, dtype=jnp.float32) -> SoftmaxState:
    """The summary of no tokens, ``(-inf, 0, 0)``: the identity of the combine."""
    return SoftmaxState(
        jnp.full((batch, heads), -jnp.inf, dtype),
        jnp.zeros((batch, heads, dv), dtype),
        jnp.zeros((batch, heads), dtype),
    )


def _rescale(m_old: Array, m_new: Array) -> Array:
    """``exp(m_old - m_new)``, and ``0`` for an empty summary (``m_old = -inf``), without
    evaluating ``-inf - -inf`` in the value or the gradient."""
    empty = m_old == -jnp.inf
    return jnp.where(empty, 0.0, jnp.exp(jnp.where(empty, 0.0, m_old - m_new)))


def softmax_scan_combine(earlier: SoftmaxState, later: SoftmaxState) -> SoftmaxState:
    """Merge the summaries of two consecutive stretches (associative, identity
    ``(-inf, 0, 0)``). Works on any leading shape: ``m`` and ``den`` ``[...]``, ``num``
    ``[..., dv]``."""
    m = jnp.maximum(earlier.m, later.m)
    w_earlier, w_later = _rescale(earlier.m, m), _rescale(later.m, m)
    return SoftmaxState(
        m,
        earlier.num * w_earlier[..., None] + later.num * w_later[..., None],
        earlier.den * w_earlier + later.den * w_later,
    )


def _combine_with_cuts(earlier, later):
    """Segmented combine over ``(summary, cut)`` pairs: a cut in ``later`` drops
    ``earlier``'s summary (its max becomes ``-inf``, its weight ``0``)."""
    (summary_a, cut_a), (summary_b, cut_b) = earlier, later
    dropped = summary_a._replace(m=jnp.where(cut_b, -jnp.inf, summary_a.m))
    return softmax_scan_combine(dropped, summary_b), cut_a | cut_b


def _tokens(
    scores: Float[Array, "batch time heads"], values: Float[Array, "batch time heads dv"]
) -> SoftmaxState:
    """One-token summaries ``(s_t, v_t, 1)``."""
    return SoftmaxState(scores, values, jnp.ones_like(scores))


def prefix_softmax_sequential(
    scores: Float[Array, "batch time heads"],
    values: Float[Array, "batch time heads dv"],
    cut: Bool[Array, "batch time"],
    initial_m: Float[Array, "batch heads"],
    initial_num: Float[Array, "batch heads dv"],
    initial_den: Float[Array, "batch heads"],
) -> tuple[Float[Array, "batch time heads dv"], SoftmaxState]:
    """``lax.scan`` that merges one token at a time into the running summary (oracle)."""

    def step(state, token):
        summary, cut_t = token
        state = state._replace(m=jnp.where(cut_t[:, None], -jnp.inf, state.m))
        state = softmax_scan_combine(state, summary)
        return state, state.num / state.den[..., None]

    tokens = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (_tokens(scores, values), cut))
    final, o = jax.lax.scan(step, SoftmaxState(initial_m, initial_num, initial_den), tokens)
    return jnp.swapaxes(o, 0, 1), final


def prefix_softmax_associative(
    scores: Float[Array, "batch time heads"],
    values: Float[Array, "batch time heads dv"],
    cut: Bool[Array, "batch time"],
    initial_m: Float[Array, "batch heads"],
    initial_num: Float[Array, "batch heads dv"],
    initial_den: Float[Array, "batch heads"],
) -> tuple[Float[Array, "batch time heads dv"], SoftmaxState]:
    """``lax.associative_scan`` of the segmented combine over time (``O(log T)`` depth)."""
    cut = jnp.broadcast_to(cut[:, :, None], scores.shape)
    tokens = _tokens(scores, values)
    first = jax.tree.map(lambda x: x[:, 0], tokens)
    initial = SoftmaxState(jnp.where(cut[:, 0], -jnp.inf, initial_m), initial_num, initial_den)
    first = softmax_scan_combine(initial, first)  # fold the initial state into token 0
    tokens = jax.tree.map(lambda x, x0: x.at[:, 0].set(x0), tokens, first)
    prefixes, _ = jax.lax.associative_scan(_combine_with_cuts, (tokens, cut), axis=1)
    final = jax.tree.map(lambda x: x[:, -1], prefixes)
    return prefixes.num / prefixes.den[..., None], final


def prefix_softmax_attention(
    scores: ArrayLike,
    values: ArrayLike,
    *,
    initial_state: SoftmaxState | tuple | None = None,
    segment_ids: ArrayLike | None = None,
    reset: ArrayLike | None = None,
    method: str = "auto",
) -> tuple[Array, SoftmaxState]:
    """Causal softmax-weighted averages of values for one query per head.

    ``o_t = sum_{i <= t} exp(s_i) v_i / sum_{i <= t} exp(s_i)``, computed from the
    stabilised ``(max, numerator, denominator)`` summaries of Feng et al. (2024),
    "Attention as an RNN" (see the module docstring). With a fixed query ``q`` and keys
    ``k_i``, ``s_i = q . k_i / sqrt(d)`` gives every prefix's softmax attention output.

    Args:
      scores: ``s [batch, time, heads]``.
      values: ``v [batch, time, heads, dv]``.
      initial_state: :class:`SoftmaxState` ``(m [batch, heads], num [batch, heads, dv],
        den [batch, heads])`` summarising earlier tokens (e.g. a previous call's final
        state); the empty summary ``(-inf, 0, 0)`` if ``None``.
      segment_ids: ``[batch, time]`` ints; the summary restarts where the id changes.
      reset: ``[batch, time]`` bool; ``True`` starts a new document (``reset[:, 0]`` also
        drops ``initial_state``). Pass at most one of ``segment_ids`` / ``reset``.
      method: ``"auto"`` (``"sequential"`` when lowered for CPU, ``"associative"``
        elsewhere; see :mod:`ssmjax.scan._dispatch`), ``"sequential"`` or ``"associative"``.

    Returns:
      ``(o, final_state)``: ``o [batch, time, heads, dv]`` in the promoted dtype of
      ``scores, values``; the :class:`SoftmaxState` after the last token, in at least
      float32.
    """
    _dispatch.check_method("prefix_softmax_attention", method)
    scores, values = jnp.asarray(scores), jnp.asarray(values)
    for name, x in (("scores", scores), ("values", values)):
        check_real_floating(name, x)
    check_ndim("scores", scores, 3, "[batch, time, heads]")
    batch, time, heads = scores.shape
    check_ndim("values", values, 4, "[batch, time, heads, dv]")
    dv = values.shape[-1]
    check_shape("values", values, (batch, time, heads, dv), "[batch, time, heads, dv]")
    dtypes = [scores.dtype, values.dtype]
    out_dtype = jnp.result_type(*dtypes)
    if initial_state is not None:
        if not (isinstance(initial_state, tuple) and len(initial_state) == 3):
            raise ValueError(
                "initial_state: expected a SoftmaxState (m [batch, heads], "
                "num [batch, heads, dv], den [batch, heads])"
            )
        initial_state = SoftmaxState(*(jnp.asarray(x) for x in initial_state))
        layouts = {
            "m": ((batch, heads), "[batch, heads]"),
            "num": ((batch, heads, dv), "[batch, heads, dv]"),
            "den": ((batch, heads), "[batch, heads]"),
        }
        for field, (shape, layout) in layouts.items():
            x = getattr(initial_state, field)
            check_real_floating(f"initial_state.{field}", x)
            check_shape(f"initial_state.{field}", x, shape, layout)
            dtypes.append(x.dtype)
    dtype = state_dtype(*dtypes)
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    reset = None if reset is None else jnp.asarray(reset)
    cut = carry_cut_mask(segment_ids, reset, batch, time, reverse=False)
    if cut is None:
        cut = jnp.zeros((batch, time), bool)
    if initial_state is None:
        initial_state = empty_softmax_state(batch, heads, dv, dtype)
    initial_state = SoftmaxState(*(x.astype(dtype) for x in initial_state))
    if time == 0:
        return jnp.zeros((batch, 0, heads, dv), out_dtype), initial_state
    scores, values = scores.astype(dtype), values.astype(dtype)

    def branch(resolved: str, platform: str):
        return prefix_softmax_sequential if resolved == "sequential" else prefix_softmax_associative

    case = _dispatch.case(out_dtype, time=time)
    choice = _dispatch.plan("prefix_softmax_attention", method, case)
    o, final = _dispatch.dispatch(choice, branch, scores, values, cut, *initial_state)
    return o.astype(out_dtype), final


# ----------------------------------------------------------------------------- quadratic
def attention_mask(
    time: int, window: int | None, segment_ids: Array | None
) -> Bool[Array, "#batch 1 time time"]:
    """``mask[b, 0, i, j]``: query ``i`` sees key ``j`` (``j <= i``, ``i - j < window``,
    same document)."""
    i, j = jnp.arange(time)[:, None], jnp.arange(time)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (i - j < window)
    mask = mask[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def causal_softmax_attention_core(
    q: Float[Array, "batch tq heads dk"],
    k: Float[Array, "batch tk heads dk"],
    v: Float[Array, "batch tk heads dv"],
    mask: Bool[Array, "#batch 1 tq tk"],
    scale: Float[Array, ""],
) -> Float[Array, "batch tq heads dv"]:
    """``softmax(scale q k^T, masked) v`` with the max subtracted per row, the softmax in at
    least float32 (float64 stays float64); every row must keep a visible key (its diagonal,
    or its own slot of a decode cache)."""
    logits = scale * jnp.einsum("bihd,bjhd->bhij", q, k)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1).astype(v.dtype)
    return jnp.einsum("bhij,bjhe->bihe", weights, v)


@_dispatch.sequence_parallel_route("causal_softmax_attention")
def causal_softmax_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    window: int | None = None,
    scale: float | ArrayLike | None = None,
    segment_ids: ArrayLike | None = None,
) -> Array:
    """Causal softmax attention ``o_i = sum_{j in N(i)} softmax_j(scale q_i . k_j) v_j``.

    The quadratic reference (Vaswani et al., 2017, "Attention Is All You Need") with
    ``N(i) = {j <= i}``, optionally restricted to a sliding window of the last ``window``
    keys including ``i`` itself (``i - window < j <= i``; Beltagy, Peters and Cohan, 2020,
    "Longformer") and to ``i``'s own document. Logits and softmax run in at least
    float32. ``jax.nn.dot_product_attention`` is not used because it requires
    ``dv == dk``.

    Args:
      q: queries ``[batch, time, heads, dk]``.
      k: keys ``[batch, time, heads, dk]``.
      v: values ``[batch, time, heads, dv]``.
      window: sliding-window length (``>= 1``) or ``None`` for full causal attention.
      scale: logit scale; ``dk ** -0.5`` if ``None``.
      segment_ids: ``[batch, time]`` ints; queries only see keys of the same id.

    Returns:
      ``o [batch, time, heads, dv]`` in the promoted dtype of ``q, k, v`` (no state: the
      "state" of softmax attention is the whole key/value cache).

    Under :func:`ssmjax.distributed.sequence_parallel` this is
    :func:`ssmjax.distributed.ring_attention` when ``window`` is ``None``, ``scale`` is a
    constant and ``time`` divides over the ``seq`` axis (unchanged otherwise; see
    :mod:`ssmjax.distributed.context`).
    """
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    batch, time, heads, dk, _ = check_multihead_qkv(q, k, v)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window: expected a positive int or None, got {window!r}")
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        check_shape("segment_ids", segment_ids, (batch, time), "[batch, time]")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype}")
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    dtype = state_dtype(q.dtype, k.dtype, v.dtype)
    scale = jnp.asarray(dk**-0.5 if scale is None else scale, dtype)
    if scale.ndim != 0:
        raise ValueError(f"scale: expected a scalar, got shape {tuple(scale.shape)}")
    mask = attention_mask(time, window, segment_ids)
    o = causal_softmax_attention_core(*(x.astype(dtype) for x in (q, k, v)), mask, scale)
    return o.astype(out_dtype)
