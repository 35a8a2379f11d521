"""pallas_kernels.chunked_gla (interpret mode on CPU) against the ssmjax.scan oracle,
``gated_linear_attention(method="sequential")`` (one lax.scan step per token of
S_t = diag(exp g_t) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t) run in float64, and
``gated_linear_attention(method="pallas")`` (the custom_vjp wiring) against the same.

Kernel shapes exercise the tiling with small interpret-mode programs: T = 37 with
chunk = 8 (four full chunks and one padded), dk = 5 (padded to 8), dv = 6 (padded to 8:
one value block, or two of 4 in the bf16 test, whose partial dq, dk and dg the wrapper
sums). Tests reuse those shapes, so the jitted kernels compile once per decay kind and
dtype (the wiring test reuses the per-head kernels).

Errors are max |err| / max |ref| per output, float32 kernels against the float64 oracle.
The TPU kernels (``platform="tpu"``, :mod:`pallas_kernels.chunked_gla_tpu`) are checked
the same way under the interpreter; their compiles are tests/kernels/test_targets.py's.
The shapes, cotangents, comparison and lowering check are shared with
tests/kernels/test_chunked_delta_kernel.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunked_gla import (
    BlockSizes,
    chunked_gla_backward,
    chunked_gla_forward,
)
from ssmjax.scan.gla import gated_linear_attention

B, T, H, DK, DV = 2, 37, 2, 5, 6
#: The block sizes and (static) scale that gated_linear_attention(method="pallas",
#: chunk_size=8) passes for a traced scale (folded into q), so the wiring test reuses
#: these compiled kernels.
SMALL = BlockSizes(chunk=8)
SCALE = 1.0
#: Two value blocks (dv = 6 -> 8 in blocks of 4), two key blocks in the forward (dk = 5
#: -> 8 in blocks of 4) and a non-trivial static scale.
SPLIT_V = BlockSizes(chunk=8, block_v=4, block_k=4)
SPLIT_V_SCALE = 0.7
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dh0")


def make_inputs(seed, kind, dtype=jnp.float32, strength=1.0, shape=(B, T, H, DK, DV)):
    """Normal q, k, v, h0; log-decays uniform in [-strength, 0] (numpy RNG)."""
    b, t, h, dk, dv = shape
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, b, t, h, dk))
    v = rng.standard_normal((b, t, h, dv))
    h0 = rng.standard_normal((b, h, dk, dv))
    g = {"none": None, "head": (b, t, h), "channel": (b, t, h, dk)}[kind]
    g = None if g is None else -strength * rng.uniform(size=g)
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), cast(g), cast(h0)


def cotangents(seed, shape=(B, T, H, DK, DV), dtype=jnp.float32):
    b, t, h, dk, dv = shape
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((b, t, h, dv)), dtype), jnp.asarray(rng.standard_normal((b, h, dk, dv)), dtype)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.abs(x - ref).max() / np.abs(ref).max()


@functools.partial(jax.jit, static_argnames=("scale",))
def _oracle(q, k, v, g, h0, do, dh_last, scale):
    def f(q, k, v, g, h0):
        return gated_linear_attention(q, k, v, log_decay=g, initial_state=h0, scale=scale, method="sequential")

    out, vjp = jax.vjp(f, q, k, v, g, h0)
    return out + vjp((do, dh_last))


def oracle(q, k, v, g, h0, do, dh_last, scale=SCALE):
    """Outputs and every cotangent (``h0``'s too) of the sequential scan, in float64
    (inputs cast outside the jit: one compilation per decay kind)."""
    up = lambda x: None if x is None else jnp.asarray(x, jnp.float64)
    return _oracle(*map(up, (q, k, v, g, h0, do, dh_last)), scale=scale)


def run_kernels(q, k, v, g, h0, do, dh_last, block_sizes=SMALL, scale=SCALE, interpret=True, platform=None):
    kw = dict(scale=scale, block_sizes=block_sizes, interpret=interpret, platform=platform)
    o, h_last, states = chunked_gla_forward(q, k, v, g, h0, **kw)
    return (o, h_last) + chunked_gla_backward(q, k, v, g, states, do, dh_last, **kw)


def compare(got, want, tol, names):
    """Every output ``names`` of the kernels within ``tol`` of the oracle's (``rel_err``);
    one the oracle has not (``dg`` without ``g``) is ``None`` too."""
    errors = {}
    for name, x, y in zip(names, got, want):
        if y is None:
            assert x is None, name
            continue
        assert x.shape == y.shape, name
        errors[name] = rel_err(x, y)
    assert max(errors.values()) < tol, errors
    return errors


#: The lowering tests' tile (batch, time, heads, head dim): realistic head dims, T not a
#: multiple of the chunk.
LOWERING_SHAPE = (2, 100, 3, 128)
#: platform -> (lowering platform, a marker of its kernels in the lowered module)
LOWERINGS = {"gpu": ("cuda", "triton"), "tpu": ("tpu", "tpu_custom_call")}


def abstract(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def assert_kernels_lower(forward, backward, inputs, chunk, platform):
    """Both kernels (``inputs``: q, k, v and the gates at :data:`LOWERING_SHAPE`; float32
    states, bf16 ``do``) lower for ``platform`` from this CPU host: GPU to Triton IR for
    CUDA (the Pallas -> Triton pass runs at lowering; Triton -> PTX is left to a GPU),
    TPU to Mosaic (``tpu_custom_call``). Compiling them for H100 / A100 / TPU v4 / v5e /
    v6e is tests/kernels/test_targets.py's."""
    b, t, h, d = LOWERING_SHAPE
    lowering, marker = LOWERINGS[platform]
    state = abstract(b, h, d, d, dtype=jnp.float32)
    fwd = jax.jit(functools.partial(forward, platform=platform))
    assert marker in fwd.trace(*inputs, state).lower(lowering_platforms=(lowering,)).as_text()
    bwd = jax.jit(functools.partial(backward, platform=platform))
    states = abstract(b, h, -(-t // chunk), d, d, dtype=jnp.float32)
    lowered = bwd.trace(*inputs, states, abstract(b, t, h, d), state)
    assert marker in lowered.lower(lowering_platforms=(lowering,)).as_text()


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("kind, has_h0", [("none", False), ("head", True), ("channel", True)])
def test_kernels_match_sequential_oracle_float32(kind, has_h0):
    """Forward (o, final state) and backward kernel (dq, dk, dv, dg, dh0) in float32
    against autodiff of the float64 sequential scan. Measured: <= 1.4e-7 (outputs) and
    <= 2.1e-7 (gradients); asserted < 2e-6 (a few float32 roundings of unit roundoff 6e-8
    per accumulated value over T = 37 tokens, with margin). The kernels carry float32 even
    though x64 is on (no float64 sneaks in)."""
    q, k, v, g, h0 = make_inputs(0, kind)
    if not has_h0:  # the kernel starts from zeros; dh0 is still the cotangent of S_{-1}
        h0 = jnp.zeros_like(h0)
    do, dh_last = cotangents(1)
    got = run_kernels(q, k, v, g, h0 if has_h0 else None, do, dh_last)
    assert all(x.dtype == jnp.float32 for x in got if x is not None)
    compare(got, oracle(q, k, v, g, h0, do, dh_last), 2e-6, NAMES)


@pytest.mark.parametrize("kind", ["head", "channel"])
def test_strong_decay_does_not_overflow(kind):
    """log-decays down to -30 per token: a chunk of 8 spans exp(-240), so the
    factorisation (q exp(L)) (k exp(-L))^T would overflow float32 (exp(88) = inf). The
    kernels only exponentiate differences L_i - L_j <= 0: values and gradients stay finite
    and match the oracle. Same shapes as above (no recompilation).

    Tolerance: the exponents are differences of chunk-local cumulative sums, each
    accurate to ~|L| u <= C max|g| u = 8 * 30 * 6e-8 = 1.4e-5 (absolute), which is the
    relative error of a decay factor; asserted < 1.5e-5. Measured: 1.5e-6 (per head) and
    2.2e-6 (per channel) on dg, the most sensitive output (at strength 1: 2e-7; in
    float64 the kernels match to 5e-15 at strength 30, so the growth is float32 rounding
    of L, not the algorithm)."""
    q, k, v, g, h0 = make_inputs(2, kind, strength=30.0)
    do, dh_last = cotangents(3)
    got = run_kernels(q, k, v, g, h0, do, dh_last)
    assert all(bool(jnp.isfinite(x).all()) for x in got)
    compare(got, oracle(q, k, v, g, h0, do, dh_last), SMALL.chunk * 30.0 * 2**-24 * 1.05, NAMES)


def test_bfloat16_inputs_keep_float32_state():
    """bf16 q, k, v, g, h0 (and two value blocks, whose partial dq, dk, dg the wrapper
    sums; a static scale of 0.7): o comes out in bf16, the state and every gradient in
    float32. Against the float64 oracle on the same bf16 values: the state and gradients to
    float32 accuracy (measured <= 3.2e-7, asserted 2e-6), o to one bf16 rounding (unit
    roundoff 2^-8 = 3.9e-3; measured 1.6e-3)."""
    q, k, v, g, h0 = make_inputs(4, "channel", dtype=jnp.bfloat16)
    do, dh_last = cotangents(5)
    got = run_kernels(q, k, v, g, h0, do, dh_last, SPLIT_V, SPLIT_V_SCALE)
    assert got[0].dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in got[1:])
    want = oracle(q, k, v, g, h0, do, dh_last, SPLIT_V_SCALE)
    assert rel_err(got[0], want[0]) < 2**-8
    compare(got[1:], want[1:], 2e-6, NAMES[1:])


@pytest.mark.parametrize("kind", ["none", "head", "channel"])
def test_forward_in_key_blocks_matches_oracle(kind):
    """The forward kernel sums its dk contractions over key blocks (``block_k = 4``: dk =
    5 -> 8 in two blocks) and carries the state as two row blocks: o and the final state
    against the float64 oracle as in the float32 test (asserted < 2e-6)."""
    q, k, v, g, h0 = make_inputs(0, kind)
    do, dh_last = cotangents(1)
    o, h_last, _ = chunked_gla_forward(
        q, k, v, g, h0, scale=SCALE, block_sizes=BlockSizes(chunk=8, block_k=4), interpret=True
    )
    compare((o, h_last), oracle(q, k, v, g, h0, do, dh_last)[:2], 2e-6, NAMES[:2])


def test_kernel_bad_arguments():
    q, k, v, g, h0 = make_inputs(6, "head")
    with pytest.raises(ValueError, match="g: expected shape"):
        chunked_gla_forward(q, k, v, g[:, :, :1], interpret=True)
    with pytest.raises(ValueError, match="v: expected shape"):
        chunked_gla_forward(q, k, v[:, :-1], interpret=True)
    with pytest.raises(ValueError, match="h0: expected shape"):
        chunked_gla_forward(q, k, v, g, h0[..., :-1], interpret=True)
    with pytest.raises(ValueError, match="block_sizes.chunk"):
        BlockSizes(chunk=12)
    with pytest.raises(ValueError, match="dot_precision"):
        BlockSizes(dot_precision="tf32")
    with pytest.raises(ValueError, match="GPUs"):
        chunked_gla_forward(q, k, v, g, platform="mosaic_gpu")
    with pytest.raises(ValueError, match="chunk >= 16"):
        chunked_gla_forward(q, k, v, g, block_sizes=BlockSizes(chunk=8), platform="gpu")
    _, _, states = chunked_gla_forward(q, k, v, g, h0, scale=SCALE, block_sizes=SMALL, interpret=True)
    with pytest.raises(ValueError, match="states"):
        chunked_gla_backward(q, k, v, g, states[:, :, :-1], v, h0, scale=SCALE, block_sizes=SMALL, interpret=True)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("kind", ["none", "head", "channel"])
def test_kernels_lower(kind, platform):
    """No GPU or TPU here: both kernels of each platform lower at a realistic tile (bf16
    q, k, v; dk = dv = 128; float32 decays), see :func:`assert_kernels_lower`."""
    b, t, h, d = LOWERING_SHAPE
    g = {"none": None, "head": abstract(b, t, h, dtype=jnp.float32), "channel": abstract(b, t, h, d, dtype=jnp.float32)}
    inputs = (abstract(b, t, h, d),) * 3 + (g[kind],)
    assert_kernels_lower(chunked_gla_forward, chunked_gla_backward, inputs, BlockSizes().chunk_for(kind), platform)


# ----------------------------------------------------------------------------- TPU layout
#: The TPU kernels (pallas_kernels.chunked_gla_tpu, head-major blocks, the chunk a
#: sequential grid axis, the state in VMEM scratch) run by the interpreter on CPU; T = 75
#: is ten chunks of 8 (the last padded), so per-head decays, kept as rows of eight
#: chunks, span two blocks.
TPU = dict(interpret=True, platform="tpu")
TPU_SHAPE = (B, 75, H, DK, DV)


def run_tpu_kernels(q, k, v, g, h0, do, dh_last, block_sizes=SMALL, scale=SCALE):
    return run_kernels(q, k, v, g, h0, do, dh_last, block_sizes, scale, **TPU)


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-13), (jnp.float32, 2e-6)])
@pytest.mark.parametrize("kind", ["none", "head", "channel"])
def test_tpu_kernels_match_sequential_oracle(kind, dtype, tol):
    """The TPU kernels' bodies (forward and backward, one chunk per grid step, the state
    and dS carried in scratch across the sequential chunk axis, the backward's chunks in
    reverse through its index maps, the chunk-local sums of g formed in the kernels)
    against autodiff of the float64 sequential scan (T = 75: ten chunks of 8, the last
    padded; dk = 5 and dv = 6 padded to 8). float64 measured <= 6.4e-16 (asserted 1e-13:
    exact up to rounding); float32 measured <= 2.3e-7 (asserted 2e-6, as the GPU layout)."""
    q, k, v, g, h0 = make_inputs(14, kind, dtype, shape=TPU_SHAPE)
    do, dh_last = cotangents(15, TPU_SHAPE, dtype)
    got = run_tpu_kernels(q, k, v, g, h0, do, dh_last)
    assert all(x.dtype == dtype for x in got if x is not None)
    compare(got, oracle(q, k, v, g, h0, do, dh_last), tol, NAMES)


