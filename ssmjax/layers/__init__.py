"""Flax (Linen) mixer layers; the math lives in :mod:`ssmjax.scan`."""

from ssmjax.layers.registry import get, names, register

__all__ = ["get", "names", "register"]
