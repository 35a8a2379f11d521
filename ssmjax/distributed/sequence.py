"""Sequence parallelism for linear recurrences: the time axis split over the devices of
one mesh axis, with one all-gather of O(state) per call.

Every op here has a state that evolves *linearly*: ``S_t = A_t S_{t-1} + B_t`` with a
transition ``A_t`` (a decay vector, a diagonal, or a dense matrix for the delta rule)
that does not depend on the state. Over one shard of ``T / n`` tokens the end state is
therefore an affine function of the state entering the shard,

    S_out(r) = M_r S_in(r) + E_r,     M_r = A_last ... A_first,   E_r = S_out(r) from S_in = 0,

so the recurrence across shards needs only the pairs ``(M_r, E_r)``, not the
activations (Li et al., 2023, "Sequence Parallelism: Long Sequence Training from System
Perspective", applied to scans as in LASP, Sun et al., 2024, "Linear Attention Sequence
Parallelism"). Each device

1. runs its shard from a zero state (the op's own fast method) for ``E_r``, and forms
   ``M_r`` from its transitions (for the delta rule: the op run on zero values from the
   identity state);
2. all-gathers the ``(M, E)`` pairs of every shard: ONE collective of O(state) bytes per
   device, independent of ``T`` (folding all the pairs also gives every device the final
   state, so no other collective is needed);
3. folds the pairs of the shards before it into its incoming state
   ``S_in(r) = M_{r-1} S_in(r-1) + E_{r-1}`` (``S_in(0)`` is ``initial_state``);
4. reruns its shard from ``S_in(r)`` for the outputs.

Gradients are JAX's transpose of the same program (the all-gather's transpose is a
reduce-scatter), through each op's own custom VJP. Packed documents (``segment_ids`` or
``reset``): a shard whose first token starts a document drops its incoming state, as the
single-device op does at that position; with ``segment_ids`` each device learns the
previous shard's last id by a ``ppermute`` of one id per row. The cost is two
passes of the op per shard (steps 1 and 4) plus the transition summary; the memory and
the communication are O(T / n) and O(n * state) per device.

The short causal convolution (:func:`causal_conv1d_sp`) needs no recurrence: each device
takes the ``k - 1`` inputs before its shard from the previous device (one ``ppermute``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jax.sharding import Mesh, PartitionSpec as P
from jax.typing import ArrayLike

from ssmjax.checks import check_ndim, check_shape
from ssmjax.scan import delta_rule, gated_linear_attention, linear_scan, selective_scan
from ssmjax.scan.conv import causal_conv1d, document_index, last_inputs
from ssmjax.scan.gla import check_log_decay


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"axis: {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    return mesh.shape[axis]


def _check_length(name: str, x: Array, mesh: Mesh, axis: str) -> int:
    n = _axis_size(mesh, axis)
    if x.shape[1] % n:
        raise ValueError(f"{name}: time length {x.shape[1]} must be divisible by the {n} devices of mesh axis "
                         f"{axis!r}")
    return n


def _documents(segment_ids, reset, batch: int, time: int) -> tuple[Array | None, bool]:
    """``(array, is_ids)``: the packed-document argument given (checked), and whether it is
    ``segment_ids`` (ints) rather than ``reset`` (bool)."""
    if segment_ids is not None and reset is not None:
        raise ValueError("segment_ids and reset: pass at most one of them")
    given, name = (segment_ids, "segment_ids") if segment_ids is not None else (reset, "reset")
    if given is None:
        return None, False
    given = jnp.asarray(given)
    kind_ok = jnp.issubdtype(given.dtype, jnp.integer) if name == "segment_ids" else given.dtype == jnp.bool_
    if given.shape != (batch, time) or not kind_ok:
        expected = "ints" if name == "segment_ids" else "bool"
        raise ValueError(f"{name}: expected {expected} [batch, time] = {[batch, time]}, got "
                         f"{given.dtype}{list(given.shape)}")
    return given, name == "segment_ids"


def _local_reset(documents: Array | None, is_ids: bool, axis: str, n: int) -> Array | None:
    """This shard's ``reset`` mask. From ``segment_ids``, a document starts at the shard's
    first token when its id differs from the previous shard's last one, which arrives by a
    ``ppermute`` of one id per row (the only other communication)."""
    if documents is None or not is_ids:
        return documents
    previous_last = jax.lax.ppermute(documents[:, -1], axis, [(i, i + 1) for i in range(n - 1)])
    first = (documents[:, 0] != previous_last) & (jax.lax.axis_index(axis) > 0)
    return jnp.concatenate([first[:, None], documents[:, 1:] != documents[:, :-1]], axis=1)


def _fold_incoming(pairs: Array, initial: Array, apply: Callable[[Array, Array], Array], index: Array,
                   reverse: bool) -> Array:
    """The state entering shard ``index``: ``S <- M_i S + E_i`` over the shards before it in
    scan order (after it when ``reverse``), starting from ``initial``. ``pairs`` holds
    ``(M_i, E_i)`` of every shard along axis 0 (a short, static number of shards)."""
    n = pairs[0].shape[0]
    order = range(n - 1, -1, -1) if reverse else range(n)
    state = initial
    for i in order:  # n is the mesh axis size: small and static
        before = (i > index) if reverse else (i < index)
        state = jnp.where(before, apply(pairs[0][i], state) + pairs[1][i], state)
    return state


def _sequence_parallel(local_op: Callable, summary: Callable, apply: Callable, args: tuple, specs: tuple,
                       initial_state: Array, state_spec: P, mesh: Mesh, axis: str, reverse: bool,
                       documents: tuple[Array | None, bool], batch_axes: Any) -> tuple[Array, Array]:
    """The four steps of the module docstring over ``shard_map``. ``local_op(*args,
    initial_state, reset) -> (outputs, final_state)`` on one shard, ``summary(*args, reset)
    -> M`` its transition, ``apply(M, S)`` the transition applied to a state."""
    n = mesh.shape[axis]

    documents, is_ids = documents

    def shard(initial, documents, *local):
        index = jax.lax.axis_index(axis)
        reset = _local_reset(documents, is_ids, axis, n)
        _, end_from_zero = local_op(*local, initial_state=jnp.zeros_like(initial), reset=reset)
        transition = summary(*local, reset=reset)
        if reverse and reset is not None:
            # The document starting at this shard's first token cuts the flow into the shard before it.
            keep = ~reset[:, 0].reshape((-1,) + (1,) * (initial.ndim - 1))
            transition, end_from_zero = transition * keep, end_from_zero * keep
        # One all-gather: both halves of every shard's pair in one flat buffer.
        flat = jnp.concatenate([transition.reshape(-1), end_from_zero.reshape(-1).astype(transition.dtype)])
        gathered = jax.lax.all_gather(flat, axis)  # [n, |M| + |E|]
        split = transition.size
        pairs = (gathered[:, :split].reshape((n,) + transition.shape),
                 gathered[:, split:].reshape((n,) + end_from_zero.shape).astype(end_from_zero.dtype))
        incoming = _fold_incoming(pairs, initial, apply, index, reverse)
        outputs, _ = local_op(*local, initial_state=incoming, reset=reset)
        # The op's final state, the last shard's in scan order: every device folds all pairs.
        final = _fold_incoming(pairs, initial, apply, jnp.asarray(-1 if reverse else n), reverse)
        return outputs, final

    time_spec = P(batch_axes, axis)  # outputs and reset: [batch, time, ...] sharded like the inputs
    fn = jax.shard_map(shard, mesh=mesh, in_specs=(state_spec, time_spec, *specs), out_specs=(time_spec, state_spec),
                       check_vma=False)
    return fn(initial_state, documents, *args)


def _time_spec(ndim: int, batch_axes: Any, axis: str) -> P:
    return P(batch_axes, axis, *([None] * (ndim - 2)))


def _decays_over_time(a: Array, shape: tuple) -> Array:
    """``a`` with a time axis to shard: kept when it is ``shape`` or ``shape`` with a batch
    of 1 (decays shared over the batch), else broadcast to ``shape`` (a constant ``[d]``, a
    ``[1, 1, d]``, ...); ``ValueError`` naming ``a`` when it does not broadcast."""
    if a.ndim == len(shape) and a.shape[1:] == shape[1:] and a.shape[0] in (1, shape[0]):
        return a
    try:
        return jnp.broadcast_to(a, shape)
    except ValueError:
        raise ValueError(f"a: expected decays broadcastable to b.shape {list(shape)}, got {list(a.shape)}") from None


def linear_scan_sp(a: ArrayLike, b: ArrayLike, *, mesh: Mesh, axis: str = "seq", batch_axes: Any = None,
                   initial_state: ArrayLike | None = None, reverse: bool = False,
                   segment_ids: ArrayLike | None = None, reset: ArrayLike | None = None,
                   method: str = "auto", chunk_size: int | None = None, block_sizes: Any = None
                   ) -> tuple[Array, Array]:
    """:func:`ssmjax.scan.linear_scan` (``h_t = a_t h_{t-1} + b_t``) with time sharded over
    mesh ``axis`` (batch over ``batch_axes``); see the module docstring. ``a`` is
    broadcastable to ``b`` as for the single-device op (a batch dimension of 1 stays
    unbroadcast); ``method``, ``chunk_size`` and ``block_sizes`` go to the op on each shard."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    check_ndim("b", b, b.ndim if b.ndim >= 2 else 2, "[batch, time, ...]")
    a = _decays_over_time(a, b.shape)
    _check_length("b", b, mesh, axis)
    batch, time = b.shape[:2]
    state_dtype = jnp.result_type(a.dtype, b.dtype)
    initial = (jnp.zeros((batch,) + b.shape[2:], state_dtype) if initial_state is None
               else jnp.asarray(initial_state, state_dtype))
    documents = _documents(segment_ids, reset, batch, time)
    a_spec = _time_spec(a.ndim, batch_axes if a.shape[0] == batch else None, axis)
    b_spec = _time_spec(b.ndim, batch_axes, axis)
    state_spec = P(batch_axes, *([None] * (b.ndim - 2)))

    options = dict(reverse=reverse, method=method, chunk_size=chunk_size, block_sizes=block_sizes)

    def local_op(a, b, *, initial_state, reset):
        return linear_scan(a, b, initial_state=initial_state, reset=reset, **options)

    def summary(a, b, *, reset):
        ones = jnp.ones((b.shape[0],) + b.shape[2:], state_dtype)
        return linear_scan(a, jnp.zeros(b.shape, state_dtype), initial_state=ones, reset=reset, **options)[1]

    return _sequence_parallel(local_op, summary, jnp.multiply, (a, b), (a_spec, b_spec), initial, state_spec,
                              mesh, axis, reverse, documents, batch_axes)


