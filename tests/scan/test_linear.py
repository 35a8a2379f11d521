"""linear_scan / matrix_scan against plain loops of h_t = A_t h_{t-1} + b_t (float64)."""

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

from ssmjax.scan import linear_scan, matrix_scan, staged_platforms
from ssmjax.scan.linear import DENSE, DIAGONAL, combine, complex_lti_scan
from tests.scan.compiled import compiled

METHODS = ["sequential", "associative", "chunked"]
B, T, D = 2, 23, 3
lscan, mscan = compiled(linear_scan), compiled(matrix_scan)  # the value tests' calls, under jit


def vjp(f, primals, cotangents):
    """``vjp(f, *primals)(cotangents)`` compiled as one ``jit``."""
    return jax.jit(lambda *xs: jax.vjp(f, *xs)[1](cotangents))(*primals)


def oracle(a, b, h0, dense=False, reverse=False, cut=None):
    """The recurrence, one step at a time in numpy (float64)."""
    a, b = np.asarray(a, np.complex128 if np.iscomplexobj(a) else np.float64), np.asarray(b)
    a = np.broadcast_to(a, b.shape + ((b.shape[-1],) if dense else ()))
    h, hs = np.array(h0), np.zeros(np.broadcast_shapes(b.shape, h0[:, None].shape), a.dtype)
    order = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    for t in order:
        a_t = a[:, t] if cut is None else np.where(cut[:, t].reshape((-1,) + (1,) * (a.ndim - 2)), 0, a[:, t])
        h = (np.einsum("...ij,...j->...i", a_t, h) if dense else a_t * h) + b[:, t]
        hs[:, t] = h
    return hs, h


def random_inputs(key, shape=(B, T, D), complex_=False):
    ka, kb, kh, ki = jax.random.split(key, 4)
    a = jax.random.uniform(ka, shape, jnp.float64, 0.6, 1.0)
    b = jax.random.normal(kb, shape, jnp.float64)
    h0 = jax.random.normal(kh, (shape[0],) + shape[2:], jnp.float64)
    if complex_:
        a = a * jnp.exp(1j * jax.random.uniform(ki, shape, jnp.float64, 0, np.pi))
        b = b + 1j * jax.random.normal(ki, shape, jnp.float64)
        h0 = h0.astype(jnp.complex128)
    return a, b, h0


