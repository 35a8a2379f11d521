"""LMUFormer: the LIF scan against a float64 loop (both resets, a carried membrane,
per-channel leaks), the surrogate gradients' values, the layer (plain and spiking) against
a float64 loop of its equations, the contract for its variants (the defaults:
test_contract.py), and the operation counts on a case counted by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
from ssmjax.layers import hippo
from ssmjax.layers import lmuformer  # noqa: F401  (registers "lmuformer", "lmuformer_spiking")
from ssmjax.scan import lif
from tests.layers.contract import check_contract

D = 8


def lif_reference(current, beta, threshold, v0, reset):
    current = np.asarray(current, np.float64)
    v = np.asarray(v0, np.float64).copy()
    spikes = np.zeros_like(current)
    for t in range(current.shape[1]):
        u = beta * v + current[:, t]
        s = (u >= threshold).astype(np.float64)
        v = u * (1 - s) if reset == "hard" else u - threshold * s
        spikes[:, t] = s
    return spikes, v


@pytest.mark.parametrize("reset", ["hard", "subtract"])
def test_lif_matches_loop(reset):
    current = 1.5 * jax.random.normal(jax.random.PRNGKey(0), (2, 9, 3), jnp.float64)
    v0 = jax.random.normal(jax.random.PRNGKey(1), (2, 3), jnp.float64)
    beta = np.array([0.2, 0.5, 0.9])
    spikes, v = lif.lif_neuron(current, beta=beta, threshold=0.7, initial_state=v0, reset=reset)
    s_ref, v_ref = lif_reference(current, beta, 0.7, v0, reset)
    np.testing.assert_array_equal(spikes, s_ref)
    np.testing.assert_allclose(v, v_ref, rtol=1e-12, atol=1e-12)
    assert 0 < float(spikes.mean()) < 1
    # split in two with the carried membrane == one pass
    s1, mid = lif.lif_neuron(current[:, :4], beta=beta, threshold=0.7, initial_state=v0, reset=reset)
    s2, last = lif.lif_neuron(current[:, 4:], beta=beta, threshold=0.7, initial_state=mid, reset=reset)
    np.testing.assert_array_equal(jnp.concatenate([s1, s2], 1), spikes)
    np.testing.assert_allclose(last, v, rtol=1e-12)


def test_surrogate_gradients():
    x = jnp.array([-1.0, 0.0, 0.5])
    g = jax.grad(lambda x: jnp.sum(lif.spike(x, "arctan", 2.0)))(x)
    np.testing.assert_allclose(g, 1.0 / (1 + (math.pi * np.asarray(x)) ** 2))  # alpha/2 / (1 + (pi/2 alpha x)^2)
    g = jax.grad(lambda x: jnp.sum(lif.spike(x, "sigmoid", 4.0)))(x)
    sig = 1 / (1 + np.exp(-4.0 * np.asarray(x)))
    np.testing.assert_allclose(g, 4.0 * sig * (1 - sig), rtol=1e-6)
    np.testing.assert_array_equal(lif.spike(x), [0.0, 1.0, 1.0])  # H(0) = 1
    # one step from v = 0 with hard reset and detached reset: d s / d I = H'(I - theta)
    g = jax.grad(lambda i: jnp.sum(lif.lif_neuron(i[None, None], threshold=1.0)[0]))(jnp.array([0.8]))
    np.testing.assert_allclose(g, 1.0 / (1 + (math.pi * -0.2) ** 2), rtol=1e-6)


def test_lif_checks():
    with pytest.raises(ValueError, match="initial_state"):
        lif.lif_neuron(jnp.zeros((2, 3, 4)), initial_state=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="surrogate"):
        lif.lif_neuron(jnp.zeros((2, 3, 4)), surrogate="relu")
    with pytest.raises(ValueError, match="current"):
        lif.lif_neuron(jnp.zeros((3,)))


def lmuformer_reference(p, x, order, theta, spiking, conv_width=3, beta=0.5, threshold=1.0):
    """The block's equations as a float64 token loop (module docstring of lmuformer)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)["params"]
    x = np.asarray(x, np.float64)
    b, t, d = x.shape
    A_bar, B_bar = hippo.legendre_memory(order, theta)
    lin = lambda name, a: a @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731
    membranes = {}

    def act(name, pre):
        if not spiking:
            return np.maximum(pre, 0)
        v = membranes.get(name, np.zeros_like(pre))
        u = beta * v + pre
        s = (u >= threshold).astype(np.float64)
        membranes[name] = u * (1 - s)
        return s

    padded = np.concatenate([np.zeros((b, conv_width - 1, d)), x], 1)
    m = np.zeros((b, p["W_u"]["kernel"].shape[1], order))
    ys = []
    for i in range(t):
        conv = (padded[:, i: i + conv_width] * p["conv_w"]).sum(1) + p["conv_b"]
        e = act("embed", lin("W_p", conv))
        u = act("u", lin("W_u", e))
        m = m @ A_bar.T + u[..., None] * B_bar
        o = act("o", lin("W_h", np.concatenate([m.reshape(b, -1), e], -1)))
        h = e + lin("W_o", o)
        ys.append(h + lin("W_2", act("mlp", lin("W_1", h))))
    return np.stack(ys, 1)


