"""Newton (DEER / ParaRNN / quasi-DEER) solves of non-linear recurrences vs a sequential oracle.

The oracle is the definition ``h_t = cell(h_{t-1}, x_t)`` (``h_{t-1} := 0`` at a document
boundary) as a ``lax.scan``, written here independently of ``ssmjax.scan.newton``, and
differentiated by ordinary autodiff. Everything runs in float64 unless a test says otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ssmjax.scan.newton import (
    NewtonResult,
    _diagonal_blocks,
    _probe_jacobian,
    newton_recurrence,
)

D_IN = 4  # input features


# ----------------------------------------------------------------------------- cells
def elman_cell(p, h, x):
    """Elman: ``h' = tanh(W x + U h + c)``."""
    return jnp.tanh(p["W"] @ x + p["U"] @ h + p["c"])


def gru_cell(p, h, x):
    """GRU (Cho et al. 2014): update ``z``, reset ``r``, candidate ``tanh(W x + r * (U h))``."""
    n = h.shape[0]
    gx, gh = p["W"] @ x + p["c"], p["U"] @ h
    z = jax.nn.sigmoid(gx[:n] + gh[:n])
    r = jax.nn.sigmoid(gx[n : 2 * n] + gh[n : 2 * n])
    candidate = jnp.tanh(gx[2 * n :] + r * gh[2 * n :])
    return (1 - z) * h + z * candidate


def lstm_cell(p, state, x):
    """LSTM (Hochreiter & Schmidhuber 1997); the state is ``concat(h, c)``."""
    m = state.shape[0] // 2
    h, c = state[:m], state[m:]
    gates = p["W"] @ x + p["U"] @ h + p["c"]
    i, f, o = (jax.nn.sigmoid(gates[k * m : (k + 1) * m]) for k in range(3))
    g = jnp.tanh(gates[3 * m :])
    c = f * c + i * g
    return jnp.concatenate([o * jnp.tanh(c), c])


def diagonal_gru_cell(p, h, x):
    """ParaGRU-style GRU with elementwise (diagonal) recurrent weights: ``J_t`` is diagonal."""
    n = h.shape[0]
    gx = p["W"] @ x + p["c"]
    z = jax.nn.sigmoid(gx[:n] + p["u"][0] * h)
    r = jax.nn.sigmoid(gx[n : 2 * n] + p["u"][1] * h)
    candidate = jnp.tanh(gx[2 * n :] + p["u"][2] * (r * h))
    return (1 - z) * h + z * candidate


CELLS = {"elman": elman_cell, "gru": gru_cell, "lstm": lstm_cell}
GATES = {"elman": 1, "gru": 3, "lstm": 4}


def init_params(name, key, n, scale=1.0, block_size=None):
    """Recurrent weights ``~ scale / sqrt(fan_in)`` (block-diagonal if ``block_size``)."""
    fan = n // 2 if name == "lstm" else n
    rows = GATES[name] * fan
    k1, k2, k3 = jax.random.split(key, 3)
    u = jax.random.normal(k2, (rows, fan)) * scale / np.sqrt(block_size or fan)
    if block_size is not None:  # head-wise cell (ParaRNN): J_t is block-diagonal
        heads = np.arange(fan) // block_size
        u = u * jnp.asarray(np.tile(heads[:, None] == heads[None, :], (GATES[name], 1)))
    return {
        "W": jax.random.normal(k1, (rows, D_IN)) / np.sqrt(D_IN),
        "U": u,
        "c": 0.1 * jax.random.normal(k3, (rows,)),
    }


def init_diagonal_params(key, n):
    k1, k2 = jax.random.split(key)
    return {
        "W": jax.random.normal(k1, (3 * n, D_IN)) / np.sqrt(D_IN),
        "u": jax.random.normal(k2, (3, n)),
        "c": jnp.zeros(3 * n),
    }


def make_data(key, batch, time, n):
    kx, kh = jax.random.split(key)
    return jax.random.normal(kx, (batch, time, D_IN)), 0.5 * jax.random.normal(kh, (batch, n))


