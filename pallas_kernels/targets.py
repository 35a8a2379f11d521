"""Accelerator targets to compile the kernels for ahead of time, from any host.

jax lowers and compiles for a *described* device without owning it
(``jax.experimental.topologies.get_topology_desc``): TPUs through ``libtpu`` (the
``jax[tpu]`` extra of the installed jax version), NVIDIA GPUs through the CUDA PJRT
plugin (``jax-cuda12-plugin``) given a ``GpuTargetConfig`` (the device facts below, from
XLA's ``xla/backends/gpu/target_config/specs/*.txtpb``) and ``ptxas``
(``nvidia-cuda-nvcc-cu12``). ``pip install -e '.[targets]'`` installs all three.

* :data:`TARGETS`: the named targets (``h100``, ``a100``, ``tpu_v4``, ``tpu_v5e``,
  ``tpu_v6e``) with the on-chip memory limit a kernel program must fit in (GPU: shared
  memory per block, opt-in maximum; TPU: the default scoped VMEM limit).
* :func:`device` / :func:`sharding`: the compile-only device of a target.
* :func:`compile_for_target`: lower and compile a function for a target and measure, from
  the compiled artefact, compile time, on-chip memory and (GPU) registers and spills.
* :data:`DEFAULT_BLOCK_SIZES` / :func:`default_block_sizes`: the per-target kernel tiling
  table (the defaults the target tests prove).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

from pallas_kernels import chunked_delta, chunked_gla, linear_scan, rnn, selective_scan

# Compile-only TPU clients never touch a chip: let several processes (pytest -n 2, a
# report running beside the tests) load libtpu at once instead of failing on its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

KiB = 1024
MiB = 1024 * KiB


@dataclasses.dataclass(frozen=True)
class Target:
    """One accelerator to compile for.

    Attributes:
      name: the key in :data:`TARGETS`.
      platform: ``"gpu"`` (Triton lowering, CUDA PJRT plugin) or ``"tpu"`` (Mosaic, libtpu).
      topology: the topology name ``get_topology_desc`` takes (TPU: ``"v5e:2x2"``, the
        smallest slice libtpu describes; one of its chips is used).
      memory_limit: bytes of on-chip memory one kernel program may use: GPU shared
        memory per block (opt-in maximum), TPU scoped VMEM (the compiler's default limit).
      arch: GPU: the ``ptxas`` architecture (``"sm_90a"``); TPU: ``None``.
      gpu_facts: GPU: the ``gpu_device_info`` fields of the ``GpuTargetConfig``.
      description: what the target is, for reports.
    """

    name: str
    platform: str
    topology: str
    memory_limit: int
    arch: str | None = None
    gpu_facts: tuple[tuple[str, Any], ...] = ()
    description: str = ""

    @property
    def memory_kind(self) -> str:
        return "shared memory" if self.platform == "gpu" else "VMEM"

    def target_config(self) -> str:
        """The ``GpuTargetConfigProto`` text (GPU targets only)."""
        lines = []
        for key, value in self.gpu_facts:
            if key == "cuda_compute_capability":
                major, minor, accelerated = value
                ext = "ACCELERATED_FEATURES" if accelerated else "NONE"
                lines.append(
                    f"cuda_compute_capability {{ major: {major} minor: {minor} feature_extension: {ext} }}"
                )
            else:
                lines.append(f"{key}: {value}")
        body = "\n  ".join(lines)
        return (
            f"gpu_device_info {{\n  {body}\n}}\nplatform_name: \"CUDA\"\n"
            f"dnn_version_info {{ major: 9 minor: 10 patch: 0 }}\n"
            f"device_description_str: \"{self.description}\"\n"
        )


def _gpu_facts(smem_per_core, smem_optin, cores, fpus, cc, accelerated, l2, bandwidth, clock, memory):
    return (
        ("threads_per_block_limit", 1024),
        ("threads_per_warp", 32),
        ("shared_memory_per_block", 49152),
        ("shared_memory_per_core", smem_per_core),
        ("threads_per_core_limit", 2048),
        ("core_count", cores),
        ("fpus_per_core", fpus),
        ("block_dim_limit_x", 2147483647),
        ("block_dim_limit_y", 65535),
        ("block_dim_limit_z", 65535),
        ("memory_bandwidth", bandwidth),
        ("l2_cache_size", l2),
        ("clock_rate_ghz", clock),
        ("device_memory_size", memory),
        ("shared_memory_per_block_optin", smem_optin),
        ("cuda_compute_capability", (cc[0], cc[1], accelerated)),
        ("registers_per_core_limit", 65536),
        ("registers_per_block_limit", 65536),
        ("thread_dim_limit_x", 1024),
        ("thread_dim_limit_y", 1024),
        ("thread_dim_limit_z", 64),
    )


#: The named targets. GPU facts: XLA's ``h100_sxm`` and ``a100_sxm_80`` specs; TPU VMEM
#: limits: the default scoped VMEM of the Mosaic compiler (v4, v5e: 16 MiB, v6e: 32 MiB).
TARGETS: dict[str, Target] = {
    "h100": Target(
        "h100", "gpu", "1x1x1", 227 * KiB, "sm_90a",
        _gpu_facts(233472, 232448, 132, 128, (9, 0), True, 52428800, 3352320000000, 1.98, 84942979072),
        "NVIDIA H100 80GB HBM3",
    ),
    "a100": Target(
        "a100", "gpu", "1x1x1", 163 * KiB, "sm_80",
        _gpu_facts(167936, 166912, 108, 64, (8, 0), False, 41943040, 2039040000000, 1.41, 85100068864),
        "NVIDIA A100-SXM4-80GB",
    ),
    "tpu_v4": Target("tpu_v4", "tpu", "v4:2x2x1", 16 * MiB, description="TPU v4"),
    "tpu_v5e": Target("tpu_v5e", "tpu", "v5e:2x2", 16 * MiB, description="TPU v5e"),
    "tpu_v6e": Target("tpu_v6e", "tpu", "v6e:2x2", 32 * MiB, description="TPU v6e"),
}


def get_target(name: str) -> Target:
    """The :class:`Target` called ``name``; ``ValueError`` naming it if unknown."""
    if name not in TARGETS:
        raise ValueError(f"target: expected one of {tuple(TARGETS)}, got {name!r}")
    return TARGETS[name]


def toolchain_missing(name: str) -> str | None:
    """Why ``name`` cannot be compiled for on this host (``None``: it can)."""
    target = get_target(name)
    if target.platform == "tpu":
        try:
            import libtpu  # noqa: F401
        except ImportError:
            return "libtpu is not installed (pip install -e '.[targets]')"
        return None
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        return "jax-cuda12-plugin is not installed (pip install -e '.[targets]')"
    if _ptxas() is None:
        return "ptxas not found (nvidia-cuda-nvcc-cu12; pip install -e '.[targets]')"
    return None


@functools.cache
def device(name: str) -> jax.Device:
    """A compile-only device of target ``name`` (the first chip of its topology)."""
    from jax.experimental import topologies

    target = get_target(name)
    if target.platform == "tpu":
        return topologies.get_topology_desc(target.topology, "tpu").devices[0]
    topo = topologies.get_topology_desc(
        platform="cuda", topology=target.topology, target_config=target.target_config()
    )
    return topo.devices[0]


def sharding(name: str) -> jax.sharding.Sharding:
    """The single-device sharding to lower and compile against for target ``name``."""
    return jax.sharding.SingleDeviceSharding(device(name))


# ----------------------------------------------------------------------------- measuring
@dataclasses.dataclass(frozen=True)
class CompileStats:
    """What one ahead-of-time compile cost and asks of the chip.

    Attributes:
      target: target name.
      seconds: lowering plus compilation wall time.
      kernels: the Pallas kernels in the program.
      memory_bytes: the largest on-chip memory of one kernel program: GPU shared memory
        (from the compiled thunk sequence), TPU VMEM (the pipelined blocks, double
        buffered, plus scratch: what Mosaic allocates for the ``BlockSpec``\\ s).
      memory_limit: the target's limit for it.
      registers: GPU: the most registers per thread of a kernel (``ptxas -v``).
      spill_bytes: GPU: the most spill stores plus loads of a kernel (``ptxas -v``).
    """

    target: str
    seconds: float
    kernels: tuple[str, ...]
    memory_bytes: int
    memory_limit: int
    registers: int | None = None
    spill_bytes: int | None = None

    @property
    def within_limits(self) -> bool:
        return self.memory_bytes <= self.memory_limit


def _ptxas() -> str | None:
    try:
        import nvidia.cuda_nvcc
    except ImportError:
        return None
    for root in nvidia.cuda_nvcc.__path__:
        path = os.path.join(root, "bin", "ptxas")
        if os.path.exists(path):
            return path
    return None


def _pallas_calls(jaxpr) -> list:
    """Every ``pallas_call`` equation of a (closed) jaxpr, nested ones included (also in
    the branches of a ``cond``, e.g. ``platform_dependent``)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _pallas_calls(inner)
    return found


def _block_bytes(eqn) -> int:
    """VMEM of one TPU ``pallas_call``: every block twice (the pipeline double-buffers
    each operand), plus scratch."""
    mapping = eqn.params["grid_mapping"]
    total = 0
    for bm in mapping.block_mappings:
        shape = [d for d in (getattr(b, "block_size", b) for b in bm.block_shape) if isinstance(d, int)]
        total += 2 * math.prod(shape) * bm.array_aval.dtype.itemsize
    for aval in mapping.scratch_avals:
        if hasattr(aval, "shape") and hasattr(aval, "dtype"):
            total += math.prod(aval.shape) * aval.dtype.itemsize
    return total


def _kernel_name(eqn) -> str:
    info = eqn.params.get("name_and_src_info")
    return getattr(info, "name", None) or str(eqn.params.get("name", "pallas_call"))


_THUNK = re.compile(r"kCustomKernel\s.*?\]\s+(\S+) grid: .*shared_memory: (\d+) bytes")
_PTXAS_FUNC = re.compile(r"Function properties for (\S+)\n.*?(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Compiling entry function '(\S+)'.*?Used (\d+) registers", re.S)


def _gpu_stats(dump: str, kernels: set[str], arch: str) -> tuple[int, int, int]:
    """(shared memory, registers, spill bytes), the maxima over the Pallas kernels, from
    XLA's dump: the thunk sequence gives each launch's shared memory; ``ptxas -v`` on the
    kernels' PTX (the same PTX XLA assembled) gives registers and spills."""
    smem = 0
    for path in glob.glob(os.path.join(dump, "*thunk_sequence.txt")):
        for name, size in _THUNK.findall(open(path).read()):
            if name in kernels:
                smem = max(smem, int(size))
    registers = spills = 0
    for path in glob.glob(os.path.join(dump, "*.ptx")):
        text = open(path).read()
        if not any(f".entry {k}(" in text for k in kernels):
            continue
        out = subprocess.run(
            [_ptxas(), "-v", f"-arch={arch}", path, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr
        for name, stores, loads in _PTXAS_FUNC.findall(out):
            if name in kernels:
                spills = max(spills, int(stores) + int(loads))
        for name, regs in _PTXAS_REGS.findall(out):
            if name in kernels:
                registers = max(registers, int(regs))
    return smem, registers, spills


#: Compiler options every target compile sets explicitly: XLA's default backend (LLVM)
#: optimisation level, whatever ``XLA_FLAGS`` says (the test session lowers it for its own
#: CPU programs), so a proof is made with the options a user's compile has.
PRODUCTION_OPTIONS = {"xla_backend_optimization_level": 3}


def compile_for_target(fn: Callable, args: tuple, target_name: str) -> CompileStats:
    """Lower and compile ``fn(*args)`` for ``target_name`` and measure it.

    Args:
      fn: a function of arrays calling Pallas kernels with ``platform=`` the target's.
      args: ``jax.ShapeDtypeStruct``\\ s (placed on the target's device here).
      target_name: a key of :data:`TARGETS`.

    Raises whatever the compiler raises (e.g. shared memory or VMEM exhausted).
    """
    target = get_target(target_name)
    shard = sharding(target_name)
    args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard) for a in args)
    calls = _pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr)
    kernels = {_kernel_name(e) for e in calls}
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    if target.platform == "tpu":
        lowered.compile(PRODUCTION_OPTIONS)
        seconds = time.perf_counter() - start
        memory = max((_block_bytes(e) for e in calls), default=0)
        return CompileStats(target_name, seconds, tuple(sorted(kernels)), memory, target.memory_limit)
    with tempfile.TemporaryDirectory() as dump:
        lowered.compile({**PRODUCTION_OPTIONS, "xla_dump_to": dump})
        seconds = time.perf_counter() - start
        smem, registers, spills = _gpu_stats(dump, kernels, target.arch)
    return CompileStats(
        target_name, seconds, tuple(sorted(kernels)), smem, target.memory_limit, registers, spills
    )


