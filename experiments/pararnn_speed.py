"""Parallel training of nonlinear RNNs (Danieli et al., 2025, "ParaRNN: Unlocking Parallel
Training of Nonlinear RNNs for Large Language Models"): the training step of an LSTM / GRU
language model with its head-wise recurrence evaluated sequentially or by Newton's method,
against the sequence length.

    python -m experiments.pararnn_speed [--cells lstm,gru] [--lengths 128,256,...,4096]
                                        [--batch 2] [--reps 5] [--out experiments/results]

The step is exactly what ``python -m experiments lm --model lstm`` runs (the cpu size's
model: 4 layers, the ``d_model`` of the ``lm`` table's 0.8M-parameter rows; forward,
cross-entropy, backward, gradient clipping and AdamW: :func:`ssmjax.train.loop.make_train_step`),
jitted, at ``batch x T`` tokens. The recurrence ``h_t = f(h_{t-1}, x_t)`` of each layer
(:func:`ssmjax.scan.rnn.nonlinear_rnn`) is solved ``method="sequential"`` (a scan over
``t``) or ``method="newton"``: all ``h_t`` at once, each Newton iteration a linear
recurrence in the Jacobians ``dh_t / dh_{t-1}`` solved by a parallel scan, until the
residual is below the float32 tolerance; the backward pass is one more linear scan
(reverse, with the transposed Jacobians). Both give the same hidden states to that
tolerance, so the choice is a speed trade: Newton's ``O(log T)`` depth against several
times the work of one sequential pass.

Prints and writes ``<out>/pararnn_speed.md`` (and ``.json``): median ms per training step
of both methods, tokens/s, and ``newton / sequential`` time (below 1: Newton faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.table import Column, markdown_table, text_table, write_json
from experiments.bench.timing import environment, median_ms, run_row

#: ``d_model`` of the 0.8M-parameter rows of the ``lm`` table (experiments/notes/lm.md).
D_MODEL = {"lstm": 96, "gru": 104}
METHODS = ("sequential", "newton")
VOCAB = 65  # tinyshakespeare's characters
COLUMNS = (
    Column("cell", "cell"),
    Column("t", "T", meaning="tokens per sequence"),
    Column("b", "batch"),
    Column("sequential_ms", "sequential ms", "{:.1f}", "median ms per training step, method='sequential'"),
    Column("newton_ms", "newton ms", "{:.1f}", "median ms per training step, method='newton'"),
    Column("sequential_tok_s", "seq tok/s", "{:.0f}", "training tokens per second, sequential"),
    Column("newton_tok_s", "newton tok/s", "{:.0f}", "training tokens per second, Newton"),
    Column("ratio", "newton / seq", "{:.2f}", "time ratio (below 1: Newton is faster)"),
    Column("error", "error"),
)


def lm_config(cell: str, method: str, t: int, batch: int):
    """The ``lm`` cpu config of a ``cell`` LM at sequence length ``t`` and ``batch`` rows,
    its recurrence evaluated with ``method``."""
    from experiments.configs import SIZES, replace

    if cell not in D_MODEL:
        raise ValueError(f"cells: expected some of {sorted(D_MODEL)}, got {cell!r}")
    return replace(SIZES["lm"]["cpu"], model=cell, d_model=D_MODEL[cell], seq_len=t, batch_size=batch,
                   mixer_fields={cell: {"method": method}})


def train_step_ms(config, reps: int, seed: int = 0) -> float:
    """Median ms of one jitted training step of ``config``'s LM on random tokens."""
    from experiments.runner import build_model
    from ssmjax.train.loop import make_optimizer, make_train_step

    model = build_model(config, VOCAB)
    tokens = jax.random.randint(jax.random.key(seed), (config.batch_size, config.seq_len + 1), 0, VOCAB)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = jnp.ones(inputs.shape, bool)
    params = model.init(jax.random.key(seed), inputs)
    optimizer, _ = make_optimizer(config)
    state = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    step = make_train_step(model, optimizer)
    key = jax.random.key(seed + 1)
    return median_ms(lambda: step(state, inputs, targets, mask, key), reps, warmup=1)


def measure(cell: str, t: int, batch: int, reps: int) -> dict:
    row = {f"{m}_ms": train_step_ms(lm_config(cell, m, t, batch), reps) for m in METHODS}
    row.update({f"{m}_tok_s": batch * t / (row[f"{m}_ms"] / 1e3) for m in METHODS})
    row["ratio"] = row["newton_ms"] / row["sequential_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.pararnn_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="lstm,gru")
    parser.add_argument("--lengths", default="128,256,512,1024,2048,4096")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args(argv)
    cells = args.cells.split(",")
    for cell in cells:
        if cell not in D_MODEL:
            parser.error(f"--cells: expected some of {sorted(D_MODEL)}, got {cell!r}")
    try:
        lengths = [int(t) for t in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths: expected comma-separated integers, got {args.lengths!r}")
    rows: list[dict] = []
    for cell in cells:
        for t in lengths:
            run_row(rows, dict(cell=cell, t=t, b=args.batch), lambda c=cell, t=t: measure(c, t, args.batch, args.reps))
    print(text_table(rows, COLUMNS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    header = (f"LSTM / GRU LM training step (fwd+bwd+AdamW), sequential vs Newton: median of {args.reps}, "
              f"jax {env['jax']} on {env['backend']} ({env['device']}).\n\n")
    (out / "pararnn_speed.md").write_text(header + markdown_table(rows, COLUMNS) + "\n")
    write_json(out / "pararnn_speed.json", dict(environment=env, rows=rows))
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    if ratios:
        print(f"newton / sequential time: {np.min(ratios):.2f} .. {np.max(ratios):.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
