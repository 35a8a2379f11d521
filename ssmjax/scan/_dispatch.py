"""The one dispatch table of the scan ops: methods, kernel constraints, and ``auto``.

For every public op, :data:`TABLE` says

* which ``method=`` values it accepts (anything else: one ``ValueError`` naming
  ``method``, the op and the allowed values, :func:`check_method`);
* where its Pallas kernel runs (``"cpu"`` means the Pallas interpreter, for tests; the
  accelerators compile it) and what the kernel refuses (complex inputs, packed
  sequences, chunks below Triton's smallest ``dot`` when compiled), :class:`Kernel`;
* what ``method="auto"`` picks on each platform: the Pallas kernel only for a case that a
  :class:`Proven` row covers (a platform, dtypes, decay kinds, head dim, sequence length,
  ``jax_enable_x64``: what the target-compile tests prove compiles within the target's
  limits), else the op's XLA method for that platform (``auto``).

The platform is decided when the program is *lowered*, not from ``jax.default_backend()``:
:func:`dispatch` stages every distinct choice with ``jax.lax.platform_dependent``, so a
program lowered for a TPU or a GPU from a CPU host (ahead of time, ``jax.export``) takes
that accelerator's branch, and only that branch is lowered. When every platform makes the
same choice the op is called directly (no conditional is staged).

Which platforms ``auto`` stages is one switch, :func:`staged_platforms`. Tracing a
branch is not free: float32 ``auto`` on a CPU host otherwise traces every platform's
branch (the CUDA kernel's forward and backward included), about 6x the trace+lower time
of ``jax.grad(selective_scan)``. A platform not staged takes the branch of the host
platform (``jax.default_backend()``, always staged), which runs everywhere but is not
the accelerator's best choice. The default is every platform (:data:`PLATFORMS`), so
ahead-of-time lowering for an accelerator is right by default; the environment variable
``SSMJAX_STAGE_PLATFORMS`` (comma-separated platforms, ``gpu`` = ``cuda,rocm``, read once at
import) or the context manager narrows it, e.g. CPU-only for CPU tests and training::

    with ssmjax.scan.staged_platforms("cpu"):       # trace only the CPU branch
        jax.jit(loss).lower(params, batch)
    with ssmjax.scan.staged_platforms("cpu", "tpu"):  # also lower for a TPU
        jax.export.export(jax.jit(f), platforms=("tpu",))(x)

The switch is part of jax's ``jit`` cache key (``jax.make_user_context``): a function
jitted under one setting is re-traced under another. It narrows ``auto`` only: an
explicit XLA method has one branch, and ``method="pallas"`` stages the kernel on every
platform it runs on (there is no fallback to take elsewhere).

To update the table from new target-compile results, edit the ``proven`` rows of an op:
add a row to let ``auto`` pick a kernel, narrow one to stop it. Nothing else decides.

Sequence parallelism is the one other decision taken here, before any method: under
:func:`ssmjax.distributed.sequence_parallel` (a mesh whose ``seq`` axis has more than one
device), the ops decorated with :func:`sequence_parallel_route` (``linear_scan``,
``selective_scan``, ``gated_linear_attention``, ``delta_rule``,
``causal_softmax_attention``, ``causal_conv1d``) run their sequence-parallel versions
when the call's arguments allow it (:mod:`ssmjax.distributed.context` has the rule per
op), and run as below otherwise. Like the staged platforms, the setting is part of ``jit``'s cache key.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

#: Platforms a plan names (``platform_dependent`` keys); ``"default"`` is any other one.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT = "default"
#: Where the kernels use the Triton lowering.
TRITON = ("cuda", "rocm")
#: Names :func:`staged_platforms` accepts besides :data:`PLATFORMS`.
PLATFORM_ALIASES = {"gpu": TRITON}
#: The environment variable with the default of :func:`staged_platforms`.
STAGE_ENV = "SSMJAX_STAGE_PLATFORMS"
DECAYS = ("none", "head", "channel")


@dataclasses.dataclass(frozen=True)
class Case:
    """The static facts of one call that decide its method.

    Attributes:
      dtype: name of the promoted input dtype (``"float32"``, ``"bfloat16"``, ``"complex64"``).
      packed: ``segment_ids`` or ``reset`` was given.
      time: sequence length.
      head_dim: key dimension ``dk`` of the attention ops (0 elsewhere).
      decay: ``"none"``, ``"head"`` or ``"channel"`` (the attention ops' ``log_decay``).
      x64: ``jax_enable_x64`` is on while tracing.
      chunk: the kernel chunk asked for (``None``: the kernel's default).
    """

    dtype: str
    packed: bool = False
    time: int = 0
    head_dim: int = 0
    decay: str = "none"
    x64: bool = False
    chunk: int | None = None

    @property
    def complex(self) -> bool:
        return self.dtype.startswith("complex")


def case(dtype, **facts) -> Case:
    """A :class:`Case` for inputs of ``dtype``, with ``x64`` read from the jax config."""
    return Case(dtype=jax.numpy.dtype(dtype).name, x64=bool(jax.config.jax_enable_x64), **facts)


@dataclasses.dataclass(frozen=True)
class Proven:
    """A kernel configuration proven to compile for ``platform`` (``auto`` may pick it).

    ``None`` bounds are unbounded; ``x64=False`` means the kernel fails to lower while
    ``jax_enable_x64`` is on (Mosaic: int64 index maps), so ``auto`` avoids it then.
    """

    platform: str
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    decays: tuple[str, ...] = DECAYS
    max_head_dim: int | None = None
    max_time: int | None = None
    x64: bool = True

    def covers(self, c: Case) -> bool:
        return (
            c.dtype in self.dtypes
            and c.decay in self.decays
            and (self.max_head_dim is None or c.head_dim <= self.max_head_dim)
            and (self.max_time is None or c.time <= self.max_time)
            and (self.x64 or not c.x64)
        )


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An op's Pallas kernel: where ``method="pallas"`` runs it and what it refuses.

    Attributes:
      name: the kernel family in :mod:`pallas_kernels.targets` (its per-target tiling).
      platforms: where it runs (``"cpu"``: the Pallas interpreter; others compile).
      complex: accepts complex inputs.
      packed: accepts ``segment_ids`` / ``reset``.
      min_triton_chunk: smallest kernel chunk when compiled by Triton (its smallest
        ``dot`` is 16 wide); any power of two in the interpreter.
      tpu_sublane_chunk: compiled by Mosaic TPU, a chunk is a block of rows: at least one
        sublane tile (8 rows of 32-bit inputs, 16 of 16-bit ones).
      dtypes: platform -> the only dtypes its compiled kernel accepts (absent: any); a
        platform that refuses the case's dtype gets no branch (its trace would raise).
    """

    name: str
    platforms: tuple[str, ...]
    complex: bool = False
    packed: bool = True
    min_triton_chunk: int = 1
    tpu_sublane_chunk: bool = False
    dtypes: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Op:
    """One public op: its methods, its XLA ``auto`` choice per platform, its kernel and
    the cases where ``auto`` picks the kernel."""

    methods: tuple[str, ...]
    auto: Mapping[str, str]  # platform (or DEFAULT) -> XLA method
    kernel: Kernel | None = None
    proven: tuple[Proven, ...] = ()


_LINEAR = ("auto", "sequential", "associative", "chunked")
_ANY = ("cpu", "cuda", "rocm", "tpu")
_GPU_ONLY = ("cpu", "cuda", "rocm")

# ----------------------------------------------------------------------------- the table
# Proven rows: a row may only cover what tests/kernels/test_targets.py proves, forward AND
# backward, on every target of its platform (TPU: v4, v5e, v6e; CUDA: H100 and A100),
# within the target's on-chip memory and with no register spill in the forward (a spill
# counts as not proven); measured with jax 0.10.2 (experiments/results/kernels.md,
# pallas_kernels.targets.KNOWN_ISSUES). Unmeasured cases stay on the XLA path. ROCm: never
# measured. tests/kernels/test_auto_targets.py compiles every op's auto path per target.
TABLE: dict[str, Op] = {
    "linear_scan": Op(
        methods=_LINEAR + ("pallas",),
        auto={"cpu": "sequential", DEFAULT: "chunked"},
        kernel=Kernel("linear_scan", platforms=_ANY, dtypes={"tpu": ("float32", "bfloat16")}),
        # Every layout, float32 and bfloat16, x64 on and off; on TPU the kernel is tiled
        # over time (VMEM independent of T: proven at 1k and 64k tokens).
        proven=(Proven("cuda"), Proven("tpu")),
    ),
    "matrix_scan": Op(methods=_LINEAR, auto={"cpu": "sequential", DEFAULT: "chunked"}),
    "selective_scan": Op(
        methods=_LINEAR + ("pallas",),
        auto={DEFAULT: "chunked"},
        kernel=Kernel("selective_scan", platforms=_ANY, dtypes={"tpu": ("float32", "bfloat16")}),
        # CUDA: float32 and bfloat16, states 16 and 64, x64 on and off, with the GPU
        # tiling of pallas_kernels.targets.DEFAULT_BLOCK_SIZES (16 channels per program; at
        # 32 the bfloat16 forward spilled registers on A100 at 64 states).
        # TPU (pallas_kernels.selective_scan_tpu, time tiles on a sequential grid axis):
        # float32 and bfloat16, shared and grouped B/C, states 16 and 64 (larger:
        # unmeasured), x64 on and off, on v4, v5e and v6e; VMEM (< 4 MiB) independent of
        # T (compiled at 1k and 64k tokens).
        proven=(Proven("cuda"), Proven("tpu")),
    ),
    "gated_linear_attention": Op(
        methods=("auto", "sequential", "parallel", "chunked", "pallas"),
        auto={DEFAULT: "chunked"},
        kernel=Kernel(
            "chunked_gla", platforms=_ANY, packed=False, min_triton_chunk=16,
            tpu_sublane_chunk=True, dtypes={"tpu": ("float32", "bfloat16")},
        ),
        # CUDA: head dims 64 and 128, every decay, both dtypes, x64 on and off (at 128 the
        # forward sums its dk contractions over blocks of 32 key columns, BlockSizes.block_k;
        # before that it spilled registers; larger head dims: unmeasured).
        # TPU (pallas_kernels.chunked_gla_tpu, one chunk per sequential grid step): every
        # decay, float32 and bfloat16, head dims 64 and 128 (larger: unmeasured), x64 on
        # and off, on v4, v5e and v6e; VMEM (< 1 MiB) independent of T (compiled at 1k
        # and 64k tokens).
        proven=(Proven("cuda", max_head_dim=128), Proven("tpu", max_head_dim=128)),
    ),
    "delta_rule": Op(
        methods=("auto", "sequential", "chunked", "pallas"),
        auto={DEFAULT: "chunked"},
        kernel=Kernel(
            "chunked_delta", platforms=_ANY, packed=False, min_triton_chunk=16,
            tpu_sublane_chunk=True, dtypes={"tpu": ("float32", "bfloat16")},
        ),
        # CUDA: gated and not, float32 and bfloat16, head dims 64 and 128 (larger:
        # unmeasured), x64 on and off (the forward sums its dk contractions over blocks of
        # 16 key columns, BlockSizes.block_k; before that it spilled registers).
        # TPU (pallas_kernels.chunked_delta_tpu): gated and not, float32 and bfloat16,
        # head dims 64 and 128 (larger: unmeasured), x64 on and off, on v4, v5e and v6e;
        # VMEM (< 1 MiB) independent of T (compiled at 1k and 64k tokens).
        proven=(Proven("cuda", max_head_dim=128), Proven("tpu", max_head_dim=128)),
    ),
    "prefix_softmax_attention": Op(
        methods=("auto", "sequential", "associative"),
        auto={"cpu": "sequential", DEFAULT: "associative"},
    ),
    "nonlinear_rnn": Op(
        methods=("sequential", "newton", "pallas"),
        auto={DEFAULT: "sequential"},
        kernel=Kernel("rnn", platforms=_GPU_ONLY),
    ),
    "plstm_1d": Op(methods=("auto", "sequential", "chunked"), auto={DEFAULT: "chunked"}),
    "plstm_2d": Op(methods=("auto", "sequential", "tiled"), auto={DEFAULT: "tiled"}),
}


# ----------------------------------------------------------------------------- resolution
def check_method(op: str, method: str) -> str:
    """The one error path for an unknown method: a ``ValueError`` naming ``method``."""
    allowed = TABLE[op].methods
    if method not in allowed:
        why = f"'pallas' has no kernel for {op}; " if method == "pallas" else ""
        raise ValueError(f"method: {why}expected one of {allowed} for {op}, got {method!r}")
    return method


def _xla_auto(op: Op, platform: str) -> str:
    return op.auto.get(platform, op.auto[DEFAULT])


def _kernel_platforms(name: str, c: Case) -> tuple[str, ...]:
    """Where ``method="pallas"`` can run for ``c``: the kernel's platforms, less those
    whose compiled kernel refuses ``c.dtype`` and those whose smallest chunk
    (:func:`min_chunk`) is above the chunk asked for."""
    kernel = TABLE[name].kernel
    small = lambda p: c.chunk is not None and c.chunk < min_chunk(kernel, p, c.dtype)  # noqa: E731
    return tuple(p for p in kernel.platforms
                 if not small(p) and c.dtype in kernel.dtypes.get(p, (c.dtype,)))


def min_chunk(kernel: Kernel, platform: str, dtype: str) -> int:
    """The smallest chunk ``kernel`` takes on ``platform`` for inputs of ``dtype``."""
    if platform in TRITON:
        return kernel.min_triton_chunk
    if platform == "tpu" and kernel.tpu_sublane_chunk:
        return 8 * max(1, 4 // jax.numpy.dtype(dtype).itemsize)
    return 1


def plan(name: str, method: str, c: Case) -> dict[str, str]:
    """The method each platform runs for ``method`` and case ``c``: a dict from platform
    (or ``"default"``: every other platform) to a method.

    An explicit XLA method runs everywhere; ``"pallas"`` runs where the kernel does (no
    ``"default"``: lowering for another platform fails); ``"auto"`` takes the kernel on a
    platform where a :class:`Proven` row covers ``c`` (and the kernel accepts ``c``), the
    op's XLA method elsewhere.
    """
    op = TABLE[name]
    check_method(name, method)
    if method == "pallas":
        return dict.fromkeys(_kernel_platforms(name, c), "pallas")
    if method != "auto":
        return {DEFAULT: method}
    out = {p: _xla_auto(op, p) for p in PLATFORMS}
    out[DEFAULT] = op.auto[DEFAULT]
    if op.kernel is not None and accepts(op.kernel, c):
        for row in op.proven:
            if row.platform in _kernel_platforms(name, c) and row.covers(c):
                out[row.platform] = "pallas"
    return out


def accepts(kernel: Kernel, c: Case) -> bool:
    return (kernel.complex or not c.complex) and (kernel.packed or not c.packed)


def host_platform() -> str:
    """``jax.default_backend()`` as a ``platform_dependent`` name (``"gpu"`` -> ``"cuda"``)."""
    backend = jax.default_backend()
    return "cuda" if backend == "gpu" else backend


def check_pallas(name: str, c: Case, inputs: str) -> None:
    """``ValueError`` for ``method="pallas"`` on a case the kernel refuses (``inputs`` names
    the arguments), or where the default backend has no kernel for it: found before any
    tracing rather than at lowering."""
    kernel = TABLE[name].kernel
    if c.complex and not kernel.complex:
        raise ValueError(
            f"{inputs}: method 'pallas' has no complex kernel (for {name}), got a complex "
            f"dtype {c.dtype}; use another method"
        )
    if c.packed and not kernel.packed:
        raise ValueError(
            f"segment_ids, reset: method 'pallas' of {name} does not support packed "
            "sequences (the kernel carries the state along the whole row); use method='chunked'"
        )
    host = host_platform()
    if host not in kernel.platforms:
        if host == "tpu":
            raise ValueError(f"method: 'pallas' has no TPU kernel for {name}; use 'chunked'")
        raise ValueError(
            f"method: 'pallas' has no kernel for the {jax.default_backend()!r} backend "
            "(GPU and TPU compile it, CPU interprets it); use another method"
        )
    if c.dtype not in kernel.dtypes.get(host, (c.dtype,)):
        raise ValueError(
            f"{inputs}: the compiled {host} kernel of {name} supports dtypes {kernel.dtypes[host]}, "
            f"got {c.dtype}; use another method"
        )
    if host not in _kernel_platforms(name, c):
        raise ValueError(
            f"chunk_size: method 'pallas' needs a power of two >= {min_chunk(kernel, host, c.dtype)} "
            f"when compiled, got {c.chunk} (compiled for {host}, {c.dtype} inputs)"
        )


def check_block_sizes(name: str, block_sizes, cls: type):
    """``block_sizes`` must be ``None`` (the per-target default) or a ``cls``; the
    dataclass itself validates its fields (``ValueError`` naming ``block_sizes.<field>``)."""
    if block_sizes is not None and not isinstance(block_sizes, cls):
        raise ValueError(
            f"block_sizes: expected None or a {cls.__name__} for {name}, "
            f"got {type(block_sizes).__name__}"
        )
    return block_sizes


def block_sizes_for(op: str, block_sizes, platform: str):
    """The tiling ``op``'s kernel runs with on ``platform``: ``block_sizes`` if given,
    else the per-target default of :func:`pallas_kernels.targets.default_block_sizes`
    (the one table of defaults, by platform; the interpreter takes the CPU entry)."""
    if block_sizes is not None:
        return block_sizes
    from pallas_kernels import targets  # the compile-for-target toolkit: load on first use

    return targets.default_block_sizes(TABLE[op].kernel.name, "gpu" if platform in TRITON else platform)


def kernel_block_sizes(cls: type, block_sizes, method: str, chunk_size: int | None):
    """The kernels' tiling: ``block_sizes`` if given; for an explicit ``"pallas"`` with a
    ``chunk_size``, ``cls(chunk=chunk_size)`` (a power of two, else a ``ValueError`` naming
    ``chunk_size``); else ``None``, the per-target default."""
    if block_sizes is not None or method != "pallas" or chunk_size is None:
        return block_sizes
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: method 'pallas' needs a power of two, got {chunk_size}")
    return cls(chunk=chunk_size)


# ----------------------------------------------------------------------------- staging
def _parse_platforms(names, where: str) -> tuple[str, ...]:
    """``names`` as :data:`PLATFORMS` (aliases expanded, order of ``PLATFORMS``);
    ``ValueError`` naming ``where`` for an unknown one."""
    chosen = set()
    for name in names:
        if name not in PLATFORMS and name not in PLATFORM_ALIASES:
            raise ValueError(
                f"{where}: expected platforms among {PLATFORMS + tuple(PLATFORM_ALIASES)}, got {name!r}"
            )
        chosen.update(PLATFORM_ALIASES.get(name, (name,)))
    return tuple(p for p in PLATFORMS if p in chosen)


def _platforms_from_env() -> tuple[str, ...]:
    """:data:`STAGE_ENV` as platforms (unset or empty: all of :data:`PLATFORMS`)."""
    text = os.environ.get(STAGE_ENV, "").strip()
    if not text:
        return PLATFORMS
    return _parse_platforms([n.strip() for n in text.split(",") if n.strip()], STAGE_ENV)


#: The platforms ``auto`` stages, part of the ``jit`` cache key (a re-trace on change).
_STAGED = jax.make_user_context(_platforms_from_env())


def staged_platforms(*platforms: str):
    """A context manager: within it, ``method="auto"`` stages branches for ``platforms``
    only (names of :data:`PLATFORMS`, or ``"gpu"`` for ``cuda`` and ``rocm``) plus the
    host platform; any other platform the program is lowered for takes the host's branch.

    Outside every such context the platforms of ``SSMJAX_STAGE_PLATFORMS`` (default:
    all) are staged. An unknown name is a ``ValueError`` naming ``platforms``.
    """
    if not platforms:
        raise ValueError(f"platforms: expected at least one of {PLATFORMS}, got none")
    return _STAGED(_parse_platforms(platforms, "platforms"))


def staged() -> tuple[str, ...]:
    """The platforms ``auto`` stages now (see :func:`staged_platforms`)."""
    return _STAGED.value


def _narrowed(choice: Mapping[str, str]) -> dict[str, str]:
    """An ``auto`` plan (one with a ``"default"``) cut to the staged platforms and the
    host's: every other platform, and ``"default"``, run the host's method."""
    if DEFAULT not in choice:
        return dict(choice)  # an explicit "pallas": its kernel platforms, all staged
    host = host_platform()
    keep = set(staged()) | {host}
    out = {p: m for p, m in choice.items() if p in keep}
    out[DEFAULT] = choice.get(host, choice[DEFAULT])
    return out


def dispatch(choice: Mapping[str, str], branch: Callable[[str, str], Callable], *args):
    """``branch(method, platform)(*args)`` for the platform the program is lowered for.

    ``choice`` is a :func:`plan`, narrowed to the staged platforms
    (:func:`staged_platforms`; the others take the host's branch). Platforms that run
    the same XLA method share one branch; a kernel branch is per platform (interpreted
    on CPU, compiled elsewhere). One branch covering every platform is called directly;
    otherwise the branches are staged with ``jax.lax.platform_dependent`` and lowering
    keeps the target's only.
    """
    choice = _narrowed(choice)
    host = host_platform()
    groups: dict[tuple[str, str], list[str]] = {}
    for platform, method in choice.items():
        if method != "pallas":
            key = (method, DEFAULT)
        else:  # a kernel as the default is the host's kernel branch
            key = (method, host if platform == DEFAULT else platform)
        groups.setdefault(key, []).append(platform)
    if len(groups) == 1 and DEFAULT in choice:
        return branch(*next(iter(groups)))(*args)
    per_platform, default = {}, None
    for (method, platform), platforms in groups.items():
        fn = branch(method, platform)
        for p in platforms:
            if p == DEFAULT:
                default = fn
            else:
                per_platform[p] = fn
    return jax.lax.platform_dependent(*args, default=default, **per_platform)


# ----------------------------------------------------------------------------- sequence parallelism
@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """Where the routed ops split time: mesh ``axis`` (size > 1) of ``mesh``, with the batch
    over ``batch_axes`` (the mesh's data-parallel axes, ``None``: replicated). ``route(name,
    setting, arguments)`` returns the sequence-parallel call of op ``name`` as a thunk, or
    ``None`` to run the op itself (:func:`ssmjax.distributed.context.route`: the setting
    carries it, so this module never imports the level above it)."""

    mesh: Any  # a jax.sharding.Mesh (hashable: part of the jit cache key)
    axis: str
    batch_axes: tuple[str, ...] | None
    route: Callable[[str, SequenceParallel, dict[str, Any]], Callable[[], Any] | None]


#: The active :class:`SequenceParallel` (``None``: every op runs on its own device).
_SEQUENCE = jax.make_user_context(None)


def sequence_context(setting: SequenceParallel | None):
    """A context manager making ``setting`` the active one (``None``: none); use
    :func:`ssmjax.distributed.sequence_parallel`, which builds the setting from a mesh."""
    return _SEQUENCE(setting)


def active_sequence_parallel() -> SequenceParallel | None:
    """The active setting, or ``None`` outside one and inside a ``shard_map`` whose manual
    axes include the setting's axis (the sequence-parallel ops' own per-shard calls, their
    backward passes included, run on their shard)."""
    setting = _SEQUENCE.value
    if setting is None or setting.axis in jax.sharding.get_abstract_mesh().manual_axes:
        return None
    return setting


def sequence_parallel_route(name: str):
    """Decorate the public op ``name``: while a :class:`SequenceParallel` is active, a call
    that the setting's ``route`` accepts runs the op's sequence-parallel
    version instead; every other call runs the op unchanged. The op without the route is
    its ``single_device`` attribute (for library calls on per-chunk arrays, whose axis 1 is
    a position inside a chunk rather than the sequence's time)."""

    def decorate(op: Callable) -> Callable:
        signature = inspect.signature(op)

        @functools.wraps(op)
        def op_or_sequence_parallel(*args, **kwargs):
            setting = active_sequence_parallel()
            if setting is not None:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                routed = setting.route(name, setting, bound.arguments)
                if routed is not None:
                    return routed()
            return op(*args, **kwargs)

        op_or_sequence_parallel.single_device = op  # for calls whose axis 1 is not the model's time
        return op_or_sequence_parallel

    return decorate


def describe() -> str:
    """The table as markdown: methods, kernel platforms and ``auto`` per platform."""
    rows = ["| op | methods | kernel runs on | auto (XLA) | auto picks the kernel for |",
            "|---|---|---|---|---|"]
    for name, op in TABLE.items():
        kernel = ", ".join(op.kernel.platforms) if op.kernel else "-"
        auto = ", ".join(f"{p}: {m}" for p, m in op.auto.items())
        proven = "; ".join(_describe_row(r) for r in op.proven) or "-"
        rows.append(f"| {name} | {', '.join(op.methods)} | {kernel} | {auto} | {proven} |")
    return "\n".join(rows)


def _describe_row(r: Proven) -> str:
    parts = [r.platform, "/".join(r.dtypes)]
    if r.decays != DECAYS:
        parts.append("decay " + "/".join(r.decays))
    if r.max_head_dim is not None:
        parts.append(f"dk <= {r.max_head_dim}")
    if r.max_time is not None:
        parts.append(f"T <= {r.max_time}")
    if not r.x64:
        parts.append("x64 off")
    return " ".join(parts)