# ----------------------------------------------------------------------------- oracle
@functools.partial(jax.jit, static_argnums=0)
def oracle(cell, p, x, h0, cut=None):
    """``h_t = cell(h_{t-1}, x_t)`` one step at a time; ``h_{t-1} := 0`` where ``cut``."""
    batch, time = x.shape[:2]
    cut = jnp.zeros((batch, time), bool) if cut is None else cut

    def step(h, inputs):
        x_t, cut_t = inputs
        h = jnp.where(cut_t[:, None], 0.0, h)
        h = jax.vmap(cell, in_axes=(None, 0, 0))(p, h, x_t)
        return h, h

    _, hs = jax.lax.scan(step, h0, (jnp.swapaxes(x, 0, 1), cut.T))
    hs = jnp.swapaxes(hs, 0, 1)
    return hs, hs[:, -1]


def python_loop_oracle(cell, p, x, h):
    """One unbatched document ``x [time, d]`` from ``h``, one Python step at a time."""
    step = jax.jit(cell)
    states = []
    for x_t in x:
        h = step(p, h, x_t)
        states.append(h)
    return jnp.stack(states)


def newton_states(cell, p, x, h0, **kwargs):
    result = solve(cell, p, x, h0, **kwargs)
    return result.states, result.final_state


def solve(cell, p, x, h0, **kwargs):
    """``newton_recurrence`` under one ``jit`` (the tests are compile-bound, not compute-bound)."""
    return jax.jit(lambda p, x, h0: newton_recurrence(cell, p, x, h0, **kwargs))(p, x, h0)


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


def vjp_of(fn, args, cotangents):
    """``(fn(*args), vjp(cotangents))`` compiled as one ``jit``."""

    def both(args):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(cotangents)

    return jax.jit(both)(args)


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("name", ["elman", "gru", "lstm"])
@pytest.mark.parametrize("jacobian", ["dense", "block", "diagonal"])
def test_newton_matches_oracle(name, jacobian):
    n, batch, time = 8, 2, 256
    p = init_params(name, jax.random.PRNGKey(1), n)
    x, h0 = make_data(jax.random.PRNGKey(2), batch, time, n)
    # Any Jacobian approximation makes positions 0..k-1 exact after k iterations, so
    # max_iters = time always converges; quasi-Newton (block, diagonal) needs more than 50.
    block_size = 4 if jacobian == "block" else None
    result = solve(
        CELLS[name], p, x, h0, jacobian=jacobian, block_size=block_size, max_iters=time
    )
    states, final = oracle(CELLS[name], p, x, h0)
    assert isinstance(result, NewtonResult)
    assert bool(result.converged), (name, jacobian, result.iterations, result.residual)
    assert float(result.residual) < 1e-12
    assert result.states.shape == (batch, time, n) and result.final_state.shape == (batch, n)
    assert_close(result.states, states, 1e-11)
    assert_close(result.final_state, final, 1e-11)
    print(f"{name} {jacobian}: {int(result.iterations)} iterations to 1e-12")


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_dense_newton_converges_in_few_iterations(name):
    """Exact Newton converges quadratically: <= 5 iterations to 1e-6 from a zero guess."""
    n, batch, time = 16, 2, 256
    p = init_params(name, jax.random.PRNGKey(3), n)
    x, h0 = make_data(jax.random.PRNGKey(4), batch, time, n)
    counts = {}
    for jacobian in ("dense", "diagonal"):
        result = solve(CELLS[name], p, x, h0, jacobian=jacobian, tol=1e-6)
        assert bool(result.converged)
        counts[jacobian] = int(result.iterations)
    print(f"{name}: iterations to 1e-6: {counts}")
    assert counts["dense"] <= 5
    assert counts["diagonal"] > counts["dense"]  # quasi-Newton converges only linearly