@pytest.mark.parametrize("kind", ["head", "channel"])
def test_tpu_kernels_strong_decay_and_bfloat16(kind):
    """bf16 inputs at chunk 16 (the compiled kernels' smallest for 16-bit rows: two
    chunks and a padded one at T = 37), log-decays down to -30 per token, a static scale
    of 0.7: o in bf16 to one bf16 rounding (measured 2.9e-3, asserted 2^-8), the state
    and every gradient in float32, finite, against the float64 oracle on the same bf16
    values (a chunk of 16 spans exp(-480); asserted C * 30 * 2^-24 * 1.05 = 3e-5 as the
    strong decay test above, measured <= 8.7e-7)."""
    q, k, v, g, h0 = make_inputs(12, kind, dtype=jnp.bfloat16, strength=30.0)
    do, dh_last = cotangents(13)
    bs = BlockSizes(chunk=16)
    got = run_tpu_kernels(q, k, v, g, h0, do, dh_last, bs, SPLIT_V_SCALE)
    assert got[0].dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in got[1:])
    assert all(bool(jnp.isfinite(x).all()) for x in got)
    want = oracle(q, k, v, g, h0, do, dh_last, SPLIT_V_SCALE)
    assert rel_err(got[0], want[0]) < 2**-8
    compare(got[1:], want[1:], bs.chunk * 30.0 * 2**-24 * 1.05, NAMES[1:])