@pytest.mark.parametrize("name,method", [("lmuformer", "fft"), ("lmuformer_spiking", "scan")])
def test_layer_matches_float64_oracle(name, method):
    order, theta = 4, 6.0
    layer = ssmjax.layers.get(name, d_model=D, order=order, theta=theta, memory_dim=2, mlp_ratio=2, method=method)
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(2), (2, 11, D), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(3), x)
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    y, sown = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(p64, x.astype(jnp.float64))
    y_ref = lmuformer_reference(p64, x, order, theta, spiking=name.endswith("spiking"))
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9)
    if name.endswith("spiking"):
        rates = {k: float(v[0]) for k, v in sown["intermediates"].items()}
        assert set(rates) == {"spike_rate_embed", "spike_rate_u", "spike_rate_o", "spike_rate_mlp"}
        assert 0 < rates["spike_rate_embed"] < 1


def test_contract_variants():
    check_contract("lmuformer", method="scan", order=6, conv_width=4)
    check_contract("lmuformer_spiking", order=6, surrogate="sigmoid", memory_dim=2)


def test_spiking_gradients_flow():
    layer = ssmjax.layers.get("lmuformer_spiking", d_model=D, order=4)
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 6, D), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)["params"]
    for name in ("conv_w", "W_p", "W_u", "W_h", "W_1"):  # reached only through surrogate gradients
        leaf = grads[name] if name == "conv_w" else grads[name]["kernel"]
        assert float(jnp.abs(leaf).sum()) > 0, name


def test_operation_counts_by_hand():
    # d = 2, T = 3, q = 2, d_u = 1, r = 1, K = 2 (module docstring of operation_count)
    plain = lmuformer.operation_count(2, 3, order=2, memory_dim=1, mlp_ratio=1, conv_width=2)
    expected = dict(embed_conv=12, embed_proj=12, W_u=6, memory_state=12, memory_input=6, W_h_memory=12,
                    W_h_embed=12, W_o=12, mlp_in=12, mlp_out=12)
    assert {k: v["mac"] for k, v in plain["parts"].items()} == expected
    assert plain["mac"] == 108 and plain["ac"] == 0
    assert plain["energy_pj"] == pytest.approx(108 * 4.6)
    rates = dict(embed=0.5, u=0.5, o=0.5, mlp=0.5)
    spiking = lmuformer.operation_count(2, 3, order=2, memory_dim=1, mlp_ratio=1, conv_width=2, spike_rates=rates)
    # MACs left: embed_conv, embed_proj, memory_state, W_h_memory, mlp_in; ACs: half of the other 48
    assert spiking["mac"] == 60 and spiking["ac"] == pytest.approx(24)
    assert spiking["energy_pj"] == pytest.approx(60 * 4.6 + 24 * 0.9)
    # transformer, d = 2, T = 3, r = 1, causal: qkv 36 + scores 12 + mix 12 + out 12 + mlp 24
    tf = lmuformer.transformer_operation_count(2, 3, mlp_ratio=1)
    assert tf["mac"] == 96
    assert lmuformer.transformer_operation_count(2, 3, mlp_ratio=1, causal=False)["mac"] == 96 + 2 * 3 * 2


def test_bad_fields():
    x = jnp.zeros((1, 3, D))
    for fields, name in [(dict(method="conv"), "method"), (dict(surrogate="relu"), "surrogate"),
                         (dict(conv_width=0), "conv_width")]:
        with pytest.raises(ValueError, match=name):
            ssmjax.layers.get("lmuformer", d_model=D, **fields).init(jax.random.PRNGKey(0), x)
