"""pallas_kernels.selective_scan (interpret mode on CPU) against the ssmjax.scan
sequential oracle (Mamba's Algorithm 2 as one lax.scan step per token), and
ssmjax.scan.selective_scan(method="pallas") against method="sequential": values, final
state and the gradients of every input (initial_state included).

Kernel-level shapes exercise the tiling: d = 20 with block_d = 8 (three channel blocks,
the last padded), n = 5 (padded to 8), T = 21 with chunk = 4 (five chunks and a
remainder of one token; the backward recomputes each chunk from its stored state).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan import (
    BlockSizes,
    selective_scan_backward,
    selective_scan_forward,
)
from ssmjax.scan import _dispatch
from ssmjax.scan.selective import selective_scan

Bt, T, D, N = 2, 21, 20, 5
SMALL = BlockSizes(block_d=8, chunk=4)


def make_inputs(seed, groups=None, dtype=jnp.float32, shape=(Bt, T, D, N)):
    """Random Mamba-like inputs (numpy RNG: no jax compilation per shape)."""
    b, t, d, n = shape
    rng = np.random.default_rng(seed)
    bc = (b, t, n) if groups is None else (b, t, groups, n)
    as_jax = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    u = as_jax(rng.standard_normal((b, t, d)))
    delta = as_jax(np.log1p(np.exp(rng.standard_normal((b, t, d)) - 1)))
    A = as_jax(-np.exp(rng.standard_normal((d, n))))  # mamba layout [d, n]
    B, C = as_jax(rng.standard_normal(bc)), as_jax(rng.standard_normal(bc))
    x0 = as_jax(rng.standard_normal((b, d, n)))  # mamba layout [b, d, n]
    reset = np.zeros((b, t), bool)  # packed documents (used where shapes allow)
    if b >= 2 and t > 9:
        reset[0, 9] = reset[1, 0] = reset[1, t - 4] = True
    return (u, delta, A, B, C), x0, jnp.asarray(reset)


def forward_loop(u, delta, A, B, C):
    """Algorithm 2 from zero state, one token at a time in numpy float64 (ungrouped B/C)."""
    u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
    x = np.zeros((u.shape[0],) + A.shape)
    ys = []
    for t in range(u.shape[1]):
        x = np.exp(delta[:, t, :, None] * A) * x + (delta[:, t] * u[:, t])[..., None] * B[:, t, None]
        ys.append((x * C[:, t, None]).sum(-1))
    return np.stack(ys, 1), x


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.abs(x - ref).max() / np.abs(ref).max()


def oracle_with_vjp(args, x0, reset, cotangents):
    """ssmjax's sequential selective scan (the oracle) and its autodiff cotangents, in
    the kernel's layout (A [n, d], states [b, n, d])."""

    def f(u, delta, A, B, C, x0):
        return selective_scan(u, delta, A, B, C, initial_state=x0, reset=reset, method="sequential")

    (y, last), vjp = jax.vjp(f, *args, x0)
    dy, d_last = cotangents
    du, ddelta, dA, dB, dC, dx0 = vjp((dy, jnp.swapaxes(d_last, 1, 2)))
    swap = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    return (y, swap(last)), (du, ddelta, swap(dA), dB, dC, swap(dx0))


def run_kernels(args, x0, reset, cotangents, with_keep=True, with_x0=True):
    u, delta, A, B, C = args
    keep = ~reset if with_keep else None
    y, last, states = selective_scan_forward(
        u, delta, A.T, B, C, jnp.swapaxes(x0, 1, 2) if with_x0 else None, keep,
        block_sizes=SMALL, interpret=True,
    )
    grads = selective_scan_backward(
        u, delta, A.T, B, C, keep, states, *cotangents, block_sizes=SMALL, interpret=True
    )
    return (y, last), grads, states


