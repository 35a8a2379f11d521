"""Non-linear head-wise recurrent cells: Elman, LSTM, GRU, sLSTM and the Recurrent Highway
Network, evaluated sequentially, by Newton's method over the whole sequence, or by a Pallas
kernel.

Every cell reads pre-activations ``gx`` (the input projection ``W x_t``, computed for all
``t`` at once by the caller) and adds a *head-wise* recurrent contribution: the hidden
units are split into ``H`` heads of ``dh`` units and the recurrent matrix is
block-diagonal, one ``[dh, dh]`` block per head and gate (the layout of FlashRNN, Pöppel,
Beck and Hochreiter 2024, "FlashRNN: I/O-Aware Optimization of Traditional RNNs on modern
hardware"; ``H = 1`` is the classic dense cell). Shapes::

    gx        [batch, time, gates, heads, dh]     pre-activations from the input
    R         [rgates, heads, dh, dh]             recurrent weights (rgates = gates except RHN)
    bias      [rgates, heads, dh]                 recurrent-side bias
    state     tuple of [batch, heads, dh]         (h, ...) in the order of ``state_names``
    outputs   [batch, time, heads, dh]            h_t for every t

Per head, with ``r_g = h_{t-1} R_g + b_g`` (``h_{t-1}`` a row vector, ``R_g`` the
``[dh, dh]`` block of gate ``g``, ``[in, out]`` like a Flax kernel), ``sigma`` the
logistic function. (FlashRNN's ``R[g, h]`` is ``[out, in]``, ``r = R h``: the transpose
of ours; its GRU orders the recurrent blocks ``(n, r, z)`` and the biases ``(n_h, r, z,
n_x)``. With that mapping the four cells agree with FlashRNN's PyTorch ``vanilla``
backend to 1e-16 in float64, a one-off check outside the test suite.)

``elman`` (Elman 1990, "Finding structure in time"), state ``(h,)``::

    h_t = tanh(gx_t + r)

``lstm`` (Hochreiter & Schmidhuber 1997; forget gate of Gers, Schmidhuber and Cummins
2000), gates ``(i, f, z, o)``, state ``(h, c)``::

    c_t = sigma(f~) c_{t-1} + sigma(i~) tanh(z~),   h_t = sigma(o~) tanh(c_t),   g~ = gx_g + r_g

``gru`` (Cho et al. 2014, in the PyTorch / cuDNN form with the reset gate applied after
the recurrent matrix), gates ``(r, z, n)``, state ``(h,)``::

    r = sigma(gx_r + r_r),  z = sigma(gx_z + r_z),  n = tanh(gx_n + r * r_n)
    h_t = (1 - z) n + z h_{t-1}

so ``bias`` is cuDNN's ``b_h`` (inside ``r * (...)`` for ``n``); input biases belong in
``gx``.

``slstm`` / ``slstm_exp`` (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory",
section 2.2), gates ``(i, f, z, o)``, state ``(h, c, n, m)``, exponential input gate,
sigmoid (``slstm``) or exponential (``slstm_exp``) forget gate, stabilised::

    log f = log sigma(f~)  (slstm)   or   f~  (slstm_exp)
    m_t = max(log f + m_{t-1}, i~)
    i'  = exp(i~ - m_t),   f' = exp(log f + m_{t-1} - m_t)
    c_t = f' c_{t-1} + i' tanh(z~),   n_t = f' n_{t-1} + i',   h_t = sigma(o~) c_t / n_t

(``h_t`` equals the unstabilised ``sigma(o~) c_t / n_t`` exactly: ``exp(-m_t)`` cancels;
every exponent is ``<= 0``). The zero state is ``c = n = m = 0``.

``rhn`` (Zilly, Srivastava, Koutník and Schmidhuber 2017, "Recurrent Highway Networks"),
recurrence depth ``L = rgates / 2``, coupled carry gate ``c = 1 - t``, state ``(s,)``; the
input enters the first micro-layer only (``gx`` has the 2 gates ``(h, t)``)::

    s_0 = s_{t-1}
    for l = 1 .. L:  h_l = tanh([l = 1] gx_h + s_{l-1} R_{h,l} + b_{h,l})
                     t_l = sigma([l = 1] gx_t + s_{l-1} R_{t,l} + b_{t,l})
                     s_l = h_l t_l + s_{l-1} (1 - t_l)
    s_t = s_L

Evaluations (``method=``):

* ``"sequential"``: ``lax.scan`` over time, the oracle, differentiated by autodiff.
* ``"newton"``: all ``T`` states at once by Newton's method on ``h_t - cell(h_{t-1}) = 0``
  (:func:`ssmjax.scan.newton.newton_recurrence`, DEER / ParaRNN). The state of one example
  is flattened head-major (``[heads, state_parts, dh]``), so the exact Jacobian of a
  head-wise cell is block-diagonal with one ``(parts * dh)``-block per head:
  ``jacobian="block"`` (default) is exact Newton at ``parts * dh`` JVPs per position, as
  ParaRNN's head-wise cells; ``"diagonal"`` is quasi-Newton (its diagonal only, one linear
  scan per iteration, linear convergence, same fixed point, as ParaGRU / ParaLSTM and
  quasi-DEER); ``"dense"`` ignores the block structure. Gradients are implicit (one
  reverse scan with the exact block Jacobians); an unconverged solve falls back to the
  sequential scan and reports ``converged=False``. sLSTM is solved with a log-sum-exp
  stabiliser instead of the max (identical ``h``; 11 instead of 45 iterations at T = 1024,
  see :func:`_smooth_twin`) and its final state converted back to the paper's.
* ``"pallas"`` (all cells but ``rhn``, real inputs): the sequential loop in one kernel
  launch, :mod:`pallas_kernels.rnn` (each program keeps its head's recurrent blocks
  resident and loops over time with the state in registers), behind a ``custom_vjp``
  whose backward is the kernel's reverse-time loop. Interpreted on CPU (slow; tests),
  compiled by Triton on GPUs; the platform is the one the program is lowered for
  (:mod:`ssmjax.scan._dispatch`). ``block_sizes``: :class:`RNNBlockSizes`.

Packed sequences: ``segment_ids`` / ``reset`` zero the state carried into the first token
of every document (for sLSTM also ``n`` and ``m``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Bool, Float

from pallas_kernels import rnn as kernels
from pallas_kernels.rnn import BlockSizes as RNNBlockSizes
from ssmjax.scan import _dispatch
from ssmjax.scan._checks import (
    carry_cut_mask,
    check_ndim,
    check_real_floating,
    check_shape,
    flip_time,
    state_dtype,
)
from ssmjax.scan.newton import newton_recurrence

METHODS = _dispatch.TABLE["nonlinear_rnn"].methods
JACOBIANS = ("block", "diagonal", "dense")


# ----------------------------------------------------------------------------- cells (one head)
def _recurrent(h: Array, R: Array, bias: Array) -> Array:
    """``r_g = h R_g + b_g`` for every gate: ``h [dh]``, ``R [G, dh, dh]`` -> ``[G, dh]``."""
    return jnp.einsum("i,gij->gj", h, R) + bias


def elman_update(gx, R, bias, state):
    """Elman: ``h_t = tanh(gx + h_{t-1} R + b)``; one head, ``gx [1, dh]``."""
    (h,) = state
    return (jnp.tanh(gx[0] + _recurrent(h, R, bias)[0]),)


def lstm_update(gx, R, bias, state):
    """LSTM, gates ``(i, f, z, o)``, state ``(h, c)``; one head."""
    h, c = state
    i, f, z, o = gx + _recurrent(h, R, bias)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(z)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def gru_update(gx, R, bias, state):
    """GRU (PyTorch / cuDNN form), gates ``(r, z, n)``, state ``(h,)``; one head."""
    (h,) = state
    rec = _recurrent(h, R, bias)
    r = jax.nn.sigmoid(gx[0] + rec[0])
    z = jax.nn.sigmoid(gx[1] + rec[1])
    n = jnp.tanh(gx[2] + r * rec[2])
    return ((1 - z) * n + z * h,)


def _identity(x):
    return x


#: ``log f`` of the sLSTM forget gate from its pre-activation, per cell name.
SLSTM_LOG_FORGET = {"slstm": jax.nn.log_sigmoid, "slstm_exp": _identity}


def _slstm_update(log_forget: Callable, stabilise: Callable, gx, R, bias, state):
    """sLSTM (xLSTM), gates ``(i, f, z, o)``, state ``(h, c, n, m)``; one head.
    ``stabilise`` is ``max`` (the paper) or ``logaddexp`` (the smooth twin Newton uses)."""
    h, c, n, m = state
    i_pre, f_pre, z_pre, o_pre = gx + _recurrent(h, R, bias)
    log_f = log_forget(f_pre)
    m_new = stabilise(log_f + m, i_pre)
    i = jnp.exp(i_pre - m_new)
    f = jnp.exp(log_f + m - m_new)
    c = f * c + i * jnp.tanh(z_pre)
    n = f * n + i
    return jax.nn.sigmoid(o_pre) * c / n, c, n, m_new


slstm_update = functools.partial(_slstm_update, jax.nn.log_sigmoid, jnp.maximum)
slstm_exp_update = functools.partial(_slstm_update, _identity, jnp.maximum)


def rhn_update(gx, R, bias, state):
    """Recurrent Highway Network, depth ``L = R.shape[0] / 2`` micro-layers with coupled
    carry gate; gates per layer ``(h, t)``; ``gx [2, dh]`` feeds the first layer."""
    (s,) = state
    for layer in range(R.shape[0] // 2):
        pre = _recurrent(s, R[2 * layer : 2 * layer + 2], bias[2 * layer : 2 * layer + 2])
        if layer == 0:
            pre = pre + gx
        t = jax.nn.sigmoid(pre[1])
        s = jnp.tanh(pre[0]) * t + s * (1 - t)
    return (s,)


class HeadwiseCell(NamedTuple):
    """A head-wise recurrent cell.

    ``update(gx [gates, dh], R [rgates, dh, dh], bias [rgates, dh], state) -> state`` on
    one example and one head, ``state`` a tuple of ``[dh]`` arrays named ``state_names``
    whose first entry is the output ``h``. ``rgates`` must equal ``gates``, or be a
    positive multiple of it when ``layered`` (RHN's depth).
    """

    name: str
    update: Callable
    gates: int
    state_names: tuple[str, ...]
    layered: bool = False


CELLS: dict[str, HeadwiseCell] = {
    "elman": HeadwiseCell("elman", elman_update, 1, ("h",)),
    "lstm": HeadwiseCell("lstm", lstm_update, 4, ("h", "c")),
    "gru": HeadwiseCell("gru", gru_update, 3, ("h",)),
    "slstm": HeadwiseCell("slstm", slstm_update, 4, ("h", "c", "n", "m")),
    "slstm_exp": HeadwiseCell("slstm_exp", slstm_exp_update, 4, ("h", "c", "n", "m")),
    "rhn": HeadwiseCell("rhn", rhn_update, 2, ("s",), layered=True),
}


def get_cell(cell: str | HeadwiseCell) -> HeadwiseCell:
    if isinstance(cell, HeadwiseCell):
        return cell
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {tuple(CELLS)} or a HeadwiseCell, got {cell!r}")
    return CELLS[cell]


def _over_heads(cell: HeadwiseCell) -> Callable:
    """``(gx [G, H, dh], R [Gr, H, dh, dh], bias [Gr, H, dh], state of [H, dh]) -> state``."""
    return jax.vmap(cell.update, in_axes=(1, 1, 1, 0))


class RNNInfo(NamedTuple):
    """Solver report of :func:`nonlinear_rnn` (``return_info=True``)."""

    iterations: Array  #: int32: Newton updates (0 for the sequential and Pallas methods)
    residual: Array  #: ``max |h_t - cell(h_{t-1}, x_t)|`` of the last Newton iterate
    converged: Array  #: bool: False if Newton fell back to the sequential scan


# ----------------------------------------------------------------------------- evaluations
def _sequential(
    cell: HeadwiseCell,
    gx: Float[Array, "batch time gates heads dh"],
    R: Float[Array, "rgates heads dh dh"],
    bias: Float[Array, "rgates heads dh"],
    state: tuple,
    cut: Bool[Array, "batch time"] | None,
) -> tuple[Float[Array, "batch time heads dh"], tuple]:
    """``lax.scan`` over time; the state is zeroed where ``cut``."""
    dtype = state[0].dtype
    step_all = jax.vmap(_over_heads(cell), in_axes=(0, None, None, 0))
    cut_by_time = jnp.zeros(gx.shape[1::-1], bool) if cut is None else cut.T

    def step(state, inputs):
        gx_t, cut_t = inputs
        state = tuple(jnp.where(cut_t[:, None, None], jnp.zeros((), dtype), s) for s in state)
        state = tuple(s.astype(dtype) for s in step_all(gx_t.astype(dtype), R, bias, state))
        return state, state[0]

    final, h = jax.lax.scan(step, state, (jnp.swapaxes(gx, 0, 1), cut_by_time))
    return jnp.swapaxes(h, 0, 1), final


def _newton_cell(cell: HeadwiseCell, heads: int, dh: int) -> Callable:
    """The cell on one example's flat state ``[heads * parts * dh]`` (head-major)."""
    parts = len(cell.state_names)
    over_heads = _over_heads(cell)

    def flat_cell(params, s, gx_t):
        R, bias = params
        s = s.reshape(heads, parts, dh)
        new = over_heads(gx_t.astype(s.dtype), R, bias, tuple(s[:, k] for k in range(parts)))
        return jnp.stack(new, axis=1).reshape(-1)

    return flat_cell


def _newton(
    cell: HeadwiseCell,
    gx: Float[Array, "batch time gates heads dh"],
    R: Float[Array, "rgates heads dh dh"],
    bias: Float[Array, "rgates heads dh"],
    state: tuple,
    cut: Bool[Array, "batch time"] | None,
    jacobian: str,
    max_iters: int,
    tol: float | None,
) -> tuple[Float[Array, "batch time heads dh"], tuple, RNNInfo]:
    batch, time, _, heads, dh = gx.shape
    parts = len(cell.state_names)
    s0 = jnp.stack(state, axis=2).reshape(batch, -1)  # [b, H * parts * dh], head-major
    kinds = {
        "block": dict(structure="block", block_size=parts * dh),
        "diagonal": dict(structure="block", block_size=parts * dh, jacobian="diagonal"),
        "dense": dict(structure="dense"),
    }[jacobian]
    solved = _smooth_twin(cell)
    result = newton_recurrence(
        _newton_cell(solved, heads, dh), (R, bias), gx, s0, reset=cut, max_iters=max_iters, tol=tol,
        **kinds,
    )
    states = result.states.reshape(batch, time, heads, parts, dh)
    final = result.final_state.reshape(batch, heads, parts, dh)
    info = RNNInfo(result.iterations, result.residual, result.converged)
    h, final = states[:, :, :, 0], tuple(final[:, :, k] for k in range(parts))
    if solved is not cell:
        final = _max_stabilised_final(SLSTM_LOG_FORGET[cell.name], gx, R, bias, h, state, final, cut)
    return h, final, info


def _smooth_twin(cell: HeadwiseCell) -> HeadwiseCell:
    """The cell Newton iterates on: for ``slstm`` / ``slstm_exp`` the same cell with the
    stabiliser ``m_t = logaddexp(log f + m_{t-1}, i~)`` instead of ``max``; else ``cell``.

    Any ``(c, n, m)`` stands for the unstabilised ``(exp(m) c, exp(m) n)``, and both
    stabilisers only rescale it, so the two cells produce *identical* ``h`` from the same
    state. The max is piecewise linear: Newton must discover which branch is active at
    every step, one more stretch of the sequence per iteration (measured: 45 iterations to
    1e-12 at T = 1024 vs 11 for the smooth twin, whose ``f' + i' = 1`` also keeps ``n`` in
    ``(0, 1]``). The final state is converted back afterwards
    (:func:`_max_stabilised_final`), so every method returns the paper's state.
    """
    if cell.name not in SLSTM_LOG_FORGET or CELLS.get(cell.name) is not cell:
        return cell
    return cell._replace(update=functools.partial(_slstm_update, SLSTM_LOG_FORGET[cell.name], jnp.logaddexp))


def _max_stabilised_final(
    log_forget: Callable,
    gx: Float[Array, "batch time gates heads dh"],
    R: Float[Array, "rgates heads dh dh"],
    bias: Float[Array, "rgates heads dh"],
    h: Float[Array, "batch time heads dh"],
    state0: tuple,
    final: tuple,
    cut: Bool[Array, "batch time"] | None,
) -> tuple:
    """sLSTM's final ``(h, c, n, m)`` with the paper's ``m_T`` from any other stabiliser's.

    With the gates known (they depend on ``h_{t-1}`` only), ``m_t = max(log f_t + m_{t-1},
    i~_t)`` has the closed form ``m_T = F_T + max(m_start, max_{j in seg} (i~_j - F_j))``
    over the last document ``seg`` (``F_j`` the sum of ``log f`` over ``seg`` up to ``j``,
    ``m_start`` = ``m0``, or 0 after a cut); then ``(c, n) *= exp(m_other - m_T)``.
    """
    h_prev = jnp.concatenate([state0[0][:, None], h[:, :-1]], axis=1)
    time = gx.shape[1]
    if cut is None:
        in_last = jnp.ones(gx.shape[:2], bool)
        m_start = state0[3]
    else:
        start = jnp.max(jnp.where(cut, jnp.arange(time), 0), axis=1)  # the last document's start
        in_last = jnp.arange(time)[None] >= start[:, None]
        m_start = jnp.where(jnp.any(cut, axis=1)[:, None, None], jnp.zeros((), h.dtype), state0[3])
        h_prev = jnp.where(cut[..., None, None], jnp.zeros((), h.dtype), h_prev)
    pre = gx[:, :, :2] + jnp.einsum("bthi,ghij->btghj", h_prev, R[:2]) + bias[:2]
    i_pre, log_f = pre[:, :, 0], log_forget(pre[:, :, 1])
    mask = in_last[..., None, None]
    F = jnp.cumsum(jnp.where(mask, log_f, 0.0), axis=1)
    m_T = F[:, -1] + jnp.maximum(m_start, jnp.max(jnp.where(mask, i_pre - F, -jnp.inf), axis=1))
    h_T, c_T, n_T, m_other = final
    scale = jnp.exp(m_other - m_T)
    return h_T, c_T * scale, n_T * scale, m_T


def _kernel_options(block_sizes: RNNBlockSizes | None, platform: str) -> dict:
    """Keyword arguments of the kernels for ``platform`` (``"cpu"``: the interpreter)."""
    return dict(
        block_sizes=_dispatch.block_sizes_for("nonlinear_rnn", block_sizes, platform),
        interpret=platform == "cpu",
        platform=platform,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _pallas(gx, R, bias, state0, keep, cell: str, block_sizes, platform: str):
    h, final, _ = kernels.rnn_forward(
        gx, R, bias, state0, keep, cell=cell, save_states=False,
        **_kernel_options(block_sizes, platform),
    )
    return h, final


def _pallas_fwd(gx, R, bias, state0, keep, cell, block_sizes, platform):
    h, final, states = kernels.rnn_forward(
        gx, R, bias, state0, keep, cell=cell, **_kernel_options(block_sizes, platform)
    )
    return (h, final), (gx, R, bias, state0, keep, states)


def _pallas_bwd(cell, block_sizes, platform, residuals, cotangents):
    """The kernel's reverse-time loop over the states stored by the forward."""
    gx, R, bias, state0, keep, states = residuals
    dh, dfinal = cotangents
    grads = kernels.rnn_backward(
        gx, R, bias, state0, keep, states, dh, dfinal, cell=cell,
        **_kernel_options(block_sizes, platform),
    )
    return (*grads, None)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def _run_pallas(
    cell: HeadwiseCell,
    block_sizes: RNNBlockSizes | None,
    gx: Float[Array, "batch time gates heads dh"],
    R: Float[Array, "rgates heads dh dh"],
    bias: Float[Array, "rgates heads dh"],
    state: tuple,
    cut: Bool[Array, "batch time"] | None,
) -> tuple[Float[Array, "batch time heads dh"], tuple]:
    """The kernel wherever the program is lowered (see :func:`ssmjax.scan._dispatch.dispatch`)."""
    keep = None if cut is None else ~cut

    def branch(method: str, platform: str):
        def run(gx, R, bias, state0, keep):
            return _pallas(gx, R, bias, state0, keep, cell.name, block_sizes, platform)

        return run

    choice = _dispatch.plan("nonlinear_rnn", "pallas", _dispatch.case(gx.dtype))
    h, final = _dispatch.dispatch(choice, branch, gx, R, bias, jnp.stack(state, axis=1), keep)
    return h, tuple(final[:, k] for k in range(final.shape[1]))


# ----------------------------------------------------------------------------- public API
def _check_weights(cell: HeadwiseCell, gx: Array, R: Array, bias: Array | None):
    check_ndim("gx", gx, 5, "[batch, time, gates, heads, dh]")
    _, _, gates, heads, dh = gx.shape
    if gates != cell.gates:
        raise ValueError(
            f"gx: expected shape [batch, time, gates, heads, dh] with gates = {cell.gates} "
            f"for cell {cell.name!r}, got {tuple(gx.shape)}"
        )
    check_ndim("R", R, 4, "[rgates, heads, dh, dh]")
    rgates = R.shape[0]
    ok = rgates % gates == 0 and rgates > 0 if cell.layered else rgates == gates
    if not ok or R.shape[1:] != (heads, dh, dh):
        what = f"a positive multiple of {gates}" if cell.layered else f"{gates}"
        raise ValueError(
            f"R: expected shape [rgates, heads, dh, dh] with rgates {what}, heads = {heads}, "
            f"dh = {dh} (from gx), got {tuple(R.shape)}"
        )
    if bias is not None:
        check_shape("bias", bias, (rgates, heads, dh), "[rgates, heads, dh]")


def _check_state(cell: HeadwiseCell, initial_state, batch: int, heads: int, dh: int) -> tuple:
    names = cell.state_names
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != len(names):
        raise ValueError(
            f"initial_state: expected a tuple of {len(names)} arrays {names} of shape "
            f"[batch, heads, dh] for cell {cell.name!r}, got {type(initial_state).__name__}"
        )
    state = tuple(jnp.asarray(s) for s in initial_state)
    for name, s in zip(names, state):
        check_real_floating(f"initial_state.{name}", s)
        check_shape(f"initial_state.{name}", s, (batch, heads, dh), "[batch, heads, dh]")
    return state


def nonlinear_rnn(
    cell: str | HeadwiseCell,
    gx: ArrayLike,
    R: ArrayLike,
    bias: ArrayLike | None = None,
    initial_state: tuple | None = None,
    *,
    method: str = "sequential",
    jacobian: str = "block",
    max_iters: int = 100,
    tol: float | None = None,
    segment_ids: ArrayLike | None = None,
    reset: ArrayLike | None = None,
    reverse: bool = False,
    return_info: bool = False,
    block_sizes: RNNBlockSizes | None = None,
):
    """Run a head-wise non-linear RNN over a sequence (see the module docstring).

    Args:
      cell: ``"elman"``, ``"lstm"``, ``"gru"``, ``"slstm"``, ``"slstm_exp"``, ``"rhn"`` or
        a :class:`HeadwiseCell`.
      gx: input pre-activations ``[batch, time, gates, heads, dh]`` (any real dtype, e.g.
        bfloat16; the state accumulates in at least float32).
      R: recurrent blocks ``[rgates, heads, dh, dh]`` (``r_g = h R_g``).
      bias: recurrent-side bias ``[rgates, heads, dh]``; zeros if ``None``.
      initial_state: tuple of ``[batch, heads, dh]`` in the order of the cell's
        ``state_names`` (``(h,)``, ``(h, c)``, ``(h, c, n, m)``, ``(s,)``); zeros if ``None``.
      method: ``"sequential"``, ``"newton"`` or ``"pallas"``.
      jacobian: Newton only: ``"block"`` (exact), ``"diagonal"`` (quasi-Newton) or
        ``"dense"``.
      max_iters: Newton only: iteration cap (then the sequential fallback).
      tol: Newton only: residual tolerance (``None``: 1e-12 in float64, 1e-5 in float32).
      segment_ids: ``[batch, time]`` ints; the state restarts where the id changes.
      reset: ``[batch, time]`` bool; ``True`` starts a new document (``reset[:, 0]`` drops
        ``initial_state``). At most one of the two.
      reverse: run from ``t = T - 1`` down to ``0``.
      return_info: also return an :class:`RNNInfo` (Newton iterations and residual).
      block_sizes: ``"pallas"`` only: the kernels' tiling (:class:`RNNBlockSizes`);
        ``None``: the per-target default.

    Returns:
      ``(outputs [batch, time, heads, dh], final_state)`` (``, info`` if ``return_info``):
      ``outputs`` are ``h_t`` in the promoted dtype of ``gx, R, bias``; ``final_state`` is
      the state after the last step (``t = 0`` if ``reverse``) in the accumulation dtype.
    """
    _dispatch.check_method("nonlinear_rnn", method)
    _dispatch.check_block_sizes("nonlinear_rnn", block_sizes, RNNBlockSizes)
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian: expected one of {JACOBIANS}, got {jacobian!r}")
    cell = get_cell(cell)
    gx, R = jnp.asarray(gx), jnp.asarray(R)
    bias = None if bias is None else jnp.asarray(bias)
    for name, x in (("gx", gx), ("R", R), ("bias", bias)):
        if x is not None:
            check_real_floating(name, x)
    _check_weights(cell, gx, R, bias)
    batch, time, _, heads, dh = gx.shape
    out_dtype = jnp.result_type(gx.dtype, R.dtype, *(() if bias is None else (bias.dtype,)))
    if bias is None:
        bias = jnp.zeros(R.shape[:2] + (dh,), R.dtype)
    if initial_state is None:
        dtype = state_dtype(out_dtype)
        state = tuple(jnp.zeros((batch, heads, dh), dtype) for _ in cell.state_names)
    else:
        state = _check_state(cell, initial_state, batch, heads, dh)
        dtype = state_dtype(out_dtype, *(s.dtype for s in state))
        state = tuple(s.astype(dtype) for s in state)
    if method == "pallas":
        if cell.name not in kernels.CELLS or CELLS.get(cell.name) is not cell:
            raise ValueError(f"method: 'pallas' has kernels for the cells {kernels.CELLS}, got {cell.name!r}")
        _dispatch.check_pallas("nonlinear_rnn", _dispatch.case(out_dtype), "gx, R, bias")
    cut = carry_cut_mask(
        None if segment_ids is None else jnp.asarray(segment_ids),
        None if reset is None else jnp.asarray(reset),
        batch, time, reverse,
    )
    if reverse:
        gx, cut = flip_time(gx), None if cut is None else flip_time(cut)
    info = RNNInfo(jnp.int32(0), jnp.zeros((), dtype), jnp.bool_(True))
    if time == 0:
        h = jnp.zeros((batch, 0, heads, dh), dtype)
    elif method == "sequential":
        h, state = _sequential(cell, gx, R.astype(dtype), bias.astype(dtype), state, cut)
    elif method == "newton":
        h, state, info = _newton(cell, gx, R.astype(dtype), bias.astype(dtype), state, cut, jacobian,
                                 max_iters, tol)
    else:
        h, state = _run_pallas(cell, block_sizes, gx, R, bias, state, cut)
    h = (flip_time(h) if reverse else h).astype(out_dtype)
    return (h, state, info) if return_info else (h, state)


def init_state(cell: str | HeadwiseCell, batch: int, heads: int, dh: int, dtype=jnp.float32) -> tuple:
    """The zero state of ``cell``: a tuple of ``[batch, heads, dh]`` zeros."""
    return tuple(jnp.zeros((batch, heads, dh), state_dtype(dtype)) for _ in get_cell(cell).state_names)
