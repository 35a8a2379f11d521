"""Plain float64 numpy building blocks for the layer oracles of the linear-attention family
(test_linear_attention, test_hgrn, test_deltanet, test_aaren, test_lightnet).

Each test writes its layer's recurrence as an explicit loop over tokens from the paper's
equations; these helpers are only the non-recurrent pieces (projections, activations,
norms, the short convolution, RoPE), written independently of the layer code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import ssmjax.layers


def to_f64(tree):
    """Every floating leaf as a float64 jax array (ints untouched); numpy functions in the
    oracles read them as arrays."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def layer_in_f64(name: str, d_model: int = 16, batch: int = 2, time: int = 12, seed: int = 0, **fields):
    """``(layer, params, x, y)``: the layer initialised in float32, then its params and a
    random input cast to float64 and the float64 output (the layer computes in the input
    dtype, so this measures the algorithm, not rounding)."""
    layer = ssmjax.layers.get(name, d_model=d_model, **fields)
    x32 = jax.random.normal(jax.random.PRNGKey(seed), (batch, time, d_model), jnp.float32)
    params = to_f64(jax.jit(layer.init)(jax.random.PRNGKey(seed + 1), x32))
    x = np.asarray(x32, np.float64)
    y = np.asarray(jax.jit(layer.apply)(params, jnp.asarray(x)))
    assert y.dtype == np.float64
    return layer, params, x, y


def dense(x, kernel, bias=None, axes: int = 1):
    """``x`` contracted with a Flax (Dense)General kernel over its last ``axes`` axes."""
    y = np.tensordot(x, kernel, axes=axes)
    return y if bias is None else y + bias


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def softplus(x):
    return np.log1p(np.exp(x))


def rms_norm(x, weight=None, eps=1e-5):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def layer_norm(x, weight=None, eps=1e-5):
    return rms_norm(x - x.mean(-1, keepdims=True), weight, eps)


def causal_conv(x, weight, bias=None):
    """``y_t = sum_j weight[j] x_{t - K + 1 + j}`` (zeros before the start), per channel."""
    k = weight.shape[0]
    padded = np.concatenate([np.zeros((x.shape[0], k - 1, x.shape[2])), x], axis=1)
    y = sum(padded[:, j:j + x.shape[1]] * weight[j] for j in range(k))
    return y if bias is None else y + bias


def rope(x, position, base=10000.0):
    """Rotate channel pairs ``(i, i + d/2)`` of ``x [..., d]`` by ``position * base^(-i/(d/2))``."""
    half = x.shape[-1] // 2
    angle = position * base ** (-np.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x1 * np.sin(angle) + x2 * np.cos(angle)], -1)


def heads(x, h):
    return x.reshape(x.shape[:-1] + (h, x.shape[-1] // h))


def param_count(params) -> int:
    return sum(int(np.size(a)) for a in jax.tree.leaves(params))
