"""Argument checking and small array utilities shared by every scan op.

Every check raises ``ValueError`` naming the argument and the expected shape, so a user
sees ``"b: expected shape [batch, time, ...], got (3,)"`` instead of a broadcasting error
deep inside a ``lax.scan``. Checks run on static shapes and dtypes only, so they cost
nothing under ``jit``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ssmjax.checks import (  # noqa: F401  (the generic checks, re-exported for the scan ops)
    carry_cut_mask,
    check_broadcastable,
    check_chunk_size,
    check_floating,
    check_ndim,
    check_real_floating,
    check_shape,
)


def check_method(method: str, allowed: Sequence[str]) -> str:
    if method not in allowed:
        raise ValueError(f"method: expected one of {tuple(allowed)}, got {method!r}")
    return method


def static_scale(scale, default: float) -> float | None:
    """``scale`` as a Python float for a kernel's static argument (``default`` if ``None``),
    or ``None`` when it is traced (the caller then folds it into the queries)."""
    if scale is None:
        return float(default)
    try:
        return float(np.asarray(scale))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def expand_mask(mask: Array, ndim: int) -> Array:
    """``[batch, time]`` -> ``[batch, time, 1, ..., 1]`` with ``ndim`` dims in total."""
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def flip_time(tree):
    """Reverse axis 1 (time) of every array leaf in a pytree (``None`` leaves pass)."""
    return jax.tree.map(lambda x: jnp.flip(x, axis=1), tree)


def pad_time(x: Array, multiple: int, value: float = 0.0) -> Array:
    """Pad axis 1 at the end up to a multiple of ``multiple`` with ``value``."""
    pad = -x.shape[1] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def state_dtype(*dtypes) -> jnp.dtype:
    """The accumulation dtype: at least float32 (complex64 if anything is complex)."""
    return jnp.result_type(jnp.float32, *dtypes)
