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

#: Methods every scan op understands; ops may accept a subset (plus ``"parallel"``). Ops
#: without a Pallas kernel for some input (``matrix_scan``, complex inputs) reject
#: ``"pallas"`` with a ``ValueError`` that says so.
METHODS = ("auto", "sequential", "associative", "chunked", "pallas")


def check_method(method: str, allowed: Sequence[str]) -> str:
    if method not in allowed:
        raise ValueError(f"method: expected one of {tuple(allowed)}, got {method!r}")
    return method


def pallas_interpret() -> bool:
    """Whether ``method="pallas"`` must run its kernels under the Pallas interpreter:
    ``True`` on CPU (slow; for tests), ``False`` on GPU/TPU where they compile; a
    ``ValueError`` on any other backend. Shared by every scan op with a kernel."""
    backend = jax.default_backend()
    if backend == "cpu":
        return True
    if backend in ("gpu", "cuda", "rocm", "tpu"):
        return False
    raise ValueError(
        f"method: 'pallas' has no kernel for the {backend!r} backend "
        "(GPU and TPU compile it, CPU interprets it); use another method"
    )


def check_pallas_chunked_attention(op: str, cut: Array | None, chunk_size: int | None) -> bool:
    """Checks for ``method="pallas"`` of the chunked attention ops (gated linear attention,
    delta rule), whose kernels are written for the Triton GPU lowering and carry the state
    along whole rows. Returns ``pallas_interpret()``."""
    if cut is not None:
        raise ValueError(
            f"segment_ids, reset: method 'pallas' of {op} does not support packed sequences "
            "(the kernel carries the state along the whole row); use method='chunked'"
        )
    interpret = pallas_interpret()
    if jax.default_backend() == "tpu":
        raise ValueError(
            f"method: 'pallas' has no TPU kernel for {op} (the kernel targets the Triton GPU "
            "lowering); use 'chunked'"
        )
    if chunk_size is not None:
        minimum = 1 if interpret else 16
        if chunk_size & (chunk_size - 1) or chunk_size < minimum:
            raise ValueError(
                f"chunk_size: method 'pallas' needs a power of two >= {minimum}, got {chunk_size}"
            )
    return interpret


def static_scale(scale, default: float) -> float | None:
    """``scale`` as a Python float for a kernel's static argument (``default`` if ``None``),
    or ``None`` when it is traced (the caller then folds it into the queries)."""
    if scale is None:
        return float(default)
    try:
        return float(np.asarray(scale))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


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


def check_chunk_size(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    return chunk_size


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
