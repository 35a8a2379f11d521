"""Forecasting metrics (NRMSE, valid prediction time, power-spectrum error) on hand-computed
cases, and autoregressive rollouts against hand-rolled sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.models import SequenceModel
from ssmjax.train.rollout import (
    model_rollout,
    nrmse,
    power_spectrum,
    power_spectrum_error,
    rollout,
    valid_prediction_time,
)


def test_nrmse_normalises_each_dimension_by_its_std():
    target = jnp.zeros((1, 2, 2))
    pred = jnp.asarray([[[1.0, 0.0], [2.0, 4.0]]])
    std = jnp.asarray([1.0, 2.0])
    # t=0: sqrt((1 + 0) / 2); t=1: sqrt((4 + 4) / 2) = 2
    np.testing.assert_allclose(nrmse(pred, target, std), [[np.sqrt(0.5), 2.0]], rtol=1e-12)
    with pytest.raises(ValueError, match="prediction"):
        nrmse(pred[:, :1], target, std)


def test_valid_prediction_time_counts_steps_before_the_first_exceedance():
    errors = jnp.asarray([[0.1, 0.4, 0.6, 0.2, 0.9],     # first > 0.5 at index 2: 2 valid steps
                          [0.6, 0.1, 0.1, 0.1, 0.1],     # at index 0: none
                          [0.1, 0.2, 0.3, 0.5, 0.5]])    # never (0.5 is not > 0.5): the whole horizon
    np.testing.assert_allclose(valid_prediction_time(errors, dt=0.01), [0.02, 0.0, 0.05], rtol=1e-12)
    # in Lyapunov times: times lambda_1
    np.testing.assert_allclose(valid_prediction_time(errors, dt=0.01, lyapunov=2.0), [0.04, 0.0, 0.10], rtol=1e-12)
    np.testing.assert_allclose(valid_prediction_time(errors, dt=1.0, threshold=0.15), [1.0, 0.0, 1.0])


def test_power_spectrum_and_its_error_in_db():
    n = 8
    grid = np.arange(n)
    x = jnp.asarray(np.cos(2 * np.pi * 2 * grid / n))[None]  # all power in mode 2: |FFT|^2 / n = (n/2)^2 / n = 2
    spec = power_spectrum(x)
    np.testing.assert_allclose(spec, [0, 0, 2.0, 0, 0], atol=1e-12)
    # doubling the amplitude quadruples the power: 10 log10(4) dB in every mode above the floor
    a = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, n)))
    np.testing.assert_allclose(power_spectrum_error(2 * a, a), 10 * np.log10(4.0), rtol=1e-10)
    np.testing.assert_allclose(power_spectrum_error(a, a), 0.0, atol=1e-12)


def test_rollout_with_a_known_step_equals_the_hand_rolled_sequence():
    # step: y_t = a * x_t + s_{t-1}, s_t = x_t (state: the previous input).
    a = 0.5

    def step(x, s):
        return a * x + s, x

    context = jnp.asarray([[[1.0], [2.0], [3.0]]])  # b=1, c=3, d=1
    out = rollout(step, jnp.zeros((1, 1)), context, horizon=4)
    # warm-up: y = .5, 1+1=2, 1.5+2=3.5 -> first prediction 3.5 (state s = 3)
    # then x=3.5: 1.75+3 = 4.75 (s=3.5); x=4.75: 2.375+3.5 = 5.875; x=5.875: 2.9375+4.75 = 7.6875
    np.testing.assert_allclose(out[0, :, 0], [3.5, 4.75, 5.875, 7.6875], rtol=1e-12)
    # a model of increments: x_{t+1} = x_t + y_t
    out = rollout(lambda x, s: (jnp.ones_like(x), s), 0.0, context, horizon=3, update=lambda x, y: x + y)
    np.testing.assert_allclose(out[0, :, 0], [4.0, 5.0, 6.0])
    with pytest.raises(ValueError, match="context"):
        rollout(step, jnp.zeros((1, 1)), context[0], horizon=2)
    with pytest.raises(ValueError, match="horizon"):
        rollout(step, jnp.zeros((1, 1)), context, horizon=0)


@pytest.mark.parametrize("mixers", ["lstm", pytest.param("attention", marks=pytest.mark.slow)])
def test_model_rollout_equals_feeding_predictions_to_the_full_forward(mixers):
    # A rollout through the step form equals re-running the parallel forward on the context
    # extended by each prediction (the model's own definition of the next state).
    model = SequenceModel(d_model=8, n_layers=1, mixers=mixers, vocab_size=None, head="regress", output_dim=3,
                          mixer_fields={"attention": {"num_heads": 2, "max_len": 16}})
    context = jax.random.normal(jax.random.key(0), (2, 4, 3), jnp.float64)
    params = model.init(jax.random.key(1), context)
    out = model_rollout(model, params, context, horizon=2)
    seq = context
    for h in range(2):
        nxt = model.apply(params, seq)[:, -1]
        np.testing.assert_allclose(out[:, h], nxt, rtol=1e-9, atol=1e-9)
        seq = jnp.concatenate([seq, nxt[:, None]], 1)
