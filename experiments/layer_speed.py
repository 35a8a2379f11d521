"""Per-layer cost on this machine: parameter count and jit-compiled forward+backward time
of every registered mixer at one shape, plus the decode speed of a hybrid model.

    python -m experiments.layer_speed [--layers s4d,mamba,...] [--b 8 --t 1024 --d 128]
                                      [--reps 3] [--hybrid "gated_deltanet*3,attention"]

Times are medians of ``--reps`` calls after a compile call (CPU timings here are noisy:
compare rows of one run, not runs); timing and tables come from :mod:`experiments.bench`. Decoding runs ``generate()`` (prompt in parallel
form, then ``step`` inside ``lax.scan``) and reports generated tokens per second.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import ssmjax.layers
from experiments.bench.table import Column, markdown_table
from experiments.bench.timing import environment, median_ms, run_row
from ssmjax.models import SequenceModel, generate

COLUMNS = (Column("layer", "layer"), Column("params", "params", "{:,}"), Column("fwd_bwd_ms", "fwd+bwd ms", "{:.0f}"),
           Column("error", "error"))


def layer_row(name: str, b: int, t: int, d: int, reps: int) -> dict:
    layer = ssmjax.layers.get(name, d_model=d)
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, d), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x[:, :16])
    count = sum(p.size for p in jax.tree.leaves(params))
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(layer.apply(p, x) ** 2)))
    return dict(layer=name, params=int(count), fwd_bwd_ms=median_ms(lambda: loss_and_grad(params, x), reps))


def decode_tokens_per_s(pattern: str, n_layers: int, d: int, batch: int, prompt_len: int, steps: int) -> float:
    model = SequenceModel(d_model=d, n_layers=n_layers, mixers=pattern, vocab_size=256, head="lm")
    prompt = jax.random.randint(jax.random.PRNGKey(0), (batch, prompt_len), 0, 256)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), prompt)
    run = jax.jit(lambda p, prompt, key: generate(model, p, prompt, steps, key)[0])
    decode_ms = median_ms(lambda: run(params, prompt, jax.random.PRNGKey(2)), 3)
    prefill = jax.jit(lambda p, prompt: model.apply(p, prompt))
    prefill_ms = median_ms(lambda: prefill(params, prompt), 3)
    return batch * steps / max(1e-9, (decode_ms - prefill_ms) / 1e3)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default=",".join(ssmjax.layers.names()))
    parser.add_argument("--b", type=int, default=8)
    parser.add_argument("--t", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hybrid", default="gated_deltanet*3,attention", help="4-layer decode benchmark ('' skips)")
    args = parser.parse_args(argv)
    env = environment()
    print(f"jax {env['jax']} on {env['device']}; shape (b, t, d) = ({args.b}, {args.t}, {args.d}); progress on stderr")
    rows = []
    names = [n for n in args.layers.split(",") if n]
    for i, name in enumerate(names):  # a failing layer leaves its error in its row
        run_row(rows, dict(layer=name), lambda name=name: layer_row(name, args.b, args.t, args.d, args.reps),
                label=name, progress=f"[{i + 1}/{len(names)}]")
    print(markdown_table(rows, COLUMNS))
    if args.hybrid:
        rate = decode_tokens_per_s(args.hybrid, 4, args.d, batch=1, prompt_len=128, steps=256)
        print(f"\ndecode, 4-layer {args.hybrid!r}, d={args.d}, batch 1, prompt 128: {rate:,.0f} tokens/s")
    return rows


if __name__ == "__main__":
    main()
