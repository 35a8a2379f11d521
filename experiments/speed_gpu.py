"""GPU benchmark of the Pallas kernels, every comparison side by side in one run.

    python -m experiments.speed_gpu                        # on a GPU: all sections
    python -m experiments.speed_gpu --sections fla,bandwidth --json out.json
    python -m experiments.speed_gpu --smoke                # tiny shapes; on CPU the kernels
                                                           # run under the Pallas interpreter

Sections (each row runs in its own try/except, so one failing kernel leaves an ``error``
in its row and the table goes on):

* ``methods``: every ``method=`` of ``linear_scan``, ``selective_scan``,
  ``gated_linear_attention`` (per-channel decay) and ``delta_rule`` (gated): median
  forward and forward+backward wall time (``jax.grad`` of the sum of the outputs w.r.t.
  every floating input) and the compiled temp memory of forward+backward.
* ``fla``: at flash-linear-attention's benchmark shapes (B, T, H, D) = (1, 8192, 96, 128),
  (2, 16384, 16, 128), (8, 1024, 8, 64), bf16 q/k/v: fla's ``chunk_gla``,
  ``chunk_simple_gla`` and ``chunk_gated_delta_rule`` (when ``import torch, fla`` works and
  CUDA is there; otherwise the row says why not) next to ssmjax's Pallas kernels (exact
  float32 products, and ``pallas-tf32``: ``block_sizes=GLABlockSizes(dot_precision=
  "default")``, TF32 tensor cores) and the chunked XLA form, forward and forward+backward.
* ``bandwidth``: ``linear_scan`` forward over ``>= 2^28`` float32 elements (reads ``a``,
  ``b``, writes ``h``: 12 bytes per element) against the measured copy bandwidth
  (``x -> x + 1``, 8 bytes per element): achieved GB/s and the fraction of copy
  (target: pallas >= 80%).
* ``memory``: compiled temp memory of ``selective_scan`` forward+backward per method at
  growing ``T``, divided by ``b t d`` floats and by ``b t d n`` floats: the Pallas kernel
  (chunk-state recompute) should stay ``O(b t d)``.

Prints one markdown table per section and writes JSON to ``--json``, else ``$OUT/``
``speed_gpu.json`` when ``$OUT`` is set, else ``results/speed_gpu.json``. Never run on a
GPU yet: the whole run compiles ~70 programs, so where a device call is capped (10 min)
split it, e.g. ``--sections fla`` then ``--sections methods,bandwidth,memory``.
``BENCH_TRACEBACK=1`` prints the traceback of a failing row; timing and tables come from
:mod:`experiments.bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path

# JAX and torch (fla) share the GPU: do not let JAX grab 75% of it up front (no effect
# when the caller already initialised a JAX backend).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

from experiments import bench
from experiments.bench.clock import median_of_calls
from experiments.bench.table import Column, markdown_table
from experiments.bench.timing import run_row

SECTIONS = ("methods", "fla", "bandwidth", "memory")
FLA_SHAPES = ((1, 8192, 96, 128), (2, 16384, 16, 128), (8, 1024, 8, 64))


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every shape the benchmark uses; ``SMOKE`` is the CPU-sized twin of ``FULL``."""

    linear: tuple  # (b, t, d)
    selective: tuple  # (b, t, d, n)
    attention: tuple  # (b, t, h, d) for the methods section
    fla: tuple  # (B, T, H, D) rows of the fla section
    bandwidth: tuple  # (b, t, d) with b t d >= 2^28 on a GPU
    memory_lengths: tuple  # T values for the selective_scan memory sweep
    memory: tuple  # (b, d, n)


FULL = Sizes(
    linear=(8, 8192, 2048),
    selective=(2, 4096, 1536, 16),
    attention=(2, 4096, 16, 128),
    fla=FLA_SHAPES,
    bandwidth=(16, 16384, 1024),
    memory_lengths=(2048, 8192, 32768),
    memory=(2, 1536, 16),
)
SMOKE = Sizes(
    linear=(2, 64, 32),
    selective=(1, 32, 16, 4),
    attention=(1, 40, 2, 16),
    fla=((1, 40, 2, 16),),
    bandwidth=(2, 64, 32),
    memory_lengths=(32, 128),
    memory=(1, 16, 4),
)


