"""The Dynamic Range Activator and the plain FFN option of the backbone (ssmjax.models.activations)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.models import SequenceModel
from ssmjax.models.activations import DRA, DRA_INIT, FeedForward, activation, dra


def test_dra_formula_by_hand():
    # x + a sin^2(x / b) + c cos(b x) + d tanh(b x)
    x = jnp.array([0.0, math.pi, -1.0])
    out = dra(x, 2.0, 1.0, 0.5, 3.0)
    expected = [0 + 0 + 0.5 + 0, math.pi + 0 + 0.5 * -1 + 3 * math.tanh(math.pi),
                -1 + 2 * math.sin(-1) ** 2 + 0.5 * math.cos(-1) + 3 * math.tanh(-1)]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # b scales the argument: sin^2(x / b), cos(b x), tanh(b x)
    np.testing.assert_allclose(dra(jnp.array(1.0), 1.0, 2.0, 1.0, 1.0),
                               1 + math.sin(0.5) ** 2 + math.cos(2) + math.tanh(2), rtol=1e-6)


def test_dra_module_has_four_scalars_keeps_shape_and_has_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5))
    module = DRA()
    params = module.init(jax.random.key(1), x)
    assert {k: v.shape for k, v in params["params"].items()} == {k: () for k in DRA_INIT}
    y = module.apply(params, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, dra(x, **DRA_INIT), rtol=1e-6)
    assert float(module.apply(params, jnp.zeros(()))) == 0.0  # c = 0 at init: DRA(0) = 0
    grads = jax.grad(lambda p: module.apply(p, x).sum())(params)["params"]
    assert all(np.isfinite(float(g)) for g in grads.values()) and float(grads["c"]) != 0.0
    assert module.apply(params, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_feed_forward_and_backbone_mlp_options():
    x = jnp.ones((2, 4, 8))
    for name in ("relu", "gelu", "silu", "dra"):
        ffn = FeedForward(8, 16, name)
        params = ffn.init(jax.random.key(0), x)
        assert ffn.apply(params, x).shape == x.shape
        assert ("act" in params["params"]) == (name == "dra")
    tokens = jnp.zeros((2, 5), jnp.int32)
    model = SequenceModel(d_model=8, n_layers=1, mixers="attention", mlp="dra", vocab_size=11, head="regress",
                          output_dim=1)
    params = model.init(jax.random.key(0), tokens)
    assert model.apply(params, tokens).shape == (2, 5, 1)
    with pytest.raises(ValueError, match="activation"):
        activation("tanh")
    with pytest.raises(ValueError, match="mlp"):
        SequenceModel(d_model=8, n_layers=1, mlp="swish", vocab_size=11).init(jax.random.key(0), tokens)
