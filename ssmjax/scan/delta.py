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

  The chunk-to-chunk recurrence ``S_C = (exp(G_C) I - K_C^T W) S_0 + K_C^T U`` (with
  ``K_C = diag(D_{C,:}) K``) runs as a ``lax.scan`` over the ``T / C`` chunks; the outputs
  are formed afterwards for all chunks at once (:func:`ssmjax.scan._chunked.pass_states`,
  shared with gated linear attention). ``O(T C (dk + dv) + T dk dv)`` work, ``T / C``
  sequential steps.
* ``"pallas"``: the kernels of :mod:`pallas_kernels.chunked_delta` behind a
  ``custom_vjp``: the same WY / UT chunked form, one program per (batch, head, value
  block) looping over the chunks with the ``[dk, dv]`` state in registers (``T`` by
  forward substitution); the forward stores the chunk-entry states and the backward
  kernel walks the chunks in reverse carrying ``dS``, recomputing each chunk's WY
  representation. Inputs keep their dtype (computed in float32). ``chunk_size`` (a power
  of two) is the kernel's chunk; no packed sequences (``ValueError``). Compiled on GPUs
  (Triton lowering) and TPUs (Mosaic: :mod:`pallas_kernels.chunked_delta_tpu`, float32 /
  bfloat16 inputs), interpreted on CPU (slow: for tests).
* ``"auto"``: ``"pallas"`` on a platform where :data:`ssmjax.scan._dispatch.TABLE` lists
  the kernel as proven for the dtype and head dim (never for packed sequences; the
  platform is the one the program is lowered for, the kernel runs with its per-target
  default ``block_sizes``), otherwise ``"chunked"``. On XLA:CPU at ``(b, t, h, d) = (2, 2048, 4, 64)`` float32
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

Gradients include ``beta``, ``log_decay`` and ``initial_state``. The sequential form is
differentiated by JAX. The chunked form splits into chunk-local terms (the WY
representation; plain autodiff, the block inverse has an exact VJP) and the state passing
across chunks, whose custom VJP runs the state cotangent backwards through the transposed
recurrence, ``dS_{n-1} = (exp(G_C) I - W^T K_C)_n dS_n`` plus chunk ``n``'s output terms,
so the backward stores only the chunk-boundary states.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Bool, Float

from pallas_kernels import chunked_delta as kernels
from pallas_kernels.chunked_delta import BlockSizes as DeltaBlockSizes
from ssmjax.scan import _chunked, _dispatch
from ssmjax.scan._checks import check_real_floating, check_shape, expand_mask

DELTA_METHODS = _dispatch.TABLE["delta_rule"].methods
_OP = _chunked.Op("delta_rule", DeltaBlockSizes, "q, k, v, beta")


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
def _intra_chunk_decays(
    g: Float[Array, "*lead C"], masks: _chunked.ChunkMasks
) -> tuple[Float[Array, "*lead C C"], Float[Array, "*lead C"]]:
    """``D [.., C, C]``: decay from ``j`` to ``i`` (``j <= i``, same document, else ``0``);
    ``decay_in [.., C]``: decay from the chunk's incoming state to ``i`` (``0`` after a cut).
    """
    D = _chunked.masked_exp(_chunked.segment_sum(g), masks.pairs)
    reads_state = None if masks.reads_state is None else masks.reads_state[..., 0]
    decay_in = _chunked.masked_exp(jnp.cumsum(g, axis=-1), reads_state)
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


