"""Non-linear RNN mixers (lstm, gru, elman, slstm, rhn): the layer contract for every layer
and evaluation method, parameter counts, each layer against a float64 numpy forward of its
equations on the layer's own parameters (the cells from the independent oracle of
tests/scan/test_rnn.py, the glue written here), the hybrid options (attention over the
last W hidden states, neural output gating), packed sequences, and bad options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
from tests.layers.contract import build, check_contract
from tests.layers.reference import (
    causal_conv,
    dense,
    layer_in_f64,
    layer_norm,
    param_count,
    sigmoid,
    silu,
)
from tests.scan.test_rnn import oracle as cell_oracle

D = 16
NAMES = ("lstm", "gru", "elman", "slstm", "rhn")
CELL = {"lstm": "lstm", "gru": "gru", "elman": "elman", "rhn": "rhn"}


# ----------------------------------------------------------------------------- contract
def check_initialisation(name, params):
    """LSTM forget bias 1, RHN transform bias -2, sLSTM forget bias linspace(3, 6)."""
    bias = np.asarray(params["params"]["bias"])
    if name == "lstm":
        assert np.all(bias[1] == 1.0) and not np.any(bias[[0, 2, 3]])
    elif name == "rhn":
        assert np.all(bias[1::2] == -2.0) and not np.any(bias[0::2])
    elif name == "slstm":
        np.testing.assert_allclose(bias[1].reshape(-1), np.linspace(3, 6, D), rtol=1e-6)
        assert not np.any(bias[[0, 2, 3]])


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    """Built with d_model alone: causal, sequential, no attention, no gating (its contract,
    call == steps, split calls, finite gradients, is test_contract.py)."""
    layer, params, _ = build(name)
    assert layer.method == "sequential" and layer.attention_window == 0 and layer.output_gating == "none"
    check_initialisation(name, params)


@pytest.mark.parametrize("name", ["lstm", pytest.param("gru", marks=pytest.mark.slow), "slstm"])
def test_contract_newton(name):
    """method="newton" in float32 (default tolerance 1e-5 on the residual): call == steps
    (the step is the sequential cell) and split calls agree at the contract's tolerance.
    The solver's iteration count and convergence flag are sown as intermediates."""
    layer, params, x = check_contract(name, method="newton", num_heads=2)
    _, sown = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(params, x)
    assert int(sown["intermediates"]["newton_iterations"][0]) >= 1
    assert bool(sown["intermediates"]["newton_converged"][0])


@pytest.mark.parametrize("name, fields", [
    ("rhn", dict(attention_window=4, attention_heads=2, output_gating="input", num_heads=2, depth=2)),
    pytest.param("lstm", dict(attention_window=1, output_gating="learned_rate", hidden_size=8), marks=pytest.mark.slow),
    pytest.param("gru", dict(output_gating="additive", num_heads=4), marks=pytest.mark.slow),
    pytest.param("slstm", dict(forget_gate="exp", conv_size=0, attention_window=3), marks=pytest.mark.slow),
])
def test_contract_with_options(name, fields):
    check_contract(name, **fields)


