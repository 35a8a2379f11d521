"""Timing and compiled memory of JAX functions (see :mod:`experiments.bench`).

Every time is the median of ``reps`` calls after ``warmup`` untimed calls (the first call
of a jitted function compiles; the median ignores the odd slow call on a shared machine).
Memory is XLA's own account of the compiled program: ``temp_size_in_bytes`` of
``jax.jit(f).lower(*args).compile().memory_analysis()``, the scratch the program needs
beyond its inputs and outputs (``None`` where a backend does not report it).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.clock import median_of_calls


def median_ms(run: Callable[[], Any], reps: int = 5, warmup: int = 1) -> float:
    """Median wall time in ms of ``reps`` calls of ``run()`` after ``warmup`` untimed calls;
    every call waits for its outputs (``jax.block_until_ready``)."""
    return median_of_calls(lambda: jax.block_until_ready(run()), reps, warmup)


def temp_mb(compiled) -> float | None:
    """Scratch memory of a compiled program in MiB (``None`` if the backend has no analysis)."""
    analysis = compiled.memory_analysis()
    return None if analysis is None else analysis.temp_size_in_bytes / 2**20


def floating_argnums(args: Sequence[Any]) -> tuple[int, ...]:
    """Positions of the floating (real or complex) arrays in ``args``: what a gradient is taken of."""
    return tuple(i for i, x in enumerate(args)
                 if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))


def _sum_of_outputs(fn: Callable) -> Callable:
    """``sum(real(leaf))`` over every output leaf, accumulated in float32 or wider: the scalar
    whose gradient the forward+backward timings take."""
    def loss(*xs):
        leaves = [jnp.real(x) for x in jax.tree.leaves(fn(*xs))]
        return sum(jnp.sum(x.astype(jnp.promote_types(x.dtype, jnp.float32))) for x in leaves)
    return loss


def measure_jax(fn: Callable, args: Sequence[Any], *, reps: int = 5, warmup: int = 1, max_memory_gb: float = 4.0,
                backward: bool = True, timed: bool = True) -> dict[str, Any]:
    """Median ms of ``jit(fn)(*args)`` (``fwd_ms``) and of ``jit(grad(sum of outputs))`` with
    respect to every floating argument (``fwd_bwd_ms``), and the compiled temp memory of
    each (``fwd_temp_mb``, ``temp_mb``). Nothing is timed when ``timed`` is false or a temp
    memory exceeds ``max_memory_gb``; the row's ``note`` then says why."""
    args = tuple(args)
    row: dict[str, Any] = {}
    fwd = jax.jit(fn).lower(*args).compile()
    row["fwd_temp_mb"] = temp_mb(fwd)
    if backward:
        fwd_bwd = jax.jit(jax.grad(_sum_of_outputs(fn), argnums=floating_argnums(args))).lower(*args).compile()
        row["temp_mb"] = temp_mb(fwd_bwd)
    if any((row.get(k) or 0) * 2**20 > max_memory_gb * 2**30 for k in ("fwd_temp_mb", "temp_mb")):
        row["note"] = f"not timed: compiled temp memory > {max_memory_gb:g} GB"
    elif not timed:
        row["note"] = "memory only (not timed)"
    else:
        row["fwd_ms"] = median_ms(lambda: fwd(*args), reps, warmup)
        if backward:
            row["fwd_bwd_ms"] = median_ms(lambda: fwd_bwd(*args), reps, warmup)
    return row


def run_row(rows: list[dict], base: dict[str, Any], measure: Callable[[], dict], *, label: str | None = None,
            progress: str = "") -> dict[str, Any]:
    """Append ``base | measure()`` to ``rows`` (or ``base`` with ``error`` if it raises, so one
    failing configuration leaves the table going). Prints ``progress label ... 1.2 s`` to
    stderr; ``BENCH_TRACEBACK=1`` also prints a failing row's traceback."""
    row = dict(base)
    label = label or " ".join(f"{k}={v}" if k in ("t", "T") else f"{v}" for k, v in base.items()
                              if not isinstance(v, dict))
    print(f"  {progress}{' ' if progress else ''}{label} ...", end="", flush=True, file=sys.stderr)
    start = time.perf_counter()
    try:
        row.update(measure())
        print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - one failing configuration must not end the benchmark
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f" FAILED ({row['error']})", file=sys.stderr)
        if os.environ.get("BENCH_TRACEBACK") or os.environ.get("SPEED_GPU_TRACEBACK"):
            traceback.print_exc()
    rows.append(row)
    return row


def growth_exponent(points: Sequence[tuple[float, float]]) -> float | None:
    """The least-squares slope ``p`` of ``log time = p log T + c`` over ``(T, time)`` points
    (``time ~ T^p``; 1 is linear); ``None`` with fewer than two points."""
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def environment() -> dict[str, Any]:
    """What produced the numbers: jax version, backend, device kind and CPU count."""
    return dict(jax=jax.__version__, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                cpus=os.cpu_count())
