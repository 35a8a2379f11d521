"""The kernel configurations to compile for every target (tests and the kernel report).

A :class:`Case` is one (kernel, direction, dtype, option, sequence length, head or state
dimension, ``jax_enable_x64``) at the shapes of a typical layer; :meth:`Case.build` gives
the function and abstract arguments :func:`pallas_kernels.targets.compile_for_target`
compiles. The matrix is trimmed to what changes the compiled program:

* ``time`` (1k vs 64k tokens) only for the TPU linear scan, whose VMEM once grew with
  ``T``: every kernel now walks time (GPU: a loop; TPU: a sequential grid axis with the
  carry in scratch), so on-chip memory does not depend on it;
* head dims 64 and 128 (chunked attention, RNN), state sizes 16 and 64 (selective scan);
* float32 and bfloat16 inputs; ``jax_enable_x64`` on and off (index-map literals).

:func:`cases` lists them for one target; ``default=True`` keeps one configuration per
kernel and direction (the common one: float32, 1k tokens, head dim 128 or state 16, x64
off; plus one x64 case per TPU kernel), the fast subset ``make test`` runs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import chunked_delta, chunked_gla, linear_scan, rnn, selective_scan

KERNELS = ("linear_scan", "selective_scan", "chunked_gla", "chunked_delta", "rnn")
DIRECTIONS = ("fwd", "bwd")
DTYPES = ("float32", "bfloat16")

#: Options per kernel (the first is the default): what a layer or ``auto`` can select.
OPTIONS = {
    "linear_scan": ("shared_decay", "batched_decay"),
    "selective_scan": ("shared_bc", "grouped_bc"),
    "chunked_gla": ("head_decay", "no_decay", "channel_decay"),
    "chunked_delta": ("gated", "plain"),
    "rnn": ("lstm", "elman", "gru", "slstm", "slstm_exp"),
}
#: Head (chunked attention, RNN) or state (selective scan) sizes; first is the default.
DIMS = {
    "linear_scan": (0,),
    "selective_scan": (16, 64),
    "chunked_gla": (128, 64),
    "chunked_delta": (128, 64),
    "rnn": (64, 128),
}
#: Kernels with a compiled TPU (Mosaic) version.
TPU_KERNELS = ("linear_scan", "selective_scan", "chunked_gla", "chunked_delta")
#: Kernels whose on-chip memory depends on the sequence length, per platform.
TIME_DEPENDENT = {"tpu": ("linear_scan",), "gpu": ()}
TIMES = (1024, 65536)

HEADS, WIDTH = 8, 1024  # a typical layer: 8 heads, 1024 channels


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str
    direction: str
    dtype: str = "float32"
    option: str = ""
    time: int = 1024
    dim: int = 0
    x64: bool = False

    @property
    def batch(self) -> int:
        """8 sequences of 1k tokens, or one of 64k (the same order of tokens per step)."""
        return max(1, 8192 // self.time)

    @property
    def id(self) -> str:
        dim = f"-d{self.dim}" if self.dim else ""
        return f"{self.kernel}-{self.direction}-{self.option}-{self.dtype}-T{self.time}{dim}{'-x64' if self.x64 else ''}"

    def build(self, platform: str, block_sizes=None) -> tuple[Callable, tuple]:
        """``(fn, args)``: the kernel call and its abstract inputs (``block_sizes=None``:
        the kernel's defaults)."""
        dtype = jnp.dtype(self.dtype)
        kw = {"platform": platform}
        if block_sizes is not None:
            kw["block_sizes"] = block_sizes
        return _BUILDERS[self.kernel](self, dtype, kw)


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _with_backward(case: Case, fwd: Callable, bwd: Callable, inputs: tuple, cotangents: Callable):
    """The forward call, or the backward call with the forward's residual (shapes from
    ``eval_shape``: only the backward kernel is compiled)."""
    if case.direction == "fwd":
        return fwd, inputs
    outs = jax.eval_shape(fwd, *inputs)
    extra = cotangents(outs)
    return bwd, inputs + extra


def _linear_scan(case: Case, dtype, kw):
    a_batch = 1 if case.option == "shared_decay" else case.batch
    a = _sds((a_batch, case.time, WIDTH), dtype)
    b = _sds((case.batch, case.time, WIDTH), dtype)
    reverse = case.direction == "bwd"  # the backward is the reverse scan
    return (lambda a, b: linear_scan.linear_scan(a, b, reverse=reverse, **kw)), (a, b)


def _selective_scan(case: Case, dtype, kw):
    n, T = case.dim, case.time
    bc = (case.batch, T, n) if case.option == "shared_bc" else (case.batch, T, 8, n)
    inputs = (
        _sds((case.batch, T, WIDTH), dtype), _sds((case.batch, T, WIDTH), dtype),
        _sds((n, WIDTH), jnp.float32), _sds(bc, dtype), _sds(bc, dtype),
    )

    def fwd(u, delta, A, B, C):
        return selective_scan.selective_scan_forward(u, delta, A, B, C, **kw)

    def bwd(u, delta, A, B, C, states, dy, dx_last):
        return selective_scan.selective_scan_backward(u, delta, A, B, C, None, states, dy, dx_last, **kw)

    return _with_backward(case, fwd, bwd, inputs, lambda o: (o[2], _sds(o[0].shape, o[0].dtype), o[1]))


def _attention_inputs(case: Case, dtype):
    d, T = case.dim, case.time
    qk = _sds((case.batch, T, HEADS, d), dtype)
    return qk, qk, _sds((case.batch, T, HEADS, d), dtype)


def _chunked_gla(case: Case, dtype, kw):
    q, k, v = _attention_inputs(case, dtype)
    g = {"no_decay": (), "head_decay": (_sds(q.shape[:3], dtype),), "channel_decay": (_sds(q.shape, dtype),)}[case.option]
    inputs = (q, k, v) + g

    def fwd(q, k, v, g=None):
        return chunked_gla.chunked_gla_forward(q, k, v, g, **kw)

    def bwd(q, k, v, *rest):
        g = rest[0] if len(rest) == 4 else None
        states, do, dh = rest[-3:]
        return chunked_gla.chunked_gla_backward(q, k, v, g, states, do, dh, **kw)

    return _with_backward(case, fwd, bwd, inputs, lambda o: (o[2], _sds(o[0].shape, o[0].dtype), o[1]))


def _chunked_delta(case: Case, dtype, kw):
    q, k, v = _attention_inputs(case, dtype)
    beta = _sds(q.shape[:3], dtype)
    inputs = (q, k, v, beta) + ((beta,) if case.option == "gated" else ())

    def fwd(q, k, v, beta, g=None):
        return chunked_delta.chunked_delta_forward(q, k, v, beta, g, **kw)

    def bwd(q, k, v, beta, *rest):
        g = rest[0] if len(rest) == 4 else None
        states, do, dh = rest[-3:]
        return chunked_delta.chunked_delta_backward(q, k, v, beta, g, states, do, dh, **kw)

    return _with_backward(case, fwd, bwd, inputs, lambda o: (o[2], _sds(o[0].shape, o[0].dtype), o[1]))


def _rnn(case: Case, dtype, kw):
    cell, dh, T = case.option, case.dim, case.time
    gates, parts, heads = rnn.GATES[cell], rnn.STATE_PARTS[cell], 4
    inputs = (
        _sds((case.batch, T, gates, heads, dh), dtype), _sds((gates, heads, dh, dh), dtype),
        _sds((gates, heads, dh), dtype), _sds((case.batch, parts, heads, dh), jnp.float32),
    )

    def fwd(gx, R, bias, state0):
        return rnn.rnn_forward(gx, R, bias, state0, cell=cell, **kw)

    def bwd(gx, R, bias, state0, states, dh_, dfinal):
        return rnn.rnn_backward(gx, R, bias, state0, None, states, dh_, dfinal, cell=cell, **kw)

    return _with_backward(case, fwd, bwd, inputs, lambda o: (o[2], _sds(o[0].shape, o[0].dtype), o[1]))


_BUILDERS = {
    "linear_scan": _linear_scan,
    "selective_scan": _selective_scan,
    "chunked_gla": _chunked_gla,
    "chunked_delta": _chunked_delta,
    "rnn": _rnn,
}


def kernels_for(platform: str) -> tuple[str, ...]:
    return TPU_KERNELS if platform == "tpu" else KERNELS


def cases(platform: str, default: bool) -> list[Case]:
    """The configurations to compile for a ``platform`` (``"gpu"`` / ``"tpu"``);
    ``default``: only the fast subset, else only the rest."""
    chosen = []
    for kernel in kernels_for(platform):
        times = TIMES if kernel in TIME_DEPENDENT[platform] else TIMES[:1]
        x64s = (False, True)
        for direction, dtype, option, time, dim, x64 in itertools.product(
            DIRECTIONS, DTYPES, OPTIONS[kernel], times, DIMS[kernel], x64s
        ):
            if x64 and (dtype, time, dim) != (DTYPES[0], TIMES[0], DIMS[kernel][0]):
                continue  # x64 changes index arithmetic only: once per option
            case = Case(kernel, direction, dtype, option, time, dim, x64)
            is_default = (dtype, option, time, dim) == (
                DTYPES[0], OPTIONS[kernel][0], TIMES[0], DIMS[kernel][0]
            ) and (not x64 or (platform == "tpu" and direction == "fwd"))
            if is_default == default:
                chosen.append(case)
    return chosen