def _trace(fn, *arrays):
    return jax.eval_shape(fn, *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays))


def test_tpu_kernel_refusals_name_the_argument():
    """Compiled for a TPU: no float64 (Mosaic), and chunks of whole sublane tiles (8 rows
    of float32, 16 of bfloat16); both found while tracing."""
    q, k, v, g, _ = make_inputs(6, "head", jnp.float64)
    with pytest.raises(ValueError, match=r"^q: the compiled TPU chunked_gla kernel supports dtypes \('float32', 'bfloat16'\), got float64"):
        _trace(lambda q, k, v: chunked_gla_forward(q, k, v, platform="tpu"), q, k, v)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, g)]
    with pytest.raises(ValueError, match=r"^block_sizes\.chunk: .* multiple of 16 rows .*got 8"):
        _trace(lambda *x: chunked_gla_forward(*x, block_sizes=SMALL, platform="tpu"), *bf16)


# ----------------------------------------------------------------------------- ssmjax wiring
def assert_traced_scale_matches_sequential(op, inputs, do, dh_last):
    """``op(*inputs, scale, method)`` (chunk size 8) with a traced, differentiated scale
    (folded into q before the kernel), ``method="pallas"`` through its custom_vjp in float32
    against ``"sequential"`` in float64: every array to 2e-6 (max error / max entry); d
    scale = sum(do * o / scale), one sum of 888 terms that cancel, to 1e-6 of sum |terms|."""

    def run(method, dtype):
        args = tuple(x.astype(dtype) for x in inputs + (jnp.asarray(SPLIT_V_SCALE),))
        out, vjp = jax.vjp(functools.partial(op, method=method), *args)
        return out + vjp((do.astype(dtype), dh_last.astype(dtype)))

    # eager: the custom_vjp calls the jitted kernels compiled by the tests above
    got, want = run("pallas", jnp.float32), run("sequential", jnp.float64)
    for x, y in zip(got[:-1], want[:-1]):
        assert x.shape == y.shape and x.dtype == jnp.float32
        assert rel_err(x, y) < 2e-6
    d_scale_terms = np.abs(np.asarray(do, np.float64) * np.asarray(want[0]) / SPLIT_V_SCALE).sum()
    assert got[-1].dtype == jnp.float32
    assert abs(float(got[-1]) - float(want[-1])) < 1e-6 * d_scale_terms


