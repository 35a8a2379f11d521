"""Measurements of the ``lm`` runs beside their validation loss: decode speed with ``step``,
the decode state's size, training throughput; a table sorted by loss and a
loss-vs-wall-time figure.

    python -m experiments.lm_bench [--runs runs/lm] [--out experiments/results] [--tokens 200]
    python -m experiments.lm_bench --runs runs/lm_hybrid --name lm_hybrid --hybrid

For every finished run under ``--runs`` (its ``config.json`` and ``result.json``):

* ``decode tok/s``: tokens per second of one-token ``step`` calls at batch 1 (jitted,
  called from Python as ``lm-sample`` does; the state is a KV cache of ``seq_len`` slots
  for attention, the mixer's recurrent state otherwise), after a warm-up;
* ``rerun tok/s``: the same per-token loop when each token instead re-runs the full
  forward pass over the last ``seq_len`` tokens (nanoGPT's ``generate``: no cache);
* ``state B/token``: bytes of the decode state (``init_state`` at batch 1, attention's
  cache sized to a context of ``n = seq_len`` tokens) divided by ``n``;
* ``train tok/s``: the run's mean logged training throughput (wall clock on a shared CPU,
  so only a rough comparison between runs made in the same sitting);
* ``copy acc``: the recall probe on the trained model (:func:`copy_probe`): top-1 accuracy
  on the second copy of a validation passage repeated twice (``seq_len / 2`` characters
  each), beside the accuracy on the same characters in the first copy.

Writes ``<out>/<name>_table.md`` (sorted by validation loss), ``<out>/<name>_bench.json``
and ``<out>/<name>_loss_vs_time.png`` (validation loss against training wall time); with
``--hybrid`` also ``<out>/<name>_ratio_table.md``, the hybrid-ratio study (:func:`hybrid_markdown`:
validation loss and copy accuracy per linear family and linear:full ratio). Speeds are
measured on random parameters: they do not depend on the trained values.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lm_sample import with_context
from ssmjax.models.backbone import parse_mixers


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays of a pytree."""
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(tree)))


def state_bytes(model, params, batch_size: int = 1) -> int:
    """Bytes of ``model``'s decode state at ``batch_size`` (float32)."""
    return tree_bytes(jax.eval_shape(lambda: model.apply(params, batch_size, jnp.float32, method="init_state")))


def _time_loop(fn, steps: int) -> float:
    """Seconds per call of ``fn(i)`` over ``steps`` calls (after one warm-up call)."""
    jax.block_until_ready(fn(-1))
    start = time.perf_counter()
    out = None
    for i in range(steps):
        out = fn(i)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def decode_speeds(config, vocab_size: int, tokens: int = 200, seed: int = 0) -> dict[str, float]:
    """``decode_tok_s`` (``step`` with its state), ``rerun_tok_s`` (a full forward over the
    last ``seq_len`` tokens per token) and ``state_bytes_per_token`` at context ``seq_len``."""
    from experiments.runner import build_model

    n = config.seq_len
    model = build_model(with_context(config, n + tokens + 2), vocab_size)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, n), jnp.int32))
    step = jax.jit(lambda p, t, s: model.apply(p, t, s, method="step"))
    forward = jax.jit(lambda p, x: model.apply(p, x)[:, -1])
    state = model.apply(params, 1, method="init_state")
    token = jnp.zeros((1,), jnp.int32)
    holder = {"state": state}

    def one_step(i):
        logits, holder["state"] = step(params, token, holder["state"])
        return logits

    window = jnp.zeros((1, n), jnp.int32)
    per_step = _time_loop(one_step, tokens)
    per_rerun = _time_loop(lambda i: forward(params, window), tokens)
    bytes_at_n = state_bytes(build_model(with_context(config, n), vocab_size), params)
    return dict(decode_tok_s=1.0 / per_step, rerun_tok_s=1.0 / per_rerun, state_bytes=bytes_at_n,
                state_bytes_per_token=bytes_at_n / n)


