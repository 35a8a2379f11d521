"""Head-wise non-linear RNNs (ssmjax.scan.rnn) against float64 numpy loops of the papers'
equations, and the Newton method (DEER / ParaRNN) against the sequential scan.

The oracles below are written from the papers with *dense* block-diagonal recurrent
matrices (``scipy``-style ``block_diag`` of the head blocks), one numpy step at a time,
independently of ``ssmjax.scan.rnn``: Elman (1990), LSTM with forget gate (Hochreiter &
Schmidhuber 1997; Gers et al. 2000), GRU in the PyTorch/cuDNN form (Cho et al. 2014),
sLSTM (Beck et al. 2024, xLSTM section 2.2, with and without its stabiliser state) and
the Recurrent Highway Network (Zilly et al. 2017, coupled carry gate).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.scan.rnn import CELLS, RNNInfo, init_state, nonlinear_rnn

B, T, H, DH = 2, 11, 2, 3
RHN_DEPTH = 3


# ----------------------------------------------------------------------------- oracles
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def dense_blocks(R):
    """``[G, H, dh, dh]`` head blocks -> ``[G, H dh, H dh]`` block-diagonal matrices."""
    G, heads, dh, _ = R.shape
    W = np.zeros((G, heads * dh, heads * dh))
    for g in range(G):
        for k in range(heads):
            W[g, k * dh : (k + 1) * dh, k * dh : (k + 1) * dh] = R[g, k]
    return W


def oracle(cell, gx, R, bias, state0, cut=None, stabilised=True):
    """The cell's equations over ``[batch, time]`` with dense matrices; ``h_{t-1}`` (and
    every other state part) is zero where ``cut``. Returns ``(h [b, t, H, dh], final)``."""
    gx, R, bias = (np.asarray(a, np.float64) for a in (gx, R, bias))
    b, time, G, heads, dh = gx.shape
    d = heads * dh
    W, bias = dense_blocks(R), bias.reshape(bias.shape[0], d)
    x = gx.reshape(b, time, G, d)
    state = [np.asarray(s, np.float64).reshape(b, d) for s in state0]
    outs = np.zeros((b, time, d))
    for t in range(time):
        if cut is not None:
            state = [np.where(np.asarray(cut)[:, t, None], 0.0, s) for s in state]
        rec = lambda h, g: h @ W[g] + bias[g]  # noqa: E731
        if cell == "elman":
            state = [np.tanh(x[:, t, 0] + rec(state[0], 0))]
        elif cell == "lstm":
            h, c = state
            i, f, z, o = (x[:, t, g] + rec(h, g) for g in range(4))
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(z)
            state = [sigmoid(o) * np.tanh(c), c]
        elif cell == "gru":
            (h,) = state
            r = sigmoid(x[:, t, 0] + rec(h, 0))
            z = sigmoid(x[:, t, 1] + rec(h, 1))
            n = np.tanh(x[:, t, 2] + r * rec(h, 2))
            state = [(1 - z) * n + z * h]
        elif cell in ("slstm", "slstm_exp"):
            h, c, n, m = state
            i_pre, f_pre, z_pre, o_pre = (x[:, t, g] + rec(h, g) for g in range(4))
            log_f = np.log(sigmoid(f_pre)) if cell == "slstm" else f_pre
            if stabilised:  # m_t = max(log f_t + m_{t-1}, log i_t)
                m_new = np.maximum(log_f + m, i_pre)
                i, f = np.exp(i_pre - m_new), np.exp(log_f + m - m_new)
            else:  # i = exp(i~), f = sigma(f~) or exp(f~); m unused
                m_new, i, f = m, np.exp(i_pre), np.exp(log_f)
            c = f * c + i * np.tanh(z_pre)
            n = f * n + i
            state = [sigmoid(o_pre) * c / n, c, n, m_new]
        elif cell == "rhn":
            (s,) = state
            for layer in range(W.shape[0] // 2):
                pre_h, pre_t = rec(s, 2 * layer), rec(s, 2 * layer + 1)
                if layer == 0:
                    pre_h, pre_t = pre_h + x[:, t, 0], pre_t + x[:, t, 1]
                t_gate = sigmoid(pre_t)
                s = np.tanh(pre_h) * t_gate + s * (1 - t_gate)  # carry gate c = 1 - t
            state = [s]
        outs[:, t] = state[0]
    return outs.reshape(b, time, heads, dh), tuple(s.reshape(b, heads, dh) for s in state)


# ----------------------------------------------------------------------------- data
def rgates(cell):
    return CELLS[cell].gates * (RHN_DEPTH if cell == "rhn" else 1)


def make_inputs(cell, seed=0, batch=B, time=T, heads=H, dh=DH, scale=1.0, dtype=jnp.float64):
    """Random ``gx``, head blocks ``R ~ scale N(0, 1/dh)``, bias and a random initial state
    (sLSTM: ``n > 0``, any ``m``)."""
    rng = np.random.default_rng(seed)
    G, Gr = CELLS[cell].gates, rgates(cell)
    gx = rng.standard_normal((batch, time, G, heads, dh))
    R = scale * rng.standard_normal((Gr, heads, dh, dh)) / np.sqrt(dh)
    bias = 0.1 * rng.standard_normal((Gr, heads, dh))
    state = [0.5 * rng.standard_normal((batch, heads, dh)) for _ in CELLS[cell].state_names]
    if cell.startswith("slstm"):
        state[2] = np.abs(state[2]) + 0.5
    return tuple(jnp.asarray(a, dtype) for a in (gx, R, bias)) + (tuple(jnp.asarray(s, dtype) for s in state),)


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol)


def assert_trees_close(actual, expected, tol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert_close(a, e, tol)


@functools.partial(jax.jit, static_argnames=("cell", "method", "jacobian", "reverse", "tol"))
def run(gx, R, bias, state, segment_ids=None, reset=None, *, cell, method="sequential", jacobian="block",
        reverse=False, tol=None):
    return nonlinear_rnn(cell, gx, R, bias, state, method=method, jacobian=jacobian, segment_ids=segment_ids,
                         reset=reset, reverse=reverse, tol=tol, return_info=True)


# ----------------------------------------------------------------------------- sequential
@pytest.mark.parametrize("cell", list(CELLS))
def test_sequential_matches_paper_equations(cell):
    gx, R, bias, state = make_inputs(cell)
    h, final, info = run(gx, R, bias, state, cell=cell)
    ref_h, ref_final = oracle(cell, gx, R, bias, state)
    assert h.shape == (B, T, H, DH) and len(final) == len(CELLS[cell].state_names)
    assert_close(h, ref_h, 1e-12)
    assert_trees_close(final, ref_final, 1e-12)
    assert int(info.iterations) == 0 and bool(info.converged)


@pytest.mark.parametrize("cell", ["slstm", "slstm_exp"])
def test_slstm_stabiliser_is_exact(cell):
    """The stabilised sLSTM == the unstabilised equations (float64, no overflow): same
    ``h``, and ``(c, n)`` rescaled by ``exp(m)``; input-gate pre-activations up to ~+-12."""
    gx, R, bias, state = make_inputs(cell, seed=1)
    gx = gx.at[:, :, 0].multiply(4.0)
    h, final, _ = run(gx, R, bias, state, cell=cell)
    h0, c0, n0, m0 = state
    unstabilised_start = (h0, c0 * jnp.exp(m0), n0 * jnp.exp(m0), m0)
    ref_h, (_, c_u, n_u, _) = oracle(cell, gx, R, bias, unstabilised_start, stabilised=False)
    assert_close(h, ref_h, 1e-11)
    _, c, n, m = final
    assert_close(c * jnp.exp(m), c_u, 1e-10)
    assert_close(n * jnp.exp(m), n_u, 1e-10)


def test_zero_initial_state_default_and_init_state():
    gx, R, bias, _ = make_inputs("lstm", seed=2)
    zero = init_state("lstm", B, H, DH, jnp.float64)
    assert len(zero) == 2 and zero[0].shape == (B, H, DH) and zero[0].dtype == jnp.float64
    h, final = nonlinear_rnn("lstm", gx, R, bias)
    ref_h, ref_final = oracle("lstm", gx, R, bias, zero)
    assert_close(h, ref_h, 1e-12)
    assert_trees_close(final, ref_final, 1e-12)
    h_nobias, _ = nonlinear_rnn("lstm", gx, R)
    assert_close(h_nobias, oracle("lstm", gx, R, jnp.zeros_like(bias), zero)[0], 1e-12)


# ----------------------------------------------------------------------------- Newton
@pytest.mark.parametrize("cell", ["lstm", "gru", "slstm"])
def test_newton_matches_sequential_at_t1024(cell):
    """Newton over T = 1024 == the sequential scan to 1e-6 (measured ~1e-14); exact
    (block-Jacobian) Newton needs far fewer iterations than quasi-Newton (diagonal)."""
    gx, R, bias, state = make_inputs(cell, seed=3, time=1024, dh=4)
    h, final, _ = run(gx, R, bias, state, cell=cell)
    counts = {}
    for jacobian in ("block", "diagonal"):
        h_n, final_n, info = run(gx, R, bias, state, cell=cell, method="newton", jacobian=jacobian)
        assert bool(info.converged), (cell, jacobian, info)
        assert float(info.residual) < 1e-12
        assert_close(h_n, h, 1e-6)
        assert_trees_close(final_n, final, 1e-6)
        assert float(jnp.max(jnp.abs(h_n - h))) < 1e-10
        counts[jacobian] = int(info.iterations)
    print(f"{cell} T=1024: Newton iterations to 1e-12: {counts}")
    assert counts["block"] <= 15 and counts["diagonal"] > counts["block"]


@pytest.mark.parametrize("cell, jacobians", [("elman", ("block", "dense")),
                                             pytest.param("slstm_exp", ("block",), marks=pytest.mark.slow),
                                             ("rhn", ("block",))])
def test_newton_other_cells(cell, jacobians):
    gx, R, bias, state = make_inputs(cell, seed=4, time=64)
    h, final, _ = run(gx, R, bias, state, cell=cell)
    for jacobian in jacobians:
        h_n, final_n, info = run(gx, R, bias, state, cell=cell, method="newton", jacobian=jacobian)
        assert bool(info.converged)
        assert_close(h_n, h, 1e-10)
        assert_trees_close(final_n, final, 1e-10)


def vjp_of(fn, args, cotangents):
    def both(args):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(cotangents)

    return jax.jit(both)(args)


def random_cotangents(cell, seed, batch, time):
    rng = np.random.default_rng(seed)
    dh = jnp.asarray(rng.standard_normal((batch, time, H, DH)))
    dfinal = tuple(jnp.asarray(rng.standard_normal((batch, H, DH))) for _ in CELLS[cell].state_names)
    return dh, dfinal


@pytest.mark.parametrize("cell, jacobian", [("lstm", "block"), ("slstm", "block"),
                                            pytest.param("lstm", "diagonal", marks=pytest.mark.slow)])
def test_newton_implicit_gradients_match_sequential(cell, jacobian):
    """Gradients w.r.t. gx, R, bias and every initial-state part: the implicit backward
    (one reverse scan with the exact block Jacobians) == autodiff of the sequential scan."""
    time = 48
    gx, R, bias, state = make_inputs(cell, seed=5, time=time)
    cotangents = random_cotangents(cell, 6, B, time)

    def solve(method):
        return lambda *a: nonlinear_rnn(cell, *a, method=method, jacobian=jacobian)

    out, grads = vjp_of(solve("newton"), (gx, R, bias, state), cotangents)
    out_ref, grads_ref = vjp_of(solve("sequential"), (gx, R, bias, state), cotangents)
    assert_trees_close(out, out_ref, 1e-10)
    assert_trees_close(grads, grads_ref, 1e-9)


# ----------------------------------------------------------------------------- packing
def packed_ids(time):
    ids = np.zeros((B, time), np.int32)
    ids[0, 4:] = 1
    ids[0, 9:] = 2
    ids[1, 6:] = 5
    return jnp.asarray(ids)


@pytest.mark.parametrize("cell, method", [("lstm", "sequential"), ("slstm", "newton")])
def test_packed_sequences_restart_state(cell, method):
    """Every document of a packed row == the oracle run on it alone, from the initial state
    (first document) or from zero (the others); ``reset`` drops the initial state too."""
    gx, R, bias, state = make_inputs(cell, seed=7)
    ids = packed_ids(T)
    h, final, _ = run(gx, R, bias, state, ids, cell=cell, method=method)
    for row in range(B):
        bounds = np.flatnonzero(np.diff(np.asarray(ids[row]), prepend=-1, append=-1))
        for doc, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            start = tuple(p[row : row + 1] for p in state) if doc == 0 else tuple(
                jnp.zeros((1, H, DH)) for _ in state)
            ref_h, ref_final = oracle(cell, gx[row : row + 1, s:e], R, bias, start)
            assert_close(h[row, s:e], ref_h[0], 1e-10)
        assert_trees_close(tuple(p[row] for p in final), tuple(p[0] for p in ref_final), 1e-10)
    reset = jnp.diff(ids, axis=1, prepend=-1) != 0
    h_reset, _, _ = run(gx, R, bias, state, None, reset, cell=cell, method=method)
    zero = tuple(jnp.zeros_like(p) for p in state)
    assert_close(h_reset, run(gx, R, bias, zero, ids, cell=cell, method=method)[0], 1e-10)


def test_packed_gradients_newton():
    cell, time = "gru", 24
    gx, R, bias, state = make_inputs(cell, seed=8, time=time)
    ids = packed_ids(time)
    cotangents = random_cotangents(cell, 9, B, time)

    def solve(method):
        return lambda *a: nonlinear_rnn(cell, *a, method=method, segment_ids=ids)

    _, grads = vjp_of(solve("newton"), (gx, R, bias, state), cotangents)
    _, grads_ref = vjp_of(solve("sequential"), (gx, R, bias, state), cotangents)
    assert_trees_close(grads, grads_ref, 1e-9)


# ----------------------------------------------------------------------------- reverse, split
@pytest.mark.parametrize("method", ["sequential", "newton"])
def test_reverse_is_the_forward_run_on_flipped_time(method):
    """``reverse=True`` (packed) == the forward scan of the time-flipped inputs."""
    gx, R, bias, state = make_inputs("gru", seed=10)
    ids = packed_ids(T)
    h, final, _ = run(gx, R, bias, state, ids, cell="gru", method=method, reverse=True)
    h_f, final_f, _ = run(jnp.flip(gx, 1), R, bias, state, jnp.flip(ids, 1), cell="gru", method="sequential")
    assert_close(h, jnp.flip(h_f, 1), 1e-10)
    assert_trees_close(final, final_f, 1e-10)


@pytest.mark.parametrize("cell, method", [("lstm", "sequential"), ("slstm", "newton")])
def test_split_sequence_with_carried_state(cell, method):
    gx, R, bias, state = make_inputs(cell, seed=11, time=10)
    h, final, _ = run(gx, R, bias, state, cell=cell, method=method)
    h1, mid, _ = run(gx[:, :5], R, bias, state, cell=cell, method=method)  # both halves: one compilation
    h2, last, _ = run(gx[:, 5:], R, bias, mid, cell=cell, method=method)
    assert_close(jnp.concatenate([h1, h2], 1), h, 1e-10)
    assert_trees_close(last, final, 1e-10)


# ----------------------------------------------------------------------------- precision
def test_bfloat16_inputs_accumulate_in_float32():
    """bf16 pre-activations and weights: bf16 outputs, float32 state; the final state
    matches the float64 oracle on the same bf16 values to float32 accuracy (measured
    ~1e-7; asserted < 1e-5), the outputs to one bf16 rounding."""
    gx, R, bias, _ = make_inputs("lstm", seed=12, dtype=jnp.bfloat16)
    h, final = jax.jit(lambda *a: nonlinear_rnn("lstm", *a))(gx, R, bias)
    assert h.dtype == jnp.bfloat16 and all(s.dtype == jnp.float32 for s in final)
    ref_h, ref_final = oracle("lstm", *(a.astype(jnp.float32) for a in (gx, R, bias)),
                              init_state("lstm", B, H, DH, jnp.float64))
    assert_trees_close(final, ref_final, 1e-5)
    assert float(np.max(np.abs(np.asarray(h, np.float64) - ref_h))) < 2**-8


def test_float32_newton_meets_its_tolerance():
    gx, R, bias, state = make_inputs("lstm", seed=13, time=256, dtype=jnp.float32)
    h, _, _ = run(gx, R, bias, state, cell="lstm")
    h_n, _, info = run(gx, R, bias, state, cell="lstm", method="newton")
    assert bool(info.converged) and h_n.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(h_n - h))) < 1e-5


# ----------------------------------------------------------------------------- transforms
def test_jit_vmap_grad():
    gx, R, bias, state = make_inputs("elman", seed=14, time=8)
    f = lambda gx: nonlinear_rnn("elman", gx, R, bias, method="newton")[0].sum()  # noqa: E731
    per_example = jax.jit(jax.vmap(jax.grad(f)))(gx[:, None])
    ref = jax.jit(jax.vmap(jax.grad(lambda gx: nonlinear_rnn("elman", gx, R, bias)[0].sum())))(gx[:, None])
    assert_close(per_example, ref, 1e-10)
    info = run(gx, R, bias, state, cell="elman", method="newton")[2]
    assert isinstance(info, RNNInfo) and int(info.iterations) >= 1


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cell="tanh"), "cell"),
        (dict(method="parallel"), "method"),
        (dict(jacobian="sparse"), "jacobian"),
        (dict(gx=jnp.zeros((B, T, 3, H, DH))), "gx"),
        (dict(gx=jnp.zeros((B, T, 4, H))), "gx"),
        (dict(R=jnp.zeros((4, H, DH, DH + 1))), "R"),
        (dict(R=jnp.zeros((4, H + 1, DH, DH))), "R"),
        (dict(bias=jnp.zeros((4, H, DH + 1))), "bias"),
        (dict(initial_state=(jnp.zeros((B, H, DH)),)), "initial_state"),
        (dict(initial_state=(jnp.zeros((B, H, DH)), jnp.zeros((B + 1, H, DH)))), "initial_state.c"),
        (dict(segment_ids=jnp.zeros((B, T - 1), jnp.int32)), "segment_ids"),
        (dict(gx=jnp.zeros((B, T, 4, H, DH), jnp.int32)), "gx"),
    ],
)
def test_bad_arguments_raise(change, match):
    gx, R, bias, state = make_inputs("lstm")
    kwargs = dict(cell="lstm", gx=gx, R=R, bias=bias, initial_state=state) | change
    with pytest.raises(ValueError, match=match):
        nonlinear_rnn(**kwargs)


def test_rhn_depth_must_be_a_multiple_and_pallas_has_no_rhn_kernel():
    gx, R, bias, state = make_inputs("rhn")
    with pytest.raises(ValueError, match="R: .*multiple of 2"):
        nonlinear_rnn("rhn", gx, R[:3], bias[:3], state)
    with pytest.raises(ValueError, match="method: 'pallas'"):
        nonlinear_rnn("rhn", gx, R, bias, state, method="pallas")
