"""Non-linear recurrences ``h_t = cell(h_{t-1}, x_t)`` solved over the whole sequence at once.

Newton's method on the stacked system ``F_t(h) = h_t - cell(h_{t-1}, x_t) = 0``
(``t = 0 .. T-1``, ``h_{-1} = initial_state``): DEER (Lim et al. 2024, "Parallelizing
non-linear sequential models over the sequence length"), ParaRNN (Danieli et al. 2025,
"ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for Large Language Models") and
quasi-DEER (Gonzalez et al. 2024, "Towards Scalable and Stable Parallelization of
Nonlinear RNNs"). Linearising the cell at the current iterate ``h^(k)``,

    h_t^(k+1) = cell(h_{t-1}^(k), x_t) + J_t (h_{t-1}^(k+1) - h_{t-1}^(k)),
    J_t = d cell / d h  at  (h_{t-1}^(k), x_t),

and in increments ``d_t = h_t^(k+1) - h_t^(k)`` this is the *linear* recurrence

    d_t = J_t d_{t-1} + r_t,   r_t = cell(h_{t-1}^(k), x_t) - h_t^(k),   d_{-1} = 0,

solved in parallel by :func:`ssmjax.scan.linear.matrix_scan` (dense or block-diagonal
``J_t``) or :func:`ssmjax.scan.linear.linear_scan` (diagonal ``J_t``). ``max |r|`` is the
residual: the iteration stops once it is below ``tol``. With the exact Jacobian the
iteration converges quadratically near the solution. Using only part of ``J_t`` (its
diagonal blocks or its diagonal) is a quasi-Newton method: cheaper iterations, linear
convergence, same fixed point. Whatever the cell and the Jacobian approximation,
positions ``0 .. k-1`` are exact after ``k`` iterations (``d_{t-1}`` is then zero), so
``max_iters = T`` always converges in exact arithmetic.

Gradients use the implicit-function theorem at the solution, never the iterations: for
cotangents ``dh_t`` the adjoint is the reverse linear recurrence

    g_t = dh_t + J_{t+1}^T g_{t+1},   g_{T-1} = dh_{T-1},

(one reverse scan with the *exact* Jacobians at the solution), then
``d params = sum_t (d cell/d params)^T g_t``, ``dx_t = (d cell/d x_t)^T g_t`` and
``d initial_state = J_0^T g_0``, all from one ``jax.vjp`` of the cell.

If the residual is not below ``tol`` after ``max_iters`` iterations (or becomes
non-finite) the result falls back to the exact sequential ``lax.scan`` and reports
``converged=False``: the states are never silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Bool, Float, PyTree

from ssmjax.scan._checks import (
    carry_cut_mask,
    check_floating,
    check_method,
    check_ndim,
    check_shape,
    expand_mask,
    state_dtype,
)
from ssmjax.scan.linear import linear_scan, matrix_scan

#: Jacobian kinds, densest first.
JACOBIANS = ("dense", "block", "diagonal")


class NewtonResult(NamedTuple):
    """What :func:`newton_recurrence` returns (``states, final_state = result[:2]``)."""

    states: Array  #: ``[batch, time, state_dim]``: ``h_t`` for every ``t``
    final_state: Array  #: ``[batch, state_dim]``: ``h_{T-1}``
    iterations: Array  #: int32 scalar: Newton updates performed
    residual: Array  #: scalar: ``max |h_t - cell(h_{t-1}, x_t)|`` of the last Newton iterate
    converged: Array  #: bool scalar: ``residual < tol``; if False the states are the fallback


class _Setup(NamedTuple):
    """Static configuration shared by the forward solve and the implicit backward."""

    cell: Callable  # (params, h [n], x_t) -> [n] in the state dtype
    probe_size: int  # block size k of the cell's true Jacobian structure (n, block_size or 1)
    newton_size: int  # block size of the Jacobian part the forward iteration uses
    max_iters: int
    tol: float
    scan_method: str
    fallback: bool


# ----------------------------------------------------------------------------- building blocks
def _over_batch_and_time(cell: Callable) -> Callable:
    """``cell(params, h [n], x_t)`` -> the same cell on ``h [b, t, n]`` and ``x [b, t, ...]``."""
    per_time = jax.vmap(cell, in_axes=(None, 0, 0))
    return jax.vmap(per_time, in_axes=(None, 0, 0))


def _previous_states(
    h: Float[Array, "batch time state"],
    h0: Float[Array, "batch state"],
    cut: Bool[Array, "batch time"] | None,
) -> Float[Array, "batch time state"]:
    """The state each position reads: ``h_{t-1}`` (``h_{-1} = h0``), zero where ``cut``."""
    h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
    if cut is None:
        return h_prev
    return jnp.where(cut[..., None], jnp.zeros((), h_prev.dtype), h_prev)


def _probe_jacobian(f: Callable, h: Float[Array, " state"], size: int) -> Array:
    """Diagonal ``size x size`` blocks of ``df/dh`` from ``size`` forward-mode products.

    Tangent ``j`` is the ``j``-th unit vector repeated in every block, so its JVP holds
    column ``j`` of every diagonal block *provided ``df/dh`` is block-diagonal* (always
    true for ``size = n``: the full Jacobian, ``n`` JVPs). Returns ``[n / size, size, size]``.
    """
    n = h.shape[-1]
    tangents = jnp.tile(jnp.eye(size, dtype=h.dtype), (1, n // size))  # [size, n]
    columns = jax.vmap(lambda t: jax.jvp(f, (h,), (t,))[1])(tangents)  # [size, n]
    return jnp.transpose(columns.reshape(size, n // size, size), (1, 2, 0))


def _diagonal_blocks(blocks: Array, size: int) -> Array:
    """``[nb, K, K]`` -> its diagonal sub-blocks ``[nb * K / size, size, size]``."""
    nb, big, _ = blocks.shape
    m = big // size
    sub = jnp.diagonal(blocks.reshape(nb, m, size, m, size), axis1=1, axis2=3)
    return jnp.moveaxis(sub, -1, 1).reshape(nb * m, size, size)


def _transitions(
    setup: _Setup,
    params: PyTree,
    h_prev: Float[Array, "batch time state"],
    x: PyTree,
    cut: Bool[Array, "batch time"] | None,
    size: int,
) -> Float[Array, "batch time blocks size size"]:
    """``A_t``: the ``size``-blocks of ``J_t`` at ``(h_prev_t, x_t)``, zero where ``cut``."""

    def per_example(h, x_t):
        jac = _probe_jacobian(lambda v: setup.cell(params, v, x_t), h, setup.probe_size)
        return _diagonal_blocks(jac, size)

    a = jax.vmap(jax.vmap(per_example))(h_prev, x)
    if cut is None:
        return a
    return jnp.where(expand_mask(cut, a.ndim), jnp.zeros((), a.dtype), a)


def _solve_linear(
    a: Float[Array, "batch time blocks size size"],
    r: Float[Array, "batch time state"],
    reverse: bool,
    scan_method: str,
) -> Float[Array, "batch time state"]:
    """``d_t = A_t d_{t-1} + r_t`` from ``d = 0`` (``d_{t+1}`` if ``reverse``)."""
    batch, time, blocks, size, _ = a.shape
    if size == 1:
        return linear_scan(a[..., 0, 0], r, reverse=reverse, method=scan_method)[0]
    d, _ = matrix_scan(
        a, r.reshape(batch, time, blocks, size), reverse=reverse, method=scan_method
    )
    return d.reshape(r.shape)


def _sequential(
    cell: Callable,
    params: PyTree,
    x: PyTree,
    h0: Float[Array, "batch state"],
    cut: Bool[Array, "batch time"] | None,
) -> Float[Array, "batch time state"]:
    """The oracle: ``h_t = cell(h_{t-1}, x_t)`` one step at a time (``lax.scan``)."""
    cell_b = jax.vmap(cell, in_axes=(None, 0, 0))
    x_by_time = jax.tree.map(lambda leaf: jnp.swapaxes(leaf, 0, 1), x)
    batch = h0.shape[0]
    time = jax.tree.leaves(x)[0].shape[1]
    cut_by_time = jnp.zeros((time, batch), bool) if cut is None else cut.T

    def step(h, inputs):
        x_t, cut_t = inputs
        h = cell_b(params, jnp.where(cut_t[:, None], jnp.zeros((), h.dtype), h), x_t)
        return h, h

    _, hs = jax.lax.scan(step, h0, (x_by_time, cut_by_time))
    return jnp.swapaxes(hs, 0, 1)


def _max_residual(
    cell: Callable,
    params: PyTree,
    x: PyTree,
    h: Float[Array, "batch time state"],
    h0: Float[Array, "batch state"],
    cut: Bool[Array, "batch time"] | None,
) -> tuple[Float[Array, "batch time state"], Float[Array, ""]]:
    """``(f, max |f - h|)`` with ``f_t = cell(h_{t-1}, x_t)``: the residual of ``h``."""
    f = _over_batch_and_time(cell)(params, _previous_states(h, h0, cut), x)
    return f, jnp.max(jnp.abs(f - h))


# ----------------------------------------------------------------------------- Newton solve
def _newton(
    setup: _Setup,
    params: PyTree,
    x: PyTree,
    h0: Float[Array, "batch state"],
    cut: Bool[Array, "batch time"] | None,
    guess: Float[Array, "batch time state"],
) -> tuple[Float[Array, "batch time state"], Array, Float[Array, ""], Bool[Array, ""]]:
    """Newton / quasi-Newton iterations from ``guess``; sequential fallback if not converged."""

    def keep_going(carry):
        k, _, _, res = carry
        return (k < setup.max_iters) & (res >= setup.tol) & jnp.isfinite(res)

    def newton_step(carry):
        k, h, f, _ = carry
        h_prev = _previous_states(h, h0, cut)
        a = _transitions(setup, params, h_prev, x, cut, setup.newton_size)
        h = h + _solve_linear(a, f - h, False, setup.scan_method)
        f, res = _max_residual(setup.cell, params, x, h, h0, cut)
        return k + 1, h, f, res

    f, res = _max_residual(setup.cell, params, x, guess, h0, cut)
    k, h, _, res = jax.lax.while_loop(keep_going, newton_step, (jnp.int32(0), guess, f, res))
    converged = res < setup.tol
    if setup.fallback:
        h = jax.lax.cond(
            converged, lambda: h, lambda: _sequential(setup.cell, params, x, h0, cut)
        )
    return h, k, res, converged


def _implicit_gradients(
    setup: _Setup,
    params: PyTree,
    x: PyTree,
    h0: Float[Array, "batch state"],
    cut: Bool[Array, "batch time"] | None,
    h: Float[Array, "batch time state"],
    dh: Float[Array, "batch time state"],
) -> tuple[PyTree, PyTree, Float[Array, "batch state"]]:
    """Implicit-function-theorem VJP: ``g_t = dh_t + J_{t+1}^T g_{t+1}``, then the cell's VJP."""
    h_prev = _previous_states(h, h0, cut)
    a = _transitions(setup, params, h_prev, x, cut, setup.probe_size)  # exact J_t (masked)
    a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
    g = _solve_linear(jnp.swapaxes(a_next, -1, -2), dh, True, setup.scan_method)
    _, pullback = jax.vjp(_over_batch_and_time(setup.cell), params, h_prev, x)
    d_params, d_h_prev, d_x = pullback(g)
    d_h0 = d_h_prev[:, 0]  # J_0^T g_0
    if cut is not None:
        d_h0 = jnp.where(cut[:, :1], jnp.zeros((), d_h0.dtype), d_h0)
    return d_params, d_x, d_h0