def _decay_total(log_decay: Array | None, reset: Array | None, state_shape: tuple, dtype) -> Array:
    """``exp(sum_t g_t)`` per row and head (and key channel), 0 in rows whose shard holds a
    document start (the state entering the shard does not survive it)."""
    if log_decay is None:
        total = jnp.ones(state_shape, dtype)
    else:
        total = jnp.exp(jnp.sum(log_decay.astype(dtype), axis=1))
        total = jnp.broadcast_to(total if total.ndim == len(state_shape) else total[..., None], state_shape)
    if reset is not None:
        total = total * ~jnp.any(reset, axis=1).reshape((-1,) + (1,) * (len(state_shape) - 1))
    return total


def _decays_per_token(log_decay: Array, q_shape: tuple) -> Array:
    """``log_decay`` broadcast to ``[batch, time, heads]`` (3 axes: per head) or ``[batch,
    time, heads, dk]`` (4 axes: per key channel), so that its time axis can be sharded
    (RetNet's constant ``[1, 1, heads]``, say); the GLA op's ``ValueError`` naming
    ``log_decay`` for any other shape."""
    check_log_decay(log_decay, *q_shape)
    return jnp.broadcast_to(log_decay, q_shape[:log_decay.ndim])


def _attention_inputs(timed: tuple, log_decay, initial_state, segment_ids, reset, mesh: Mesh, axis: str,
                      batch_axes: Any) -> tuple[tuple, tuple, Array, tuple[Array | None, bool]]:
    """The checked ``(args, their specs, initial state, documents)`` of a linear-attention
    op: ``timed`` = ``(q, k, v, ...)`` ``[batch, time, heads, ...]`` (+ ``log_decay``), the
    state ``[batch, heads, dk, dv]`` (zeros by default) in at least float32."""
    timed = tuple(jnp.asarray(x) for x in timed)
    q, v = timed[0], timed[2]
    check_ndim("q", q, 4, "[batch, time, heads, dk]")
    _check_length("q", q, mesh, axis)
    batch, time, heads, dk = q.shape
    state_dtype = jnp.result_type(jnp.float32, q.dtype)
    initial = (jnp.zeros((batch, heads, dk, v.shape[-1]), state_dtype) if initial_state is None
               else jnp.asarray(initial_state, state_dtype))
    args = timed if log_decay is None else (*timed, _decays_per_token(jnp.asarray(log_decay), q.shape))
    specs = tuple(_time_spec(x.ndim, batch_axes, axis) for x in args)
    return args, specs, initial, _documents(segment_ids, reset, batch, time)


