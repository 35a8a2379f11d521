"""pallas_kernels.rnn (interpret mode on CPU) against ssmjax.scan.rnn's sequential scan
(itself tested against the papers' equations in tests/scan/test_rnn.py): values, final
states and every gradient (through nonlinear_rnn(method="pallas"), whose custom VJP runs
the backward kernel), for the four cells.

Shapes exercise the tiling with tiny interpret-mode programs: batch 3 with block_b = 2
(two batch blocks, the last one padded), dh = 3 (padded to 4), T = 7. Most tests use
block_t = 1 (one step per loop iteration: the smallest program, so the interpret-mode
compilation stays short); T not a multiple of block_t (unrolled chunks plus a remainder)
is covered by the default block_t = 4 (forward and backward kernels) and block_t = 8 > T.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rnn import (
    CELLS,
    GATES,
    STATE_PARTS,
    BlockSizes,
    rnn_backward,
    rnn_forward,
)
from ssmjax.scan.rnn import nonlinear_rnn

Bt, T, H, DH = 3, 7, 2, 3
SMALL = BlockSizes(block_b=2, block_t=1)


def inputs(cell, seed=0, dtype=jnp.float64, batch=Bt, time=T):
    """gx, R ~ N(0, 1/dh), bias, a random state [batch, S, H, dh] (sLSTM: n > 0)."""
    rng = np.random.default_rng(seed)
    G, S = GATES[cell], STATE_PARTS[cell]
    gx = rng.standard_normal((batch, time, G, H, DH))
    R = rng.standard_normal((G, H, DH, DH)) / np.sqrt(DH)
    bias = 0.1 * rng.standard_normal((G, H, DH))
    state = 0.5 * rng.standard_normal((batch, S, H, DH))
    if S == 4:
        state[:, 2] = np.abs(state[:, 2]) + 0.5
    return tuple(jnp.asarray(a, dtype) for a in (gx, R, bias, state))


def sequential(cell, gx, R, bias, state, segment_ids=None, reset=None):
    parts = tuple(state[:, k] for k in range(state.shape[1]))
    h, final = nonlinear_rnn(cell, gx, R, bias, parts, segment_ids=segment_ids, reset=reset)
    return h, jnp.stack(final, axis=1)


def assert_close(x, y, tol):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- kernel
@pytest.mark.parametrize("cell", CELLS)
def test_forward_kernel_matches_sequential(cell):
    """float64 in interpret mode: the same operations as the scan (up to summation order
    in the small matmuls): agreement to 1e-12. The stored residual states are the
    per-step states of the scan; without a keep mask and with a zero initial state too."""
    gx, R, bias, state = inputs(cell)
    h, final, states = rnn_forward(gx, R, bias, state, cell=cell, block_sizes=SMALL, interpret=True)
    ref_h, ref_final = jax.jit(sequential, static_argnums=0)(cell, gx, R, bias, state)
    assert h.shape == (Bt, T, H, DH) and final.shape == state.shape
    assert_close(h, ref_h, 1e-12)
    assert_close(final, ref_final, 1e-12)
    assert states.shape == (4, T, STATE_PARTS[cell], H, 4)  # padded kernel layout
    assert_close(states[:Bt, :, 0, :, :DH], ref_h, 1e-12)
    zero = jnp.zeros_like(state)
    h0, _, _ = rnn_forward(gx, R, bias, zero, cell=cell, block_sizes=SMALL, interpret=True)  # same compilation
    assert_close(h0, jax.jit(sequential, static_argnums=0)(cell, gx, R, bias, zero)[0], 1e-12)


@pytest.mark.parametrize("cell", [c if c != "slstm_exp" else pytest.param(c, marks=pytest.mark.slow) for c in CELLS])
def test_gradients_through_pallas_method(cell):
    """nonlinear_rnn(method="pallas") == method="sequential": outputs, final state and the
    gradients w.r.t. gx, R, bias and every initial-state part, with packed documents
    (segment_ids; the kernels' keep mask)."""
    gx, R, bias, state = inputs(cell, seed=1)
    parts = tuple(state[:, k] for k in range(state.shape[1]))
    ids = jnp.asarray([[0, 0, 0, 1, 1, 1, 1], [2] * T, [0, 1, 1, 1, 1, 1, 3]])
    rng = np.random.default_rng(2)
    cotangents = (jnp.asarray(rng.standard_normal((Bt, T, H, DH))),
                  tuple(jnp.asarray(rng.standard_normal((Bt, H, DH))) for _ in parts))

    def grads(method):
        def both(args):
            out, pullback = jax.vjp(lambda *a: nonlinear_rnn(cell, *a, method=method, segment_ids=ids), *args)
            return out, pullback(cotangents)

        return jax.jit(both)((gx, R, bias, parts))

    got, want = grads("pallas"), grads("sequential")
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert_close(x, y, 1e-11)


def test_backward_kernel_direct_without_keep():
    """The backward kernel called directly (no keep mask, default block sizes: one batch
    block bigger than the batch; block_t = 4: the reverse loop over t = 6 .. 1 runs one
    unrolled chunk and a remainder of two steps) == jax.vjp of the scan."""
    cell = "gru"
    gx, R, bias, state = inputs(cell, seed=3)
    h, final, states = rnn_forward(gx, R, bias, state, cell=cell, interpret=True)
    rng = np.random.default_rng(4)
    dh, dfinal = jnp.asarray(rng.standard_normal(h.shape)), jnp.asarray(rng.standard_normal(final.shape))
    got = rnn_backward(gx, R, bias, state, None, states, dh, dfinal, cell=cell, interpret=True)
    _, pullback = jax.vjp(functools.partial(sequential, cell), gx, R, bias, state)
    for x, y in zip(got, pullback((dh, dfinal)), strict=True):
        assert_close(x, y, 1e-11)


@pytest.mark.parametrize(
    "cell, block_sizes",
    [
        ("gru", BlockSizes(block_b=2, block_t=1, block_h=2)),
        ("slstm", BlockSizes(block_b=2, block_t=4, block_h=2)),
        ("lstm", BlockSizes(block_b=2, block_t=1, block_h=1)),
    ],
)
def test_backward_kernel_column_blocks(cell, block_sizes):
    """The backward kernel's loops over column blocks (dh = 3 -> 4 in blocks of 2, or 4
    blocks of 1), with a keep mask and cuts at t = 0 and later: == jax.vjp of the scan (GRU:
    the reset gate scales r_n, dgx != dr; sLSTM: four state parts, block_t = 4: an unrolled
    chunk and a remainder of three steps)."""
    gx, R, bias, state = inputs(cell, seed=6)
    keep = jnp.ones((Bt, T), bool).at[1, 3].set(False).at[2, 5].set(False).at[0, 0].set(False)
    h, final, states = rnn_forward(gx, R, bias, state, keep, cell=cell, block_sizes=block_sizes, interpret=True)
    rng = np.random.default_rng(7)
    dh, dfinal = jnp.asarray(rng.standard_normal(h.shape)), jnp.asarray(rng.standard_normal(final.shape))
    got = rnn_backward(
        gx, R, bias, state, keep, states, dh, dfinal, cell=cell, block_sizes=block_sizes, interpret=True
    )
    _, pullback = jax.vjp(lambda *a: sequential(cell, *a, reset=~keep), gx, R, bias, state)
    for x, y in zip(got, pullback((dh, dfinal)), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert_close(x, y, 1e-11)


@pytest.mark.parametrize(
    "block_sizes",
    [
        BlockSizes(block_b=1, block_t=4),
        BlockSizes(block_b=4, block_t=8),
        BlockSizes(block_b=2, block_h=2),
        BlockSizes(block_b=2, block_h=2, resident=False),
    ],
)
def test_block_size_invariance(block_sizes):
    """One row per batch block with T = 7 = one unrolled chunk of 4 + a remainder of 3; a
    batch block bigger than the batch with a time block longer than T (remainder only);
    the forward's state and R in two column blocks (dh = 3 -> 4 in blocks of 2), R kept
    resident or re-read every step: the same result as block_t = 1 with one block."""
    gx, R, bias, state = inputs("gru", seed=5)
    keep = jnp.ones((Bt, T), bool).at[1, 3].set(False)
    want = rnn_forward(gx, R, bias, state, keep, cell="gru", block_sizes=SMALL, interpret=True)
    got = rnn_forward(gx, R, bias, state, keep, cell="gru", block_sizes=block_sizes, interpret=True)
    assert_close(got[0], want[0], 1e-14)
    assert_close(got[1], want[1], 1e-14)


@pytest.mark.parametrize("cell", CELLS)
def test_streamed_forward_matches_sequential(cell):
    """The streamed forward (R re-read every step: the state in memory, loops over the
    column blocks) in two column blocks (dh = 3 -> 4 in blocks of 2) with block_t = 4 (an
    unrolled chunk and a remainder of three steps), with a keep mask cutting at t = 0 and
    later: == the scan in float64, with the residual stored and without it (a ring of
    two steps)."""
    gx, R, bias, state = inputs(cell, seed=11)
    keep = jnp.ones((Bt, T), bool).at[1, 3].set(False).at[0, 0].set(False)
    want_h, want_final = jax.jit(sequential, static_argnums=0)(cell, gx, R, bias, state, reset=~keep)
    block_sizes = BlockSizes(block_b=2, block_t=4, block_h=2, resident=False)
    for save_states in (True, False):
        h, final, states = rnn_forward(gx, R, bias, state, keep, cell=cell, block_sizes=block_sizes,
                                       save_states=save_states, interpret=True)
        assert_close(h, want_h, 1e-12)
        assert_close(final, want_final, 1e-12)
        if save_states:  # the backward's residual: every state part, as the resident forward's
            assert states.shape == (4, T, STATE_PARTS[cell], H, 4)
            assert_close(states[:Bt, :, 0, :, :DH], want_h, 1e-12)
            resident = dataclasses.replace(block_sizes, resident=True)
            want_states = rnn_forward(gx, R, bias, state, keep, cell=cell, block_sizes=resident, interpret=True)[2]
            assert_close(states, want_states, 1e-12)
        else:
            assert states is None


def test_bfloat16_inputs_float32_state():
    """bf16 gx, R, bias: bf16 outputs, float32 final state equal to the float32 scan on the
    same bf16 values (measured ~1e-7), outputs within one bf16 rounding."""
    gx, R, bias, state = inputs("slstm", seed=6, dtype=jnp.bfloat16)
    state = state.astype(jnp.float32)
    h, final, _ = rnn_forward(gx, R, bias, state, cell="slstm", block_sizes=SMALL, save_states=False,
                              interpret=True)
    assert h.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    ref_h, ref_final = jax.jit(sequential, static_argnums=0)(
        "slstm", *(a.astype(jnp.float64) for a in (gx, R, bias, state)))
    assert_close(final, ref_final, 1e-5)
    assert float(np.max(np.abs(np.asarray(h, np.float64) - np.asarray(ref_h)))) < 2**-7


def test_bad_arguments():
    gx, R, bias, state = inputs("lstm", seed=7)
    kw = dict(cell="lstm", interpret=True)
    with pytest.raises(ValueError, match="cell"):
        rnn_forward(gx, R, bias, state, cell="rhn", interpret=True)
    with pytest.raises(ValueError, match="gx: expected 4 gates"):
        rnn_forward(gx[:, :, :3], R, bias, state, **kw)
    with pytest.raises(ValueError, match="R: expected shape"):
        rnn_forward(gx, R[..., :2], bias, state, **kw)
    with pytest.raises(ValueError, match="state0: expected shape"):
        rnn_forward(gx, R, bias, state[:, :1], **kw)
    with pytest.raises(ValueError, match="keep: expected shape"):
        rnn_forward(gx, R, bias, state, jnp.ones((Bt, T + 1), bool), **kw)
    with pytest.raises(ValueError, match="block_sizes.block_b"):
        BlockSizes(block_b=3)
    with pytest.raises(ValueError, match="states: expected shape"):
        rnn_backward(gx, R, bias, state, None, jnp.zeros((1,)), gx[:, :, 0], state, **kw)


@pytest.mark.parametrize("cell", CELLS)
def test_kernels_lower_to_triton(cell):
    """No GPU here: check that forward (R resident and streamed) and backward lower to
    Triton IR (tests/kernels/test_targets.py compiles them for described GPUs) at a
    compiled-size shape (dh = 32, batch 32, bf16 gx, packed documents)."""
    G, S = GATES[cell], STATE_PARTS[cell]
    b, t, heads, dh = 32, 64, 4, 32
    shapes = dict(gx=((b, t, G, heads, dh), jnp.bfloat16), R=((G, heads, dh, dh), jnp.float32),
                  bias=((G, heads, dh), jnp.float32), state=((b, S, heads, dh), jnp.float32),
                  keep=((b, t), jnp.bool_), states=((b, t, S, heads, dh), jnp.float32),
                  dh=((b, t, heads, dh), jnp.float32))
    a = {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}
    for resident in (None, False):  # R resident (the default at dh = 32), and streamed
        block_sizes = BlockSizes(resident=resident)
        fwd = jax.jit(functools.partial(rnn_forward, cell=cell, platform="gpu", block_sizes=block_sizes))
        text = fwd.trace(a["gx"], a["R"], a["bias"], a["state"], a["keep"]).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text
    bwd = jax.jit(functools.partial(rnn_backward, cell=cell, platform="gpu"))
    text = bwd.trace(a["gx"], a["R"], a["bias"], a["state"], a["keep"], a["states"], a["dh"], a["state"]).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