def test_sequential_method_matches_oracle():
    n, batch, time = 8, 2, 64
    p = init_params("lstm", jax.random.PRNGKey(5), n)
    x, h0 = make_data(jax.random.PRNGKey(6), batch, time, n)
    result = solve(lstm_cell, p, x, h0, method="sequential")
    states, final = oracle(lstm_cell, p, x, h0)
    assert_close(result.states, states, 1e-14)
    assert_close(result.final_state, final, 1e-14)
    assert bool(result.converged) and int(result.iterations) == 0
    assert float(result.residual) < 1e-14


def test_newton_residual_is_the_true_residual():
    """``residual`` is max |h_t - cell(h_{t-1}, x_t)| of the returned iterate."""
    n, batch, time = 8, 2, 64
    p = init_params("gru", jax.random.PRNGKey(7), n)
    x, h0 = make_data(jax.random.PRNGKey(8), batch, time, n)
    result = solve(gru_cell, p, x, h0, max_iters=2, fallback=False)
    h_prev = jnp.concatenate([h0[:, None], result.states[:, :-1]], axis=1)
    f = jax.vmap(jax.vmap(gru_cell, (None, 0, 0)), (None, 0, 0))(p, h_prev, x)
    assert int(result.iterations) == 2 and not bool(result.converged)
    np.testing.assert_allclose(float(result.residual), float(jnp.max(jnp.abs(f - result.states))))


@pytest.mark.parametrize("structure", ["diagonal", "block"])
def test_structured_cells_use_cheap_exact_jacobians(structure):
    """``structure`` = the cell's true sparsity: exact Newton (same iterations as with the
    dense Jacobian) from ``block_size`` or 1 JVPs, and exact gradients from a block or
    diagonal adjoint scan."""
    n, batch, time = 16, 2, 128
    x, h0 = make_data(jax.random.PRNGKey(9), batch, time, n)
    if structure == "diagonal":
        cell, block_size = diagonal_gru_cell, None
        p = init_diagonal_params(jax.random.PRNGKey(10), n)
    else:
        cell, block_size = gru_cell, 4
        p = init_params("gru", jax.random.PRNGKey(11), n, block_size=block_size)
    kwargs = dict(structure=structure, block_size=block_size)
    result = solve(cell, p, x, h0, **kwargs)
    dense = solve(cell, p, x, h0, structure="dense")
    assert bool(result.converged) and bool(dense.converged)
    assert int(result.iterations) == int(dense.iterations)
    assert_close(result.states, dense.states, 1e-12)
    if structure == "block":  # quasi-Newton on a block cell: diagonal of its blocks
        quasi = solve(cell, p, x, h0, jacobian="diagonal", max_iters=time, **kwargs)
        assert bool(quasi.converged) and int(quasi.iterations) > int(result.iterations)
        assert_close(quasi.states, dense.states, 1e-11)

    key = jax.random.PRNGKey(12)
    cotangents = (
        jax.random.normal(key, (batch, time, n)),
        jax.random.normal(jax.random.fold_in(key, 1), (batch, n)),
    )
    newton = functools.partial(newton_states, cell, **kwargs)
    out, grads = vjp_of(newton, (p, x, h0), cotangents)
    out_ref, grads_ref = vjp_of(functools.partial(oracle, cell), (p, x, h0), cotangents)
    assert_close(out[0], out_ref[0], 1e-11)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-10), grads, grads_ref)


