"""The dispatch table: one error path, ``auto`` per platform, the platform chosen at
lowering time (not from ``jax.default_backend()``), and public ``block_sizes``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.scan import (
    DeltaBlockSizes,
    GLABlockSizes,
    LinearScanBlockSizes,
    RNNBlockSizes,
    SelectiveScanBlockSizes,
    delta_rule,
    gated_linear_attention,
    linear_scan,
    matrix_scan,
    nonlinear_rnn,
    prefix_softmax_attention,
    selective_scan,
    staged_platforms,
)
from ssmjax.scan import _dispatch

KEY = jax.random.PRNGKey(0)
#: Markers of each kernel lowering in StableHLO text.
TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "tpu_custom_call"


def attention_inputs(dtype=jnp.float32, dk=16, time=32):
    k = jax.random.split(KEY, 5)
    q = jax.random.normal(k[0], (1, time, 2, dk), dtype)
    kk = 0.3 * jax.random.normal(k[1], (1, time, 2, dk), dtype)
    v = jax.random.normal(k[2], (1, time, 2, dk), dtype)
    g = -jax.nn.softplus(jax.random.normal(k[3], (1, time, 2))).astype(dtype)
    beta = jax.nn.sigmoid(jax.random.normal(k[4], (1, time, 2))).astype(dtype)
    return q, kk, v, g, beta


def selective_inputs(dtype=jnp.float32, time=32):
    k = jax.random.split(KEY, 4)
    u = jax.random.normal(k[0], (1, time, 8), dtype)
    delta = jax.nn.softplus(jax.random.normal(k[1], (1, time, 8), dtype))
    A = -jnp.ones((8, 4), dtype)
    B = jax.random.normal(k[2], (1, time, 4), dtype)
    C = jax.random.normal(k[3], (1, time, 4), dtype)
    return u, delta, A, B, C


# ----------------------------------------------------------------------------- one error path
CALLS = {
    "linear_scan": lambda m: linear_scan(jnp.ones((1, 3, 2)), jnp.ones((1, 3, 2)), method=m),
    "matrix_scan": lambda m: matrix_scan(jnp.ones((1, 3, 2, 2)), jnp.ones((1, 3, 2)), method=m),
    "selective_scan": lambda m: selective_scan(*selective_inputs(), method=m),
    "gated_linear_attention": lambda m: gated_linear_attention(*attention_inputs()[:3], method=m),
    "delta_rule": lambda m: delta_rule(*attention_inputs()[:3], attention_inputs()[4], method=m),
    "prefix_softmax_attention": lambda m: prefix_softmax_attention(
        jnp.ones((1, 3, 2)), jnp.ones((1, 3, 2, 4)), method=m
    ),
    "nonlinear_rnn": lambda m: nonlinear_rnn(
        "elman", jnp.ones((1, 3, 1, 1, 4)), jnp.zeros((1, 1, 4, 4)), method=m
    ),
}


@pytest.mark.parametrize("op", sorted(CALLS))
def test_unknown_method_names_method_and_the_allowed_values(op):
    allowed = _dispatch.TABLE[op].methods
    with pytest.raises(ValueError, match=r"^method: .*" + op) as info:
        CALLS[op]("triton")
    assert str(allowed) in str(info.value) and "'triton'" in str(info.value)


def test_every_table_method_is_accepted_by_its_op():
    # Traced, not run: acceptance is decided while tracing, and every method's values are
    # checked against its oracle in the op's own tests.
    for op, call in CALLS.items():
        for method in _dispatch.TABLE[op].methods:
            if method not in ("pallas", "newton"):  # interpreted kernels: tests/kernels
                jax.eval_shape(lambda: call(method))


def test_matrix_scan_has_no_kernel():
    with pytest.raises(ValueError, match="method: 'pallas' has no kernel for matrix_scan"):
        CALLS["matrix_scan"]("pallas")


# ----------------------------------------------------------------------------- auto per platform
def plan(op, dtype="float32", **facts):
    return _dispatch.plan(op, "auto", _dispatch.Case(dtype=dtype, **facts))


def test_auto_takes_a_kernel_only_where_proven():
    assert plan("linear_scan")["cpu"] == "sequential"
    assert plan("linear_scan")["cuda"] == "pallas"
    assert plan("linear_scan")["rocm"] == "chunked"  # never proven
    assert plan("linear_scan", dtype="float64")["cuda"] == "chunked"
    assert plan("linear_scan", dtype="complex64")["cuda"] == "chunked"
    # TPU: tiled over time (VMEM independent of T), lowers under jax_enable_x64.
    assert plan("linear_scan", time=65536, x64=True)["tpu"] == "pallas"
    assert plan("linear_scan", packed=True)["tpu"] == "pallas"
    assert plan("matrix_scan")["cuda"] == "chunked"
    assert plan("selective_scan")["cpu"] == "chunked"
    assert plan("selective_scan")["cuda"] == "pallas"
    assert plan("selective_scan", dtype="bfloat16", x64=True)["cuda"] == "pallas"  # block_d 16
    # TPU: tiled over time (VMEM independent of T), float32 and bfloat16, x64 on and off.
    assert plan("selective_scan", time=65536, x64=True)["tpu"] == "pallas"
    assert plan("selective_scan", dtype="bfloat16", packed=True)["tpu"] == "pallas"
    assert plan("selective_scan", dtype="float64")["tpu"] == "chunked"  # Mosaic has no float64
    # GLA / SSD on CUDA: every decay, both dtypes, head dims 64 and 128 (the forward sums
    # its dk contractions over key blocks), x64 on and off; larger head dims unmeasured.
    gla = "gated_linear_attention"
    for decay in _dispatch.DECAYS:
        for head_dim in (64, 128):
            assert plan(gla, head_dim=head_dim, decay=decay, x64=True)["cuda"] == "pallas"
            assert plan(gla, "bfloat16", head_dim=head_dim, decay=decay)["cuda"] == "pallas"
    assert plan(gla, head_dim=256)["cuda"] == "chunked"
    assert plan(gla, head_dim=64, packed=True)["cuda"] == "chunked"
    # TPU (one chunk per sequential grid step, VMEM independent of T): every decay, both
    # dtypes, head dims 64 and 128, x64 on and off; larger head dims unmeasured.
    for decay in _dispatch.DECAYS:
        for head_dim in (64, 128):
            assert plan(gla, head_dim=head_dim, decay=decay, x64=True)["tpu"] == "pallas"
            assert plan(gla, "bfloat16", head_dim=head_dim, decay=decay, time=65536)["tpu"] == "pallas"
    assert plan(gla, head_dim=256)["tpu"] == "chunked"
    assert plan(gla, head_dim=64, packed=True)["tpu"] == "chunked"
    assert plan(gla, "float64", head_dim=64)["tpu"] == "chunked"  # Mosaic has no float64
    # delta rule, CUDA and TPU: gated and not, both dtypes, head dims up to 128, x64 on
    # and off.
    for head_dim in (16, 64, 128):
        assert plan("delta_rule", head_dim=head_dim, x64=True)["cuda"] == "pallas"
        assert plan("delta_rule", "bfloat16", head_dim=head_dim, decay="head")["cuda"] == "pallas"
        assert plan("delta_rule", head_dim=head_dim, x64=True)["tpu"] == "pallas"
        assert plan("delta_rule", "bfloat16", head_dim=head_dim, decay="head", time=65536)["tpu"] == "pallas"
    assert plan("delta_rule", head_dim=256)["tpu"] == "chunked"
    assert plan("delta_rule", head_dim=256)["cuda"] == "chunked"
    assert plan("delta_rule", head_dim=64, packed=True)["tpu"] == "chunked"
    assert plan("delta_rule", head_dim=64, packed=True)["cuda"] == "chunked"
    assert plan("prefix_softmax_attention")["cpu"] == "sequential"
    assert plan("prefix_softmax_attention")["tpu"] == "associative"
    for p in plan("plstm_1d").values():
        assert p == "chunked"


#: target_cases options as the dispatch table's decay kinds.
OPTION_DECAY = {"head_decay": "head", "channel_decay": "channel", "gated": "head"}


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def test_proven_rows_avoid_every_known_issue():
    """No Proven row lets ``auto`` pick a kernel for a configuration that
    ``pallas_kernels.targets.KNOWN_ISSUES`` lists (kernel, platform, dtype, option, head
    dim, sequence length; a field it does not name: every value)."""
    from pallas_kernels import targets
    from pallas_kernels.target_cases import DIMS, DTYPES, OPTIONS

    ops = {op.kernel.name: name for name, op in _dispatch.TABLE.items()
           if op.kernel and "auto" in op.methods}
    for fields, reason in targets.KNOWN_ISSUES:
        kernel = fields["kernel"]
        if kernel not in ops:  # no auto (nonlinear_rnn): never picked
            continue
        platform = fields.get("platform") or targets.get_target(fields["target"]).platform
        for dtype in _as_tuple(fields.get("dtype", DTYPES)):
            for option in _as_tuple(fields.get("option", OPTIONS[kernel])):
                for dim in _as_tuple(fields.get("dim", DIMS[kernel])):
                    c = _dispatch.Case(
                        dtype, time=fields.get("time", 1024),
                        head_dim=dim if kernel.startswith("chunked") else 0,
                        decay=OPTION_DECAY.get(option, "none"),
                    )
                    chosen = _dispatch.plan(ops[kernel], "auto", c)
                    assert chosen[{"gpu": "cuda"}.get(platform, platform)] != "pallas", (c, reason)


def test_explicit_methods():
    c = _dispatch.Case(dtype="float32", chunk=8)
    assert _dispatch.plan("selective_scan", "sequential", c) == {"default": "sequential"}
    # Triton's smallest dot is 16: a chunk of 8 is interpreter-only on GPUs. Mosaic TPU
    # takes whole sublane tiles: 8 rows of float32, 16 of bfloat16.
    assert _dispatch.plan("gated_linear_attention", "pallas", c) == {"cpu": "pallas", "tpu": "pallas"}
    c16 = _dispatch.Case(dtype="float32", chunk=16)
    assert set(_dispatch.plan("gated_linear_attention", "pallas", c16)) == {"cpu", "cuda", "rocm", "tpu"}
    bf16_8 = _dispatch.Case(dtype="bfloat16", chunk=8)
    assert _dispatch.plan("gated_linear_attention", "pallas", bf16_8) == {"cpu": "pallas"}
    assert "tpu" in _dispatch.plan("gated_linear_attention", "pallas", _dispatch.Case("bfloat16", chunk=16))
    assert set(_dispatch.plan("linear_scan", "pallas", c)) == {"cpu", "cuda", "rocm", "tpu"}
    # The compiled TPU kernels refuse float64: no TPU branch is traced for it.
    c64 = _dispatch.Case(dtype="float64")
    assert set(_dispatch.plan("linear_scan", "pallas", c64)) == {"cpu", "cuda", "rocm"}
    assert set(_dispatch.plan("selective_scan", "pallas", c)) == {"cpu", "cuda", "rocm", "tpu"}
    assert "tpu" in _dispatch.plan("selective_scan", "pallas", _dispatch.Case(dtype="bfloat16"))
    assert set(_dispatch.plan("selective_scan", "pallas", c64)) == {"cpu", "cuda", "rocm"}


def test_explicit_pallas_in_float64_compiles_on_the_host():
    """Under ``jit`` every kernel branch is traced; the float64 interpreter run on a CPU
    host must not trace the TPU kernel, which refuses float64."""
    with jax.enable_x64(True):
        a = jnp.full((1, 8, 4), 0.5, jnp.float64)
        b = jnp.ones((1, 8, 4), jnp.float64)
        h, _ = jax.jit(lambda a, b: linear_scan(a, b, method="pallas"))(a, b)
        ref, _ = linear_scan(a, b, method="sequential")
    np.testing.assert_allclose(h, ref, rtol=1e-15)


def test_describe_lists_every_op():
    text = _dispatch.describe()
    for op in _dispatch.TABLE:
        assert f"| {op} |" in text


# ----------------------------------------------------------------------------- lowering time
def lowered_text(f, args, platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def gla_grad(q, k, v, g):
    return jax.grad(lambda q: gated_linear_attention(q, k, v, log_decay=g)[0].sum())(q)


LOWERED = {
    "linear_scan": (
        lambda a, b: linear_scan(a, b)[0],
        lambda dtype=jnp.float32: (jnp.full((1, 32, 8), 0.9, dtype), jnp.ones((1, 32, 8), dtype)),
    ),
    "selective_scan": (lambda *x: selective_scan(*x)[0], selective_inputs),
    "gated_linear_attention": (gla_grad, lambda: attention_inputs()[:4]),
}


@pytest.mark.parametrize("op", sorted(LOWERED))
def test_auto_decides_the_platform_at_lowering_time(op):
    """From this CPU host, a program lowered for a GPU takes the proven kernel (float32),
    one lowered for the CPU does not, whatever ``jax.default_backend()`` says."""
    f, make = LOWERED[op]
    args = [x.astype(jnp.float32) for x in make()]
    assert jax.default_backend() == "cpu"
    with staged_platforms("cpu", "cuda", "rocm", "tpu"):
        cpu = lowered_text(f, args, "cpu")
        assert TRITON not in cpu and MOSAIC not in cpu
        assert TRITON in lowered_text(f, args, "cuda")
        tpu = lowered_text(f, args, "tpu")
    # linear_scan, the selective scan and GLA have TPU kernels that auto may pick
    # (proven with x64 too).
    assert (MOSAIC in tpu) == (op in ("linear_scan", "selective_scan", "gated_linear_attention"))


def test_tpu_kernel_through_jax_export():
    f, make = LOWERED["linear_scan"]
    args = make()
    with staged_platforms("cpu", "tpu"):
        exported = jax.export.export(jax.jit(f), platforms=("tpu",))(*args)
        assert MOSAIC in exported.mlir_module()
        assert MOSAIC not in lowered_text(f, args, "cpu")


# ----------------------------------------------------------------------------- staging
def test_the_test_session_stages_the_cpu_only():
    """tests/conftest.py sets SSMJAX_STAGE_PLATFORMS=cpu: float32 ``auto`` traces no kernel
    and no conditional, and a program lowered for a GPU takes the host's (CPU) branch."""
    assert _dispatch.staged() == ("cpu",)
    f, make = LOWERED["selective_scan"]
    args = [x.astype(jnp.float32) for x in make()]
    jaxpr = str(jax.make_jaxpr(f)(*args))
    assert "pallas_call" not in jaxpr and "platform_index" not in jaxpr
    assert TRITON not in lowered_text(f, args, "cuda")