def test_ssmjax_pallas_matches_sequential_with_traced_scale():
    """gated_linear_attention(method="pallas") through its custom_vjp: per-head decay
    given broadcastable ([1, t, h]), and a traced scale whose gradient flows through JAX
    (:func:`assert_traced_scale_matches_sequential`). Arrays measured <= 2.4e-7 (asserted
    < 2e-6); d scale (|d scale| = 5.5 against sum |terms| = 1.3e3): measured 1.4e-8 of sum
    |terms| (asserted < 1e-6)."""
    q, k, v, g, h0 = make_inputs(7, "head")

    def attention(q, k, v, g, h0, scale, method):
        return gated_linear_attention(q, k, v, log_decay=g, initial_state=h0, scale=scale, chunk_size=8, method=method)

    assert_traced_scale_matches_sequential(attention, (q, k, v, g[:1], h0), *cotangents(8))


def test_ssmjax_pallas_errors_per_backend(monkeypatch):
    q, k, v, g, _ = make_inputs(9, "head", shape=(2, 5, 2, 4, 3))
    f = gated_linear_attention
    with pytest.raises(ValueError, match="segment_ids, reset: method 'pallas'"):
        f(q, k, v, log_decay=g, segment_ids=jnp.zeros((2, 5), int), method="pallas")
    with pytest.raises(ValueError, match="chunk_size: method 'pallas' needs a power of two"):
        f(q, k, v, method="pallas", chunk_size=12)
    with pytest.raises(ValueError, match="method"):
        f(q, k, v, method="associative")
    # What 'auto' picks per platform: tests/scan/test_dispatch.py; here the kernel's
    # errors where the program would be compiled (GPU; TPU: no float64) or has no kernel.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="chunk_size: method 'pallas' needs a power of two >= 16"):
        f(q, k, v, method="pallas", chunk_size=8)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match=r"q, k, v: the compiled tpu kernel of gated_linear_attention supports dtypes \('float32', 'bfloat16'\), got float64"):
        f(*(x.astype(jnp.float64) for x in (q, k, v)), method="pallas")
    with pytest.raises(ValueError, match=r"chunk_size: method 'pallas' needs a power of two >= 16 when compiled, got 8 \(compiled for tpu, bfloat16"):
        f(*(x.astype(jnp.bfloat16) for x in (q, k, v)), method="pallas", chunk_size=8)
    monkeypatch.setattr(jax, "default_backend", lambda: "metal")
    with pytest.raises(ValueError, match="no kernel for the 'metal' backend"):
        f(q, k, v, method="pallas")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled kernels need a GPU "
                    "(run with JAX_PLATFORMS=cuda; conftest defaults to cpu)")
@pytest.mark.parametrize("kind", ["none", "head", "channel"])
def test_compiled_kernels_match_sequential_on_gpu(kind):
    """On a GPU: the compiled kernels through the ssmjax wiring, values and every
    gradient, at a realistic tile (dk = dv = 64, several value blocks, T % chunk != 0)."""
    q, k, v, g, h0 = make_inputs(10, kind, shape=(2, 300, 3, 64, 96))
    do, dh_last = cotangents(11, shape=(2, 300, 3, 64, 96))

    def run(method):
        f = lambda q, k, v, g, h0: gated_linear_attention(q, k, v, log_decay=g, initial_state=h0, method=method)
        out, vjp = jax.vjp(f, q, k, v, g, h0)
        return out + vjp((do, dh_last))

    for x, y in zip(jax.tree.leaves(run("pallas")), jax.tree.leaves(run("sequential"))):
        assert rel_err(x, y) < 1e-4
