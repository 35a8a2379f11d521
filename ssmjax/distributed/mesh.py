"""Device meshes and the shardings of a training state.

A mesh is given as ``"data=4,fsdp=2,seq=1"``: any subset of the axes

* ``data``: data parallelism (the batch is split, parameters replicated);
* ``fsdp``: fully sharded data parallelism (the batch is split too, and every large
  parameter and its optimizer moments are split along one dimension; ZeRO-3, Rajbhandari
  et al., 2020, as in PyTorch FSDP);
* ``seq``: sequence parallelism (the time axis is split; :mod:`ssmjax.distributed.sequence`);
* ``tensor``: reserved for tensor parallelism (kept unsplit by these rules).

Axis sizes must multiply to the number of devices. The mesh is built with
``jax.make_mesh`` and explicit ``AxisType.Auto`` axes, so XLA's partitioner propagates the
shardings through the model; batches are sharded ``P(("data", "fsdp"), "seq")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "seq", "tensor")
#: Parameters with fewer elements than this stay replicated (norm scales, biases, small
#: projections): splitting them saves little memory and costs a collective each.
MIN_SHARDED_SIZE = 2 ** 14


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=4,fsdp=2"`` -> ``{"data": 4, "fsdp": 2}`` (axes in :data:`AXES` order). One
    axis may be ``-1``: the devices the others leave (resolved by :func:`make_mesh`)."""
    sizes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in AXES:
            raise ValueError(f"mesh: expected axis=size items with axes from {AXES}, got {item!r} in {spec!r}")
        if name in sizes:
            raise ValueError(f"mesh: axis {name!r} given twice in {spec!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh: size of {name!r} must be an integer, got {value!r}") from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise ValueError(f"mesh: size of {name!r} must be >= 1 (or -1: the remaining devices), got {sizes[name]}")
    if not sizes:
        raise ValueError(f"mesh: expected at least one axis=size item, got {spec!r}")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {spec!r}")
    return {name: sizes[name] for name in AXES if name in sizes}


def make_mesh(spec: str | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of ``spec`` (a string for :func:`parse_mesh`, or ``{axis: size}``; one size
    may be ``-1``: the remaining devices) over ``devices`` (default: all, of every process).
    ``ValueError`` when the sizes do not multiply to the
    number of devices."""
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axes {unknown}; expected a subset of {AXES}")
    devices = list(jax.devices() if devices is None else devices)
    rest = [name for name, size in sizes.items() if size == -1]
    if rest:
        known = math.prod(size for size in sizes.values() if size != -1)
        if len(devices) % known:
            raise ValueError(f"mesh: axis sizes {sizes}: {len(devices)} devices do not divide by {known}")
        sizes[rest[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, but there are "
                         f"{len(devices)} devices")
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes),
                         devices=devices)


def _axes(mesh: Mesh | AbstractMesh, names: Sequence[str]) -> tuple[str, ...]:
    return tuple(name for name in names if mesh.shape.get(name, 1) > 1)


def batch_spec(mesh: Mesh | AbstractMesh, ndim: int) -> P:
    """``P(("data", "fsdp"), "seq", None, ...)`` restricted to the mesh's axes of size > 1:
    rows over the data-parallel axes, time over ``seq``."""
    rows = _axes(mesh, ("data", "fsdp"))
    time = _axes(mesh, ("seq",))
    spec = [rows or None] + ([time[0] if time else None] if ndim > 1 else [])
    return P(*spec, *([None] * (ndim - len(spec))))


def check_batch_shape(mesh: Mesh | AbstractMesh, shape: Sequence[int], name: str = "batch") -> None:
    """``ValueError`` when the rows (or the time axis) do not divide over their mesh axes."""
    rows = math.prod(mesh.shape[a] for a in _axes(mesh, ("data", "fsdp")))
    if shape[0] % rows:
        raise ValueError(f"{name}: {shape[0]} rows do not divide over the data/fsdp axes ({rows} devices)")
    seq = mesh.shape.get("seq", 1)
    if len(shape) > 1 and shape[1] % seq:
        raise ValueError(f"{name}: time length {shape[1]} does not divide over the seq axis ({seq} devices)")


def param_spec(shape: Sequence[int], mesh: Mesh | AbstractMesh, min_size: int = MIN_SHARDED_SIZE) -> P:
    """FSDP rule for one parameter (or optimizer moment) of ``shape``: split its largest
    dimension divisible by the ``fsdp`` axis size when it has at least ``min_size``
    elements; replicate it otherwise (and on meshes without ``fsdp``)."""
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    candidates = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda i: (shape[i], -i))
    return P(*(("fsdp" if i == dim else None) for i in range(len(shape))))


def state_shardings(state: Any, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> Any:
    """``NamedSharding`` for every leaf of a training state (parameters, optimizer state,
    step): :func:`param_spec` by shape, so each optimizer moment follows its parameter."""
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), mesh, min_size)), state)


def describe_shardings(params: Any, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> str:
    """The ``--dry-run`` table: each parameter's path, shape, spec and bytes per device,
    then the totals (parameters only; AdamW adds two moments of the same layout)."""
    rows, total, per_device = [], 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        spec = param_spec(np.shape(leaf), mesh, min_size)
        nbytes = int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
        split = mesh.shape["fsdp"] if "fsdp" in spec else 1
        total, per_device = total + nbytes, per_device + nbytes // split
        rows.append(("/".join(str(getattr(k, "key", k)) for k in path), str(tuple(np.shape(leaf))), str(spec), nbytes // split))
    width = max((len(r[0]) for r in rows), default=10)
    lines = [f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices; batch {batch_spec(mesh, 2)}",
             f"{'parameter':<{width}}  {'shape':<16} {'spec':<24} bytes/device"]
    lines += [f"{p:<{width}}  {s:<16} {spec:<24} {b:,}" for p, s, spec, b in rows]
    lines.append(f"parameters: {total:,} bytes in all, {per_device:,} per device "
                 f"(x3 with the AdamW moments: {3 * per_device:,})")
    return "\n".join(lines)
