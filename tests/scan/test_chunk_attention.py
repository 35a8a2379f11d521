"""ssmjax.scan.chunk_attention: chunked attention on the chunk grid == the token-by-token
oracle in float64 (outputs and caches, from a fresh sequence and from mid-chunk caches), and
any split of a sequence continues exactly through the cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.scan.chunk_attention import chunked_attention_sequential, chunked_attention_with_cache

B, Z, E, CHUNK = 2, 3, 5, 4
TOL = dict(rtol=1e-12, atol=1e-12)
fast = jax.jit(chunked_attention_with_cache, static_argnames="chunk")


def inputs(time, seed=0):
    q, k, v = (jax.random.normal(key, (B, time, n), jnp.float64)
               for key, n in zip(jax.random.split(jax.random.PRNGKey(seed), 3), (Z, Z, E)))
    return q, k, v


def cache_at(position, seed=1):
    """A cache holding ``position % CHUNK`` random keys/values, zeros after them."""
    filled = position % CHUNK
    k, v = (jax.random.normal(key, (B, CHUNK, n), jnp.float64)
            for key, n in zip(jax.random.split(jax.random.PRNGKey(seed)), (Z, E)))
    keep = (jnp.arange(CHUNK) < filled)[None, :, None]
    return jnp.where(keep, k, 0.0), jnp.where(keep, v, 0.0)


@pytest.mark.parametrize("time", [1, 4, 11])
def test_fresh_sequence_equals_oracle(time):
    q, k, v = inputs(time)
    o, _, _ = fast(q, k, v, None, None, jnp.zeros((), jnp.int32), chunk=CHUNK)
    o_ref, _, _ = chunked_attention_sequential(q, k, v, None, None, 0, CHUNK)
    np.testing.assert_allclose(o, o_ref, **TOL)


@pytest.mark.parametrize("position,time", [(0, 7), (6, 1), (6, 9), (8, 3), (13, 4)])
def test_cached_continuation_equals_oracle(position, time):
    q, k, v = inputs(time)
    cache_k, cache_v = cache_at(position)
    got = fast(q, k, v, cache_k, cache_v, jnp.asarray(position, jnp.int32), chunk=CHUNK)
    want = chunked_attention_sequential(q, k, v, cache_k, cache_v, position, CHUNK)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, **TOL)


def test_any_split_continues_exactly():
    q, k, v = inputs(11)
    zeros = cache_at(0)
    o, _, _ = fast(q, k, v, None, None, jnp.zeros((), jnp.int32), chunk=CHUNK)
    for split in (1, 5, 8):
        o1, ck, cv = fast(q[:, :split], k[:, :split], v[:, :split], *zeros, jnp.zeros((), jnp.int32), chunk=CHUNK)
        o2, _, _ = fast(q[:, split:], k[:, split:], v[:, split:], ck, cv, jnp.asarray(split, jnp.int32), chunk=CHUNK)
        np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), o, **TOL)
