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
  with per-channel decay. (Measured before per-head decays took one segment sum per
  chunk; that made per-head forward+backward ~15% faster, back to back under load.)

Numerics. All arithmetic runs in at least float32 (``state_dtype``) and decays stay in log
space. Only sums of log-decays over a contiguous stretch of tokens are exponentiated
(never ``-G_j`` alone, which overflows for long chunks), and each such sum is formed from
terms of one sign rather than as the difference of two large cumulative sums (which
would lose the small differences that matter). Chunks are split into sub-chunks of
``s`` tokens (``s <= 64`` per head, so a chunk of 64 is one sub-chunk; ``s <= 8`` per
channel): inside a sub-chunk the pairwise log-decays are a masked segment sum (as in
``ssd_minimal``'s ``segsum``); across sub-chunks ``J < I`` they are ``L_i + R_j + P_IJ``
(sum from the start of ``I`` to ``i``, after ``j`` to the end of ``J``, and over the whole
sub-chunks between), all ``<= 0``. A per-head decay multiplies the ``[C, C]`` matrix
``q k^T``; a per-channel decay cannot leave the ``dk`` contraction, so pairs across
sub-chunks factor through the start of ``I``, ``exp(L_i) * exp(R_j + P_IJ)``, both
exponents ``<= 0`` (the secondary chunking of the GLA paper), and pairs inside a sub-chunk
use the explicit ``[s, s, dk]`` decays ``exp(L_i - L_j)``. Entries outside the causal /
same-document mask are masked *before* ``exp``. With ``g <= 0`` nothing overflows,
whatever the chunk size or the decay strength; ``g`` must be finite (use ``reset`` /
``segment_ids`` for hard cuts).

Packed sequences: ``segment_ids`` / ``reset`` cut the state (``carry_cut_mask``); a cut at
``t`` acts as ``g_t = -inf`` and is implemented by masking, never by an infinite
log-decay: pairs ``(i, j)`` count only if no cut lies in ``j+1..i``, the incoming chunk
state only reaches positions before the chunk's first cut, and only positions from the
chunk's last cut on feed its outgoing state.

Gradients include ``log_decay`` and ``initial_state``. The sequential form is
differentiated by JAX. The chunked and parallel forms split into chunk-local terms
(scores, decayed queries and keys; plain autodiff) and the state passing across chunks
(:func:`ssmjax.scan._chunked.pass_states`, shared with the delta rule), whose custom VJP
runs the state cotangent backwards through the same recurrence,
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
from ssmjax.scan._checks import check_broadcastable, check_real_floating

GLA_METHODS = _dispatch.TABLE["gated_linear_attention"].methods
_OP = _chunked.Op("gated_linear_attention", GLABlockSizes, "q, k, v")

#: Longest sub-chunk over which the per-channel decay tensor ``[s, s, dk]`` is formed
#: (8 was the fastest of 4 / 8 / 16 for per-channel decay at chunk sizes 32 and 64 on CPU).
MAX_SUB_CHUNK = 8
#: Longest sub-chunk whose per-head pairwise log-decays are one ``[s, s]`` segment sum (a
#: matrix product, ``O(s)`` per entry). At chunk 64 it is the whole chunk: ~15% faster
#: forward + backward on CPU than sub-chunks of 8, 16 or 32. The cap keeps the
#: whole-sequence parallel form at ``O(T^2 s)`` rather than ``O(T^3)``.
MAX_SEGMENT = 64


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
    ``segment_sum`` at ``O(C sub)`` instead of ``O(C^2)`` cost per row. One sub-chunk
    (``sub = C``) is the segment sum itself.
    """
    lead, c = g.shape[:-1], g.shape[-1]
    if sub == c:
        return _chunked.segment_sum(g)
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


def _chunk_terms(
    q: Float[Array, "n batch heads C dk"],
    k: Float[Array, "n batch heads C dk"],
    v: Float[Array, "n batch heads C dv"],
    g: Float[Array, "n batch heads C #dk"],
    masks: _chunked.ChunkMasks,
) -> _chunked.ChunkTerms:
    """Everything that involves one chunk only (plain autodiff differentiates it).

    With ``G_i = g_0 + ... + g_i`` local to the chunk: the intra-chunk scores ``A``; the
    queries decayed from the chunk start, ``exp(G_i) * q_i``; the keys decayed to the
    chunk end, ``exp(G_{C-1} - G_j) * k_j``; and the decay across the whole chunk,
    ``exp(G_{C-1})`` (all masked by the document cuts). The values are written as they
    are (``W = None``).
    """
    c = q.shape[-2]
    if g.shape[-1] == 1:
        A = _intra_chunk_scores_per_head(q, k, g[..., 0], masks.pairs, math.gcd(c, MAX_SEGMENT))
    else:
        A = _intra_chunk_scores_per_channel(q, k, g, masks.pairs, math.gcd(c, MAX_SUB_CHUNK))
    G = jnp.cumsum(g, axis=-2)
    q_from_start = q * _chunked.masked_exp(G, masks.reads_state)
    k_to_end = k * _chunked.masked_exp(_chunked.suffix_sum(g), masks.feeds_state)
    through = _chunked.masked_exp(G[..., -1, :], masks.passes_state)
    return _chunked.ChunkTerms(A, q_from_start, k_to_end, through, v, None)


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

    (:func:`ssmjax.scan._chunked.chunked` with ``W = 0``). ``chunk_size >= time`` gives
    the parallel (whole-sequence quadratic) form.
    """
    arrays = (q, k, v, log_decay)
    return _chunked.chunked(_chunk_terms, arrays, cut, initial_state, scale, chunk_size)


# ----------------------------------------------------------------------------- pallas
#: The Pallas forward kernel; its ``custom_vjp`` runs the backward kernel on the
#: chunk-entry states the forward saved: ``gla_pallas((q, k, v, log_decay), s0, scale,
#: block_sizes, platform)`` (``log_decay``: ``None``, per head or per channel).
gla_pallas = _chunked.kernels_with_vjp(kernels.chunked_gla_forward, kernels.chunked_gla_backward)


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
    q, k, v, initial_state, dims = _chunked.check_inputs(
        _OP, method, block_sizes, chunk_size, q, k, v, initial_state
    )
    decay = "none"
    if log_decay is not None:
        log_decay = jnp.asarray(log_decay)
        check_real_floating("log_decay", log_decay)
        check_log_decay(log_decay, dims.batch, dims.time, dims.heads, dims.dk)
        decay = "head" if log_decay.ndim == 3 else "channel"
        log_decay = jnp.broadcast_to(log_decay, q.shape[: log_decay.ndim])
    plan = _chunked.plan_call(
        _OP, method, (q, k, v), (log_decay, initial_state), decay, scale=scale,
        segment_ids=segment_ids, reset=reset, block_sizes=block_sizes, chunk_size=chunk_size,
    )
    xla = functools.partial(_gla_xla, chunk_size=chunk_size)
    inputs = (q, k, v, log_decay)
    return _chunked.run(_OP, method, plan, scale, gla_pallas, xla, inputs, initial_state)


def _gla_xla(method, q, k, v, log_decay, cut, initial_state, scale, *, chunk_size):
    """The XLA evaluations (sequential, parallel, chunked), all arrays in the state dtype."""
    if log_decay is None:
        g = jnp.zeros(q.shape[:3] + (1,), q.dtype)
    else:
        g = log_decay[..., None] if log_decay.ndim == 3 else log_decay
    if method == "sequential":
        return gla_sequential(q, k, v, g, cut, initial_state, scale)
    chunk = q.shape[1] if method == "parallel" else chunk_size
    return gla_chunked(q, k, v, g, cut, initial_state, scale, chunk)