def test_probe_recovers_jacobian_blocks():
    """The comb-tangent probe equals the diagonal blocks of ``jacfwd`` for a block cell."""
    n = 12
    p = init_params("gru", jax.random.PRNGKey(13), n, block_size=3)
    h = jax.random.normal(jax.random.PRNGKey(14), (n,))
    x_t = jax.random.normal(jax.random.PRNGKey(15), (D_IN,))

    @jax.jit
    def jacobians(p, h, x_t):
        f = functools.partial(gru_cell, p, x=x_t)
        blocks = _probe_jacobian(f, h, 3)
        from_full = _diagonal_blocks(_probe_jacobian(f, h, n), 3)
        return jax.jacfwd(f)(h), blocks, from_full, _diagonal_blocks(blocks, 1)

    full, blocks, from_full, diagonal = jacobians(p, h, x_t)
    assert blocks.shape == (4, 3, 3) and diagonal.shape == (n, 1, 1)
    for i in range(4):
        assert_close(blocks[i], full[3 * i : 3 * i + 3, 3 * i : 3 * i + 3], 1e-14)
    assert_close(from_full, blocks, 1e-14)
    assert_close(diagonal[:, 0, 0], jnp.diagonal(full), 1e-14)
    assert_close(full, jax.scipy.linalg.block_diag(*blocks), 1e-14)  # the cell is block-diagonal


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "name, jacobian", [("elman", "dense"), ("gru", "dense"), ("lstm", "dense"), ("lstm", "diagonal")]
)
def test_implicit_gradients_match_oracle(name, jacobian):
    """IFT backward (exact dense J^T even with the diagonal forward) == autodiff of lax.scan."""
    n, batch, time = 8, 2, 64
    p = init_params(name, jax.random.PRNGKey(16), n)
    x, h0 = make_data(jax.random.PRNGKey(17), batch, time, n)
    key = jax.random.PRNGKey(18)
    cotangents = (
        jax.random.normal(key, (batch, time, n)),
        jax.random.normal(jax.random.fold_in(key, 1), (batch, n)),
    )
    newton = functools.partial(newton_states, CELLS[name], jacobian=jacobian)
    _, grads = vjp_of(newton, (p, x, h0), cotangents)
    _, grads_ref = vjp_of(functools.partial(oracle, CELLS[name]), (p, x, h0), cotangents)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-10), grads, grads_ref)
    _, grads_seq = vjp_of(
        functools.partial(newton_states, CELLS[name], method="sequential"), (p, x, h0), cotangents
    )
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-12), grads_seq, grads_ref)


def test_check_grads_tiny():
    """Finite differences on a tiny LSTM (reverse mode only: the solve has a custom VJP)."""
    n, batch, time = 4, 1, 5
    p = init_params("lstm", jax.random.PRNGKey(19), n)
    x, h0 = make_data(jax.random.PRNGKey(20), batch, time, n)

    def loss(p, x, h0):
        result = solve(lstm_cell, p, x, h0)
        return jnp.sum(jnp.sin(result.states)) + jnp.sum(result.final_state**2)

    check_grads(jax.jit(loss), (p, x, h0), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_closed_over_weights_get_gradients():
    """A cell closing over traced weights (no ``params``) differentiates like ``params``."""
    n, batch, time = 8, 2, 32
    p = init_params("gru", jax.random.PRNGKey(21), n)
    x, h0 = make_data(jax.random.PRNGKey(22), batch, time, n)

    def via_closure(p, x, h0):
        return newton_recurrence(lambda _, h, x_t: gru_cell(p, h, x_t), None, x, h0).states.sum()

    def via_params(p, x, h0):
        return newton_recurrence(gru_cell, p, x, h0).states.sum()

    g_closure = jax.jit(jax.grad(via_closure, argnums=(0, 1, 2)))(p, x, h0)
    g_params = jax.jit(jax.grad(via_params, argnums=(0, 1, 2)))(p, x, h0)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-12), g_closure, g_params)


def test_pytree_inputs():
    """``x`` may be a pytree; every leaf has leading [batch, time] and gets a gradient."""
    n, batch, time = 8, 2, 32
    p = init_params("elman", jax.random.PRNGKey(23), n)
    x, h0 = make_data(jax.random.PRNGKey(24), batch, time, n)
    gain = 1.0 + jax.random.uniform(jax.random.PRNGKey(25), (batch, time))

    def cell(p, h, inputs):
        return elman_cell(p, h, inputs["x"] * inputs["gain"])

    def loss(p, x, gain, method):
        out = newton_recurrence(cell, p, {"x": x, "gain": gain}, h0, method=method)
        return jnp.sum(out.states**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(p, x, gain, "newton")
    grads_ref = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(
        p, x, gain, "sequential"
    )
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-11), grads, grads_ref)