def gated_linear_attention_sp(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, mesh: Mesh, axis: str = "seq",
                              batch_axes: Any = None, log_decay: ArrayLike | None = None,
                              scale: float | None = None, initial_state: ArrayLike | None = None,
                              segment_ids: ArrayLike | None = None, reset: ArrayLike | None = None,
                              chunk_size: int = 64, method: str = "auto", block_sizes: Any = None
                              ) -> tuple[Array, Array]:
    """:func:`ssmjax.scan.gated_linear_attention` (``S_t = diag(exp g_t) S_{t-1} + k_t
    v_t^T``) with time sharded over mesh ``axis``. The transition of a shard is the
    diagonal ``exp(sum_t g_t)`` (per head, or per key channel). ``log_decay`` may be any
    shape the single-device op accepts (it is broadcast to ``[batch, time, ...]``)."""
    args, specs, initial, documents = _attention_inputs((q, k, v), log_decay, initial_state, segment_ids, reset,
                                                        mesh, axis, batch_axes)
    heads, dk = args[0].shape[2:]
    state_dtype = initial.dtype

    def local_op(q, k, v, g=None, *, initial_state, reset):
        return gated_linear_attention(q, k, v, log_decay=g, scale=scale, initial_state=initial_state, reset=reset,
                                      chunk_size=chunk_size, method=method, block_sizes=block_sizes)

    def summary(q, k, v, g=None, *, reset):
        return _decay_total(g, reset, (q.shape[0], heads, dk), state_dtype)

    return _sequence_parallel(local_op, summary, lambda m, s: m[..., None] * s, args, specs, initial,
                              P(batch_axes), mesh, axis, False, documents, batch_axes)


