"""Name -> layer class registry: ``get(name, **fields)`` builds a mixer, ``names()`` lists them.

Every registered class follows the layer contract (docs/architecture.md): a Linen module with a
``d_model`` field (all other fields defaulted), ``__call__(x, *, state=None,
return_state=False)``, ``init_state(batch_size, dtype)`` and ``step(x_t, state)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make the layer available as ``get(name, ...)``."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"name: layer {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        return cls

    return add


def get(name: str, **fields) -> nn.Module:
    """Build the layer registered as ``name`` with the given dataclass fields."""
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown layer {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**fields)


def names() -> list[str]:
    return sorted(_REGISTRY)


def layer_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown layer {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def ssm_parameter_names(name: str) -> frozenset[str]:
    """The parameters of layer ``name`` that the S4/S5/LRU recipe trains as SSM parameters
    (own learning rate, no weight decay): its class's ``SSM_PARAMETERS`` (the state
    matrix, input matrix and step size of S4/S4D/DSS/S5; LRU's ``nu, theta, gamma``),
    empty for layers that declare none."""
    return frozenset(getattr(layer_class(name), "SSM_PARAMETERS", ()))


def run_steps(layer: nn.Module, params: Any, x: jax.Array, state: Any = None) -> tuple[jax.Array, Any]:
    """Feed ``x [batch, time, d]`` through ``layer.step`` one token at a time, from ``state``
    (``init_state`` if ``None``): returns ``(y [batch, time, d], final state)``.

    The step form of the layer contract, ``y_t, s_t = step(x_t, s_{t-1})``: it equals
    ``layer.apply(params, x, state=state, return_state=True)``. The step is compiled once
    and called per token (a Python loop, so a state may change dtype after its first step).
    """
    if state is None:
        state = layer.apply(params, x.shape[0], x.dtype, method="init_state")
    step = jax.jit(lambda p, x_t, s: layer.apply(p, x_t, s, method="step"))
    ys = []
    for t in range(x.shape[1]):
        y_t, state = step(params, x[:, t], state)
        ys.append(y_t)
    return jnp.stack(ys, 1), state
