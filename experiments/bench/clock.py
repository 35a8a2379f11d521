"""Wall-clock medians without any framework import (the PyTorch peers use it too)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_of_calls(run: Callable[[], Any], reps: int = 5, warmup: int = 1) -> float:
    """Median wall time in ms of ``reps`` calls of ``run()`` after ``warmup`` untimed calls.
    ``run`` must return only when its work is done (e.g. wrap JAX calls in
    ``jax.block_until_ready``)."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps, warmup: expected reps >= 1 and warmup >= 0, got {reps}, {warmup}")
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
