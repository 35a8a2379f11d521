"""The Mamba-1 selective state-space scan (Gu & Dao, 2023, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces", Algorithm 2), with mamba_ssm's
``selective_scan_ref`` semantics in batch-first layout.

For every batch row, channel ``d`` and state index ``n``::

    delta_t  = softplus(delta_t + delta_bias)        (bias / softplus optional)
    x_t[d,n] = exp(delta_t[d] A[d,n]) x_{t-1}[d,n] + delta_t[d] B_t[g(d),n] u_t[d]
    y_t[d]   = sum_n C_t[g(d),n] x_t[d,n]            (2 Re(...) when A is complex, as mamba_ssm)
    out_t[d] = (y_t[d] + D[d] u_t[d]) * silu(z_t[d])  (D and z optional)

``g(d)`` is the group of channel ``d`` when B and C are grouped ``[b, t, g, n]``
(channels split into ``g`` equal contiguous groups, as mamba_ssm's ``repeat``).

Evaluations:

* ``"sequential"``: one fused ``lax.scan`` step per token, plain autodiff; the oracle.
  Its backward stores the ``[b, t, d, n]`` states.
* ``"associative"``: materialises ``exp(delta A)`` and ``delta B u`` as ``[b, t, d, n]`` and
  runs :func:`ssmjax.scan.linear_scan` (associative); the parallel form.
* ``"chunked"``: the fused sequential step inside chunks, the chunk body rematerialised
  (``jax.checkpoint``) so the backward keeps only the chunk-boundary states
  ``[b, T / chunk, d, n]`` and recomputes one chunk at a time: memory
  ``O(b d n (T / c + c))`` instead of ``O(b t d n)``. Lowered for CPU (real inputs), the
  same algorithm runs as C++ kernels through XLA's FFI (``_selective_cpu.cc``, built on
  first use by :mod:`ssmjax.scan._ffi`; the XLA chunks where no compiler is found or
  under ``ssmjax.scan._ffi.cpu_kernels(False)``): the forward is one pass per token over the
  state held in cache, the backward recomputes a chunk's states and decays and walks it
  back once per token, every cotangent accumulated in that one pass (the XLA backward
  makes ~20 passes over the state per token, each a separate loop with its own
  overhead, and its reductions with ``exp`` fused in run scalar). Work is split over
  batch rows and channel blocks on XLA's intra-op threads. At ``(b, t, d, n) = (2,
  1024, 256, 16)`` float32 forward+backward costs ~25 ms of CPU time against ~45 ms for
  the XLA chunks; the ``exp`` of the decays (once forward, once in the recompute) is
  about half of it.
* ``"pallas"`` (real ``A``, ``B``, ``C`` only): the fused kernels of
  :mod:`pallas_kernels.selective_scan` behind a ``custom_vjp``. The forward keeps the
  state in registers and stores only ``y`` and the states entering every chunk of
  ``chunk_size`` tokens (a power of two, default 16); the backward kernel recomputes each
  chunk from its stored state: memory ``O(b t d n / chunk)``, no ``[b, t, d, n]`` tensor.
  Grouped ``B``/``C`` are read in place (no expansion to channels); packed sequences
  pass the keep mask into the kernels. Compiled on GPU (Triton) and TPU (Mosaic); on CPU
  it runs under the Pallas interpreter (correct but slow, for tests).
* ``"auto"``: ``"pallas"`` on a platform where :data:`ssmjax.scan._dispatch.TABLE` lists
  the kernel as proven for the inputs' dtype (real inputs only), else ``"chunked"``. The
  platform is the one the program is lowered for (``jax.lax.platform_dependent``), and
  the kernel then runs with its per-target default tiling unless ``block_sizes`` is given.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Bool, Float, Inexact

from pallas_kernels import selective_scan as kernels
from pallas_kernels.selective_scan import BlockSizes as SelectiveScanBlockSizes
from ssmjax.scan import _dispatch, _ffi
from ssmjax.scan._checks import (
    carry_cut_mask,
    check_chunk_size,
    check_floating,
    check_ndim,
    check_shape,
    flip_time,
    state_dtype,
)
from ssmjax.scan.linear import default_chunk_size, linear_scan


def _to_channels(B: Array, channels: int) -> Array:
    """Grouped ``[..., g, n]`` -> per channel ``[..., n, d]`` (each group repeated ``d/g`` times)."""
    return jnp.repeat(jnp.swapaxes(B, -1, -2), channels // B.shape[-2], axis=-1)


def _to_groups(dB: Array, groups: int) -> Array:
    """Adjoint of :func:`_to_channels`: ``[..., n, d]`` -> ``[..., g, n]`` summed per group."""
    n, d = dB.shape[-2:]
    return jnp.swapaxes(dB.reshape(dB.shape[:-1] + (groups, d // groups)).sum(-1), -1, -2)


def _discretise(A, u, delta, B, keep):
    """``exp(delta A)`` (zero where the carry is cut) and ``delta B u`` as ``[..., n, d]``
    for any leading axes (ZOH for A, Euler for B, as Mamba); ``B`` grouped ``[..., g, n]``.

    States are laid out ``[batch, n, d]``, channels minor and no group axis: sums over
    ``n`` are adds of whole channel vectors. On CPU this ran the fused step ~4x faster
    than a ``[batch, g, d/g, n]`` layout.
    """
    decay = jnp.exp(delta[..., None, :] * A)
    decay = jnp.where(keep[..., None, None], decay, jnp.zeros((), decay.dtype))
    return decay, (delta * u)[..., None, :] * _to_channels(B, A.shape[-1])


def _read_out(state, C):
    y = (state * _to_channels(C, state.shape[-1])).sum(-2)
    return 2 * y.real if jnp.iscomplexobj(y) else y


def _step(
    A: Inexact[Array, "n d"],
    state: Inexact[Array, "b n d"],
    u: Float[Array, "b d"],
    delta: Float[Array, "b d"],
    B: Inexact[Array, "b g n"],
    C: Inexact[Array, "b g n"],
    keep: Bool[Array, " b"],
) -> tuple[Inexact[Array, "b n d"], Float[Array, "b d"]]:
    """One token: discretise, update the state, read out."""
    decay, inp = _discretise(A, u, delta, B, keep)
    state = decay * state + inp
    return state, _read_out(state, C)


def _scan_steps(A, state, xs):
    """``lax.scan`` of :func:`_step` over the leading (time) axis of ``xs``."""
    return jax.lax.scan(lambda h, x: _step(A, h, *x), state, xs)


def _by_chunk(xs, chunk: int):
    """Time-major inputs -> ``[n_chunks, chunk, ...]``, padded so that the state passes
    through the padding unchanged (delta = 0, u = 0, keep = True: decay 1, input 0)."""
    pad = -xs[0].shape[0] % chunk

    def split(x, value):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value)
        return x.reshape((-1, chunk) + x.shape[1:])

    *floats, keep = xs
    return tuple(split(x, 0) for x in floats) + (split(keep, True),)


def _states_before_steps(A, state, xs):
    """The state entering every step of one chunk ``[c, ...]`` (no readout)."""

    def step(h, x):
        u, delta, B, _, keep = x
        decay, inp = _discretise(A, u, delta, B, keep)
        return decay * h + inp, h

    return jax.lax.scan(step, state, xs)[1]


def _step_vjp(A, x_prev, inputs, dy, g, dA):
    """Cotangents of one :func:`_step` (JAX's complex convention: no conjugation).

    ``g`` is the cotangent of the state after the step, accumulated from the future.
    """
    u, delta, B, C, keep = inputs
    groups = B.shape[-2]
    decay, inp = _discretise(A, u, delta, B, keep)
    x = decay * x_prev + inp
    dy = (2 * dy if jnp.iscomplexobj(x) else dy).astype(x.dtype)
    gx = g + dy[..., None, :] * _to_channels(C, x.shape[-1])
    d_exponent = gx * x_prev * decay  # cotangent of delta * A
    d_input = (gx * _to_channels(B, x.shape[-1])).sum(-2).real  # cotangent of delta * u
    cotangents = (
        d_input * delta,  # u
        (d_exponent * A).sum(-2).real + d_input * u,  # delta
        _to_groups(gx * (delta * u)[..., None, :], groups),  # B
        _to_groups(dy[..., None, :] * x, groups),  # C
    )
    dA = dA + (d_exponent * delta[..., None, :]).sum(0)
    return decay * gx, dA, cotangents


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(A, state, xs, chunk_size: int):
    return _chunked_fwd(A, state, xs, chunk_size)[0]


def _chunked_fwd(A, state, xs, chunk_size):
    time = xs[0].shape[0]
    chunks = _by_chunk(xs, min(chunk_size, time))
    final, (starts, ys) = jax.lax.scan(
        lambda h, x: (lambda out: (out[0], (h, out[1])))(_scan_steps(A, h, x)), state, chunks
    )
    ys = ys.reshape((-1,) + ys.shape[2:])[:time]
    return (final, ys), (A, starts, xs)


def _chunked_bwd(chunk_size, residuals, cotangents):
    """Reverse pass chunk by chunk: recompute the chunk's states from its stored start
    state, then walk it backwards with :func:`_step_vjp`. Peak memory: one chunk."""
    A, starts, xs = residuals
    d_final, dys = cotangents
    time = xs[0].shape[0]
    c = min(chunk_size, time)
    chunks = _by_chunk(xs, c)
    dys = jnp.pad(dys, [(0, -time % c)] + [(0, 0)] * (dys.ndim - 1)).reshape(
        (-1, c) + dys.shape[1:]
    )

    def chunk_backward(carry, chunk):
        start, inputs, dy = chunk
        before = _states_before_steps(A, start, inputs)

        def step_backward(carry, step):
            x_prev, inputs_t, dy_t = step
            g, dA = carry
            g, dA, cot = _step_vjp(A, x_prev, inputs_t, dy_t, g, dA)
            return (g, dA), cot

        return jax.lax.scan(step_backward, carry, (before, inputs, dy), reverse=True)

    init = (d_final.astype(starts.dtype), jnp.zeros_like(A))
    (d_state, dA), cots = jax.lax.scan(chunk_backward, init, (starts, chunks, dys), reverse=True)
    d_xs = tuple(x.reshape((-1,) + x.shape[2:])[:time] for x in cots) + (None,)
    return dA, d_state, d_xs


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


#: The C++ CPU kernels (``_selective_cpu.cc``): FFI target names and their symbols.
_CPU_KERNELS = (
    ("ssmjax_selective_scan_forward", "SsmjaxSelectiveScanForward"),
    ("ssmjax_selective_scan_backward", "SsmjaxSelectiveScanBackward"),
)


def _cpu_kernels_ready() -> bool:
    """Whether ``"chunked"`` runs the C++ kernels when lowered for CPU (:mod:`ssmjax.scan._ffi`)."""
    return _ffi.enabled() and _ffi.load("selective_cpu", _CPU_KERNELS)


def _cpu_forward(u, delta, A, B, C, keep, state, chunk: int, save: bool):
    b, time, d = u.shape
    chunks = -(-time // chunk) if save else 0
    types = (
        jax.ShapeDtypeStruct(u.shape, u.dtype),
        jax.ShapeDtypeStruct(state.shape, state.dtype),
        jax.ShapeDtypeStruct((b, chunks) + state.shape[1:], state.dtype),
    )
    call = jax.ffi.ffi_call(_CPU_KERNELS[0][0], types, vmap_method="sequential")
    return call(u, delta, A, B, C, keep, state, chunk=np.int64(chunk), save=save)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _cpu_chunked(u, delta, A, B, C, keep, state, chunk: int):
    """``"chunked"`` lowered for CPU: the C++ kernels, batch-major inputs as
    :func:`_selective_core` gets them, same algorithm and residuals as :func:`_chunked`."""
    return _cpu_forward(u, delta, A, B, C, keep, state, chunk, save=False)[:2]


def _cpu_chunked_fwd(u, delta, A, B, C, keep, state, chunk):
    y, final, starts = _cpu_forward(u, delta, A, B, C, keep, state, chunk, save=True)
    return (y, final), (u, delta, A, B, C, keep, starts)


def _cpu_chunked_bwd(chunk, residuals, cotangents):
    u, delta, A, B, C, keep, starts = residuals
    dy, d_final = cotangents
    types = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (u, delta, A, B, C)) + (
        jax.ShapeDtypeStruct(starts.shape[:1] + starts.shape[2:], starts.dtype),
    )
    call = jax.ffi.ffi_call(_CPU_KERNELS[1][0], types, vmap_method="sequential")
    du, ddelta, dA, dB, dC, d_state = call(
        u, delta, A, B, C, keep, starts, dy.astype(u.dtype), d_final.astype(starts.dtype), chunk=np.int64(chunk)
    )
    return du, ddelta, dA, dB, dC, None, d_state


_cpu_chunked.defvjp(_cpu_chunked_fwd, _cpu_chunked_bwd)


def _associative(A, state, xs):
    u, delta, B, C, keep = xs  # time-major
    decay, inputs = _discretise(A, u, delta, B, keep)
    to_batch_major = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
    states, final = linear_scan(
        to_batch_major(decay), to_batch_major(inputs), initial_state=state, method="associative"
    )
    return final, _read_out(to_batch_major(states), C)


def _kernel_options(block_sizes: SelectiveScanBlockSizes, platform: str) -> dict:
    """Keyword arguments of the kernels for ``platform`` (``"cpu"``: the interpreter)."""
    return dict(block_sizes=block_sizes, interpret=platform == "cpu", platform=platform)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _pallas(u, delta, A, B, C, keep, state, block_sizes, platform: str):
    y, final, _ = kernels.selective_scan_forward(
        u, delta, A, B, C, state, keep, save_chunk_states=False,
        **_kernel_options(block_sizes, platform),
    )
    return y, final


def _pallas_fwd(u, delta, A, B, C, keep, state, block_sizes, platform):
    y, final, starts = kernels.selective_scan_forward(
        u, delta, A, B, C, state, keep, **_kernel_options(block_sizes, platform)
    )
    return (y, final), (u, delta, A, B, C, keep, starts)


def _pallas_bwd(block_sizes, platform, residuals, cotangents):
    """The backward kernel: recompute every chunk from its stored start state."""
    u, delta, A, B, C, keep, starts = residuals
    dy, d_final = cotangents
    du, ddelta, dA, dB, dC, d_state = kernels.selective_scan_backward(
        u, delta, A, B, C, keep, starts, dy, d_final, **_kernel_options(block_sizes, platform)
    )
    return du, ddelta, dA, dB, dC, None, d_state


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def _selective_core(
    method: str,
    chunk_size: int | None,
    block_sizes: SelectiveScanBlockSizes | None,
    platform: str,
    u: Float[Array, "batch time d"],
    delta: Float[Array, "batch time d"],
    A: Inexact[Array, "n d"],
    B: Inexact[Array, "batch time g n"],
    C: Inexact[Array, "batch time g n"],
    keep: Bool[Array, "batch time"],
    state: Inexact[Array, "batch n d"],
) -> tuple[Float[Array, "batch time d"], Inexact[Array, "batch n d"]]:
    if method == "pallas":
        return _pallas(u, delta, A, B, C, keep, state, block_sizes, platform)
    if method == "chunked" and not jnp.iscomplexobj(A) and _cpu_kernels_ready():
        # Lowered for CPU: the C++ kernels; for any other platform: the XLA chunks.
        chunk = max(1, min(chunk_size or default_chunk_size(u.shape[1]), u.shape[1]))
        return _ffi.cpu_or(
            lambda *args: _cpu_chunked(*args, chunk), functools.partial(_xla_core, method, chunk_size),
            u, delta, A, B, C, keep, state,
        )
    return _xla_core(method, chunk_size, u, delta, A, B, C, keep, state)


def _xla_core(method, chunk_size, u, delta, A, B, C, keep, state):
    """The XLA evaluations (time-major inside)."""
    xs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (u, delta, B, C, keep))
    if method == "sequential" or u.shape[1] == 0:  # T = 0: no chunk to split into
        final, y = _scan_steps(A, state, xs)
    elif method == "associative":
        final, y = _associative(A, state, xs)
    else:
        final, y = _chunked(A, state, xs, chunk_size or default_chunk_size(u.shape[1]))
    return jnp.swapaxes(y, 0, 1), final


@_dispatch.sequence_parallel_route("selective_scan")
def selective_scan(
    u: ArrayLike,
    delta: ArrayLike,
    A: ArrayLike,
    B: ArrayLike,
    C: ArrayLike,
    *,
    D: ArrayLike | None = None,
    z: ArrayLike | None = None,
    delta_bias: ArrayLike | None = None,
    delta_softplus: bool = False,
    initial_state: ArrayLike | None = None,
    reverse: bool = False,
    segment_ids: ArrayLike | None = None,
    reset: ArrayLike | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    block_sizes: SelectiveScanBlockSizes | None = None,
) -> tuple[Array, Array]:
    """Mamba's selective scan (see the module docstring for the recurrence).

    Args:
      u: inputs ``[batch, time, d]``.
      delta: step sizes ``[batch, time, d]`` (before ``delta_bias`` / softplus).
      A: ``[d, n]``, real (Mamba: negative) or complex.
      B, C: ``[batch, time, n]`` or grouped ``[batch, time, g, n]`` with ``g`` dividing
        ``d``; both the same shape.
      D: skip ``[d]``; z: gate ``[batch, time, d]``; delta_bias: ``[d]``.
      delta_softplus: apply ``softplus`` to ``delta + delta_bias``.
      initial_state: ``[batch, d, n]``; zeros if ``None``.
      reverse, segment_ids, reset: as in :func:`ssmjax.scan.linear_scan`.
      method: ``"auto"``, ``"sequential"``, ``"associative"``, ``"chunked"`` or
        ``"pallas"`` (real inputs only; interpreted on CPU).
      chunk_size: tokens per rematerialised chunk for ``"chunked"`` (``None``: ``~sqrt(T)``)
        and ``"pallas"`` (a power of two; ``None``: 16) when ``block_sizes`` is not given.
      block_sizes: the kernels' tiling (:class:`SelectiveScanBlockSizes`) wherever the
        Pallas kernel runs (``"pallas"``, or ``"auto"`` picking it); ``None``: the
        per-target default (with ``chunk=chunk_size`` for an explicit ``"pallas"``).

    Returns:
      ``(out, final_state)``: ``out`` ``[batch, time, d]`` in the dtype of ``u``,
      ``final_state`` ``[batch, d, n]`` in float32 (complex64 for complex ``A``) or wider.

    Under :func:`ssmjax.distributed.sequence_parallel` this is
    :func:`ssmjax.distributed.selective_scan_sp` when ``time`` divides over the ``seq`` axis and ``reverse=False``
    (unchanged otherwise; see :mod:`ssmjax.distributed.context`).
    """
    u, delta, A, B, C = map(jnp.asarray, (u, delta, A, B, C))
    _dispatch.check_method("selective_scan", method)
    _dispatch.check_block_sizes("selective_scan", block_sizes, SelectiveScanBlockSizes)
    if chunk_size is not None:
        check_chunk_size(chunk_size)
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        check_floating(name, x)
    block_sizes = _dispatch.kernel_block_sizes(
        SelectiveScanBlockSizes, block_sizes, method, chunk_size
    )
    dtype_in = jnp.result_type(u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype)
    check_ndim("u", u, 3, "[batch, time, d]")
    batch, time, d = u.shape
    check_shape("delta", delta, u.shape, "u.shape [batch, time, d]")
    check_ndim("A", A, 2, "[d, n]")
    if A.shape[0] != d:
        raise ValueError(f"A: expected shape [d, n] with d = {d}, got {tuple(A.shape)}")
    n = A.shape[1]
    check_ndim("B", B, (3, 4), "[batch, time, n] or [batch, time, g, n]")
    groups = 1 if B.ndim == 3 else B.shape[2]
    layout = "[batch, time, n]" if B.ndim == 3 else "[batch, time, g, n]"
    expected_bc = (batch, time, n) if B.ndim == 3 else (batch, time, groups, n)
    check_shape("B", B, expected_bc, layout)
    check_shape("C", C, expected_bc, f"B.shape {layout}")
    if d % groups:
        raise ValueError(f"B: the number of groups g = {groups} must divide d = {d}")
    dtype = state_dtype(u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype)
    real = jnp.float32 if dtype in (jnp.float32, jnp.complex64) else jnp.float64
    delta = delta.astype(real)
    if delta_bias is not None:
        delta_bias = jnp.asarray(delta_bias)
        check_shape("delta_bias", delta_bias, (d,), "[d]")
        delta = delta + delta_bias.astype(real)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    if initial_state is None:
        state = jnp.zeros((batch, d, n), dtype)
    else:
        state = jnp.asarray(initial_state)
        check_floating("initial_state", state)
        check_shape("initial_state", state, (batch, d, n), "[batch, d, n]")
        state = state.astype(dtype)
    cut = carry_cut_mask(segment_ids, reset, batch, time, reverse)
    case = _dispatch.case(dtype_in, packed=cut is not None, time=time)
    if method == "pallas":
        _dispatch.check_pallas("selective_scan", case, "A, B, C")
    keep = jnp.ones((batch, time), bool) if cut is None else ~cut

    B, C = (x.reshape((batch, time, groups, n)).astype(dtype) for x in (B, C))
    u_real = u.astype(real)
    if reverse:
        u_real, delta, B, C, keep = flip_time((u_real, delta, B, C, keep))

    def branch(resolved: str, platform: str):
        # chunk_size is tuned for "chunked"; the kernel runs with block_sizes.
        kernel = resolved == "pallas"
        tiling = _dispatch.block_sizes_for("selective_scan", block_sizes, platform) if kernel else None
        return functools.partial(_selective_core, resolved, chunk_size, tiling, platform)

    y, final = _dispatch.dispatch(
        _dispatch.plan("selective_scan", method, case),
        branch,
        u_real, delta, A.astype(dtype).T, B, C, keep, jnp.swapaxes(state, -1, -2),
    )
    if reverse:
        y = flip_time(y)
    if D is not None:
        D = jnp.asarray(D)
        check_shape("D", D, (d,), "[d]")
        y = y + D.astype(real) * u.astype(real)
    if z is not None:
        z = jnp.asarray(z)
        check_shape("z", z, u.shape, "u.shape [batch, time, d]")
        y = y * jax.nn.silu(z.astype(real))
    return y.astype(u.dtype), jnp.swapaxes(final, -1, -2)
