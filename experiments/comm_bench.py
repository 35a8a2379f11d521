"""Communication of the sequence-parallel scans: bytes each device sends per layer forward
against the activation bytes it holds, on a simulated ``seq=8`` mesh of CPU devices.

    python -m experiments.comm_bench [--t 1024,4096,16384,65536] [--ops linear_scan,...]
                                     [--json experiments/results/comm_bench.json]

For each op of :mod:`ssmjax.distributed.sequence` (``linear_scan_sp``,
``gated_linear_attention_sp``, ``delta_rule_sp``, ``selective_scan_sp``) and each
sequence length T, the forward is compiled (``jax.jit(...).lower(...).compile()``, from
abstract shapes: nothing is run, so T is limited by compile time, not memory) and

* ``sent_bytes``: bytes sent per device per layer forward, counted in the optimised HLO:
  the sum over every collective instruction (``all-gather``, ``all-reduce``,
  ``reduce-scatter``, ``all-to-all``, ``collective-permute`` and their ``-start``
  forms) of the sizes of its operands, i.e. the buffer each device contributes. An
  all-gather's operand is what the device sends (to each peer, or once around a ring);
  the ``n - 1`` pieces it receives are not counted. The sequence-parallel scans do one
  all-gather of their shard's transition ``M`` and end state from zero ``E``
  (Blelloch-style carry propagation; e.g. Sun et al. 2024, "Linear Attention Sequence
  Parallelism", and the scan-then-propagate of Martin & Cundy 2018), so
  ``sent_bytes = (|M| + |E|) * 4`` in float32, independent of T (:func:`expected_sent_bytes`);
* ``activation_bytes``: the bytes of the layer's inputs that one device holds, the
  time-sharded arrays' total over ``n`` (``[b, T/n, ...]`` per input);
* ``ratio = sent_bytes / activation_bytes``, which falls like ``1/T``;
* with ``--backward``, ``fwd_bwd_sent_bytes``: the same count for the compiled
  forward+backward (the gradient of the summed outputs and final state). Measured:
  ``9 (|M| + |E|) * 4`` at ``n = 8`` for every op: the forward's all-gather again, and
  its transpose, a reduce-scatter whose operand is the gathered ``[n, |M| + |E|]``
  cotangent (``n`` times the forward's); still independent of T.

Shapes (float32): linear_scan ``a, b [2, T, 256]``; gated_linear_attention
``q, k, v [2, T, 4, 64]``, ``log_decay [2, T, 4]``; delta_rule the same plus ``beta [2,
T, 4]``; selective_scan ``u, delta [2, T, 256]``, ``B, C [2, T, 16]``, ``A [256, 16]``.
Tables and JSON come from :mod:`experiments.bench`. The process owns its 8 CPU devices:
run it as the script (the device count is fixed when JAX starts).
"""

from __future__ import annotations

import os

# 8 simulated devices, without YNNPACK fusions (jaxlib 0.10.2's YNN fusion segfaults with
# several host devices; see tests/distributed/sequence_cases.py). Only as the script:
# importing this module (for its formulas) must not change the importer's devices.
if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                               " --xla_cpu_experimental_ynn_fusion_type=")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

OPS = ("linear_scan", "gated_linear_attention", "delta_rule", "selective_scan")
DEVICES = 8
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
#: Layer shapes (b, d) / (b, h, dk, dv) / (b, d, n): see the module docstring.
SHAPES = {"linear_scan": dict(b=2, d=256), "gated_linear_attention": dict(b=2, h=4, dk=64, dv=64),
          "delta_rule": dict(b=2, h=4, dk=64, dv=64), "selective_scan": dict(b=2, d=256, n=16)}
ITEMSIZE = 4  # float32
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OPERAND = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")


