"""The parts of the chunked attention ops (gated linear attention, the delta rule) that do
not depend on their transition: argument checks, the chunk-major layout, masked segment
sums of log-decays, the document masks of packed sequences, the state passing across
chunks, and the call of their Pallas kernels through the dispatch table.

Both ops carry a matrix state ``S_t [dk, dv]`` per batch row and head and evaluate it in
chunks of ``C`` tokens: quadratic inside a chunk, a recurrence over chunk boundaries.
They differ only in the transition of ``S`` (``diag(exp g_t)`` for GLA,
``exp(g_t) (I - beta_t k_t k_t^T)`` for the delta rule), which each module turns into
chunk-local terms (:class:`ChunkTerms`). Across chunks both are one recurrence
(:func:`pass_states`): per chunk, with ``S_in`` the state entering it::

    delta = U - W S_in
    S_out = a * S_in + K^T delta
    y     = A delta + Q S_in

(GLA: ``W = 0``, ``U = v``; the delta rule: its WY representation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Bool, Float

from ssmjax.scan import _dispatch
from ssmjax.checks import check_multihead_qkv
from ssmjax.scan._checks import (
    carry_cut_mask,
    check_chunk_size,
    check_real_floating,
    check_shape,
    pad_time,
    state_dtype,
    static_scale,
)


# ----------------------------------------------------------------------------- checks
class Op(NamedTuple):
    """What the shared checks and the dispatch need to know of a chunked-attention op."""

    name: str  # its entry in :data:`ssmjax.scan._dispatch.TABLE`
    block_sizes: type  # its kernels' tiling class
    operands: str  # the inputs whose promoted dtype is the output's (``"q, k, v"``)


class Dims(NamedTuple):
    batch: int
    time: int
    heads: int
    dk: int
    dv: int


def check_attention_inputs(q: Array, k: Array, v: Array, initial_state: Array | None) -> Dims:
    """``q, k [batch, time, heads, dk]``, ``v [batch, time, heads, dv]`` and
    ``initial_state [batch, heads, dk, dv]`` (or ``None``), all real floating."""
    batch, time, heads, dk, dv = check_multihead_qkv(q, k, v)
    if initial_state is not None:
        check_real_floating("initial_state", initial_state)
        check_shape("initial_state", initial_state, (batch, heads, dk, dv), "[batch, heads, dk, dv]")
    return Dims(batch, time, heads, dk, dv)


def check_inputs(
    op: Op, method: str, block_sizes, chunk_size: int, q, k, v, initial_state
) -> tuple[Array, Array, Array, Array | None, Dims]:
    """The checks both ops open with: ``method``, ``block_sizes``, ``chunk_size``, then
    ``q, k, v, initial_state`` (:func:`check_attention_inputs`), returned as arrays."""
    _dispatch.check_method(op.name, method)
    _dispatch.check_block_sizes(op.name, block_sizes, op.block_sizes)
    check_chunk_size(chunk_size)
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    initial_state = None if initial_state is None else jnp.asarray(initial_state)
    return q, k, v, initial_state, check_attention_inputs(q, k, v, initial_state)


def check_scalar_scale(scale) -> None:
    """``scale`` must be ``None`` or a scalar (``ValueError`` naming it otherwise)."""
    if scale is not None and jnp.ndim(scale) != 0:
        raise ValueError(f"scale: expected a scalar, got shape {tuple(jnp.shape(scale))}")


def initial_state_or_zeros(initial_state: Array | None, q: Array, v: Array, dtype) -> Array:
    """``initial_state`` in ``dtype``, or the zero state ``[batch, heads, dk, dv]``."""
    if initial_state is None:
        batch, _, heads, dk = q.shape
        return jnp.zeros((batch, heads, dk, v.shape[-1]), dtype)
    return initial_state.astype(dtype)


# ----------------------------------------------------------------------------- layout
def to_chunks(x: Array, chunk: int) -> Array:
    """``[batch, n*C, heads, ...]`` -> ``[n, batch, heads, C, ...]`` (chunk-major: the scan
    over chunks runs over the leading axis, batched products over the trailing two)."""
    b, t, h = x.shape[:3]
    x = x.reshape((b, t // chunk, chunk, h) + x.shape[3:])
    return jnp.moveaxis(x, (1, 3), (0, 2))


def from_chunks(x: Array) -> Array:
    """``[n, batch, heads, C, ...]`` -> ``[batch, n*C, heads, ...]``."""
    n, b, h, c = x.shape[:4]
    x = jnp.moveaxis(x, (0, 2), (1, 3))
    return x.reshape((b, n * c, h) + x.shape[4:])


# ----------------------------------------------------------------------------- log-decays
def masked_exp(x: Array, keep: Array | None) -> Array:
    """``exp(x)`` where ``keep`` (everywhere if ``None``), else ``0``; masked entries never
    reach ``exp``, so they cannot overflow or give NaN gradients."""
    if keep is None:
        return jnp.exp(x)
    zero = jnp.zeros((), x.dtype)
    return jnp.where(keep, jnp.exp(jnp.where(keep, x, zero)), zero)


def segment_sum(g: Float[Array, "*lead C"]) -> Float[Array, "*lead C C"]:
    """``out[..., i, j] = g_{j+1} + ... + g_i`` for ``j <= i`` (``0`` above the diagonal).

    The log of the decay from position ``j`` to position ``i``, summed from the terms
    between them, so it stays accurate when the cumulative sums themselves are large
    (``ssd_minimal``'s ``segsum``). Written as ``(M diag(g)) N`` with 0/1 masks
    ``M_il = [l <= i]``, ``N_lj = [l > j]``: a matmul is ~4x faster on XLA:CPU than a
    cumulative sum over ``[C, C]``; ``HIGHEST`` precision keeps it exact float32 on
    accelerators.
    """
    c = g.shape[-1]
    up_to_row = jnp.tril(jnp.ones((c, c), g.dtype))
    after_column = jnp.tril(jnp.ones((c, c), g.dtype), -1)
    highest = jax.lax.Precision.HIGHEST
    return jnp.matmul(up_to_row * g[..., None, :], after_column, precision=highest)


def suffix_sum(g: Float[Array, "*lead C d"]) -> Float[Array, "*lead C d"]:
    """``out[..., j, :] = g_{j+1} + ... + g_{C-1}`` (exclusive suffix sum over axis -2)."""
    return jax.lax.cumsum(g, axis=g.ndim - 2, reverse=True) - g


# ----------------------------------------------------------------------------- documents
class ChunkMasks(NamedTuple):
    """Which pairs and boundary terms survive the document cuts inside each chunk.

    ``pairs [.., C, C]``: ``j <= i`` and no cut in ``j+1..i``; ``reads_state [.., C, 1]``:
    no cut in ``0..i`` (position ``i`` sees the chunk's incoming state); ``feeds_state
    [.., C, 1]``: no cut in ``j+1..C-1`` (position ``j`` reaches the outgoing state);
    ``passes_state [.., 1]``: no cut in the chunk. ``None`` means "everywhere".
    """

    pairs: Array
    reads_state: Array | None
    feeds_state: Array | None
    passes_state: Array | None


def chunk_masks(cut: Bool[Array, "n batch 1 C"] | None, chunk: int) -> ChunkMasks:
    """The :class:`ChunkMasks` of chunk-major cuts (``None``: no packed sequences)."""
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    if cut is None:
        return ChunkMasks(causal, None, None, None)
    document = jnp.cumsum(cut.astype(jnp.int32), axis=-1)  # cuts up to and incl. i
    return ChunkMasks(
        pairs=causal & (document[..., :, None] == document[..., None, :]),
        reads_state=(document == 0)[..., None],
        feeds_state=(document == document[..., -1:])[..., None],
        passes_state=document[..., -1:] == 0,
    )


# ----------------------------------------------------------------------------- state passing
class ChunkTerms(NamedTuple):
    """The chunk-local operands of :func:`pass_states`, chunk-major ``[n, batch, heads, ...]``."""

    A: Float[Array, "n batch heads C C"]  # intra-chunk scores (masked, decayed)
    Q: Float[Array, "n batch heads C dk"]  # queries decayed from the chunk start
    K: Float[Array, "n batch heads C dk"]  # keys decayed to the chunk end
    a: Float[Array, "n batch heads #dk"]  # decay across the whole chunk, per head or key channel
    U: Float[Array, "n batch heads C dv"]  # what the chunk writes from a zero incoming state
    W: Float[Array, "n batch heads C dk"] | None  # how that depends on the incoming state (None: 0)


def _transposed(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def _linear_recurrence(
    a: Float[Array, "n batch heads #dk"],
    b: Float[Array, "n batch heads dk dv"],
    M: Float[Array, "n batch heads dk dk"] | None,
    initial: Float[Array, "batch heads dk dv"],
    reverse: bool = False,
) -> tuple[Float[Array, "batch heads dk dv"], Float[Array, "n batch heads dk dv"]]:
    """``S <- a_n * S + b_n - M_n S`` over the leading axis (a ``lax.scan``, backwards if
    ``reverse``; ``M = None``: elementwise only). Returns the last ``S`` and the ``S``
    entering each step."""

    def step(S, x):
        a_n, b_n, M_n = x
        S_next = a_n[..., None] * S + b_n
        return (S_next if M_n is None else S_next - M_n @ S), S

    return jax.lax.scan(step, initial, (a, b, M), reverse=reverse)


def _pass_states_forward(terms: ChunkTerms, initial_state):
    A, Q, K, a, U, W = terms
    written = jnp.einsum("...jd,...je->...de", K, U)  # K^T U [n, b, h, dk, dv]
    M = None if W is None else _transposed(K) @ W  # K^T W [n, b, h, dk, dk]
    final_state, S_in = _linear_recurrence(a, written, M, initial_state)
    delta = U if W is None else U - W @ S_in
    return (A @ delta + Q @ S_in, final_state), (S_in, M, delta)


@jax.custom_vjp
def pass_states(
    terms: ChunkTerms, initial_state: Float[Array, "batch heads dk dv"]
) -> tuple[Float[Array, "n batch heads C dv"], Float[Array, "batch heads dk dv"]]:
    """``(y, S_final)`` of the recurrence across chunks, from ``S_in = initial_state``::

        delta_n = U_n - W_n S_in
        S_out   = a_n * S_in + K_n^T delta_n     (S_in of chunk n + 1)
        y_n     = A_n delta_n + Q_n S_in

    a ``lax.scan`` over the ``n`` chunk-major leading axis of ``S_out = a_n * S_in +
    K_n^T U_n - (K_n^T W_n) S_in`` (elementwise only when ``W`` is ``None``), then ``delta``
    and ``y`` for all chunks at once.

    Custom VJP: the cotangent of the state runs backwards through the transposed
    recurrence, ``dS_in = a_n * dS_out + Q_n^T dy_n - W_n^T delta'_n`` with
    ``delta'_n = A_n^T dy_n + K_n dS_out`` (again ``a * dS + b_n - (W_n^T K_n) dS``), and
    every other cotangent is a batched matrix product (``dA = dy delta^T``,
    ``dQ = dy S_in^T``, ``dK = delta dS_out^T``, ``dU = delta'``,
    ``dW = -delta' S_in^T``, ``da = sum(dS_out * S_in)``); nothing but the chunk-entry
    states (and ``delta``, ``K^T W``) is stored.
    """
    return _pass_states_forward(terms, initial_state)[0]


def _pass_states_fwd(terms, initial_state):
    out, residuals = _pass_states_forward(terms, initial_state)
    return out, (terms, *residuals)


def _pass_states_bwd(residuals, cotangents):
    (A, Q, K, a, U, W), S_in, M, delta = residuals
    dy, d_final = cotangents
    dy_through_A = _transposed(A) @ dy  # [n, b, h, C, dv]
    read = jnp.einsum("...ci,...ce->...ie", Q, dy)  # Q^T dy [n, b, h, dk, dv]
    if W is not None:
        read = read - _transposed(W) @ dy_through_A
    M_T = None if M is None else _transposed(M)
    d_initial, dS_out = _linear_recurrence(a, read, M_T, d_final, reverse=True)
    d_delta = dy_through_A + K @ dS_out
    da = jnp.sum(dS_out * S_in, axis=-1)  # [n, b, h, dk]
    if a.shape[-1] == 1:
        da = jnp.sum(da, axis=-1, keepdims=True)
    dW = None if W is None else -(d_delta @ _transposed(S_in))
    dA = dy @ _transposed(delta)
    dQ = dy @ _transposed(S_in)
    dK = delta @ _transposed(dS_out)
    return ChunkTerms(dA, dQ, dK, da, d_delta, dW), d_initial


pass_states.defvjp(_pass_states_fwd, _pass_states_bwd)


def chunked(
    chunk_terms: Callable[..., ChunkTerms],
    arrays: Sequence[Float[Array, "batch time heads ..."]],
    cut: Bool[Array, "batch time"] | None,
    initial_state: Float[Array, "batch heads dk dv"],
    scale: Float[Array, ""],
    chunk_size: int,
) -> tuple[Float[Array, "batch time heads dv"], Float[Array, "batch heads dk dv"]]:
    """``(scale * y, S_final)`` of :func:`pass_states` over chunks of ``min(chunk_size,
    time)`` tokens, with ``chunk_terms(*chunk-major arrays, masks)`` the op's
    :class:`ChunkTerms` (``arrays``: ``q, k, ...``, padded with zeros to whole chunks).

    Padding keys are ``0`` and write nothing, and ``g = 0`` keeps the state: the final
    state is the one after the last real token. One transpose into the chunk-major
    ``[n, batch, heads, C, .]`` layout, one out.
    """
    time = arrays[0].shape[1]
    c = min(chunk_size, time)
    chunks = (to_chunks(pad_time(x, c), c) for x in arrays)
    masks = chunk_masks(None if cut is None else to_chunks(pad_time(cut, c)[:, :, None], c), c)
    y, final_state = pass_states(chunk_terms(*chunks, masks), initial_state)
    return scale * from_chunks(y)[:, :time], final_state


# ----------------------------------------------------------------------------- dispatch
class Plan(NamedTuple):
    """What the checks of one call settle for its evaluation."""

    out_dtype: jnp.dtype  # of the outputs: the promoted dtype of ``Op.operands``
    dtype: jnp.dtype  # of the arithmetic and the final state (at least float32)
    cut: Bool[Array, "batch time"] | None  # where packed documents start
    block_sizes: object  # the kernels' tiling (``None``: the per-target default)
    case: _dispatch.Case


def plan_call(
    op: Op,
    method: str,
    operands: Sequence[Array],
    others: Sequence[Array | None],
    decay: str,
    *,
    scale,
    segment_ids,
    reset,
    block_sizes,
    chunk_size: int,
) -> Plan:
    """The checks both ops close with (``scale``, ``segment_ids`` / ``reset``, the chunk of
    an explicit ``"pallas"``, the kernel's dtype for ``"pallas"``) and their :class:`Plan`.

    ``operands`` (``q, k, v, ...``) set the output dtype; they and the ``others`` given
    (``log_decay``, ``initial_state``) the state dtype. ``decay`` is the ``log_decay``
    kind, ``"none"``, ``"head"`` or ``"channel"``.
    """
    q = operands[0]
    batch, time, _, dk = q.shape
    out_dtype = jnp.result_type(*(x.dtype for x in operands))
    check_scalar_scale(scale)
    dtype = state_dtype(*(x.dtype for x in (*operands, *others) if x is not None))
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    reset = None if reset is None else jnp.asarray(reset)
    cut = carry_cut_mask(segment_ids, reset, batch, time, reverse=False)
    block_sizes = _dispatch.kernel_block_sizes(op.block_sizes, block_sizes, method, chunk_size)
    case = _dispatch.case(
        out_dtype, packed=cut is not None, time=time, head_dim=dk, decay=decay,
        chunk=None if block_sizes is None else block_sizes.chunk,
    )
    if method == "pallas":
        _dispatch.check_pallas(op.name, case, op.operands)
    return Plan(out_dtype, dtype, cut, block_sizes, case)


def kernel_options(scale: float, block_sizes, platform: str) -> dict:
    """Keyword arguments of the chunked-attention kernels for ``platform`` (``"cpu"``: the
    Pallas interpreter; GPUs compile them with Triton, TPUs with Mosaic)."""
    return dict(scale=scale, block_sizes=block_sizes, interpret=platform == "cpu", platform=platform)


def static_scale_of(q: Array, scale, dtype) -> tuple[Array, float]:
    """``(q, s)`` with ``s`` the kernels' static scale: ``scale`` as a float
    (``dk ** -0.5`` if ``None``), or, when ``scale`` is traced, ``1.0`` with ``scale``
    folded into the queries (differentiably)."""
    static = static_scale(scale, q.shape[-1] ** -0.5)
    if static is None:
        return q.astype(dtype) * jnp.asarray(scale, dtype), 1.0
    return q, static


def kernels_with_vjp(forward: Callable, backward: Callable) -> Callable:
    """``call(inputs, initial_state, scale, block_sizes, platform) -> (o, final_state)``.

    The Pallas forward kernel, ``forward(*inputs, initial_state, **options)``, behind a
    ``custom_vjp`` that runs the backward kernel, ``backward(*inputs, states, do, d_final,
    **options)``, on the chunk-entry states the forward saved. ``inputs`` (``q, k, v, ...``,
    ``None`` for an absent ``log_decay``) keep their dtypes and get gradients in them;
    ``scale`` is a static float, ``platform`` the lowering target.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
    def call(inputs, initial_state, scale, block_sizes, platform):
        options = kernel_options(scale, block_sizes, platform)
        o, final_state, _ = forward(*inputs, initial_state, save_states=False, **options)
        return o, final_state

    def call_fwd(inputs, initial_state, scale, block_sizes, platform):
        options = kernel_options(scale, block_sizes, platform)
        o, final_state, states = forward(*inputs, initial_state, **options)
        return (o, final_state), (inputs, initial_state, states)

    def call_bwd(scale, block_sizes, platform, residuals, cotangents):
        inputs, initial_state, states = residuals
        options = kernel_options(scale, block_sizes, platform)
        grads = backward(*inputs, states, *cotangents, **options)
        primals = (*inputs, initial_state)
        *d_inputs, d_initial = (
            None if x is None else dx.astype(x.dtype) for dx, x in zip(grads, primals)
        )
        return tuple(d_inputs), d_initial

    call.defvjp(call_fwd, call_bwd)
    return call


def run(
    op: Op,
    method: str,
    plan: Plan,
    scale,
    pallas: Callable,
    xla: Callable,
    inputs: Sequence[Array | None],
    initial_state: Array | None,
) -> tuple[Array, Array]:
    """``(o, final_state)`` of the method the dispatch table picks for the platform the
    program is lowered for; ``o`` in ``plan.out_dtype``, the final state in ``plan.dtype``
    on every branch (``time == 0``: no output, the initial state).

    ``inputs`` are ``q, k, v, ...`` (``None`` for an absent ``log_decay``). The Pallas
    branch calls ``pallas(inputs, s0, static scale, tiling, platform)``
    (:func:`kernels_with_vjp`) with the inputs in their own dtypes; the XLA branch calls
    ``xla(method, *inputs, cut, s0, scale)`` with everything in ``plan.dtype``.
    """
    q, v = inputs[0], inputs[2]
    batch, time, heads, dk = q.shape
    if time == 0:
        s0 = initial_state_or_zeros(initial_state, q, v, plan.dtype)
        return jnp.zeros((batch, 0, heads, v.shape[-1]), plan.out_dtype), s0

    def pallas_branch(platform, inputs, initial_state, cut):
        s0 = initial_state_or_zeros(initial_state, inputs[0], inputs[2], plan.dtype)
        q, static = static_scale_of(inputs[0], scale, plan.dtype)
        tiling = _dispatch.block_sizes_for(op.name, plan.block_sizes, platform)
        return pallas((q, *inputs[1:]), s0, static, tiling, platform)

    def xla_branch(resolved, inputs, initial_state, cut):
        s0 = initial_state_or_zeros(initial_state, inputs[0], inputs[2], plan.dtype)
        inputs = (None if x is None else x.astype(plan.dtype) for x in inputs)
        scale_array = jnp.asarray(dk**-0.5 if scale is None else scale, plan.dtype)
        return xla(resolved, *inputs, cut, s0, scale_array)

    def branch(resolved: str, platform: str):
        def evaluate(*arrays):
            if resolved == "pallas":
                o, final_state = pallas_branch(platform, *arrays)
            else:
                o, final_state = xla_branch(resolved, *arrays)
            return o.astype(plan.out_dtype), final_state.astype(plan.dtype)

        return evaluate

    choice = _dispatch.plan(op.name, method, plan.case)
    return _dispatch.dispatch(choice, branch, tuple(inputs), initial_state, plan.cut)
