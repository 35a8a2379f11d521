"""Helpers shared by the kernel modules (jax only): backend selection, sizes, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: ``platform=`` values the kernels accept (``None``: ``jax.default_backend()``).
PLATFORMS = ("cpu", "gpu", "cuda", "rocm", "mosaic_gpu", "tpu")


def compiler_params(platform: str | None, interpret: bool):
    """Compiler parameters for ``pl.pallas_call``.

    * GPUs (``"gpu"``, ``"cuda"``, ``"rocm"``): the kernels are written for the Triton
      lowering (a grid of independent programs, each looping over time with its carry in
      registers, no scratch memory), so they request it explicitly: the default GPU
      lowering of ``pallas_call`` in jax >= 0.10 is Mosaic GPU, for which
      ``pallas_call`` is deprecated in favour of ``plgpu.kernel``.
    * ``"mosaic_gpu"``: jax's default GPU lowering (experimental here: it stages whole
      ``[time, block_d]`` blocks in shared memory and wants rows of >= 128 elements).
    * ``"tpu"``: Mosaic TPU with its defaults. ``interpret=True`` needs none.
    """
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"platform: expected None or one of {PLATFORMS}, got {platform!r}")
    if interpret:
        return None
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4)
    return None


def lane_multiple(platform: str | None, interpret: bool) -> int:
    """The smallest feature block a compiled kernel accepts: Mosaic TPU wants the last
    block dimension to be a multiple of 128 lanes (or the whole, padded, dimension)."""
    if interpret:
        return 1
    return 128 if (platform or jax.default_backend()) == "tpu" else 1


def is_power_of_two(x: int) -> bool:
    return isinstance(x, int) and x > 0 and x & (x - 1) == 0


def next_power_of_two(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def carry_dtype_of(*dtypes) -> jnp.dtype:
    """The dtype a recurrence accumulates in: at least float32."""
    return jnp.result_type(jnp.float32, *dtypes)


def i32(x: int | jax.Array) -> jax.Array:
    """An int32 loop bound: ``fori_loop`` indices (and the index arithmetic on them) stay
    int32 under ``jax_enable_x64`` (Mosaic rejects mixed i32/i64 operands). Static
    indices stay Python ints (Triton wants them as literals)."""
    return jnp.asarray(x, jnp.int32)
