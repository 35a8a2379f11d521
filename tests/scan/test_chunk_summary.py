"""ssmjax.scan.chunk_summary: the vectorised attention over chunk summaries == the
query-by-query oracle in float64, with rows that see no summary, some, or all of them."""

import jax
import jax.numpy as jnp
import numpy as np

from ssmjax.scan.chunk_summary import attend_chunk_summaries, attend_chunk_summaries_sequential


def test_attend_chunk_summaries_equals_oracle():
    b, t, n, h, d = 2, 7, 3, 2, 4
    q, k_sum, v_sum, k_own, v_own = (
        jax.random.normal(key, shape, jnp.float64)
        for key, shape in zip(jax.random.split(jax.random.PRNGKey(0), 5),
                              [(b, t, h, d), (b, n, h, d), (b, n, h, d), (b, t, h, d), (b, t, h, d)]))
    chunk_of = jnp.arange(t) // 2  # chunks of 2 tokens: query t sees the summaries of earlier chunks
    visible = jnp.arange(n)[None] < chunk_of[:, None]
    assert not bool(visible[0].any()) and bool(visible[-1].all())
    got = jax.jit(attend_chunk_summaries)(q, k_sum, v_sum, visible, k_own, v_own)
    want = attend_chunk_summaries_sequential(q, k_sum, v_sum, visible, k_own, v_own)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[:, 0], v_own[:, 0], rtol=1e-12)  # no summary seen: the own value
