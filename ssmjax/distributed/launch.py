"""Joining a multi-process (multi-host) JAX job: :func:`initialize`.

A JAX program spread over several processes (one per host on a TPU pod slice, one per
node or per GPU on a GPU cluster) must call ``jax.distributed.initialize`` in every
process before its first JAX computation; afterwards ``jax.devices()`` lists the devices
of all processes, a mesh (:func:`ssmjax.distributed.make_mesh`) spans them, and
``ssmjax.train.train(..., mesh=...)`` feeds each process's rows of the batch with
``jax.make_array_from_process_local_data``.

:func:`initialize` takes the job's layout from the first of these that is present:

1. explicit arguments ``coordinator="HOST:PORT"``, ``num_processes``, ``process_id``
   (all three, or none);
2. the environment: ``SSMJAX_COORDINATOR``, ``SSMJAX_NUM_PROCESSES``,
   ``SSMJAX_PROCESS_ID`` (all three, or none);
3. a cluster that ``jax.distributed.initialize()`` detects by itself (jax 0.10's
   ``jax._src.clusters``): a SLURM step with ``SLURM_NTASKS > 1`` (``srun``), an Open MPI
   job with ``OMPI_COMM_WORLD_SIZE > 1`` (``mpirun``), a Cloud TPU VM (``libtpu``
   installed and TPU chips on the PCI bus: jax reads the pod slice's workers from the VM
   metadata, or from ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` on GKE).
   :func:`detect_cluster` only looks at these environment variables, ``libtpu`` and the
   PCI bus; jax itself then reads the coordinator, process count and id. When jax finds
   no cluster after all nothing is initialised.

With none of them (a plain single machine, or a one-task SLURM job) :func:`initialize`
does nothing and returns ``False``: one process sees its own devices, as before.
Kubernetes and ``mpi4py`` bootstrapping (opt-in in jax) are reached through 2 (or through
``jax.distributed.initialize(cluster_detection_method=...)`` called directly).

On CPU, processes exchange collectives through gloo over TCP (jax's default
``jax_cpu_collectives_implementation``), which is what the two-process test uses.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import jax

ENV_COORDINATOR = "SSMJAX_COORDINATOR"
ENV_NUM_PROCESSES = "SSMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SSMJAX_PROCESS_ID"
ENV_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)

#: jax 0.10's SLURM detection needs all of these (``jax._src.clusters.slurm_cluster``).
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
#: jax 0.10's Open MPI detection keys on the ORTE URI (``jax._src.clusters.ompi_cluster``).
OMPI_URI = "OMPI_MCA_orte_hnp_uri"
#: The PCI vendor id of TPU chips (``jax._src.hardware_utils``).
GOOGLE_PCI_VENDOR = "0x1ae0"
#: Set on GKE TPU pods (``jax._src.clusters.cloud_tpu_cluster.GkeTpuCluster``).
TPU_WORKER_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


class Layout(NamedTuple):
    """An explicit job layout: ``coordinator`` ``"HOST:PORT"`` of process 0's coordinator
    service, ``num_processes`` >= 1, ``process_id`` in ``[0, num_processes)``."""

    coordinator: str
    num_processes: int
    process_id: int


def _integer(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if isinstance(value, float) and value != number:
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return number


def check_layout(coordinator, num_processes, process_id, names: Sequence[str] = ("coordinator", "num_processes",
                                                                                   "process_id")) -> Layout:
    """The checked :class:`Layout` of three given values; ``names`` are what the error
    messages call them (the arguments, or the environment variables).

    ``ValueError`` when the coordinator is not ``HOST:PORT`` with a port in
    ``[1, 65535]``, ``num_processes < 1``, or ``process_id`` is outside
    ``[0, num_processes)``."""
    host, sep, port = str(coordinator).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{names[0]}: expected HOST:PORT (e.g. 10.0.0.1:1234, port in [1, 65535]), "
                         f"got {coordinator!r}")
    count, index = _integer(names[1], num_processes), _integer(names[2], process_id)
    if count < 1:
        raise ValueError(f"{names[1]}: expected >= 1 processes, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"{names[2]}: expected an id in [0, {count}) ({names[1]} = {count}), got {index}")
    return Layout(f"{host}:{port}", count, index)


def _all_or_none(values: Sequence, names: Sequence[str], where: str) -> bool:
    """Whether all three values are given; ``ValueError`` naming the missing ones when only
    some are."""
    missing = [name for name, value in zip(names, values) if value is None]
    if len(missing) == len(values):
        return False
    if missing:
        given = [name for name in names if name not in missing]
        raise ValueError(f"{', '.join(missing)}: missing; {where} {', '.join(given)} but a multi-process job needs "
                         f"all of {', '.join(names)}")
    return True


def _count(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "1"))
    except ValueError:
        return 1


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The cluster that ``jax.distributed.initialize()`` would detect, judged from the
    environment only (no JAX call, no network): ``"slurm"`` (an ``srun`` step of more
    than one task), ``"ompi"`` (``mpirun`` with more than one rank), ``"gketpu"`` (a GKE
    TPU pod), ``"tpu"`` (``libtpu`` installed, TPU chips on the PCI bus and no
    ``TPU_SKIP_MDS_QUERY``, which jax sets where there are none: a Cloud TPU VM, whose pod
    slice jax reads from the VM metadata), or ``None``."""
    environ = os.environ if environ is None else environ
    if all(name in environ for name in SLURM_VARS):
        return "slurm" if _count(environ, "SLURM_NTASKS") > 1 else None
    if OMPI_URI in environ:
        return "ompi" if _count(environ, "OMPI_COMM_WORLD_SIZE") > 1 else None
    if any(name in environ for name in TPU_WORKER_VARS):
        return "gketpu"
    if environ.get("TPU_SKIP_MDS_QUERY"):  # set by jax's TPU start-up on a machine without TPU chips
        return None
    libtpu = environ.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu") is not None
    return "tpu" if libtpu and _tpu_chips_present() else None


