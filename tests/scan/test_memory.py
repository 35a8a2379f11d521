"""neural_memory (Titans / ATLAS) against plain per-token loops of the update rule.

Oracle (:func:`reference_memory`): a Python loop over tokens written from the equations,

    g_t = grad_W sum_{i = t-w+1}^{t} ||W(k_i) - v_i||^2  at W = anchor_t
    S_t = eta_t S_{t-1} - theta_t g_t,   M_t = (1 - alpha_t) M_{t-1} + S_t,   y_t = M_t(q_t)

with ``anchor_t = M_{t-1}`` for ``chunk_size = 1`` (exact per-token gradient descent) and
the memory at the start of ``t``'s chunk otherwise (mini-batch gradient descent, chunks
aligned to absolute positions). Every comparison is float64: values, final states and the
gradients with respect to every input including the initial state.

float32 (measured here, t = 37, 2-layer memory, chunk 4, window 3, seeds 11..14):
max|y32 - y64| / max|y64| = 1.5e-7 .. 1.9e-7, final memory 1.4e-7 .. 1.7e-7; the assertion
allows 1e-6 (a few ulps amplified by the momentum recurrence, eta <= 0.6 here).

Gates are drawn where the memory is stable (theta <= 0.1, eta <= 0.6): with
theta up to 0.2 and eta up to 0.9 the Omega-window updates diverge (|y| ~ 1e130 by t = 30),
in the oracle as much as in the chunked form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.scan.memory import (
    NeuralMemoryState,
    init_neural_memory_state,
    neural_memory,
)
from tests.scan.compiled import compiled

B, T, H, DK, DV, HIDDEN = 2, 11, 2, 3, 4, 5
TOL = dict(rtol=1e-10, atol=1e-10)


def forward(weights, x):
    """The memory MLP per (batch, head): ``x [b, h, d]``, ``W [b, h, d_in, d_out]``;
    returns the output and the layer inputs / pre-activations for backprop."""
    inputs, pres = [], []
    for i, w in enumerate(weights):
        inputs.append(x)
        x = jnp.einsum("bhi,bhio->bho", x, w)
        if i < len(weights) - 1:
            pres.append(x)
            x = jax.nn.silu(x)
    return x, inputs, pres


def loss_gradient(weights, k, v):
    """``grad_W ||W(k) - v||^2`` by hand-written backpropagation (no autodiff)."""
    y, inputs, pres = forward(weights, k)
    err = 2.0 * (y - v)
    grads = [None] * len(weights)
    for i in reversed(range(len(weights))):
        grads[i] = inputs[i][..., :, None] * err[..., None, :]
        if i:
            sig = jax.nn.sigmoid(pres[i - 1])
            err = jnp.einsum("bho,bhio->bhi", err, weights[i]) * sig * (1 + pres[i - 1] * (1 - sig))
    return grads


def reference_memory(params0, q, k, v, lr, mom, dec, chunk, window, state=None):
    """Token-by-token loop; weights per (batch, head) ``[b, h, d_in, d_out]``."""
    b, t, h, _ = q.shape
    full = lambda ws: tuple(jnp.broadcast_to(w, (b,) + w.shape) for w in ws)  # noqa: E731
    p0 = full(params0)
    if state is None:
        state = init_neural_memory_state(params0, b, window, q.dtype)
    M = tuple(w + d for w, d in zip(p0, state.memory))
    S = tuple(state.momentum)
    anchor = tuple(w + d for w, d in zip(p0, state.anchor))
    start = int(state.position)
    keys = jnp.concatenate([state.keys, k], 1)  # keys[:, j] is absolute position start - (w-1) + j
    values = jnp.concatenate([state.values, v], 1)
    ys = []
    for i in range(t):
        pos = start + i
        if chunk == 1 or pos % chunk == 0:
            anchor = M
        window_idx = [j for j in range(i, i + window) if start - (window - 1) + j >= 0]
        g = [sum(parts) for parts in zip(*(loss_gradient(anchor, keys[:, j], values[:, j]) for j in window_idx))]
        S = tuple(mom[:, i, :, None, None] * s - lr[:, i, :, None, None] * gi for s, gi in zip(S, g))
        M = tuple((1 - dec[:, i, :, None, None]) * m + s for m, s in zip(M, S))
        ys.append(forward(M, q[:, i])[0])
    final = NeuralMemoryState(
        memory=tuple(m - w for m, w in zip(M, p0)),
        momentum=S,
        anchor=tuple(a - w for a, w in zip(anchor if (start + t) % chunk and chunk > 1 else M, p0)),
        keys=keys[:, keys.shape[1] - (window - 1):],
        values=values[:, values.shape[1] - (window - 1):],
        position=jnp.asarray(start + t, jnp.int32),
    )
    return jnp.stack(ys, 1), final


memory = compiled(neural_memory)  # the value tests' calls, under jit


def vjp_at(f, primals, cotangents):
    """``(f(*primals), vjp(cotangents))`` compiled as one ``jit``."""

    def both(primals, cotangents):
        out, pullback = jax.vjp(f, *primals)
        return out, pullback(cotangents)

    return jax.jit(both)(primals, cotangents)


def random_inputs(seed, depth=2, t=T, dtype=np.float64):
    rng = np.random.default_rng(seed)
    dims = [DK] + [HIDDEN] * (depth - 1) + [DV]
    params0 = tuple((rng.normal(size=(H, a, c)) / np.sqrt(a)).astype(dtype) for a, c in zip(dims, dims[1:]))
    q, k = rng.normal(size=(2, B, t, H, DK)).astype(dtype)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, t, H, DV)).astype(dtype)
    lr = rng.uniform(0.0, 0.1, (B, t, H)).astype(dtype)  # a stable memory: no divergence
    mom = rng.uniform(0.0, 0.6, (B, t, H)).astype(dtype)
    dec = rng.uniform(0.0, 0.2, (B, t, H)).astype(dtype)
    return params0, (q, k, v, lr, mom, dec)


def random_state(seed, params0, window, position):
    rng = np.random.default_rng(seed)
    w = lambda: tuple(0.1 * rng.normal(size=(B,) + p.shape) for p in params0)  # noqa: E731
    return NeuralMemoryState(
        memory=w(), momentum=w(), anchor=w(),
        keys=rng.normal(size=(B, window - 1, H, DK)), values=rng.normal(size=(B, window - 1, H, DV)),
        position=jnp.asarray(position, jnp.int32),
    )


def assert_states_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.mark.parametrize("depth,window", [(1, 1), (2, 1), (2, 3)])
def test_per_token_gradient_descent(depth, window):
    """chunk_size = 1: exact sequential per-token gradient descent (Titans / ATLAS Omega)."""
    params0, xs = random_inputs(0, depth)
    y, state = memory(params0, *xs, chunk_size=1, omega_window=window)
    y_ref, state_ref = reference_memory(params0, *xs, 1, window)
    np.testing.assert_allclose(y, y_ref, **TOL)
    assert_states_close(state, state_ref, **TOL)


@pytest.mark.parametrize("chunk,window", [(4, 1), (3, 2), (16, 1), (4, 3)])
def test_chunked_matches_reference(chunk, window):
    """Gradients at the chunk-start memory; T = 11 not a multiple of the chunk size."""
    params0, xs = random_inputs(1)
    y, state = memory(params0, *xs, chunk_size=chunk, omega_window=window)
    y_ref, state_ref = reference_memory(params0, *xs, chunk, window)
    np.testing.assert_allclose(y, y_ref, **TOL)
    assert_states_close(state, state_ref, **TOL)


def test_chunked_differs_from_per_token():
    """The mini-batch rule is a different (cheaper) update than per-token descent."""
    params0, xs = random_inputs(2)
    y1, _ = memory(params0, *xs, chunk_size=1)
    y4, _ = memory(params0, *xs, chunk_size=4)
    assert np.abs(np.asarray(y1 - y4)).max() > 1e-3


@pytest.mark.parametrize("chunk,window,splits", [
    (4, 3, (4, 8)), (4, 3, (1, 2, 3, 7, 10)),
    pytest.param(4, 1, (6, 7), marks=pytest.mark.slow), pytest.param(1, 2, (5,), marks=pytest.mark.slow)])
def test_split_sequence(chunk, window, splits):
    """Calls on pieces with the carried state == one pass, at chunk boundaries or not."""
    params0, xs = random_inputs(3)
    y, state = memory(params0, *xs, chunk_size=chunk, omega_window=window)
    pieces, carried = [], None
    for lo, hi in zip((0,) + splits, splits + (T,)):
        y_piece, carried = memory(
            params0, *(x[:, lo:hi] for x in xs), chunk_size=chunk, omega_window=window, initial_state=carried
        )
        pieces.append(y_piece)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), y, **TOL)
    assert_states_close(carried, state, **TOL)


@pytest.mark.parametrize("position", [0, 6])
def test_initial_state_matches_reference(position):
    """A random initial state (memory, momentum, anchor, Omega window, position)."""
    params0, xs = random_inputs(4)
    state0 = random_state(5, params0, 3, position)
    y, state = memory(params0, *xs, chunk_size=4, omega_window=3, initial_state=state0)
    y_ref, state_ref = reference_memory(params0, *xs, 4, 3, state=state0)
    np.testing.assert_allclose(y, y_ref, **TOL)
    assert_states_close(state, state_ref, **TOL)


def test_explicit_zero_state_equals_none():
    params0, xs = random_inputs(6)
    y, state = memory(params0, *xs, chunk_size=4, omega_window=2)
    zero = init_neural_memory_state(params0, B, 2, jnp.float64)
    y0, state0 = memory(params0, *xs, chunk_size=4, omega_window=2, initial_state=zero)
    np.testing.assert_allclose(y0, y, **TOL)
    assert_states_close(state0, state, **TOL)


@pytest.mark.parametrize("chunk,window,position,t", [
    pytest.param(1, 1, 0, 4, marks=pytest.mark.slow), (4, 3, 6, 7)])
def test_gradients_match_reference(chunk, window, position, t):
    """vjp with random cotangents: params0, q, k, v, gates and the initial state."""
    params0, xs = random_inputs(7, t=t)
    state0 = random_state(8, params0, window, position)
    rng = np.random.default_rng(9)
    float_state = lambda s: (s.memory, s.momentum, s.anchor, s.keys, s.values)  # noqa: E731

    def as_state(f):
        return NeuralMemoryState(*f, position=jnp.asarray(position, jnp.int32))

    def ours(p, x, f):
        y, s = neural_memory(p, *x, chunk_size=chunk, omega_window=window, initial_state=as_state(f))
        return y, float_state(s)

    def theirs(p, x, f):
        y, s = reference_memory(p, *x, chunk, window, state=as_state(f))
        return y, float_state(s)

    primals = (params0, xs, float_state(state0))
    cot = jax.tree.map(lambda a: rng.normal(size=a.shape), jax.eval_shape(ours, *primals))
    out, grads = vjp_at(ours, primals, cot)
    out_ref, vjp_ref = jax.vjp(theirs, *primals)  # the oracle's loop is cheaper op by op than compiled
    grads_ref = vjp_ref(cot)
    assert_states_close(out, out_ref, **TOL)
    assert_states_close(grads, grads_ref, rtol=1e-9, atol=1e-9)


def test_gradients_finite_long_float32():
    params0, xs = random_inputs(10, t=40, dtype=np.float32)

    def loss(p, x):
        y, _ = neural_memory(p, *x, chunk_size=8, omega_window=2)
        return jnp.sum(y**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params0, xs)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_float32_error():
    params0, xs = random_inputs(11, t=37)
    y64, _ = memory(params0, *xs, chunk_size=4, omega_window=3)
    y32, _ = memory(tuple(p.astype(np.float32) for p in params0),
                           *(x.astype(np.float32) for x in xs), chunk_size=4, omega_window=3)
    assert y32.dtype == jnp.float32
    err = float(jnp.abs(y32 - y64).max() / jnp.abs(y64).max())
    assert err < 1e-6, err


@pytest.mark.slow
def test_jit_and_vmap():
    params0, xs = random_inputs(13)
    f = jax.jit(lambda *x: neural_memory(params0, *x, chunk_size=4)[0])
    y = f(*xs)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]), xs)
    yv = jax.vmap(f)(*stacked)
    np.testing.assert_allclose(yv[0], y, **TOL)
    np.testing.assert_allclose(yv[1], f(*(x[::-1] for x in xs)), **TOL)


def test_bad_inputs():
    params0, (q, k, v, lr, mom, dec) = random_inputs(14)
    with pytest.raises(ValueError, match="k: expected shape"):
        neural_memory(params0, q, k[:, :3], v, lr, mom, dec)
    with pytest.raises(ValueError, match="lr: expected shape"):
        neural_memory(params0, q, k, v, lr[..., None], mom, dec)
    with pytest.raises(ValueError, match="q: expected a floating"):
        neural_memory(params0, q.astype(np.int32), k, v, lr, mom, dec)
    with pytest.raises(ValueError, match="chunk_size"):
        neural_memory(params0, q, k, v, lr, mom, dec, chunk_size=0)
    with pytest.raises(ValueError, match="omega_window"):
        neural_memory(params0, q, k, v, lr, mom, dec, omega_window=0)
    with pytest.raises(ValueError, match=r"params0\[1\]"):
        neural_memory((params0[0], params0[1][:, :, :2]), q, k, v, lr, mom, dec)
    with pytest.raises(ValueError, match="initial_state.keys"):
        neural_memory(params0, q, k, v, lr, mom, dec, omega_window=2,
                      initial_state=init_neural_memory_state(params0, B, 3))
