"""Parallel training of nonlinear RNNs (Danieli et al., 2025, "ParaRNN: Unlocking Parallel
Training of Nonlinear RNNs for Large Language Models"): the training step of an LSTM / GRU
language model with its head-wise recurrence evaluated sequentially or by Newton's method,
against the sequence length.

    python -m experiments.pararnn_speed [--cells lstm,gru] [--lengths 128,256,...,4096]
                                        [--batch 2] [--reps 5] [--out experiments/results]
    python -m experiments.pararnn_speed --curves runs/lm_pararnn

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

``--curves DIR`` instead compares the training curves of ``lm`` runs under ``DIR`` named
``<cell>-<method>-seed<k>`` (:func:`curve_gaps`): Newton against sequential at the same
seed, beside sequential at another seed (the noise a curve difference is judged against).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from experiments.bench.table import Column, markdown_table, text_table, write_json
from experiments.bench.timing import environment, median_ms, run_row

#: ``d_model`` of the 0.8M-parameter rows of the ``lm`` table (experiments/notes/lm.md).
D_MODEL = {"lstm": 96, "gru": 104}
METHODS = ("sequential", "newton")
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
    """Median ms of one jitted training step of ``config``'s LM on random tokens
    (:class:`experiments.lm_speed.TrainStep`, as the training loop calls it)."""
    from experiments.lm_speed import TrainStep

    return median_ms(TrainStep(config, seed), reps, warmup=1)


def measure(cell: str, t: int, batch: int, reps: int) -> dict:
    row = {f"{m}_ms": train_step_ms(lm_config(cell, m, t, batch), reps) for m in METHODS}
    row.update({f"{m}_tok_s": batch * t / (row[f"{m}_ms"] / 1e3) for m in METHODS})
    row["ratio"] = row["newton_ms"] / row["sequential_ms"]
    return row


def train_losses(run: dict) -> dict[int, float]:
    """``{step: training loss}`` of a run loaded by :func:`experiments.report.load_run`."""
    return {r["step"]: r["loss"] for r in run["metrics"] if r.get("split") == "train" and "loss" in r}


def curve_gaps(runs: list[dict]) -> list[dict]:
    """Per cell, the largest and the mean absolute difference of the training loss over the
    steps both runs logged, for ``newton`` vs ``sequential`` at seed 0 and for ``sequential``
    at seed 1 vs seed 0, with each run's final validation loss. ``runs``: loaded runs whose
    names are ``<cell>-<method>-seed<k>``."""
    by_name = {run["run"]: run for run in runs}
    rows = []
    for cell in sorted({name.split("-")[0] for name in by_name}):
        reference = by_name.get(f"{cell}-sequential-seed0")
        if reference is None:
            continue
        base = train_losses(reference)
        for other, label in ((f"{cell}-newton-seed0", "newton vs sequential (seed 0)"),
                             (f"{cell}-sequential-seed1", "sequential seed 1 vs seed 0 (noise)")):
            if other not in by_name:
                continue
            losses = train_losses(by_name[other])
            gaps = np.abs([losses[s] - base[s] for s in sorted(set(base) & set(losses))])
            rows.append(dict(cell=cell, compared=label, steps=len(gaps), max_gap=float(gaps.max()),
                             mean_gap=float(gaps.mean()), val_loss=by_name[other].get("eval", {}).get("val_loss"),
                             reference_val_loss=reference.get("eval", {}).get("val_loss"),
                             wall_s=by_name[other].get("wall_s"), reference_wall_s=reference.get("wall_s")))
    return rows


CURVE_COLUMNS = (
    Column("cell", "cell"),
    Column("compared", "compared"),
    Column("steps", "steps"),
    Column("max_gap", "max |Δ train loss|", "{:.1e}"),
    Column("mean_gap", "mean |Δ train loss|", "{:.1e}"),
    Column("val_loss", "val loss", "{:.4f}"),
    Column("reference_val_loss", "val loss (seq, seed 0)", "{:.4f}"),
    Column("wall_s", "wall s", "{:.0f}"),
    Column("reference_wall_s", "wall s (seq, seed 0)", "{:.0f}"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.pararnn_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="lstm,gru")
    parser.add_argument("--lengths", default="128,256,512,1024,2048,4096")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--curves", metavar="DIR", help="compare the training curves of the lm runs under DIR instead")
    args = parser.parse_args(argv)
    if args.curves:
        from experiments.report import load_runs

        if not Path(args.curves).is_dir():
            parser.error(f"--curves: {args.curves!r} is not a directory")
        rows = curve_gaps([run for run in load_runs(args.curves) if run.get("experiment") == "lm"])
        print(markdown_table(rows, CURVE_COLUMNS))
        return 0
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
