"""Sequence parallelism for whole models: the scan ops of a model's layers run
sequence-parallel inside :func:`sequence_parallel`, without any layer knowing about meshes.

Within ``with sequence_parallel(mesh):`` (active while the model is *traced*: around
``jax.jit(...)``'s first call or ``.lower``, or inside the traced function;
``ssmjax.train.train(..., mesh=...)`` does this when the mesh has a ``seq`` axis of size > 1),
a call of

===================================  ==========================================================
op                                   runs
===================================  ==========================================================
``linear_scan``                      :func:`~ssmjax.distributed.sequence.linear_scan_sp`
``selective_scan``                   :func:`~ssmjax.distributed.sequence.selective_scan_sp`
``gated_linear_attention``           :func:`~ssmjax.distributed.sequence.gated_linear_attention_sp`
``delta_rule``                       :func:`~ssmjax.distributed.sequence.delta_rule_sp`
``causal_softmax_attention``         :func:`~ssmjax.distributed.ring.ring_attention`
``causal_conv1d``                    :func:`~ssmjax.distributed.sequence.causal_conv1d_sp`
===================================  ==========================================================

when its arguments are supported: the time axis (axis 1 of the first input) has at least
one token per device of the ``seq`` axis and divides over them, and

* ``selective_scan``: ``reverse=False`` (its sequence-parallel version runs forward only);
* ``causal_softmax_attention``: ``window=None`` and ``scale`` a constant (or ``None``);
* ``causal_conv1d``: a kernel of ``k >= 2`` taps and at least ``k - 1`` tokens per device
  (each device takes the ``k - 1`` inputs before its shard from the previous one).

Everything else (``initial_state``, ``segment_ids`` / ``reset``, ``reverse`` of
``linear_scan``, broadcast decays, ``method`` / ``chunk_size`` / ``block_sizes``, which the
op runs with on each shard) is supported. The batch axis is split over the mesh's ``data``
and ``fsdp`` axes of size > 1 (as :func:`~ssmjax.distributed.mesh.batch_spec` splits a
training batch) when the rows divide over them, else replicated. An unsupported call, a
decoding step (one token) for example, runs the single-device op unchanged: still correct
(XLA's partitioner gathers its time axis), only not sequence parallel. (It falls back
rather than raising so that every model stays correct whatever its layers call;
``tests/distributed/test_sequence_models.py`` counts the collectives that move the full
time axis of a model.) The ops called by
the sequence-parallel versions on their own shards are never routed again (they run inside
a ``shard_map`` over the axis: :func:`ssmjax.scan._dispatch.active_sequence_parallel`).

Position-dependent code outside these ops (RoPE's positions ``arange(time)``, say) runs on
global arrays outside any ``shard_map``: XLA's partitioner computes each shard's part
exactly, without gathering the time axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ssmjax.distributed.mesh import batch_spec
from ssmjax.distributed.ring import ring_attention
from ssmjax.distributed.sequence import (
    causal_conv1d_sp,
    delta_rule_sp,
    gated_linear_attention_sp,
    linear_scan_sp,
    selective_scan_sp,
)
from ssmjax.scan._dispatch import SequenceParallel, sequence_context


def sequence_parallel(mesh: Mesh, axis: str = "seq"):
    """A context manager: within it, the scan ops of the module docstring's table run
    sequence-parallel over mesh ``axis`` (when the call supports it; see the module
    docstring for the rule). A mesh whose ``axis`` has one device activates nothing. The
    setting is part of ``jax.jit``'s cache key (a function traced outside is re-traced
    inside). ``ValueError`` naming ``axis`` when the mesh has no such axis."""
    if axis not in mesh.shape:
        raise ValueError(f"axis: {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    rows = batch_spec(mesh, 1)[0]  # the batch's axes, as a training batch is split: None, a name or names
    rows = (rows,) if isinstance(rows, str) else rows
    setting = (SequenceParallel(mesh, axis, None if rows is None else tuple(rows), route)
               if mesh.shape[axis] > 1 else None)
    return sequence_context(setting)


# ----------------------------------------------------------------------------- the rule
def _splits(setting: SequenceParallel, x: Any) -> bool:
    """Whether ``x``'s time axis (axis 1) divides over the setting's axis, one token or more per device."""
    shape = jnp.shape(x)
    n = setting.mesh.shape[setting.axis]
    return len(shape) >= 2 and shape[1] >= n and shape[1] % n == 0


def _placement(setting: SequenceParallel, x: Any) -> dict[str, Any]:
    """``mesh``, ``axis``, ``batch_axes`` for an sp op on ``x [batch, time, ...]``: the batch
    over the setting's batch axes when its rows divide over them, else replicated."""
    axes = setting.batch_axes
    if axes is not None and jnp.shape(x)[0] % math.prod(setting.mesh.shape[a] for a in axes):
        axes = None
    return dict(mesh=setting.mesh, axis=setting.axis, batch_axes=axes)


def _constant_scale(scale: Any) -> bool:
    """Whether ``scale`` is ``None`` or a constant (ring attention needs a Python float)."""
    if scale is None:
        return True
    try:
        float(scale)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):  # traced, or not a scalar
        return False
    return True


def _linear_scan(setting, a, b, **options):
    return _call(linear_scan_sp, setting, b, a, b, **options) if _splits(setting, b) else None


def _selective_scan(setting, u, delta, A, B, C, *, reverse, **options):
    if reverse or not _splits(setting, u):
        return None
    return _call(selective_scan_sp, setting, u, u, delta, A, B, C, **options)


def _gated_linear_attention(setting, q, k, v, **options):
    return _call(gated_linear_attention_sp, setting, q, q, k, v, **options) if _splits(setting, q) else None


def _delta_rule(setting, q, k, v, beta, **options):
    return _call(delta_rule_sp, setting, q, q, k, v, beta, **options) if _splits(setting, q) else None


def _causal_softmax_attention(setting, q, k, v, *, window, scale, segment_ids):
    if window is not None or not _constant_scale(scale) or not _splits(setting, q):
        return None
    return _call(ring_attention, setting, q, q, k, v, scale=scale, segment_ids=segment_ids)


def _causal_conv1d(setting, x, weight, **options):
    halo, n = jnp.shape(weight)[0] - 1, setting.mesh.shape[setting.axis]
    if not _splits(setting, x) or not 1 <= halo <= jnp.shape(x)[1] // n:
        return None
    return _call(causal_conv1d_sp, setting, x, x, weight, **options)


def _call(sp_op: Callable, setting, like, *args, **options) -> Callable:
    """``sp_op(*args, **options)`` placed for ``like``, as a thunk."""
    return lambda: sp_op(*args, **options, **_placement(setting, like))


_ROUTES: dict[str, Callable] = {
    "linear_scan": _linear_scan,
    "selective_scan": _selective_scan,
    "gated_linear_attention": _gated_linear_attention,
    "delta_rule": _delta_rule,
    "causal_softmax_attention": _causal_softmax_attention,
    "causal_conv1d": _causal_conv1d,
}


def route(name: str, setting: SequenceParallel, arguments: dict[str, Any]) -> Callable[[], Any] | None:
    """The sequence-parallel call of op ``name`` with ``arguments`` (every parameter, by
    name) under ``setting``, as a thunk; ``None`` when the rule of the module docstring
    keeps the call on the single-device op."""
    return _ROUTES[name](setting, **arguments)
