"""The stabilised mLSTM memory of xLSTM (Beck et al., 2024, "xLSTM: Extended Long
Short-Term Memory", eqs. 19-27 without the output gate), per head::

    C_t = f_t C_{t-1} + i_t v_t k_t^T        n_t = f_t n_{t-1} + i_t k_t
    h_t = s C_t q_t / max(|s n_t^T q_t|, 1)                                 (s = dk^-1/2)

with exponential input gates ``i_t = exp(log_i_t)`` and forget gates ``f_t = exp(log_f_t)``.
The stabiliser ``m_t = max(log f_t + m_{t-1}, log i_t)`` keeps the state finite: the state
carried is ``(exp(-m_t) C_t, exp(-m_t) n_t, m_t)`` and the floor ``1`` becomes
``exp(-m_t)``. (The paper scales the keys by ``s``; here ``C`` and ``n`` hold the
unscaled keys and ``s`` is applied at the read-out, as in gated linear attention.) Any stabiliser sequence gives the same ``h`` in exact arithmetic.

* :func:`mlstm_sequential` is the oracle: the stabilised recurrence token by token
  (``lax.scan``).
* :func:`mlstm` is one :func:`~ssmjax.scan.gla.gated_linear_attention` over the values
  augmented with a ones column (so the state carries the normaliser ``n`` as its last
  column), with keys ``exp(log i_t - m_t) k_t`` and log-decays ``log f_t + m_{t-1} - m_t``
  (both ``<= 0``), the stabiliser in closed form (:func:`mlstm_stabiliser`).

State: :class:`MLSTMState` ``(C [batch, heads, dk, dv + 1], m [batch, heads])``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Float

from ssmjax.checks import check_multihead_qkv, check_real_floating, check_shape
from ssmjax.scan.gla import gated_linear_attention


class MLSTMState(NamedTuple):
    """``C [batch, heads, dk, dv + 1]``: the stabilised memory ``exp(-m) C^T`` with the
    stabilised normaliser ``exp(-m) n`` as its last column; ``m [batch, heads]``: the
    stabiliser."""

    C: Array
    m: Array


def init_mlstm_state(batch: int, heads: int, dk: int, dv: int, dtype=jnp.float32) -> MLSTMState:
    """The empty memory (``C = 0``, ``n = 0``, ``m = 0``)."""
    return MLSTMState(jnp.zeros((batch, heads, dk, dv + 1), dtype), jnp.zeros((batch, heads), dtype))


def mlstm_stabiliser(
    log_f: Float[Array, "batch time heads"], log_i: Float[Array, "batch time heads"], m0: Float[Array, "batch heads"]
) -> Float[Array, "batch time heads"]:
    """``m_t = max(log f_t + m_{t-1}, log i_t)`` from ``m_{-1} = m0``, in closed form:
    with ``F_t = log f_0 + ... + log f_t``, ``m_t = F_t + max(m0, max_{j <= t}(log i_j - F_j))``
    (a cumulative sum and a cumulative max, no token loop)."""
    F = jnp.cumsum(log_f, axis=1)
    return F + jnp.maximum(m0[:, None], jax.lax.cummax(log_i - F, axis=1))


def _check(q, k, v, log_f, log_i, state) -> None:
    batch, time, heads, dk, _ = check_multihead_qkv(q, k, v)
    for name, x in (("log_f", log_f), ("log_i", log_i)):
        check_real_floating(name, x)
    check_shape("log_f", log_f, (batch, time, heads), "[batch, time, heads]")
    check_shape("log_i", log_i, (batch, time, heads), "[batch, time, heads]")
    if state is not None:
        check_shape("initial_state.C", state.C, (batch, heads, dk, v.shape[-1] + 1), "[batch, heads, dk, dv + 1]")
        check_shape("initial_state.m", state.m, (batch, heads), "[batch, heads]")


def mlstm(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    log_f: ArrayLike,
    log_i: ArrayLike,
    *,
    initial_state: MLSTMState | None = None,
    chunk_size: int = 64,
    method: str = "auto",
) -> tuple[Array, MLSTMState]:
    """The stabilised mLSTM memory (module docstring) as one gated linear attention.

    Args:
      q, k: ``[batch, time, heads, dk]``; v: ``[batch, time, heads, dv]``.
      log_f, log_i: log forget / input gates ``[batch, time, heads]`` (``log_f <= 0``).
      initial_state: an :class:`MLSTMState`; empty if ``None``.
      chunk_size, method: of :func:`~ssmjax.scan.gla.gated_linear_attention`.

    Returns:
      ``(h [batch, time, heads, dv], final MLSTMState)``. ``m`` carries no gradient
      (``stop_gradient``): the output does not depend on it in exact arithmetic.
    """
    q, k, v, log_f, log_i = (jnp.asarray(a) for a in (q, k, v, log_f, log_i))
    _check(q, k, v, log_f, log_i, initial_state)
    if initial_state is None:
        initial_state = init_mlstm_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3], log_f.dtype)
    m = jax.lax.stop_gradient(mlstm_stabiliser(log_f, log_i, initial_state.m))
    m_prev = jnp.concatenate([initial_state.m[:, None], m[:, :-1]], axis=1)
    keys = k * jnp.exp(log_i - m)[..., None]
    ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)
    o, C = gated_linear_attention(q, keys, jnp.concatenate([v, ones], axis=-1), log_decay=log_f + m_prev - m,
                                  scale=q.shape[-1] ** -0.5, initial_state=initial_state.C,
                                  chunk_size=chunk_size, method=method)
    numerator, denominator = o[..., :-1], o[..., -1:]
    h = numerator / jnp.maximum(jnp.abs(denominator), jnp.exp(-m)[..., None])
    return h, MLSTMState(C, m[:, -1])


def mlstm_sequential(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    log_f: ArrayLike,
    log_i: ArrayLike,
    *,
    initial_state: MLSTMState | None = None,
) -> tuple[Array, MLSTMState]:
    """The oracle of :func:`mlstm`: the stabilised recurrence token by token (module
    docstring), same arguments and state."""
    q, k, v, log_f, log_i = (jnp.asarray(a) for a in (q, k, v, log_f, log_i))
    _check(q, k, v, log_f, log_i, initial_state)
    if initial_state is None:
        initial_state = init_mlstm_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3], log_f.dtype)
    scale = q.shape[-1] ** -0.5

    def token(carry, inputs):
        C, m = carry  # C [b, h, dk, dv + 1]
        q_t, k_t, v_t, lf_t, li_t = inputs
        m_t = jnp.maximum(lf_t + m, li_t)
        f, i = jnp.exp(lf_t + m - m_t), jnp.exp(li_t - m_t)
        v1 = jnp.concatenate([v_t, jnp.ones(v_t.shape[:-1] + (1,), v_t.dtype)], axis=-1)
        C = f[..., None, None] * C + i[..., None, None] * k_t[..., :, None] * v1[..., None, :]
        o = scale * jnp.einsum("bhkv,bhk->bhv", C, q_t)  # the key scale, applied at the read-out
        h = o[..., :-1] / jnp.maximum(jnp.abs(o[..., -1:]), jnp.exp(-m_t)[..., None])
        return (C, m_t), h

    time_major = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
    (C, m), h = jax.lax.scan(token, tuple(initial_state), tuple(map(time_major, (q, k, v, log_f, log_i))))
    return jnp.moveaxis(h, 0, 1), MLSTMState(C, m)
