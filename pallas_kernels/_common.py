"""Helpers shared by the kernel modules (jax only): backend selection, sizes, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

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


def block_spec(block_shape: tuple, index_map) -> pl.BlockSpec:
    """``pl.BlockSpec(block_shape, index_map)`` whose block indices are all int32.

    Under ``jax_enable_x64`` a Python literal in an index map (the ``0`` of
    ``lambda i, j: (i, 0, j)``) is traced as int64 while the grid indices are int32, and
    Mosaic TPU cannot legalize the mixed ``(i32, i64, i32)`` return; casting every index
    keeps the map int32 whatever the x64 flag.
    """

    def int32_index_map(*indices):
        return tuple(jnp.asarray(i, jnp.int32) for i in index_map(*indices))

    return pl.BlockSpec(block_shape, int32_index_map)


def sublane_rows(*dtypes) -> int:
    """Rows of one TPU ``(sublane, lane)`` tile for the narrowest of ``dtypes``: 8 for
    32-bit values, 16 for 16-bit (two per sublane), 32 for 8-bit. Dynamic row offsets
    into a VMEM block must be multiples of it for Mosaic to prove them aligned."""
    return 8 * max(1, 4 // min(jnp.dtype(d).itemsize for d in dtypes))


def compiles_for_tpu(platform: str | None, interpret: bool) -> bool:
    return not interpret and (platform or jax.default_backend()) == "tpu"


def check_tpu_dtypes(kernel: str, platform: str | None, interpret: bool, allowed: tuple, **arrays) -> None:
    """``ValueError`` naming the first array whose dtype the ``kernel``'s compiled TPU
    version does not support (Mosaic has no float64; some kernels need 32-bit rows)."""
    if not compiles_for_tpu(platform, interpret):
        return
    for name, x in arrays.items():
        if x is not None and jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in allowed]:
            raise ValueError(
                f"{name}: the compiled TPU {kernel} kernel supports dtypes "
                f"{tuple(jnp.dtype(d).name for d in allowed)}, got {x.dtype}"
            )


def check_triton_platform(platform: str | None, interpret: bool, kernel: str) -> None:
    """``ValueError`` unless ``kernel`` runs interpreted or compiles for a GPU: the kernels
    written for the Triton lowering (chunked attention, RNN) have no Mosaic TPU version."""
    if interpret:
        return
    resolved = platform or jax.default_backend()
    if resolved not in ("gpu", "cuda", "rocm"):
        raise ValueError(
            f"platform: the {kernel} kernels compile for GPUs (Triton lowering) only, got "
            f"{resolved!r}; use interpret=True elsewhere"
        )


def time_loop(time: int, block_t: int, step, carry):
    """``carry = step(t, carry)`` for ``t = 0 .. time-1``: full chunks of ``block_t``
    unrolled steps inside a ``fori_loop``, then the remainder, also unrolled."""

    def chunk(c, carry):
        for i in range(block_t):
            carry = step(c * block_t + i, carry)
        return carry

    n_full = time // block_t
    if n_full:
        carry = jax.lax.fori_loop(i32(0), i32(n_full), chunk, carry)
    for t in range(n_full * block_t, time):
        carry = step(t, carry)
    return carry