def test_staging_one_accelerator_leaves_the_others_on_the_host_branch():
    f, make = LOWERED["linear_scan"]
    args = make()
    with staged_platforms("gpu"):  # cuda and rocm, plus the host (cpu)
        assert _dispatch.staged() == ("cuda", "rocm")
        assert TRITON in lowered_text(f, args, "cuda")
        assert MOSAIC not in lowered_text(f, args, "tpu")
    assert _dispatch.staged() == ("cpu",)


def test_platforms_not_staged_take_the_host_choice(monkeypatch):
    """On a GPU host staging the CPU only, the host (cuda) stays staged and every other
    platform, ``"default"`` included, runs the host's choice: its kernel."""
    choice = plan("linear_scan")
    assert _dispatch._narrowed(choice) == {"cpu": "sequential", "default": "sequential"}
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _dispatch._narrowed(choice) == {"cpu": "sequential", "cuda": "pallas", "default": "pallas"}
    explicit = _dispatch.plan("linear_scan", "pallas", _dispatch.Case("float32"))
    assert _dispatch._narrowed(explicit) == explicit  # nothing to fall back to


def test_the_switch_is_part_of_the_jit_cache_key():
    """A function jitted under one staging is re-traced under another."""
    f, make = LOWERED["linear_scan"]
    g = jax.jit(f)
    args = make()
    cpu_only = g.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    with staged_platforms("cuda"):
        staged = g.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert TRITON not in cpu_only and TRITON in staged


