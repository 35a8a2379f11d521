"""`make demo`: every scan op's evaluation methods agree, side by side
with their speed on this machine.

    python -m experiments.demo [--t 2048] [--reps 3]

For each op in :data:`experiments.speed.WORKLOADS` it runs every method on the same
float32 inputs, prints the largest relative difference of the outputs from the
``sequential`` method (the oracle), and the median forward and forward+backward times.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from experiments.speed import WORKLOADS, add_ratios_and_growth, measure, print_table


def max_relative_difference(out, ref) -> float:
    diffs = [
        float(jnp.max(jnp.abs(o.astype(jnp.float32) - r.astype(jnp.float32))) / (jnp.max(jnp.abs(r.astype(jnp.float32))) + 1e-30))
        for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref))
    ]
    return max(diffs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", type=int, default=2048, help="sequence length")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"ssmjax demo on {jax.devices()[0].device_kind}: T = {args.t}, float32\n")
    print("agreement with the sequential oracle (max |out - seq| / max |seq|):")
    rows = []
    for op, make in WORKLOADS.items():
        w = make(args.t)
        ref = jax.jit(lambda *a, w=w: w.run("sequential", *a))(*w.args)
        for method in w.methods:
            out = jax.jit(lambda *a, w=w, m=method: w.run(m, *a))(*w.args)
            print(f"  {op:<26}{method:<13}{max_relative_difference(out, ref):.1e}")
            rows.append(measure(w, method, args.reps, max_bytes=2 * 2**30))
    add_ratios_and_growth(rows)
    print_table(rows, "speed (median ms; x seq = speed-up over sequential)")


if __name__ == "__main__":
    main()
