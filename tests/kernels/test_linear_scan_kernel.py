"""pallas_kernels.linear_scan (interpret mode on CPU) against a float64 loop of
h_t = a_t h_{t-1} + b_t, and ssmjax.scan.linear_scan(method="pallas") against
method="sequential" (values and every gradient).

Shapes are chosen to exercise the tiling with small interpret-mode programs:
d = 20 with block_d = 8 (three feature blocks, the last one padded), T = 21 with
block_t = 4 (five unrolled chunks and a remainder of one step).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_scan import BlockSizes, linear_scan as kernel
from ssmjax.scan.linear import linear_scan, matrix_scan

Bt, T, D = 2, 21, 20
SMALL = BlockSizes(block_d=8, block_t=4)


def oracle(a, b, h0, reverse=False):
    """The recurrence one step at a time in numpy float64."""
    a, b = np.broadcast_to(np.asarray(a, np.float64), b.shape), np.asarray(b, np.float64)
    h = np.asarray(h0, np.float64)
    hs = np.zeros(b.shape)
    for t in range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs[:, t] = h
    return hs, h


def inputs(seed, shape=(Bt, T, D), dtype=jnp.float32, a_batch=None):
    """Decays in [0.6, 1), normal inputs and state (numpy RNG: no jax compilation)."""
    rng = np.random.default_rng(seed)
    a_shape = shape if a_batch is None else (a_batch,) + shape[1:]
    a = jnp.asarray(rng.uniform(0.6, 1.0, a_shape), dtype)
    b = jnp.asarray(rng.standard_normal(shape), dtype)
    h0 = jnp.asarray(rng.standard_normal((shape[0],) + shape[2:]), dtype)
    return a, b, h0


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.abs(x - ref).max() / np.abs(ref).max()


# ----------------------------------------------------------------------------- kernel
@pytest.mark.parametrize(
    "reverse, with_h0, a_batch", [(False, True, None), (True, True, None), (True, False, 1)]
)
def test_kernel_matches_loop_float32(reverse, with_h0, a_batch):
    """float32 inputs and carry against the float64 loop. Max error relative to the
    largest entry measured 4e-8..6e-8; asserted < 1e-6 (at most T = 21 roundings of unit
    roundoff 6e-8 per state, decays < 1 so errors do not grow). a_batch = 1: decays
    shared over the batch (read through the index map, never broadcast in memory)."""
    a, b, h0 = inputs(0, a_batch=a_batch)
    h, last = kernel(a, b, h0 if with_h0 else None, reverse=reverse, block_sizes=SMALL, interpret=True)
    ref_h, ref_last = oracle(a, b, h0 if with_h0 else np.zeros((Bt, D)), reverse)
    assert h.shape == (Bt, T, D) and last.shape == (Bt, D)
    assert h.dtype == jnp.float32 and last.dtype == jnp.float32
    assert rel_err(h, ref_h) < 1e-6
    assert rel_err(last, ref_last) < 1e-6


def test_kernel_is_exact_in_float64():
    """With float64 inputs the kernel computes the same multiply-adds as the loop."""
    a, b, h0 = inputs(1, dtype=jnp.float64)
    h, last = kernel(a, b, h0, block_sizes=SMALL, interpret=True)
    ref_h, ref_last = oracle(a, b, h0)
    np.testing.assert_allclose(h, ref_h, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(last, ref_last, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("block_sizes", [BlockSizes(block_d=32, block_t=8), BlockSizes(block_d=4, block_t=32)])
def test_kernel_block_size_invariance(block_sizes):
    """One feature block bigger than d / many blocks; a time block longer than T (no full
    chunk, remainder only): same result as the default tiling, bit for bit."""
    a, b, h0 = inputs(2)
    want = kernel(a, b, h0, block_sizes=SMALL, interpret=True)
    got = kernel(a, b, h0, block_sizes=block_sizes, interpret=True)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "reverse, a_batch, dtype, block_t_tpu",
    [(False, None, jnp.float32, 8), (True, 1, jnp.float32, 8), (True, None, jnp.bfloat16, 16), (False, 1, jnp.float32, 64)],
)
def test_tpu_time_tiled_kernel_matches_loop(reverse, a_batch, dtype, block_t_tpu):
    """The TPU version (time as a sequential grid axis, carry in VMEM scratch) run by the
    interpreter: T = 21 is padded to whole tiles of 8 or 16 steps (3 or 2 tiles; one tile
    of 24 for block_t_tpu = 64) with a = 1, b = 0, so neither h nor h_last may change.
    float32 against the float64 loop as above (< 1e-6); bfloat16 outputs are rounded to
    8 bits (unit roundoff 2^-8 = 3.9e-3), asserted < 1e-2 of the largest entry."""
    a, b, h0 = inputs(6, dtype=dtype, a_batch=a_batch)
    bs = BlockSizes(block_d=8, block_t=4, block_t_tpu=block_t_tpu)
    h, last = kernel(a, b, h0, reverse=reverse, block_sizes=bs, interpret=True, platform="tpu")
    ref_h, ref_last = oracle(a, b, h0, reverse)
    assert h.shape == (Bt, T, D) and last.shape == (Bt, D) and last.dtype == jnp.float32
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    assert rel_err(h, ref_h) < tol
    assert rel_err(last, ref_last) < (1e-6 if dtype == jnp.float32 else 1e-5)


def test_kernel_bfloat16_inputs_accumulate_in_float32():
    """bf16 in, bf16 states out, but the carry (and h_last) stays float32: h_last matches
    the float64 loop on the same bf16 values to float32 accuracy (measured 5e-8), the
    stored states to one bf16 rounding (unit roundoff 2^-8; measured 2.9e-3)."""
    a, b, h0 = inputs(3, dtype=jnp.bfloat16)
    h, last = kernel(a, b, h0, block_sizes=SMALL, interpret=True)
    assert h.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    ref_h, ref_last = oracle(a.astype(jnp.float32), b.astype(jnp.float32), h0.astype(jnp.float32))
    assert rel_err(last, ref_last) < 1e-6
    assert rel_err(h.astype(jnp.float32), ref_h) < 2 ** -8


def test_kernel_bad_arguments():
    a, b, h0 = inputs(4)
    with pytest.raises(ValueError, match="a: expected shape"):
        kernel(a[:, 1:], b, interpret=True)
    with pytest.raises(ValueError, match="h0: expected shape"):
        kernel(a, b, h0[:, 1:], interpret=True)
    with pytest.raises(ValueError, match="real floating"):
        kernel(a.astype(jnp.complex64), b, interpret=True)
    with pytest.raises(ValueError, match="block_sizes.block_d"):
        BlockSizes(block_d=24)
    with pytest.raises(ValueError, match="platform"):
        kernel(a, b, platform="metal")


@pytest.mark.parametrize("platform, lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernel_lowers_for_gpu_and_tpu(platform, lowering):
    """No accelerator here: check that the kernel lowers (Triton IR for CUDA, Mosaic for
    TPU; compiling that to machine code needs the device), forward and reverse."""
    a, b, h0 = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((2, 64, 256), (2, 64, 256), (2, 256)))
    for reverse in (False, True):
        f = jax.jit(functools.partial(kernel, reverse=reverse, platform=platform))
        text = f.trace(a, b, h0).lower(lowering_platforms=(lowering,)).as_text()
        assert ("triton" if platform == "gpu" else "tpu_custom_call") in text


# ----------------------------------------------------------------------------- ssmjax wiring
@pytest.mark.parametrize("reverse", [False, True])
def test_ssmjax_pallas_matches_sequential_with_gradients(reverse):
    """Trailing feature axes [3, 5] are flattened into the kernel's d; packed sequences
    (segment_ids) and initial_state included. Gradients of every input through the
    custom VJP (whose backward runs the kernel again, reversed). float32: the kernel does
    the same multiply-adds in the same order as the sequential scan (measured difference
    0); asserted < 1e-6 relative, to allow an FMA-contracting compiler."""
    a, b, h0 = inputs(6, (Bt, T, 3, 5))
    segment_ids = jnp.array([[0] * 8 + [1] * 9 + [2] * 4, [7] * T])

    def run(method):
        f = lambda a, b, h0: linear_scan(  # noqa: E731
            a, b, initial_state=h0, reverse=reverse, segment_ids=segment_ids, method=method
        )
        (h, last), vjp = jax.vjp(f, a, b, h0)
        rng = np.random.default_rng(7)
        cts = tuple(jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in (h, last))
        return (h, last) + vjp(cts)

    got, want = run("pallas"), run("sequential")
    assert got[0].dtype == jnp.float32
    for x, y in zip(got, want):
        assert x.shape == y.shape
        assert rel_err(x, y) < 1e-6
    # Packing is real: the middle document does not see the first one.
    alone, _ = linear_scan(a[:1, 8:17], b[:1, 8:17], reverse=reverse, method="pallas")
    np.testing.assert_allclose(got[0][:1, 8:17], alone, rtol=1e-6, atol=1e-6)


def test_ssmjax_pallas_reset_drops_initial_state_and_broadcast_decay():
    a, b, h0 = inputs(8)
    reset = jnp.zeros((Bt, T), bool).at[:, 0].set(True).at[0, 11].set(True)
    got = linear_scan(a[:1], b, initial_state=h0, reset=reset, method="pallas")
    want = linear_scan(a[:1], b, initial_state=h0, reset=reset, method="sequential")
    for x, y in zip(got, want):
        assert rel_err(x, y) < 1e-6
    np.testing.assert_allclose(got[0], linear_scan(a[:1], b, reset=reset, method="pallas")[0])


def test_ssmjax_pallas_under_jit_and_vmap():
    a, b, h0 = inputs(9, (2, 6, 4))
    f = lambda a, b, h0: linear_scan(a, b, initial_state=h0, method="pallas")[1]  # noqa: E731
    got = jax.jit(jax.vmap(f))(a[:, None], b[:, None], h0[:, None])
    want = jax.vmap(lambda a, b, h0: linear_scan(a, b, initial_state=h0, method="sequential")[1])(
        a[:, None], b[:, None], h0[:, None]
    )
    assert rel_err(got, want) < 1e-6


def test_ssmjax_pallas_errors():
    a, b, h0 = inputs(10, (2, 5, 3))
    with pytest.raises(ValueError, match="no kernel for matrix_scan"):
        matrix_scan(jnp.ones((2, 5, 3, 3)), b, method="pallas")
    with pytest.raises(ValueError, match="no complex kernel"):
        linear_scan(a.astype(jnp.complex64), b, method="pallas")
    with pytest.raises(ValueError, match="method"):
        linear_scan(a, b, method="triton")


def test_pallas_on_a_backend_without_kernels_is_a_value_error(monkeypatch):
    """method='pallas' on a backend with no Pallas support is a clear ValueError (what
    'auto' picks per platform: tests/scan/test_dispatch.py)."""
    b = jnp.ones((2, 5, 3))
    monkeypatch.setattr(jax, "default_backend", lambda: "metal")
    with pytest.raises(ValueError, match="no kernel for the 'metal' backend"):
        linear_scan(b, b, method="pallas")


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="compiled kernels need a GPU/TPU "
                    "(run with JAX_PLATFORMS=cuda or tpu; conftest defaults to cpu)")
def test_compiled_kernel_matches_sequential_on_accelerator():
    """On a GPU/TPU: the compiled kernel (not interpreted), values and gradients, at a
    size with many programs and a long time loop."""
    a, b, h0 = inputs(11, (4, 1000, 300))

    def run(method):
        f = lambda a, b, h0: linear_scan(a, b, initial_state=h0, method=method)  # noqa: E731
        out, vjp = jax.vjp(f, a, b, h0)
        return out + vjp(out)

    for x, y in zip(run("pallas"), run("sequential")):
        assert rel_err(x, y) < 1e-5