def random_cotangents(shape, dtype, seed=99):
    b, t, d, n = shape
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in ((b, t, d), (b, n, d)))


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("groups, with_keep, with_x0", [(None, True, True), (2, False, False)])
def test_kernels_match_oracle_float64(groups, with_keep, with_x0):
    """float64 measures the algorithm: forward values, final state and every cotangent of
    the backward kernel (recompute from chunk states) == autodiff of the sequential scan.
    Grouped B/C: d = 20 in 2 groups of 10 channels, each padded to 16 (two blocks)."""
    args, x0, reset = make_inputs(0, groups, jnp.float64)
    if not with_keep:
        reset = jnp.zeros_like(reset)
    if not with_x0:
        x0 = jnp.zeros_like(x0)
    cts = random_cotangents((Bt, T, D, N), jnp.float64)
    got_out, got_grads, states = run_kernels(args, x0, reset, cts, with_keep, with_x0)
    want_out, want_grads = oracle_with_vjp(args, x0, reset, cts)
    # ceil(21 / 4) chunk states, n padded to 8, channels to whole blocks
    assert states.shape == (Bt, 6, 8, 24 if groups is None else 32)
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_kernel_bfloat16_inputs_keep_float32_state():
    """bf16 u/delta/B/C/A: y comes out in bf16 but the state is carried in float32, so
    the final state matches the float64 loop on the same bf16 values to float32 accuracy
    (measured 6e-8, asserted 1e-6), and y to one bf16 rounding (unit roundoff 2^-8;
    measured 2.2e-3)."""
    args, _, _ = make_inputs(2, dtype=jnp.bfloat16)
    u, delta, A, B, C = args
    y, last, _ = selective_scan_forward(
        u, delta, A.T, B, C, block_sizes=SMALL, save_chunk_states=False, interpret=True
    )
    assert y.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    ref_y, ref_last = forward_loop(*args)
    assert rel_err(last, np.swapaxes(ref_last, 1, 2)) < 1e-6
    assert rel_err(y.astype(jnp.float32), ref_y) < 2 ** -8


def test_kernel_bad_arguments():
    (u, delta, A, B, C), x0, _ = make_inputs(3)
    with pytest.raises(ValueError, match="complex kernel"):
        selective_scan_forward(u, delta, A.T.astype(jnp.complex64), B, C, interpret=True)
    with pytest.raises(ValueError, match="A: expected shape"):
        selective_scan_forward(u, delta, A, B, C, interpret=True)  # [d, n] instead of [n, d]
    with pytest.raises(ValueError, match="groups"):
        selective_scan_forward(u, delta, A.T, B[:, :, None].repeat(3, 2), C[:, :, None].repeat(3, 2), interpret=True)
    with pytest.raises(ValueError, match="block_sizes.chunk"):
        BlockSizes(chunk=6)
    with pytest.raises(ValueError, match="chunk_states"):
        y, last, states = selective_scan_forward(u, delta, A.T, B, C, block_sizes=SMALL, interpret=True)
        selective_scan_backward(u, delta, A.T, B, C, None, states, y, last, interpret=True)