# ----------------------------------------------------------------------------- defaults
#: The kernel modules by name (their ``BlockSizes`` classes are the table's values).
KERNEL_MODULES = {
    "linear_scan": linear_scan,
    "selective_scan": selective_scan,
    "chunked_gla": chunked_gla,
    "chunked_delta": chunked_delta,
    "rnn": rnn,
}

#: Per-target default tiling, where a target needs other than the kernel's own defaults
#: (``BlockSizes()``): ``(kernel, target or platform) -> BlockSizes``. Forward and
#: backward of a kernel share one entry (the backward reads the forward's residual, whose
#: layout depends on the tiling). Measured with ``make test-targets`` /
#: ``python -m experiments.kernel_report`` (see ``experiments/results/kernels.md``).
DEFAULT_BLOCK_SIZES: dict[tuple[str, str], Any] = {
    # (the other kernels' own defaults are the ones their targets need; the chunked
    # kernels' and the RNN's were chosen for the A100 / H100 shared memory and registers,
    # see their BlockSizes docstrings)
    #
    # GPUs: 16 channels per program. At 32 the forward spills 32 B of registers on A100 in
    # bfloat16 at 64 states (ptxas keeps it at 72 registers); at 16 no forward spills, and
    # the backward, which holds chunk + 1 states of [n, block_d], spills 0.5-0.9 KB at 64
    # states instead of 3.1-4.5 KB (none at 16 states either way).
    ("selective_scan", "gpu"): selective_scan.BlockSizes(block_d=16),
}


