"""Name -> layer class registry: ``get(name, **fields)`` builds a mixer, ``names()`` lists them.

Every registered class follows the layer contract (docs/architecture.md): a Linen module with a
``d_model`` field (all other fields defaulted), ``__call__(x, *, state=None,
return_state=False)``, ``init_state(batch_size, dtype)`` and ``step(x_t, state)``.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

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