def expected_sent_bytes(op: str, shape: dict[str, int], itemsize: int = ITEMSIZE) -> int:
    """Bytes one device sends per forward: ``|M| + |E|`` elements of its shard's summary.

    * ``linear_scan`` (``h_t = a_t h_{t-1} + b_t``, state ``[b, d]``): ``M = prod a_t`` and
      ``E`` the end state from zero, ``2 b d``;
    * ``gated_linear_attention`` (``S_t = diag(exp g_t) S_{t-1} + k_t v_t^T``, state
      ``[b, h, dk, dv]``): ``M = exp(sum g_t)`` per key channel ``[b, h, dk]``, so
      ``b h dk (1 + dv)``;
    * ``delta_rule`` (``S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t
      v_t^T``): ``M`` dense ``[b, h, dk, dk]``, so ``b h dk (dk + dv)``;
    * ``selective_scan`` (``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, state
      ``[b, d, n]``): ``M = exp(A sum delta_t)``, so ``2 b d n``."""
    if op == "linear_scan":
        elements = 2 * shape["b"] * shape["d"]
    elif op == "gated_linear_attention":
        elements = shape["b"] * shape["h"] * shape["dk"] * (1 + shape["dv"])
    elif op == "delta_rule":
        elements = shape["b"] * shape["h"] * shape["dk"] * (shape["dk"] + shape["dv"])
    elif op == "selective_scan":
        elements = 2 * shape["b"] * shape["d"] * shape["n"]
    else:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    return elements * itemsize


