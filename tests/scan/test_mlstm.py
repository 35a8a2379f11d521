"""ssmjax.scan.mlstm: the gated-linear-attention form == the sequential stabilised
recurrence (outputs, final states, gradients) == the paper's unstabilised equations, all in
float64; split sequences continue exactly; bad shapes name the argument."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.scan.mlstm import MLSTMState, init_mlstm_state, mlstm, mlstm_sequential
from tests.layers.test_mlstm import mlstm_memory_oracle, random_mlstm_inputs

TOL = dict(rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method,chunk_size", [("sequential", 64), ("chunked", 4), ("chunked", 64)])
def test_mlstm_stabilised_equals_unstabilised(method, chunk_size):
    """Both forms (and the paper's stabilised loop) == the unstabilised equations, with
    input-gate pre-activations of +-12 (no overflow in float64)."""
    q, k, v, i_pre, log_f = random_mlstm_inputs(0)
    unstabilised = mlstm_memory_oracle(q, k, v, i_pre, log_f, stabilised=False)
    np.testing.assert_allclose(mlstm_memory_oracle(q, k, v, i_pre, log_f, stabilised=True), unstabilised, rtol=1e-9)
    h, _ = jax.jit(partial(mlstm, chunk_size=chunk_size, method=method))(q, k, v, log_f, i_pre)
    np.testing.assert_allclose(h, unstabilised, **TOL)
    h_seq, _ = jax.jit(mlstm_sequential)(q, k, v, log_f, i_pre)
    np.testing.assert_allclose(h_seq, unstabilised, **TOL)


def test_mlstm_equals_sequential_states_and_gradients():
    q, k, v, i_pre, log_f = random_mlstm_inputs(2, T=9)
    b, _, nh, dk = q.shape
    m0 = jnp.linspace(-1.0, 1.0, b * nh).reshape(b, nh)
    state = MLSTMState(0.1 * jax.random.normal(jax.random.PRNGKey(5), (b, nh, dk, v.shape[-1] + 1)), m0)
    fast = jax.jit(partial(mlstm, chunk_size=4, method="chunked"))
    h, last = fast(q, k, v, log_f, i_pre, initial_state=state)
    h_seq, last_seq = jax.jit(mlstm_sequential)(q, k, v, log_f, i_pre, initial_state=state)
    np.testing.assert_allclose(h, h_seq, **TOL)
    np.testing.assert_allclose(last.m, last_seq.m, rtol=1e-12)
    np.testing.assert_allclose(last.C, last_seq.C, **TOL)

    def loss(op, args):
        return jnp.sum(jnp.sin(op(*args, initial_state=state)[0]))

    grads = jax.grad(partial(loss, fast))((q, k, v, log_f, i_pre))
    grads_seq = jax.grad(partial(loss, mlstm_sequential))((q, k, v, log_f, i_pre))
    for g, g_seq in zip(grads, grads_seq, strict=True):
        np.testing.assert_allclose(g, g_seq, rtol=1e-8, atol=1e-10)


def test_mlstm_split_state_with_stabiliser():
    q, k, v, i_pre, log_f = random_mlstm_inputs(1)
    cell = jax.jit(partial(mlstm, chunk_size=4))
    h, last = cell(q, k, v, log_f, i_pre)
    h1, mid = cell(*(a[:, :6] for a in (q, k, v, log_f, i_pre)))
    h2, last2 = cell(*(a[:, 6:] for a in (q, k, v, log_f, i_pre)), initial_state=mid)
    np.testing.assert_allclose(np.concatenate([h1, h2], 1), h, rtol=1e-10)
    # the stabiliser is the running max of the paper, so the carried states agree exactly
    np.testing.assert_allclose(last2.m, last.m, rtol=1e-12)
    np.testing.assert_allclose(last2.C, last.C, rtol=1e-10, atol=1e-14)


def test_mlstm_bad_shapes_name_the_argument():
    q, k, v, i_pre, log_f = random_mlstm_inputs(0, T=3)
    with pytest.raises(ValueError, match="^log_f: expected shape"):
        mlstm(q, k, v, log_f[:, :2], i_pre)
    with pytest.raises(ValueError, match="^v: expected shape"):
        mlstm_sequential(q, k, v[:, :2], log_f, i_pre)
    with pytest.raises(ValueError, match=r"^initial_state.C: expected shape"):
        mlstm(q, k, v, log_f, i_pre, initial_state=init_mlstm_state(2, 2, 4, 5, jnp.float64))
