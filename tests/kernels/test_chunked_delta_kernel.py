"""pallas_kernels.chunked_delta (interpret mode on CPU) against the ssmjax.scan oracle,
``delta_rule(method="sequential")`` (one lax.scan step per token of
S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t)
run in float64, and ``delta_rule(method="pallas")`` (the custom_vjp wiring) against the
same.

Kernel shapes exercise the tiling: T = 37 with chunk = 8 (four full chunks, one padded),
dk = 5 (padded to 8), dv = 6 (padded to 8: one value block, or two of 4 in the bf16 test,
whose partial dq, dk, dbeta and dg the wrapper sums). Tests reuse those shapes, so the
jitted kernels compile once per variant (DeltaNet / gated) and dtype (the wiring test
reuses the gated kernels). Keys are L2-normalised, as DeltaNet uses them.

Errors are max |err| / max |ref| per output, float32 kernels against the float64 oracle.
The TPU kernels (``platform="tpu"``, :mod:`pallas_kernels.chunked_delta_tpu`) are checked
the same way under the interpreter; their compiles are tests/kernels/test_targets.py's.
The shapes, cotangents, comparison and lowering check are
tests/kernels/test_chunked_gla_kernel.py's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunked_delta import (
    BlockSizes,
    chunked_delta_backward,
    chunked_delta_forward,
)
from ssmjax.scan.delta import delta_rule
from tests.kernels.test_chunked_gla_kernel import (
    DK,
    DV,
    LOWERING_SHAPE,
    SCALE,
    SPLIT_V_SCALE,
    TPU,
    TPU_SHAPE,
    B,
    H,
    T,
    abstract,
    assert_kernels_lower,
    assert_traced_scale_matches_sequential,
    compare,
    cotangents,
    rel_err,
)

#: The block sizes (and SCALE) that delta_rule(method="pallas", chunk_size=8) passes for a
#: traced scale (folded into q), so the wiring test reuses these compiled kernels.
SMALL = BlockSizes(chunk=8)
#: Two value blocks (dv = 6 -> 8 in blocks of 4), two key blocks in the forward (dk = 5
#: -> 8 in blocks of 4); with SPLIT_V_SCALE.
SPLIT_V = BlockSizes(chunk=8, block_v=4, block_k=4)
NAMES = ("o", "final_state", "dq", "dk", "dv", "dbeta", "dg", "dh0")


def make_inputs(seed, gated, dtype=jnp.float32, strength=1.0, shape=(B, T, H, DK, DV)):
    """Normal q, v, h0; unit-norm keys; beta uniform in [0, 1]; log-decays in
    [-strength, 0] (numpy RNG)."""
    b, t, h, dk, dv = shape
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, b, t, h, dk))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((b, t, h, dv))
    beta = rng.uniform(size=(b, t, h))
    g = -strength * rng.uniform(size=(b, t, h)) if gated else None
    h0 = rng.standard_normal((b, h, dk, dv))
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), cast(beta), cast(g), cast(h0)


@functools.partial(jax.jit, static_argnames=("scale",))
def _oracle(q, k, v, beta, g, h0, do, dh_last, scale):
    def f(q, k, v, beta, g, h0):
        return delta_rule(q, k, v, beta, log_decay=g, initial_state=h0, scale=scale, method="sequential")

    out, vjp = jax.vjp(f, q, k, v, beta, g, h0)
    return out + vjp((do, dh_last))


def oracle(q, k, v, beta, g, h0, do, dh_last, scale=SCALE):
    """Outputs and every cotangent (``h0``'s too) of the sequential scan, in float64
    (inputs cast outside the jit: one compilation per variant)."""
    up = lambda x: None if x is None else jnp.asarray(x, jnp.float64)
    return _oracle(*map(up, (q, k, v, beta, g, h0, do, dh_last)), scale=scale)


def run_kernels(q, k, v, beta, g, h0, do, dh_last, block_sizes=SMALL, scale=SCALE, interpret=True, platform=None):
    kw = dict(scale=scale, block_sizes=block_sizes, interpret=interpret, platform=platform)
    o, h_last, states = chunked_delta_forward(q, k, v, beta, g, h0, **kw)
    return (o, h_last) + chunked_delta_backward(q, k, v, beta, g, states, do, dh_last, **kw)


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("gated, has_h0", [(False, False), (True, True)])
def test_kernels_match_sequential_oracle_float32(gated, has_h0):
    """DeltaNet from a zero state and Gated DeltaNet from a random one: forward (o, final
    state) and backward kernel (dq, dk, dv, dbeta, dg, dh0) in float32 against autodiff of
    the float64 sequential scan. Measured <= 1.5e-7 (outputs) and <= 2.0e-7 (gradients);
    asserted < 2e-6 (a few float32 roundings per accumulated value, with margin)."""
    q, k, v, beta, g, h0 = make_inputs(0, gated)
    if not has_h0:  # the kernel starts from zeros; dh0 is still the cotangent of S_{-1}
        h0 = jnp.zeros_like(h0)
    do, dh_last = cotangents(1)
    got = run_kernels(q, k, v, beta, g, h0 if has_h0 else None, do, dh_last)
    assert all(x.dtype == jnp.float32 for x in got if x is not None)
    compare(got, oracle(q, k, v, beta, g, h0, do, dh_last), 2e-6, NAMES)


def test_strong_decay_does_not_overflow():
    """log-decays down to -30 per token (a chunk of 8 spans exp(-240): the factorisation
    exp(L) / exp(-L) would overflow float32). Values and gradients stay finite and match.
    As for GLA the exponents are differences of chunk-local cumulative sums, accurate to
    C max|g| u = 1.4e-5 relative per decay factor: asserted < 1.5e-5, measured 2.0e-6 on
    dg, the most sensitive output (float64: 1.4e-15). Same shapes as above (no
    recompilation)."""
    q, k, v, beta, g, h0 = make_inputs(2, True, strength=30.0)
    do, dh_last = cotangents(3)
    got = run_kernels(q, k, v, beta, g, h0, do, dh_last)
    assert all(bool(jnp.isfinite(x).all()) for x in got)
    compare(got, oracle(q, k, v, beta, g, h0, do, dh_last), SMALL.chunk * 30.0 * 2**-24 * 1.05, NAMES)


def test_repeated_keys_with_full_writes():
    """DeltaNet with the same unit key at every token and beta = 1 (each write replaces
    the previous value): I + A has ones everywhere below the diagonal and its inverse
    rows are e_i - e_{i-1}. A Neumann series (I - N + N^2 - ...) would sum binomial
    coefficients up to C(7, 3) = 35 that cancel; forward substitution stays exact.
    Measured <= 2.5e-7, asserted < 2e-6. Same shapes and variant as the DeltaNet case
    above (no recompilation)."""
    q, k, v, beta, _, h0 = make_inputs(4, False)
    k = jnp.broadcast_to(k[:, :1, :1], k.shape)
    beta = jnp.ones_like(beta)
    do, dh_last = cotangents(5)
    got = run_kernels(q, k, v, beta, None, None, do, dh_last)
    compare(got, oracle(q, k, v, beta, None, jnp.zeros_like(h0), do, dh_last), 2e-6, NAMES)


def test_bfloat16_inputs_keep_float32_state():
    """bf16 inputs (gated; two value blocks, whose partial dq, dk, dbeta, dg the wrapper
    sums; a static scale of 0.7): o in bf16, the state and every gradient in float32. Against the
    float64 oracle on the same bf16 values: state and gradients to float32 accuracy
    (measured <= 2e-7, asserted 2e-6), o to one bf16 rounding (2^-8; measured 2.5e-3)."""
    q, k, v, beta, g, h0 = make_inputs(6, True, dtype=jnp.bfloat16)
    do, dh_last = cotangents(7)
    got = run_kernels(q, k, v, beta, g, h0, do, dh_last, SPLIT_V, SPLIT_V_SCALE)
    assert got[0].dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in got[1:])
    want = oracle(q, k, v, beta, g, h0, do, dh_last, SPLIT_V_SCALE)
    assert rel_err(got[0], want[0]) < 2**-8
    compare(got[1:], want[1:], 2e-6, NAMES[1:])


@pytest.mark.parametrize("gated", [False, True])
def test_forward_in_key_blocks_matches_oracle(gated):
    """The forward kernel sums its dk contractions over key blocks (``block_k = 4``: dk =
    5 -> 8 in two blocks) and carries the state as two row blocks: o and the final state
    against the float64 oracle as in the float32 test (asserted < 2e-6)."""
    q, k, v, beta, g, h0 = make_inputs(0, gated)
    do, dh_last = cotangents(1)
    o, h_last, _ = chunked_delta_forward(
        q, k, v, beta, g, h0, scale=SCALE, block_sizes=BlockSizes(chunk=8, block_k=4), interpret=True
    )
    compare((o, h_last), oracle(q, k, v, beta, g, h0, do, dh_last)[:2], 2e-6, NAMES[:2])


def test_kernel_bad_arguments():
    q, k, v, beta, g, _ = make_inputs(8, True)
    with pytest.raises(ValueError, match="beta: expected shape"):
        chunked_delta_forward(q, k, v, beta[..., None], g, interpret=True)
    with pytest.raises(ValueError, match="g: expected shape"):
        chunked_delta_forward(q, k, v, beta, g[..., None].repeat(DK, -1), interpret=True)
    with pytest.raises(ValueError, match="k: expected shape"):
        chunked_delta_forward(q, k[..., :-1], v, beta, interpret=True)
    with pytest.raises(ValueError, match="GPUs"):
        chunked_delta_forward(q, k, v, beta, platform="mosaic_gpu")


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("gated", [False, True])
def test_kernels_lower(gated, platform):
    """No GPU or TPU here: both kernels of each platform lower at a realistic tile (bf16
    q, k, v, beta, g; dk = dv = 128; the default chunk 32), see ``assert_kernels_lower``."""
    b, t, h, d = LOWERING_SHAPE
    inputs = (abstract(b, t, h, d),) * 3 + (abstract(b, t, h), abstract(b, t, h) if gated else None)
    assert_kernels_lower(chunked_delta_forward, chunked_delta_backward, inputs, BlockSizes().chunk_for("head"), platform)


# ----------------------------------------------------------------------------- TPU layout
# The TPU kernels (pallas_kernels.chunked_delta_tpu: head-major blocks, the chunk a
# sequential grid axis, the state in VMEM scratch, beta and g as rows of eight chunks)
# run by the interpreter on CPU (TPU); TPU_SHAPE's T = 75 is ten chunks of 8 (the last
# padded), so the per-token rows span two blocks of eight chunks.


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-13), (jnp.float32, 2e-6)])
@pytest.mark.parametrize("gated", [False, True])
def test_tpu_kernels_match_sequential_oracle(gated, dtype, tol):
    """The TPU kernels' bodies (forward and backward; beta and the chunk-local sums of g
    as rows, dbeta and dg written back as rows) against autodiff of the float64
    sequential scan. float64 measured <= 6.4e-16 (asserted 1e-13: exact up to rounding);
    float32 measured <= 3.3e-7 (asserted 2e-6, as the GPU layout)."""
    q, k, v, beta, g, h0 = make_inputs(14, gated, dtype, shape=TPU_SHAPE)
    do, dh_last = cotangents(15, TPU_SHAPE, dtype)
    got = run_kernels(q, k, v, beta, g, h0, do, dh_last, **TPU)
    assert all(x.dtype == dtype for x in got if x is not None)
    compare(got, oracle(q, k, v, beta, g, h0, do, dh_last), tol, NAMES)


def test_tpu_kernels_strong_decay_repeated_keys_bfloat16():
    """bf16 inputs at chunk 16 (the compiled kernels' smallest for 16-bit rows), gated
    with log-decays down to -30 per token, every key the same unit vector and beta = 1
    (the forward substitution's hardest case), a static scale of 0.7: o in bf16 to one
    bf16 rounding (measured 2.1e-3, asserted 2^-8), the state and every gradient in
    float32, finite, against the float64 oracle on the same bf16 values (asserted
    C * 30 * 2^-24 * 1.05 = 3e-5 as the strong decay test above; measured <= 9.1e-7,
    on dg)."""
    q, k, v, beta, g, h0 = make_inputs(16, True, jnp.bfloat16, strength=30.0)
    k = jnp.broadcast_to(k[:, :1, :1], k.shape)
    beta = jnp.ones_like(beta)
    do, dh_last = cotangents(17)
    bs = BlockSizes(chunk=16)
    got = run_kernels(q, k, v, beta, g, h0, do, dh_last, bs, SPLIT_V_SCALE, **TPU)
    assert got[0].dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in got[1:] if x is not None)
    assert all(bool(jnp.isfinite(x).all()) for x in got)
    want = oracle(q, k, v, beta, g, h0, do, dh_last, SPLIT_V_SCALE)
    assert rel_err(got[0], want[0]) < 2**-8
    compare(got[1:], want[1:], bs.chunk * 30.0 * 2**-24 * 1.05, NAMES[1:])


def test_tpu_kernel_refusals_name_the_argument():
    """Compiled for a TPU: no float64 (Mosaic) and chunks of whole sublane tiles (16 rows
    of bfloat16); both found while tracing."""
    q, k, v, beta, _, _ = make_inputs(8, False, jnp.float64)
    shapes = lambda *xs: [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]  # noqa: E731
    with pytest.raises(ValueError, match=r"^q: the compiled TPU chunked_delta kernel supports dtypes \('float32', 'bfloat16'\), got float64"):
        jax.eval_shape(lambda *x: chunked_delta_forward(*x, platform="tpu"), *shapes(q, k, v, beta))
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, beta)]
    with pytest.raises(ValueError, match=r"^block_sizes\.chunk: .* multiple of 16 rows .*got 8"):
        jax.eval_shape(lambda *x: chunked_delta_forward(*x, block_sizes=SMALL, platform="tpu"), *shapes(*bf16))


# ----------------------------------------------------------------------------- ssmjax wiring
def test_ssmjax_pallas_matches_sequential_with_traced_scale():
    """delta_rule(method="pallas") through its custom_vjp (gated, with an initial state)
    and a traced, differentiated scale (``assert_traced_scale_matches_sequential``).
    Arrays measured <= 2.8e-7 (asserted < 2e-6); d scale (11.5, against sum |terms| =
    335): measured 7e-9 of sum |terms| (asserted < 1e-6)."""
    q, k, v, beta, g, h0 = make_inputs(9, True)

    def rule(q, k, v, beta, g, h0, scale, method):
        return delta_rule(q, k, v, beta, log_decay=g, initial_state=h0, scale=scale, chunk_size=8, method=method)

    assert_traced_scale_matches_sequential(rule, (q, k, v, beta, g, h0), *cotangents(10))


def test_ssmjax_pallas_errors_per_backend(monkeypatch):
    q, k, v, beta, _, _ = make_inputs(11, True, shape=(2, 5, 2, 4, 3))
    with pytest.raises(ValueError, match="segment_ids, reset: method 'pallas' of delta_rule"):
        delta_rule(q, k, v, beta, reset=jnp.zeros((2, 5), bool), method="pallas")
    with pytest.raises(ValueError, match="chunk_size: method 'pallas' needs a power of two"):
        delta_rule(q, k, v, beta, method="pallas", chunk_size=6)
    with pytest.raises(ValueError, match="^method"):
        delta_rule(q, k, v, beta, method="parallel")
    # What 'auto' picks per platform: tests/scan/test_dispatch.py; here the kernel's
    # errors where it is compiled (GPU: Triton's smallest dot; TPU: no float64, whole
    # sublane tiles).
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="chunk_size: method 'pallas' needs a power of two >= 16"):
        delta_rule(q, k, v, beta, method="pallas", chunk_size=8)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match=r"q, k, v, beta: the compiled tpu kernel of delta_rule supports dtypes \('float32', 'bfloat16'\), got float64"):
        delta_rule(*(x.astype(jnp.float64) for x in (q, k, v, beta)), method="pallas")
    with pytest.raises(ValueError, match=r"chunk_size: method 'pallas' needs a power of two >= 16 when compiled, got 8 \(compiled for tpu, bfloat16"):
        delta_rule(*(x.astype(jnp.bfloat16) for x in (q, k, v, beta)), method="pallas", chunk_size=8)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled kernels need a GPU "
                    "(run with JAX_PLATFORMS=cuda; conftest defaults to cpu)")
@pytest.mark.parametrize("gated", [False, True])
def test_compiled_kernels_match_sequential_on_gpu(gated):
    """On a GPU: the compiled kernels through the ssmjax wiring, values and every
    gradient, at a realistic tile (dk = 64, dv = 96: two value blocks, T % chunk != 0)."""
    shape = (2, 300, 3, 64, 96)
    q, k, v, beta, g, h0 = make_inputs(12, gated, shape=shape)
    do, dh_last = cotangents(13, shape=shape)

    def run(method):
        def f(q, k, v, beta, g, h0):
            return delta_rule(q, k, v, beta, log_decay=g, initial_state=h0, method=method)

        out, vjp = jax.vjp(f, q, k, v, beta, g, h0)
        return out + vjp((do, dh_last))

    for x, y in zip(jax.tree.leaves(run("pallas")), jax.tree.leaves(run("sequential"))):
        assert rel_err(x, y) < 1e-4
