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


def _attention_inputs(t, batch, heads, d):
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (_normal(key, (batch, t, heads, d)) for key in ks[:3])
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    log_decay = -jax.nn.softplus(_normal(ks[3], (batch, t, heads)))
    beta = jax.nn.sigmoid(_normal(ks[4], (batch, t, heads)))
    return q, k, v, log_decay, beta


def gla_workload(t, batch=2, heads=4, d=64):
    from ssmjax.scan import gated_linear_attention

    q, k, v, log_decay, _ = _attention_inputs(t, batch, heads, d)
    run = lambda method, q, k, v, g: gated_linear_attention(q, k, v, log_decay=g, method=method)  # noqa: E731
    return Workload("gla", dict(b=batch, t=t, h=heads, d=d), (q, k, v, log_decay), run,
                    ("sequential", "parallel", "chunked"))


def delta_rule_workload(t, batch=2, heads=4, d=64):
    from ssmjax.scan import delta_rule

    q, k, v, log_decay, beta = _attention_inputs(t, batch, heads, d)
    run = lambda method, q, k, v, beta, g: delta_rule(q, k, v, beta, log_decay=g, method=method)  # noqa: E731
    return Workload("delta_rule", dict(b=batch, t=t, h=heads, d=d), (q, k, v, beta, log_decay), run,
                    ("sequential", "chunked"))


def prefix_softmax_workload(t, batch=2, heads=4, d=64):
    from ssmjax.scan import prefix_softmax_attention

    q, _, v, _, _ = _attention_inputs(t, batch, heads, d)
    run = lambda method, s, v: prefix_softmax_attention(s, v, method=method)  # noqa: E731
    return Workload("prefix_softmax", dict(b=batch, t=t, h=heads, d=d), (q[..., 0], v), run,
                    ("sequential", "associative"))


def gru_cell(params, h, x):
    """A GRU cell (Cho et al. 2014) on one example, for the Newton benchmarks."""
    W, U, bias = params
    r, z, n = jnp.split(W @ x + bias, 3)
    ur, uz, un = jnp.split(U @ h, 3)
    r, z = jax.nn.sigmoid(r + ur), jax.nn.sigmoid(z + uz)
    return (1 - z) * jnp.tanh(n + r * un) + z * h


def newton_gru_workload(t, batch=2, d=16):
    from ssmjax.scan import newton_recurrence

    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    params = (_normal(ks[0], (3 * d, d), d**-0.5), _normal(ks[1], (3 * d, d), d**-0.5), jnp.zeros(3 * d))
    x = _normal(ks[2], (batch, t, d))
    h0 = jnp.zeros((batch, d), jnp.float32)

    def run(method, x):
        kind = dict(method="sequential") if method == "sequential" else dict(jacobian=method)
        return tuple(newton_recurrence(gru_cell, params, x, h0, **kind)[:2])

    return Workload("newton_gru", dict(b=batch, t=t, d=d), (x,), run, ("sequential", "dense", "diagonal"))


# ----------------------------------------------------------------------------- head-wise RNNs
#: Lengths at which the PyTorch peers (pip pararnn-torch, flashrnn) are also timed when they
#: are importable: on CPU their per-step Python loops take ~4 s per fwd+bwd at T = 1024.
RNN_PEER_MAX_T = 4096


