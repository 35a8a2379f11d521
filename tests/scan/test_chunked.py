"""``ssmjax.scan._chunked.pass_states``, the state passing across chunks shared by gated
linear attention and the delta rule, against a plain ``lax.scan`` of its recurrence

    delta_n = U_n - W_n S_in,   S_out = a_n * S_in + K_n^T delta_n,   y_n = A_n delta_n + Q_n S_in

differentiated by JAX (values and every gradient), and its custom VJP against finite
differences (``check_grads``); float64 throughout (``tests/conftest.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ssmjax.scan._chunked import ChunkTerms, pass_states

N, B, H, C, DK, DV = 3, 2, 2, 5, 4, 3
TOL = dict(rtol=1e-12, atol=1e-12)


def random_terms(seed, decay_width, with_w):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape))  # noqa: E731
    terms = ChunkTerms(
        A=normal(N, B, H, C, C),
        Q=normal(N, B, H, C, DK),
        K=normal(N, B, H, C, DK),
        a=jnp.asarray(rng.uniform(0.2, 1.0, size=(N, B, H, decay_width))),
        U=normal(N, B, H, C, DV),
        W=normal(N, B, H, C, DK) if with_w else None,
    )
    return terms, normal(B, H, DK, DV)


def sequential_pass_states(terms, initial_state):
    """The recurrence chunk by chunk, written from the equation (no custom VJP)."""

    def step(S, chunk):
        A, Q, K, a, U, W = chunk
        delta = U if W is None else U - W @ S
        S_out = a[..., None] * S + jnp.swapaxes(K, -1, -2) @ delta
        return S_out, A @ delta + Q @ S

    final_state, y = jax.lax.scan(step, initial_state, terms)
    return y, final_state


def loss(fn, terms, initial_state, dy, d_final):
    y, final_state = fn(terms, initial_state)
    return jnp.sum(y * dy) + jnp.sum(final_state * d_final)


CASES = [(1, False), (DK, False), (1, True), (DK, True)]


@pytest.mark.parametrize("decay_width, with_w", CASES)
def test_matches_sequential_values_and_gradients(decay_width, with_w):
    terms, s0 = random_terms(0, decay_width, with_w)
    rng = np.random.default_rng(1)
    dy = jnp.asarray(rng.normal(size=(N, B, H, C, DV)))
    d_final = jnp.asarray(rng.normal(size=s0.shape))
    for got, want in zip(pass_states(terms, s0), sequential_pass_states(terms, s0)):
        np.testing.assert_allclose(got, want, **TOL)
    grad = jax.grad(loss, argnums=(1, 2))
    got = grad(jax.jit(pass_states), terms, s0, dy, d_final)
    want = grad(sequential_pass_states, terms, s0, dy, d_final)
    assert (got[0].W is None) == (not with_w)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize("decay_width, with_w", CASES)
def test_check_grads_finite_differences(decay_width, with_w):
    terms, s0 = random_terms(2, decay_width, with_w)
    check_grads(jax.jit(pass_states), (terms, s0), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
