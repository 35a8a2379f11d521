"""Argument validation shared by scan ops, layers and models.

Every check raises ``ValueError`` naming the argument and what was expected, so a user sees
``"b: expected shape [batch, time, ...], got (3,)"`` or ``"a_init: expected one of ('lin',
'inv'), got 'foo'"`` instead of a broadcasting error deep inside a ``lax.scan``. Checks run
on static shapes, dtypes and Python values only, so they cost nothing under ``jit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import jax.numpy as jnp
from jax import Array

T = TypeVar("T")


def check_choice(name: str, value: T, allowed: Sequence[Any]) -> T:
    """``value`` if it is one of ``allowed``, else a ``ValueError`` naming ``name``."""
    if value not in tuple(allowed):
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")
    return value


def check_positive_int(name: str, value: int) -> int:
    """``value`` if it is an ``int >= 1``, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_chunk_size(chunk_size: int) -> int:
    """``chunk_size`` must be a positive int."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    return chunk_size


def check_floating(name: str, x: Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise ValueError(f"{name}: expected a floating or complex dtype, got {x.dtype}")


def check_real_floating(name: str, x: Array) -> None:
    check_floating(name, x)
    if jnp.iscomplexobj(x):
        raise ValueError(f"{name}: expected a real floating dtype, got {x.dtype}")


def check_ndim(name: str, x: Array, ndim: int | Sequence[int], layout: str) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in allowed:
        raise ValueError(f"{name}: expected shape {layout}, got {tuple(x.shape)}")


def check_shape(name: str, x: Array, shape: Sequence[int], layout: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {layout} = {tuple(shape)}, got {tuple(x.shape)}"
        )


def check_multihead_qkv(q: Array, k: Array, v: Array) -> tuple[int, int, int, int, int]:
    """``q, k [batch, time, heads, dk]`` and ``v [batch, time, heads, dv]``, real floating;
    returns ``(batch, time, heads, dk, dv)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_real_floating(name, x)
    check_ndim("q", q, 4, "[batch, time, heads, dk]")
    batch, time, heads, dk = q.shape
    check_shape("k", k, q.shape, "[batch, time, heads, dk]")
    check_ndim("v", v, 4, "[batch, time, heads, dv]")
    dv = v.shape[-1]
    check_shape("v", v, (batch, time, heads, dv), "[batch, time, heads, dv]")
    return batch, time, heads, dk, dv


def check_broadcastable(name: str, x: Array, shape: Sequence[int], layout: str) -> None:
    """``x`` must broadcast to exactly ``shape`` (never grow it)."""
    try:
        out = jnp.broadcast_shapes(tuple(x.shape), tuple(shape))
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"{name}: expected a shape broadcastable to {layout} = {tuple(shape)}, "
            f"got {tuple(x.shape)}"
        )


def carry_cut_mask(
    segment_ids: Array | None,
    reset: Array | None,
    batch: int,
    time: int,
    reverse: bool,
) -> Array | None:
    """Where the state carried *into* a position must be dropped, in scan order.

    ``segment_ids`` ``[batch, time]`` (ints) marks documents packed into one row; the
    state restarts wherever the id changes. ``reset`` ``[batch, time]`` (bool) marks the
    first token of each document explicitly (``reset[:, 0]`` also drops
    ``initial_state``). Returns a bool ``[batch, time]`` mask ``cut`` in *time* order:
    ``cut[:, t]`` means "position ``t`` receives no state from its predecessor in the
    scan direction" (``t - 1`` forward, ``t + 1`` for ``reverse=True``), or ``None``
    when neither argument is given.
    """
    if segment_ids is not None and reset is not None:
        raise ValueError("segment_ids and reset: pass at most one of them")
    if segment_ids is None and reset is None:
        return None
    if segment_ids is not None:
        check_shape("segment_ids", segment_ids, (batch, time), "[batch, time]")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype}")
        change = segment_ids[:, 1:] != segment_ids[:, :-1]  # boundary between t-1 and t
        no = jnp.zeros((batch, 1), bool)
        return jnp.concatenate([change, no] if reverse else [no, change], axis=1)
    check_shape("reset", reset, (batch, time), "[batch, time]")
    if reset.dtype != jnp.bool_:
        raise ValueError(f"reset: expected a bool dtype, got {reset.dtype}")
    if not reverse:
        return reset
    # Reverse: the document starting at t cuts the flow from t into t - 1.
    return jnp.concatenate([reset[:, 1:], jnp.zeros((batch, 1), bool)], axis=1)
