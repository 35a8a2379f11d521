"""Aaren: contract, parameter count, a float64 reference (the learned query's softmax
attention over each prefix, written directly), the constant-size step state, and large
scores without overflow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.aaren  # noqa: F401  (registers "aaren")
from ssmjax.layers import run_steps
from tests.layers.contract import check_contract
from tests.layers.reference import dense, layer_in_f64, param_count

D, H = 16, 2


def aaren_oracle(p, x):
    """o_t = sum_{i <= t} softmax_i(q . k_i / sqrt(dh)) v_i per head (Feng et al. 2024, Eq. 1-2)."""
    k, v = dense(x, p["k_proj"]["kernel"]), dense(x, p["v_proj"]["kernel"])
    scores = np.einsum("bthd,hd->bth", k, p["query"]) / np.sqrt(k.shape[-1])
    out = np.zeros(v.shape)
    for t in range(x.shape[1]):
        w = np.exp(scores[:, : t + 1] - scores[:, : t + 1].max(1, keepdims=True))
        out[:, t] = np.einsum("bih,bihd->bhd", w / w.sum(1, keepdims=True), v[:, : t + 1])
    return dense(out, p["out_proj"]["kernel"], axes=2)


@pytest.mark.parametrize("method", ["sequential", "associative"])
def test_contract(method):
    check_contract("aaren", num_heads=H, method=method)


def test_builds_with_d_model_alone_and_parameter_count():
    layer = ssmjax.layers.get("aaren", d_model=32)
    x = jnp.ones((1, 3, 32))
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
    assert jax.jit(layer.apply)(params, x).shape == x.shape
    for d, nh in ((32, 4), (16, 2), (12, 3)):
        shapes = jax.eval_shape(ssmjax.layers.get("aaren", d_model=d, num_heads=nh).init, jax.random.PRNGKey(0),
                                jnp.ones((1, 2, d)))
        assert param_count(shapes) == 3 * d * d + d


@pytest.mark.parametrize("method", ["sequential", "associative"])
def test_matches_float64_oracle(method):
    _, params, x, y = layer_in_f64("aaren", num_heads=H, time=13, method=method)
    np.testing.assert_allclose(y, aaren_oracle(params["params"], x), rtol=1e-10, atol=1e-12)


def test_step_state_has_constant_size():
    """The state after 3 or 30 tokens has the same shapes: (m, num, den) per head."""
    layer = ssmjax.layers.get("aaren", d_model=D, num_heads=H)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 30, D), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    call = jax.jit(lambda p, x: layer.apply(p, x, return_state=True))
    short, long = call(params, x[:, :3])[1], call(params, x)[1]
    assert jax.tree.map(jnp.shape, short) == jax.tree.map(jnp.shape, long) == ((2, H), (2, H, D // H), (2, H))
    _, stepped = run_steps(layer, params, x[:, :3])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stepped, short)


def test_huge_scores_do_not_overflow_in_float32():
    """Scores ~ +-1000 (exp overflows float32): the stabilised summary stays finite and
    matches the float64 reference."""
    layer = ssmjax.layers.get("aaren", d_model=D, num_heads=H)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, D), jnp.float32)
    params = jax.device_get(jax.jit(layer.init)(jax.random.PRNGKey(1), x))
    params["params"]["query"] = 300.0 * params["params"]["query"]
    params = jax.tree.map(jnp.asarray, params)
    y = jax.jit(layer.apply)(params, x)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    reference = aaren_oracle(p64, np.asarray(x, np.float64))
    scores = np.einsum("bthd,hd->bth", dense(np.asarray(x, np.float64), p64["k_proj"]["kernel"]), p64["query"])
    assert np.abs(scores).max() / np.sqrt(D // H) > 100
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