def delta_rule_sp(q: ArrayLike, k: ArrayLike, v: ArrayLike, beta: ArrayLike, *, mesh: Mesh, axis: str = "seq",
                  batch_axes: Any = None, log_decay: ArrayLike | None = None, scale: float | None = None,
                  initial_state: ArrayLike | None = None, segment_ids: ArrayLike | None = None,
                  reset: ArrayLike | None = None, chunk_size: int = 64, method: str = "auto",
                  block_sizes: Any = None) -> tuple[Array, Array]:
    """:func:`ssmjax.scan.delta_rule` (``S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} +
    beta_t k_t v_t^T``) with time sharded over mesh ``axis``. The transition of a shard
    is the dense ``[dk, dk]`` product of its ``exp(g_t)(I - beta_t k_t k_t^T)``, formed by
    the op itself run on zero values from the identity state (O(dk^2) per head to send)."""
    args, specs, initial, documents = _attention_inputs((q, k, v, beta), log_decay, initial_state, segment_ids,
                                                        reset, mesh, axis, batch_axes)
    heads, dk = args[0].shape[2:]
    state_dtype = initial.dtype

    def local_op(q, k, v, beta, g=None, *, initial_state, reset):
        return delta_rule(q, k, v, beta, log_decay=g, scale=scale, initial_state=initial_state, reset=reset,
                          chunk_size=chunk_size, method=method, block_sizes=block_sizes)

    def summary(q, k, v, beta, g=None, *, reset):
        identity = jnp.broadcast_to(jnp.eye(dk, dtype=state_dtype), (q.shape[0], heads, dk, dk))
        zeros = jnp.zeros(k.shape, v.dtype)
        return delta_rule(q, k, zeros, beta, log_decay=g, initial_state=identity, reset=reset,
                          chunk_size=chunk_size, method=method, block_sizes=block_sizes)[1]

    return _sequence_parallel(local_op, summary, lambda m, s: jnp.einsum("bhij,bhjv->bhiv", m, s), args, specs,
                              initial, P(batch_axes), mesh, axis, False, documents, batch_axes)


