"""Forecasters: DLinear's decomposition against a direct numpy moving average with edge
replication, NLinear's last-value normalisation, PyTorch-default initialisation, every
forecaster's output shape for each horizon, iTransformer's variate permutation equivariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.models.forecasters import (
    ChannelIndependent,
    DLinear,
    ITransformer,
    Inverted,
    Linear,
    NLinear,
    build_forecaster,
    moving_average,
    series_decomposition,
)

B, L, C = 2, 30, 3


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(0), (B, L, C), jnp.float64)


def numpy_moving_average(x, k):
    """Direct definition: replicate the first/last row (k-1)//2 times, average every k consecutive rows."""
    pad = (k - 1) // 2
    padded = np.concatenate([np.repeat(x[:, :1], pad, 1), x, np.repeat(x[:, -1:], pad, 1)], 1)
    return np.stack([padded[:, t:t + k].mean(1) for t in range(padded.shape[1] - k + 1)], 1)


@pytest.mark.parametrize("k", [25, 5, 1])
def test_moving_average_against_numpy(x, k):
    expected = numpy_moving_average(np.asarray(x), k)
    np.testing.assert_allclose(moving_average(x, k), expected, rtol=1e-12, atol=1e-12)
    assert expected.shape == x.shape
    seasonal, trend = series_decomposition(x, k)
    np.testing.assert_allclose(seasonal + trend, x, rtol=1e-12, atol=1e-12)


def test_dlinear_is_sum_of_two_linear_maps_of_the_decomposition(x):
    model = DLinear(horizon=7)
    params = model.init(jax.random.key(1), x)
    p = params["params"]
    seasonal = np.asarray(x) - numpy_moving_average(np.asarray(x), 25)
    trend = numpy_moving_average(np.asarray(x), 25)
    def lin(q, z):
        return np.einsum("blc,lh->bhc", z, np.asarray(q["linear"]["kernel"])) + np.asarray(q["linear"]["bias"])[:, None]
    expected = lin(p["seasonal"], seasonal) + lin(p["trend"], trend)
    np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-10, atol=1e-12)


def test_nlinear_last_value_normalisation(x):
    model = NLinear(horizon=5)
    params = model.init(jax.random.key(2), x)
    shift = jnp.arange(C, dtype=x.dtype) * 3.0  # a level shift of each series moves the forecast by the same
    np.testing.assert_allclose(model.apply(params, x + shift), model.apply(params, x) + shift, atol=1e-10)
    k = np.asarray(params["params"]["time_linear"]["linear"]["kernel"])
    b = np.asarray(params["params"]["time_linear"]["linear"]["bias"])
    last = np.asarray(x)[:, -1:, :]
    expected = np.einsum("blc,lh->bhc", np.asarray(x) - last, k) + b[:, None] + last
    np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-10, atol=1e-12)
    assert Linear(5).apply(params, x + shift).shape == (B, 5, C)  # same parameter tree as Linear


def test_linear_init_matches_pytorch_default(x):
    params = Linear(horizon=400).init(jax.random.key(3), x)["params"]["time_linear"]["linear"]
    bound = 1 / np.sqrt(L)  # nn.Linear(L, H): weight and bias U(-1/sqrt(L), 1/sqrt(L))
    for w in (params["kernel"], params["bias"]):
        w = np.asarray(w)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
        assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3)  # uniform, not truncated normal


def test_individual_has_one_map_per_channel(x):
    model = DLinear(horizon=4, individual=True)
    params = model.init(jax.random.key(4), x)
    assert params["params"]["seasonal"]["kernel"].shape == (C, L, 4)
    y = model.apply(params, x)
    y0 = model.apply(params, x.at[:, :, 1:].set(0.0))
    np.testing.assert_allclose(y[:, :, 0], y0[:, :, 0], atol=1e-12)  # channel 0 sees only itself


SMALL = {
    "linear": {}, "nlinear": {}, "dlinear": {}, "dlinear_individual": dict(individual=True),
    "itransformer": dict(d_model=16, n_layers=1, n_heads=2, d_ff=16),
    "ci:s4d": dict(d_model=8, n_layers=1, mlp="none"),
    "inverted:gla": dict(d_model=8, n_layers=1, mlp="none"),
}
HORIZONS = (96, 192, 336, 720)


