"""Every public op with a kernel, ``method="auto"``, values and gradients, compiled ahead
of time for every target: no default path can fail to compile
on a supported accelerator.

Each program is lowered with the target's platform staged
(:func:`ssmjax.scan.staged_platforms`), so it takes the branch ``auto`` takes on that
device: the Pallas kernel where the dispatch table proves it
(:data:`ssmjax.scan._dispatch.TABLE`), the XLA method elsewhere. The test also checks
that the kernel is in the lowered program exactly where the table says ``auto`` picks it,
so a table row and its compile proof cannot drift apart. One typical small shape per
op; ``jax_enable_x64`` off (jax's default). The default tier takes about two minutes on
two cores (:func:`_params` says what is ``slow``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import targets
from ssmjax.scan import (
    delta_rule,
    gated_linear_attention,
    linear_scan,
    nonlinear_rnn,
    selective_scan,
    staged_platforms,
)
from ssmjax.scan import _dispatch

pytestmark = [
    pytest.mark.targets,
    # the test run's persistent compilation cache (tests/conftest.py) cannot load an
    # executable for a device-less target; jax warns and compiles, as these tests want anyway
    pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry:UserWarning"),
]

BATCH, TIME, HEADS, HEAD_DIM, WIDTH, STATE = 2, 256, 4, 64, 256, 16
F32 = jnp.float32


def _sds(*shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, F32)


def _attention_shapes():
    qkv = _sds(BATCH, TIME, HEADS, HEAD_DIM)
    return qkv, qkv, qkv, _sds(BATCH, TIME, HEADS)


#: op -> (loss of the op's outputs under method "auto" (nonlinear_rnn: its default
#: method, it has no "auto"), abstract inputs, the dispatch case of those inputs).
OPS: dict[str, tuple[Callable, tuple, _dispatch.Case]] = {
    "linear_scan": (
        lambda a, b: linear_scan(a, b, method="auto")[0],
        (_sds(BATCH, TIME, WIDTH), _sds(BATCH, TIME, WIDTH)),
        _dispatch.Case("float32", time=TIME),
    ),
    "selective_scan": (
        lambda u, delta, A, B, C: selective_scan(u, delta, A, B, C, method="auto")[0],
        (_sds(BATCH, TIME, WIDTH), _sds(BATCH, TIME, WIDTH), _sds(WIDTH, STATE),
         _sds(BATCH, TIME, STATE), _sds(BATCH, TIME, STATE)),
        _dispatch.Case("float32", time=TIME),
    ),
    "gated_linear_attention": (
        lambda q, k, v, g: gated_linear_attention(q, k, v, log_decay=g, method="auto")[0],
        _attention_shapes(),
        _dispatch.Case("float32", time=TIME, head_dim=HEAD_DIM, decay="head"),
    ),
    "delta_rule": (
        lambda q, k, v, beta: delta_rule(q, k, v, jax.nn.sigmoid(beta), method="auto")[0],
        _attention_shapes(),
        _dispatch.Case("float32", time=TIME, head_dim=HEAD_DIM, decay="none"),
    ),
    "nonlinear_rnn": (
        lambda gx, R: nonlinear_rnn("lstm", gx, R)[0],
        (_sds(BATCH, TIME, 4, HEADS, HEAD_DIM), _sds(4, HEADS, HEAD_DIM, HEAD_DIM)),
        _dispatch.Case("float32", time=TIME),
    ),
}


def _values_and_gradients(op: Callable) -> Callable:
    """One program: the op's output and the gradient of its sum w.r.t. every input."""

    def program(*args):
        loss = lambda *xs: op(*xs).astype(F32).sum()  # noqa: E731
        return op(*args), jax.grad(loss, argnums=tuple(range(len(args))))(*args)

    return program


def _auto_picks_kernel(name: str, case: _dispatch.Case, platform: str) -> bool:
    method = "auto" if "auto" in _dispatch.TABLE[name].methods else "sequential"
    return _dispatch.plan(name, method, case).get(platform) == "pallas"


#: Each kernel lowering's marker in StableHLO text, by platform.
KERNEL_MARKER = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def _platform(target: str) -> str:
    """The ``platform_dependent`` name of a target's platform."""
    return {"gpu": "cuda", "tpu": "tpu"}[targets.get_target(target).platform]


def _params():
    """Every (target, op). The default tier compiles every op whose ``auto`` picks a
    kernel on every target, and the XLA paths on the first target of each platform (an
    XLA program does not depend on the kernels' tiling; compiling the chunked attention
    for a TPU takes 20-40 s); the rest of the XLA paths are ``slow``."""
    first = {}
    for name in targets.TARGETS:
        first.setdefault(_platform(name), name)
    for target in targets.TARGETS:
        for op, (_, _, case) in OPS.items():
            kernel = _auto_picks_kernel(op, case, _platform(target))
            marks = [] if kernel or first[_platform(target)] == target else [pytest.mark.slow]
            yield pytest.param(target, op, id=f"{target}-{op}", marks=marks)


@pytest.mark.parametrize("target, op", list(_params()))
def test_auto_compiles_values_and_gradients(target: str, op: str):
    """Compiling is the proof (the compiler refuses a kernel over the target's shared
    memory or VMEM); register spills are the target tests' (tests/kernels/test_targets.py)."""
    missing = targets.toolchain_missing(target)
    if missing is not None:
        print(f"skipped: cannot compile for {target}: {missing}")
        pytest.skip(f"cannot compile for {target}: {missing}")
    platform = _platform(target)
    fn, args, case = OPS[op]
    program = _values_and_gradients(fn)
    with jax.enable_x64(False), staged_platforms(platform):
        text = jax.jit(program).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        stats = targets.compile_for_target(program, args, target)
    print(stats)
    picks = _auto_picks_kernel(op, case, platform)
    assert (KERNEL_MARKER[platform] in text) == picks, (
        f"{op} on {target}: the dispatch table says auto {'picks' if picks else 'does not pick'} "
        "the kernel, the lowered program disagrees"
    )