def test_pallas_method_matches_sequential():
    """method="pallas" (the kernel, interpreted on CPU) == method="sequential" (float32)."""
    layer, params, x = build("gru", num_heads=2)
    y = jax.jit(layer.apply)(params, x)
    y_pallas = jax.jit(ssmjax.layers.get("gru", d_model=D, num_heads=2, method="pallas").apply)(params, x)
    np.testing.assert_allclose(y_pallas, y, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- construction
@pytest.mark.parametrize("name, fields, count", [
    ("lstm", dict(num_heads=2, hidden_size=8), lambda d, n, H: 4 * d * n + 4 * n * n // H + 4 * n + n * d),
    ("elman", dict(num_heads=1), lambda d, n, H: d * n + n * n // H + n + n * d),
    ("gru", dict(num_heads=4), lambda d, n, H: 3 * d * n + 3 * n + 3 * n * n // H + 3 * n + n * d),
    ("rhn", dict(num_heads=2, depth=3), lambda d, n, H: 2 * d * n + 6 * (n * n // H + n) + n * d),
    ("slstm", dict(num_heads=4, conv_size=4), lambda d, n, H: 4 * d * n + 5 * d + 4 * n * n // H + 4 * n + n + n * d),
    ("lstm", dict(attention_window=3, attention_heads=2, output_gating="input"),
     lambda d, n, H: 4 * d * n + 4 * n * n + 4 * n + n * d + 4 * n * n + 2 * 3 + d * d + d),
    ("gru", dict(output_gating="learned_rate"), lambda d, n, H: 3 * d * n + 3 * n + 3 * n * n + 3 * n + n * d + d),
])
def test_parameter_counts(name, fields, count):
    layer = ssmjax.layers.get(name, d_model=D, **fields)
    shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 3, D)))
    n = fields.get("hidden_size") or D
    assert param_count(shapes) == count(D, n, layer.num_heads)


# ----------------------------------------------------------------------------- float64 oracle
def attention_oracle(h, p, window, document):
    """``h + W_a MHA`` with query ``i`` over keys ``j`` in ``(i - window, i]`` of its document,
    logits ``q.k / sqrt(e) + position_bias[head, window - 1 - (i - j)]``."""
    q, k, v = (dense(h, p[name]["kernel"], axes=2) for name in ("q_proj", "k_proj", "v_proj"))
    bias = np.asarray(p["position_bias"])
    out = np.zeros(q.shape)
    for b in range(h.shape[0]):
        for i in range(h.shape[1]):
            js = [j for j in range(max(0, i - window + 1), i + 1) if document[b, j] == document[b, i]]
            for a in range(q.shape[2]):
                logits = np.array([q[b, i, a] @ k[b, j, a] / np.sqrt(q.shape[-1]) + bias[a, window - 1 - (i - j)]
                                   for j in js])
                w = np.exp(logits - logits.max())
                out[b, i, a] = sum(wj * v[b, j, a] for wj, j in zip(w / w.sum(), js))
    return h + dense(out, p["attn_out"]["kernel"], axes=2)


def packed_conv(x, weight, bias, document):
    """The causal convolution run on every document separately (taps never cross a start)."""
    if document is None:
        return causal_conv(x, weight, bias)
    y = np.zeros(x.shape)
    for row in range(x.shape[0]):
        bounds = np.flatnonzero(np.diff(document[row], prepend=np.nan, append=np.nan))
        for s, e in zip(bounds[:-1], bounds[1:]):
            y[row, s:e] = causal_conv(x[row : row + 1, s:e], weight, bias)[0]
    return y


def layer_oracle(name, p, x, fields, document=None):
    """The layer's forward in float64 numpy from zero state (module docstring of
    ssmjax.layers.rnn); ``document [b, t]``: packed document ids."""
    p = jax.tree.map(np.asarray, p)
    if name == "slstm":
        x_c = silu(packed_conv(x, p["conv_w"], p["conv_b"], document)) if fields.get("conv_size", 4) else x
        gx = np.concatenate([dense(x_c, p["if_proj"]["kernel"]), dense(x, p["zo_proj"]["kernel"])], axis=2)
        cell = "slstm" if fields.get("forget_gate", "sigmoid") == "sigmoid" else "slstm_exp"
    else:
        gx = dense(x, p["in_proj"]["kernel"], p["in_proj"].get("bias"))
        cell = CELL[name]
    b, t, _, H, dh = gx.shape
    parts = {"lstm": 2, "slstm": 4}.get(name, 1)
    zero = tuple(np.zeros((b, H, dh)) for _ in range(parts))
    cut = None if document is None else np.diff(document, axis=1, prepend=document[:, :1]) != 0
    h, _ = cell_oracle(cell, gx, p["R"], p["bias"], zero, cut)
    if name == "slstm":
        h = layer_norm(h, p["norm_weight"], 1e-6)
    if fields.get("attention_window"):
        h = attention_oracle(h, p, fields["attention_window"], np.zeros((b, t)) if document is None else document)
    y = dense(h, p["out_proj"]["kernel"], axes=2)
    gating = fields.get("output_gating", "none")
    if gating == "additive":
        y = x + y
    elif gating == "learned_rate":
        a = sigmoid(p["rate"])
        y = (1 - a) * x + a * y
    elif gating == "input":
        g = sigmoid(dense(x, p["gate_proj"]["kernel"], p["gate_proj"]["bias"]))
        y = (1 - g) * x + g * y
    return y


@pytest.mark.parametrize("name, fields", [
    ("lstm", dict(num_heads=2, attention_window=3, output_gating="learned_rate")),
    ("gru", dict(num_heads=2, output_gating="additive")),
    ("elman", dict()),
    ("rhn", dict(depth=3, num_heads=2, attention_window=4, attention_heads=2, output_gating="input")),
    ("slstm", dict()),
    ("slstm", dict(forget_gate="exp", conv_size=0)),
])
def test_matches_float64_oracle(name, fields):
    _, params, x, y = layer_in_f64(name, **fields)
    np.testing.assert_allclose(y, layer_oracle(name, params["params"], x, fields), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name, fields", [("lstm", dict(attention_window=3)), ("slstm", dict()),
                                          pytest.param("lstm", dict(method="newton", num_heads=2),
                                                       marks=pytest.mark.slow)])
def test_packed_sequences_restart_everything(name, fields):
    """segment_ids: the recurrent state, the conv taps and the attention window restart at
    every document start (== the float64 oracle run on every document separately);
    ``reset`` marking the same starts gives the same output."""
    layer, params, x, _ = layer_in_f64(name, time=12, **fields)
    ids = np.array([[0] * 5 + [1] * 7, [3] * 2 + [4] * 10])
    reset = np.diff(ids, axis=1, prepend=-1) != 0
    both = jax.jit(lambda p, x, s, r: (layer.apply(p, x, segment_ids=s), layer.apply(p, x, reset=r)))
    y, y_reset = both(params, x, jnp.asarray(ids), jnp.asarray(reset))
    np.testing.assert_allclose(y, layer_oracle(name, params["params"], x, fields, document=ids), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(y_reset, y, rtol=1e-10, atol=1e-11)


def test_bfloat16_activations_keep_float32_state():
    layer = ssmjax.layers.get("slstm", d_model=D, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, D), jnp.bfloat16)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    y, state = jax.jit(lambda p, x: layer.apply(p, x, return_state=True))(params, x)
    assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())
    assert all(s.dtype == jnp.float32 for s in state["cell"])


@pytest.mark.parametrize("name, fields, match", [
    ("lstm", dict(output_gating="sigmoid"), "output_gating"),
    ("lstm", dict(num_heads=3), "num_heads"),
    ("gru", dict(attention_window=2, attention_heads=3), "attention_heads"),
    ("elman", dict(attention_window=-1), "attention_window"),
    ("slstm", dict(forget_gate="relu"), "forget_gate"),
    ("rhn", dict(depth=0), "depth"),
    ("lstm", dict(method="chunked"), "method"),
])
def test_bad_options_raise(name, fields, match):
    layer = ssmjax.layers.get(name, d_model=D, **fields)
    with pytest.raises(ValueError, match=match):
        layer.init(jax.random.PRNGKey(0), jnp.ones((1, 3, D)))


def test_bad_input_shape_raises():
    layer, params, _ = build("gru")
    with pytest.raises(ValueError, match="x"):
        layer.apply(params, jnp.ones((2, 5, D + 1)))