def test_unknown_platforms_are_value_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"^platforms: expected platforms among .*'gpu'.*got 'metal'"):
        staged_platforms("cpu", "metal")
    with pytest.raises(ValueError, match="^platforms: expected at least one"):
        staged_platforms()
    monkeypatch.setenv(_dispatch.STAGE_ENV, "cpu, tpu")
    assert _dispatch._platforms_from_env() == ("cpu", "tpu")
    monkeypatch.setenv(_dispatch.STAGE_ENV, "")
    assert _dispatch._platforms_from_env() == _dispatch.PLATFORMS
    monkeypatch.setenv(_dispatch.STAGE_ENV, "cpu,cuda12")
    with pytest.raises(ValueError, match=r"^SSMJAX_STAGE_PLATFORMS: expected platforms .*got 'cuda12'"):
        _dispatch._platforms_from_env()


def test_float64_auto_stages_no_kernel():
    """Nothing proven for float64: the kernel is not even traced (one XLA branch)."""
    f, make = LOWERED["selective_scan"]
    jaxpr = str(jax.make_jaxpr(f)(*make(jnp.float64)))
    assert "pallas_call" not in jaxpr and "platform_index" not in jaxpr


# ----------------------------------------------------------------------------- block sizes
@pytest.mark.parametrize(
    "op, cls",
    [
        ("linear_scan", LinearScanBlockSizes),
        ("selective_scan", SelectiveScanBlockSizes),
        ("gated_linear_attention", GLABlockSizes),
        ("delta_rule", DeltaBlockSizes),
        ("nonlinear_rnn", RNNBlockSizes),
    ],
)
def test_block_sizes_of_the_wrong_family_is_a_value_error(op, cls):
    """(Under the test-wide beartype hook a public op rejects it by its annotation first.)"""
    assert _dispatch.check_block_sizes(op, None, cls) is None
    assert _dispatch.check_block_sizes(op, cls(), cls) == cls()
    other = RNNBlockSizes() if cls is not RNNBlockSizes else LinearScanBlockSizes()
    with pytest.raises(ValueError, match=f"block_sizes: expected None or a {cls.__name__} for {op}"):
        _dispatch.check_block_sizes(op, other, cls)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: LinearScanBlockSizes(block_t=3), "block_t"),
        (lambda: SelectiveScanBlockSizes(chunk=12), "chunk"),
        (lambda: GLABlockSizes(block_v=48), "block_v"),
        (lambda: DeltaBlockSizes(chunk=0), "chunk"),
        (lambda: RNNBlockSizes(block_b=6), "block_b"),
    ],
)
def test_block_sizes_fields_are_validated_when_built(make, field):
    with pytest.raises(ValueError, match=rf"block_sizes\.{field}: expected a positive power of two"):
        make()


