"""Pieces shared by the Mosaic TPU kernels (:mod:`pallas_kernels.chunked_gla_tpu`,
:mod:`pallas_kernels.chunked_delta_tpu`, :mod:`pallas_kernels.selective_scan_tpu`; jax
only): the input dtypes they compile for and the base of their layouts, a grid whose last
axis walks sequential steps (chunks or time tiles) with the carry in VMEM scratch.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

#: Input dtypes of the compiled TPU kernels (Mosaic has no float64).
TPU_DTYPES = (jnp.float32, jnp.bfloat16)


class SequentialGrid:
    """The grid ``parallel + (steps,)`` of a TPU kernel: two ``"parallel"`` axes and a
    sequential (``"arbitrary"``) last one whose steps pass the carry on through VMEM
    scratch. With ``reverse`` (the backward kernels) grid step ``i`` visits step
    ``steps - 1 - i``. Wraps the platform-neutral layout ``lay``, whose sizes and padding
    helpers read through as attributes."""

    def __init__(self, lay, parallel: tuple[int, int], steps: int, reverse: bool):
        self.lay = lay
        self.grid = parallel + (steps,)
        self.steps = steps
        self.reverse = reverse

    def __getattr__(self, name):  # the wrapped layout's sizes and padding helpers
        if name == "lay":
            raise AttributeError(name)
        return getattr(self.lay, name)

    def step_of(self, i):
        """The step (chunk or time tile) grid step ``i`` visits."""
        return self.steps - 1 - i if self.reverse else i

    @staticmethod
    def params(interpret: bool):
        """The ``pallas_call`` compiler parameters (none when interpreted)."""
        if interpret:
            return None
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
