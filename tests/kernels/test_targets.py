"""Every Pallas kernel, forward and backward, lowered AND compiled ahead of time for real
accelerators from this CPU host (``pallas_kernels.targets``), within each target's limits.

For each target (H100 sm_90a, A100 sm_80, TPU v4 / v5e / v6e) and each configuration of
``pallas_kernels.target_cases`` (kernel x direction x dtype x option x T x head/state
size x ``jax_enable_x64``, trimmed to what changes the compiled program), compiled with
the target's default block sizes (``pallas_kernels.targets.default_block_sizes``):

* it compiles (the compilers enforce shared memory / VMEM and alignment themselves);
* the on-chip memory measured from the compiled artefact (GPU: shared memory of the
  launch, from XLA's thunk sequence; TPU: the double-buffered blocks plus scratch) is
  within the target's limit;
* GPU forward kernels do not spill registers (``ptxas -v`` on the compiled PTX).

Compile time, memory, registers and spills are printed and recorded as test properties.
Configurations known not to meet this yet are ``xfail(strict=True)`` with the reason
(``pallas_kernels.targets.KNOWN_ISSUES``): they fail the run once fixed, so the table
stays true. ``make test`` runs the default subset (one configuration per kernel and
direction), ``make test-targets`` everything. Without the toolchains (``pip install -e
'.[targets]'``) every test is skipped with the reason (shown by ``-ra``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import chunked_gla, linear_scan, rnn, selective_scan, targets
from pallas_kernels.target_cases import Case, cases

pytestmark = [
    pytest.mark.targets,
    # the test run's persistent compilation cache (tests/conftest.py) cannot load an
    # executable for a device-less target; jax warns and compiles, as these tests want anyway
    pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry:UserWarning"),
]


def _params(default: bool):
    for name, target in targets.TARGETS.items():
        for case in cases(target.platform, default):
            marks = [] if default else [pytest.mark.slow]
            issue = targets.known_issue(case, name)
            if issue is not None:
                marks.append(pytest.mark.xfail(reason=issue, strict=True))
            yield pytest.param(name, case, id=f"{name}-{case.id}", marks=marks)


def _compile(name: str, case: Case) -> targets.CompileStats:
    missing = targets.toolchain_missing(name)
    if missing is not None:
        pytest.skip(f"cannot compile for {name}: {missing}")
    platform = targets.get_target(name).platform
    with jax.enable_x64(case.x64):
        fn, args = case.build(platform, targets.default_block_sizes(case.kernel, name))
        return targets.compile_for_target(fn, args, name)


@pytest.mark.parametrize("target, case", list(_params(True)) + list(_params(False)))
def test_compiles_within_limits(target: str, case: Case, record_property):
    stats = _compile(target, case)
    print(stats)
    for field in ("seconds", "memory_bytes", "registers", "spill_bytes"):
        record_property(field, getattr(stats, field))
    assert stats.kernels, "no Pallas kernel in the compiled program"
    assert stats.memory_bytes <= stats.memory_limit, (
        f"{case.id} on {target}: {stats.memory_bytes} bytes of {targets.get_target(target).memory_kind}, "
        f"limit {stats.memory_limit}"
    )
    if stats.spill_bytes is not None and case.direction == "fwd":
        assert stats.spill_bytes == 0, f"{case.id} on {target}: {stats.spill_bytes} bytes of register spills"


# ----------------------------------------------------------------------------- validation
def test_unknown_target_names_it():
    with pytest.raises(ValueError, match=r"target: expected one of .*'h100'.*got 'h900'"):
        targets.get_target("h900")
    with pytest.raises(ValueError, match="h900"):
        targets.default_block_sizes("linear_scan", "h900")


def test_unknown_kernel_names_it():
    with pytest.raises(ValueError, match=r"kernel: expected one of .*got 'flash'"):
        targets.default_block_sizes("flash", "h100")


def test_every_target_has_defaults_for_its_kernels():
    """The table names a block-size class of the right kernel for every target."""
    from pallas_kernels.target_cases import kernels_for

    for name, target in targets.TARGETS.items():
        for kernel in kernels_for(target.platform):
            bs = targets.default_block_sizes(kernel, name)
            assert isinstance(bs, targets.KERNEL_MODULES[kernel].BlockSizes), (kernel, name, bs)


def _trace(fn, *shapes):
    """Trace ``fn`` on abstract inputs: no compilation (and no toolchain) involved."""
    return jax.eval_shape(fn, *(jax.ShapeDtypeStruct(s, d) for s, d in shapes))


def test_unsupported_dtype_for_target_is_a_value_error_naming_it():
    f64, f32 = jnp.float64, jnp.float32
    with pytest.raises(ValueError, match=r"^a: the compiled TPU linear_scan kernel supports .*float64"):
        _trace(lambda a, b: linear_scan.linear_scan(a, b, platform="tpu"), ((2, 16, 128), f64), ((2, 16, 128), f64))
    shapes = [((2, 64, 128), f64)] * 2 + [((16, 128), f32)] + [((2, 64, 16), f64)] * 2
    with pytest.raises(ValueError, match=r"^u: the compiled TPU selective_scan kernel supports dtypes \('float32', 'bfloat16'\), got float64"):
        _trace(lambda *x: selective_scan.selective_scan_forward(*x, platform="tpu"), *shapes)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_tpu_selective_scan_vmem_does_not_depend_on_time(direction):
    """The TPU selective scan walks time tiles on a sequential grid axis: the VMEM of its
    blocks and scratch (traced, not compiled) is the same at 1k and 64k tokens."""
    def vmem(time):
        case = Case("selective_scan", direction, "bfloat16", "grouped_bc", time, 64)
        fn, args = case.build("tpu")
        (call,) = targets._pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr)
        return targets._block_bytes(call)

    assert vmem(1024) == vmem(65536) < targets.TARGETS["tpu_v4"].memory_limit // 4


@pytest.mark.parametrize("kernel", ["rnn"])
def test_gpu_only_kernels_refuse_tpu(kernel):
    f32 = jnp.float32
    with pytest.raises(ValueError, match=rf"^platform: the {kernel} kernels compile for GPUs .* got 'tpu'"):
        shapes = [((2, 8, 1, 2, 16), f32), ((1, 2, 16, 16), f32), ((1, 2, 16), f32), ((2, 1, 2, 16), f32)]
        _trace(lambda *x: rnn.rnn_forward(*x, cell="elman", platform="tpu"), *shapes)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: linear_scan.BlockSizes(block_t_tpu=4), r"block_sizes\.block_t_tpu: expected >= 8"),
        (lambda: linear_scan.BlockSizes(block_t_tpu=24), r"block_sizes\.block_t_tpu: expected a positive power of two"),
        (lambda: chunked_gla.BlockSizes(chunk=48), r"block_sizes\.chunk: expected a positive power of two, got 48"),
        (lambda: selective_scan.BlockSizes(block_d=96), r"block_sizes\.block_d: expected a positive power of two"),
    ],
)
def test_bad_block_sizes_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()