# ----------------------------------------------------------------------------- timing
def measure_jax(fn: Callable, args: tuple, cfg, backward: bool = True, timed: bool = True) -> dict:
    """:func:`experiments.bench.measure_jax` with this run's ``--reps``, ``--warmup`` and
    ``--max-memory-gb``."""
    return bench.measure_jax(fn, args, reps=cfg.reps, warmup=cfg.warmup, max_memory_gb=cfg.max_memory_gb,
                             backward=backward, timed=timed)


# ----------------------------------------------------------------------------- inputs
def _key(i):
    return jax.random.PRNGKey(i)


def linear_inputs(b, t, d, dtype=jnp.float32):
    a = jax.random.uniform(_key(0), (b, t, d), jnp.float32, 0.9, 1.0).astype(dtype)
    x = jax.random.normal(_key(1), (b, t, d), dtype)
    return a, x


def selective_inputs(b, t, d, n):
    u = jax.random.normal(_key(2), (b, t, d))
    delta = jax.nn.softplus(jax.random.normal(_key(3), (b, t, d)) - 2.0)
    A = -jnp.exp(jax.random.normal(_key(4), (d, n)) * 0.5)
    B, C = jax.random.normal(_key(5), (b, t, n)), jax.random.normal(_key(6), (b, t, n))
    return u, delta, A, B, C


def attention_inputs(b, t, h, d, dtype=jnp.float32, decay="channel"):
    """q, k (unit norm), v in ``dtype``; log-decays (``logsigmoid / 16``, fla's benchmark
    gates) per channel or per head and beta = sigmoid in float32."""
    q, k, v = (jax.random.normal(_key(10 + i), (b, t, h, d), jnp.float32) for i in range(3))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    gshape = (b, t, h, d) if decay == "channel" else (b, t, h)
    g = jax.nn.log_sigmoid(jax.random.normal(_key(13), gshape)) / 16
    beta = jax.nn.sigmoid(jax.random.normal(_key(14), (b, t, h)))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta


# ----------------------------------------------------------------------------- ssmjax ops
def linear_fn(method):
    from ssmjax.scan import linear_scan

    return lambda a, x: linear_scan(a, x, method=method)[0]


def selective_fn(method):
    from ssmjax.scan import selective_scan

    return lambda u, delta, A, B, C: selective_scan(u, delta, A, B, C, method=method)


def gla_fn(method):
    """``gated_linear_attention``; ``method="pallas-tf32"`` is ``"pallas"`` with the
    kernels' ``dot_precision="default"`` (TF32 tensor cores) through ``block_sizes``."""
    from ssmjax.scan import GLABlockSizes, gated_linear_attention

    if method != "pallas-tf32":
        return lambda q, k, v, g: gated_linear_attention(q, k, v, log_decay=g, method=method)
    tf32 = GLABlockSizes(dot_precision="default")
    return lambda q, k, v, g: gated_linear_attention(
        q, k, v, log_decay=g, method="pallas", block_sizes=tf32
    )


def delta_fn(method):
    """``delta_rule``; ``method="pallas-tf32"`` as in :func:`gla_fn`."""
    from ssmjax.scan import DeltaBlockSizes, delta_rule

    if method != "pallas-tf32":
        return lambda q, k, v, beta, g: delta_rule(q, k, v, beta, log_decay=g, method=method)
    tf32 = DeltaBlockSizes(dot_precision="default")
    return lambda q, k, v, beta, g: delta_rule(
        q, k, v, beta, log_decay=g, method="pallas", block_sizes=tf32
    )


def _shape(**kw) -> dict:
    return kw


def section_methods(cfg, sizes: Sizes) -> list[dict]:
    rows = []
    b, t, d = sizes.linear
    a, x = linear_inputs(b, t, d)
    for m in ("pallas", "associative", "chunked", "sequential"):
        run_row(rows, dict(section="methods", op="linear_scan", impl=m, shape=_shape(b=b, t=t, d=d)),
                lambda m=m: measure_jax(linear_fn(m), (a, x), cfg))
    b, t, d, n = sizes.selective
    args = selective_inputs(b, t, d, n)
    for m in ("pallas", "associative", "chunked", "sequential"):
        run_row(rows, dict(section="methods", op="selective_scan", impl=m, shape=_shape(b=b, t=t, d=d, n=n)),
                lambda m=m: measure_jax(selective_fn(m), args, cfg))
    b, t, h, d = sizes.attention
    q, k, v, g, beta = attention_inputs(b, t, h, d)
    for m in ("pallas", "pallas-tf32", "chunked", "sequential"):
        run_row(rows, dict(section="methods", op="gla (per-channel)", impl=m, shape=_shape(b=b, t=t, h=h, d=d)),
                lambda m=m: measure_jax(gla_fn(m), (q, k, v, g), cfg))
    _, _, _, g_head, _ = attention_inputs(b, t, h, d, decay="head")
    for m in ("pallas", "pallas-tf32", "chunked", "sequential"):
        run_row(rows, dict(section="methods", op="gated delta rule", impl=m, shape=_shape(b=b, t=t, h=h, d=d)),
                lambda m=m: measure_jax(delta_fn(m), (q, k, v, beta, g_head), cfg))
    return rows


