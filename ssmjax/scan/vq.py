"""Vector quantisation and causal softmax attention over vector-quantised keys.

Vector quantiser (van den Oord, Vinyals and Kavukcuoglu, 2017, "Neural Discrete
Representation Learning" (VQ-VAE); as used on the keys of Transformer-VQ, Lingle, 2023,
"Transformer-VQ: Linear-Time Transformers via Vector Quantization", and of LongVQ, Liu,
Wang, Li, Wang, Lin and Li, 2024, "LongVQ: Long Sequence Modeling with Vector Quantization
on Structured Memory"). A codebook ``C [K, d]`` of ``K`` codes::

    z     = argmin_c ||x - C_c||^2                      nearest code (the "shortcode")
    x_hat = x + sg(C_z - x)                             straight-through estimator: the value
                                                        is C_z, the Jacobian d x_hat / d x = I
    commitment_loss = mean_i ||x_i - sg(C_{z_i})||^2    pulls the encoder to its code
    codebook_loss   = mean_i ||sg(x_i) - C_{z_i}||^2    pulls the code to its inputs

(``sg`` = stop-gradient; the mean is over vectors, the norm over the ``d`` features.)
Instead of ``codebook_loss``, the codebook may follow exponential moving averages
(VQ-VAE appendix A.1; Razavi, van den Oord and Vinyals, 2019, "VQ-VAE-2"), with decay
``gamma`` and Laplace smoothing ``eps`` (:func:`ema_codebook_update`,
:func:`codebook_from_ema`)::

    n_c = sum_i 1[z_i = c],   s_c = sum_i 1[z_i = c] x_i
    N_c <- gamma N_c + (1 - gamma) n_c,   M_c <- gamma M_c + (1 - gamma) s_c
    C_c = M_c / Ntilde_c,     Ntilde_c = (N_c + eps) / (sum_c' N_c' + K eps) * sum_c' N_c'

Codebook attention (Transformer-VQ Sec. 3; LongVQ's "VQ-equipped attention"): causal
softmax attention whose keys are quantised, ``k_s = C_{z_s}``::

    o_t = sum_{s <= t} exp(q_t . k_s) v_s / sum_{s <= t} exp(q_t . k_s)

Because every key is one of ``K`` codes, the past is summarised by ``K`` value sums and
``K`` counts (the state, :class:`CodebookAttentionState`), a recurrence of constant size::

    U_t[c] = U_{t-1}[c] + 1[z_t = c] v_t,    L_t[c] = L_{t-1}[c] + 1[z_t = c]
    o_t    = sum_c exp(q_t . C_c) U_t[c] / sum_c exp(q_t . C_c) L_t[c]

so a token costs ``O(K d)`` instead of ``O(t d)``: linear in the length. Evaluations
(``method``), all equal in value:

* ``"sequential"``: the recurrence above, one token per ``lax.scan`` step (the oracle form);
* ``"chunked"`` (Transformer-VQ's block form): inside a chunk of ``chunk_size`` tokens the
  quadratic form over the chunk's keys ``k_s``; the chunks before contribute through the
  state ``(U, L)`` summed over them (an exclusive cumulative sum over chunks), both parts
  normalised together. ``T`` need not divide: the last chunk is padded and the padding
  masked out of the state;
* ``"quadratic"``: one chunk of the whole sequence (plus the carried state).

Gradients: the straight-through keys ``k_s`` are an argument (``keys``, equal in value to
``codebook[codes]``): inside a chunk the gradient reaches the keys (and, through the
straight-through estimator, whatever produced them); through the state it reaches the
codebook ``C``, as in Transformer-VQ. So the forms agree in value but route the key
gradient differently: ``"quadratic"`` is the full straight-through gradient,
``"sequential"`` sends all of it to the codebook.

Stability: the logits against the codebook bound every logit of a row (each key is a
code), so ``m_t = max_c q_t . C_c`` (no gradient) is subtracted before ``exp`` and no
running maximum has to be carried.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Float, Int

from ssmjax.checks import check_choice, check_chunk_size, check_real_floating

CODEBOOK_ATTENTION_METHODS = ("chunked", "quadratic", "sequential")


class VQResult(NamedTuple):
    """What :func:`vector_quantize` returns (module docstring)."""

    quantized: Array  # x + sg(C_z - x), [..., d]
    codes: Array  # z, int32 [...]
    commitment_loss: Array  # mean ||x - sg(C_z)||^2, scalar
    codebook_loss: Array  # mean ||sg(x) - C_z||^2, scalar


class CodebookAttentionState(NamedTuple):
    """The carried summary of the past of :func:`codebook_attention`."""

    value_sums: Array  # U [batch, K, dv]: sum of the values whose key is code c
    counts: Array  # L [batch, K]: how many keys were code c


def nearest_code(x: Float[Array, "*lead d"], codebook: Float[Array, "K d"]) -> Int[Array, "*lead"]:
    """``argmin_c ||x - C_c||^2`` (``|x|^2`` dropped: it does not change the argmin)."""
    scores = 2 * jnp.einsum("...d,kd->...k", x, codebook) - jnp.sum(jnp.square(codebook), axis=-1)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def vector_quantize(x: ArrayLike, codebook: ArrayLike) -> VQResult:
    """Quantise ``x [..., d]`` with ``codebook [K, d]`` (module docstring): the
    straight-through ``x_hat``, the codes and both losses (means over the vectors)."""
    x, codebook = jnp.asarray(x), jnp.asarray(codebook)
    check_real_floating("x", x)
    if codebook.ndim != 2 or codebook.shape[-1] != x.shape[-1]:
        raise ValueError(f"codebook: expected shape [K, d] with d = {x.shape[-1]}, got {tuple(codebook.shape)}")
    codebook = codebook.astype(x.dtype)
    codes = nearest_code(jax.lax.stop_gradient(x), jax.lax.stop_gradient(codebook))
    chosen = codebook[codes]
    quantized = x + jax.lax.stop_gradient(chosen - x)
    per_vector = lambda e: jnp.mean(jnp.sum(jnp.square(e), axis=-1))  # noqa: E731
    commitment = per_vector(x - jax.lax.stop_gradient(chosen))
    codebook_loss = per_vector(jax.lax.stop_gradient(x) - chosen)
    return VQResult(quantized, codes, commitment, codebook_loss)


def ema_codebook_update(
    stats: dict, x: ArrayLike, codes: ArrayLike, decay: float = 0.99, weights: ArrayLike | None = None
) -> dict:
    """One EMA step of the codebook statistics ``{"cluster_size": N [K], "embed_sum": M [K,
    d]}`` from the vectors ``x [..., d]`` and their ``codes [...]`` (module docstring);
    ``weights [...]`` (e.g. a 0/1 mask) weigh the vectors. Pure: returns the new stats."""
    x = jnp.asarray(x)
    N, M = jnp.asarray(stats["cluster_size"]), jnp.asarray(stats["embed_sum"])
    onehot = jax.nn.one_hot(jnp.asarray(codes), N.shape[0], dtype=M.dtype)  # [..., K]
    if weights is not None:
        onehot = onehot * jnp.asarray(weights, M.dtype)[..., None]
    onehot = onehot.reshape(-1, N.shape[0])
    n = jnp.sum(onehot, axis=0)
    s = onehot.T @ x.reshape(-1, x.shape[-1]).astype(M.dtype)
    return dict(cluster_size=decay * N + (1 - decay) * n, embed_sum=decay * M + (1 - decay) * s)


def codebook_from_ema(stats: dict, eps: float = 1e-5) -> Array:
    """``C_c = M_c / Ntilde_c`` with Laplace-smoothed counts (module docstring)."""
    N, M = jnp.asarray(stats["cluster_size"]), jnp.asarray(stats["embed_sum"])
    total = jnp.sum(N)
    smoothed = (N + eps) / (total + N.shape[0] * eps) * total
    return M / smoothed[:, None]


def _check_attention_args(q, keys, values, codes, codebook, initial_state):
    check_real_floating("q", q)
    if q.ndim != 3:
        raise ValueError(f"q: expected shape [batch, time, dk], got {tuple(q.shape)}")
    b, t, dk = q.shape
    if keys.shape != q.shape:
        raise ValueError(f"keys: expected shape [batch, time, dk] = {q.shape}, got {tuple(keys.shape)}")
    if values.ndim != 3 or values.shape[:2] != (b, t):
        raise ValueError(f"values: expected shape [batch, time, dv] with [batch, time] = {(b, t)}, "
                         f"got {tuple(values.shape)}")
    if codes.shape != (b, t) or not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"codes: expected integer shape [batch, time] = {(b, t)}, got {codes.dtype}{tuple(codes.shape)}")
    if codebook.ndim != 2 or codebook.shape[1] != dk:
        raise ValueError(f"codebook: expected shape [K, dk] with dk = {dk}, got {tuple(codebook.shape)}")
    if initial_state is not None:
        K, dv = codebook.shape[0], values.shape[-1]
        U, L = initial_state
        if tuple(U.shape) != (b, K, dv) or tuple(L.shape) != (b, K):
            raise ValueError(f"initial_state: expected (value_sums [batch, K, dv], counts [batch, K]) = "
                             f"({(b, K, dv)}, {(b, K)}), got ({tuple(U.shape)}, {tuple(L.shape)})")


def _attention_sequential(
    q: Float[Array, "b t dk"],
    values: Float[Array, "b t dv"],
    codes: Int[Array, "b t"],
    codebook: Float[Array, "K dk"],
    U0: Float[Array, "b K dv"],
    L0: Float[Array, "b K"],
) -> tuple[Float[Array, "b t dv"], Float[Array, "b K dv"], Float[Array, "b K"]]:
    K = codebook.shape[0]

    def body(carry, inputs):
        U, L = carry
        q_t, v_t, z_t = inputs
        onehot = jax.nn.one_hot(z_t, K, dtype=U.dtype)  # [b, K]
        U = U + onehot[:, :, None] * v_t[:, None, :].astype(U.dtype)
        L = L + onehot
        logits = (q_t @ codebook.T).astype(U.dtype)
        w = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        o = jnp.einsum("bk,bkv->bv", w, U) / jnp.einsum("bk,bk->b", w, L)[:, None]
        return (U, L), o

    (U, L), o = jax.lax.scan(body, (U0, L0), (jnp.moveaxis(q, 1, 0), jnp.moveaxis(values, 1, 0), codes.T))
    return jnp.moveaxis(o, 0, 1), U, L


def _attention_chunked(
    q: Float[Array, "b t dk"],
    keys: Float[Array, "b t dk"],
    values: Float[Array, "b t dv"],
    codes: Int[Array, "b t"],
    codebook: Float[Array, "K dk"],
    U0: Float[Array, "b K dv"],
    L0: Float[Array, "b K"],
    chunk: int,
) -> tuple[Float[Array, "b t dv"], Float[Array, "b K dv"], Float[Array, "b K"]]:
    b, t, dk = q.shape
    K, dv = codebook.shape[0], values.shape[-1]
    pad = -t % chunk
    n = (t + pad) // chunk
    valid = jnp.arange(t + pad) < t
    padded = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    split = lambda a: a.reshape((b, n, chunk) + a.shape[2:])  # noqa: E731
    state_dtype = U0.dtype
    onehot = jax.nn.one_hot(padded(codes), K, dtype=state_dtype) * valid[None, :, None]
    qc, kc, vc, oh = split(padded(q)), split(padded(keys)), split(padded(values)), split(onehot)
    dU = jnp.einsum("bnck,bncv->bnkv", oh, vc.astype(state_dtype))  # per-chunk sums
    dL = jnp.sum(oh, axis=2)
    exclusive = lambda d: jnp.cumsum(jnp.concatenate([jnp.zeros_like(d[:, :1]), d[:, :-1]], 1), 1)  # noqa: E731
    U_before = U0[:, None] + exclusive(dU)  # [b, n, K, dv]
    L_before = L0[:, None] + exclusive(dL)
    cache_logits = jnp.einsum("bncd,kd->bnck", qc, codebook).astype(state_dtype)
    m = jax.lax.stop_gradient(jnp.max(cache_logits, axis=-1, keepdims=True))
    w_cache = jnp.exp(cache_logits - m)
    local_logits = jnp.einsum("bncd,bnsd->bncs", qc, kc).astype(state_dtype)
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    w_local = jnp.exp(jnp.where(causal, local_logits - m, -jnp.inf))
    num = jnp.einsum("bnck,bnkv->bncv", w_cache, U_before) + jnp.einsum("bncs,bnsv->bncv", w_local, vc.astype(state_dtype))
    den = jnp.einsum("bnck,bnk->bnc", w_cache, L_before) + jnp.sum(w_local, axis=-1)
    o = (num / den[..., None]).reshape(b, n * chunk, dv)[:, :t]
    return o, U0 + jnp.sum(dU, axis=1), L0 + jnp.sum(dL, axis=1)


def codebook_attention(
    q: ArrayLike,
    keys: ArrayLike,
    values: ArrayLike,
    codes: ArrayLike,
    codebook: ArrayLike,
    *,
    initial_state: CodebookAttentionState | None = None,
    method: str = "chunked",
    chunk_size: int = 64,
) -> tuple[Array, CodebookAttentionState]:
    """Causal softmax attention over quantised keys (module docstring).

    Args:
      q: ``[batch, time, dk]`` queries (any scale, e.g. ``1/sqrt(dk)``, already applied).
      keys: ``[batch, time, dk]`` straight-through keys, equal in value to
        ``codebook[codes]`` (used inside chunks).
      values: ``[batch, time, dv]``.
      codes: integer ``[batch, time]``, the key's code.
      codebook: ``[K, dk]``.
      initial_state: the :class:`CodebookAttentionState` of the tokens before (zeros if None).
      method: ``"chunked"``, ``"quadratic"`` or ``"sequential"``.
      chunk_size: tokens per chunk of ``"chunked"`` (capped at ``time``).

    Returns:
      ``(o [batch, time, dv] in q's dtype, final state)``; the state accumulates in at
      least float32.
    """
    q, keys, values, codes, codebook = (jnp.asarray(a) for a in (q, keys, values, codes, codebook))
    check_choice("method", method, CODEBOOK_ATTENTION_METHODS)
    check_chunk_size(chunk_size)
    _check_attention_args(q, keys, values, codes, codebook, initial_state)
    b, t, _ = q.shape
    K, dv = codebook.shape[0], values.shape[-1]
    state_dtype = jnp.result_type(q.dtype, jnp.float32)
    if initial_state is None:
        U0, L0 = jnp.zeros((b, K, dv), state_dtype), jnp.zeros((b, K), state_dtype)
    else:
        U0, L0 = (jnp.asarray(a).astype(state_dtype) for a in initial_state)
    codebook = codebook.astype(q.dtype)
    if t == 0:
        return jnp.zeros((b, 0, dv), q.dtype), CodebookAttentionState(U0, L0)
    if method == "sequential":
        o, U, L = _attention_sequential(q, values, codes, codebook, U0, L0)
    else:
        chunk = t if method == "quadratic" else min(chunk_size, t)
        o, U, L = _attention_chunked(q, keys.astype(q.dtype), values, codes, codebook, U0, L0, chunk)
    return o.astype(q.dtype), CodebookAttentionState(U, L)