def _implicit_solver(setup: _Setup) -> Callable:
    """``(params, x, h0, cut, guess) -> (h, iterations, residual, converged)``, implicit VJP."""

    @jax.custom_vjp
    def solve(params, x, h0, cut, guess):
        return _newton(setup, params, x, h0, cut, guess)

    def solve_fwd(params, x, h0, cut, guess):
        out = _newton(setup, params, x, h0, cut, guess)
        return out, (params, x, h0, cut, out[0])

    def solve_bwd(residuals, cotangents):
        params, x, h0, cut, h = residuals
        grads = _implicit_gradients(setup, params, x, h0, cut, h, cotangents[0])
        return (*grads, None, None)  # cut and the initial guess get no gradient

    solve.defvjp(solve_fwd, solve_bwd)
    return solve


# ----------------------------------------------------------------------------- public API
def _check_kind(name: str, kind: str) -> str:
    if kind not in JACOBIANS:
        raise ValueError(f"{name}: expected one of {JACOBIANS}, got {kind!r}")
    return kind


def _block_size_of(kind: str, n: int, block_size: int | None) -> int:
    return {"dense": n, "diagonal": 1}.get(kind, block_size)


def _check_block_size(block_size: int | None, n: int, used: bool) -> None:
    if not used:
        if block_size is not None:
            raise ValueError(
                "block_size: only used with jacobian='block' or structure='block', "
                f"got {block_size!r}"
            )
        return
    if not isinstance(block_size, int) or block_size < 1 or n % block_size:
        raise ValueError(
            f"block_size: expected a positive int dividing state_dim = {n}, got {block_size!r}"
        )


