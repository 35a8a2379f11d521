"""Speed and memory of every scan op, method by method, measured side by side in one run.

    python -m experiments.speed                       # all ops, default lengths
    python -m experiments.speed --ops selective_scan --lengths 1024,4096
    python -m experiments.speed --quick               # T in {1024, 4096}, 3 repeats
    python -m experiments.speed --peers               # also time the PyTorch CPU peers

For each (op, method, T) it reports the median wall time of the jitted forward and of
forward+backward (``jax.grad`` of the sum of outputs w.r.t. every input), the speed-up
over the ``sequential`` method at the same shape, the compiled temp memory of
forward+backward (``jit(...).lower(...).compile().memory_analysis()``), and per (op,
method) the growth exponent ``p`` of ``time ~ T^p`` fitted over the lengths. The
comparison rows time the shapes at which ``python -m experiments.bench.peers`` times
the PyTorch peers (mambapy, flash-linear-attention), so ``--peers`` prints the ratios of
one sitting. A configuration whose compiled memory exceeds ``--max-memory-gb`` is
reported (memory only) but not run; every cell left empty says why in the row's note.
Prints the tables (with a legend of the columns) and writes JSON (``--out``). Timing and
tables come from :mod:`experiments.bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.bench import peers
from experiments.bench.table import Column, legend, shape_text, text_table, write_json
from experiments.bench.timing import environment, growth_exponent, measure_jax, run_row


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


def causal_conv1d_workload(t, batch=2, d=256, k=4):
    """The short convolution of Mamba/H3/DeltaNet: ``parallel`` is ``causal_conv1d`` (k
    shifted multiply-adds, custom VJP), ``sequential`` its step form under ``lax.scan``."""
    from ssmjax.scan.conv import causal_conv1d, causal_conv1d_step

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x, w = _normal(k1, (batch, t, d)), _normal(k2, (k, d))

    def run(method, x, w):
        if method == "parallel":
            return causal_conv1d(x, w)[0]
        step = lambda state, x_t: causal_conv1d_step(x_t, state, w)[::-1]  # noqa: E731
        return jax.lax.scan(step, jnp.zeros((batch, k - 1, d), x.dtype), x.swapaxes(0, 1))[1].swapaxes(0, 1)

    return Workload("causal_conv1d", dict(b=batch, t=t, d=d), (x, w), run, ("sequential", "parallel"))


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
#: Lengths at which the PyTorch RNN peers (:func:`experiments.bench.peers.rnn_peer_timings`)
#: are also timed when importable: their per-step Python loops take ~4 s per fwd+bwd at T = 1024.
RNN_PEER_MAX_T = 4096


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
    rnn_peers = peers.rnn_peer_timings(cell, t, batch, heads, dh) if t <= RNN_PEER_MAX_T else {}
    print(f"\nrnn_{cell} t={t}: Newton iterations to 1e-5: {iters}" + (f"; peers fwd+bwd ms: {rnn_peers}" if rnn_peers else ""), file=sys.stderr)
    methods = ("sequential", "newton", "newton_diag")
    if jax.default_backend() in ("gpu", "tpu"):
        methods += ("pallas",)
    shape = dict(b=batch, t=t, h=heads, d=dh, newton_iters=iters)
    if rnn_peers:
        shape["peers_ms"] = rnn_peers
    return Workload(f"rnn_{cell}", shape, (gx, R, bias), run, methods)


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "linear_scan": linear_scan_workload,
    "matrix_scan": matrix_scan_workload,
    "selective_scan": selective_scan_workload,
    "gla": gla_workload,
    "delta_rule": delta_rule_workload,
    "prefix_softmax": prefix_softmax_workload,
    "causal_conv1d": causal_conv1d_workload,
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
    "causal_conv1d": (1024, 4096, 16384, 65536),
    "newton_gru": (512, 2048, 8192),
    "rnn_lstm": (1024, 4096, 16384, 65536),
    "rnn_gru": (1024, 4096, 16384, 65536),
}
#: Comparison rows: the shapes the PyTorch peers are timed at (experiments.bench.peers.SHAPES);
#: ``timed=False`` rows report compiled memory only (the sequential method is too slow there).
COMPARISON = (
    ("selective_scan", dict(t=1024, batch=2, d=256, n=16), True),
    ("selective_scan", dict(t=4096, batch=2, d=256, n=16), False),
    ("gla", dict(t=2048, batch=2, heads=4, d=64), True),
)
#: peer result key -> (op of the comparison row, its t, our method compared)
PEER_RATIOS = {
    "mambapy_selective_scan_fb_ms": ("selective_scan", 1024, "chunked"),
    "fla_naive_chunk_simple_gla_fb_ms": ("gla", 2048, "chunked"),
}
SHAPE_KEYS = ("b", "t", "h", "d", "n")
COLUMNS = (
    Column("op", "op", meaning="scan op (ssmjax.scan)"),
    Column("method", "method", meaning="its method= argument"),
    Column("shape", "shape", meaning="b batch, t length, h heads, d channels/head dim, n state size"),
    Column("fwd_ms", "fwd ms", "{:.1f}", "median ms of the jitted forward"),
    Column("fwd_vs_seq", "x seq", "{:.2f}", "sequential time / this time at the same shape (> 1: faster)"),
    Column("fwd_bwd_ms", "fwd+bwd ms", "{:.1f}", "median ms of jax.grad of the sum of the outputs"),
    Column("fwd_bwd_vs_seq", "x seq ", "{:.2f}", "the same speed-up for forward+backward"),
    Column("temp_mb", "temp MB", "{:.1f}", "compiled scratch memory of forward+backward (XLA memory_analysis)"),
    Column("note", "note", meaning="why a cell is empty"),
    Column("error", "error", meaning="the exception of a failing configuration"),
)


def shape_of(row: dict) -> tuple:
    return tuple((k, row[k]) for k in SHAPE_KEYS if k in row)


def measure(w: Workload, method: str, reps: int, max_bytes: float, timed: bool = True) -> dict:
    """One row: ``op``, ``method``, the shape fields, then :func:`experiments.bench.measure_jax`'s
    times, memory and note (``fwd_temp_mb``, ``temp_mb``, ``fwd_ms``, ``fwd_bwd_ms``)."""
    row = dict(op=w.op, method=method, **w.shape)
    row.update(measure_jax(lambda *args: w.run(method, *args), w.args, reps=reps, max_memory_gb=max_bytes / 2**30,
                           timed=timed))
    return row


def add_ratios_and_growth(rows: list[dict]) -> dict:
    """``*_vs_seq`` = sequential time / method time (>1: faster), or a note why it is
    missing; returns the exponent ``p`` of ``fwd+bwd ms ~ T^p`` per ``op/method``."""
    seq = {(r["op"], shape_of(r)): r for r in rows if r["method"] == "sequential"}
    for r in rows:
        ref = seq.get((r["op"], shape_of(r)))
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if ref and key in ref and key in r:
                r[key.replace("_ms", "_vs_seq")] = ref[key] / r[key]
        if "fwd_ms" in r and "fwd_vs_seq" not in r and "note" not in r:
            r["note"] = "x seq: sequential not measured at this shape"
    growth = {}
    for op, method in sorted({(r["op"], r["method"]) for r in rows}):
        p = growth_exponent([(r["t"], r["fwd_bwd_ms"]) for r in rows
                             if (r["op"], r["method"]) == (op, method) and "fwd_bwd_ms" in r])
        if p is not None:
            growth[f"{op}/{method}"] = p
    return growth


def _with_shape(rows: list[dict]) -> list[dict]:
    return [dict(r, shape=shape_text(dict(shape_of(r)))) for r in rows]


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n{text_table(_with_shape(rows), COLUMNS)}")


def run_peers(python: str | None) -> dict | None:
    """The PyTorch peers' timings (:mod:`experiments.bench.peers`): in this process when
    torch imports here, else in ``python`` (an interpreter with ``.[peers]``); ``None``
    with the reason printed when neither can run them."""
    if peers.missing("torch") is None or not python:
        result = peers.peer_timings()
    elif not Path(python).exists():
        print(f"\npeers: skipped (torch is not importable here and --peers-python {python} does not exist; "
              f"{peers.INSTALL_HINT})")
        return None
    else:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run([python, "-m", "experiments.bench.peers"], capture_output=True, text=True, check=False,
                             cwd=root)
        if out.returncode:
            print(f"\npeers: failed\n{out.stderr[-2000:]}")
            return None
        result = json.loads(out.stdout.strip().splitlines()[-1])
    for key, reason in result.get("skipped", {}).items():
        print(f"\npeers: {key} skipped ({reason})")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(WORKLOADS), help="comma-separated ops")
    parser.add_argument("--lengths", default=None, help="comma-separated T values (default per op)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="T in {1024, 4096}, 3 repeats")
    parser.add_argument("--no-comparison", "--no-anchors", dest="no_comparison", action="store_true",
                        help="skip the comparison rows (the PyTorch peers' shapes)")
    parser.add_argument("--peers", action="store_true", help="also time the PyTorch peers (experiments.bench.peers)")
    parser.add_argument("--peers-python", default=None,
                        help="interpreter with the peers installed, when torch is not importable here")
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
    env = environment()
    print(f"jax {env['jax']} on {env['device']}, {env['cpus']} cpus; {reps} timed calls per cell after one "
          f"compile-and-warm-up call; progress on stderr")

    rows = []
    for op in ops:
        if args.lengths:
            lengths = [int(t) for t in args.lengths.split(",")]
        else:
            lengths = (1024, 4096) if args.quick else DEFAULT_LENGTHS[op]
        for i, t in enumerate(lengths):
            w = WORKLOADS[op](t)
            for method in w.methods:
                run_row(rows, {}, lambda w=w, m=method: measure(w, m, reps, max_bytes),
                        label=f"{op} t={t} {method}", progress=f"[{op} {i + 1}/{len(lengths)}]")
    growth = add_ratios_and_growth(rows)
    print_table(rows, "T sweep (median ms; x seq = speed-up over the sequential method)")
    print("\ngrowth exponent p (fwd+bwd time ~ T^p, fitted over the lengths above; 1 = linear):")
    for key, p in growth.items():
        print(f"  {key:<32} {p:.2f}")

    comparison = []
    if not args.no_comparison:
        for op, kw, timed in COMPARISON:
            if op in ops:
                w = WORKLOADS[op](**kw)
                for method in w.methods:
                    run_row(comparison, {}, lambda w=w, m=method, timed=timed: measure(w, m, reps, max_bytes, timed),
                            label=f"{op} t={kw['t']} {method}", progress="[comparison]")
        add_ratios_and_growth(comparison)
        print_table(comparison, "comparison rows (the shapes python -m experiments.bench.peers times the PyTorch "
                                "peers at)")
    print("\ncolumns:\n" + legend(_with_shape(rows + comparison), COLUMNS))
    result = dict(env, rows=rows, growth=growth, comparison=comparison)
    if args.peers:
        peer = run_peers(args.peers_python)
        if peer:
            result["peers"] = peer
            print("\npeers (PyTorch CPU, same sitting):", json.dumps(peer))
            for key, (op, t, method) in PEER_RATIOS.items():
                ours = next((r.get("fwd_bwd_ms") for r in comparison
                             if (r["op"], r["t"], r["method"]) == (op, t, method)), None)
                if ours and key in peer:
                    label = f"{op} {method} vs {key.removesuffix('_fb_ms')}"
                    result[label] = peer[key] / ours
                    print(f"{label} (fwd+bwd): {result[label]:.1f}x faster")
    print(f"\nwrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
