"""Causal softmax attention inside fixed chunks aligned to absolute positions, continuing
a partial chunk from a cache (the chunked attention of MEGA, Ma et al., 2023, "Mega: Moving
Average Equipped Gated Attention", and TCNCA, Terzic et al., 2023)::

    o_t = sum_{s in chunk(t), s <= t} softmax_s(q_t . k_s / sqrt(Z)) v_s,
    chunk(t) = {s : floor(s / L) = floor(t / L)}   (absolute positions, L = chunk)

The cache holds the keys / values of the current chunk's tokens seen so far, so a sequence
split anywhere (or decoded token by token) continues exactly.

* :func:`chunked_attention_sequential` is the oracle: each token attends to the keys of its
  chunk, one token at a time.
* :func:`chunked_attention_with_cache` lays the tokens out on the chunk grid and runs
  :func:`~ssmjax.scan.softmax_attention.causal_softmax_attention` per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import Float

from ssmjax.scan.softmax_attention import causal_softmax_attention


def chunked_attention_with_cache(
    q: Float[Array, "b t z"],
    k: Float[Array, "b t z"],
    v: Float[Array, "b t e"],
    cache_k: Float[Array, "b c z"] | None,
    cache_v: Float[Array, "b c e"] | None,
    position: Array,
    chunk: int,
):
    """Causal softmax attention inside chunks of ``chunk`` tokens aligned to absolute
    positions, continuing a partial chunk: ``cache_k/v [b, chunk, .]`` hold the keys/values
    of the current chunk's first ``position % chunk`` tokens (zeros after them).

    The tokens are laid out on the chunk grid (``cache ++ new`` written at offset
    ``position % chunk``), attended chunk by chunk, and read back. Returns ``(o, cache_k,
    cache_v)`` with the new partial chunk (``None`` caches: a fresh sequence, no cache out).
    """
    batch, time, _ = q.shape
    if cache_k is None:
        offset, length = 0, -(-time // chunk) * chunk
        grid = lambda new, old: jnp.pad(new, ((0, 0), (0, length - time), (0, 0)))  # noqa: E731
    else:
        offset = position % chunk
        length = (-(-(chunk + time) // chunk) + 1) * chunk

        def grid(new, old):
            base = jnp.zeros((batch, length, new.shape[-1]), new.dtype) if old is None else jnp.concatenate(
                [old.astype(new.dtype), jnp.zeros((batch, length - chunk, new.shape[-1]), new.dtype)], 1)
            return jax.lax.dynamic_update_slice_in_dim(base, new, offset, axis=1)

    q_g, k_g, v_g = grid(q, None), grid(k, cache_k), grid(v, cache_v)
    n = length // chunk
    per_chunk = lambda u: u.reshape(batch * n, chunk, 1, u.shape[-1])  # noqa: E731
    o = causal_softmax_attention.single_device(per_chunk(q_g), per_chunk(k_g), per_chunk(v_g))  # within chunks
    o = jax.lax.dynamic_slice_in_dim(o.reshape(batch, length, -1), offset, time, axis=1)
    if cache_k is None:
        return o, None, None
    filled = (position + time) % chunk
    start = offset + time - filled  # grid index of the new partial chunk's first token
    keep = (jnp.arange(chunk) < filled)[None, :, None]
    new_cache = lambda u: jnp.where(keep, jax.lax.dynamic_slice_in_dim(u, start, chunk, axis=1), 0)  # noqa: E731
    return o, new_cache(k_g), new_cache(v_g)


def chunked_attention_sequential(
    q: Float[Array, "b t z"],
    k: Float[Array, "b t z"],
    v: Float[Array, "b t e"],
    cache_k: Float[Array, "b c z"] | None,
    cache_v: Float[Array, "b c e"] | None,
    position: int,
    chunk: int,
):
    """The oracle of :func:`chunked_attention_with_cache` (same arguments and returns;
    ``position`` a Python int): token ``t`` at absolute position ``p = position + t``
    attends to the keys at positions ``p - p mod chunk .. p``, read from the cache for
    positions before ``position``."""
    batch, time, _ = q.shape
    offset = position % chunk
    if cache_k is None:
        assert offset == 0, "a fresh sequence starts at a chunk boundary"
        cache_k, cache_v = jnp.zeros((batch, chunk, k.shape[-1]), k.dtype), jnp.zeros((batch, chunk, v.shape[-1]), v.dtype)
        fresh = True
    else:
        fresh = False
    keys = jnp.concatenate([cache_k[:, :offset], k], 1)  # positions position - offset .. position + time - 1
    values = jnp.concatenate([cache_v[:, :offset], v], 1)
    outputs = []
    for t in range(time):
        j = offset + t  # index of token t in keys
        first = j - (position + t) % chunk
        logits = jnp.einsum("bz,bsz->bs", q[:, t], keys[:, first : j + 1]) / np.sqrt(q.shape[-1])
        outputs.append(jnp.einsum("bs,bse->be", jax.nn.softmax(logits, axis=-1), values[:, first : j + 1]))
    o = jnp.stack(outputs, 1)
    if fresh:
        return o, None, None
    filled = (position + time) % chunk
    tail = lambda u: jnp.pad(u[:, u.shape[1] - filled :], ((0, 0), (0, chunk - filled), (0, 0)))  # noqa: E731
    return o, tail(keys), tail(values)