# ----------------------------------------------------------------------------- convergence
def strong_cell(p, h, x):
    """A strongly non-linear Elman cell (recurrent gain 3)."""
    return jnp.tanh(3.0 * (p["U"] @ h) + p["W"] @ x)


def test_non_convergence_is_reported_and_falls_back():
    n, batch, time = 8, 2, 64
    p = init_params("elman", jax.random.PRNGKey(26), n)
    x, h0 = make_data(jax.random.PRNGKey(27), batch, time, n)
    states, final = oracle(strong_cell, p, x, h0)

    result = solve(strong_cell, p, x, h0, max_iters=1)
    assert not bool(result.converged)
    assert int(result.iterations) == 1
    assert float(result.residual) > 1e-3
    assert_close(result.states, states, 1e-13)  # the exact sequential fallback
    assert_close(result.final_state, final, 1e-13)

    raw = solve(strong_cell, p, x, h0, max_iters=1, fallback=False)
    assert not bool(raw.converged)
    assert float(jnp.max(jnp.abs(raw.states - states))) > 1e-3  # the iterate is not the solution

    # Gradients of the fallback solution are still the exact implicit ones.
    cotangent = jax.random.normal(jax.random.PRNGKey(28), (batch, time, n))
    _, grads = vjp_of(
        lambda *a: newton_recurrence(strong_cell, *a, max_iters=1).states, (p, x, h0), cotangent
    )
    _, grads_ref = vjp_of(lambda *a: oracle(strong_cell, *a)[0], (p, x, h0), cotangent)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-9), grads, grads_ref)


def test_chaotic_cell_falls_back():
    """A chaotic cell (recurrent gain 6): 40 iterations cannot converge; the result is exact."""
    n, batch, time = 8, 1, 256
    p = init_params("elman", jax.random.PRNGKey(29), n, scale=6.0)
    x, h0 = make_data(jax.random.PRNGKey(30), batch, time, n)
    result = solve(elman_cell, p, x, h0, max_iters=40)
    states, _ = oracle(elman_cell, p, x, h0)
    assert not bool(result.converged) and int(result.iterations) == 40
    assert float(result.residual) > 1.0
    assert_close(result.states, states, 1e-13)


def test_non_finite_iterate_stops_at_once_and_falls_back():
    n, batch, time = 8, 2, 32
    p = init_params("gru", jax.random.PRNGKey(31), n)
    x, h0 = make_data(jax.random.PRNGKey(32), batch, time, n)
    guess = jnp.full((batch, time, n), jnp.nan)
    result = solve(gru_cell, p, x, h0, initial_guess=guess)
    assert not bool(result.converged) and int(result.iterations) == 0
    assert np.isnan(float(result.residual))
    assert_close(result.states, oracle(gru_cell, p, x, h0)[0], 1e-14)


def test_exact_initial_guess_needs_no_iteration():
    n, batch, time = 8, 2, 64
    p = init_params("gru", jax.random.PRNGKey(31), n)
    x, h0 = make_data(jax.random.PRNGKey(32), batch, time, n)
    states, _ = oracle(gru_cell, p, x, h0)
    result = solve(gru_cell, p, x, h0, initial_guess=states)
    assert int(result.iterations) == 0 and bool(result.converged)
    warm = solve(gru_cell, p, x, h0, initial_guess=states + 1e-3)
    cold = solve(gru_cell, p, x, h0)
    assert int(warm.iterations) < int(cold.iterations)


