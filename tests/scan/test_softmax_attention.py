"""prefix_softmax_attention and causal_softmax_attention against plain numpy loops.

Oracles (float64): for every prefix, the softmax of the scores seen so far (max
subtracted) applied to the values; for the quadratic attention, one query at a time over
its visible keys. float32 (measured, normwise max|err| / max|ref| vs the float64 oracle):
prefix (t = 100, scores ~ 3 N(0, 1)) sequential 2.7e-7, associative 2.5e-7; causal
attention (t = 200, dk = 16) 1.3e-7 with a window of 50, 1.2e-7 without. Tolerances are
~10x those numbers. bf16 inputs: 4.8e-3 (input and output rounding, 2^-8).
"""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from jax.test_util import check_grads

from ssmjax.scan.softmax_attention import (
    SoftmaxState,
    causal_softmax_attention,
    prefix_softmax_attention,
    softmax_scan_combine,
)

METHODS = ["sequential", "associative"]
B, T, H, DV = 2, 23, 3, 4
TOL = dict(rtol=1e-12, atol=1e-12)
SEGMENT_IDS = np.array([[0] * 5 + [1] * 9 + [2] * 1 + [3] * 8, [7] * 12 + [3] * 11])

prefix = jax.jit(prefix_softmax_attention, static_argnames=("method",))
causal = jax.jit(causal_softmax_attention, static_argnames=("window",))


def random_inputs(seed, shape=(B, T, H, DV), dtype=np.float64):
    rng = np.random.default_rng(seed)
    b, t, h, dv = shape
    return (3 * rng.normal(size=(b, t, h))).astype(dtype), rng.normal(size=shape).astype(dtype)


def loop_prefix(scores, values, cut=None, initial=None):
    """For each t: softmax over the scores since the last cut (and the initial summary)."""
    b, t, h, dv = values.shape
    o = np.zeros((b, t, h, dv))
    for bb in range(b):
        start = 0
        for i in range(t):
            if cut is not None and cut[bb, i]:
                start = i
            s, v = scores[bb, start : i + 1], values[bb, start : i + 1]  # [n, h], [n, h, dv]
            m = s.max(0)
            num = (np.exp(s - m)[..., None] * v).sum(0)
            den = np.exp(s - m).sum(0)
            if initial is not None and start == 0:
                w = np.exp(initial.m[bb] - m)
                num, den = num + w[:, None] * initial.num[bb], den + w * initial.den[bb]
            o[bb, i] = num / den[:, None]
    return o


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.max(np.abs(x - ref)) / np.max(np.abs(ref))


# ----------------------------------------------------------------------------- prefix
@pytest.mark.parametrize("method", METHODS)
def test_prefix_matches_loop(method):
    s, v = random_inputs(0)
    o, final = prefix(s, v, method=method)
    np.testing.assert_allclose(o, loop_prefix(s, v), **TOL)
    # the final summary represents all tokens: num / den = last output, m = max score
    np.testing.assert_allclose(final.m, s.max(1), **TOL)
    np.testing.assert_allclose(final.num / final.den[..., None], o[:, -1], **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_prefix_split_sequence_and_initial_state(method):
    s, v = random_inputs(1)
    ref, ref_final = prefix(s, v, method=method)
    o1, state = prefix(s[:, :9], v[:, :9], method=method)
    o2, final = prefix(s[:, 9:], v[:, 9:], initial_state=state, method=method)
    np.testing.assert_allclose(np.concatenate([o1, o2], 1), ref, **TOL)
    for x, r in zip(final, ref_final):
        np.testing.assert_allclose(x, r, **TOL)
    np.testing.assert_allclose(o2, loop_prefix(s[:, 9:], v[:, 9:], initial=state), **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_prefix_packed_sequences_and_reset(method):
    s, v = random_inputs(2)
    cut = np.zeros((B, T), bool)
    cut[:, 1:] = SEGMENT_IDS[:, 1:] != SEGMENT_IDS[:, :-1]
    o, _ = prefix(s, v, segment_ids=SEGMENT_IDS, method=method)
    np.testing.assert_allclose(o, loop_prefix(s, v, cut), **TOL)
    _, state = prefix(s[:, :5], v[:, :5], method=method)
    reset = cut.copy()
    reset[1, 0] = True  # row 1 drops the initial state, row 0 keeps it
    o, _ = prefix(s, v, initial_state=state, reset=reset, method=method)
    ref_row0 = loop_prefix(s[:1], v[:1], cut[:1], SoftmaxState(*(x[:1] for x in state)))
    np.testing.assert_allclose(o[:1], ref_row0, **TOL)
    np.testing.assert_allclose(o[1:], loop_prefix(s[1:], v[1:], cut[1:]), **TOL)


def test_prefix_gradients_match_sequential():
    s, v = random_inputs(3)
    _, state = prefix(s[:, :4], v[:, :4])
    rng = np.random.default_rng(0)
    co, cd = rng.normal(size=v.shape), rng.normal(size=(B, H, DV))
    cm, cn = rng.normal(size=2)

    def loss(method):
        def f(s, v, m0, num0, den0):
            o, fin = prefix_softmax_attention(
                s, v, initial_state=(m0, num0, den0), segment_ids=SEGMENT_IDS, method=method
            )
            return jnp.sum(o * co) + jnp.sum(fin.num * cd) + cn * jnp.sum(fin.den) + cm * jnp.sum(fin.m)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))

    args = (s, v, *state)
    for x, r in zip(loss("associative")(*args), loss("sequential")(*args)):
        np.testing.assert_allclose(x, r, **TOL)