def default_block_sizes(kernel: str, target: str):
    """The block sizes ``kernel`` uses on ``target`` (a key of :data:`TARGETS`, or a
    platform ``"gpu"`` / ``"tpu"`` / ``"cpu"``): the table entry for the target, else
    for its platform, else the kernel's ``BlockSizes()``."""
    if kernel not in KERNEL_MODULES:
        raise ValueError(f"kernel: expected one of {tuple(KERNEL_MODULES)}, got {kernel!r}")
    platform = target if target in ("gpu", "tpu", "cpu") else get_target(target).platform
    for key in ((kernel, target), (kernel, platform)):
        if key in DEFAULT_BLOCK_SIZES:
            return DEFAULT_BLOCK_SIZES[key]
    return KERNEL_MODULES[kernel].BlockSizes()


#: Configurations measured not to meet the target tests yet, with the reason: a list of
#: ``(fields, reason)``, where ``fields`` must all match (``target``, ``platform`` and any
#: :class:`pallas_kernels.target_cases.Case` field; a tuple matches any of its values). ``method="auto"`` must not pick a
#: Pallas kernel for these.
KNOWN_ISSUES: list[tuple[dict[str, Any], str]] = [
    # (none at present: the last ones, the RNN backward at head dim 128 over the shared
    # memory and the sLSTM forward at 128 spilling registers, were fixed by looping over
    # column blocks with the state in memory; see pallas_kernels.rnn)
]


def known_issue(case, target: str) -> str | None:
    """Why ``case`` is known not to compile within limits on ``target`` (``None``: it does)."""
    facts = dataclasses.asdict(case) | {"target": target, "platform": get_target(target).platform}
    for fields, reason in KNOWN_ISSUES:
        if all(facts.get(k) in v if isinstance(v, tuple) else facts.get(k) == v for k, v in fields.items()):
            return reason
    return None