@pytest.mark.parametrize("platform, lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_for_gpu_and_tpu(platform, lowering):
    """No accelerator here: check that both kernels lower (Triton IR for CUDA, Mosaic for
    TPU), with the keep mask and grouped B/C, at a Mamba-like tile (n = 16)."""
    b, t, d, n = 2, 40, 256, 16
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    bs = BlockSizes()  # block_d is raised to 128 lanes for TPU
    ins = (spec(b, t, d), spec(b, t, d), spec(n, d), spec(b, t, 2, n), spec(b, t, 2, n))
    keep = jax.ShapeDtypeStruct((b, t), jnp.bool_)
    fwd = jax.jit(functools.partial(selective_scan_forward, block_sizes=bs, platform=platform))
    bwd = jax.jit(functools.partial(selective_scan_backward, block_sizes=bs, platform=platform))
    marker = "triton" if platform == "gpu" else "tpu_custom_call"
    assert marker in fwd.trace(*ins, spec(b, n, d), keep).lower(lowering_platforms=(lowering,)).as_text()
    states = spec(b, -(-t // bs.chunk), n, d)
    lowered = bwd.trace(*ins, keep, states, spec(b, t, d), spec(b, n, d)).lower(lowering_platforms=(lowering,))
    assert marker in lowered.as_text()


# ----------------------------------------------------------------------------- TPU kernels
# pallas_kernels.selective_scan_tpu through the public functions (platform="tpu"),
# interpreted: T = 21 in time tiles of 8 tokens on the sequential grid axis (three tiles,
# the last padded with 3 pass-through tokens), two chunks of 4 per tile.
TPU_SMALL = BlockSizes(block_d=8, chunk=4, block_t_tpu=8)


def run_tpu_kernels(args, x0, keep, cotangents):
    u, delta, A, B, C = args
    kw = dict(block_sizes=TPU_SMALL, interpret=True, platform="tpu")
    x0 = None if x0 is None else jnp.swapaxes(x0, 1, 2)
    y, last, states = selective_scan_forward(u, delta, A.T, B, C, x0, keep, **kw)
    grads = selective_scan_backward(u, delta, A.T, B, C, keep, states, *cotangents, **kw)
    return (y, last), grads, states


@pytest.mark.parametrize(
    "dtype, groups, with_keep, with_x0",
    [
        (jnp.float64, None, True, True),
        (jnp.float64, 2, False, False),
        (jnp.float32, 2, True, True),
        (jnp.float32, None, False, True),
    ],
)
def test_tpu_kernels_match_oracle(dtype, groups, with_keep, with_x0):
    """The TPU kernels (carry in VMEM scratch between time tiles; the backward walks the
    tiles and their chunks last to first, recomputing each chunk's states into scratch)
    == autodiff of the sequential scan in float64: every output and cotangent, to
    rounding in float64 (1e-12), and to 2e-6 of each one's largest entry in float32
    (measured: <= 2.2e-7). Grouped B/C: two groups of 10 channels, padded to 16."""
    args, x0, reset = make_inputs(11, groups, dtype)
    if not with_keep:
        reset = jnp.zeros_like(reset)
    cts = random_cotangents((Bt, T, D, N), dtype)
    got_out, got_grads, states = run_tpu_kernels(args, x0 if with_x0 else None, ~reset if with_keep else None, cts)
    up = lambda xs: tuple(x.astype(jnp.float64) for x in xs)  # noqa: E731
    x0 = x0 if with_x0 else jnp.zeros_like(x0)
    want_out, want_grads = oracle_with_vjp(up(args), x0.astype(jnp.float64), reset, up(cts))
    # 24 / 4 chunk states (time padded to whole tiles), n padded to 8, whole channel blocks
    assert states.shape == (Bt, 6, 8, 24 if groups is None else 32)
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        assert got.shape == want.shape and got.dtype == dtype
        if dtype == jnp.float64:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert rel_err(got, want) < 2e-6


@pytest.mark.parametrize("groups", [None, 2])
def test_tpu_kernels_bfloat16_inputs(groups):
    """bfloat16 u, delta, A, B, C, dy (the compiled TPU kernels copy 16-bit tiles into
    float32 scratch to read them a row at a time; the tile is raised to 16 rows): the
    state and its cotangent are carried in float32 (x_last, dx0 within 1e-6 of the
    float64 oracle on the same bf16 values; measured 1.4e-7), the bf16 results within one
    bf16 rounding (2^-8; measured <= 3e-3)."""
    args, x0, reset = make_inputs(2, groups, jnp.bfloat16)
    x0 = x0.astype(jnp.float32)
    dy, d_last = random_cotangents((Bt, T, D, N), jnp.bfloat16)
    cts = (dy, d_last.astype(jnp.float32))
    got_out, got_grads, states = run_tpu_kernels(args, x0, ~reset, cts)
    up = lambda xs: tuple(x.astype(jnp.float64) for x in xs)  # noqa: E731
    want_out, want_grads = oracle_with_vjp(up(args), x0.astype(jnp.float64), reset, up(cts))
    assert states.shape[1] == 32 // 4  # two tiles of 16 tokens
    for name, got, want in zip(("y", "x_last", "du", "ddelta", "dA", "dB", "dC", "dx0"), got_out + got_grads, want_out + want_grads):
        wide = name in ("x_last", "dx0")
        assert got.dtype == (jnp.float32 if wide else jnp.bfloat16), name
        assert rel_err(got, want) < (1e-6 if wide else 2**-8), name


def test_tpu_backward_refuses_a_residual_of_another_tiling():
    """The TPU residual has time_pad / chunk states (the GPU one ceil(T / chunk)), so it
    depends on block_t_tpu: a residual of another tiling is a ValueError naming it."""
    (u, delta, A, B, C), _, _ = make_inputs(3)
    bs = BlockSizes(block_d=8, chunk=4, block_t_tpu=16)  # time padded to 32: 8 states
    kw = dict(block_sizes=bs, interpret=True, platform="tpu")
    y, last, states = selective_scan_forward(u, delta, A.T, B, C, **kw)
    assert states.shape == (Bt, 8, 8, 24)
    with pytest.raises(ValueError, match=r"chunk_states: expected shape \(2, 6, 8, 24\) \(the TPU forward's"):
        selective_scan_backward(u, delta, A.T, B, C, None, states, y, last, block_sizes=TPU_SMALL, interpret=True, platform="tpu")


# ----------------------------------------------------------------------------- ssmjax wiring
WIRING = (Bt, T, 40, 4)  # d = 40 > the default block_d = 32: two channel blocks


def test_ssmjax_pallas_float32_matches_float64_sequential_with_gradients(groups=2, reverse=True):
    """Every input (u, delta, A, B, C, initial_state, D, z, delta_bias) through the
    custom VJP whose fwd/bwd are the two kernels, with grouped B/C, reverse=True and
    packed sequences (segment_ids), in float32 against the float64 sequential oracle.
    Max error relative to each output's largest entry, measured: 5e-8..1e-7 (outputs),
    up to 3e-7 (gradients; dA, dB and dC sum over time and channels). Asserted < 2e-6:
    ~T = 21 float32 roundings (unit roundoff 6e-8) per accumulated value, with margin."""
    args, x0, _ = make_inputs(4, groups, jnp.float64, shape=WIRING)
    rng = np.random.default_rng(5)
    d = WIRING[2]
    extras = tuple(jnp.asarray(rng.standard_normal(s)) for s in ((d,), args[0].shape, (d,)))
    segment_ids = jnp.array([[0] * 6 + [1] * 10 + [2] * 5, [4] * T])
    cts = random_cotangents(WIRING, jnp.float64, seed=6)
    cts = (cts[0], jnp.swapaxes(cts[1], 1, 2))

    def run(method, dtype):
        def f(u, delta, A, B, C, x0, D_, z, bias):
            return selective_scan(
                u, delta, A, B, C, D=D_, z=z, delta_bias=bias, delta_softplus=True,
                initial_state=x0, segment_ids=segment_ids, reverse=reverse, method=method, chunk_size=4,
            )

        cast = lambda xs: tuple(x.astype(dtype) for x in xs)  # noqa: E731
        (y, last), vjp = jax.vjp(f, *cast(args), x0.astype(dtype), *cast(extras))
        return (y, last) + vjp(cast(cts))

    got, want = run("pallas", jnp.float32), run("sequential", jnp.float64)
    for x, y in zip(got, want):
        assert x.shape == y.shape and x.dtype == jnp.float32
        assert rel_err(x, y) < 2e-6


def test_ssmjax_pallas_backward_keeps_chunk_states_not_state_sequence():
    """The residuals of method='pallas' are the inputs plus one state per chunk
    ([b, T / chunk, n, d]): nothing of size b * t * d * n, unlike autodiff of the
    sequential scan (checked too, so the test can fail)."""
    (u, delta, A, B, C), _, _ = make_inputs(8, shape=(1, 64, 32, 16))
    full_states = 1 * 64 * 32 * 16

    def residual_sizes(method):
        f = lambda *xs: selective_scan(*xs, method=method, chunk_size=16)[0]  # noqa: E731
        _, vjp = jax.vjp(f, u, delta, A, B, C)
        return sorted(x.size for x in jax.tree.leaves(vjp))

    sizes = residual_sizes("pallas")
    assert max(sizes) < full_states
    assert full_states // 16 in sizes  # 64 / 16 = 4 chunk states of [n, d] = [16, 32]
    assert max(residual_sizes("sequential")) >= full_states


def test_ssmjax_pallas_errors_and_auto(monkeypatch):
    (u, delta, A, B, C), _, _ = make_inputs(9, shape=(2, 5, 6, 4))
    with pytest.raises(ValueError, match="no complex kernel"):
        selective_scan(u, delta, A.astype(jnp.complex64), B, C, method="pallas")
    with pytest.raises(ValueError, match="chunk_size: method 'pallas' needs a power of two"):
        selective_scan(u, delta, A, B, C, method="pallas", chunk_size=6)
    # 'auto' takes the proven GPU kernel for real inputs only (the rest of its
    # per-platform choices: tests/scan/test_dispatch.py).
    for dtype, want in (("float32", "pallas"), ("complex64", "chunked")):
        case = _dispatch.case(dtype, time=5)
        assert _dispatch.plan("selective_scan", "auto", case)["cuda"] == want
    monkeypatch.setattr(jax, "default_backend", lambda: "metal")
    with pytest.raises(ValueError, match="no kernel for the 'metal' backend"):
        selective_scan(u, delta, A, B, C, method="pallas")


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="compiled kernels need a GPU/TPU "
                    "(run with JAX_PLATFORMS=cuda or tpu; conftest defaults to cpu)")
def test_compiled_kernels_match_sequential_on_accelerator():
    """On a GPU/TPU: both compiled kernels through the ssmjax wiring, values and every
    gradient, at a Mamba-like tile (n = 16, grouped B/C, packed rows, T % chunk != 0)."""
    args, x0, reset = make_inputs(10, groups=2, shape=(2, 300, 256, 16))

    def run(method):
        f = lambda *xs: selective_scan(*xs[:5], initial_state=xs[5], reset=reset, method=method)  # noqa: E731
        out, vjp = jax.vjp(f, *args, x0)
        return out + vjp(out)

    for x, y in zip(run("pallas"), run("sequential")):
        assert rel_err(x, y) < 1e-4