def test_prefix_gradient_finite_differences_with_ties():
    """Tied scores (max has a kink there) still give the softmax gradient."""
    s = np.array([[[0.5], [0.5], [-1.0], [0.5], [2.0]]])
    v = np.random.default_rng(4).normal(size=(1, 5, 1, 2))
    for method in METHODS:
        grad = jax.jit(jax.grad(lambda s: jnp.sum(prefix(s, v, method=method)[0] ** 2)))(s)
        eps, numeric = 1e-6, np.zeros_like(s)
        for i in range(5):
            d = np.zeros_like(s)
            d[0, i, 0] = eps
            f = lambda x: float(np.sum(loop_prefix(x, v) ** 2))
            numeric[0, i, 0] = (f(s + d) - f(s - d)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_prefix_float32_bfloat16_and_large_scores(method):
    s, v = random_inputs(5, shape=(2, 100, 2, 8))
    ref = loop_prefix(s, v)
    o, final = prefix(s.astype(np.float32), v.astype(np.float32), method=method)
    assert o.dtype == jnp.float32
    assert rel_err(o, ref) < 3e-6  # measured 2.7e-7 (sequential), 2.5e-7 (associative)
    o, final = prefix(jnp.asarray(s, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), method=method)
    assert o.dtype == jnp.bfloat16 and final.num.dtype == jnp.float32
    assert rel_err(o, ref) < 2e-2  # measured 4.8e-3
    big = (s + 1e4).astype(np.float32)  # exp(1e4) overflows; the stabilised form does not
    o, _ = prefix(big, v.astype(np.float32), method=method)
    assert bool(jnp.all(jnp.isfinite(o)))


_combine = jax.jit(softmax_scan_combine)  # compiled once for the scalar summaries, not run op by op


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            # -inf: the empty summary; no subnormals anywhere (XLA on CPU flushes them to zero)
            st.one_of(st.floats(-30, 30, allow_subnormal=False), st.just(-np.inf)),
            st.floats(-5, 5, allow_subnormal=False),
            st.floats(0.1, 5),
        ),
        min_size=3,
        max_size=3,
    )
)
@example([(0.0, 1.0, 1.0), (11.0, 0.5, 1.0), (11.0, -0.5, 1.0)])  # numerators cancel to 1.7e-5
def test_softmax_scan_combine_is_associative(triples):
    def state(m, n, d):
        if m == -np.inf:  # the empty summary has no mass
            n, d = 0.0, 0.0
        return SoftmaxState(jnp.array(m), jnp.array([n, -n]), jnp.array(d))

    a, b, c = (state(*x) for x in triples)
    left = _combine(_combine(a, b), c)
    right = _combine(a, _combine(b, c))
    np.testing.assert_array_equal(left.m, right.m)
    # equal as represented quantities (num * exp(m), den * exp(m)); same m, so compare directly.
    # The numerators have both signs and may cancel (1e-5 + 0.5 - 0.5), so their rounding is
    # bounded by the magnitude of the summed terms, not of the result; denominators are positive.
    magnitude = sum(abs(x.num) * np.exp(x.m - left.m) for x in (a, b, c) if x.m > -np.inf)
    np.testing.assert_array_less(np.abs(left.num - right.num), 1e-14 * magnitude + 1e-300)
    np.testing.assert_allclose(left.den, right.den, rtol=1e-12, atol=1e-300)
    for x in (left, right):
        assert all(bool(jnp.all(jnp.isfinite(y))) for y in (x.num, x.den))
    empty = SoftmaxState(jnp.array(-np.inf), jnp.zeros(2), jnp.array(0.0))
    for x, y in zip(_combine(empty, a), a):  # identity
        np.testing.assert_allclose(x, y, rtol=1e-15)


