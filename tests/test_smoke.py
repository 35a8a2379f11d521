"""The quick tier (``make test-quick``): every public scan op and every registered layer
runs once at a tiny size.

Scan ops: each non-kernel method agrees with the sequential oracle (float64, a handful of
tokens). Layers: the forward pass keeps the input shape and is finite, and one ``step``
from ``init_state`` reproduces the first output token. The full checks (gradients,
split sequences, long sequences, kernels) live in the per-module tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.scan as scan
from tests.layers.test_contract import NO_STEP

pytestmark = pytest.mark.quick

B, T, H, D = 2, 8, 2, 4


def _normal(key: int, shape, scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float64)


def _close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-9, atol=1e-9)


def _linear_scan(method):
    a = jax.nn.sigmoid(_normal(0, (B, T, D)))
    return scan.linear_scan(a, _normal(1, (B, T, D)), method=method, chunk_size=4)


def _matrix_scan(method):
    A = 0.3 * _normal(0, (B, T, D, D))
    return scan.matrix_scan(A, _normal(1, (B, T, D)), method=method, chunk_size=4)


def _selective_scan(method):
    u, delta = _normal(0, (B, T, D)), jax.nn.softplus(_normal(1, (B, T, D)))
    A = -jnp.exp(_normal(2, (D, 3)))
    return scan.selective_scan(u, delta, A, _normal(3, (B, T, 3)), _normal(4, (B, T, 3)), method=method,
                               chunk_size=4)


def _qkv():
    return _normal(0, (B, T, H, D)), _normal(1, (B, T, H, D)), _normal(2, (B, T, H, D))


def _gla(method):
    q, k, v = _qkv()
    g = -jax.nn.softplus(_normal(3, (B, T, H, D)))
    return scan.gated_linear_attention(q, k, v, log_decay=g, method=method, chunk_size=4)


def _delta_rule(method):
    q, k, v = _qkv()
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(_normal(3, (B, T, H)))
    return scan.delta_rule(q, k, v, beta, log_decay=-jax.nn.softplus(_normal(4, (B, T, H))), method=method,
                           chunk_size=4)


def _prefix_softmax(method):
    return scan.prefix_softmax_attention(_normal(0, (B, T, H)), _normal(1, (B, T, H, D)), method=method)


SCAN_OPS = {
    "linear_scan": (_linear_scan, ("associative", "chunked")),
    "matrix_scan": (_matrix_scan, ("associative", "chunked")),
    "selective_scan": (_selective_scan, ("associative", "chunked")),
    "gated_linear_attention": (_gla, ("parallel", "chunked")),
    "delta_rule": (_delta_rule, ("chunked",)),
    "prefix_softmax_attention": (_prefix_softmax, ("associative",)),
}


@pytest.mark.parametrize("op", SCAN_OPS)
def test_scan_op_methods_agree_with_the_oracle(op):
    run, methods = SCAN_OPS[op]
    oracle = run("sequential")
    for method in (*methods, "auto"):
        _close(run(method), oracle)


def test_nonlinear_rnn_newton_agrees_with_the_sequential_cell():
    gx = _normal(0, (B, T, 4, H, D), 0.5)
    R = _normal(1, (4, H, D, D), 0.3)
    ys, _ = scan.nonlinear_rnn("lstm", gx, R)
    ys_newton, _ = scan.nonlinear_rnn("lstm", gx, R, method="newton")
    np.testing.assert_allclose(ys_newton, ys, rtol=1e-6, atol=1e-6)


def test_causal_softmax_attention_is_softmax_of_the_prefix():
    q, k, v = _qkv()
    out = scan.causal_softmax_attention(q, k, v)
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-12)  # the first token attends to itself only


@pytest.mark.parametrize("name", ssmjax.layers.names())
def test_layer_runs_and_its_first_step_matches(name):
    layer = ssmjax.layers.get(name, d_model=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8), jnp.float32)
    params = layer.init(jax.random.PRNGKey(1), x)
    y = layer.apply(params, x)
    assert y.shape == x.shape and bool(jnp.isfinite(y).all()), name
    if name in NO_STEP:
        return
    state = layer.apply(params, 1, x.dtype, method="init_state")
    y0, _ = layer.apply(params, x[:, 0], state, method="step")
    np.testing.assert_allclose(y0, y[:, 0], rtol=1e-4, atol=1e-4)