def loop_loss(a, b, h0, dense=False):
    """Autodiff reference: a plain lax.scan of the recurrence."""
    a = jnp.broadcast_to(a, b.shape + ((b.shape[-1],) if dense else ()))

    def step(h, ab):
        h = (ab[0] @ h[..., None])[..., 0] + ab[1] if dense else ab[0] * h + ab[1]
        return h, h

    last, hs = jax.lax.scan(step, h0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
    return jnp.swapaxes(hs, 0, 1), last


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk_size", [None, 4, 64])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_matches_oracle(method, chunk_size, reverse):
    a, b, h0 = random_inputs(jax.random.PRNGKey(0))
    hs, last = lscan(
        a, b, initial_state=h0, method=method, chunk_size=chunk_size, reverse=reverse
    )
    ref_hs, ref_last = oracle(a, b, h0, reverse=reverse)
    np.testing.assert_allclose(hs, ref_hs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(last, ref_last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_complex_and_broadcast_decay(method):
    a, b, h0 = random_inputs(jax.random.PRNGKey(1), complex_=True)
    a_shared = a[:1]  # one decay sequence for the whole batch
    hs, last = lscan(a_shared, b, initial_state=h0, method=method, chunk_size=5)
    ref_hs, ref_last = oracle(a_shared, b, h0)
    np.testing.assert_allclose(hs, ref_hs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(last, ref_last, rtol=1e-12, atol=1e-12)
    constant = a[0, 0]  # [d]: an LTI recurrence
    np.testing.assert_allclose(
        lscan(constant, b, method=method)[0], oracle(constant, b, 0 * h0)[0], rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("complex_", [False, True])
def test_linear_scan_gradients(method, complex_):
    """Custom VJP (a reverse linear scan) == autodiff through a plain loop, for a, b, h0."""
    a, b, h0 = random_inputs(jax.random.PRNGKey(2), complex_=complex_)
    a = a[:1]  # the gradient must also be summed back over the broadcast batch axis
    ct_hs, ct_last = random_inputs(jax.random.PRNGKey(3), complex_=complex_)[1:]
    f = lambda a, b, h0: linear_scan(a, b, initial_state=h0, method=method, chunk_size=4)  # noqa: E731
    got = vjp(f, (a, b, h0), (ct_hs, ct_last))
    want = vjp(loop_loss, (a, b, h0), (ct_hs, ct_last))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-11)


def test_check_grads_small():
    a, b, h0 = random_inputs(jax.random.PRNGKey(4), shape=(1, 5, 2))
    f = lambda a, b, h0: linear_scan(a, b, initial_state=h0, method="chunked", chunk_size=2)  # noqa: E731
    check_grads(jax.jit(f), (a, b, h0), order=1, modes=("rev",))


@pytest.mark.parametrize("method", METHODS)
def test_split_sequence_carries_state(method):
    a, b, h0 = random_inputs(jax.random.PRNGKey(5))
    full, full_last = lscan(a, b, initial_state=h0, method=method, chunk_size=4)
    first, mid = lscan(a[:, :9], b[:, :9], initial_state=h0, method=method, chunk_size=4)
    second, last = lscan(a[:, 9:], b[:, 9:], initial_state=mid, method=method, chunk_size=4)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, rtol=1e-12)
    np.testing.assert_allclose(last, full_last, rtol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reverse", [False, True])
def test_packed_sequences_do_not_leak(method, reverse):
    """segment_ids == running each document on its own (initial state for the first)."""
    a, b, h0 = random_inputs(jax.random.PRNGKey(6))
    lengths = [[5, 11, 7], [23, 0, 0]]
    segment_ids = jnp.array([np.repeat(np.arange(3), row) for row in lengths])
    hs, last = lscan(
        a, b, initial_state=h0, segment_ids=segment_ids, method=method, chunk_size=4, reverse=reverse
    )
    for row, row_lengths in enumerate(lengths):
        start = 0
        docs = [n for n in row_lengths if n]
        for i, n in enumerate(docs):
            sl = slice(start, start + n)
            first_in_scan_order = (i == len(docs) - 1) if reverse else (i == 0)
            init = h0[row : row + 1] if first_in_scan_order else jnp.zeros_like(h0[:1])
            ref_hs, ref_last = oracle(a[row : row + 1, sl], b[row : row + 1, sl], init, reverse=reverse)
            np.testing.assert_allclose(hs[row, sl], ref_hs[0], rtol=1e-12, atol=1e-12)
            if (i == 0) if reverse else (i == len(docs) - 1):
                np.testing.assert_allclose(last[row], ref_last[0], rtol=1e-12, atol=1e-12)
            start += n
    reset = jnp.concatenate([jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    hs_reset, _ = lscan(
        a, b, initial_state=h0, reset=reset, method=method, chunk_size=4, reverse=reverse
    )
    np.testing.assert_allclose(hs_reset, hs, rtol=1e-12, atol=1e-12)


def test_reset_at_first_token_drops_initial_state():
    a, b, h0 = random_inputs(jax.random.PRNGKey(7))
    reset = jnp.zeros((B, T), bool).at[:, 0].set(True)
    np.testing.assert_allclose(
        lscan(a, b, initial_state=h0, reset=reset)[0], lscan(a, b)[0], rtol=1e-12
    )


@pytest.mark.parametrize("method", METHODS)
def test_float32_error_is_small(method):
    """float32 vs the float64 oracle at T = 1000: max relative error below 2e-5
    (measured ~2e-6 (chunked/sequential) to ~5e-6 (associative); decays near 1 make the
    state a sum of ~1000 terms, so errors grow like sqrt(T) * eps)."""
    a, b, h0 = random_inputs(jax.random.PRNGKey(8), shape=(2, 1000, 4))
    a = 0.5 + 0.5 * a  # slow decays: long memory
    hs, _ = lscan(a.astype(jnp.float32), b.astype(jnp.float32), method=method)
    assert hs.dtype == jnp.float32
    ref, _ = oracle(a, b, 0 * h0)
    rel = np.abs(np.asarray(hs) - ref).max() / np.abs(ref).max()
    assert rel < 2e-5, rel


def test_bfloat16_inputs_accumulate_in_float32():
    a, b, h0 = random_inputs(jax.random.PRNGKey(9))
    hs, last = lscan(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    assert hs.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    ref = oracle(np.asarray(a.astype(jnp.bfloat16), np.float64), np.asarray(b.astype(jnp.bfloat16), np.float64), 0 * h0)[1]
    np.testing.assert_allclose(last, ref, rtol=1e-5, atol=1e-5)


def test_jit_and_vmap():
    a, b, h0 = random_inputs(jax.random.PRNGKey(10))
    f = jax.jit(lambda a, b: linear_scan(a, b, method="chunked", chunk_size=4)[0])
    np.testing.assert_allclose(f(a, b), oracle(a, b, 0 * h0)[0], rtol=1e-12)
    batched = jax.jit(jax.vmap(lambda a, b: linear_scan(a[None], b[None])[0][0]))(a, b)
    np.testing.assert_allclose(batched, oracle(a, b, 0 * h0)[0], rtol=1e-12)


# ------------------------------------------------------------------------ matrix_scan
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reverse", [False, True])
def test_matrix_scan_matches_oracle_and_gradients(method, reverse):
    k1, k2 = jax.random.split(jax.random.PRNGKey(11))
    _, b, h0 = random_inputs(k1)
    A = 0.5 * jax.random.normal(k2, (B, T, D, D), jnp.float64)
    hs, last = mscan(A, b, initial_state=h0, method=method, chunk_size=5, reverse=reverse)
    ref_hs, ref_last = oracle(A, b, h0, dense=True, reverse=reverse)
    np.testing.assert_allclose(hs, ref_hs, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(last, ref_last, rtol=1e-11, atol=1e-11)
    if not reverse:
        ct = random_inputs(jax.random.PRNGKey(12))[1:]
        f = lambda A, b, h0: matrix_scan(A, b, initial_state=h0, method=method, chunk_size=5)  # noqa: E731
        got = vjp(f, (A, b, h0), ct)
        want = vjp(lambda A, b, h0: loop_loss(A, b, h0, dense=True), (A, b, h0), ct)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_block_diagonal_matrix_scan_equals_dense(method):
    """Blocks on a leading axis == the same transition written as one dense matrix."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(13), 3)
    blocks = 0.5 * jax.random.normal(k1, (B, T, 2, 3, 3), jnp.float64)
    b = jax.random.normal(k2, (B, T, 2, 3), jnp.float64)
    dense = jnp.zeros((B, T, 6, 6)).at[..., :3, :3].set(blocks[:, :, 0]).at[..., 3:, 3:].set(blocks[:, :, 1])
    hs_blocks, _ = mscan(blocks, b, method=method, chunk_size=4)
    hs_dense, _ = mscan(dense, b.reshape(B, T, 6), method="sequential")
    np.testing.assert_allclose(hs_blocks.reshape(B, T, 6), hs_dense, rtol=1e-11, atol=1e-11)


def test_matrix_scan_packed_and_shared_transition():
    k1, k2 = jax.random.split(jax.random.PRNGKey(14))
    _, b, h0 = random_inputs(k1)
    A = 0.5 * jax.random.normal(k2, (D, D), jnp.float64)  # one LTI transition for all t
    segment_ids = jnp.array([[0] * 10 + [1] * 13, [0] * 23])
    hs, _ = mscan(A, b, initial_state=h0, segment_ids=segment_ids, method="chunked", chunk_size=4)
    cut = np.asarray(segment_ids[:, 1:] != segment_ids[:, :-1])
    cut = np.concatenate([np.zeros((B, 1), bool), cut], 1)
    np.testing.assert_allclose(hs, oracle(A, b, h0, dense=True, cut=cut)[0], rtol=1e-11, atol=1e-11)


# ------------------------------------------------------------------------ algebra
finite = st.floats(-2, 2, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float64, (3, 2, 2, 2), elements=finite), hnp.arrays(np.float64, (3, 2, 2), elements=finite))
def test_combine_is_associative(As, bs):
    for kind, a in ((DENSE, As), (DIAGONAL, As[..., 0])):
        x, y, z = ((a[i], bs[i]) for i in range(3))
        left = combine(kind, combine(kind, x, y), z)
        right = combine(kind, x, combine(kind, y, z))
        for l_, r_ in zip(left, right):
            np.testing.assert_allclose(l_, r_, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: linear_scan(jnp.ones((2, 5, 3)), jnp.ones((2, 5, 4))), "a: expected a shape broadcastable"),
        (lambda: linear_scan(jnp.ones((2, 5, 3)), jnp.ones((2, 5, 3)), method="fft"), "method"),
        (lambda: linear_scan(jnp.ones((3,)), jnp.ones((3,))), "b: expected shape"),
        (lambda: linear_scan(jnp.ones((2, 5, 3), int), jnp.ones((2, 5, 3))), "a: expected a floating"),
        (lambda: linear_scan(jnp.ones((2, 5, 3)), jnp.ones((2, 5, 3)), initial_state=jnp.ones((2, 4))), "initial_state"),
        (lambda: linear_scan(jnp.ones((2, 5, 3)), jnp.ones((2, 5, 3)), chunk_size=0), "chunk_size"),
        (lambda: linear_scan(jnp.ones((2, 5, 3)), jnp.ones((2, 5, 3)), segment_ids=jnp.ones((2, 4), int)), "segment_ids"),
        (lambda: linear_scan(jnp.ones((2, 5, 3)), jnp.ones((2, 5, 3)), reset=jnp.ones((2, 5))), "reset"),
        (lambda: matrix_scan(jnp.ones((2, 5, 3, 2)), jnp.ones((2, 5, 3))), "A: expected a shape broadcastable"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("scan, a_shape", [(linear_scan, (2, 0, 3)), (matrix_scan, (2, 0, 3, 3))])
def test_empty_sequence_returns_initial_state(scan, a_shape):
    h0 = jnp.arange(6.0).reshape(2, 3)
    h, h_last = scan(jnp.ones(a_shape), jnp.ones((2, 0, 3)), initial_state=h0)
    assert h.shape == (2, 0, 3)
    np.testing.assert_array_equal(h_last, h0)


# --------------------------------------------------- complex_lti_scan (constant complex decay, real pairs)
def pairs(z):
    """complex ``[..., N]`` -> real pairs ``[..., 2, N]``."""
    return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-2)


def lti_inputs(key, shape=(B, T, D)):
    """A constant complex decay [N] (|a| < 1), complex inputs and state, and pairs of a and b."""
    a, b, h0 = random_inputs(key, shape, complex_=True)
    return a[0, 0], b, h0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_complex_lti_scan_matches_oracle(method, reverse, packed):
    a, b, h0 = lti_inputs(jax.random.PRNGKey(20))
    segment_ids = jnp.array([np.repeat(np.arange(3), [5, 11, 7]), np.zeros(T, int)]) if packed else None
    cut = None if segment_ids is None else np.asarray(
        carry_cut_mask_for_test(segment_ids, reverse))
    h, last = compiled(complex_lti_scan)(pairs(a), pairs(b), initial_state=h0, reverse=reverse,
                                         segment_ids=segment_ids, method=method)
    ref_h, ref_last = oracle(a, b, h0, reverse=reverse, cut=cut)
    np.testing.assert_allclose(h, pairs(ref_h), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(last, ref_last, rtol=1e-12, atol=1e-12)


def carry_cut_mask_for_test(segment_ids, reverse):
    """Where the state is cut, in time order (the oracle's ``cut``): the id changes between
    a position and its predecessor in the scan direction."""
    change = np.asarray(segment_ids[:, 1:] != segment_ids[:, :-1])
    no = np.zeros((segment_ids.shape[0], 1), bool)
    return np.concatenate([change, no] if reverse else [no, change], axis=1)


@pytest.mark.parametrize("a_shape", ["shared", "per_row"])
@pytest.mark.parametrize("reverse", [False, True])
def test_complex_lti_scan_gradients_match_linear_scan(a_shape, reverse):
    """The custom VJP (one loop the other way, da accumulated in its carry) == linear_scan's
    gradients for the decay (summed over what it broadcasts), the inputs and the state,
    with resets."""
    a, b, h0 = lti_inputs(jax.random.PRNGKey(21))
    a = a if a_shape == "shared" else a * jnp.linspace(0.5, 1.0, B)[:, None]  # [N] or [B, N]
    reset = jax.random.bernoulli(jax.random.PRNGKey(22), 0.2, (B, T))
    ct_h, ct_last = pairs(random_inputs(jax.random.PRNGKey(23), complex_=True)[1]), h0[::-1]

    def ours(a, b, h0):
        return complex_lti_scan(a, b, initial_state=h0, reverse=reverse, reset=reset, method="sequential")

    def reference(a, b, h0):
        a = jax.lax.complex(a[..., 0, :], a[..., 1, :])
        h, last = linear_scan(a if a.ndim == 1 else a[:, None], jax.lax.complex(b[..., 0, :], b[..., 1, :]),
                              initial_state=h0, reverse=reverse, reset=reset, method="sequential")
        return pairs(h), last

    got = vjp(ours, (pairs(a), pairs(b), h0), (ct_h, ct_last))
    want = vjp(reference, (pairs(a), pairs(b), h0), (ct_h, ct_last))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-11)


def test_complex_lti_scan_cpu_path_has_no_time_sized_copies():
    """On CPU the value and gradient trace to loops over strided slices: no flip, no
    transpose and no broadcast of anything the size of the sequence (the copies that cost
    the LRU layer half its time under linear_scan)."""
    a, b, _ = lti_inputs(jax.random.PRNGKey(24), shape=(3, 17, 5))

    def loss(a, b, w):  # a cotangent of h that is an input, not a broadcast of the loss's 1.0
        h, last = complex_lti_scan(a, b, method="auto")
        return jnp.vdot(h, w) + jnp.sum(jnp.abs(last) ** 2)

    with staged_platforms("cpu"):
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(pairs(a), pairs(b), pairs(b))
    size = b.size * 2

    def equations(j):
        for eqn in j.eqns:
            yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from equations(sub)

    copies = [eqn for eqn in equations(jaxpr.jaxpr) if eqn.primitive.name in ("rev", "transpose", "broadcast_in_dim")]
    assert copies  # the per-step swap of real and imaginary parts is a rev of one step
    for eqn in copies:
        assert all(np.prod(v.aval.shape) < size for v in eqn.outvars), eqn


def test_complex_lti_scan_empty_sequence_and_bad_inputs():
    h0 = (jnp.arange(6.0) + 1j).reshape(2, 3)
    h, last = complex_lti_scan(jnp.ones((2, 3)), jnp.ones((2, 0, 2, 3)), initial_state=h0)
    assert h.shape == (2, 0, 2, 3)
    np.testing.assert_array_equal(last, h0)
    for kwargs, message in [
        (dict(b=jnp.ones((2, 5, 3, 4))), "b: expected real pairs"),
        (dict(b=jnp.ones((2, 5, 2, 4), jnp.complex64)), "b: expected real pairs"),
        (dict(a=jnp.ones((2, 3))), "a: expected a shape broadcastable"),
        (dict(method="pallas"), "method"),
        (dict(method="fft"), "method"),
        (dict(initial_state=jnp.ones((2, 2, 4))), "initial_state"),
    ]:
        args = dict(a=jnp.ones((2, 4)), b=jnp.ones((2, 5, 2, 4))) | kwargs
        with pytest.raises(ValueError, match=message):
            complex_lti_scan(args.pop("a"), args.pop("b"), **args)
