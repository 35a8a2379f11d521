"""Per-layer cost on this machine: parameter count and jit-compiled forward+backward time
of every registered mixer at one shape, plus the decode speed of a hybrid model.

    python -m experiments.layer_speed [--layers s4d,mamba,...] [--b 8 --t 1024 --d 128]
                                      [--reps 3] [--hybrid "gated_deltanet*3,attention"]

Times are medians of ``--reps`` calls after a compile call (CPU timings here are noisy:
compare rows of one run, not runs). Decoding runs ``generate()`` (prompt in parallel
form, then ``step`` inside ``lax.scan``) and reports generated tokens per second.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import ssmjax.layers
from experiments.speed import median_ms
from ssmjax.models import SequenceModel, generate


def layer_row(name: str, b: int, t: int, d: int, reps: int) -> dict:
    layer = ssmjax.layers.get(name, d_model=d)
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, d), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x[:, :16])
    count = sum(p.size for p in jax.tree.leaves(params))
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(layer.apply(p, x) ** 2)))
    return dict(layer=name, params=int(count), fwd_bwd_ms=median_ms(loss_and_grad, (params, x), reps))


def decode_tokens_per_s(pattern: str, n_layers: int, d: int, batch: int, prompt_len: int, steps: int) -> float:
    model = SequenceModel(d_model=d, n_layers=n_layers, mixers=pattern, vocab_size=256, head="lm")
    prompt = jax.random.randint(jax.random.PRNGKey(0), (batch, prompt_len), 0, 256)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), prompt)
    run = jax.jit(lambda p, prompt, key: generate(model, p, prompt, steps, key)[0])
    decode_ms = median_ms(run, (params, prompt, jax.random.PRNGKey(2)), 3)
    prefill = jax.jit(lambda p, prompt: model.apply(p, prompt))
    prefill_ms = median_ms(prefill, (params, prompt), 3)
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
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; shape (b, t, d) = ({args.b}, {args.t}, {args.d})")
    print("| layer | params | fwd+bwd ms |\n|---|---|---|")
    rows = []
    for name in [n for n in args.layers.split(",") if n]:
        start = time.perf_counter()
        try:
            row = layer_row(name, args.b, args.t, args.d, args.reps)
        except Exception as error:  # one broken layer must not hide the others
            print(f"| {name} | failed: {type(error).__name__}: {str(error)[:120]} | |", flush=True)
            continue
        rows.append(row)
        print(f"| {name} | {row['params']:,} | {row['fwd_bwd_ms']:.0f} |  ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.hybrid:
        rate = decode_tokens_per_s(args.hybrid, 4, args.d, batch=1, prompt_len=128, steps=256)
        print(f"\ndecode, 4-layer {args.hybrid!r}, d={args.d}, batch 1, prompt 128: {rate:,.0f} tokens/s")
    return rows


if __name__ == "__main__":
    main()
