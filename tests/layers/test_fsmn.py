"""fsmn (MossFormer2's dilated-FSMN recurrent module): the layer contract, a float64 oracle
written from the module's equations with explicit sums over memory lags (causal and
bidirectional), causality, and the parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.fsmn  # noqa: F401  (registers "fsmn")
from tests.layers.contract import check_contract
from tests.layers.reference import layer_in_f64, param_count, silu

D = 16
SMALL = dict(inner_channels=8, memory_order=3, memory_layers=3, conv_size=5)
TOL = dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- oracle
def ln(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def prelu(x, a):
    return np.where(x >= 0, x, a * x)


def linear(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def memory_sum(f, w, lags, dilation, taps):
    """sum over lags j of w[j] * f_{t - j * dilation}, zero outside the sequence; the
    parameter row for lag j is ``taps - 1 - j`` (causal) or centred (bidirectional)."""
    t = f.shape[1]
    out = np.zeros_like(f)
    for j in lags:
        row = (taps - 1 - j) if lags[0] == 0 else (taps // 2 - j)
        for s in range(t):
            src = s - j * dilation
            if 0 <= src < t:
                out[:, s] += w[row] * f[:, src]
    return out


def fsmn_oracle(p, x, memory_order=20, memory_layers=2, conv_size=17, bidirectional=False):
    e = p["in_proj"]["kernel"].shape[1]
    h = ln(prelu(linear(x, p["in_proj"]), p["in_prelu"]), p["in_norm"])

    def ffconv(branch):  # z + dwconv_K(z), z = silu(W LN(h) + b)
        z = silu(linear(ln(h, p[f"to_{branch}_norm"]), p[f"to_{branch}"]))
        lags = range(-(conv_size // 2), conv_size // 2 + 1) if bidirectional else range(conv_size)
        return z + memory_sum(z, p[f"conv_{branch}"], lags, 1, conv_size)

    u, v = ffconv("u"), ffconv("v")
    features = [linear(np.maximum(linear(u, p["fsmn_linear"]), 0.0), p["fsmn_project"])]
    taps = 2 * memory_order - 1 if bidirectional else memory_order
    lags = range(-(memory_order - 1), memory_order) if bidirectional else range(memory_order)
    for i in range(memory_layers):
        w = p[f"memory_{i}"]  # [taps, (i + 1) E]: dense input l, channel c at column l E + c
        m = sum(memory_sum(f, w[:, n * e:(n + 1) * e], lags, 2**i, taps) for n, f in enumerate(features))
        features.append(prelu(ln(m, p[f"memory_{i}_norm"]), p[f"memory_{i}_prelu"]))
    g = v * (u + features[-1]) + h
    return linear(ln(g, p["out_norm"]), p["out_proj"])


# ----------------------------------------------------------------------------- tests
@pytest.mark.slow  # SMALL: test_contract.py
def test_contract_memory_order_4():
    fields = dict(memory_order=4)
    check_contract("fsmn", **fields)


@pytest.mark.parametrize("fields", [{}, SMALL, dict(SMALL, bidirectional=True), dict(bidirectional=True)])
def test_layer_equals_oracle(fields):
    _, params, x, y = layer_in_f64("fsmn", D, time=23, **fields)
    np.testing.assert_allclose(y, fsmn_oracle(params["params"], x, **{k: v for k, v in fields.items()
                                                                      if k != "inner_channels"}), **TOL)


def test_causal_and_bidirectional_memory():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 30, D))
    changed = x.at[:, 20:].add(1.0)
    for bidirectional in (False, True):
        layer = ssmjax.layers.get("fsmn", d_model=D, bidirectional=bidirectional, **SMALL)
        params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
        apply = jax.jit(layer.apply)
        before, after = apply(params, x), apply(params, changed)
        past = np.abs(np.asarray(before - after)[:, :20]).max()
        # receptive field of the future: (N - 1)(1 + 2 + 4) memory frames + 2 conv frames
        assert (past > 1e-3) if bidirectional else (past == 0.0)
    with pytest.raises(ValueError, match="state"):
        layer.apply(params, x, return_state=True)
    with pytest.raises(ValueError, match="conv_size"):
        ssmjax.layers.get("fsmn", d_model=D, bidirectional=True, conv_size=4).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("fields", [{}, SMALL, dict(SMALL, bidirectional=True)])
def test_parameter_count(fields):
    layer = ssmjax.layers.get("fsmn", d_model=D, **fields)
    e, n, k = fields.get("inner_channels", D), fields.get("memory_order", 20), fields.get("conv_size", 17)
    taps = 2 * n - 1 if fields.get("bidirectional") else n
    layers = fields.get("memory_layers", 2)
    expected = ((D + 1) * e + 1 + 2 * e) + 2 * (2 * e + (e + 1) * e + k * e) + (e + 1) * e + e * e
    expected += sum((i + 1) * e * taps + 3 * e for i in range(layers)) + 2 * e + (e + 1) * D
    assert param_count(jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 4, D)))) == expected