# ----------------------------------------------------------------------------- fla
FLA_OPS = {  # op -> (fla module, fla function, decay kind, uses beta)
    "gla": ("fla.ops.gla", "chunk_gla", "channel", False),
    "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla", "head", False),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", "head", True),
}


def fla_status() -> str | None:
    """``None`` when torch + fla import and CUDA is available, else why not."""
    try:
        import fla  # noqa: F401
        import torch
    except Exception as e:  # noqa: BLE001
        return f"not installed ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "not run (torch has no CUDA device)"
    return None


def measure_fla(op: str, shape, cfg) -> dict:
    """fla's Triton op at ``(B, T, H, D)`` in bf16, forward and forward+backward (all
    inputs require grad), timed with CUDA synchronisation."""
    import importlib

    import torch
    import torch.nn.functional as F

    module, name, decay, uses_beta = FLA_OPS[op]
    fn = getattr(importlib.import_module(module), name)
    B, T, H, D = shape
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=dt) for _ in range(3))
    k = F.normalize(k.float(), dim=-1).to(dt)
    g = F.logsigmoid(torch.randn((B, T, H, D) if decay == "channel" else (B, T, H), device=dev)) / 16
    kwargs = dict(q=q, k=k, v=v, g=g)
    if uses_beta:
        kwargs["beta"] = torch.sigmoid(torch.randn(B, T, H, device=dev)).to(dt)
    if "head_first" in inspect.signature(fn).parameters:
        kwargs["head_first"] = False  # [B, T, H, D], the ssmjax layout
    leaves = {key: x.detach().clone().requires_grad_(True) for key, x in kwargs.items() if torch.is_tensor(x)}
    kwargs.update(leaves)
    do = torch.randn(B, T, H, D, device=dev, dtype=dt)

    def forward():
        with torch.no_grad():
            return fn(**kwargs)[0]

    def forward_backward():
        for x in leaves.values():
            x.grad = None
        fn(**kwargs)[0].backward(do)

    def timed(run):
        return median_of_calls(lambda: (run(), torch.cuda.synchronize()), cfg.reps, cfg.warmup)

    import fla

    return dict(fwd_ms=timed(forward), fwd_bwd_ms=timed(forward_backward), note=f"fla {getattr(fla, '__version__', '?')}")


def section_fla(cfg, sizes: Sizes) -> tuple[list[dict], str]:
    rows = []
    status = fla_status()
    for shape in sizes.fla:
        B, T, H, D = shape
        shp = _shape(B=B, T=T, H=H, D=D)
        for op, (_, name, decay, uses_beta) in FLA_OPS.items():
            q, k, v, g, beta = attention_inputs(B, T, H, D, jnp.bfloat16, decay)
            if uses_beta:
                args, make = (q, k, v, beta.astype(jnp.bfloat16), g), delta_fn
            else:
                args, make = (q, k, v, g), gla_fn
            for impl in ("pallas", "pallas-tf32", "chunked"):
                run_row(rows, dict(section="fla", op=op, impl=impl, shape=shp),
                        lambda make=make, impl=impl, args=args: measure_jax(make(impl), args, cfg))
            base = dict(section="fla", op=op, impl=f"fla {name}", shape=shp)
            if status is None:
                run_row(rows, base, lambda op=op, shape=shape: measure_fla(op, shape, cfg))
            else:
                rows.append(dict(base, note=status))
    return rows, status or "available"


