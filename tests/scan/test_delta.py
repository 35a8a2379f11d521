"""Tests for ``ssmjax.scan.delta.delta_rule`` (DeltaNet / Gated DeltaNet).

Oracles: ``loop_oracle`` below, a plain Python loop that forms ``I - beta k k^T``
explicitly (independent of both library methods), and ``method="sequential"``. All exact
comparisons run in float64; float32 errors are measured against the float64 oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ssmjax.scan.delta import delta_rule

METHODS = ("sequential", "chunked")
TIGHT = 1e-11  # float64: both methods are exact algebra, only rounding differs


# ----------------------------------------------------------------------------- helpers
def make_inputs(seed, b=2, t=13, h=2, dk=3, dv=4, dtype=np.float64, strong_decay=False):
    """Realistic inputs: L2-normalised keys, sigmoid betas, negative log-decays, a state."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, dk))
    k = rng.normal(size=(b, t, h, dk))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(b, t, h, dv))
    beta = 1 / (1 + np.exp(-rng.normal(size=(b, t, h))))
    if strong_decay:
        g = -rng.uniform(0.0, 20.0, size=(b, t, h))
        g[rng.uniform(size=g.shape) < 0.5] *= 1e-3  # mix strong and weak decays
    else:
        g = -np.log1p(np.exp(rng.normal(size=(b, t, h)) - 1.0))  # -softplus
    s0 = rng.normal(size=(b, h, dk, dv))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, beta, g, s0))


def loop_oracle(q, k, v, beta, g, s0, scale=None, cut=None, xp=np):
    """``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, token by token.

    ``cut [b, t]`` zeroes ``exp(g_t)`` (new document). Plain NumPy by default (values, no
    compilation); ``xp=jnp`` gives the same loop, differentiable, for gradient checks.
    """
    b, t, h, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    eye = xp.eye(dk)
    S, outputs = s0, []
    for i in range(t):
        k_i, beta_i = k[:, i], beta[:, i, :, None, None]
        decay = xp.exp(g[:, i])[:, :, None, None]
        if cut is not None:
            decay = decay * (1.0 - cut[:, i, None, None, None])
        erase = eye - beta_i * k_i[..., :, None] * k_i[..., None, :]
        write = beta_i * k_i[..., :, None] * v[:, i, :, None, :]
        S = decay * (erase @ S) + write
        outputs.append(scale * xp.einsum("bhkv,bhk->bhv", S, q[:, i]))
    return xp.stack(outputs, axis=1), S


@jax.jit
def jnp_loop_oracle(q, k, v, beta, g, s0, cut=None):
    return loop_oracle(q, k, v, beta, g, s0, cut=cut, xp=jnp)


def as_numpy(*arrays):
    return tuple(np.asarray(x) for x in arrays)


def max_rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def assert_close(x, ref, tol=TIGHT):
    assert np.asarray(x).shape == np.asarray(ref).shape
    err = max_rel_err(x, ref)
    assert err < tol, f"max relative error {err:.3g} >= {tol:.3g}"


_delta_rule = jax.jit(delta_rule, static_argnames=("method", "chunk_size"))


def run(method, q, k, v, beta, g, s0, **kw):
    """``delta_rule`` under ``jit`` (one compile per shape instead of op-by-op dispatch)."""
    return _delta_rule(q, k, v, beta, log_decay=g, initial_state=s0, method=method, **kw)