def _tpu_chips_present() -> bool:
    """Whether a Google PCI device (vendor ``0x1ae0``: the TPU chips of a Cloud TPU VM) is
    attached, as jax checks before it queries the VM metadata. ``libtpu`` alone (installed
    with ``jax[tpu]``, e.g. to compile for TPU targets from a CPU host) is not a TPU VM."""
    return any(path.read_text().strip() == GOOGLE_PCI_VENDOR
               for path in Path("/sys/bus/pci/devices").glob("*/vendor"))


def layout_from(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                environ: Mapping[str, str] | None = None) -> tuple[str, Layout | None]:
    """Where the layout comes from and what it is, without initialising anything:
    ``("explicit", layout)``, ``("environment", layout)``, ``(cluster name, None)`` (jax
    reads the layout, see :func:`detect_cluster`) or ``("none", None)``. ``ValueError``
    for a partial or malformed explicit or environment layout."""
    environ = os.environ if environ is None else environ
    names = ("coordinator", "num_processes", "process_id")
    if _all_or_none((coordinator, num_processes, process_id), names, "given"):
        return "explicit", check_layout(coordinator, num_processes, process_id)
    values = tuple(environ.get(name) or None for name in ENV_VARS)
    if _all_or_none(values, ENV_VARS, "the environment sets"):
        return "environment", check_layout(*values, names=ENV_VARS)
    cluster = detect_cluster(environ)
    return (cluster, None) if cluster else ("none", None)


def _check_joined(layout: Layout) -> None:
    """``ValueError`` when the job this process already joined has another layout."""
    count, index = jax.process_count(), jax.process_index()
    if (count, index) != (layout.num_processes, layout.process_id):
        raise ValueError(f"num_processes, process_id: this process already joined a job as process {index} of "
                         f"{count}, not {layout.process_id} of {layout.num_processes}")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | int | None = None) -> bool:
    """Join the multi-process job this process belongs to (see the module docstring for
    where the layout comes from); call it before any other JAX call. Returns whether
    ``jax.distributed`` is initialised afterwards: ``False`` on a plain single machine,
    where it does nothing.

    Idempotent: once initialised, a second call returns ``True`` (``ValueError`` if its
    explicit layout differs from the one joined). ``local_device_ids`` restricts the
    devices this process uses (e.g. ``[0]`` for one GPU per process); it does not by
    itself ask for a multi-process job.

    ``ValueError`` names what is missing or malformed: ``coordinator`` given without
    ``num_processes`` and ``process_id`` (or the same for the ``SSMJAX_*`` variables),
    a coordinator that is not ``HOST:PORT``, ``process_id`` outside
    ``[0, num_processes)``."""
    source, layout = layout_from(coordinator, num_processes, process_id)
    if jax.distributed.is_initialized():
        if layout is not None:
            _check_joined(layout)
        return True
    if source == "none":
        return False
    if layout is not None:
        jax.distributed.initialize(layout.coordinator, layout.num_processes, layout.process_id,
                                   local_device_ids=local_device_ids)
        return True
    try:
        jax.distributed.initialize(local_device_ids=local_device_ids)
    except ValueError as error:
        if "coordinator_address should be defined" in str(error):
            return False  # the hint was wrong (e.g. libtpu on a machine without TPUs): nothing to join
        raise
    return True
