"""Leaky integrate-and-fire (LIF) neurons over time, with a surrogate gradient.

The spiking neuron of spiking LMUFormer (Liu, Datta, Li and Beerel, 2024, "LMUFormer: Low
Complexity Yet Powerful Spiking Model With Legendre Memory Units", Sec. 3.3; the LIF
model as in SpikingJelly's multi-step LIF node, Fang et al., 2023). Per channel, with
input current ``I_t``, leak ``beta`` and threshold ``theta``::

    u_t = beta * v_{t-1} + I_t               membrane before the spike (charge)
    s_t = H(u_t - theta)                     spike, H(x) = 1 if x >= 0 else 0 (fire)
    v_t = u_t (1 - s_t)                      reset="hard": back to 0 after a spike
    v_t = u_t - theta s_t                    reset="subtract": keep the excess

``v`` is the state carried between steps (``v_{-1} = initial_state`` or 0). ``beta = 1 -
1/tau`` (SpikingJelly's ``tau = 2`` is ``beta = 0.5`` up to its input scale ``1/tau``).

The Heaviside step has a zero derivative almost everywhere; the backward pass uses a
surrogate derivative instead (:func:`spike`, a ``jax.custom_vjp``)::

    "arctan":  H'(x) ~ alpha / 2 / (1 + (pi/2 alpha x)^2)     (d/dx of arctan(pi/2 alpha x)/pi)
    "sigmoid": H'(x) ~ alpha sigmoid(alpha x) (1 - sigmoid(alpha x))

``detach_reset=True`` (SpikingJelly's ``detach_reset``, used by Spikformer-style models)
stops the gradient through the reset term ``s_t`` in ``v_t``.

The recurrence is nonlinear (the reset depends on the spike), so it has one evaluation,
the sequential ``lax.scan`` (``method="sequential"``); its float64 oracle is the plain
Python loop in ``tests/layers/test_lmuformer.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from ssmjax.checks import check_choice, check_real_floating

SURROGATES = ("arctan", "sigmoid")
RESETS = ("hard", "subtract")
LIF_METHODS = ("sequential",)


def surrogate_derivative(x: Array, surrogate: str, alpha: float) -> Array:
    """The surrogate ``H'(x)`` of the Heaviside step (module docstring)."""
    if surrogate == "arctan":
        return alpha / 2 / (1 + (math.pi / 2 * alpha * x) ** 2)
    sig = jax.nn.sigmoid(alpha * x)
    return alpha * sig * (1 - sig)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def spike(x: Array, surrogate: str = "arctan", alpha: float = 2.0) -> Array:
    """``H(x) = 1[x >= 0]`` in ``x``'s dtype; its gradient is ``surrogate_derivative``."""
    return (x >= 0).astype(x.dtype)


def _spike_fwd(x, surrogate, alpha):
    return spike(x, surrogate, alpha), x


def _spike_bwd(surrogate, alpha, x, g):
    return (g * surrogate_derivative(x, surrogate, alpha).astype(g.dtype),)


spike.defvjp(_spike_fwd, _spike_bwd)


def lif_step(
    v: Array, current: Array, beta, threshold, reset: str, surrogate: str, alpha: float, detach_reset: bool
) -> tuple[Array, Array]:
    """One LIF update (module docstring): ``(v_{t-1}, I_t) -> (s_t, v_t)``."""
    u = beta * v + current
    s = spike(u - threshold, surrogate, alpha)
    r = jax.lax.stop_gradient(s) if detach_reset else s
    v_new = u * (1 - r) if reset == "hard" else u - threshold * r
    return s, v_new


def lif_neuron(
    current: ArrayLike,
    *,
    beta: ArrayLike = 0.5,
    threshold: ArrayLike = 1.0,
    initial_state: ArrayLike | None = None,
    reset: str = "hard",
    surrogate: str = "arctan",
    alpha: float = 2.0,
    detach_reset: bool = True,
    method: str = "sequential",
) -> tuple[Array, Array]:
    """LIF neurons driven by ``current [batch, time, ...]``: returns ``(spikes [batch, time,
    ...], v_last [batch, ...])`` (module docstring for the equations).

    ``beta`` and ``threshold`` broadcast against one time step ``[batch, ...]`` (scalars or
    per-channel arrays). Spikes are in ``current``'s dtype; the membrane accumulates in at
    least float32 (``initial_state`` is cast to it).
    """
    current = jnp.asarray(current)
    check_real_floating("current", current)
    check_choice("reset", reset, RESETS)
    check_choice("surrogate", surrogate, SURROGATES)
    check_choice("method", method, LIF_METHODS)
    if current.ndim < 2:
        raise ValueError(f"current: expected shape [batch, time, ...], got {tuple(current.shape)}")
    state_dtype = jnp.result_type(current.dtype, jnp.float32)
    step_shape = current.shape[:1] + current.shape[2:]
    if initial_state is None:
        v0 = jnp.zeros(step_shape, state_dtype)
    else:
        v0 = jnp.asarray(initial_state)
        if tuple(v0.shape) != tuple(step_shape):
            raise ValueError(f"initial_state: expected shape [batch, ...] = {step_shape}, got {tuple(v0.shape)}")
        v0 = v0.astype(state_dtype)
    beta = jnp.asarray(beta, state_dtype)
    threshold = jnp.asarray(threshold, state_dtype)

    def body(v, i_t):
        s, v = lif_step(v, i_t.astype(state_dtype), beta, threshold, reset, surrogate, alpha, detach_reset)
        return v, s.astype(current.dtype)

    v_last, spikes = jax.lax.scan(body, v0, jnp.moveaxis(current, 1, 0))
    return jnp.moveaxis(spikes, 0, 1), v_last
