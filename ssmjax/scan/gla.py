"""Gated linear attention: a matrix-valued state decayed per head or per key channel.

Per batch row and head, with a state ``S_t [dk, dv]``::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

One recurrence, three decay kinds (``log_decay`` ``g``):

* ``None``: plain causal linear attention (Katharopoulos, Vyas, Pappas and Fleuret, 2020,
  "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention");
* per head, ``g [batch, time, heads]``, ``exp(g_t)`` scales the whole state: RetNet (Sun
  et al., 2023, "Retentive Network: A Successor to Transformer for Large Language
  Models", constant ``g``), Mamba-2 / SSD (Dao and Gu, 2024, "Transformers are SSMs:
  Generalized Models and Efficient Algorithms Through Structured State Space Duality")
  and "simple GLA";
* per key channel, ``g [batch, time, heads, dk]``, ``exp(g_t)`` scales the rows of the
  state: GLA (Yang, Wang, Shen, Panda and Kim, 2024, "Gated Linear Attention Transformers
  with Hardware-Efficient Training") and HGRN2 (Qin et al., 2024, "HGRN2: Gated Linear
  RNNs with State Expansion").

The conventions are those of flash-linear-attention's ``naive_recurrent_gla`` /
``chunk_gla`` / ``chunk_simple_gla`` and of mamba_ssm's ``ssd_minimal`` (with
``q = C``, ``k = B``, ``v = x``, ``g = dt A`` and ``scale = 1``): decay first, then write,
and the output reads the *updated* state, so ``o_t`` sees ``k_t v_t^T``.

Evaluations (``method=``):

* ``"sequential"``: ``lax.scan`` over tokens, written from the equation; the oracle.
* ``"parallel"``: the masked quadratic ("attention") form over the whole sequence,
  ``o_i = scale * (sum_{j <= i} (q_i . (exp(G_i - G_j) * k_j)) v_j + (exp(G_i) * q_i)^T S_0)``
  with ``G_i - G_j = g_{j+1} + ... + g_i``: the chunked form below with one chunk spanning
  the sequence (``O(T^2)`` memory, ``O(T^2 dk / 8)`` with per-channel decay): for short
  sequences and as a second reference.
* ``"chunked"``: the state-passing form (GLA paper, section 3.3; SSD's chunked
  algorithm): the quadratic form inside chunks of ``chunk_size`` tokens, and across chunks
  the recurrence ``S_n = diag(exp(G_C)) S_{n-1} + sum_j (exp(G_C - G_j) * k_j) v_j^T`` on
  chunk boundaries only (a ``lax.scan`` over the ``T / C`` chunks). ``O(T C dk + T dk
  dv)`` work, ``T / C`` sequential steps of elementwise work. Arrays live in a chunk-major
  ``[n, batch, heads, C, dim]`` layout so batched matrix products and the scan over
  chunks need no transposes beyond one in and one out.
* ``"pallas"``: the kernels of :mod:`pallas_kernels.chunked_gla` behind a ``custom_vjp``
  (the same chunked form, one program per (batch, head, value block) looping over the
  chunks with the ``[dk, dv]`` state in registers; the forward stores the chunk-entry
  states, the backward kernel walks the chunks in reverse carrying ``dS``). Inputs keep
  their dtype (bf16 is read as bf16, computed in float32). ``chunk_size`` (a power of two)
  is the kernel's chunk; no packed sequences (``segment_ids`` / ``reset``: ``ValueError``).
  Compiled on GPUs (Triton lowering) and TPUs (Mosaic: :mod:`pallas_kernels.chunked_gla_tpu`,
  float32 / bfloat16 inputs, one chunk per sequential grid step with the state in VMEM),
  interpreted on CPU (slow: for tests).
* ``"auto"``: ``"pallas"`` on a platform where :data:`ssmjax.scan._dispatch.TABLE` lists
  the kernel as proven for the dtype, decay kind and head dim (never for packed
  sequences; the platform is the one the program is lowered for, and the kernel runs
  with its per-target default ``block_sizes``); otherwise ``"chunked"``, the fastest XLA
  form on CPU for forward+backward at every
  measured shape (``T = 1 .. 2048``; at ``T <= chunk_size`` it is the parallel form).
  Jitted float32 forward+backward at ``(b, t, h, d) = (2, 2048, 4, 64)`` on 2 shared CPU
  cores, chunk 64: per-head decay ~46 ms (sequential ~360 ms, parallel ~540 ms),
  per-channel ~150 ms (sequential ~375 ms). Forward only, the sequential form is as fast
  (per-head, ~13 ms) or faster (per-channel, ~16 vs ~55 ms): prefer it for CPU inference
  with per-channel decay.

Numerics. All arithmetic runs in at least float32 (``state_dtype``) and decays stay in log
space. Only sums of log-decays over a contiguous stretch of tokens are exponentiated
(never ``-G_j`` alone, which overflows for long chunks), and each such sum is formed from
terms of one sign rather than as the difference of two large cumulative sums (which
would lose the small differences that matter). Chunks are split into sub-chunks of
``s <= 8`` tokens: inside a sub-chunk the pairwise log-decays are a masked segment sum
(as in ``ssd_minimal``'s ``segsum``); across sub-chunks ``J < I`` they are
``L_i + R_j + P_IJ`` (sum from the start of ``I`` to ``i``, after ``j`` to the end of ``J``,
and over the whole sub-chunks between), all ``<= 0``. A per-head decay multiplies the
``[C, C]`` matrix ``q k^T``; a per-channel decay cannot leave the ``dk`` contraction, so
pairs across sub-chunks factor through the start of ``I``,
``exp(L_i) * exp(R_j + P_IJ)``, both exponents ``<= 0`` (the secondary chunking of the
GLA paper), and pairs inside a sub-chunk use the explicit ``[s, s, dk]`` decays
``exp(L_i - L_j)``. Entries outside the causal / same-document mask are masked *before*
``exp``. With ``g <= 0`` nothing overflows, whatever the chunk size or the decay strength;
``g`` must be finite (use ``reset`` / ``segment_ids`` for hard cuts).

Packed sequences: ``segment_ids`` / ``reset`` cut the state (``carry_cut_mask``); a cut at
``t`` acts as ``g_t = -inf`` and is implemented by masking, never by an infinite
log-decay: pairs ``(i, j)`` count only if no cut lies in ``j+1..i``, the incoming chunk
state only reaches positions before the chunk's first cut, and only positions from the
chunk's last cut on feed its outgoing state.

Gradients include ``log_decay`` and ``initial_state``. The sequential form is
differentiated by JAX. The chunked and parallel forms split into chunk-local terms
(scores, decayed queries and keys; plain autodiff) and the state passing across chunks,
whose custom VJP runs the state cotangent backwards through the same recurrence,
``dS_{n-1} = diag(exp(G_C))_n dS_n + (exp(G) q)_n^T do_n``, with every other cotangent a
batched matrix product, so the backward stores only the chunk-boundary states.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Bool, Float

from pallas_kernels import chunked_gla as kernels
from pallas_kernels.chunked_gla import BlockSizes as GLABlockSizes
from ssmjax.scan import _chunked, _dispatch
from ssmjax.scan._checks import (
    carry_cut_mask,
    check_broadcastable,
    check_chunk_size,
    check_real_floating,
    pad_time,
    state_dtype,
)

GLA_METHODS = _dispatch.TABLE["gated_linear_attention"].methods

#: Longest sub-chunk over which the per-channel decay tensor ``[s, s, dk]`` is formed
#: (8 was the fastest of 4 / 8 / 16 for per-channel decay at chunk sizes 32 and 64 on CPU).
MAX_SUB_CHUNK = 8


# ----------------------------------------------------------------------------- sequential
def gla_sequential(
    q: Float[Array, "batch time heads dk"],
    k: Float[Array, "batch time heads dk"],
    v: Float[Array, "batch time heads dv"],
    log_decay: Float[Array, "batch time heads #dk"],
    cut: Bool[Array, "batch time"] | None,
    initial_state: Float[Array, "batch heads dk dv"],
    scale: Float[Array, ""],
) -> tuple[Float[Array, "batch time heads dv"], Float[Array, "batch heads dk dv"]]:
    """Token-by-token ``lax.scan`` of ``S_t = diag(exp g_t) S_{t-1} + k_t v_t^T``.

    ``log_decay`` has a last axis of ``1`` (per head) or ``dk`` (per key channel); the
    decay is ``0`` where ``cut`` starts a new document. The oracle.
    """
    decay = jnp.exp(log_decay)
    if cut is not None:
        decay = jnp.where(cut[:, :, None, None], jnp.zeros((), decay.dtype), decay)

    def step(S, token):
        q_t, k_t, v_t, a_t = token  # [b, h, dk], [b, h, dk], [b, h, dv], [b, h, 1 | dk]
        S = a_t[..., None] * S + k_t[..., :, None] * v_t[..., None, :]
        return S, scale * jnp.einsum("bhk,bhkv->bhv", q_t, S)

    tokens = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (q, k, v, decay))
    final_state, o = jax.lax.scan(step, initial_state, tokens)
    return jnp.swapaxes(o, 0, 1), final_state


# ----------------------------------------------------------------------------- chunk helpers
def _sums_across_sub_chunks(
    g: Float[Array, "*lead m s d"],
) -> tuple[Float[Array, "*lead m s d"], Float[Array, "*lead m s d"], Float[Array, "*lead m m d"]]:
    """Log-decays that link positions of different sub-chunks ``J < I``.

    Returns ``L`` (sum from the sub-chunk start to ``i``, inclusive), ``R`` (sum after
    ``j`` to the sub-chunk end) and ``P [.., I, J, d]`` (sum over the whole sub-chunks
    strictly between ``J`` and ``I``; ``0`` unless ``J < I``), so that for ``j`` in ``J``
    and ``i`` in ``I > J``: ``g_{j+1} + ... + g_i = L_i + R_j + P_IJ``, a sum of terms of
    one sign, accurate to a few ulps of itself.
    """
    m = g.shape[-3]
    L = jnp.cumsum(g, axis=-2)
    R = _chunked.suffix_sum(g)
    K = jnp.arange(m)
    strictly_between = (K[None, :, None] < K[None, None, :]) & (K[None, None, :] < K[:, None, None])
    P = jnp.einsum("IJK,...Kd->...IJd", strictly_between.astype(g.dtype), L[..., -1, :])
    return L, R, P


def _pairwise_log_decay(g: Float[Array, "*lead C"], sub: int) -> Float[Array, "*lead C C"]:
    """``out[..., i, j] = g_{j+1} + ... + g_i`` for ``j <= i`` (garbage above).

    Inside sub-chunks of ``sub`` tokens a masked segment sum; across sub-chunks
    ``L_i + R_j + P_IJ`` (``_sums_across_sub_chunks``): as accurate as a full
    ``segment_sum`` at ``O(C sub)`` instead of ``O(C^2)`` cost per row.
    """
    lead, c = g.shape[:-1], g.shape[-1]
    m = c // sub
    g = g.reshape(lead + (m, sub))
    L, R, P = (x[..., 0] for x in _sums_across_sub_chunks(g[..., None]))
    across = L[..., :, :, None, None] + R[..., None, None, :, :] + P[..., :, None, :, None]
    inside = _chunked.segment_sum(g)[..., :, :, None, :]  # [.., I, i, 1, j]
    same_sub_chunk = jnp.eye(m, dtype=bool)[:, None, :, None]
    return jnp.where(same_sub_chunk, inside, across).reshape(lead + (c, c))


def _intra_chunk_scores_per_head(
    q: Float[Array, "*lead C dk"],
    k: Float[Array, "*lead C dk"],
    g: Float[Array, "*lead C"],
    pairs: Bool[Array, "*#lead C C"],
    sub: int,
) -> Float[Array, "*lead C C"]:
    """``A_ij = (q_i . k_j) exp(g_{j+1} + ... + g_i)`` on ``pairs``, else ``0``."""
    decay = _chunked.masked_exp(_pairwise_log_decay(g, sub), pairs)
    return jnp.einsum("...id,...jd->...ij", q, k) * decay


def _intra_chunk_scores_per_channel(
    q: Float[Array, "*lead C dk"],
    k: Float[Array, "*lead C dk"],
    g: Float[Array, "*lead C dk"],
    pairs: Bool[Array, "*#lead C C"],
    sub: int,
) -> Float[Array, "*lead C C"]:
    """``A_ij = sum_d q_id k_jd exp(g_{j+1,d} + ... + g_{i,d})`` on ``pairs``, else ``0``.

    The per-channel decay cannot leave the ``dk`` contraction, so the chunk is split into
    ``m = C / sub`` sub-chunks. For ``j`` in sub-chunk ``J`` before ``i``'s sub-chunk
    ``I`` the decay factors through the start of ``I``, ``exp(L_i) * exp(R_j + P_IJ)``,
    both exponents ``<= 0`` (``_sums_across_sub_chunks``), and one matrix product per
    ``I`` contracts ``dk``. Inside a sub-chunk the ``[sub, sub, dk]`` decays
    ``exp(L_i - L_j)`` are formed explicitly (masked to ``j <= i`` before ``exp``).
    """
    lead, (c, dk) = q.shape[:-2], q.shape[-2:]
    m = c // sub
    q, k, g = (x.reshape(lead + (m, sub, dk)) for x in (q, k, g))
    L, R, P = _sums_across_sub_chunks(g)
    earlier_sub_chunk = jnp.tril(jnp.ones((m, m), bool), -1)[:, :, None, None]  # J < I
    k_to_start = k[..., None, :, :, :] * _chunked.masked_exp(
        R[..., None, :, :, :] + P[..., :, :, None, :], earlier_sub_chunk
    )  # [.., I, J, sub, dk]: k_j decayed to the start of sub-chunk I
    across = jnp.einsum("...Iid,...IJjd->...IiJj", q * jnp.exp(L), k_to_start)
    causal = jnp.tril(jnp.ones((sub, sub), bool))[..., None]
    decay_inside = _chunked.masked_exp(L[..., :, None, :] - L[..., None, :, :], causal)
    inside = jnp.einsum("...Iijd,...Ijd->...Iij", q[..., :, None, :] * decay_inside, k)
    same_sub_chunk = jnp.eye(m, dtype=bool)[:, None, :, None]
    A = jnp.where(same_sub_chunk, inside[..., :, :, None, :], across).reshape(lead + (c, c))
    return jnp.where(pairs, A, 0.0)


def _chunk_local_terms(
    q: Float[Array, "n batch heads C dk"],
    k: Float[Array, "n batch heads C dk"],
    g: Float[Array, "n batch heads C #dk"],
    masks: _chunked.ChunkMasks,
) -> tuple[
    Float[Array, "n batch heads C C"],
    Float[Array, "n batch heads C dk"],
    Float[Array, "n batch heads C dk"],
    Float[Array, "n batch heads #dk"],
]:
    """Everything that involves one chunk only (plain autodiff differentiates it).

    With ``G_i = g_0 + ... + g_i`` local to the chunk: the intra-chunk scores ``A``; the
    queries decayed from the chunk start, ``exp(G_i) * q_i``; the keys decayed to the
    chunk end, ``exp(G_{C-1} - G_j) * k_j``; and the decay across the whole chunk,
    ``exp(G_{C-1})`` (all masked by the document cuts).
    """
    c = q.shape[-2]
    sub = math.gcd(c, MAX_SUB_CHUNK)
    if g.shape[-1] == 1:
        A = _intra_chunk_scores_per_head(q, k, g[..., 0], masks.pairs, sub)
    else:
        A = _intra_chunk_scores_per_channel(q, k, g, masks.pairs, sub)
    G = jnp.cumsum(g, axis=-2)
    q_from_start = q * _chunked.masked_exp(G, masks.reads_state)
    k_to_end = k * _chunked.masked_exp(_chunked.suffix_sum(g), masks.feeds_state)
    through = _chunked.masked_exp(G[..., -1, :], masks.passes_state)
    return A, q_from_start, k_to_end, through


def _pass_states_forward(A, q_from_start, k_to_end, through, v, initial_state):
    written = jnp.einsum("...jd,...je->...de", k_to_end, v)  # [n, b, h, dk, dv]

    def across_chunks(S, chunk):  # S: the state entering the chunk
        a_n, w_n = chunk
        return a_n[..., None] * S + w_n, S

    final_state, S_in = jax.lax.scan(across_chunks, initial_state, (through, written))
    y = A @ v + q_from_start @ S_in
    return (y, final_state), S_in


@jax.custom_vjp
def _pass_states(A, q_from_start, k_to_end, through, v, initial_state):
    """``y = A v + (exp(G) q) S_in`` with ``S_in`` carried by
    ``S_n = diag(through_n) S_{n-1} + (exp(G_C - G) k)^T v`` across chunks (a ``lax.scan``
    over the ``n`` chunk-major leading axis).

    Custom VJP: the cotangent of the state runs backwards through the same recurrence,
    ``dS_{n-1} = diag(through_n) dS_n + (exp(G) q)_n^T dy_n``, and every other cotangent
    is a batched matrix product; nothing but the chunk-boundary states is stored.
    """
    return _pass_states_forward(A, q_from_start, k_to_end, through, v, initial_state)[0]


def _pass_states_fwd(A, q_from_start, k_to_end, through, v, initial_state):
    out, S_in = _pass_states_forward(A, q_from_start, k_to_end, through, v, initial_state)
    return out, (A, q_from_start, k_to_end, through, v, S_in)


def _pass_states_bwd(residuals, cotangents):
    A, q_from_start, k_to_end, through, v, S_in = residuals
    dy, d_final = cotangents
    read = jnp.einsum("...ci,...ce->...ie", q_from_start, dy)  # [n, b, h, dk, dv]

    def back_across_chunks(dS_out, chunk):  # dS_out: cotangent of the state leaving
        a_n, read_n = chunk
        return a_n[..., None] * dS_out + read_n, dS_out

    d_initial, dS_out = jax.lax.scan(back_across_chunks, d_final, (through, read), reverse=True)
    d_through = jnp.sum(dS_out * S_in, axis=-1)  # [n, b, h, dk]
    if through.shape[-1] == 1:
        d_through = jnp.sum(d_through, axis=-1, keepdims=True)
    dA = dy @ jnp.swapaxes(v, -1, -2)
    dq = dy @ jnp.swapaxes(S_in, -1, -2)
    dk = v @ jnp.swapaxes(dS_out, -1, -2)
    dv = jnp.swapaxes(A, -1, -2) @ dy + k_to_end @ dS_out
    return dA, dq, dk, d_through, dv, d_initial


_pass_states.defvjp(_pass_states_fwd, _pass_states_bwd)


def gla_chunked(
    q: Float[Array, "batch time heads dk"],
    k: Float[Array, "batch time heads dk"],
    v: Float[Array, "batch time heads dv"],
    log_decay: Float[Array, "batch time heads #dk"],
    cut: Bool[Array, "batch time"] | None,
    initial_state: Float[Array, "batch heads dk dv"],
    scale: Float[Array, ""],
    chunk_size: int,
) -> tuple[Float[Array, "batch time heads dv"], Float[Array, "batch heads dk dv"]]:
    """State-passing chunked form (quadratic inside chunks, recurrent across them).

    With chunk-local cumulative log-decays ``G_i`` and the state ``S_0`` entering a
    chunk::

        o_i  = scale * (sum_{j <= i} A_ij v_j + (exp(G_i) * q_i)^T S_0)
        S_C  = diag(exp(G_C)) S_0 + sum_j (exp(G_C - G_j) * k_j) v_j^T

    Works in a chunk-major ``[n, batch, heads, C, .]`` layout (one transpose in, one
    out). ``chunk_size >= time`` gives the parallel (whole-sequence quadratic) form.
    """
    time = q.shape[1]
    c = min(chunk_size, time)
    # Padding with k = 0 writes nothing and g = 0 keeps the state: the final state is
    # the one after the last real token.
    q, k, v, g = (_chunked.to_chunks(pad_time(x, c), c) for x in (q, k, v, log_decay))
    masks = _chunked.chunk_masks(
        None if cut is None else _chunked.to_chunks(pad_time(cut, c)[:, :, None], c), c
    )
    A, q_from_start, k_to_end, through = _chunk_local_terms(q, k, g, masks)
    y, final_state = _pass_states(A, q_from_start, k_to_end, through, v, initial_state)
    return scale * _chunked.from_chunks(y)[:, :time], final_state


# ----------------------------------------------------------------------------- pallas
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def gla_pallas(
    q: Float[Array, "batch time heads dk"],
    k: Float[Array, "batch time heads dk"],
    v: Float[Array, "batch time heads dv"],
    log_decay: Float[Array, "batch time heads"] | Float[Array, "batch time heads dk"] | None,
    initial_state: Float[Array, "batch heads dk dv"],
    scale: float,
    block_sizes: GLABlockSizes,
    platform: str,
) -> tuple[Float[Array, "batch time heads dv"], Float[Array, "batch heads dk dv"]]:
    """The Pallas forward kernel; its ``custom_vjp`` runs the backward kernel on the
    chunk-entry states the forward saved (``log_decay``: ``None``, per head or per channel;
    inputs in their own dtypes, ``scale`` a static float, ``platform`` the lowering target)."""
    o, final_state, _ = kernels.chunked_gla_forward(
        q, k, v, log_decay, initial_state, save_states=False,
        **_chunked.kernel_options(scale, block_sizes, platform),
    )
    return o, final_state


def _gla_pallas_fwd(q, k, v, log_decay, initial_state, scale, block_sizes, platform):
    o, final_state, states = kernels.chunked_gla_forward(
        q, k, v, log_decay, initial_state, **_chunked.kernel_options(scale, block_sizes, platform)
    )
    return (o, final_state), (q, k, v, log_decay, initial_state, states)


def _gla_pallas_bwd(scale, block_sizes, platform, residuals, cotangents):
    q, k, v, log_decay, initial_state, states = residuals
    do, d_final = cotangents
    grads = kernels.chunked_gla_backward(
        q, k, v, log_decay, states, do, d_final, **_chunked.kernel_options(scale, block_sizes, platform)
    )
    primals = (q, k, v, log_decay, initial_state)
    return tuple(None if x is None else dx.astype(x.dtype) for dx, x in zip(grads, primals))


gla_pallas.defvjp(_gla_pallas_fwd, _gla_pallas_bwd)


# ----------------------------------------------------------------------------- public API
def check_log_decay(log_decay: Array, batch: int, time: int, heads: int, dk: int) -> None:
    layouts = {3: ((batch, time, heads), "[batch, time, heads] (per-head decay)"),
               4: ((batch, time, heads, dk), "[batch, time, heads, dk] (per-channel decay)")}
    if log_decay.ndim not in layouts:
        raise ValueError(
            "log_decay: expected shape [batch, time, heads] (per-head decay) or "
            f"[batch, time, heads, dk] (per-channel decay), got {tuple(log_decay.shape)}"
        )
    shape, layout = layouts[log_decay.ndim]
    check_broadcastable("log_decay", log_decay, shape, layout)


@_dispatch.sequence_parallel_route("gated_linear_attention")
def gated_linear_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    log_decay: ArrayLike | None = None,
    scale: float | ArrayLike | None = None,
    initial_state: ArrayLike | None = None,
    segment_ids: ArrayLike | None = None,
    reset: ArrayLike | None = None,
    chunk_size: int = 64,
    method: str = "auto",
    block_sizes: GLABlockSizes | None = None,
) -> tuple[Array, Array]:
    """Gated linear attention over ``[batch, time, heads, dim]`` sequences.

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`` and ``o_t = scale * S_t^T q_t`` per batch
    row and head (Yang, Wang, Shen, Panda and Kim, 2024, "Gated Linear Attention
    Transformers with Hardware-Efficient Training"; see the module docstring for the
    decay kinds, the evaluations and the numerics).

    Args:
      q: queries ``[batch, time, heads, dk]``.
      k: keys ``[batch, time, heads, dk]``.
      v: values ``[batch, time, heads, dv]``.
      log_decay: ``g``, the log of the state decay (``<= 0``, finite): ``None`` (no decay,
        plain linear attention), per head, broadcastable to ``[batch, time, heads]``
        (RetNet, Mamba-2 / SSD, simple GLA), or per key channel, broadcastable to
        ``[batch, time, heads, dk]`` (GLA, HGRN2). The number of axes says which.
      scale: output scale; ``dk ** -0.5`` if ``None``.
      initial_state: ``S_{-1} [batch, heads, dk, dv]``; zeros if ``None``.
      segment_ids: ``[batch, time]`` ints; the state restarts where the id changes.
      reset: ``[batch, time]`` bool; ``True`` starts a new document (``reset[:, 0]`` also
        drops ``initial_state``). Pass at most one of ``segment_ids`` / ``reset``.
      chunk_size: tokens per chunk for ``"chunked"``; any ``time`` works (padded). For
        ``"pallas"`` without ``block_sizes``, the kernel's chunk, a power of two.
      method: ``"auto"``, ``"sequential"``, ``"parallel"``, ``"chunked"`` or ``"pallas"``
        (see the module docstring).
      block_sizes: the kernels' tiling (:class:`GLABlockSizes`) wherever the Pallas kernel
        runs (``"pallas"``, or ``"auto"`` picking it); ``None``: the per-target default.

    Returns:
      ``(o, final_state)``: ``o [batch, time, heads, dv]`` in the promoted dtype of
      ``q, k, v``; ``final_state [batch, heads, dk, dv]`` in at least float32.

    Under :func:`ssmjax.distributed.sequence_parallel` this is
    :func:`ssmjax.distributed.gated_linear_attention_sp` when ``time`` divides over the ``seq`` axis
    (unchanged otherwise; see :mod:`ssmjax.distributed.context`).
    """
    _dispatch.check_method("gated_linear_attention", method)
    _dispatch.check_block_sizes("gated_linear_attention", block_sizes, GLABlockSizes)
    check_chunk_size(chunk_size)
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    initial_state = None if initial_state is None else jnp.asarray(initial_state)
    batch, time, heads, dk, dv = _chunked.check_attention_inputs(q, k, v, initial_state)
    dtypes = [q.dtype, k.dtype, v.dtype]
    out_dtype = jnp.result_type(*dtypes)
    decay = "none"
    if log_decay is not None:
        log_decay = jnp.asarray(log_decay)
        check_real_floating("log_decay", log_decay)
        check_log_decay(log_decay, batch, time, heads, dk)
        dtypes.append(log_decay.dtype)
        decay = "head" if log_decay.ndim == 3 else "channel"
    if initial_state is not None:
        dtypes.append(initial_state.dtype)
    _chunked.check_scalar_scale(scale)
    dtype = state_dtype(*dtypes)
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    reset = None if reset is None else jnp.asarray(reset)
    cut = carry_cut_mask(segment_ids, reset, batch, time, reverse=False)
    block_sizes = _dispatch.kernel_block_sizes(GLABlockSizes, block_sizes, method, chunk_size)
    case = _dispatch.case(
        out_dtype, packed=cut is not None, time=time, head_dim=dk, decay=decay,
        chunk=None if block_sizes is None else block_sizes.chunk,
    )
    if method == "pallas":
        _dispatch.check_pallas("gated_linear_attention", case, "q, k, v")
    if time == 0:
        s0 = _chunked.initial_state_or_zeros(initial_state, q, v, dtype)
        return jnp.zeros((batch, 0, heads, dv), out_dtype), s0

    def pallas(platform, q, k, v, log_decay, initial_state, cut):
        return _gla_pallas_call(q, k, v, log_decay, initial_state, scale, dtype, block_sizes, platform)

    def xla(resolved, q, k, v, log_decay, initial_state, cut):
        return _gla_xla(resolved, q, k, v, log_decay, initial_state, cut, scale, dtype, chunk_size)

    return _chunked.run(
        "gated_linear_attention", method, case, pallas, xla, out_dtype, dtype,
        q, k, v, log_decay, initial_state, cut,
    )


def _gla_xla(method, q, k, v, log_decay, initial_state, cut, scale, dtype, chunk_size):
    """The XLA evaluations (sequential, parallel, chunked) in the state dtype."""
    batch, time, heads, dk = q.shape
    s0 = _chunked.initial_state_or_zeros(initial_state, q, v, dtype)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    if log_decay is None:
        g = jnp.zeros((batch, time, heads, 1), dtype)
    elif log_decay.ndim == 3:
        g = jnp.broadcast_to(log_decay, (batch, time, heads)).astype(dtype)[..., None]
    else:
        g = jnp.broadcast_to(log_decay, (batch, time, heads, dk)).astype(dtype)
    scale = jnp.asarray(dk**-0.5 if scale is None else scale, dtype)
    if method == "sequential":
        return gla_sequential(q, k, v, g, cut, s0, scale)
    chunk = time if method == "parallel" else chunk_size
    return gla_chunked(q, k, v, g, cut, s0, scale, chunk)


def _gla_pallas_call(q, k, v, log_decay, initial_state, scale, dtype, block_sizes, platform):
    """``method="pallas"`` after the argument checks: inputs keep their dtypes."""
    batch, time, heads = q.shape[:3]
    if log_decay is not None:
        shape = (batch, time, heads) if log_decay.ndim == 3 else q.shape
        log_decay = jnp.broadcast_to(log_decay, shape)
    s0 = _chunked.initial_state_or_zeros(initial_state, q, v, dtype)
    q, static = _chunked.static_scale_of(q, scale, dtype)
    tiling = _dispatch.block_sizes_for("gated_linear_attention", block_sizes, platform)
    return gla_pallas(q, k, v, log_decay, s0, static, tiling, platform)
