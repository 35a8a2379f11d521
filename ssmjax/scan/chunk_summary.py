"""Softmax attention over chunk summaries plus one per-query key: the inter-chunk attention
of RAT (Wei, Yadav, Pascanu and Gulcehre, 2025, "RAT: Bridging RNN Efficiency and Attention
Accuracy in Language Modeling")::

    o_t = softmax([q_t . K_j]_{j visible to t} ++ [q_t . k_t]) [V_j ; v_t] / sqrt(d)

``K_j, V_j`` summarise chunk ``j`` (the state of the intra-chunk recurrence at its last
token), ``k_t, v_t`` are the query's own running state. Every query has its own extra key,
so no row is fully masked; ``jax.nn.dot_product_attention`` has no per-query key, so the
attention is written out (:func:`attend_chunk_summaries`), with a token-by-token oracle
(:func:`attend_chunk_summaries_sequential`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Bool, Float


def attend_chunk_summaries(
    q: Float[Array, "b t h d"],
    k_sum: Float[Array, "b n h d"],
    v_sum: Float[Array, "b n h d"],
    visible: Bool[Array, "t n"],
    k_own: Float[Array, "b t h d"],
    v_own: Float[Array, "b t h d"],
) -> Float[Array, "b t h d"]:
    """``softmax([q . k_sum_j]_{visible j} ++ [q . k_own]) [v_sum; v_own] / sqrt(d)``: every
    query has its own extra key, so no row is fully masked."""
    scale = q.shape[-1] ** -0.5
    logits = scale * jnp.einsum("bthd,bnhd->bthn", q, k_sum)
    logits = jnp.where(visible[None, :, None, :], logits, -jnp.inf)
    own = scale * jnp.sum(q * k_own, -1, keepdims=True)  # [b, t, h, 1]
    weights = jax.nn.softmax(jnp.concatenate([logits, own], -1), axis=-1)
    return jnp.einsum("bthn,bnhd->bthd", weights[..., :-1], v_sum) + weights[..., -1:] * v_own


def attend_chunk_summaries_sequential(
    q: Float[Array, "b t h d"],
    k_sum: Float[Array, "b n h d"],
    v_sum: Float[Array, "b n h d"],
    visible: Bool[Array, "t n"],
    k_own: Float[Array, "b t h d"],
    v_own: Float[Array, "b t h d"],
) -> Float[Array, "b t h d"]:
    """The oracle of :func:`attend_chunk_summaries`: one query at a time, the visible
    summaries gathered explicitly (``visible`` concrete), the own key appended."""
    scale = q.shape[-1] ** -0.5
    outputs = []
    for t in range(q.shape[1]):
        seen = [j for j in range(k_sum.shape[1]) if bool(visible[t, j])]
        keys = jnp.concatenate([k_sum[:, seen], k_own[:, t, None]], 1)  # [b, |seen| + 1, h, d]
        values = jnp.concatenate([v_sum[:, seen], v_own[:, t, None]], 1)
        weights = jax.nn.softmax(scale * jnp.einsum("bhd,bnhd->bhn", q[:, t], keys), axis=-1)
        outputs.append(jnp.einsum("bhn,bnhd->bhd", weights, values))
    return jnp.stack(outputs, 1)