def selective_scan_sp(u: ArrayLike, delta: ArrayLike, A: ArrayLike, B: ArrayLike, C: ArrayLike, *, mesh: Mesh,
                      axis: str = "seq", batch_axes: Any = None, D: ArrayLike | None = None,
                      z: ArrayLike | None = None, delta_bias: ArrayLike | None = None,
                      delta_softplus: bool = False, initial_state: ArrayLike | None = None,
                      segment_ids: ArrayLike | None = None, reset: ArrayLike | None = None,
                      method: str = "auto", chunk_size: int | None = None, block_sizes: Any = None
                      ) -> tuple[Array, Array]:
    """:func:`ssmjax.scan.selective_scan` (Mamba: ``h_t = exp(delta_t A) h_{t-1} + delta_t
    B_t u_t``) with time sharded over mesh ``axis``. The transition of a shard is
    ``exp(A sum_t delta_t)`` per channel and state."""
    u, delta, A, B, C = (jnp.asarray(x) for x in (u, delta, A, B, C))
    check_ndim("u", u, 3, "[batch, time, d]")
    _check_length("u", u, mesh, axis)
    batch, time, d = u.shape
    n = A.shape[-1]
    state_dtype = jnp.result_type(jnp.float32, u.dtype)
    initial = (jnp.zeros((batch, d, n), state_dtype) if initial_state is None
               else jnp.asarray(initial_state, state_dtype))
    documents = _documents(segment_ids, reset, batch, time)
    timed = (u, delta, B, C) if z is None else (u, delta, B, C, jnp.asarray(z))
    specs = tuple(_time_spec(x.ndim, batch_axes, axis) for x in timed)
    bias = None if delta_bias is None else jnp.asarray(delta_bias)

    def step_sizes(delta):
        delta = delta if bias is None else delta + bias
        return jax.nn.softplus(delta) if delta_softplus else delta

    def local_op(u, delta, B, C, z=None, *, initial_state, reset):
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                              initial_state=initial_state, reset=reset, method=method, chunk_size=chunk_size,
                              block_sizes=block_sizes)

    def summary(u, delta, B, C, z=None, *, reset):
        total = jnp.exp(jnp.sum(step_sizes(delta).astype(state_dtype), axis=1)[..., None] * A.astype(state_dtype))
        if reset is not None:
            total = total * ~jnp.any(reset, axis=1)[:, None, None]
        return total

    return _sequence_parallel(local_op, summary, jnp.multiply, timed, specs, initial, P(batch_axes), mesh, axis,
                              False, documents, batch_axes)


def causal_conv1d_sp(x: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None, *, mesh: Mesh,
                     axis: str = "seq", batch_axes: Any = None, initial_state: ArrayLike | None = None,
                     segment_ids: ArrayLike | None = None, reset: ArrayLike | None = None) -> tuple[Array, Array]:
    """:func:`ssmjax.scan.conv.causal_conv1d` (``y_t = bias + sum_j w_j x_{t-k+1+j}``) with
    time sharded over mesh ``axis``: a halo exchange instead of a recurrence. Each device
    sends its last ``k - 1`` inputs (zeroed where they belong to an earlier document than
    its last token: the op's own ``final_state``) to the next device with one ``ppermute``,
    and convolves its shard from them (device 0 from ``initial_state``); with
    ``segment_ids`` one more ``ppermute`` of an id per row marks a document starting at a
    shard's first token. The backward is the transposed program: the halo's gradient goes
    back with one ``ppermute``, the gradients of ``weight`` and ``bias`` are summed over
    the devices. Each shard needs at least ``k - 1`` tokens.

    Returns ``(y [batch, time, channels], final_state [batch, k - 1, channels])`` as the
    single-device op does.
    """
    x, weight = jnp.asarray(x), jnp.asarray(weight)
    check_ndim("x", x, 3, "[batch, time, channels]")
    check_ndim("weight", weight, 2, "[k, channels]")
    n = _check_length("x", x, mesh, axis)
    batch, time, channels = x.shape
    halo = weight.shape[0] - 1
    if not 1 <= halo <= time // n:
        raise ValueError(f"weight: expected 2 to {time // n + 1} taps (each of the {n} shards of {time} tokens "
                         f"takes k - 1 inputs from the previous one), got {weight.shape[0]}")
    history = (jnp.zeros((batch, halo, channels), x.dtype) if initial_state is None
               else jnp.asarray(initial_state, x.dtype))
    check_shape("initial_state", history, (batch, halo, channels), "[batch, k - 1, channels]")
    documents, is_ids = _documents(segment_ids, reset, batch, time)

    def shard(x, history, documents, weight, bias):
        reset = _local_reset(documents, is_ids, axis, n)
        doc = document_index(reset, *x.shape[:2])
        tail = last_inputs(x, jnp.zeros_like(history), doc)  # shard length >= k - 1: all from x
        previous = jax.lax.ppermute(tail, axis, [(i, i + 1) for i in range(n - 1)])
        history = jnp.where(jax.lax.axis_index(axis) == 0, history, previous)
        return causal_conv1d(x, weight, bias, initial_state=history, reset=reset)

    x_spec = P(batch_axes, axis, None)
    fn = jax.shard_map(shard, mesh=mesh, in_specs=(x_spec, P(batch_axes, None, None), P(batch_axes, axis), P(), P()),
                       out_specs=(x_spec, x_spec), check_vma=False)
    y, finals = fn(x, history, documents, weight, None if bias is None else jnp.asarray(bias))
    return y, finals[:, finals.shape[1] - halo:]  # every shard's final state: the last one's is the op's