# ----------------------------------------------------------------------------- packed, split
def test_packed_sequences_equal_separate_runs():
    n, time = 8, 48
    p = init_params("lstm", jax.random.PRNGKey(33), n)
    x, h0 = make_data(jax.random.PRNGKey(34), 2, time, n)
    bounds = [[0, 10, 31, time], [0, 20, time]]
    segment_ids = np.zeros((2, time), np.int32)
    for row, b in enumerate(bounds):
        for doc, (s, e) in enumerate(zip(b[:-1], b[1:])):
            segment_ids[row, s:e] = doc
    segment_ids = jnp.asarray(segment_ids)

    packed = solve(lstm_cell, p, x, h0, segment_ids=segment_ids)
    reset = solve(lstm_cell, p, x, h0, reset=jnp.diff(segment_ids, prepend=-1) != 0)
    assert bool(packed.converged)
    for row, b in enumerate(bounds):
        for doc, (s, e) in enumerate(zip(b[:-1], b[1:])):
            start = h0[row] if doc == 0 else jnp.zeros(n)
            alone = python_loop_oracle(lstm_cell, p, x[row, s:e], start)
            assert_close(packed.states[row, s:e], alone, 1e-11)
            # reset[:, 0] also drops initial_state: every document starts from zero
            alone = python_loop_oracle(lstm_cell, p, x[row, s:e], jnp.zeros(n))
            assert_close(reset.states[row, s:e], alone, 1e-11)

    # Gradients with packing, incl. initial_state (which only the first document sees).
    cut = jnp.diff(segment_ids, prepend=segment_ids[:, :1]) != 0
    cotangents = (jax.random.normal(jax.random.PRNGKey(35), (2, time, n)), jnp.zeros((2, n)))
    _, grads = vjp_of(
        functools.partial(newton_states, lstm_cell, segment_ids=segment_ids), (p, x, h0), cotangents
    )
    _, grads_ref = vjp_of(
        lambda p, x, h0: oracle(lstm_cell, p, x, h0, cut), (p, x, h0), cotangents
    )
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-10), grads, grads_ref)


def test_split_sequence_with_carried_state():
    n, batch, time, split = 8, 2, 64, 32
    p = init_params("gru", jax.random.PRNGKey(36), n)
    x, h0 = make_data(jax.random.PRNGKey(37), batch, time, n)
    solve_jit = jax.jit(lambda p, x, h0: newton_recurrence(gru_cell, p, x, h0))
    whole = solve_jit(p, x, h0)
    first = solve_jit(p, x[:, :split], h0)  # the two halves share one compilation
    second = solve_jit(p, x[:, split:], first.final_state)
    assert_close(jnp.concatenate([first.states, second.states], axis=1), whole.states, 1e-12)
    assert_close(second.final_state, whole.final_state, 1e-12)


# ----------------------------------------------------------------------------- transforms
def test_jit_vmap_and_inner_scan_methods():
    n, batch, time = 8, 2, 64
    p = init_params("gru", jax.random.PRNGKey(38), n)
    xs, h0s = make_data(jax.random.PRNGKey(39), 3 * batch, time, n)
    xs, h0s = xs.reshape(3, batch, time, D_IN), h0s.reshape(3, batch, n)

    @jax.jit
    def solve_jit(p, x, h0):
        return newton_recurrence(gru_cell, p, x, h0)

    jitted = solve_jit(p, xs[0], h0s[0])
    assert bool(jitted.converged)
    assert_close(jitted.states, oracle(gru_cell, p, xs[0], h0s[0])[0], 1e-12)

    mapped = jax.vmap(solve_jit, in_axes=(None, 0, 0))(p, xs, h0s)
    assert mapped.states.shape == (3, batch, time, n) and mapped.iterations.shape == (3,)
    for i in range(3):
        assert_close(mapped.states[i], oracle(gru_cell, p, xs[i], h0s[i])[0], 1e-12)

    grad_jit = jax.jit(jax.grad(lambda p, x, h0: solve_jit(p, x, h0).states.sum(), argnums=(0, 2)))
    grad_ref = jax.grad(lambda p, x, h0: oracle(gru_cell, p, x, h0)[0].sum(), argnums=(0, 2))
    jax.tree.map(
        lambda a, b: assert_close(a, b, 1e-11),
        grad_jit(p, xs[0], h0s[0]),
        grad_ref(p, xs[0], h0s[0]),
    )

    other = solve(gru_cell, p, xs[0], h0s[0], scan_method="associative")
    assert_close(other.states, jitted.states, 1e-12)


