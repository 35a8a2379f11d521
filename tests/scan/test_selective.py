"""selective_scan against a numpy transcription of Mamba's Algorithm 2 /
mamba_ssm's selective_scan_ref (float64).

On CPU ``method="chunked"`` runs the C++ kernels (``ssmjax/scan/_selective_cpu.cc``) where
they build; ``"chunked-xla"`` below is the same method with them off (the XLA chunks)."""

import contextlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.scan import _ffi, selective_scan, staged_platforms
from ssmjax.scan.selective import _cpu_kernels_ready
from tests.scan.compiled import compiled

XLA_CHUNKED = "chunked-xla"
METHODS = ["sequential", "associative", "chunked", XLA_CHUNKED]
Bt, T, D, N = 2, 19, 6, 4
scan = compiled(selective_scan)


@contextlib.contextmanager
def evaluation(method):
    """The ``method=`` argument for a test method: ``XLA_CHUNKED`` is ``"chunked"`` with the
    CPU kernels off."""
    with _ffi.cpu_kernels(False) if method == XLA_CHUNKED else contextlib.nullcontext():
        yield "chunked" if method == XLA_CHUNKED else method


def oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, h0=None, cut=None):
    u, delta, A, B, C = (np.asarray(x) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias)
    if softplus:
        delta = np.log1p(np.exp(delta))
    if B.ndim == 4:  # groups: channel d uses group d // (D / g)
        B, C = (np.repeat(x, u.shape[2] // x.shape[2], axis=2) for x in (B, C))
    else:
        B, C = B[:, :, None, :], C[:, :, None, :]
    x = np.zeros(u.shape[:1] + A.shape, np.result_type(A, B)) if h0 is None else np.array(h0)
    ys = []
    for t in range(u.shape[1]):
        decay = np.exp(delta[:, t, :, None] * A)
        if cut is not None:
            decay = np.where(cut[:, t, None, None], 0, decay)
        x = decay * x + (delta[:, t] * u[:, t])[..., None] * B[:, t]
        y = (x * C[:, t]).sum(-1)
        ys.append(2 * y.real if np.iscomplexobj(y) else y)
    y = np.stack(ys, 1)
    if D is not None:
        y = y + np.asarray(D) * u
    if z is not None:
        z = np.asarray(z)
        y = y * z / (1 + np.exp(-z))
    return y, x


def make_inputs(key, groups=None, complex_=False, t=T):
    ks = jax.random.split(key, 9)
    bc_shape = (Bt, t, N) if groups is None else (Bt, t, groups, N)
    u = jax.random.normal(ks[0], (Bt, t, D))
    delta = 0.5 * jax.random.normal(ks[1], (Bt, t, D))
    A = -jnp.exp(jax.random.normal(ks[2], (D, N)))
    B = jax.random.normal(ks[3], bc_shape)
    C = jax.random.normal(ks[4], bc_shape)
    h0 = jax.random.normal(ks[5], (Bt, D, N))
    if complex_:
        A = A + 1j * jnp.pi * jax.random.normal(ks[6], (D, N))
        B = B + 1j * jax.random.normal(ks[7], bc_shape)
        C = C + 1j * jax.random.normal(ks[8], bc_shape)
        h0 = h0.astype(jnp.complex128)
    extras = dict(
        D=jax.random.normal(ks[6], (D,)),
        z=jax.random.normal(ks[7], (Bt, t, D)),
        delta_bias=jax.random.normal(ks[8], (D,)),
    )
    return (u, delta, A, B, C), h0, extras


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("groups, complex_", [(None, False), (2, False), (None, True), (3, True)])
def test_matches_reference(method, groups, complex_):
    args, h0, extras = make_inputs(jax.random.PRNGKey(0), groups, complex_)
    with evaluation(method) as method:
        y, last = scan(
            *args, **extras, delta_softplus=True, initial_state=h0, method=method, chunk_size=4
        )
    ref_y, ref_last = oracle(*args, **extras, softplus=True, h0=h0)
    np.testing.assert_allclose(y, ref_y, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(last, ref_last, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("method", ["associative", "chunked", XLA_CHUNKED])
@pytest.mark.parametrize("groups, complex_", [(None, False), (2, False), (3, True)])
def test_gradients_match_sequential_autodiff(method, groups, complex_):
    """Every input, initial_state included, through each method's backward (chunked:
    the hand-written chunk-recompute VJP, or the CPU kernels' backward) == autodiff of
    the sequential oracle."""
    args, h0, extras = make_inputs(jax.random.PRNGKey(1), groups, complex_)
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    cts = (jax.random.normal(k1, (Bt, T, D)), jax.random.normal(k2, h0.shape).astype(h0.dtype))

    def run(method):
        def f(*xs):
            *args, h0, D_, z, bias = xs
            return selective_scan(
                *args, D=D_, z=z, delta_bias=bias, delta_softplus=True,
                initial_state=h0, method=method, chunk_size=5,
            )
        with evaluation(method) as method:
            return jax.jit(lambda *xs: jax.vjp(f, *xs)[1](cts))(*args, h0, *extras.values())

    for got, want in zip(run(method), run("sequential")):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["chunked", XLA_CHUNKED])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 19, 64])
def test_chunk_size_invariance(chunk_size, method):
    args, h0, _ = make_inputs(jax.random.PRNGKey(3))
    ref_y, ref_last = oracle(*args, h0=h0)
    with evaluation(method) as method:
        y, last = scan(*args, initial_state=h0, method=method, chunk_size=chunk_size)
    np.testing.assert_allclose(y, ref_y, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(last, ref_last, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("method", METHODS)
def test_split_sequence_and_reverse(method):
    with evaluation(method) as method:
        _split_sequence_and_reverse(method)


def _split_sequence_and_reverse(method):
    (u, delta, A, B, C), h0, _ = make_inputs(jax.random.PRNGKey(4))
    y, last = scan(u, delta, A, B, C, initial_state=h0, method=method, chunk_size=4)
    y1, mid = scan(u[:, :7], delta[:, :7], A, B[:, :7], C[:, :7], initial_state=h0, method=method)
    y2, last2 = scan(u[:, 7:], delta[:, 7:], A, B[:, 7:], C[:, 7:], initial_state=mid, method=method)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(last2, last, rtol=1e-11, atol=1e-11)
    flip = lambda x: jnp.flip(x, 1)  # noqa: E731
    y_rev, last_rev = scan(u, delta, A, B, C, initial_state=h0, reverse=True, method=method, chunk_size=4)
    ref_y, ref_last = oracle(flip(u), flip(delta), A, flip(B), flip(C), h0=h0)
    np.testing.assert_allclose(y_rev, flip(ref_y), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(last_rev, ref_last, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("method", METHODS)
def test_empty_sequence_returns_the_initial_state(method):
    """T = 0 (e.g. a split call at a boundary): no output, the state passes through."""
    (u, delta, A, B, C), h0, _ = make_inputs(jax.random.PRNGKey(6))
    with evaluation(method) as method:
        y, last = scan(u[:, :0], delta[:, :0], A, B[:, :0], C[:, :0], initial_state=h0, method=method)
    assert y.shape == (u.shape[0], 0, u.shape[2])
    np.testing.assert_array_equal(last, h0)


@pytest.mark.parametrize("method", METHODS)
def test_packed_sequences(method):
    with evaluation(method) as method:
        _packed_sequences(method)


def _packed_sequences(method):
    args, h0, _ = make_inputs(jax.random.PRNGKey(5))
    segment_ids = jnp.array([[0] * 6 + [1] * 9 + [2] * 4, [5] * 19])
    y, _ = scan(*args, initial_state=h0, segment_ids=segment_ids, method=method, chunk_size=4)
    cut = np.concatenate([np.zeros((Bt, 1), bool), np.asarray(segment_ids[:, 1:] != segment_ids[:, :-1])], 1)
    np.testing.assert_allclose(y, oracle(*args, h0=h0, cut=cut)[0], rtol=1e-11, atol=1e-11)
    # The second document in row 0 is independent of everything before it.
    u, delta, A, B, C = args
    alone, _ = scan(u[:1, 6:15], delta[:1, 6:15], A, B[:1, 6:15], C[:1, 6:15], method=method)
    np.testing.assert_allclose(y[:1, 6:15], alone, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("method", METHODS)
def test_float32_and_bfloat16(method):
    """float32 max relative error vs the float64 oracle: ~1e-6 measured, asserted < 1e-5."""
    with evaluation(method) as method:
        _float32_and_bfloat16(method)


def _float32_and_bfloat16(method):
    args, h0, extras = make_inputs(jax.random.PRNGKey(6), t=300)
    ref_y, _ = oracle(*args, **extras, softplus=True)
    f32 = [x.astype(jnp.float32) for x in args]
    y, last = scan(*f32, **extras, delta_softplus=True, method=method)
    assert y.dtype == jnp.float32 and last.dtype == jnp.float32
    assert np.abs(np.asarray(y) - ref_y).max() / np.abs(ref_y).max() < 1e-5
    y16, last16 = scan(*[x.astype(jnp.bfloat16) for x in args], method=method)
    assert y16.dtype == jnp.bfloat16 and last16.dtype == jnp.float32
    assert bool(jnp.isfinite(y16.astype(jnp.float32)).all())


@pytest.mark.parametrize("method", ["chunked", XLA_CHUNKED])
def test_chunked_backward_does_not_materialise_state_sequence(method):
    """Compiled temp memory of the chunked fwd+bwd is O(b t d) (the per-token cotangents;
    measured 1.25 MB here, ~5 arrays of [b, t, d]) while plain autodiff of the sequential
    scan stores [b, t, d, n] arrays (4.2 MB each) several times over."""
    b, t, d, n = 1, 1024, 64, 16
    ks = jax.random.split(jax.random.PRNGKey(7), 5)
    u, delta = jax.random.normal(ks[0], (b, t, d), jnp.float32), jax.random.uniform(ks[1], (b, t, d), jnp.float32)
    A = -jnp.ones((d, n), jnp.float32)
    B, C = (jax.random.normal(k, (b, t, n), jnp.float32) for k in ks[2:4])

    def temp_bytes(method):
        loss = lambda *xs: selective_scan(*xs, method=method)[0].sum()  # noqa: E731
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        return grad.lower(u, delta, A, B, C).compile().memory_analysis().temp_size_in_bytes

    per_token = b * t * d * 4
    full_states = per_token * n
    with evaluation(method) as chunked:
        assert temp_bytes(chunked) < 8 * per_token
    assert temp_bytes("sequential") > 2 * full_states


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(u=jnp.ones((2, 5))), "u: expected shape"),
        (dict(delta=jnp.ones((2, 4, 6))), "delta: expected shape"),
        (dict(A=jnp.ones((5, 4))), "A: expected shape"),
        (dict(B=jnp.ones((2, 5, 3))), "B: expected shape"),
        (dict(C=jnp.ones((2, 5, 2, 4))), "C: expected shape"),
        (dict(B=jnp.ones((2, 5, 4, 4)), C=jnp.ones((2, 5, 4, 4))), "groups"),
        (dict(D=jnp.ones((5,))), "D: expected shape"),
        (dict(z=jnp.ones((2, 5, 5))), "z: expected shape"),
        (dict(initial_state=jnp.ones((2, 6, 3))), "initial_state"),
        (dict(u=jnp.ones((2, 5, 6), int)), "u: expected a floating"),
        (dict(method="pscan"), "method"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    args = dict(u=jnp.ones((2, 5, 6)), delta=jnp.ones((2, 5, 6)), A=-jnp.ones((6, 4)),
                B=jnp.ones((2, 5, 4)), C=jnp.ones((2, 5, 4)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        selective_scan(**args)


needs_kernels = pytest.mark.skipif(
    shutil.which("c++") is None or jax.default_backend() != "cpu", reason="no C++ compiler or not on CPU"
)


@needs_kernels
def test_cpu_kernels_build_and_run_for_chunked():
    """With a compiler on a CPU host the kernels build, and "chunked" (so "auto") lowers to
    their custom calls; with them off, it does not."""
    assert _cpu_kernels_ready(), _ffi.status()
    args, _, _ = make_inputs(jax.random.PRNGKey(8))
    grad = jax.grad(lambda *xs: selective_scan(*xs, method="auto")[0].sum(), argnums=(0, 1, 2, 3, 4))
    assert "ssmjax_selective_scan_backward" in jax.jit(grad).lower(*args).as_text()
    with _ffi.cpu_kernels(False):
        assert "ssmjax_selective_scan" not in jax.jit(grad).lower(*args).as_text()
    # staging an accelerator too: the kernels for the CPU only, the XLA chunks elsewhere
    chunked = jax.grad(lambda *xs: selective_scan(*xs, method="chunked")[0].sum(), argnums=(0, 1, 2, 3, 4))
    with staged_platforms("cpu", "cuda"):
        lowered = {p: jax.jit(chunked).trace(*args).lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda")}
    assert "ssmjax_selective_scan_backward" in lowered["cpu"]
    assert "ssmjax_selective_scan" not in lowered["cuda"]


@needs_kernels
@pytest.mark.parametrize("batch, groups", [(1, 2), (1, 8), (3, None)])
def test_cpu_kernels_channel_blocks_and_vmap(batch, groups):
    """Few batch rows and many channels split each row into channel blocks whose dB / dC
    partial sums are added (groups straddling blocks included); under vmap the kernels
    run once per mapped element. Kernel == the XLA chunks == the oracle, in float64."""
    b, t, d, n = batch, 11, 256, 3
    ks = jax.random.split(jax.random.PRNGKey(9), 7)
    bc = (b, t, n) if groups is None else (b, t, groups, n)
    u, delta = jax.random.normal(ks[0], (b, t, d)), 0.5 * jax.random.normal(ks[1], (b, t, d))
    A = -jnp.exp(jax.random.normal(ks[2], (d, n)))
    B, C = jax.random.normal(ks[3], bc), jax.random.normal(ks[4], bc)
    h0 = jax.random.normal(ks[5], (b, d, n))
    ct = jax.random.normal(ks[6], (b, t, d))

    def grads(*xs):
        f = lambda *xs: selective_scan(*xs[:5], initial_state=xs[5], delta_softplus=True,  # noqa: E731
                                       method="chunked", chunk_size=4)
        (y, last), vjp = jax.vjp(f, *xs)
        return (y, last) + vjp((ct, last))

    inputs = (u, delta, A, B, C, h0)
    got = jax.jit(grads)(*inputs)
    with _ffi.cpu_kernels(False):
        want = jax.jit(grads)(*inputs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-11)
    ref_y, ref_last = oracle(u, delta, A, B, C, softplus=True, h0=h0)
    np.testing.assert_allclose(got[0], ref_y, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(got[1], ref_last, rtol=1e-11, atol=1e-11)
    # vmap over a leading axis of u: one kernel call per element, same values
    mapped = jax.jit(jax.vmap(lambda u: grads(u, delta, A, B, C, h0)))(jnp.stack([u, 2 * u]))
    for g, w in zip(mapped, got):
        np.testing.assert_allclose(g[0], w, rtol=1e-11, atol=1e-11)