def repeated_passages(tokens: np.ndarray, length: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` passages of ``length`` tokens at seeded random offsets of ``tokens``, each
    written twice: ``[count, 2 length]`` rows ``p p``."""
    if len(tokens) < length + count:
        raise ValueError(f"tokens: {len(tokens)} tokens are too few for {count} passages of {length}")
    starts = np.random.default_rng(seed).choice(len(tokens) - length, size=count, replace=False)
    passages = np.stack([tokens[s:s + length] for s in starts])
    return np.concatenate([passages, passages], axis=1)


def copy_probe(model, params, rows: np.ndarray, batch_size: int = 64) -> dict[str, float]:
    """Exact-repeat recall of a trained LM on rows ``p p`` (:func:`repeated_passages`, passage
    length ``L``): the predictions of ``p[1:]`` in the second copy (positions ``L .. 2L-2``,
    where the answer is ``L`` tokens back in context) against the same targets in the first
    copy (positions ``0 .. L-2``, plain language modelling). Returns ``copy_acc`` /
    ``copy_loss`` (second copy, nats) and ``first_acc`` / ``first_loss``."""
    length = rows.shape[1] // 2
    forward = jax.jit(lambda p, x: jax.nn.log_softmax(model.apply(p, x).astype(jnp.float32), axis=-1))
    sums = dict(copy_acc=0.0, copy_loss=0.0, first_acc=0.0, first_loss=0.0)
    for i in range(0, len(rows), batch_size):
        x = rows[i:i + batch_size]
        logp = np.asarray(forward(params, jnp.asarray(x)))
        targets = x[:, 1:length]
        for name, offset in (("first", 0), ("copy", length)):
            lp = logp[:, offset:offset + length - 1]
            sums[f"{name}_loss"] -= np.take_along_axis(lp, targets[..., None], axis=-1).sum()
            sums[f"{name}_acc"] += (lp.argmax(-1) == targets).sum()
    return {k: float(v) / (len(rows) * (length - 1)) for k, v in sums.items()}


def loss_curve(metrics: list[dict]) -> tuple[list[float], list[float]]:
    """(training wall seconds, validation loss) at every evaluation of a run."""
    elapsed = {r["step"]: r["elapsed_s"] for r in metrics if r.get("split") == "train" and "elapsed_s" in r}
    points = [(elapsed[r["step"]], r["loss"]) for r in metrics
              if r.get("split") == "eval" and r.get("step") in elapsed and r.get("loss") is not None]
    return [p[0] for p in points], [p[1] for p in points]


def trained_copy_probe(run_dir: str | Path, valid: np.ndarray, passages: int = 256) -> dict[str, float]:
    """:func:`copy_probe` of the run in ``run_dir`` (restored from its newest checkpoint) on
    ``passages`` validation passages of half its context."""
    from experiments.lm_sample import load_run

    config, _, model, params = load_run(run_dir)
    return copy_probe(model, params, repeated_passages(valid, config.seq_len // 2, passages))


def collect(runs_dir: Path, tokens: int) -> list[dict[str, Any]]:
    from experiments.configs import config_from_dict
    from experiments.report import load_runs
    from experiments.tasks import lm_corpus

    rows, corpora = [], {}
    for run in load_runs(runs_dir):
        if run.get("experiment") != "lm" or run.get("status") != "done" or not run.get("eval"):
            continue
        config = config_from_dict("lm", run["config"])
        key = (config.data_dir, config.data_file, config.format, config.unknown)
        if key not in corpora:
            corpora[key] = lm_corpus(config)
        print(f"{run['run']}: decoding {tokens} tokens, copy probe ...", flush=True)
        speeds = {}
        try:  # one failing model does not end the table
            speeds = decode_speeds(config, corpora[key].tokenizer.vocab_size, tokens)
            speeds.update(trained_copy_probe(run["dir"], corpora[key].valid))
        except Exception as error:
            print(f"  {type(error).__name__}: {error}", flush=True)
        rows.append(dict(run=run["run"], model=run["model"], d_model=config.d_model, n_layers=config.n_layers,
                         mixers=list(parse_mixers(config.model, config.n_layers)),
                         seed=config.seed, params=run.get("params"), steps=run.get("step"),
                         val_loss=run["eval"].get("val_loss", run["eval"].get("loss")),
                         bpc=run["eval"].get("bpc"), train_tok_s=run.get("tokens_per_s"), wall_s=run.get("wall_s"),
                         curve=loss_curve(run["metrics"]), **speeds))
    return sorted(rows, key=lambda r: r["val_loss"])


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _copy_cell(row: dict[str, Any]) -> str:
    if row.get("copy_acc") is None:
        return "-"
    return f"{row['copy_acc']:.3f} ({row['first_acc']:.3f})"


def hybrid_ratio(mixers: list[str]) -> tuple[str, str]:
    """``(family, ratio)`` of a model's layers: the linear mixer's name (``"attention"`` for an
    all-attention model) and ``"linear:full"`` reduced to lowest terms (``"all linear"``,
    ``"all attention"``)."""
    full = sum(m == "attention" for m in mixers)
    linear = {m for m in mixers if m != "attention"}
    if len(linear) > 1:
        raise ValueError(f"mixers: a hybrid of one linear family and attention expected, got {sorted(linear)}")
    if not full:
        return linear.pop(), "all linear"
    if not linear:
        return "attention", "all attention"
    g = math.gcd(len(mixers) - full, full)
    return linear.pop(), f"{(len(mixers) - full) // g}:{full // g}"


def hybrid_markdown(rows: list[dict[str, Any]]) -> str:
    """The hybrid-ratio study: one row per linear family, one column per ratio, each cell
    ``val loss / copy acc``; the all-attention model is every family's last column."""
    cells, families, ratios = {}, [], ["all linear"]
    for r in sorted(rows, key=lambda r: -len(r["mixers"]) + sum(m == "attention" for m in r["mixers"])):
        family, ratio = hybrid_ratio(r["mixers"])
        if family not in families and family != "attention":
            families.append(family)
        if ratio not in ratios and ratio != "all attention":
            ratios.append(ratio)
        cells[family, ratio] = f"{r['val_loss']:.3f} / " + ("-" if r.get("copy_acc") is None else f"{r['copy_acc']:.2f}")
    ratios.append("all attention")
    attention = cells.get(("attention", "all attention"), "-")
    lines = ["| family | " + " | ".join(ratios) + " |", "|" + "---|" * (len(ratios) + 1)]
    for family in families:
        row = [cells.get((family, ratio), "-") for ratio in ratios[:-1]] + [attention]
        lines.append(f"| {family} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["rank", "run", "model", "d_model", "params", "val loss (nats)", "bpc", "train tok/s",
              "decode tok/s (step)", "decode tok/s (re-run)", "state B/token @64", "copy acc (1st copy)",
              "train time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows, 1):
        lines.append("| " + " | ".join([
            str(i), f"`{r['run']}`", f"`{r['model']}`", str(r["d_model"]), f"{r['params'] / 1e6:.3f}M",
            _fmt(r["val_loss"], ".4f"), _fmt(r["bpc"], ".3f"), _fmt(r["train_tok_s"], ".0f"),
            _fmt(r.get("decode_tok_s"), ".0f"), _fmt(r.get("rerun_tok_s"), ".0f"),
            _fmt(r.get("state_bytes_per_token"), ".0f"), _copy_cell(r),
            "-" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min"]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        x, y = r["curve"]
        if x:
            ax.plot(np.asarray(x) / 60, y, marker="o", ms=3, color=f"C{i % 10}", ls="-" if i < 10 else "--",
                    label=f"{r['run']} ({r['val_loss']:.3f})")
    ax.axhline(1.88, color="k", ls=":", lw=1, label="nanoGPT baby GPT (1.88)")
    ax.set(xlabel="training wall time (min, shared 2-core CPU)", ylabel="validation loss (nats/char)",
           title="lm (tinyshakespeare, cpu size): validation loss vs wall time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.lm_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/lm", help="lm runs (default: runs/lm)")
    parser.add_argument("--out", default="experiments/results", help="output folder (default: experiments/results)")
    parser.add_argument("--tokens", type=int, default=200, help="decoded tokens per measurement (default 200)")
    parser.add_argument("--name", default="lm", help="output file prefix (default: lm)")
    parser.add_argument("--hybrid", action="store_true", help="also write <name>_ratio_table.md (hybrid-ratio study)")
    args = parser.parse_args(argv)
    if not Path(args.runs).is_dir():
        parser.error(f"--runs: {args.runs!r} is not a directory")
    rows = collect(Path(args.runs), args.tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / f"{args.name}_table.md").write_text(table + "\n")
    (out / f"{args.name}_bench.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out / f"{args.name}_loss_vs_time.png")
    print(table)
    if args.hybrid:
        ratios = hybrid_markdown(rows)
        (out / f"{args.name}_ratio_table.md").write_text(ratios + "\n")
        print(ratios)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
