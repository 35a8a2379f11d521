"""LightNet's additive linear recurrence (Qin, Mao, Shen, Li, Zhang, Dai and Zhong, 2024,
"You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet"), per head
and key channel ``c`` with key logits ``k~``::

    M_t = M_{t-1} + exp(k~_t) v_t^T,   Z_t = Z_{t-1} + exp(k~_t),   o_t = dk^-1/2 (M_t / Z_t)^T q_t

Written multiplicatively it is a gated linear attention with per-channel decay
(:func:`additive_gates` gives its inputs, all exponents ``<= 0``)::

    z_t = logaddexp(z_{t-1}, k~_t)     S_t = diag(exp(z_{t-1} - z_t)) S_{t-1} + exp(k~_t - z_t) v_t^T

so ``S_t = M_t / Z_t`` and ``z_t = log Z_t``. :func:`additive_attention_sequential` is the
oracle: the sums ``M``, ``Z`` token by token, from a state ``(S, z)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float


def additive_gates(
    key_logits: Float[Array, "batch time heads dk"], z0: Float[Array, "batch heads dk"]
) -> tuple[Float[Array, "batch time heads dk"], Float[Array, "batch time heads dk"], Float[Array, "batch heads dk"]]:
    """The additive recurrence as gated-linear-attention inputs.

    With ``z_t = logaddexp(z_{t-1}, k~_t)`` from ``z_{-1} = z0`` (``-inf``: no tokens yet):
    the normalised keys ``exp(k~_t - z_t)``, the log-decays ``z_{t-1} - z_t`` (``0`` while
    ``z_{t-1} = -inf``: the state is still empty) and ``z`` after the last token.
    """
    z = jnp.logaddexp(z0[:, None], jax.lax.cumlogsumexp(key_logits, axis=1))
    z_prev = jnp.concatenate([z0[:, None], z[:, :-1]], axis=1)
    started = jnp.isfinite(z_prev)
    log_decay = jnp.where(started, jnp.where(started, z_prev, z) - z, 0.0)
    return jnp.exp(key_logits - z), log_decay, z[:, -1]


def additive_attention_sequential(
    q: Float[Array, "batch time heads dk"],
    key_logits: Float[Array, "batch time heads dk"],
    v: Float[Array, "batch time heads dv"],
    S0: Float[Array, "batch heads dk dv"],
    z0: Float[Array, "batch heads dk"],
) -> tuple[Float[Array, "batch time heads dv"], Float[Array, "batch heads dk dv"], Float[Array, "batch heads dk"]]:
    """The oracle of ``gated_linear_attention(q, *additive_gates(key_logits, z0)[:2], v)``:
    ``M_t = M_{t-1} + exp(k~_t) v_t^T``, ``Z_t = Z_{t-1} + exp(k~_t)`` from ``M = exp(z0) S0``,
    ``Z = exp(z0)``, read as ``o_t = dk^-1/2 (M_t / Z_t)^T q_t`` (no stabilisation: for
    moderate logits in float64). Returns ``(o, S = M / Z, z = log Z)`` after the last token."""

    def token(carry, inputs):
        M, Z = carry
        q_t, k_t, v_t = inputs
        w = jnp.exp(k_t)
        M, Z = M + w[..., None] * v_t[..., None, :], Z + w
        S = jnp.where(Z[..., None] > 0, M / jnp.where(Z > 0, Z, 1.0)[..., None], 0.0)
        return (M, Z), jnp.einsum("bhk,bhkv->bhv", q_t, S) * q_t.shape[-1] ** -0.5

    Z0 = jnp.exp(z0)
    time_major = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
    (M, Z), o = jax.lax.scan(token, (Z0[..., None] * S0, Z0), (time_major(q), time_major(key_logits), time_major(v)))
    return jnp.moveaxis(o, 0, 1), M / Z[..., None], jnp.log(Z)
