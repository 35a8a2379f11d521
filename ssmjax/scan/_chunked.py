"""The parts of the chunked attention ops (gated linear attention, the delta rule) that do
not depend on their transition: argument checks, the chunk-major layout, masked segment
sums of log-decays, the document masks of packed sequences, and the call of their
Pallas kernels through the dispatch table.

Both ops carry a matrix state ``S_t [dk, dv]`` per batch row and head and evaluate it in
chunks of ``C`` tokens: quadratic inside a chunk, a recurrence over chunk boundaries.
They differ only in the transition of ``S`` (``diag(exp g_t)`` for GLA,
``exp(g_t) (I - beta_t k_t k_t^T)`` for the delta rule), which each module keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Bool, Float

from ssmjax.scan import _dispatch
from ssmjax.checks import check_multihead_qkv
from ssmjax.scan._checks import check_real_floating, check_shape, static_scale


# ----------------------------------------------------------------------------- checks
class Dims(NamedTuple):
    batch: int
    time: int
    heads: int
    dk: int
    dv: int


def check_attention_inputs(q: Array, k: Array, v: Array, initial_state: Array | None) -> Dims:
    """``q, k [batch, time, heads, dk]``, ``v [batch, time, heads, dv]`` and
    ``initial_state [batch, heads, dk, dv]`` (or ``None``), all real floating."""
    batch, time, heads, dk, dv = check_multihead_qkv(q, k, v)
    if initial_state is not None:
        check_real_floating("initial_state", initial_state)
        check_shape("initial_state", initial_state, (batch, heads, dk, dv), "[batch, heads, dk, dv]")
    return Dims(batch, time, heads, dk, dv)


def check_scalar_scale(scale) -> None:
    """``scale`` must be ``None`` or a scalar (``ValueError`` naming it otherwise)."""
    if scale is not None and jnp.ndim(scale) != 0:
        raise ValueError(f"scale: expected a scalar, got shape {tuple(jnp.shape(scale))}")


def initial_state_or_zeros(initial_state: Array | None, q: Array, v: Array, dtype) -> Array:
    """``initial_state`` in ``dtype``, or the zero state ``[batch, heads, dk, dv]``."""
    if initial_state is None:
        batch, _, heads, dk = q.shape
        return jnp.zeros((batch, heads, dk, v.shape[-1]), dtype)
    return initial_state.astype(dtype)


# ----------------------------------------------------------------------------- layout
def to_chunks(x: Array, chunk: int) -> Array:
    """``[batch, n*C, heads, ...]`` -> ``[n, batch, heads, C, ...]`` (chunk-major: the scan
    over chunks runs over the leading axis, batched products over the trailing two)."""
    b, t, h = x.shape[:3]
    x = x.reshape((b, t // chunk, chunk, h) + x.shape[3:])
    return jnp.moveaxis(x, (1, 3), (0, 2))


def from_chunks(x: Array) -> Array:
    """``[n, batch, heads, C, ...]`` -> ``[batch, n*C, heads, ...]``."""
    n, b, h, c = x.shape[:4]
    x = jnp.moveaxis(x, (0, 2), (1, 3))
    return x.reshape((b, n * c, h) + x.shape[4:])


# ----------------------------------------------------------------------------- log-decays
def masked_exp(x: Array, keep: Array | None) -> Array:
    """``exp(x)`` where ``keep`` (everywhere if ``None``), else ``0``; masked entries never
    reach ``exp``, so they cannot overflow or give NaN gradients."""
    if keep is None:
        return jnp.exp(x)
    zero = jnp.zeros((), x.dtype)
    return jnp.where(keep, jnp.exp(jnp.where(keep, x, zero)), zero)


def segment_sum(g: Float[Array, "*lead C"]) -> Float[Array, "*lead C C"]:
    """``out[..., i, j] = g_{j+1} + ... + g_i`` for ``j <= i`` (``0`` above the diagonal).

    The log of the decay from position ``j`` to position ``i``, summed from the terms
    between them, so it stays accurate when the cumulative sums themselves are large
    (``ssd_minimal``'s ``segsum``). Written as ``(M diag(g)) N`` with 0/1 masks
    ``M_il = [l <= i]``, ``N_lj = [l > j]``: a matmul is ~4x faster on XLA:CPU than a
    cumulative sum over ``[C, C]``; ``HIGHEST`` precision keeps it exact float32 on
    accelerators.
    """
    c = g.shape[-1]
    up_to_row = jnp.tril(jnp.ones((c, c), g.dtype))
    after_column = jnp.tril(jnp.ones((c, c), g.dtype), -1)
    highest = jax.lax.Precision.HIGHEST
    return jnp.matmul(up_to_row * g[..., None, :], after_column, precision=highest)


def suffix_sum(g: Float[Array, "*lead C d"]) -> Float[Array, "*lead C d"]:
    """``out[..., j, :] = g_{j+1} + ... + g_{C-1}`` (exclusive suffix sum over axis -2)."""
    return jax.lax.cumsum(g, axis=g.ndim - 2, reverse=True) - g


# ----------------------------------------------------------------------------- documents
class ChunkMasks(NamedTuple):
    """Which pairs and boundary terms survive the document cuts inside each chunk.

    ``pairs [.., C, C]``: ``j <= i`` and no cut in ``j+1..i``; ``reads_state [.., C, 1]``:
    no cut in ``0..i`` (position ``i`` sees the chunk's incoming state); ``feeds_state
    [.., C, 1]``: no cut in ``j+1..C-1`` (position ``j`` reaches the outgoing state);
    ``passes_state [.., 1]``: no cut in the chunk. ``None`` means "everywhere".
    """

    pairs: Array
    reads_state: Array | None
    feeds_state: Array | None
    passes_state: Array | None


def chunk_masks(cut: Bool[Array, "n batch 1 C"] | None, chunk: int) -> ChunkMasks:
    """The :class:`ChunkMasks` of chunk-major cuts (``None``: no packed sequences)."""
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    if cut is None:
        return ChunkMasks(causal, None, None, None)
    document = jnp.cumsum(cut.astype(jnp.int32), axis=-1)  # cuts up to and incl. i
    return ChunkMasks(
        pairs=causal & (document[..., :, None] == document[..., None, :]),
        reads_state=(document == 0)[..., None],
        feeds_state=(document == document[..., -1:])[..., None],
        passes_state=document[..., -1:] == 0,
    )


# ----------------------------------------------------------------------------- dispatch
def kernel_options(scale: float, block_sizes, platform: str) -> dict:
    """Keyword arguments of the chunked-attention kernels for ``platform`` (``"cpu"``: the
    Pallas interpreter; GPUs compile them with Triton, TPUs with Mosaic)."""
    return dict(scale=scale, block_sizes=block_sizes, interpret=platform == "cpu", platform=platform)


def static_scale_of(q: Array, scale, dtype) -> tuple[Array, float]:
    """``(q, s)`` with ``s`` the kernels' static scale: ``scale`` as a float
    (``dk ** -0.5`` if ``None``), or, when ``scale`` is traced, ``1.0`` with ``scale``
    folded into the queries (differentiably)."""
    static = static_scale(scale, q.shape[-1] ** -0.5)
    if static is None:
        return q.astype(dtype) * jnp.asarray(scale, dtype), 1.0
    return q, static


def run(
    op: str,
    method: str,
    case: _dispatch.Case,
    pallas: Callable,
    xla: Callable,
    out_dtype,
    dtype,
    *arrays,
) -> tuple[Array, Array]:
    """``pallas(platform, *arrays)`` or ``xla(method, *arrays)`` as the dispatch table
    says for the platform the program is lowered for; outputs in ``out_dtype``, the
    final state in ``dtype`` (the same on every branch)."""

    def branch(resolved: str, platform: str):
        def evaluate(*arrays):
            if resolved == "pallas":
                o, final_state = pallas(platform, *arrays)
            else:
                o, final_state = xla(resolved, *arrays)
            return o.astype(out_dtype), final_state.astype(dtype)

        return evaluate

    return _dispatch.dispatch(_dispatch.plan(op, method, case), branch, *arrays)
