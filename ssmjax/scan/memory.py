"""Neural long-term memory: an MLP whose weights are trained by gradient descent at test time.

Titans (Behrouz, Zhong and Mirrokni, 2025, "Titans: Learning to Memorize at Test Time")
stores the past in the weights of a small MLP ``M`` (per head), trained online on the
associative loss of each token's key/value pair::

    l(M; k_t, v_t) = || M(k_t) - v_t ||^2
    S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; k_t, v_t)       (momentum, "surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t                               (weight decay, forgetting)
    y_t = M_t(q_t)                                                   (retrieval, no update)

with data-dependent learning rate ``theta_t >= 0``, momentum ``eta_t in [0, 1]`` and decay
``alpha_t in [0, 1]`` per head. ATLAS (Behrouz et al., 2025, "ATLAS: Learning to Optimally
Memorize the Context at Test Time") replaces the one-token loss by the Omega rule, the
loss over a sliding window of the last ``omega_window`` tokens,
``grad sum_{i = t - w + 1}^{t} l(M_{t-1}; k_i, v_i)`` (``omega_window = 1`` is Titans).

Chunk-parallel evaluation (Titans section 3.2, "mini-batch gradient descent"): the
sequence is cut into chunks of ``chunk_size`` tokens aligned to absolute positions
(``position % chunk_size == 0`` starts a chunk) and every gradient inside a chunk is taken
at the memory of the chunk start, ``M_{t'}``; the momentum and the decay are then two
linear recurrences over the tokens of the chunk (:func:`ssmjax.scan.linear.linear_scan`).
``chunk_size = 1`` is exact per-token gradient descent.

Because the recurrences are linear and every token's gradient is a sum of rank-one
outer products ``x_j^l (delta_j^l)^T`` (layer input times backpropagated error, at the
chunk-start memory), ``S_t`` and ``M_t`` inside a chunk are linear combinations of the
learned ``M_0``, the chunk-start offset ``D`` and momentum ``S`` and those outer products.
The recurrences therefore run on the ``C + 3`` coordinates of that combination rather than
on the weights, and the retrieval ``M_t(q_t)`` becomes an attention-like product over the
chunk's tokens (``(a_t . x_j^l) delta_j^l``): no per-token copy of the weights is ever
formed, so the cost per token is that of one forward and backward pass of the memory MLP
plus ``O(C)`` per layer width (the mini-batch "dual form" of TTT, Sun et al., 2024,
"Learning to (Learn at Test Time): RNNs with Expressive Hidden States"). Chunks follow
each other sequentially (a ``lax.scan`` whose body is rematerialised in the backward pass,
so only per-chunk states are stored). Measured (CPU, float32, fwd+bwd, b=8, t=1024, 4
heads of 32, 2-layer memory of width 64, chunk 16): ~0.6 s, against ~6 s for the same
recurrences run on per-token copies of the weights.

Not supported: packed sequences (``segment_ids`` / ``reset``); the mini-batch rule ties
gradients to chunk-aligned absolute positions, so documents would have to be chunk-aligned.

Representation. Weights are a tuple ``(W_1, ..., W_L)`` of ``[heads, d_in, d_out]``
arrays; ``M(x) = act(... act(x W_1) ...) W_L`` (no activation after the last layer, no
biases; ``L = 1`` is a linear memory). ``params0`` is the learned initial memory ``M_0``,
shared over the batch. The state holds offsets from it, ``D_t = M_t - M_0``, so the zero
state is the start of a sequence; the decay recurrence in those coordinates is
``D_t = (1 - alpha_t) D_{t-1} + S_t - alpha_t M_0``.

Any split of a sequence continues exactly: the state carries the memory, the momentum, the
chunk-start memory the pending gradients refer to (``anchor``), the last
``omega_window - 1`` keys/values and the absolute position, so a call that starts or ends
mid-chunk continues the same chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Float

from ssmjax.checks import check_multihead_qkv
from ssmjax.scan._checks import (
    check_chunk_size,
    check_ndim,
    check_real_floating,
    check_shape,
    state_dtype,
)
from ssmjax.scan.linear import linear_scan

Weights = tuple  # (W_1, ..., W_L), each [*lead, d_in, d_out]


class NeuralMemoryState(NamedTuple):
    """State of :func:`neural_memory` after ``position`` tokens.

    ``memory``, ``momentum``, ``anchor``: tuples shaped like the weights with a batch axis,
    ``[batch, heads, d_in, d_out]`` each: ``D_t = M_t - M_0``, ``S_t`` and the offset of
    the chunk-start memory that gradients of the current chunk are taken at.
    ``keys [batch, omega_window - 1, heads, dk]`` and ``values [batch, omega_window - 1,
    heads, dv]``: the last tokens of the Omega window. ``position``: int32 scalar, tokens
    seen (chunks are aligned to it).
    """

    memory: Weights
    momentum: Weights
    anchor: Weights
    keys: Array
    values: Array
    position: Array


def memory_mlp(weights: Weights, x: Array, activation: Callable = jax.nn.silu) -> Array:
    """``M(x)``: ``x [*lead, d_in]`` through ``W_l [*lead, d_l, d_{l+1}]`` (leading axes
    broadcast), ``activation`` between layers, none after the last."""
    for i, w in enumerate(weights):
        x = jnp.einsum("...i,...io->...o", x, w)
        if i < len(weights) - 1:
            x = activation(x)
    return x


def associative_loss(weights: Weights, k: Array, v: Array, activation: Callable = jax.nn.silu) -> Array:
    """``||M(k) - v||^2`` per token (summed over the value channels only)."""
    return jnp.sum((memory_mlp(weights, k, activation) - v) ** 2, axis=-1)


def init_neural_memory_state(
    params0: Weights, batch_size: int, omega_window: int = 1, dtype=jnp.float32
) -> NeuralMemoryState:
    """The state before the first token: ``M = M_0`` (zero offsets), no momentum, empty
    window, position 0. Depends on the shapes of ``params0`` only."""
    zeros = tuple(jnp.zeros((batch_size,) + tuple(w.shape), dtype) for w in params0)
    heads, dk, dv = params0[0].shape[0], params0[0].shape[1], params0[-1].shape[2]
    return NeuralMemoryState(
        memory=zeros,
        momentum=zeros,
        anchor=zeros,
        keys=jnp.zeros((batch_size, omega_window - 1, heads, dk), dtype),
        values=jnp.zeros((batch_size, omega_window - 1, heads, dv), dtype),
        position=jnp.zeros((), jnp.int32),
    )


# ----------------------------------------------------------------------------- one chunk
def _inputs_and_errors(
    weights: Weights, k: Float[Array, "batch tokens heads dk"], v: Float[Array, "batch tokens heads dv"],
    activation: Callable,
) -> tuple[list, list]:
    """Backpropagation of ``||M(k_j) - v_j||^2`` at ``weights`` (``[batch, heads, d_in,
    d_out]`` each) for every token: per layer ``l`` the layer input ``x_j^l`` and the error
    ``delta_j^l = d loss / d (x_j^l W_l)``, so that ``grad_{W_l} = x_j^l (delta_j^l)^T``."""
    inputs, pres, x = [], [], k
    for i, w in enumerate(weights):
        inputs.append(x)
        x = jnp.einsum("bjhi,bhio->bjho", x, w)
        if i < len(weights) - 1:
            pres.append(x)
            x = activation(x)
    errors = [2.0 * (x - v)]
    for i in reversed(range(1, len(weights))):
        _, act_vjp = jax.vjp(activation, pres[i - 1])
        errors.insert(0, act_vjp(jnp.einsum("bjho,bhio->bjhi", errors[0], weights[i]))[0])
    return inputs, errors


def _coefficients(
    momentum: Float[Array, "batch C heads"],
    lr: Float[Array, "batch C heads"],
    keep: Float[Array, "batch C heads"],
    real: Array,
) -> tuple[Float[Array, "batch C heads basis"], Float[Array, "batch C heads basis"]]:
    """Coordinates of ``D_t`` and ``S_t`` inside a chunk in the basis
    ``(M_0, D_0, S_0, G_1, ..., G_C)`` (``G_i``: token ``i``'s window gradient at the
    anchor): the momentum and decay recurrences run on these ``C + 3`` coordinates instead
    of on the weights (they are linear, so the two are the same computation)."""
    batch, chunk, heads = lr.shape
    basis = jnp.eye(chunk + 3, dtype=lr.dtype)
    start = lambda i: jnp.broadcast_to(basis[i], (batch, heads, chunk + 3))  # noqa: E731
    writes = -lr[..., None] * basis[3:][None, :, None, :]  # S_t += -theta_t G_t
    s, _ = linear_scan.single_device(momentum[..., None], writes, initial_state=start(2), method="sequential")
    forget = (1.0 - keep)[..., None] * basis[0]  # D_t += -alpha_t M_0
    d, _ = linear_scan.single_device(keep[..., None], jnp.where(real[None, :, None, None], s, 0.0) - forget,
                                     initial_state=start(1), method="sequential")
    return d, s


def _window_matrix(chunk: int, window: int, dtype) -> Array:
    """``[C, C + w - 1]``: chunk token ``i``'s Omega window covers extended tokens
    ``i .. i + w - 1`` (the extended tokens are the ``w - 1`` before the chunk, then it)."""
    i, j = jnp.arange(chunk)[:, None], jnp.arange(chunk + window - 1)[None, :]
    return ((j >= i) & (j < i + window)).astype(dtype)


def _combine(coef: Array, bases: tuple, inputs: Array, errors: Array) -> Array:
    """``sum_b coef_b base_b + sum_j coef_j x_j delta_j^T`` for the chunk-end weights
    (``coef [batch, heads, 3 + C + w - 1]`` over the bases and the extended tokens)."""
    out = sum(coef[:, :, i, None, None] * w for i, w in enumerate(bases))
    return out + jnp.einsum("bhj,bjhi,bjho->bhio", coef[:, :, 3:], inputs, errors)


class _Chunk(NamedTuple):
    """Per-chunk inputs of the scan (leading axis: chunk)."""

    k: Array  # [n, batch, C + w - 1, heads, dk]: the chunk and the w - 1 tokens before it
    v: Array  # [n, batch, C + w - 1, heads, dv]
    valid: Array  # [n, batch, C + w - 1]: which of those are real tokens
    q: Array  # [n, batch, C, heads, dk]
    lr: Array  # [n, batch, C, heads]
    momentum: Array  # [n, batch, C, heads]
    keep: Array  # [n, batch, C, heads]: 1 - decay
    real: Array  # [n, C]: real tokens (the others are no-ops)
    index: Array  # [n]


def _memory_chunks(
    params0: Weights,
    chunks: _Chunk,
    carry: tuple,
    window: int,
    chunk: int,
    activation: Callable,
    anchor_chunk: Array,
) -> tuple[Array, tuple]:
    """Scan over chunks. ``carry = (D, S, anchor, saved)`` (weight tuples ``[batch, heads,
    d_in, d_out]``); ``saved`` ends as the anchor of chunk ``anchor_chunk``.

    Per chunk, with ``x_j^l, delta_j^l`` the backpropagation of every token at the anchor
    and ``c_t`` the coordinates of :func:`_coefficients`, layer ``l`` of the retrieval
    ``M_t(q_t)`` is, for its input ``a_t``, ``(1 + c_t^M0) a_t M_0 + c_t^D0 a_t D_0 +
    c_t^S0 a_t S_0 + sum_j c_{tj} (a_t . x_j^l) delta_j^l``: an attention-like product over
    the chunk's tokens; per-token weights are never formed. The chunk-end ``D``, ``S`` are
    the same sums with the outer products ``x_j^l delta_j^l^T``.
    """
    base0 = tuple(w[None] for w in params0)  # [1, heads, d_in, d_out]

    @jax.checkpoint
    def body(carry, xs: _Chunk):
        memory, momentum, anchor, saved = carry
        saved = jax.tree.map(lambda a, s: jnp.where(xs.index == anchor_chunk, a, s), anchor, saved)
        at = tuple(w0 + a for w0, a in zip(base0, anchor))
        inputs, errors = _inputs_and_errors(at, xs.k, xs.v, activation)
        valid = xs.valid[:, :, None, None].astype(xs.q.dtype)
        errors = [e * valid for e in errors]
        d, s = _coefficients(xs.momentum, xs.lr, xs.keep, xs.real)
        to_tokens = _window_matrix(chunk, window, d.dtype)
        tokens = lambda c: jnp.concatenate([c[..., :3], c[..., 3:] @ to_tokens], -1)  # noqa: E731
        d, s = tokens(d), tokens(s)  # [batch, C, heads, 3 + C + w - 1]
        a = xs.q
        for i, (w0, dw, sw, x, e) in enumerate(zip(base0, memory, momentum, inputs, errors)):
            mix = lambda w: jnp.einsum("bthi,bhio->btho", a, jnp.broadcast_to(w, dw.shape))  # noqa: E731
            out = (1.0 + d[..., 0:1]) * mix(w0) + d[..., 1:2] * mix(dw) + d[..., 2:3] * mix(sw)
            scores = jnp.einsum("bthi,bjhi->bthj", a, x) * d[..., 3:]
            a = out + jnp.einsum("bthj,bjho->btho", scores, e)
            if i < len(params0) - 1:
                a = activation(a)
        bases = lambda w0, dw, sw: (jnp.broadcast_to(w0, dw.shape), dw, sw)  # noqa: E731
        d_end = tuple(_combine(d[:, -1], bases(*w), x, e)
                      for w, x, e in zip(zip(base0, memory, momentum), inputs, errors))
        s_end = tuple(_combine(s[:, -1], bases(*w), x, e)
                      for w, x, e in zip(zip(base0, memory, momentum), inputs, errors))
        return (d_end, s_end, d_end, saved), a

    carry, y = jax.lax.scan(body, carry, chunks)
    return y, carry


def _check_weights(params0: Weights, heads: int, dk: int, dv: int) -> tuple:
    if not isinstance(params0, (tuple, list)) or not params0:
        raise ValueError("params0: expected a non-empty tuple of weights [heads, d_in, d_out]")
    d_in = dk
    for i, w in enumerate(params0):
        w = jnp.asarray(w)
        check_real_floating(f"params0[{i}]", w)
        check_ndim(f"params0[{i}]", w, 3, "[heads, d_in, d_out]")
        d_out = dv if i == len(params0) - 1 else w.shape[2]
        check_shape(f"params0[{i}]", w, (heads, d_in, d_out), "[heads, d_in, d_out]")
        d_in = d_out
    return tuple(tuple(jnp.shape(w)[1:]) for w in params0)


def _check_state(state, params0: Weights, batch: int, window: int, heads: int, dk: int, dv: int):
    if not isinstance(state, NeuralMemoryState):
        raise ValueError("initial_state: expected a NeuralMemoryState")
    for field in ("memory", "momentum", "anchor"):
        ws = getattr(state, field)
        if len(ws) != len(params0):
            raise ValueError(f"initial_state.{field}: expected {len(params0)} weights, got {len(ws)}")
        for i, (w, w0) in enumerate(zip(ws, params0)):
            check_shape(f"initial_state.{field}[{i}]", jnp.asarray(w), (batch,) + tuple(jnp.shape(w0)),
                        "[batch, heads, d_in, d_out]")
    check_shape("initial_state.keys", jnp.asarray(state.keys), (batch, window - 1, heads, dk),
                "[batch, omega_window - 1, heads, dk]")
    check_shape("initial_state.values", jnp.asarray(state.values), (batch, window - 1, heads, dv),
                "[batch, omega_window - 1, heads, dv]")
    check_shape("initial_state.position", jnp.asarray(state.position), (), "[] (int32 scalar)")


def _place(x: Array, length: int, offset: Array, fill: float) -> Array:
    """``x [batch, T, ...]`` written at ``offset`` into ``[batch, length, ...]`` of ``fill``."""
    base = jnp.full((x.shape[0], length) + x.shape[2:], fill, x.dtype)
    return jax.lax.dynamic_update_slice_in_dim(base, x, offset, axis=1)


def neural_memory(
    params0: Weights,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    lr: ArrayLike,
    momentum: ArrayLike,
    decay: ArrayLike,
    *,
    chunk_size: int = 16,
    omega_window: int = 1,
    activation: Callable = jax.nn.silu,
    initial_state: NeuralMemoryState | None = None,
) -> tuple[Array, NeuralMemoryState]:
    """Titans / ATLAS neural memory over a sequence, chunk-parallel (module docstring).

    Args:
      params0: initial memory ``M_0``: tuple of weights ``[heads, d_in, d_out]``, the first
        with ``d_in = dk``, the last with ``d_out = dv``.
      q, k: queries and keys ``[batch, time, heads, dk]``.
      v: values ``[batch, time, heads, dv]``.
      lr: learning rate ``theta_t >= 0`` ``[batch, time, heads]``.
      momentum: ``eta_t in [0, 1]`` ``[batch, time, heads]``.
      decay: weight decay ``alpha_t in [0, 1]`` ``[batch, time, heads]``.
      chunk_size: tokens per mini-batch; gradients inside a chunk are taken at the
        chunk-start memory (``1``: exact per-token gradient descent). Any ``T`` works.
      omega_window: ATLAS Omega-rule window (``1`` = Titans).
      activation: nonlinearity between memory layers (static).
      initial_state: a :class:`NeuralMemoryState` (e.g. a previous call's final state);
        the start of a sequence (:func:`init_neural_memory_state`) if ``None``.

    Returns:
      ``(y, final_state)``: ``y_t = M_t(q_t)`` ``[batch, time, heads, dv]`` in the promoted
      input dtype; the state after the last token, in at least float32.
    """
    q, k, v, lr, momentum, decay = (jnp.asarray(x) for x in (q, k, v, lr, momentum, decay))
    batch, time, heads, dk, dv = check_multihead_qkv(q, k, v)
    for name, x in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        check_real_floating(name, x)
    for name, x in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        check_shape(name, x, (batch, time, heads), "[batch, time, heads]")
    chunk = check_chunk_size(chunk_size)
    if not isinstance(omega_window, int) or omega_window < 1:
        raise ValueError(f"omega_window: expected a positive int, got {omega_window!r}")
    _check_weights(params0, heads, dk, dv)
    dtype = state_dtype(q.dtype, k.dtype, v.dtype, *(jnp.asarray(w).dtype for w in params0))
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    aligned = initial_state is None
    if aligned:
        initial_state = init_neural_memory_state(params0, batch, omega_window, dtype)
    _check_state(initial_state, params0, batch, omega_window, heads, dk, dv)
    state = initial_state
    y, final = _neural_memory(
        tuple(jnp.asarray(w, dtype) for w in params0),
        *(x.astype(dtype) for x in (q, k, v, lr, momentum, decay)),
        jax.tree.map(lambda x: jnp.asarray(x, dtype), state._replace(position=0)),
        jnp.asarray(state.position, jnp.int32),
        chunk=chunk, window=omega_window, activation=activation, aligned=aligned,
    )
    return y.astype(out_dtype), final


@functools.partial(jax.jit, static_argnames=("chunk", "window", "activation", "aligned"))
def _neural_memory(
    params0: Weights,
    q: Float[Array, "batch time heads dk"],
    k: Float[Array, "batch time heads dk"],
    v: Float[Array, "batch time heads dv"],
    lr: Float[Array, "batch time heads"],
    momentum: Float[Array, "batch time heads"],
    decay: Float[Array, "batch time heads"],
    state: NeuralMemoryState,
    position: Array,
    *,
    chunk: int,
    window: int,
    activation: Callable,
    aligned: bool,
) -> tuple[Float[Array, "batch time heads dv"], NeuralMemoryState]:
    """Lay the tokens out on the absolute chunk grid, scan the chunks, read back.

    The real tokens sit at ``offset = position % chunk`` of a chunk-aligned buffer of
    ``n`` chunks; the slots around them are no-ops (``lr = 0``, ``momentum = 1``,
    ``decay = 0`` and no write of the momentum into the memory). The Omega window buffer
    prepends the ``window - 1`` remembered tokens, so chunk ``c`` reads its keys from
    ``[c C, c C + C + window - 1)``.
    """
    batch, time, heads, _ = q.shape
    offset = jnp.zeros((), jnp.int32) if aligned else position % chunk
    n = -(-time // chunk) if aligned else -(-(time + chunk - 1) // chunk)
    length = n * chunk

    q_l = _place(q, length, offset, 0.0)
    lr_l = _place(lr, length, offset, 0.0)
    momentum_l = _place(momentum, length, offset, 1.0)
    keep_l = _place(1.0 - decay, length, offset, 1.0)
    keys = jnp.concatenate([state.keys, k], axis=1)  # [batch, w - 1 + T, heads, dk]
    values = jnp.concatenate([state.values, v], axis=1)
    k_w = _place(keys, window - 1 + length, offset, 0.0)
    v_w = _place(values, window - 1 + length, offset, 0.0)
    absolute = position - offset - (window - 1) + jnp.arange(window - 1 + length)
    valid = (absolute >= 0) & (absolute >= position - (window - 1)) & (absolute < position + time)

    windows = chunk * jnp.arange(n)[:, None] + jnp.arange(chunk + window - 1)[None]  # [n, C + w - 1]
    by_chunk = lambda x: jnp.moveaxis(x.reshape((batch, n, chunk) + x.shape[2:]), 1, 0)  # noqa: E731
    chunks = _Chunk(
        k=jnp.moveaxis(k_w[:, windows], 1, 0),
        v=jnp.moveaxis(v_w[:, windows], 1, 0),
        valid=jnp.broadcast_to(valid[windows][:, None], (n, batch, chunk + window - 1)),
        q=by_chunk(q_l),
        lr=by_chunk(lr_l),
        momentum=by_chunk(momentum_l),
        keep=by_chunk(keep_l),
        real=valid[window - 1 :].reshape(n, chunk) & (absolute[window - 1 :] >= position).reshape(n, chunk),
        index=jnp.arange(n),
    )
    anchor_chunk = (offset + time) // chunk  # the chunk of the next token
    # A call that starts on a chunk boundary takes that chunk's gradients at the memory.
    anchor = jax.tree.map(lambda m, a: jnp.where(offset == 0, m, a), state.memory, state.anchor)
    carry = (tuple(state.memory), tuple(state.momentum), tuple(anchor), tuple(anchor))
    y, (d, s, anchor, saved) = _memory_chunks(params0, chunks, carry, window, chunk, activation, anchor_chunk)
    y = jnp.moveaxis(y, 0, 1).reshape((batch, length) + y.shape[3:])
    y = jax.lax.dynamic_slice_in_dim(y, offset, time, axis=1)
    anchor = jax.tree.map(lambda a, s: jnp.where(anchor_chunk == n, a, s), anchor, saved)
    final = NeuralMemoryState(
        memory=d,
        momentum=s,
        anchor=anchor,
        keys=keys[:, keys.shape[1] - (window - 1):],
        values=values[:, values.shape[1] - (window - 1):],
        position=position + time,
    )
    return y, final


__all__ = [
    "NeuralMemoryState",
    "associative_loss",
    "init_neural_memory_state",
    "memory_mlp",
    "neural_memory",
]