def test_block_sizes_reach_the_kernel_and_its_checks(monkeypatch):
    """A kernel chunk given through ``block_sizes`` is the one the kernel runs (values
    match the XLA form at a chunk that does not divide T) and the one checked against
    the compiled target's minimum."""
    q, k, v, g, beta = attention_inputs(jnp.float64, time=20)
    want = gated_linear_attention(q, k, v, log_decay=g, method="sequential")
    chunk8 = GLABlockSizes(chunk=8)
    got = gated_linear_attention(q, k, v, log_decay=g, method="pallas", block_sizes=chunk8)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="needs a power of two >= 16 when compiled, got 8"):
        delta_rule(q, k, v, beta, method="pallas", block_sizes=DeltaBlockSizes(chunk=8))


def test_default_block_sizes_come_from_the_per_target_table():
    from pallas_kernels import targets

    for op, kernel in (("gated_linear_attention", "chunked_gla"), ("linear_scan", "linear_scan")):
        assert _dispatch.block_sizes_for(op, None, "cuda") == targets.default_block_sizes(kernel, "gpu")
        assert _dispatch.block_sizes_for(op, None, "cpu") == targets.default_block_sizes(kernel, "cpu")
    given = GLABlockSizes(chunk=32)
    assert _dispatch.block_sizes_for("gated_linear_attention", given, "cuda") is given
