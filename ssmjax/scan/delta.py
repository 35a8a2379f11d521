"""The delta rule (DeltaNet) and the gated delta rule (Gated DeltaNet).

Per batch row and head, with a matrix state ``S_t [dk, dv]``::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

DeltaNet (Schlag, Irie and Schmidhuber, 2021; Yang, Wang, Zhang, Shen and Kim, 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length") is the case
``g_t = 0``; Gated DeltaNet (Yang, Kautz and Hatamizadeh, 2025, "Gated Delta Networks:
Improving Mamba2 with Delta Rule") adds the per-head scalar log-decay ``g_t <= 0``. Read
as an online regression step: the state is first decayed, then the value it predicts for
``k_t`` is moved a fraction ``beta_t`` towards ``v_t``, and the output reads the *updated*
state (the convention of flash-linear-attention's naive recurrent references). Keys and
queries are used as given: normalising them (DeltaNet uses L2-normalised keys, which keeps
``I - beta k k^T`` a contraction for ``beta in [0, 2]``) is the caller's job.

Evaluations (``method=``):

* ``"sequential"``: ``lax.scan`` over tokens, written from the equation; the oracle.
* ``"chunked"``: the WY / UT-transform form of Yang et al. (2024). Inside a chunk of ``C``
  tokens with chunk-local cumulative log-decays ``G_i = g_1 + ... + g_i`` and
  ``D_ij = exp(G_i - G_j)`` (``j <= i``), the written values
  ``delta_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i)`` (so that
  ``S_i = exp(g_i) S_{i-1} + k_i delta_i^T``) solve the unit lower-triangular system::

      (I + A) delta = diag(beta) V - diag(beta exp(G)) K S_0,
      A_ij = beta_i D_ij k_i . k_j   (j < i),

  i.e. ``delta = U - W S_0`` with ``U = T V``, ``W = T diag(exp G) K`` and
  ``T = (I + A)^{-1} diag(beta)``, found by inverting
  ``I + A`` with ``log2(C)`` rounds of block matrix multiplies (no token loop). Then, with
  matrix multiplies only::

      O     = scale * (diag(exp G) Q S_0 + (Q K^T * D) delta)
      S_C   = exp(G_C) S_0 + (diag(D_{C,:}) K)^T delta

  The chunk-to-chunk recurrence ``S_C = (exp(G_C) I - K_C^T W) S_0 + K_C^T U`` runs as a
  ``lax.scan`` over the ``T / C`` chunks; the outputs are formed afterwards for all chunks
  at once. ``O(T C (dk + dv) + T dk dv)`` work, ``T / C`` sequential steps.
* ``"pallas"``: the kernels of :mod:`pallas_kernels.chunked_delta` behind a
  ``custom_vjp``: the same WY / UT chunked form, one program per (batch, head, value
  block) looping over the chunks with the ``[dk, dv]`` state in registers (``T`` by
  forward substitution); the forward stores the chunk-entry states and the backward
  kernel walks the chunks in reverse carrying ``dS``, recomputing each chunk's WY
  representation. Inputs keep their dtype (computed in float32). ``chunk_size`` (a power
  of two) is the kernel's chunk; no packed sequences (``ValueError``). Compiled on GPUs
  (Triton lowering), interpreted on CPU (slow: for tests), no TPU kernel.
* ``"auto"``: ``"pallas"`` on GPUs without packed sequences (kernel chunk 32), otherwise
  ``"chunked"``. On XLA:CPU at ``(b, t, h, d) = (2, 2048, 4, 64)`` float32
  its forward + backward is several times faster than differentiating the token scan and
  needs ~8x less temporary memory (the scan's autodiff stores every ``[dk, dv]`` state);
  the forward alone is ~2x slower than ``"sequential"`` there, so pick ``"sequential"``
  explicitly for CPU inference.

Numerics: all arithmetic runs in at least float32 (``state_dtype``). Decays are never
formed as products: ``G_i - G_j`` is computed as a masked segment sum
``g_{j+1} + ... + g_i`` (not as a difference of two large cumulative sums, which would
lose the small differences that matter), and only non-positive sums (for ``g <= 0``) are
exponentiated; entries above the diagonal are masked *before* ``exp``. So ``g`` down to
``-20`` per step over ``16k`` tokens gives no ``inf``/``NaN`` in values or gradients.

Packed sequences: ``segment_ids`` / ``reset`` cut the state (``carry_cut_mask``). A cut
at position ``t`` acts as ``exp(g_t) = 0``: the sequential form zeroes the decay; the
chunked form masks ``D_ij`` to pairs in the same document (no cut in ``j+1..i``), masks
the ``S_0`` terms to positions before the chunk's first cut, and the carried state to
positions after its last cut, so cuts may fall anywhere inside a chunk.

Gradients are JAX autodiff through either form (``lax.scan`` and the block inverse
have exact VJPs); they include ``beta``, ``log_decay`` and ``initial_state``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Bool, Float

from pallas_kernels import chunked_delta as kernels
from ssmjax.scan._checks import (
    carry_cut_mask,
    check_chunk_size,
    check_method,
    check_ndim,
    check_pallas_chunked_attention,
    check_real_floating,
    check_shape,
    expand_mask,
    pad_time,
    pallas_interpret,
    state_dtype,
    static_scale,
)

DELTA_METHODS = ("auto", "sequential", "chunked", "pallas")


# ----------------------------------------------------------------------------- sequential
def _delta_rule_sequential(
    q: Float[Array, "batch time heads dk"],
    k: Float[Array, "batch time heads dk"],
    v: Float[Array, "batch time heads dv"],
    beta: Float[Array, "batch time heads"],
    log_decay: Float[Array, "batch time heads"],
    cut: Bool[Array, "batch time"] | None,
    initial_state: Float[Array, "batch heads dk dv"],
    scale: Float[Array, ""],
) -> tuple[Float[Array, "batch time heads dv"], Float[Array, "batch heads dk dv"]]:
    """Token-by-token ``lax.scan`` of ``S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``.

    ``a_t = exp(g_t)``, or ``0`` where ``cut`` starts a new document. The oracle.
    """
    decay = jnp.exp(log_decay)
    if cut is not None:
        decay = jnp.where(expand_mask(cut, decay.ndim), jnp.zeros((), decay.dtype), decay)

    def step(S, token):
        q_t, k_t, v_t, beta_t, a_t = token  # [b, h, dk], [b, h, dk], [b, h, dv], [b, h], [b, h]
        a_t, beta_t = a_t[..., None, None], beta_t[..., None, None]
        k_S = jnp.einsum("bhk,bhkv->bhv", k_t, S)  # k_t^T S_{t-1}
        S = a_t * (S - beta_t * k_t[..., :, None] * k_S[..., None, :])  # exp(g)(I - b k k^T) S
        S = S + beta_t * k_t[..., :, None] * v_t[..., None, :]
        return S, scale * jnp.einsum("bhkv,bhk->bhv", S, q_t)

    tokens = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (q, k, v, beta, decay))
    final_state, o = jax.lax.scan(step, initial_state, tokens)
    return jnp.swapaxes(o, 0, 1), final_state


# ----------------------------------------------------------------------------- chunked
def _chunks(x: Array, n_chunks: int, chunk: int) -> Array:
    """``[batch, n*C, heads, ...]`` -> ``[batch, heads, n, C, ...]``."""
    x = x.reshape((x.shape[0], n_chunks, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 3, 1)


def _unchunk(x: Array) -> Array:
    """``[batch, heads, n, C, ...]`` -> ``[batch, n*C, heads, ...]``."""
    x = jnp.moveaxis(x, 1, 3)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _segment_sum(g: Float[Array, "*lead C"]) -> Float[Array, "*lead C C"]:
    """``out[..., i, j] = g_{j+1} + ... + g_i`` for ``j <= i`` (``0`` above the diagonal).

    Summing only the terms between ``j`` and ``i`` keeps the small differences of
    cumulative log-decays exact even when the cumulative sums themselves are huge. Written
    as ``(M diag(g)) N`` with 0/1 masks ``M_il = [l <= i]``, ``N_lj = [l > j]``: a matmul is
    ~4x faster on XLA:CPU than a cumulative sum over ``[C, C]``; ``HIGHEST`` precision keeps
    it exact float32 on accelerators.
    """
    c = g.shape[-1]
    up_to_row = jnp.tril(jnp.ones((c, c), g.dtype))
    after_column = jnp.tril(jnp.ones((c, c), g.dtype), -1)
    highest = jax.lax.Precision.HIGHEST
    return jnp.matmul(up_to_row * g[..., None, :], after_column, precision=highest)


def _masked_exp(x: Array, keep: Array) -> Array:
    """``exp(x)`` where ``keep``, else ``0``; masked entries never reach ``exp`` (no inf/NaN)."""
    zero = jnp.zeros((), x.dtype)
    return jnp.where(keep, jnp.exp(jnp.where(keep, x, zero)), zero)


def _intra_chunk_decays(
    g: Float[Array, "*lead C"], cut: Bool[Array, "*lead C"]
) -> tuple[Float[Array, "*lead C C"], Float[Array, "*lead C"]]:
    """``D [.., C, C]``: decay from ``j`` to ``i`` (``j <= i``, same document, else ``0``);
    ``decay_in [.., C]``: decay from the chunk's incoming state to ``i`` (``0`` after a cut).
    """
    c = g.shape[-1]
    document = jnp.cumsum(cut.astype(jnp.int32), axis=-1)  # how many cuts up to and incl. i
    causal = jnp.tril(jnp.ones((c, c), bool))
    same_document = document[..., :, None] == document[..., None, :]
    D = _masked_exp(_segment_sum(g), causal & same_document)
    decay_in = _masked_exp(jnp.cumsum(g, axis=-1), document == 0)
    return D, decay_in


def _diagonal_blocks(x: Array, size: int, row: int, col: int) -> Array:
    """Sub-blocks ``(row, col)`` (each 0 or 1) of the ``2 size``-wide diagonal blocks of ``x``.

    ``x [..., P, P]`` -> ``[..., P / (2 size), size, size]``.
    """
    m = x.shape[-1] // (2 * size)
    x = x.reshape(x.shape[:-2] + (m, 2, size, m, 2, size))[..., :, row, :, :, col, :]
    return jnp.moveaxis(jnp.diagonal(x, axis1=-4, axis2=-2), -1, -3)


def _unit_lower_inverse(L: Float[Array, "*lead C C"]) -> Float[Array, "*lead C C"]:
    """Inverse of a unit lower-triangular matrix by recursive block doubling.

    ``[[L11, 0], [L21, L22]]^{-1} = [[X1, 0], [-X2 L21 X1, X2]]`` with ``X1 = L11^{-1}``,
    ``X2 = L22^{-1}``: ``log2(C)`` rounds of batched matrix multiplies, each combining
    exact inverses of the diagonal blocks (so no Neumann-series cancellation). Used instead
    of ``solve_triangular``, which XLA:CPU runs ~500x slower than matmuls at ``C = 64``.
    """
    c = L.shape[-1]
    p = 1 << (c - 1).bit_length()  # pad to a power of two with an identity block
    if p != c:
        pad = [(0, 0)] * (L.ndim - 2) + [(0, p - c), (0, p - c)]
        L = jnp.pad(L, pad) + jnp.diag(jnp.arange(p) >= c).astype(L.dtype)
    inverse = jnp.ones(L.shape[:-2] + (p, 1, 1), L.dtype)  # inverses of the 1x1 blocks
    size = 1
    while size < p:
        X1, X2 = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        lower_left = -(X2 @ _diagonal_blocks(L, size, 1, 0) @ X1)
        upper = jnp.concatenate([X1, jnp.zeros_like(X1)], axis=-1)
        lower = jnp.concatenate([lower_left, X2], axis=-1)
        inverse = jnp.concatenate([upper, lower], axis=-2)
        size *= 2
    return inverse[..., 0, :c, :c]


def _wy_representation(
    k: Float[Array, "*lead C dk"],
    v: Float[Array, "*lead C dv"],
    beta: Float[Array, "*lead C"],
    D: Float[Array, "*lead C C"],
    decay_in: Float[Array, "*lead C"],
) -> tuple[Float[Array, "*lead C dk"], Float[Array, "*lead C dv"]]:
    """``W = T diag(exp G) K`` and ``U = T V`` with ``T = (I + A)^{-1} diag(beta)``.

    ``A = strictly_lower(diag(beta) (K K^T * D))``.
    """
    c = k.shape[-2]
    A = beta[..., :, None] * jnp.einsum("...ik,...jk->...ij", k, k) * D
    inverse = _unit_lower_inverse(jnp.tril(A, -1) + jnp.eye(c, dtype=A.dtype))
    W = inverse @ ((beta * decay_in)[..., None] * k)
    U = inverse @ (beta[..., None] * v)
    return W, U


def _delta_rule_chunked(
    q: Float[Array, "batch time heads dk"],
    k: Float[Array, "batch time heads dk"],
    v: Float[Array, "batch time heads dv"],
    beta: Float[Array, "batch time heads"],
    log_decay: Float[Array, "batch time heads"],
    cut: Bool[Array, "batch time"] | None,
    initial_state: Float[Array, "batch heads dk dv"],
    scale: Float[Array, ""],
    chunk_size: int,
) -> tuple[Float[Array, "batch time heads dv"], Float[Array, "batch heads dk dv"]]:
    """WY-representation chunked delta rule (see the module docstring for the algebra)."""
    batch, time, heads, _ = q.shape
    c = min(chunk_size, time)
    if cut is None:
        cut = jnp.zeros((batch, time), bool)
    cut = jnp.broadcast_to(cut[:, :, None], (batch, time, heads))
    # Padding: beta = 0 writes nothing and g = 0 keeps the state, so the final state is
    # the one after the last real token.
    q, k, v, beta, log_decay, cut = (pad_time(x, c) for x in (q, k, v, beta, log_decay, cut))
    n_chunks = q.shape[1] // c
    q, k, v, beta, g, cut = (_chunks(x, n_chunks, c) for x in (q, k, v, beta, log_decay, cut))

    D, decay_in = _intra_chunk_decays(g, cut)  # [b, h, n, C, C], [b, h, n, C]
    W, U = _wy_representation(k, v, beta, D, decay_in)
    k_to_end = D[..., -1, :, None] * k  # keys decayed to the chunk's last position
    decay_through = decay_in[..., -1]  # whole-chunk decay of the incoming state

    def across_chunks(S, chunk):  # S [b, h, dk, dv]: state entering the chunk
        W_n, U_n, k_n, a_n = chunk
        delta = U_n - W_n @ S
        return a_n[..., None, None] * S + jnp.swapaxes(k_n, -1, -2) @ delta, S

    per_chunk = jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0), (W, U, k_to_end, decay_through))
    final_state, S_in = jax.lax.scan(across_chunks, initial_state, per_chunk)
    S_in = jnp.moveaxis(S_in, 0, 2)  # [b, h, n, dk, dv]

    delta = U - W @ S_in
    scores = jnp.einsum("...ik,...jk->...ij", q, k) * D
    o = scale * ((decay_in[..., None] * q) @ S_in + scores @ delta)
    return _unchunk(o)[:, :time], final_state


# ----------------------------------------------------------------------------- pallas
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def delta_rule_pallas(
    q: Float[Array, "batch time heads dk"],
    k: Float[Array, "batch time heads dk"],
    v: Float[Array, "batch time heads dv"],
    beta: Float[Array, "batch time heads"],
    log_decay: Float[Array, "batch time heads"] | None,
    initial_state: Float[Array, "batch heads dk dv"],
    scale: float,
    block_sizes: kernels.BlockSizes,
) -> tuple[Float[Array, "batch time heads dv"], Float[Array, "batch heads dk dv"]]:
    """The Pallas forward kernel; its ``custom_vjp`` runs the backward kernel on the
    chunk-entry states the forward saved (inputs in their own dtypes, ``scale`` static)."""
    o, final_state, _ = kernels.chunked_delta_forward(
        q, k, v, beta, log_decay, initial_state, scale=scale, block_sizes=block_sizes,
        save_states=False, interpret=pallas_interpret(),
    )
    return o, final_state


def _delta_rule_pallas_fwd(q, k, v, beta, log_decay, initial_state, scale, block_sizes):
    o, final_state, states = kernels.chunked_delta_forward(
        q, k, v, beta, log_decay, initial_state, scale=scale, block_sizes=block_sizes,
        interpret=pallas_interpret(),
    )
    return (o, final_state), (q, k, v, beta, log_decay, initial_state, states)


def _delta_rule_pallas_bwd(scale, block_sizes, residuals, cotangents):
    *primals, states = residuals
    q, k, v, beta, log_decay, _ = primals
    do, d_final = cotangents
    grads = kernels.chunked_delta_backward(
        q, k, v, beta, log_decay, states, do, d_final, scale=scale,
        block_sizes=block_sizes, interpret=pallas_interpret(),
    )
    return tuple(None if x is None else dx.astype(x.dtype) for dx, x in zip(grads, primals))


delta_rule_pallas.defvjp(_delta_rule_pallas_fwd, _delta_rule_pallas_bwd)


def _resolve(method: str, cut: Array | None) -> str:
    if method != "auto":
        return method
    return "pallas" if cut is None and jax.default_backend() == "gpu" else "chunked"


# ----------------------------------------------------------------------------- public API
def delta_rule(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    beta: ArrayLike,
    *,
    log_decay: ArrayLike | None = None,
    scale: float | ArrayLike | None = None,
    initial_state: ArrayLike | None = None,
    segment_ids: ArrayLike | None = None,
    reset: ArrayLike | None = None,
    chunk_size: int = 64,
    method: str = "auto",
) -> tuple[Array, Array]:
    """Delta rule / gated delta rule over ``[batch, time, heads, dim]`` sequences.

    ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` and
    ``o_t = scale * S_t^T q_t`` per batch row and head (DeltaNet: Yang et al. 2024,
    "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"; Gated
    DeltaNet: Yang, Kautz and Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2
    with Delta Rule"). Matches flash-linear-attention's naive recurrent
    ``delta_rule`` / ``gated_delta_rule`` references: decay, then the delta update, then
    the read-out of the updated state; ``q`` and ``k`` are *not* normalised here.

    Args:
      q: queries ``[batch, time, heads, dk]``.
      k: keys ``[batch, time, heads, dk]`` (normalise them yourself, e.g. L2).
      v: values ``[batch, time, heads, dv]``.
      beta: writing strengths ``[batch, time, heads]`` (typically ``sigmoid(.)``).
      log_decay: ``g [batch, time, heads]``, log of the per-head state decay, finite and
        ``<= 0`` (use ``reset`` / ``segment_ids`` for a hard cut, not ``-inf``); ``None``
        for plain DeltaNet (``g = 0``).
      scale: output scale; ``dk ** -0.5`` if ``None``.
      initial_state: ``S_{-1} [batch, heads, dk, dv]``; zeros if ``None``.
      segment_ids: ``[batch, time]`` ints; the state restarts where the id changes.
      reset: ``[batch, time]`` bool; ``True`` starts a new document (``reset[:, 0]`` also
        drops ``initial_state``). Pass at most one of ``segment_ids`` / ``reset``.
      chunk_size: tokens per chunk for ``"chunked"``; any ``time`` works (padded). For
        ``"pallas"`` the kernel's chunk, a power of two (``"auto"`` picking the kernel
        uses the kernel's default instead).
      method: ``"auto"``, ``"sequential"``, ``"chunked"`` or ``"pallas"`` (see the module
        docstring).

    Returns:
      ``(o, final_state)``: ``o [batch, time, heads, dv]`` in the promoted dtype of
      ``q, k, v, beta``; ``final_state [batch, heads, dk, dv]`` in at least float32.
    """
    check_method(method, DELTA_METHODS)
    check_chunk_size(chunk_size)
    q, k, v, beta = (jnp.asarray(x) for x in (q, k, v, beta))
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        check_real_floating(name, x)
    check_ndim("q", q, 4, "[batch, time, heads, dk]")
    batch, time, heads, dk = q.shape
    check_shape("k", k, q.shape, "[batch, time, heads, dk]")
    check_ndim("v", v, 4, "[batch, time, heads, dv]")
    dv = v.shape[-1]
    check_shape("v", v, (batch, time, heads, dv), "[batch, time, heads, dv]")
    check_shape("beta", beta, (batch, time, heads), "[batch, time, heads]")
    dtypes = [q.dtype, k.dtype, v.dtype, beta.dtype]
    out_dtype = jnp.result_type(*dtypes)
    if log_decay is not None:
        log_decay = jnp.asarray(log_decay)
        check_real_floating("log_decay", log_decay)
        check_shape("log_decay", log_decay, (batch, time, heads), "[batch, time, heads]")
        dtypes.append(log_decay.dtype)
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
        check_real_floating("initial_state", initial_state)
        check_shape(
            "initial_state", initial_state, (batch, heads, dk, dv), "[batch, heads, dk, dv]"
        )
        dtypes.append(initial_state.dtype)
    dtype = state_dtype(*dtypes)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
    if reset is not None:
        reset = jnp.asarray(reset)
    cut = carry_cut_mask(segment_ids, reset, batch, time, reverse=False)
    resolved = _resolve(method, cut)
    if resolved == "pallas":
        chunk = chunk_size if method == "pallas" else None
        check_pallas_chunked_attention("delta_rule", cut, chunk)
        if jnp.ndim(scale) != 0:
            raise ValueError(f"scale: expected a scalar, got shape {tuple(jnp.shape(scale))}")
        if time > 0:
            o, final_state = _delta_rule_pallas_call(
                q, k, v, beta, log_decay, initial_state, scale, dtype, chunk
            )
            return o.astype(out_dtype), final_state

    q, k, v, beta = (x.astype(dtype) for x in (q, k, v, beta))
    g = jnp.zeros((batch, time, heads), dtype) if log_decay is None else log_decay.astype(dtype)
    s0 = (
        jnp.zeros((batch, heads, dk, dv), dtype)
        if initial_state is None
        else initial_state.astype(dtype)
    )
    scale = jnp.asarray(dk**-0.5 if scale is None else scale, dtype)
    if scale.ndim != 0:
        raise ValueError(f"scale: expected a scalar, got shape {tuple(scale.shape)}")
    if time == 0:
        return jnp.zeros((batch, 0, heads, dv), out_dtype), s0
    if method == "sequential":
        o, final_state = _delta_rule_sequential(q, k, v, beta, g, cut, s0, scale)
    else:
        o, final_state = _delta_rule_chunked(q, k, v, beta, g, cut, s0, scale, chunk_size)
    return o.astype(out_dtype), final_state


def _delta_rule_pallas_call(q, k, v, beta, log_decay, initial_state, scale, dtype, chunk_size):
    """``method="pallas"`` after the argument checks: inputs keep their dtypes."""
    batch, _, heads, dk = q.shape
    dv = v.shape[-1]
    s0 = (
        jnp.zeros((batch, heads, dk, dv), dtype)
        if initial_state is None
        else initial_state.astype(dtype)
    )
    static = static_scale(scale, dk**-0.5)
    if static is None:  # a traced scale: fold it into the queries (differentiably)
        q, static = q.astype(dtype) * jnp.asarray(scale, dtype), 1.0
    block_sizes = kernels.BlockSizes(chunk=chunk_size)
    return delta_rule_pallas(q, k, v, beta, log_decay, s0, static, block_sizes)