# ----------------------------------------------------------------------------- bandwidth
def section_bandwidth(cfg, sizes: Sizes) -> list[dict]:
    rows = []
    b, t, d = sizes.bandwidth
    n = b * t * d
    a, x = linear_inputs(b, t, d)
    shp = _shape(b=b, t=t, d=d, elements=n)

    def copy():
        f = jax.jit(lambda x: x + 1.0).lower(x).compile()
        ms = bench.median_ms(lambda: f(x), cfg.reps, cfg.warmup)
        return dict(fwd_ms=ms, gb_per_s=8 * n / ms / 1e6, bytes_per_element=8)

    copy_row = run_row(rows, dict(section="bandwidth", op="copy x -> x + 1", impl="xla", shape=shp), copy)
    for m in ("pallas", "chunked", "associative", "sequential"):
        def scan(m=m):
            row = measure_jax(linear_fn(m), (a, x), cfg, backward=False)
            if "fwd_ms" in row:
                row.update(gb_per_s=12 * n / row["fwd_ms"] / 1e6, bytes_per_element=12)
                if "gb_per_s" in copy_row:
                    row["of_copy"] = row["gb_per_s"] / copy_row["gb_per_s"]
            return row

        run_row(rows, dict(section="bandwidth", op="linear_scan fwd", impl=m, shape=shp), scan)
    return rows


# ----------------------------------------------------------------------------- memory
def section_memory(cfg, sizes: Sizes) -> list[dict]:
    rows = []
    b, d, n = sizes.memory
    for t in sizes.memory_lengths:
        args = selective_inputs(b, t, d, n)
        for m in ("pallas", "chunked", "associative", "sequential"):
            def mem(m=m, t=t, args=args):
                row = measure_jax(selective_fn(m), args, cfg, timed=False)
                if row.get("temp_mb") is not None:
                    floats = row["temp_mb"] * 2**20 / 4
                    row.update(per_btd=floats / (b * t * d), per_btdn=floats / (b * t * d * n))
                return row

            run_row(rows, dict(section="memory", op="selective_scan fwd+bwd", impl=m, shape=_shape(b=b, t=t, d=d, n=n)), mem)
    return rows


# ----------------------------------------------------------------------------- report
COLUMNS = (
    Column("op", "op"),
    Column("impl", "impl"),
    Column("shape", "shape"),
    Column("fwd_ms", "fwd ms", "{:.3f}"),
    Column("fwd_bwd_ms", "fwd+bwd ms", "{:.3f}"),
    Column("temp_mb", "temp MB (fwd+bwd)", "{:.4g}"),
    Column("gb_per_s", "GB/s", "{:.4g}"),
    Column("of_copy", "of copy", "{:.0%}"),
    Column("per_btd", "temp / (b t d) floats", "{:.2f}"),
    Column("per_btdn", "temp / (b t d n) floats", "{:.3f}"),
    Column("note", "note"),
    Column("error", "error"),
)


def output_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "speed_gpu.json"
    return Path("results/speed_gpu.json")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: kernels interpreted)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats (default 5; smoke 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default 1)")
    parser.add_argument("--max-memory-gb", type=float, default=60.0, help="skip timing above this temp memory")
    parser.add_argument("--backend", default=None, help="cpu or gpu (default: JAX's choice)")
    parser.add_argument("--json", default=None, help="JSON output (default $OUT/speed_gpu.json or results/)")
    args = parser.parse_args(argv)
    if args.backend:
        jax.config.update("jax_platforms", {"gpu": "cuda"}.get(args.backend, args.backend))
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    cfg = argparse.Namespace(
        reps=args.reps if args.reps is not None else (1 if args.smoke else 5),
        warmup=args.warmup if args.warmup is not None else 1,
        max_memory_gb=args.max_memory_gb,
    )
    sizes = SMOKE if args.smoke else FULL
    device = jax.devices()[0]
    header = f"jax {jax.__version__} on {jax.default_backend()} ({device.device_kind}), smoke={args.smoke}"
    print(header)
    if jax.default_backend() == "cpu" and not args.smoke:
        print("warning: CPU backend without --smoke: the Pallas kernels run interpreted (very slow)")

    result = dict(jax=jax.__version__, backend=jax.default_backend(), device=device.device_kind,
                  smoke=args.smoke, sections={})
    runners = dict(methods=section_methods, bandwidth=section_bandwidth, memory=section_memory)
    for section in sections:
        print(f"[{section}]", file=sys.stderr)
        if section == "fla":
            rows, status = section_fla(cfg, sizes)
            result["fla"] = status
        else:
            rows = runners[section](cfg, sizes)
        result["sections"][section] = rows
        print(f"\n## {section}\n")
        print(markdown_table(rows, COLUMNS))
    path = bench.write_json(output_path(args.json), result)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