def _chunk_terms(
    q: Float[Array, "n batch heads C dk"],
    k: Float[Array, "n batch heads C dk"],
    v: Float[Array, "n batch heads C dv"],
    beta: Float[Array, "n batch heads C"],
    g: Float[Array, "n batch heads C"],
    masks: _chunked.ChunkMasks,
) -> _chunked.ChunkTerms:
    """Everything that involves one chunk only (plain autodiff differentiates it): the
    written values ``delta = U - W S_0`` (:func:`_wy_representation`), the scores
    ``Q K^T * D``, the queries decayed from the chunk start, the keys decayed to its last
    position and the decay of the incoming state across the whole chunk."""
    D, decay_in = _intra_chunk_decays(g, masks)  # [n, b, h, C, C], [n, b, h, C]
    W, U = _wy_representation(k, v, beta, D, decay_in)
    scores = jnp.einsum("...ik,...jk->...ij", q, k) * D
    q_from_start = decay_in[..., None] * q
    k_to_end = D[..., -1, :, None] * k
    through = decay_in[..., -1:]  # [n, b, h, 1]
    return _chunked.ChunkTerms(scores, q_from_start, k_to_end, through, U, W)


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
    """WY-representation chunked delta rule (see the module docstring for the algebra):
    :func:`ssmjax.scan._chunked.chunked` of :func:`_chunk_terms`."""
    arrays = (q, k, v, beta, log_decay)
    return _chunked.chunked(_chunk_terms, arrays, cut, initial_state, scale, chunk_size)


# ----------------------------------------------------------------------------- pallas
#: The Pallas forward kernel; its ``custom_vjp`` runs the backward kernel on the
#: chunk-entry states the forward saved: ``delta_rule_pallas((q, k, v, beta, log_decay),
#: s0, scale, block_sizes, platform)`` (``log_decay``: ``None`` or per head).
delta_rule_pallas = _chunked.kernels_with_vjp(
    kernels.chunked_delta_forward, kernels.chunked_delta_backward
)


# ----------------------------------------------------------------------------- public API
@_dispatch.sequence_parallel_route("delta_rule")
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
    block_sizes: DeltaBlockSizes | None = None,
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
        ``"pallas"`` without ``block_sizes``, the kernel's chunk, a power of two.
      method: ``"auto"``, ``"sequential"``, ``"chunked"`` or ``"pallas"`` (see the module
        docstring).
      block_sizes: the kernels' tiling (:class:`DeltaBlockSizes`) wherever the Pallas
        kernel runs (``"pallas"``, or ``"auto"`` picking it); ``None``: the per-target
        default.

    Returns:
      ``(o, final_state)``: ``o [batch, time, heads, dv]`` in the promoted dtype of
      ``q, k, v, beta``; ``final_state [batch, heads, dk, dv]`` in at least float32.

    Under :func:`ssmjax.distributed.sequence_parallel` this is
    :func:`ssmjax.distributed.delta_rule_sp` when ``time`` divides over the ``seq`` axis
    (unchanged otherwise; see :mod:`ssmjax.distributed.context`).
    """
    q, k, v, initial_state, dims = _chunked.check_inputs(
        _OP, method, block_sizes, chunk_size, q, k, v, initial_state
    )
    beta = jnp.asarray(beta)
    check_real_floating("beta", beta)
    check_shape("beta", beta, dims[:3], "[batch, time, heads]")
    if log_decay is not None:
        log_decay = jnp.asarray(log_decay)
        check_real_floating("log_decay", log_decay)
        check_shape("log_decay", log_decay, dims[:3], "[batch, time, heads]")
    plan = _chunked.plan_call(
        _OP, method, (q, k, v, beta), (log_decay, initial_state),
        "none" if log_decay is None else "head", scale=scale, segment_ids=segment_ids,
        reset=reset, block_sizes=block_sizes, chunk_size=chunk_size,
    )
    xla = functools.partial(_delta_rule_xla, chunk_size=chunk_size)
    inputs = (q, k, v, beta, log_decay)
    return _chunked.run(_OP, method, plan, scale, delta_rule_pallas, xla, inputs, initial_state)


def _delta_rule_xla(method, q, k, v, beta, log_decay, cut, initial_state, scale, *, chunk_size):
    """The XLA evaluations (sequential, chunked), all arrays in the state dtype."""
    g = jnp.zeros(beta.shape, beta.dtype) if log_decay is None else log_decay
    if method == "sequential":
        return _delta_rule_sequential(q, k, v, beta, g, cut, initial_state, scale)
    return _delta_rule_chunked(q, k, v, beta, g, cut, initial_state, scale, chunk_size)