def _check_shapes(name, horizons):
    x = jax.ShapeDtypeStruct((B, 16, C), jnp.float32)
    for horizon in horizons:
        model = build_forecaster(name.split("_")[0], horizon, **SMALL[name])
        params = jax.eval_shape(model.init, jax.random.key(0), x)
        assert jax.eval_shape(model.apply, params, x).shape == (B, horizon, C), (name, horizon)


@pytest.mark.parametrize("name", ["linear", "nlinear", "dlinear", "dlinear_individual"])
def test_linear_output_shapes_every_horizon(name):
    _check_shapes(name, HORIZONS)


@pytest.mark.parametrize("name", ["itransformer", "ci:s4d", "inverted:gla"])
def test_deep_output_shape(name):
    _check_shapes(name, HORIZONS[:1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["itransformer", "ci:s4d", "inverted:gla"])
def test_deep_output_shapes_every_horizon(name):
    _check_shapes(name, HORIZONS)


@pytest.fixture(scope="module")
def itransformer(x):
    """One small iTransformer shared by the tests below (one init, one compiled apply)."""
    model = ITransformer(horizon=6, d_model=16, n_layers=2, n_heads=4, d_ff=32)
    return model, jax.jit(model.init)(jax.random.key(6), x), jax.jit(model.apply)


def test_itransformer_attends_to_time_tokens(x, itransformer):
    model, params, apply = itransformer
    marks = jax.random.uniform(jax.random.key(5), (B, L, 4), x.dtype) - 0.5
    y = apply(params, x, marks)  # the embedding is Linear(L -> d_model): time tokens need no new parameters
    assert y.shape == (B, 6, C) and bool(jnp.all(jnp.isfinite(y)))
    assert not np.allclose(y, apply(params, x))


def test_itransformer_permutation_equivariant_over_variates(x, itransformer):
    _, params, apply = itransformer
    perm = jnp.array([2, 0, 1])
    np.testing.assert_allclose(apply(params, x[:, :, perm]), apply(params, x)[:, :, perm], rtol=1e-10, atol=1e-10)


def test_instance_norm_makes_itransformer_scale_equivariant(x, itransformer):
    _, params, apply = itransformer
    # sigma = sqrt(var + 1e-5): equivariance to a * x + b holds up to the eps term
    np.testing.assert_allclose(apply(params, 10 * x + 3), 10 * apply(params, x) + 3, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # compiling the dropout masks' PRNG takes ~15 s on a loaded 2-core CPU
def test_itransformer_dropout_only_in_training(x):
    model = ITransformer(horizon=6, d_model=16, n_layers=1, n_heads=4, d_ff=32)
    params = jax.jit(model.init)(jax.random.key(6), x)
    y = model.apply(params, x)
    y_train = model.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(7)})
    assert not np.allclose(y, y_train)
    np.testing.assert_allclose(model.apply(params, x, deterministic=True), y)


def test_channel_independent_treats_channels_alike(x):
    model = ChannelIndependent(horizon=4, mixers="s4d", d_model=8, n_layers=1, mlp="none")
    params = jax.jit(model.init)(jax.random.key(10), x)
    apply = jax.jit(model.apply)
    y = apply(params, x)
    single = apply(params, x[:, :, 1:2])  # one series alone gives the same forecast
    np.testing.assert_allclose(y[:, :, 1:2], single, rtol=1e-8, atol=1e-10)


def test_unknown_model_and_bad_input():
    with pytest.raises(ValueError, match="model: expected one of"):
        build_forecaster("transformer", 96)
    with pytest.raises(ValueError, match="x: expected shape"):
        Linear(4).init(jax.random.key(0), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="n_heads"):
        ITransformer(4, d_model=10, n_heads=3).init(jax.random.key(0), jnp.ones((1, 5, 2)))
    assert isinstance(build_forecaster("inverted:mamba", 3), Inverted)
