"""gated_linear_attention against plain loops of S_t = diag(exp g_t) S_{t-1} + k_t v_t^T.

Oracles: a numpy loop of the recurrence (float64), the SSD quadratic form written from
Dao and Gu (2024), and ``method="sequential"`` (``lax.scan``) for gradients. Every method
is compared in float64 (values, final states, all gradients incl. ``log_decay`` and
``initial_state``).

float32 (measured on this file's inputs, normwise max|err| / max|ref| against the float64
oracle, t = 100, d = 16): outputs 0.9e-7 .. 1.5e-7 for every method with a decay and
1.7e-7 .. 2.6e-7 without one (no decay: the state grows like sqrt(t), more cancellation);
final states <= 3.1e-7. With strong decays (g down to -20 per step, t = 16384) chunked
vs sequential in float32 differ by 1.9e-7 (per-head) and 8.2e-7 (per-channel: inside a
sub-chunk the decays are differences of sub-chunk cumulative sums of up to 8 * 20 = 160,
i.e. ~160 * 6e-8 = 1e-5 absolute in the exponent). Tolerances are ~10x those numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ssmjax.scan.gla import gated_linear_attention

METHODS = ["sequential", "parallel", "chunked"]
KINDS = [None, "head", "channel"]
B, T, H, DK, DV = 2, 23, 2, 4, 3
TOL = dict(rtol=1e-10, atol=1e-10)


def random_inputs(seed, kind, shape=(B, T, H, DK, DV), dtype=np.float64, strength=1.0):
    b, t, h, dk, dv = shape
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, b, t, h, dk)).astype(dtype)
    v = rng.normal(size=(b, t, h, dv)).astype(dtype)
    s0 = rng.normal(size=(b, h, dk, dv)).astype(dtype)
    g = None
    if kind == "head":
        g = (-strength * rng.uniform(size=(b, t, h))).astype(dtype)
    elif kind == "channel":
        g = (-strength * rng.uniform(size=(b, t, h, dk))).astype(dtype)
    return q, k, v, g, s0


def loop_gla(q, k, v, g, s0, cut=None, scale=None):
    """The recurrence one token at a time in numpy float64 (fla's naive_recurrent_gla)."""
    q, k, v, s0 = (np.asarray(x, np.float64) for x in (q, k, v, s0))
    b, t, h, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    if g is None:
        a = np.ones((b, t, h, 1))
    else:
        g = np.asarray(g, np.float64)
        a = np.exp(g[..., None] if g.ndim == 3 else g)
    S, o = s0.copy(), np.zeros(v.shape)
    for i in range(t):
        a_i = a[:, i] if cut is None else np.where(cut[:, i, None, None], 0.0, a[:, i])
        S = a_i[..., None] * S + k[:, i, :, :, None] * v[:, i, :, None, :]
        o[:, i] = scale * np.einsum("bhk,bhkv->bhv", q[:, i], S)
    return o, S


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.max(np.abs(x - ref)) / np.max(np.abs(ref))


# Jitted: one compilation per configuration is much faster than eager op-by-op dispatch.
gla = jax.jit(gated_linear_attention, static_argnames=("method", "chunk_size"))


def run(q, k, v, g, s0, **kw):
    return gla(q, k, v, log_decay=g, initial_state=s0, **kw)


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, chunk_size", [("sequential", 64), ("parallel", 64), ("chunked", 12)])
def test_matches_loop_oracle(kind, method, chunk_size):
    q, k, v, g, s0 = random_inputs(0, kind)
    o, s = run(q, k, v, g, s0, method=method, chunk_size=chunk_size)
    ref_o, ref_s = loop_gla(q, k, v, g, s0)
    np.testing.assert_allclose(o, ref_o, **TOL)
    np.testing.assert_allclose(s, ref_s, **TOL)


def test_matches_ssd_quadratic_form():
    """Mamba-2's SSD with q = C, k = B, v = x dt, g = A dt, scale = 1 (ssd_minimal):
    Y = (L * C B^T) X with L_ij = exp(A_{j+1} + ... + A_i) for j <= i."""
    q, k, v, g, _ = random_inputs(1, "head", shape=(1, 19, 1, 3, 2))
    G = np.cumsum(g[0, :, 0])
    L = np.tril(np.exp(G[:, None] - G[None, :]))
    ref = (L * (q[0, :, 0] @ k[0, :, 0].T)) @ v[0, :, 0]
    for method in METHODS:
        o, _ = gla(q, k, v, log_decay=g, scale=1.0, method=method, chunk_size=4)
        np.testing.assert_allclose(o[0, :, 0], ref, **TOL)


@pytest.mark.parametrize("kind", ["head", "channel"])
def test_chunk_size_invariance(kind):
    q, k, v, g, s0 = random_inputs(2, kind, shape=(1, 50, 2, 4, 3))
    ref_o, ref_s = run(q, k, v, g, s0, method="sequential")
    # 1: one token per chunk; 6, 12, 50: sub-chunks of 2, 4 and 2 (3, 3 and 25 of them);
    # 32, 48, 64: sub-chunks of 8 (4 and 6 of them, 64: one chunk = the parallel form).
    for chunk_size in (1, 6, 12, 32, 48, 50, 64):
        o, s = run(q, k, v, g, s0, method="chunked", chunk_size=chunk_size)
        np.testing.assert_allclose(o, ref_o, **TOL, err_msg=f"chunk_size={chunk_size}")
        np.testing.assert_allclose(s, ref_s, **TOL, err_msg=f"chunk_size={chunk_size}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["head", "channel"])
def test_split_sequence_invariance(method, kind):
    q, k, v, g, s0 = random_inputs(3, kind)
    ref_o, ref_s = run(q, k, v, g, s0, method=method, chunk_size=8)
    split = 10  # not a multiple of the chunk size
    o1, s1 = run(q[:, :split], k[:, :split], v[:, :split], g[:, :split], s0, method=method, chunk_size=8)
    o2, s2 = run(q[:, split:], k[:, split:], v[:, split:], g[:, split:], s1, method=method, chunk_size=8)
    np.testing.assert_allclose(np.concatenate([o1, o2], axis=1), ref_o, **TOL)
    np.testing.assert_allclose(s2, ref_s, **TOL)


def test_broadcast_decay_scale_and_empty_sequence():
    q, k, v, _, s0 = random_inputs(4, None)
    retnet = -np.log(np.array([2.0, 32.0]))[None, None, :]  # constant per-head decay [1, 1, h]
    o, s = run(q, k, v, retnet, s0, method="chunked", chunk_size=8, scale=0.3)
    ref_o, ref_s = loop_gla(q, k, v, np.broadcast_to(retnet, (B, T, H)), s0, scale=0.3)
    np.testing.assert_allclose(o, ref_o, **TOL)
    np.testing.assert_allclose(s, ref_s, **TOL)
    o, s = run(q[:, :0], k[:, :0], v[:, :0], None, s0)
    assert o.shape == (B, 0, H, DV)
    np.testing.assert_array_equal(s, s0)


# ----------------------------------------------------------------------------- packing
def document_runs(q, k, v, g, s0, segment_ids):
    """Each document run on its own (first one from s0, the others from zeros)."""
    o = np.zeros(v.shape)
    finals = []
    for b in range(q.shape[0]):
        ids = segment_ids[b]
        starts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
        state = s0[b : b + 1]
        for n, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
            state = state if n == 0 else np.zeros_like(state)
            o_doc, state = loop_gla(q[b : b + 1, lo:hi], k[b : b + 1, lo:hi], v[b : b + 1, lo:hi],
                                    None if g is None else g[b : b + 1, lo:hi], state)
            o[b, lo:hi] = o_doc[0]
        finals.append(state[0])
    return o, np.stack(finals)


SEGMENT_IDS = np.array([[0] * 5 + [1] * 9 + [2] * 1 + [3] * 8, [7] * 12 + [3] * 11])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, chunk_size", [("sequential", 64), ("parallel", 64), ("chunked", 4)])
def test_packed_sequences_equal_separate_runs(kind, method, chunk_size):
    q, k, v, g, s0 = random_inputs(5, kind)
    o, s = run(q, k, v, g, s0, segment_ids=SEGMENT_IDS, method=method, chunk_size=chunk_size)
    ref_o, ref_s = document_runs(q, k, v, g, s0, SEGMENT_IDS)
    np.testing.assert_allclose(o, ref_o, **TOL)
    np.testing.assert_allclose(s, ref_s, **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_reset_equals_segment_ids_and_drops_initial_state(method):
    q, k, v, g, s0 = random_inputs(6, "channel")
    reset = np.zeros((B, T), bool)
    reset[:, 1:] = SEGMENT_IDS[:, 1:] != SEGMENT_IDS[:, :-1]
    reset[1, 0] = True  # row 1 drops s0
    o, s = run(q, k, v, g, s0, reset=reset, method=method, chunk_size=8)
    zero_row1 = s0.copy()
    zero_row1[1] = 0.0
    ref_o, ref_s = document_runs(q, k, v, g, zero_row1, SEGMENT_IDS)
    np.testing.assert_allclose(o, ref_o, **TOL)
    np.testing.assert_allclose(s, ref_s, **TOL)


# ----------------------------------------------------------------------------- gradients
def vjp_all(method, chunk_size, q, k, v, g, s0, seed=0, **kw):
    """Gradients of <o, R1> + <final_state, R2> for random cotangents R1, R2."""
    rng = np.random.default_rng(100 + seed)
    co = rng.normal(size=v.shape)
    cs = rng.normal(size=s0.shape)

    def loss(q, k, v, g, s0):
        o, s = run(q, k, v, g, s0, method=method, chunk_size=chunk_size, **kw)
        return jnp.sum(o * co) + jnp.sum(s * cs)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, g, s0)


@pytest.mark.parametrize("kind", ["head", "channel"])
@pytest.mark.parametrize("cuts", [False, True])
@pytest.mark.parametrize("method, chunk_size", [("parallel", 64), ("chunked", 6), ("chunked", 16)])
def test_gradients_match_sequential(kind, cuts, method, chunk_size):
    q, k, v, g, s0 = random_inputs(7, kind)
    kw = dict(segment_ids=SEGMENT_IDS) if cuts else {}
    ref = vjp_all("sequential", 64, q, k, v, g, s0, **kw)
    got = vjp_all(method, chunk_size, q, k, v, g, s0, **kw)
    for name, x, r in zip(["q", "k", "v", "log_decay", "initial_state"], got, ref):
        np.testing.assert_allclose(x, r, **TOL, err_msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_without_decay(method):
    q, k, v, _, s0 = random_inputs(8, None)
    rng = np.random.default_rng(0)
    co = rng.normal(size=v.shape)

    def loss(method):
        return lambda q, k, v, s0: jnp.sum(run(q, k, v, None, s0, method=method, chunk_size=5)[0] * co)

    got = jax.jit(jax.grad(loss(method), argnums=(0, 1, 2, 3)))(q, k, v, s0)
    ref = jax.jit(jax.grad(loss("sequential"), argnums=(0, 1, 2, 3)))(q, k, v, s0)
    for x, r in zip(got, ref):
        np.testing.assert_allclose(x, r, **TOL)


@pytest.mark.parametrize("kind", ["head", "channel"])
def test_check_grads_finite_differences(kind):
    """The custom VJP of the chunked form against finite differences (tiny shapes)."""
    q, k, v, g, s0 = random_inputs(9, kind, shape=(1, 7, 1, 2, 2))
    reset = np.array([[False, False, False, True, False, False, False]])

    def f(q, k, v, g, s0):
        o, s = run(q, k, v, g, s0, method="chunked", chunk_size=4, reset=reset)
        return o, s

    check_grads(f, (q, k, v, g, s0), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_jit_and_vmap():
    q, k, v, g, s0 = random_inputs(10, "channel")
    f = jax.jit(jax.vmap(lambda q, k, v, g, s0: run(q, k, v, g, s0, method="chunked", chunk_size=8)))
    stack = lambda x: jnp.stack([x, 2 * x])
    o, s = f(*(stack(x) for x in (q, k, v, g, s0)))
    ref_o, ref_s = loop_gla(2 * q, 2 * k, 2 * v, 2 * g, 2 * s0)
    np.testing.assert_allclose(o[1], ref_o, **TOL)
    np.testing.assert_allclose(s[1], ref_s, **TOL)


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_float32_error(kind, method):
    q, k, v, g, s0 = random_inputs(11, kind, shape=(2, 100, 2, 16, 16))
    ref_o, ref_s = loop_gla(q, k, v, g, s0)
    o, s = run(*(None if x is None else x.astype(np.float32) for x in (q, k, v, g, s0)),
               method=method, chunk_size=32)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    # measured <= 3.1e-7 for every method and kind (see the module docstring)
    assert rel_err(o, ref_o) < 3e-6
    assert rel_err(s, ref_s) < 3e-6


@pytest.mark.parametrize("kind", ["head", "channel"])
def test_long_sequence_strong_decay_float32(kind):
    """t = 16384, g down to -20 per step: exp(-G) alone would overflow float32 after ~5
    tokens; only non-positive exponents are formed, so nothing is inf/NaN."""
    q, k, v, _, _ = random_inputs(12, None, shape=(1, 16384, 2, 16, 16), dtype=np.float32)
    rng = np.random.default_rng(13)
    shape = (1, 16384, 2) if kind == "head" else (1, 16384, 2, 16)
    g = (-20.0 * rng.uniform(size=shape) ** 3).astype(np.float32)  # mixes strong and weak decays
    ref_o, ref_s = jax.jit(lambda q, k, v, g: gated_linear_attention(q, k, v, log_decay=g, method="sequential"))(q, k, v, g)

    def loss(q, k, v, g):
        o, s = gated_linear_attention(q, k, v, log_decay=g, method="chunked")
        return jnp.sum(o) + jnp.sum(s), (o, s)

    grads, (o, s) = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, g)
    for x in (o, s, *grads):
        assert bool(jnp.all(jnp.isfinite(x)))
    # measured 1.9e-7 (head) / 8.2e-7 (channel) for o, 1.6e-7 for the state
    assert rel_err(o, ref_o) < (2e-6 if kind == "head" else 1e-5)
    assert rel_err(s, ref_s) < 2e-6


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_inputs(method):
    q, k, v, g, s0 = random_inputs(14, "channel", dtype=np.float32)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    o, s = gla(*bf, log_decay=g, method=method, chunk_size=8)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    ref_o, ref_s = loop_gla(*(np.asarray(x, np.float64) for x in bf), g, np.zeros_like(s0))
    # accumulation is float32; only the inputs and the output rounding are bf16 (2^-8)
    assert rel_err(o, ref_o) < 1e-2
    assert rel_err(s, ref_s) < 1e-5


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise():
    q, k, v, g, s0 = random_inputs(15, "head")
    f = gated_linear_attention
    with pytest.raises(ValueError, match="q: expected shape"):
        f(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="k: expected shape"):
        f(q, k[..., :-1], v)
    with pytest.raises(ValueError, match="v: expected shape"):
        f(q, k, v[:, :-1])
    with pytest.raises(ValueError, match="log_decay"):
        f(q, k, v, log_decay=g[:, :, :1, None].repeat(3, -1))  # [b, t, 1, 3]: dk is 4
    with pytest.raises(ValueError, match="log_decay"):
        f(q, k, v, log_decay=g[:, :-1])
    with pytest.raises(ValueError, match="log_decay"):
        f(q, k, v, log_decay=g[0, 0])
    with pytest.raises(ValueError, match="initial_state"):
        f(q, k, v, initial_state=s0[..., :-1])
    with pytest.raises(ValueError, match="method"):
        f(q, k, v, method="associative")
    with pytest.raises(ValueError, match="chunk_size"):
        f(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="q: expected a floating"):
        f(q.astype(np.int32), k, v)
    with pytest.raises(ValueError, match="log_decay: expected a floating"):
        f(q, k, v, log_decay=g.astype(np.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        f(q, k, v, segment_ids=SEGMENT_IDS[:, :-1])
    with pytest.raises(ValueError, match="scale"):
        f(q, k, v, scale=np.ones(2))
