"""ssmjax.scan.lightnet: the additive recurrence as gated linear attention (additive_gates
into gated_linear_attention) == the sums M, Z token by token, in float64, from an empty
state and from a carried one; the gates' exponents are never positive."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.scan.gla import gated_linear_attention
from ssmjax.scan.lightnet import additive_attention_sequential, additive_gates
from tests.scan.compiled import compiled

B, T, H, DK, DV = 2, 9, 2, 3, 4


def test_additive_gates_exponents_are_non_positive():
    key_logits = 30.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 50, H, 4))
    keys, log_decay, z = additive_gates(key_logits, jnp.full((2, H, 4), -jnp.inf))
    assert float(keys.max()) <= 1.0 and float(log_decay.max()) <= 1e-12
    np.testing.assert_allclose(z, jax.scipy.special.logsumexp(key_logits, axis=1), rtol=1e-12)


@pytest.mark.parametrize("empty", [True, False])
def test_gated_form_equals_additive_sums(empty):
    q, key_logits, v, S0, z0 = (
        jax.random.normal(key, shape, jnp.float64)
        for key, shape in zip(jax.random.split(jax.random.PRNGKey(1), 5),
                              [(B, T, H, DK), (B, T, H, DK), (B, T, H, DV), (B, H, DK, DV), (B, H, DK)]))
    if empty:
        S0, z0 = jnp.zeros_like(S0), jnp.full_like(z0, -jnp.inf)
    keys, log_decay, z = compiled(additive_gates)(key_logits, z0)
    o, S = compiled(gated_linear_attention)(q, keys, v, log_decay=log_decay, initial_state=S0, chunk_size=4,
                                            method="chunked")
    o_ref, S_ref, z_ref = compiled(additive_attention_sequential)(q, key_logits, v, S0, z0)
    np.testing.assert_allclose(o, o_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S, S_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(z, z_ref, rtol=1e-12)