# ----------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("method", METHODS)
def test_hand_computed_example(method):
    """Pins the fla convention: decay, then delta update with raw keys, then read-out.

    dk = dv = 1, S_{-1} = 2. Step 1: g = log 0.5, k = 2, beta = 0.2, v = 1, q = 1:
    S = 0.5 (1 - 0.2 * 4) 2 + 0.2 * 2 * 1 = 0.6 (decaying after the write would give 0.4,
    normalising k would give 1.0). Step 2: g = log 0.25, k = 1, beta = 0.5, v = -1, q = 3:
    S = 0.25 * 0.5 * 0.6 - 0.5 = -0.425, o = 3 S = -1.275 (scale = dk^-0.5 = 1).
    """
    col = lambda *x: jnp.asarray(x, jnp.float64).reshape(1, 2, 1, 1)  # noqa: E731
    q, k, v = col(1.0, 3.0), col(2.0, 1.0), col(1.0, -1.0)
    beta = col(0.2, 0.5)[..., 0]
    g = jnp.log(col(0.5, 0.25)[..., 0])
    o, S = run(method, q, k, v, beta, g, jnp.full((1, 1, 1, 1), 2.0), chunk_size=2)
    np.testing.assert_allclose(o.ravel(), [0.6, -1.275], rtol=1e-13)
    np.testing.assert_allclose(S.ravel(), [-0.425], rtol=1e-13)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_matches_loop_oracle(method, gated, with_state):
    q, k, v, beta, g, s0 = make_inputs(0)
    g = g if gated else jnp.zeros_like(g)
    s0 = s0 if with_state else jnp.zeros_like(s0)
    o, S = _delta_rule(
        q, k, v, beta,
        log_decay=g if gated else None,
        initial_state=s0 if with_state else None,
        method=method,
        chunk_size=4,  # t = 13: three full chunks and a partial one
    )
    o_ref, S_ref = loop_oracle(*as_numpy(q, k, v, beta, g, s0))
    assert o.dtype == jnp.float64 and S.dtype == jnp.float64
    assert_close(o, o_ref)
    assert_close(S, S_ref)


def test_scale_default_and_explicit():
    q, k, v, beta, g, s0 = make_inputs(1, dk=4)
    o_default, _ = run("chunked", q, k, v, beta, g, s0)
    o_half, _ = run("chunked", q, k, v, beta, g, s0, scale=0.5)  # 4 ** -0.5
    o_three, _ = run("chunked", q, k, v, beta, g, s0, scale=3.0)
    assert_close(o_default, o_half, 1e-15)
    assert_close(o_three, loop_oracle(*as_numpy(q, k, v, beta, g, s0), scale=3.0)[0])


@pytest.mark.filterwarnings("error")
def test_pallas_default_scale_raises_no_warning():
    """``scale=None`` with the kernel: no ``jnp.ndim(None)`` DeprecationWarning (any
    warning fails here), and the default ``dk ** -0.5`` as in the XLA form."""
    q, k, v, beta, g, s0 = make_inputs(1, b=1, t=5, dk=4)
    got = _delta_rule(q, k, v, beta, log_decay=g, initial_state=s0, method="pallas", chunk_size=4)
    want = run("chunked", q, k, v, beta, g, s0)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


def test_zero_log_decay_is_deltanet():
    q, k, v, beta, g, s0 = make_inputs(2)
    for method in METHODS:
        plain = _delta_rule(q, k, v, beta, initial_state=s0, method=method)
        gated = run(method, q, k, v, beta, jnp.zeros_like(g), s0)
        assert_close(plain[0], gated[0], 1e-15)
        assert_close(plain[1], gated[1], 1e-15)


def test_auto_is_chunked():
    q, k, v, beta, g, s0 = make_inputs(3)
    auto = run("auto", q, k, v, beta, g, s0, chunk_size=4)
    chunked = run("chunked", q, k, v, beta, g, s0, chunk_size=4)
    assert_close(auto[0], chunked[0], 1e-15)
    assert_close(auto[1], chunked[1], 1e-15)


# ----------------------------------------------------------------------------- gradients
def vjp_all(fn, args, seed):
    """Gradients of ``<o, co> + <S, cS>`` w.r.t. every argument, random cotangents."""
    out, pullback = jax.vjp(fn, *args)
    rng = np.random.default_rng(seed)
    cot = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), out)
    return pullback(cot)


NAMES = ("q", "k", "v", "beta", "log_decay", "initial_state")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_loop_oracle(method, gated):
    args = make_inputs(4, b=1, t=9)
    if not gated:
        args = args[:4] + (jnp.zeros_like(args[4]),) + args[5:]
    grads = vjp_all(lambda *a: run(method, *a, chunk_size=4), args, seed=5)
    grads_ref = vjp_all(jnp_loop_oracle, args, seed=5)
    for name, d, d_ref in zip(NAMES, grads, grads_ref):
        assert np.all(np.isfinite(d)), name
        assert_close(d, d_ref, 1e-10)