def _torch_median_ms(fn, reps: int = 3) -> float:
    """Median of ``reps`` calls (no warm-up call: eager PyTorch has no compilation)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def rnn_peer_timings(cell: str, t: int, batch: int, heads: int, dh: int) -> dict:
    """fwd+bwd ms of the PyTorch CPU peers at the same (b, t, d = heads * dh), if importable:

    * ``pararnn_{newton,sequential}``: pip pararnn-torch's ``ParaRNN(ParaLSTM | ParaGRU)``
      (ParaRNN-style cells with *diagonal* recurrent weights, so its exact Newton is
      cheaper per iteration than ours with dense head blocks) with its default Newton
      schedule (``NewtonConfig(max_iters=None)``), and its sequential loop;
    * ``flashrnn_vanilla``: flashrnn's pure-PyTorch backend on our layout
      (``Wx [b, t, gates, heads, dh]``, ``R [gates, heads, dh, dh]``), float32.

    Neither is a dependency: a missing package just leaves its entries out. They live in
    the peers venv (shared/bench/setup_peers.sh; flashrnn is not in it), so one sitting
    with both runs that interpreter with this repo's venv appended, e.g.
    ``PYTHONPATH=.:.venv/lib/python3.11/site-packages .peers-venv/bin/python -m
    experiments.speed --ops rnn_lstm,rnn_gru``.
    """
    try:
        import torch
    except ImportError:
        return {}
    torch.manual_seed(0)
    torch.set_num_threads(2)
    d, out = heads * dh, {}
    reps = 3 if t <= 1024 else 1  # one call at T = 4096 takes ~5-45 s
    try:
        from pararnn import NewtonConfig, ParaGRU, ParaLSTM, ParaRNN

        para_cell = {"lstm": ParaLSTM, "gru": ParaGRU}[cell](d, d)
        x = torch.randn(batch, t, d, requires_grad=True)
        for solver in ("newton", "sequential"):
            model = ParaRNN(para_cell, config=NewtonConfig(max_iters=None), solver=solver)
            out[f"pararnn_{solver}"] = _torch_median_ms(lambda m=model: m(x).sum().backward(), reps)
            if solver == "newton" and model.last_stats:
                out["pararnn_newton_iters"] = int(model.last_stats[0].iters)
    except ImportError:
        pass
    try:
        from flashrnn import flashrnn

        # flashrnn's GRU takes 3 input gates (r, z, n), 3 recurrent ones (n, r, z), 4 biases
        gates, rgates, biases = {"lstm": (4, 4, 4), "gru": (3, 3, 4)}[cell]
        wx = torch.randn(batch, t, gates, heads, dh, requires_grad=True)
        R = (torch.randn(rgates, heads, dh, dh) / dh**0.5).requires_grad_(True)
        b = torch.zeros(biases, heads, dh, requires_grad=True)

        def flash_fwd_bwd():
            h, _ = flashrnn(wx, R, b, function=cell, backend="vanilla", dtype="float32")
            h[0].sum().backward()

        out["flashrnn_vanilla"] = _torch_median_ms(flash_fwd_bwd, reps)
    except ImportError:
        pass
    return out


def rnn_workload(cell: str, t: int, batch: int = 2, heads: int = 4, dh: int = 4) -> Workload:
    """A head-wise LSTM / GRU (:func:`ssmjax.scan.rnn.nonlinear_rnn`, d = heads * dh = 16)
    evaluated sequentially and by Newton with the exact block Jacobian (``newton``) or its
    diagonal (``newton_diag``, quasi-Newton); on GPU/TPU also the Pallas kernel.
    The Newton iteration counts to the float32 tolerance (1e-5) go into the row as
    ``newton_iters`` and the PyTorch peers' fwd+bwd ms (when installed) as ``peers_ms``."""
    from ssmjax.scan.rnn import CELLS, nonlinear_rnn

    gates = CELLS[cell].gates
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    gx = _normal(ks[0], (batch, t, gates, heads, dh))
    R = _normal(ks[1], (gates, heads, dh, dh), dh**-0.5)
    bias = _normal(ks[2], (gates, heads, dh), 0.1)

    def run(method, gx, R, bias):
        jacobian = {"newton": "block", "newton_diag": "diagonal"}.get(method)
        if jacobian:
            return nonlinear_rnn(cell, gx, R, bias, method="newton", jacobian=jacobian)
        return nonlinear_rnn(cell, gx, R, bias, method=method)

    count = jax.jit(lambda jac, gx, R, bias: nonlinear_rnn(cell, gx, R, bias, method="newton", jacobian=jac,
                                                           return_info=True)[2].iterations, static_argnums=0)
    iters = {jac: int(count(jac, gx, R, bias)) for jac in ("block", "diagonal")}
    peers = rnn_peer_timings(cell, t, batch, heads, dh) if t <= RNN_PEER_MAX_T else {}
    print(f"\nrnn_{cell} t={t}: Newton iterations to 1e-5: {iters}" + (f"; peers fwd+bwd ms: {peers}" if peers else ""))
    methods = ("sequential", "newton", "newton_diag")
    if jax.default_backend() in ("gpu", "tpu"):
        methods += ("pallas",)
    shape = dict(b=batch, t=t, h=heads, d=dh, newton_iters=iters)
    if peers:
        shape["peers_ms"] = peers
    return Workload(f"rnn_{cell}", shape, (gx, R, bias), run, methods)


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "linear_scan": linear_scan_workload,
    "matrix_scan": matrix_scan_workload,
    "selective_scan": selective_scan_workload,
    "gla": gla_workload,
    "delta_rule": delta_rule_workload,
    "prefix_softmax": prefix_softmax_workload,
    "newton_gru": newton_gru_workload,
    "rnn_lstm": lambda t, **kw: rnn_workload("lstm", t, **kw),
    "rnn_gru": lambda t, **kw: rnn_workload("gru", t, **kw),
}
_CHUNKED_LENGTHS = (512, 2048, 8192, 32768)
DEFAULT_LENGTHS = {
    "linear_scan": (1024, 4096, 16384, 65536),
    "matrix_scan": (1024, 4096, 16384, 65536),
    "selective_scan": (1024, 4096, 16384, 65536),
    "gla": _CHUNKED_LENGTHS,
    "delta_rule": _CHUNKED_LENGTHS,
    "prefix_softmax": _CHUNKED_LENGTHS,
    "newton_gru": (512, 2048, 8192),
    "rnn_lstm": (1024, 4096, 16384, 65536),
    "rnn_gru": (1024, 4096, 16384, 65536),
}
#: Shapes named in the performance targets: (op, kwargs) measured once each.
ANCHORS = (
    ("selective_scan", dict(t=1024, batch=2, d=256, n=16)),
    ("selective_scan", dict(t=4096, batch=2, d=256, n=16)),
    ("gla", dict(t=2048, batch=2, heads=4, d=64)),
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
    args, rest = parser.parse_known_args(argv)
    if args.backend == "gpu":  # the Pallas-vs-XLA-vs-fla GPU benchmark has its own options
        from experiments import speed_gpu

        return speed_gpu.main(sys.argv[1:] if argv is None else list(argv))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
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
                    anchors.append(measure(w, method, reps, max_bytes, timed=(op, kw["t"]) != ("selective_scan", 4096)))
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
            gla = {r["method"]: r.get("fwd_bwd_ms") for r in anchors if r["op"] == "gla"}
            for label, ours_ms, peer_key in (
                ("selective_scan chunked vs mambapy pscan", ours.get("chunked"), "mambapy_selective_scan_fb_ms"),
                ("gla chunked vs fla naive_chunk_simple_gla", gla.get("chunked"), "fla_naive_chunk_simple_gla_fb_ms"),
            ):
                if ours_ms:
                    ratio = peers[peer_key] / ours_ms
                    print(f"{label} (fwd+bwd): {ratio:.1f}x faster")
                    result[label] = ratio
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
