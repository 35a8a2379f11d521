"""Project-wide rules that are easy to break silently."""

import pathlib
import re

import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_shape_annotations_are_checked_in_tests():
    """conftest installs the jaxtyping + beartype hook: a wrong internal shape is caught."""
    from ssmjax.scan.conv import _causal_conv

    x, weight_with_wrong_channels = jnp.ones((2, 5, 3)), jnp.ones((4, 2))
    with pytest.raises(TypeCheckError):
        _causal_conv(x, weight_with_wrong_channels, jnp.ones((2, 3, 3)), jnp.zeros((2, 5), int))


def test_kernels_do_not_import_ssmjax():
    """Dependencies point down only: pallas_kernels depends on jax alone."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "pallas_kernels").rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+ssmjax", p.read_text(), re.M)]
    assert not offenders, offenders