def test_prefix_bad_inputs_raise():
    s, v = random_inputs(6)
    with pytest.raises(ValueError, match="scores: expected shape"):
        prefix_softmax_attention(s[0], v)
    with pytest.raises(ValueError, match="values: expected shape"):
        prefix_softmax_attention(s, v[:, :-1])
    with pytest.raises(ValueError, match="method"):
        prefix_softmax_attention(s, v, method="chunked")
    with pytest.raises(ValueError, match="scores: expected a floating"):
        prefix_softmax_attention(s.astype(np.int32), v)
    with pytest.raises(ValueError, match="initial_state.num"):
        prefix_softmax_attention(s, v, initial_state=(s[:, 0], v[:, 0, :, :1], s[:, 0]))
    with pytest.raises(ValueError, match="segment_ids"):
        prefix_softmax_attention(s, v, segment_ids=SEGMENT_IDS.astype(np.float64))


# ----------------------------------------------------------------------------- quadratic
def loop_attention(q, k, v, window=None, segment_ids=None, scale=None):
    b, t, h, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    o = np.zeros(v.shape)
    for bb in range(b):
        for i in range(t):
            keys = [j for j in range(i + 1) if window is None or i - j < window]
            if segment_ids is not None:
                keys = [j for j in keys if segment_ids[bb, j] == segment_ids[bb, i]]
            logits = scale * np.einsum("hd,jhd->jh", q[bb, i], k[bb, keys])
            w = np.exp(logits - logits.max(0))
            o[bb, i] = np.einsum("jh,jhe->he", w / w.sum(0), v[bb, keys])
    return o


def qkv(seed, shape=(B, T, H, 5, DV), dtype=np.float64):
    rng = np.random.default_rng(seed)
    b, t, h, dk, dv = shape
    q, k = rng.normal(size=(2, b, t, h, dk))
    return q.astype(dtype), k.astype(dtype), rng.normal(size=(b, t, h, dv)).astype(dtype)


@pytest.mark.parametrize("window", [None, 1, 4, 100])
@pytest.mark.parametrize("packed", [False, True])
def test_causal_attention_matches_loop(window, packed):
    q, k, v = qkv(7)
    ids = SEGMENT_IDS if packed else None
    o = causal(q, k, v, window=window, segment_ids=ids)
    np.testing.assert_allclose(o, loop_attention(q, k, v, window, ids), **TOL)


def test_causal_attention_gradients_and_prefix_agreement():
    q, k, v = qkv(8)
    # one query attending causally = prefix softmax attention with s_i = scale q . k_i
    q_fixed = np.broadcast_to(q[:, -1:], q.shape)
    scores = np.einsum("bthd,bthd->bth", q_fixed, k) * 5**-0.5
    np.testing.assert_allclose(causal(q_fixed, k, v), prefix(scores, v)[0], **TOL)
    rng = np.random.default_rng(0)
    co = rng.normal(size=v.shape)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(causal_softmax_attention(q, k, v, window=3) * co),
                            argnums=(0, 1, 2)))
    got = grad(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in got)
    check_grads(lambda q, k, v: causal_softmax_attention(q, k, v, window=3),
                              (q[:1, :6], k[:1, :6], v[:1, :6]), order=1, modes=["rev"])


def test_causal_attention_float32_and_bfloat16():
    q, k, v = qkv(9, shape=(1, 200, 2, 16, 8))
    ref = loop_attention(q, k, v, window=50)
    o = causal(*(x.astype(np.float32) for x in (q, k, v)), window=50)
    assert o.dtype == jnp.float32
    assert rel_err(o, ref) < 2e-6  # measured 1.3e-7
    o = causal(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    assert o.dtype == jnp.bfloat16


def test_causal_attention_bad_inputs_raise():
    q, k, v = qkv(10)
    with pytest.raises(ValueError, match="q: expected shape"):
        causal_softmax_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k: expected shape"):
        causal_softmax_attention(q, k[..., :-1], v)
    with pytest.raises(ValueError, match="v: expected shape"):
        causal_softmax_attention(q, k, v[:, :-1])
    with pytest.raises(ValueError, match="window"):
        causal_softmax_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="q: expected a floating"):
        causal_softmax_attention(q.astype(np.int32), k, v)
    with pytest.raises(ValueError, match="segment_ids"):
        causal_softmax_attention(q, k, v, segment_ids=SEGMENT_IDS[:, :-1])