def test_float32_error_vs_float64_oracle():
    """float32 end to end: the error is that of float32 sequential evaluation (both ~1e-6)."""
    n, batch, time = 16, 2, 256
    p64 = init_params("lstm", jax.random.PRNGKey(40), n)
    x64, h064 = make_data(jax.random.PRNGKey(41), batch, time, n)
    p32, x32, h032 = jax.tree.map(lambda a: a.astype(jnp.float32), (p64, x64, h064))
    ref = oracle(lstm_cell, p64, x64, h064)[0]
    scale = float(jnp.max(jnp.abs(ref)))
    errors = {}
    for jacobian in ("dense", "diagonal"):
        result = solve(lstm_cell, p32, x32, h032, jacobian=jacobian)
        assert result.states.dtype == jnp.float32
        assert bool(result.converged)  # default float32 tol 1e-5 is reachable
        errors[jacobian] = float(jnp.max(jnp.abs(result.states - ref))) / scale
    seq = solve(lstm_cell, p32, x32, h032, method="sequential").states
    errors["sequential"] = float(jnp.max(jnp.abs(seq - ref))) / scale
    print(f"float32 max relative error: {errors}")
    # Residual < 1e-5 bounds the error by 1e-5 times the (contractive, < ~3x here)
    # accumulation of the linearised recurrence; the sequential float32 run is ~1e-6.
    assert errors["sequential"] < 1e-5
    assert errors["dense"] < 3e-5 and errors["diagonal"] < 3e-5


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    p = init_params("gru", jax.random.PRNGKey(0), 8)
    x, h0 = make_data(jax.random.PRNGKey(1), 2, 16, 8)
    return p, x, h0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="parallel"), "method"),
        (dict(jacobian="sparse"), "jacobian"),
        (dict(structure="banded"), "structure"),
        (dict(jacobian="block"), "block_size"),
        (dict(jacobian="block", block_size=3), "block_size"),
        (dict(block_size=4), "block_size"),
        (dict(structure="diagonal", jacobian="dense"), "jacobian"),
        (dict(max_iters=0), "max_iters"),
        (dict(tol=0.0), "tol"),
        (dict(initial_guess=jnp.zeros((2, 16, 7))), "initial_guess"),
        (dict(segment_ids=jnp.zeros((2, 15), jnp.int32)), "segment_ids"),
    ],
)
def test_bad_options_raise(kwargs, match):
    p, x, h0 = _bad_cases()
    with pytest.raises(ValueError, match=match):
        newton_recurrence(gru_cell, p, x, h0, **kwargs)


def test_bad_shapes_raise():
    p, x, h0 = _bad_cases()
    with pytest.raises(ValueError, match="initial_state"):
        newton_recurrence(gru_cell, p, x, h0[0])
    with pytest.raises(ValueError, match="initial_state"):
        newton_recurrence(gru_cell, p, x, h0[:1])  # batch of x != batch of initial_state
    with pytest.raises(ValueError, match="initial_state"):
        newton_recurrence(gru_cell, p, x, jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="x"):
        newton_recurrence(gru_cell, p, x[:, 0], h0)
    with pytest.raises(ValueError, match="cell"):
        newton_recurrence(lambda p, h, x_t: gru_cell(p, h, x_t)[:4], p, x, h0)
    with pytest.raises(ValueError, match="cell"):
        newton_recurrence(lambda p, h, x_t: (h, h), p, x, h0)


# ----------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_long_sequence_matches_oracle(name):
    n, batch, time = 16, 2, 1024
    p = init_params(name, jax.random.PRNGKey(42), n)
    x, h0 = make_data(jax.random.PRNGKey(43), batch, time, n)
    result = solve(CELLS[name], p, x, h0)
    states, final = oracle(CELLS[name], p, x, h0)
    assert bool(result.converged)
    assert_close(result.states, states, 1e-11)
    assert_close(result.final_state, final, 1e-11)
    print(f"{name} T={time}: {int(result.iterations)} dense iterations to 1e-12")
