"""Activation functions for the backbone's plain (ungated) feed-forward block, among them
the Dynamic Range Activator of "Can Transformers Do Enumerative Geometry?" (Hashemi,
Corominas & Giacchetto, ICLR 2025, eq. for DRA):

    DRA(x) = x + a sin^2(x / b) + c cos(b x) + d tanh(b x),

with learnable scalars ``a, b, c, d`` (harmonic terms for recursive / periodic structure,
``tanh`` for saturating growth, the identity so it never vanishes). The paper does not
state an initialisation; ours is ``a = b = 1``, ``c = 0``, ``d = 1`` (at ``c = 0``,
``DRA(0) = 0`` as for the standard activations).

:class:`FeedForward` is the Transformer FFN ``W_2 act(W_1 x + b_1) + b_2`` (Vaswani et al.,
2017), the ``mlp="relu" | "gelu" | "silu" | "dra"`` option of
:class:`ssmjax.models.SequenceModel` (``"gated"`` is SwiGLU).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

ACTIVATIONS = ("relu", "gelu", "silu", "dra")
DRA_INIT = dict(a=1.0, b=1.0, c=0.0, d=1.0)


def dra(x: Float[Array, "*shape"], a, b, c, d) -> Float[Array, "*shape"]:
    """``x + a sin^2(x / b) + c cos(b x) + d tanh(b x)`` (module docstring); ``a..d``
    broadcast against ``x``."""
    return x + a * jnp.sin(x / b) ** 2 + c * jnp.cos(b * x) + d * jnp.tanh(b * x)


class DRA(nn.Module):
    """:func:`dra` with the four scalars as parameters ``a, b, c, d`` (float32, initialised
    to :data:`DRA_INIT`); computes in ``x``'s dtype."""

    @nn.compact
    def __call__(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        values = [self.param(name, nn.initializers.constant(init), (), jnp.float32)
                  for name, init in DRA_INIT.items()]
        return dra(x, *(v.astype(x.dtype) for v in values))


def activation(name: str, module_name: str = "act"):
    """The activation ``name`` (one of :data:`ACTIVATIONS`) as a callable on arrays; ``"dra"``
    builds a :class:`DRA` submodule (call inside a compact module)."""
    if name == "dra":
        return DRA(name=module_name)
    functions = dict(relu=jax.nn.relu, gelu=jax.nn.gelu, silu=jax.nn.silu)
    if name not in functions:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")
    return functions[name]


class FeedForward(nn.Module):
    """``W_2 act(W_1 x + b_1) + b_2``: ``[..., d_model] -> [..., d_model]`` through ``hidden``."""

    d_model: int
    hidden: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: Float[Array, "*lead d"]) -> Float[Array, "*lead d"]:
        h = nn.Dense(self.hidden, name="in_proj")(x)
        return nn.Dense(self.d_model, name="out_proj")(activation(self.activation)(h))