def input_shapes(op: str, t: int, shape: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the op's time-sharded inputs ``[b, T, ...]`` (float32)."""
    b = shape["b"]
    if op == "linear_scan":
        return dict(a=(b, t, shape["d"]), b=(b, t, shape["d"]))
    if op == "selective_scan":
        d, n = shape["d"], shape["n"]
        return dict(u=(b, t, d), delta=(b, t, d), B=(b, t, n), C=(b, t, n))
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    h, dk, dv = shape["h"], shape["dk"], shape["dv"]
    shapes = dict(q=(b, t, h, dk), k=(b, t, h, dk), v=(b, t, h, dv), log_decay=(b, t, h))
    if op == "delta_rule":
        shapes["beta"] = (b, t, h)
    return shapes


def activation_bytes(op: str, t: int, shape: dict[str, int], devices: int = DEVICES,
                     itemsize: int = ITEMSIZE) -> int:
    """Bytes of the layer's time-sharded inputs one device holds: their total / ``devices``."""
    total = sum(math.prod(s) for s in input_shapes(op, t, shape).values()) * itemsize
    if total % devices:
        raise ValueError(f"t: {t} does not split the inputs evenly over {devices} devices")
    return total // devices


def _shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO shape (``f32[8,1024]{1,0}``, or a tuple of them)."""
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(x) for x in dims.split(",") if x)
               for dtype, dims in _OPERAND.findall(shape_text))


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """``{collective: summed operand bytes}`` over the instructions of an optimised HLO
    module's text (``compiled.as_text()``). Operands are printed by name
    (``all-gather(%fusion.3)``): their sizes are those of the instructions that define
    them (or the shapes printed inline, where a printer shows them)."""
    defined: dict[str, int] = {}
    calls: list[tuple[str, str]] = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        defined[name] = _shape_bytes(shape)
        base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
        if base in COLLECTIVES:
            calls.append((base, rest[:rest.index(")")] if ")" in rest else rest))
    sent = dict.fromkeys(COLLECTIVES, 0)
    for base, operands in calls:
        inline = _shape_bytes(operands)
        sent[base] += inline if inline else sum(defined[n] for n in re.findall(r"%([\w.\-]+)", operands))
    return sent


def _sharded_forward(op: str, mesh) -> Callable:
    """``inputs dict -> (outputs, final_state)`` of the op's sequence-parallel form."""
    import jax.numpy as jnp

    from ssmjax.distributed import delta_rule_sp, gated_linear_attention_sp, linear_scan_sp, selective_scan_sp

    if op == "linear_scan":
        return lambda x: linear_scan_sp(x["a"], x["b"], mesh=mesh)
    if op == "gated_linear_attention":
        return lambda x: gated_linear_attention_sp(x["q"], x["k"], x["v"], log_decay=x["log_decay"], mesh=mesh)
    if op == "delta_rule":
        return lambda x: delta_rule_sp(x["q"], x["k"], x["v"], x["beta"], log_decay=x["log_decay"], mesh=mesh)
    d, n = SHAPES["selective_scan"]["d"], SHAPES["selective_scan"]["n"]
    A = -jnp.ones((d, n), jnp.float32)
    return lambda x: selective_scan_sp(x["u"], x["delta"], A, x["B"], x["C"], delta_softplus=True, mesh=mesh)


def measure(op: str, t: int, shape: dict[str, int] | None = None, backward: bool = False) -> dict:
    """One row: the compiled forward's collective bytes, the activation bytes and their
    ratio; with ``backward`` also the bytes of the compiled forward+backward
    (``grad`` of the summed outputs and final state w.r.t. every input)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType

    shape = dict(SHAPES[op] if shape is None else shape)
    mesh = jax.make_mesh((DEVICES,), ("seq",), axis_types=(AxisType.Auto,))
    inputs = {name: jax.ShapeDtypeStruct(s, jnp.float32) for name, s in input_shapes(op, t, shape).items()}
    forward = _sharded_forward(op, mesh)
    by_kind = collective_bytes(jax.jit(forward).lower(inputs).compile().as_text())
    sent, held = sum(by_kind.values()), activation_bytes(op, t, shape)
    row = dict(sent_bytes=sent, expected_bytes=expected_sent_bytes(op, shape), activation_bytes=held,
               ratio=sent / held, collectives={k: v for k, v in by_kind.items() if v})
    if backward:
        def loss(x):
            outputs, final = forward(x)
            return jnp.sum(outputs) + jnp.sum(final)

        row["fwd_bwd_sent_bytes"] = sum(collective_bytes(jax.jit(jax.grad(loss)).lower(inputs).compile().as_text())
                                        .values())
    return row


def main(argv: list[str] | None = None) -> dict:
    import jax

    from experiments.bench.table import Column, legend, text_table, write_json
    from experiments.bench.timing import environment, run_row

    parser = argparse.ArgumentParser(prog="python -m experiments.comm_bench", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", default="1024,4096,16384,65536", help="sequence lengths (comma-separated)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"ops (comma-separated) of {', '.join(OPS)}")
    parser.add_argument("--backward", action="store_true", help="also count the forward+backward's collectives")
    parser.add_argument("--json", default="experiments/results/comm_bench.json", help="JSON output ('' skips)")
    args = parser.parse_args(argv)
    ops = [op for op in args.ops.split(",") if op]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"--ops: unknown {unknown}; expected a subset of {OPS}")
    lengths = [int(t) for t in args.t.split(",") if t]
    if jax.device_count() != DEVICES:
        parser.error(f"needs {DEVICES} devices, found {jax.device_count()}: run it as python -m experiments.comm_bench")
    rows: list[dict] = []
    for op in ops:
        for t in lengths:
            run_row(rows, dict(op=op, t=t), lambda op=op, t=t: measure(op, t, backward=args.backward), progress=f"[{len(rows) + 1}/"
                    f"{len(ops) * len(lengths)}]")
    columns = (Column("op", "op"), Column("t", "T", "{:,}"), Column("sent_bytes", "sent B/device", "{:,}",
               "bytes each device sends per layer forward (collective operands in the compiled HLO)"),
               Column("expected_bytes", "(|M|+|E|)*4", "{:,}", "the O(state) formula, independent of T"),
               Column("activation_bytes", "activation B/device", "{:,}", "the layer inputs one device holds"),
               Column("ratio", "sent/activation", "{:.2e}", "falls like 1/T"),
               Column("fwd_bwd_sent_bytes", "fwd+bwd sent B", "{:,}", "--backward: the same count for forward+backward"),
               Column("error", "error"))
    print(text_table(rows, columns))
    print(legend(rows, columns))
    falls = {op: all(a["ratio"] > b["ratio"] for a, b in zip(r, r[1:]))
             for op in ops if len(r := [x for x in rows if x["op"] == op and "ratio" in x]) == len(lengths)}
    result = dict(environment=environment(), devices=DEVICES, mesh="seq=8", shapes=SHAPES, rows=rows,
                  ratio_falls_with_t=falls)
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
