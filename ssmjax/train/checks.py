"""Host-side validation of batches, before they reach a compiled step.

A token id outside the embedding table, a label outside the output classes or a NaN
feature does not raise inside ``jit``: it turns into NaN (or silently wrong) logits a
step later. :func:`check_batch` catches these on the host with a few reductions per
field (``min``/``max``/``isfinite``: microseconds for a ``[32, 256]`` batch) and raises
a :class:`ValueError` naming the batch field, the allowed range and the first offending
value and index.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What a model accepts. ``vocab_size``: integer inputs lie in ``[0, vocab_size)``
    (``None``: only ``>= 0`` is checked); ``num_classes``: targets where ``mask`` is set lie
    in ``[0, num_classes)`` (``None``: not checked); ``float_inputs``: ``True`` for float
    features ``[b, t, d]``, ``False`` for int tokens ``[b, t]``, ``None`` for either."""

    vocab_size: int | None = None
    num_classes: int | None = None
    float_inputs: bool | None = None


def model_spec(model: Any, task: Any = None, num_classes: int | None = None) -> BatchSpec:
    """The :class:`BatchSpec` of a model with a ``vocab_size`` attribute (e.g.
    :class:`~ssmjax.models.SequenceModel`: ``None`` means float features); otherwise the
    task's ``vocab_size`` attribute, if any, bounds integer inputs."""
    if hasattr(model, "vocab_size"):
        vocab = model.vocab_size
        return BatchSpec(vocab, num_classes, float_inputs=vocab is None)
    return BatchSpec(getattr(task, "vocab_size", None), num_classes, None)


def _first_index(bad: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _check_range(where: str, field: str, what: str, values: np.ndarray, high: int | None) -> None:
    """``values`` (a flat or shaped int array) within ``[0, high)``."""
    if values.size == 0:
        return
    low_value, high_value = int(values.min()), int(values.max())
    if low_value >= 0 and (high is None or high_value < high):
        return
    bad = (values < 0) | (values >= high) if high is not None else values < 0
    index = _first_index(bad)
    allowed = f"[0, {high})" if high is not None else ">= 0"
    raise ValueError(f"{where}: batch.{field}: {what} must lie in {allowed}, got values in [{low_value}, {high_value}]"
                     f"; first offending value {int(values[index])} at index {index}")


def _check_dtype(where: str, field: str, array: np.ndarray, kinds: str, expected: str) -> None:
    if array.dtype.kind not in kinds:
        raise ValueError(f"{where}: batch.{field}: expected {expected}, got dtype {array.dtype}")


def check_batch(batch: Any, spec: BatchSpec, where: str = "training batch") -> None:
    """Raise :class:`ValueError` unless ``batch`` is a valid ``Batch(inputs, targets, mask)``
    for ``spec``: dtypes (inputs int or float, targets int, mask bool), shapes (``mask``
    like ``targets``, ``targets`` a prefix of ``inputs``' shape), finite float inputs, token
    ids in ``[0, vocab_size)``, targets in ``[0, num_classes)`` where ``mask`` is set."""
    if not all(hasattr(batch, f) for f in ("inputs", "targets", "mask")):
        raise ValueError(f"{where}: expected a Batch(inputs, targets, mask), got {type(batch).__name__}")
    inputs, targets, mask = (np.asarray(x) for x in (batch.inputs, batch.targets, batch.mask))
    _check_dtype(where, "inputs", inputs, "iuf", "int token ids or float features")
    _check_dtype(where, "targets", targets, "iu", "int class ids")
    _check_dtype(where, "mask", mask, "b", "bool (True where the loss is taken)")
    if inputs.ndim < 2:
        raise ValueError(f"{where}: batch.inputs: expected [batch, time] tokens or [batch, time, features], "
                         f"got shape {inputs.shape}")
    if mask.shape != targets.shape or targets.shape != inputs.shape[:targets.ndim] or targets.ndim == 0:
        raise ValueError(f"{where}: batch shapes: expected targets and mask of one shape, [batch, time] or [batch], "
                         f"a prefix of inputs {inputs.shape}; got targets {targets.shape}, mask {mask.shape}")
    if inputs.dtype.kind == "f":
        if spec.float_inputs is False:
            raise ValueError(f"{where}: batch.inputs: expected int token ids (the model embeds a vocabulary of "
                             f"{spec.vocab_size}), got dtype {inputs.dtype}")
        finite = np.isfinite(inputs)
        if not finite.all():
            index = _first_index(~finite)
            raise ValueError(f"{where}: batch.inputs: expected finite floats, got {int((~finite).sum())} NaN/inf "
                             f"values; first {inputs[index]} at index {index}")
    else:
        if spec.float_inputs is True:
            raise ValueError(f"{where}: batch.inputs: expected float features [batch, time, features] (the model has "
                             f"no vocabulary), got dtype {inputs.dtype}")
        _check_range(where, "inputs", "token ids", inputs, spec.vocab_size)
    if spec.num_classes is not None:
        masked = np.where(mask, targets, 0)
        _check_range(where, "targets", "class ids (where mask is True)", masked, spec.num_classes)