def test_chunked_gradients_numerically():
    """Autodiff of the chunked form (block inverse, masks, scan) vs finite differences."""
    q, k, v, beta, g, s0 = make_inputs(6, b=1, t=7, h=1, dk=2, dv=2)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1]])

    def f(q, k, v, beta, g, s0):
        return run("chunked", q, k, v, beta, g, s0, chunk_size=3, segment_ids=seg)

    check_grads(f, (q, k, v, beta, g, s0), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- invariances
def test_chunk_size_invariance():
    q, k, v, beta, g, s0 = make_inputs(7, t=21)
    o_ref, S_ref = run("sequential", q, k, v, beta, g, s0)
    for chunk_size in (1, 3, 5, 8, 21):
        o, S = run("chunked", q, k, v, beta, g, s0, chunk_size=chunk_size)
        assert_close(o, o_ref)
        assert_close(S, S_ref)


@pytest.mark.parametrize("t", [1, 5, 17])
def test_time_not_multiple_of_chunk_size(t):
    q, k, v, beta, g, s0 = make_inputs(8, t=t)
    o_ref, S_ref = loop_oracle(*as_numpy(q, k, v, beta, g, s0))
    o, S = run("chunked", q, k, v, beta, g, s0, chunk_size=8)
    assert_close(o, o_ref)
    assert_close(S, S_ref)


@pytest.mark.parametrize("method", METHODS)
def test_split_sequence_with_carried_state(method):
    q, k, v, beta, g, s0 = make_inputs(9, t=20)
    o_ref, S_ref = run(method, q, k, v, beta, g, s0, chunk_size=8)
    for s in (1, 7):
        first = (x[:, :s] for x in (q, k, v, beta, g))
        second = (x[:, s:] for x in (q, k, v, beta, g))
        o1, S1 = run(method, *first, s0, chunk_size=8)
        o2, S2 = run(method, *second, S1, chunk_size=8)
        assert_close(jnp.concatenate([o1, o2], axis=1), o_ref)
        assert_close(S2, S_ref)


def test_empty_time_returns_initial_state():
    q, k, v, beta, g, s0 = make_inputs(10, t=0)
    o, S = run("chunked", q, k, v, beta, g, s0)
    assert o.shape == (2, 0, 2, 4)
    np.testing.assert_array_equal(S, s0)


def test_jit_and_vmap():
    q, k, v, beta, g, s0 = make_inputs(11, t=9)
    o_ref, S_ref = run("chunked", q, k, v, beta, g, s0, chunk_size=4)
    f = jax.jit(lambda *a: run("chunked", *a, chunk_size=4))
    o, S = f(q, k, v, beta, g, s0)
    assert_close(o, o_ref, 1e-14)
    # vmap over a leading axis that splits the batch: each slice is a batch of one.
    split = lambda x: x.reshape((2, 1) + x.shape[1:])  # noqa: E731
    o_v, S_v = jax.vmap(f)(*(split(x) for x in (q, k, v, beta, g, s0)))
    assert_close(o_v.reshape(o_ref.shape), o_ref, 1e-14)
    assert_close(S_v.reshape(S_ref.shape), S_ref, 1e-14)


# ----------------------------------------------------------------------------- packed sequences
DOCS = ([3, 1, 6, 5, 2], [8, 9])  # per row: document lengths (t = 17); cuts at 3, 4, 10, 15 / 8


def segment_ids_for(docs):
    return np.asarray([np.repeat(np.arange(len(d)), d) for d in docs])


def separate_documents(docs, arrays, s0):
    """Every document as its own batch row, end-padded to the full length.

    Padding with ``beta = 0``, ``g = 0`` leaves the state unchanged, so one oracle call
    runs all documents separately. The first document of a row starts from that row's
    ``s0``, every other one from zeros. Returns the stacked arrays, states and the
    ``(row, start, length, doc_index)`` of each document.
    """
    t = arrays[0].shape[1]
    rows, states, where = [], [], []
    for row, lengths in enumerate(docs):
        start = 0
        for n_doc, length in enumerate(lengths):
            piece = [x[row, start : start + length] for x in arrays]
            rows.append([jnp.pad(x, [(0, t - length)] + [(0, 0)] * (x.ndim - 1)) for x in piece])
            states.append(s0[row] if n_doc == 0 else jnp.zeros_like(s0[row]))
            where.append((row, start, length, len(where)))
            start += length
    stacked = [jnp.stack(column) for column in zip(*rows)]
    return stacked, jnp.stack(states), where


@pytest.mark.parametrize("method", METHODS)
def test_segment_ids_equal_separate_runs(method):
    """Chunk size 4 puts cuts inside chunks (3, 10, 15) and on chunk boundaries (4, 8)."""
    q, k, v, beta, g, s0 = make_inputs(12, t=17)
    seg = jnp.asarray(segment_ids_for(DOCS))
    o, S = run(method, q, k, v, beta, g, s0, chunk_size=4, segment_ids=seg)
    docs, doc_s0, where = separate_documents(DOCS, (q, k, v, beta, g), s0)
    o_docs, S_docs = loop_oracle(*as_numpy(*docs, doc_s0))
    for row, start, length, n in where:
        assert_close(o[row, start : start + length], o_docs[n, :length])
        if start + length == q.shape[1]:  # final state = the last document's
            assert_close(S[row], S_docs[n])


@pytest.mark.parametrize("method", METHODS)
def test_reset_equals_segment_ids_and_drops_initial_state(method):
    q, k, v, beta, g, s0 = make_inputs(13, t=17)
    seg = segment_ids_for(DOCS)
    reset = np.concatenate([np.zeros((2, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    by_ids = run(method, q, k, v, beta, g, s0, chunk_size=4, segment_ids=jnp.asarray(seg))
    by_reset = run(method, q, k, v, beta, g, s0, chunk_size=4, reset=jnp.asarray(reset))
    assert_close(by_reset[0], by_ids[0], 1e-15)
    assert_close(by_reset[1], by_ids[1], 1e-15)
    reset[:, 0] = True  # a document starting at t = 0 ignores initial_state
    dropped = run(method, q, k, v, beta, g, s0, chunk_size=4, reset=jnp.asarray(reset))
    fresh = run(method, q, k, v, beta, g, None, chunk_size=4, reset=jnp.asarray(reset))
    assert_close(dropped[0], fresh[0], 1e-15)
    assert not np.allclose(dropped[0], by_reset[0])  # the drop is visible


GRAD_DOCS = ([2, 1, 4, 2], [4, 5])  # t = 9; with chunk 4: cuts at 2, 3, 7 inside, 4 on a boundary


def test_packed_gradients_match_loop_oracle():
    q, k, v, beta, g, s0 = make_inputs(14, t=9)
    seg = segment_ids_for(GRAD_DOCS)
    cut = jnp.asarray(np.concatenate([np.zeros((2, 1)), seg[:, 1:] != seg[:, :-1]], axis=1))
    args = (q, k, v, beta, g, s0)
    grads_ref = vjp_all(lambda *a: jnp_loop_oracle(*a, cut=cut), args, seed=15)
    for method in METHODS:
        grads = vjp_all(
            lambda *a: run(method, *a, chunk_size=4, segment_ids=jnp.asarray(seg)), args, seed=15
        )
        for name, d, d_ref in zip(NAMES, grads, grads_ref):
            assert_close(d, d_ref, 1e-10)
        # log_decay at a document start multiplies a dropped state: zero gradient.
        assert np.all(np.asarray(grads[4])[np.asarray(cut, bool)] == 0.0)


# ----------------------------------------------------------------------------- precision
# Measured max relative error (max|x - ref| / max|ref|) vs the float64 oracle run on the
# same inputs before rounding them to float32 (so input rounding is included); normalised
# keys, sigmoid betas; seeds 16 and 17:
#                                   sequential o / state     chunked (C=64) o / state
#   gated, t=256, dk=dv=16          1.7e-07 / 1.6e-07        1.8e-07 / 1.9e-07
#   gated, t=256, dk=dv=64          2.7e-07 / 1.3e-07        2.4e-07 / 1.2e-07
#   DeltaNet (g=0), t=1024, dk=16   2.8e-07 / 4.3e-07        4.0e-07 / 4.7e-07
#   DeltaNet (g=0), t=1024, dk=64   5.0e-07 / 6.3e-07        3.8e-07 / 2.9e-07
#   gated strong (g to -20), t=16k  1.5e-07 / 9.1e-08        2.4e-07 / 1.1e-07
# A few ulp, no growth with t (``I - beta k k^T`` is a contraction for unit keys and
# beta in (0, 1)). The tolerance is ~4x the worst measurement.
FLOAT32_TOL = 2e-6


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_float32_error_vs_float64_oracle(method, gated):
    args = list(make_inputs(16, t=512, dk=16, dv=16))
    if not gated:
        args[4] = jnp.zeros_like(args[4])
    o_ref, S_ref = run("sequential", *args)
    o, S = run(method, *(x.astype(jnp.float32) for x in args))
    assert o.dtype == jnp.float32 and S.dtype == jnp.float32
    assert max_rel_err(o, o_ref) < FLOAT32_TOL
    assert max_rel_err(S, S_ref) < FLOAT32_TOL


def test_long_sequence_strong_decay_float32():
    """t = 16384 with g down to -20 per step: cumulative log-decays reach ~ -1e5."""
    args = make_inputs(17, b=1, t=16384, h=2, dk=8, dv=8, strong_decay=True)
    o_ref, S_ref = run("sequential", *args)  # float64
    args32 = tuple(x.astype(jnp.float32) for x in args)
    for method in METHODS:
        o, S = jax.jit(lambda *a, m=method: run(m, *a))(*args32)
        assert np.all(np.isfinite(o)) and np.all(np.isfinite(S)), method
        assert max_rel_err(o, o_ref) < FLOAT32_TOL, method
        assert max_rel_err(S, S_ref) < FLOAT32_TOL, method
    # Gradients stay finite too (exp is only applied to masked, non-positive sums).
    loss = lambda *a: jnp.sum(run("chunked", *a)[0])  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args32)
    for name, d in zip(NAMES, grads):
        assert np.all(np.isfinite(d)), name


def test_bfloat16_inputs():
    args = make_inputs(18, t=40, dk=8, dv=8)
    q, k, v, beta, g, s0 = (x.astype(jnp.bfloat16) for x in args)
    o_ref, S_ref = run("sequential", *(x.astype(jnp.float64) for x in (q, k, v, beta, g, s0)))
    for method in METHODS:
        o, S = run(method, q, k, v, beta, g, s0.astype(jnp.float32), chunk_size=16)
        assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
        # Computed in float32 from the rounded inputs: only the output rounding (2^-8) is bf16.
        assert max_rel_err(o, o_ref) < 2**-7
        assert max_rel_err(S, S_ref) < FLOAT32_TOL


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    b, t, h, dk, dv = 2, 5, 3, 4, 6
    q = jnp.zeros((b, t, h, dk))
    v = jnp.zeros((b, t, h, dv))
    beta = jnp.zeros((b, t, h))
    ok = dict(q=q, k=q, v=v, beta=beta)
    return [
        ("q", dict(ok, q=q[..., 0], k=q[..., 0]), {}),
        ("k", dict(ok, k=jnp.zeros((b, t, h, dk + 1))), {}),
        ("v", dict(ok, v=jnp.zeros((b, t + 1, h, dv))), {}),
        ("v", dict(ok, v=v[..., 0]), {}),
        ("beta", dict(ok, beta=beta[..., None]), {}),
        ("beta", dict(ok, beta=beta[:, :, :1]), {}),
        ("log_decay", ok, dict(log_decay=jnp.zeros((b, t)))),
        ("log_decay", ok, dict(log_decay=jnp.zeros((b, t, h, dk)))),
        ("initial_state", ok, dict(initial_state=jnp.zeros((b, h, dv, dk)))),
        ("method", ok, dict(method="parallel")),
        ("method", ok, dict(method="associative")),
        ("chunk_size", ok, dict(chunk_size=0)),
        ("q", dict(ok, q=q.astype(jnp.int32)), {}),
        ("beta", dict(ok, beta=beta.astype(jnp.int32)), {}),
        ("v", dict(ok, v=v.astype(jnp.complex64)), {}),
        ("log_decay", ok, dict(log_decay=jnp.zeros((b, t, h), jnp.int32))),
        ("segment_ids", ok, dict(segment_ids=jnp.zeros((b, t), jnp.float32))),
        ("segment_ids", ok, dict(segment_ids=jnp.zeros((b, t + 1), jnp.int32))),
        ("reset", ok, dict(reset=jnp.zeros((b, t), jnp.int32))),
        ("segment_ids and reset", ok,
         dict(segment_ids=jnp.zeros((b, t), int), reset=jnp.zeros((b, t), bool))),
        ("scale", ok, dict(scale=jnp.ones(3))),
    ]


@pytest.mark.parametrize("name,arrays,kwargs", _bad_cases())
def test_bad_input_raises(name, arrays, kwargs):
    with pytest.raises(ValueError, match=f"^{name}"):
        delta_rule(arrays["q"], arrays["k"], arrays["v"], arrays["beta"], **kwargs)
