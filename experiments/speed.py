"""Speed and memory of every scan op, method by method, measured side by side in one run.

    python -m experiments.speed                       # all ops, default lengths
    python -m experiments.speed --ops selective_scan --lengths 1024,4096
    python -m experiments.speed --quick               # short lengths, few repeats
    python -m experiments.speed --peers               # also time the PyTorch CPU peers

For each (op, method, T) it reports the median wall time of the jitted forward and of
forward+backward (``jax.grad`` of the sum of outputs w.r.t. every input), the ratio to
the ``sequential`` method at the same T, the compiled temp memory of forward+backward
(``jit(...).lower(...).compile().memory_analysis()``), and per (op, method) the growth
exponent ``p`` of ``time ~ T^p`` fitted over the lengths. Anchor rows reproduce the
performance targets' shapes. Configurations whose compiled memory exceeds
``--max-memory-gb`` are reported (memory only) but not run. Prints a table and writes
JSON (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    """One op at one shape: ``run(method, *args)`` returns the outputs to time."""

    op: str
    shape: dict
    args: tuple
    run: Callable
    methods: tuple[str, ...]


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32)


def linear_scan_workload(t, batch=2, d=256):
    from ssmjax.scan import linear_scan

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.uniform(k1, (batch, t, d), jnp.float32, 0.9, 1.0)
    b = _normal(k2, (batch, t, d))
    run = lambda method, a, b: linear_scan(a, b, method=method)  # noqa: E731
    return Workload("linear_scan", dict(b=batch, t=t, d=d), (a, b), run,
                    ("sequential", "associative", "chunked"))


def matrix_scan_workload(t, batch=2, d=16, n=4):
    from ssmjax.scan import matrix_scan

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    A = _normal(k1, (batch, t, d, n, n), 0.4)
    b = _normal(k2, (batch, t, d, n))
    run = lambda method, A, b: matrix_scan(A, b, method=method)  # noqa: E731
    return Workload("matrix_scan", dict(b=batch, t=t, d=d, n=n), (A, b), run,
                    ("sequential", "associative", "chunked"))


def selective_scan_workload(t, batch=2, d=64, n=16):
    from ssmjax.scan import selective_scan

    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    u = _normal(ks[0], (batch, t, d))
    delta = jax.random.uniform(ks[1], (batch, t, d), jnp.float32) * 0.1
    A = -jax.random.uniform(ks[2], (d, n), jnp.float32) - 0.5
    B, C = _normal(ks[3], (batch, t, n)), _normal(ks[4], (batch, t, n))
    run = lambda method, u, delta, B, C: selective_scan(u, delta, A, B, C, method=method)  # noqa: E731
    return Workload("selective_scan", dict(b=batch, t=t, d=d, n=n), (u, delta, B, C), run,
                    ("sequential", "associative", "chunked"))


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "linear_scan": linear_scan_workload,
    "matrix_scan": matrix_scan_workload,
    "selective_scan": selective_scan_workload,
}
DEFAULT_LENGTHS = {
    "linear_scan": (1024, 4096, 16384, 65536),
    "matrix_scan": (1024, 4096, 16384, 65536),
    "selective_scan": (1024, 4096, 16384, 65536),
}
#: Shapes named in the performance targets: (op, kwargs) measured once each.
ANCHORS = (
    ("selective_scan", dict(t=1024, batch=2, d=256, n=16)),
    ("selective_scan", dict(t=4096, batch=2, d=256, n=16)),
)


def median_ms(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(w: Workload, method: str, reps: int, max_bytes: float, timed: bool = True) -> dict:
    def outputs(*args):
        return w.run(method, *args)

    def loss(*args):
        out = outputs(*args)
        return sum(jnp.sum(x.real) for x in jax.tree.leaves(out))

    fwd = jax.jit(outputs)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(w.args)))))
    mem = fwd_bwd.lower(*w.args).compile().memory_analysis()
    row = dict(op=w.op, method=method, **w.shape, temp_mb=mem.temp_size_in_bytes / 2**20)
    if timed and mem.temp_size_in_bytes <= max_bytes:
        row["fwd_ms"] = median_ms(fwd, w.args, reps)
        row["fwd_bwd_ms"] = median_ms(fwd_bwd, w.args, reps)
    return row


SHAPE_KEYS = ("b", "t", "h", "d", "n")


def shape_of(row: dict) -> tuple:
    return tuple((k, row[k]) for k in SHAPE_KEYS if k in row)


def add_ratios_and_growth(rows: list[dict]) -> dict:
    """``*_vs_seq`` = sequential time / method time (>1: faster); exponent of T."""
    seq = {(r["op"], shape_of(r)): r for r in rows if r["method"] == "sequential"}
    for r in rows:
        ref = seq.get((r["op"], shape_of(r)))
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if ref and key in ref and key in r:
                r[key.replace("_ms", "_vs_seq")] = ref[key] / r[key]
    growth = {}
    for op, method in sorted({(r["op"], r["method"]) for r in rows}):
        pts = [(r["t"], r["fwd_bwd_ms"]) for r in rows if (r["op"], r["method"]) == (op, method) and "fwd_bwd_ms" in r]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            growth[f"{op}/{method}"] = float(np.polyfit(x, y, 1)[0])
    return growth


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    head = f"{'op':<16}{'method':<13}{'shape':<28}{'fwd ms':>9}{'x seq':>7}{'fwd+bwd ms':>12}{'x seq':>7}{'temp MB':>10}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in shape_of(r))
        fmt = lambda k, f: (f % r[k]) if k in r else "-"  # noqa: E731
        print(f"{r['op']:<16}{r['method']:<13}{shape:<28}{fmt('fwd_ms', '%.1f'):>9}{fmt('fwd_vs_seq', '%.2f'):>7}"
              f"{fmt('fwd_bwd_ms', '%.1f'):>12}{fmt('fwd_bwd_vs_seq', '%.2f'):>7}{r['temp_mb']:>10.1f}")


def run_peers(python: str) -> dict | None:
    """Time the PyTorch CPU peers (../shared/bench/peers_speed.py) in this sitting."""
    script = Path(__file__).resolve().parents[2] / "shared" / "bench" / "peers_speed.py"
    if not (Path(python).exists() and script.exists()):
        print(f"\npeers: skipped ({python} or {script} missing; see shared/bench/setup_peers.sh)")
        return None
    out = subprocess.run([python, str(script)], capture_output=True, text=True, check=False)
    if out.returncode:
        print(f"\npeers: failed\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(WORKLOADS), help="comma-separated ops")
    parser.add_argument("--lengths", default=None, help="comma-separated T values (default per op)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="T in {1024, 4096}, 3 repeats")
    parser.add_argument("--no-anchors", action="store_true")
    parser.add_argument("--peers", action="store_true", help="also run shared/bench/peers_speed.py")
    parser.add_argument("--peers-python", default=".peers-venv/bin/python")
    parser.add_argument("--max-memory-gb", type=float, default=4.0)
    parser.add_argument("--backend", default=None, help="cpu or gpu (default: JAX's choice)")
    parser.add_argument("--out", default="results/speed.json")
    args = parser.parse_args(argv)
    if args.backend:
        jax.config.update("jax_platforms", {"gpu": "cuda"}.get(args.backend, args.backend))
    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(WORKLOADS))
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {sorted(WORKLOADS)}")
    reps = 3 if args.quick else args.reps
    max_bytes = args.max_memory_gb * 2**30
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} cpus")

    rows = []
    for op in ops:
        if args.lengths:
            lengths = [int(t) for t in args.lengths.split(",")]
        else:
            lengths = (1024, 4096) if args.quick else DEFAULT_LENGTHS[op]
        for t in lengths:
            w = WORKLOADS[op](t)
            for method in w.methods:
                rows.append(measure(w, method, reps, max_bytes))
                print(".", end="", flush=True)
    growth = add_ratios_and_growth(rows)
    print_table(rows, "T sweep (median ms; x seq = speed-up over the sequential method)")
    print("\ngrowth exponent p (fwd+bwd time ~ T^p):")
    for key, p in growth.items():
        print(f"  {key:<32} {p:.2f}")

    anchors = []
    if not args.no_anchors:
        for op, kw in ANCHORS:
            if op in ops:
                w = WORKLOADS[op](**kw)
                for method in w.methods:
                    anchors.append(measure(w, method, reps, max_bytes, timed=kw["t"] <= 2048))
        add_ratios_and_growth(anchors)
        print_table(anchors, "anchor shapes (targets)")
    result = dict(jax=jax.__version__, device=jax.devices()[0].device_kind, rows=rows,
                  growth=growth, anchors=anchors)
    if args.peers:
        peers = run_peers(args.peers_python)
        if peers:
            result["peers"] = peers
            print("\npeers (PyTorch CPU, same sitting):", json.dumps(peers))
            ours = {r["method"]: r.get("fwd_bwd_ms") for r in anchors if r["op"] == "selective_scan" and r["t"] == 1024}
            if ours.get("chunked"):
                ratio = peers["mambapy_selective_scan_fb_ms"] / ours["chunked"]
                print(f"selective_scan chunked fwd+bwd vs mambapy pscan: {ratio:.1f}x faster")
                result["selective_vs_mambapy"] = ratio
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
