"""Autoregressive rollouts of a trained forecaster and the chaotic-forecasting metrics of
Vlachas et al. (2020, "Backpropagation algorithms and Reservoir Computing in Recurrent
Neural Networks for the forecasting of complex spatiotemporal dynamics"), used by
"Deconstructing Recurrence, Attention, and Gating" (Heidenreich, Vlachas, Koumoutsakos et
al., 2024):

* NRMSE at every predicted time ``t``, normalised per dimension by the attractor's std ``sigma``:
  ``NRMSE(t) = sqrt( 1/d sum_i (yhat_i(t) - y_i(t))^2 / sigma_i^2 )``.
* Valid prediction time: the time until the NRMSE first exceeds ``epsilon = 0.5``, in
  Lyapunov times ``t lambda_1``.
* Power-spectrum error: RMSE between the predicted and true power spectra in dB.

A model is rolled out with its ``step`` form (:func:`rollout`): the state is warmed up on a
teacher-forced context, then each prediction is fed back as the next input.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float

from ssmjax.checks import check_ndim


def nrmse(prediction: Array, target: Array, std: Array) -> Array:
    """``NRMSE(t) = sqrt(mean_i ((prediction_i(t) - target_i(t)) / std_i)^2)`` over the last axis
    (``prediction``, ``target``: ``[..., t, d]``; ``std``: ``[d]``); returns ``[..., t]``."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction: expected the shape of target {tuple(target.shape)}, got {tuple(prediction.shape)}")
    return jnp.sqrt(jnp.mean(((prediction - target) / std) ** 2, axis=-1))


def valid_prediction_time(errors: Float[Array, "*b t"], dt: float, lyapunov: float = 1.0,
                          threshold: float = 0.5) -> Float[Array, "*b"]:
    """``VPT = lambda_1 dt h*`` with ``h* = min{h : errors[h] > threshold}`` (0-based), i.e.
    the time of the last prediction before the first one whose error exceeds ``threshold``
    (``errors[h]`` is the error of the prediction ``h + 1`` steps ahead, at time ``(h + 1) dt``,
    so ``h*`` steps were valid). ``h* = T`` (the whole horizon) when no error exceeds it.
    ``lyapunov = 1`` gives the time in the system's time units."""
    exceeded = errors > threshold
    first = jnp.where(exceeded.any(-1), jnp.argmax(exceeded, axis=-1), errors.shape[-1])
    return first * dt * lyapunov


def power_spectrum(x: Float[Array, "*b d"]) -> Float[Array, "f"]:
    """Spatial power spectrum of a periodic field ``x`` along its last axis, averaged over
    all other axes: ``P_k = mean |FFT(x)_k|^2 / d``, ``k = 0..d/2``."""
    spec = jnp.abs(jnp.fft.rfft(x, axis=-1)) ** 2 / x.shape[-1]
    return spec.reshape(-1, spec.shape[-1]).mean(0)


def power_spectrum_error(prediction: Array, target: Array, floor: float = 1e-10) -> Array:
    """``sqrt(mean_k (10 log10 P_k(prediction) - 10 log10 P_k(target))^2)`` (dB), with
    :func:`power_spectrum` over the last axis; both spectra are floored at ``floor`` times the
    target's total power (-100 dB), so modes the target does not excite count with at most
    the prediction's excess over that floor."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction: expected the shape of target {tuple(target.shape)}, got {tuple(prediction.shape)}")
    p_pred, p_true = power_spectrum(prediction), power_spectrum(target)
    low = floor * p_true.sum()
    db = lambda p: 10.0 * jnp.log10(jnp.maximum(p, low))  # noqa: E731
    return jnp.sqrt(jnp.mean((db(p_pred) - db(p_true)) ** 2))


def rollout(step: Callable[[Array, Any], tuple[Array, Any]], state: Any, context: Array, horizon: int, *,
            update: Callable[[Array, Array], Array] | None = None) -> Array:
    """Forecast ``horizon`` states after ``context``.

    ``step(x_t, state) -> (y_t, state)`` is the model's one-step form (e.g.
    ``partial(model.apply, params, method="step")``) and ``state`` its initial state. The
    context ``x_0..x_{c-1}`` is fed teacher-forced (warm-up); then each prediction
    ``xhat_{t+1} = update(x_t, y_t)`` is fed back (``update=None``: ``xhat_{t+1} = y_t``; a
    model of increments uses e.g. ``lambda x, y: x + y``). Returns
    ``xhat_c, ..., xhat_{c+horizon-1}`` (``[b, horizon, d]``).
    """
    check_ndim("context", context, 3, "[batch, context, features]")
    if context.shape[1] < 1:
        raise ValueError(f"context: needs at least one step, got shape {tuple(context.shape)}")
    if horizon < 1:
        raise ValueError(f"horizon: expected a positive int, got {horizon!r}")
    advance = update if update is not None else (lambda x, y: y)

    def warm(state, x_t):
        y, state = step(x_t, state)
        return state, advance(x_t, y)

    state, preds = jax.lax.scan(warm, state, jnp.swapaxes(context, 0, 1))
    first = preds[-1].astype(context.dtype)

    def free(carry, _):
        x_t, state = carry
        y, state = step(x_t, state)
        nxt = advance(x_t, y).astype(context.dtype)
        return (nxt, state), nxt

    _, rest = jax.lax.scan(free, (first, state), None, length=horizon - 1)
    return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)


def model_rollout(model, params, context: Array, horizon: int, *,
                  update: Callable[[Array, Array], Array] | None = None):
    """:func:`rollout` of a :class:`ssmjax.models.SequenceModel` (``head="regress"``) from its
    zero state."""
    state = model.apply(params, context.shape[0], context.dtype, method="init_state")
    return rollout(partial(model.apply, params, method="step"), state, context, horizon, update=update)


__all__ = ["model_rollout", "nrmse", "power_spectrum", "power_spectrum_error", "rollout", "valid_prediction_time"]
