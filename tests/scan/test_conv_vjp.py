"""The custom VJP of ``causal_conv1d``: gradients of every input (x, weight, bias, the
initial state) equal autodiff through a plain per-token float64 oracle, with packed
documents and with more taps than tokens. On CPU both evaluations: the C++ kernels
(``ssmjax/scan/_conv_cpu.cc``, where they build) and the XLA one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.scan import _ffi
from ssmjax.scan.conv import causal_conv1d


def conv_oracle(x, weight, bias, history, segment_ids):
    """``y_t = bias + sum_j weight[j] * u_{t-k+1+j}`` over ``u = [history, x]``, taps
    outside the token's document (``segment_ids``; history belongs to the first) are 0."""
    k, time = weight.shape[0], x.shape[1]
    u = jnp.concatenate([history, x], axis=1)
    doc = jnp.concatenate([jnp.repeat(segment_ids[:, :1], k - 1, axis=1), segment_ids], axis=1)
    rows = []
    for t in range(time):
        p = t + k - 1  # position of token t in u
        rows.append(bias + sum(jnp.where((doc[:, p - (k - 1) + j] == doc[:, p])[:, None], u[:, p - (k - 1) + j], 0)
                               * weight[j] for j in range(k)))
    return jnp.stack(rows, axis=1)


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("k, time", [(4, 9), (6, 3)])
def test_gradients_match_the_oracle(k, time, kernels):
    keys = jax.random.split(jax.random.key(0), 5)
    batch, channels = 2, 3
    x = jax.random.normal(keys[0], (batch, time, channels), jnp.float64)
    weight = jax.random.normal(keys[1], (k, channels), jnp.float64)
    bias = jax.random.normal(keys[2], (channels,), jnp.float64)
    history = jax.random.normal(keys[3], (batch, k - 1, channels), jnp.float64)
    segment_ids = jnp.array([[0] * (time // 2) + [1] * (time - time // 2), [0] * time])
    cotangent = jax.random.normal(keys[4], (batch, time, channels), jnp.float64)

    def ours(x, weight, bias, history):
        return causal_conv1d(x, weight, bias, initial_state=history, segment_ids=segment_ids)[0]

    def oracle(x, weight, bias, history):
        return conv_oracle(x, weight, bias, history, segment_ids)

    def value_and_vjp(fn):
        return jax.jit(lambda *args: (fn(*args), jax.vjp(fn, *args)[1](cotangent)))

    args = (x, weight, bias, history)
    with _ffi.cpu_kernels(kernels):
        y, grads = value_and_vjp(ours)(*args)
    y_ref, grads_ref = value_and_vjp(oracle)(*args)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernels", [True, False])
def test_gradient_of_the_final_state(kernels):
    """The returned state (the last k - 1 inputs) is differentiable too."""
    x = jax.random.normal(jax.random.key(1), (1, 5, 2), jnp.float64)
    weight = jnp.ones((3, 2), jnp.float64)
    with _ffi.cpu_kernels(kernels):
        grad = jax.jit(jax.grad(lambda x: jnp.sum(causal_conv1d(x, weight)[1])))(x)
    np.testing.assert_array_equal(grad[0, :, 0], [0, 0, 0, 1, 1])