def _check_inputs(x: PyTree, batch: int) -> int:
    """Every leaf of ``x`` is ``[batch, time, ...]`` with one shared ``time >= 1``."""
    leaves = jax.tree.leaves(x)
    if not leaves:
        raise ValueError("x: expected at least one array of shape [batch, time, ...]")
    time = None
    for leaf in leaves:
        check_ndim("x", leaf, range(2, 64), "[batch, time, ...]")
        time = leaf.shape[1] if time is None else time
        if leaf.shape[:2] != (batch, time) or time < 1:
            raise ValueError(
                f"x: expected every leaf of shape [batch, time, ...] with batch = {batch} "
                f"(from initial_state) and one time >= 1, got {tuple(leaf.shape)}"
            )
    return time


def _default_tol(dtype) -> float:
    return 1e-12 if jnp.finfo(dtype).bits >= 64 else 1e-5


def newton_recurrence(
    cell: Callable,
    params: Any,
    x: Any,
    initial_state: ArrayLike,
    *,
    method: str = "newton",
    jacobian: str | None = None,
    structure: str = "dense",
    block_size: int | None = None,
    max_iters: int = 50,
    tol: float | None = None,
    segment_ids: ArrayLike | None = None,
    reset: ArrayLike | None = None,
    initial_guess: ArrayLike | None = None,
    scan_method: str = "auto",
    fallback: bool = True,
) -> NewtonResult:
    """Solve ``h_t = cell(params, h_{t-1}, x_t)`` for all ``t`` at once with Newton's method.

    DEER (Lim et al. 2024, "Parallelizing non-linear sequential models over the sequence
    length"); ParaRNN (Danieli et al. 2025, "ParaRNN: Unlocking Parallel Training of
    Nonlinear RNNs for Large Language Models"); quasi-DEER (Gonzalez et al. 2024, "Towards
    Scalable and Stable Parallelization of Nonlinear RNNs"). Each iteration solves the
    linearised recurrence ``d_t = A_t d_{t-1} + (cell(h_{t-1}, x_t) - h_t)`` with a parallel
    linear scan and sets ``h <- h + d`` (see the module docstring).

    Args:
      cell: ``cell(params, h, x_t) -> h_new``: a pure function on ONE example, ``h`` and
        ``h_new`` flat vectors ``[state_dim]``, ``x_t`` one time step of ``x`` (leading
        ``[batch, time]`` axes removed). Multi-part states (LSTM's ``(h, c)``) are
        concatenated by the caller into one vector. Values the cell closes over are
        hoisted with ``jax.closure_convert`` and also receive gradients, but passing
        trainable weights through ``params`` is the intended way.
      params: pytree of cell parameters (``None`` if there are none); differentiable.
      x: array or pytree of arrays ``[batch, time, ...]``; differentiable.
      initial_state: ``h_{-1}`` ``[batch, state_dim]`` (required: it fixes ``state_dim``);
        differentiable.
      method: ``"newton"`` (parallel iterations) or ``"sequential"`` (``lax.scan``, the
        oracle, differentiated by ordinary autodiff).
      jacobian: which part of ``J_t = d cell / d h`` the forward iteration uses:
        ``"dense"`` (Newton, ``matrix_scan``, ``O(n^3)`` per step in the chunked scan),
        ``"block"`` (the diagonal ``block_size`` blocks, ``matrix_scan`` with a block axis,
        as ParaRNN's head-wise cells) or ``"diagonal"`` (``linear_scan``, ``O(n)``; the
        quasi-Newton of ParaGRU/ParaLSTM and quasi-DEER). ``None``: the cell's
        ``structure`` (exact Newton). Must not be denser than ``structure``. A sparser
        part than the cell's true Jacobian gives a quasi-Newton method: the fixed point
        and the residual are exact, only convergence is slower (linear, not quadratic).
      structure: what the caller guarantees about ``J_t``: ``"dense"`` (nothing),
        ``"block"`` (block-diagonal with ``block_size`` blocks) or ``"diagonal"``. It
        sets the cost of every Jacobian evaluation — ``n``, ``block_size`` or ``1``
        forward-mode JVPs per position (tangents are unit vectors repeated in every
        block) — and the transitions of the backward scan, which always uses the exact
        ``J_t`` of this structure, so gradients are exact with any ``jacobian``. A wrong
        promise keeps the forward exact (the residual is always computed exactly) but
        makes the gradients wrong.
      block_size: block size for ``"block"``; must divide ``state_dim``.
      max_iters: at most this many Newton updates (``T`` always suffice with the exact
        Jacobian; quasi-Newton may need more).
      tol: stop once ``max_t |h_t - cell(h_{t-1}, x_t)| < tol``; ``None``: ``1e-12`` for
        float64 states, ``1e-5`` for float32.
      segment_ids: ``[batch, time]`` ints; the state restarts from zero where the id
        changes (``h_{t-1} := 0`` there).
      reset: ``[batch, time]`` bool; ``True`` starts a new document from a zero state
        (``reset[:, 0]`` drops ``initial_state``). At most one of the two.
      initial_guess: ``[batch, time, state_dim]`` start of the iteration (e.g. the
        previous training step's states); zeros if ``None``. Not differentiated.
      scan_method: ``method`` of the inner ``linear_scan`` / ``matrix_scan``.
      fallback: if the iteration has not converged, return the exact sequential solution
        (default). ``False`` returns the last Newton iterate; ``converged`` says which.

    Returns:
      :class:`NewtonResult` ``(states [batch, time, state_dim], final_state
      [batch, state_dim], iterations, residual, converged)``; states accumulate in at
      least float32. ``residual`` is that of the last Newton iterate (before any
      fallback) and is not differentiable; for ``method="sequential"`` it is the residual
      of the sequential solution (rounding only) with ``iterations = 0``.

    Gradients (reverse mode only: ``jax.jvp``/``jacfwd`` through the Newton solve are not
    supported) come from the implicit-function theorem at the solution: one reverse
    linear scan with the exact ``J_t^T`` and one ``vjp`` of the cell; nothing of the
    iterations is stored. Under ``jit`` the convergence test is a ``lax.while_loop`` and
    the fallback a ``lax.cond`` (under a user ``vmap`` the cond evaluates both branches).
    """
    check_method(method, ("newton", "sequential"))
    jac_structure = _check_kind("structure", structure)
    newton_kind = jac_structure if jacobian is None else _check_kind("jacobian", jacobian)
    if JACOBIANS.index(newton_kind) < JACOBIANS.index(jac_structure):
        raise ValueError(
            f"jacobian: {newton_kind!r} is denser than the cell's structure "
            f"{jac_structure!r}; use jacobian=None (exact) or a sparser kind"
        )
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters: expected a positive int, got {max_iters!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol: expected a positive float, got {tol!r}")

    h0 = jnp.asarray(initial_state)
    check_floating("initial_state", h0)
    if jnp.issubdtype(h0.dtype, jnp.complexfloating):
        raise ValueError(f"initial_state: expected a real floating dtype, got {h0.dtype}")
    check_ndim("initial_state", h0, 2, "[batch, state_dim]")
    batch, n = h0.shape
    x = jax.tree.map(jnp.asarray, x)
    time = _check_inputs(x, batch)
    _check_block_size(block_size, n, "block" in (newton_kind, jac_structure))

    x_example = jax.tree.map(lambda leaf: leaf[0, 0], x)
    dtype = state_dtype(h0.dtype)
    out = jax.eval_shape(cell, params, jax.ShapeDtypeStruct((n,), dtype), x_example)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != (n,):
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"cell: expected an output of shape [state_dim] = {(n,)} (the shape of "
            f"initial_state[0]), got {shape}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"cell: expected a real floating output, got {out.dtype}")
    dtype = state_dtype(dtype, out.dtype)
    h0 = h0.astype(dtype)

    converted, hoisted = jax.closure_convert(cell, params, h0[0], x_example)

    def step(all_params, h, x_t):
        user_params, closure = all_params
        return converted(user_params, h, x_t, *closure).astype(dtype)

    all_params = (params, hoisted)
    cut = carry_cut_mask(segment_ids, reset, batch, time, reverse=False)

    if method == "sequential":
        h = _sequential(step, all_params, x, h0, cut)
        _, res = _max_residual(step, all_params, x, jax.lax.stop_gradient(h), h0, cut)
        return NewtonResult(h, h[:, -1], jnp.int32(0), jax.lax.stop_gradient(res), jnp.bool_(True))

    if initial_guess is None:
        guess = jnp.zeros((batch, time, n), dtype)
    else:
        guess = jnp.asarray(initial_guess)
        check_floating("initial_guess", guess)
        check_shape("initial_guess", guess, (batch, time, n), "[batch, time, state_dim]")
        guess = jax.lax.stop_gradient(guess.astype(dtype))
    setup = _Setup(
        cell=step,
        probe_size=_block_size_of(jac_structure, n, block_size),
        newton_size=_block_size_of(newton_kind, n, block_size),
        max_iters=max_iters,
        tol=_default_tol(dtype) if tol is None else float(tol),
        scan_method=scan_method,
        fallback=fallback,
    )
    h, iterations, res, converged = _implicit_solver(setup)(all_params, x, h0, cut, guess)
    return NewtonResult(h, h[:, -1], iterations, res, converged)
