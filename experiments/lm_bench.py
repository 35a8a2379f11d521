"""Measurements of the ``lm`` runs beside their validation loss: decode speed with ``step``,
the decode state's size, training throughput; a table sorted by loss and a
loss-vs-wall-time figure.

    python -m experiments.lm_bench [--runs runs/lm] [--out experiments/results] [--tokens 200]

For every finished run under ``--runs`` (its ``config.json`` and ``result.json``):

* ``decode tok/s``: tokens per second of one-token ``step`` calls at batch 1 (jitted,
  called from Python as ``lm-sample`` does; the state is a KV cache of ``seq_len`` slots
  for attention, the mixer's recurrent state otherwise), after a warm-up;
* ``rerun tok/s``: the same per-token loop when each token instead re-runs the full
  forward pass over the last ``seq_len`` tokens (nanoGPT's ``generate``: no cache);
* ``state B/token``: bytes of the decode state (``init_state`` at batch 1, attention's
  cache sized to a context of ``n = seq_len`` tokens) divided by ``n``;
* ``train tok/s``: the run's mean logged training throughput (wall clock on a shared CPU,
  so only a rough comparison between runs made in the same sitting).

Writes ``<out>/lm_table.md`` (sorted by validation loss), ``<out>/lm_bench.json`` and
``<out>/lm_loss_vs_time.png`` (validation loss against training wall time). Speeds are
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


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays of a pytree."""
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(tree)))


def with_context(config, context: int):
    """``config`` with attention's KV cache sized to ``context`` slots (its decode state at
    that context length)."""
    from experiments.configs import replace

    fields = {k: dict(v) for k, v in config.mixer_fields.items()}
    fields.setdefault("attention", {})["max_len"] = context
    return replace(config, mixer_fields=fields)


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


def loss_curve(metrics: list[dict]) -> tuple[list[float], list[float]]:
    """(training wall seconds, validation loss) at every evaluation of a run."""
    elapsed = {r["step"]: r["elapsed_s"] for r in metrics if r.get("split") == "train" and "elapsed_s" in r}
    points = [(elapsed[r["step"]], r["loss"]) for r in metrics
              if r.get("split") == "eval" and r.get("step") in elapsed and r.get("loss") is not None]
    return [p[0] for p in points], [p[1] for p in points]


def collect(runs_dir: Path, tokens: int) -> list[dict[str, Any]]:
    from experiments.configs import config_from_dict
    from experiments.report import load_runs
    from experiments.tasks import lm_corpus

    rows, vocab = [], {}
    for run in load_runs(runs_dir):
        if run.get("experiment") != "lm" or run.get("status") != "done" or not run.get("eval"):
            continue
        config = config_from_dict("lm", run["config"])
        key = (config.data_dir, config.data_file, config.format, config.unknown)
        if key not in vocab:
            vocab[key] = lm_corpus(config).tokenizer.vocab_size
        print(f"{run['run']}: decoding {tokens} tokens ...", flush=True)
        try:
            speeds = decode_speeds(config, vocab[key], tokens)
        except Exception as error:  # one failing model does not end the table
            print(f"  {type(error).__name__}: {error}", flush=True)
            speeds = {}
        rows.append(dict(run=run["run"], model=run["model"], d_model=config.d_model, n_layers=config.n_layers,
                         seed=config.seed, params=run.get("params"), steps=run.get("step"),
                         val_loss=run["eval"].get("val_loss", run["eval"].get("loss")),
                         bpc=run["eval"].get("bpc"), train_tok_s=run.get("tokens_per_s"), wall_s=run.get("wall_s"),
                         curve=loss_curve(run["metrics"]), **speeds))
    return sorted(rows, key=lambda r: r["val_loss"])


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["rank", "run", "model", "d_model", "params", "val loss (nats)", "bpc", "train tok/s",
              "decode tok/s (step)", "decode tok/s (re-run)", "state B/token @64", "train time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows, 1):
        lines.append("| " + " | ".join([
            str(i), f"`{r['run']}`", f"`{r['model']}`", str(r["d_model"]), f"{r['params'] / 1e6:.3f}M",
            _fmt(r["val_loss"], ".4f"), _fmt(r["bpc"], ".3f"), _fmt(r["train_tok_s"], ".0f"),
            _fmt(r.get("decode_tok_s"), ".0f"), _fmt(r.get("rerun_tok_s"), ".0f"),
            _fmt(r.get("state_bytes_per_token"), ".0f"),
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
    args = parser.parse_args(argv)
    if not Path(args.runs).is_dir():
        parser.error(f"--runs: {args.runs!r} is not a directory")
    rows = collect(Path(args.runs), args.tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / "lm_table.md").write_text(table + "\n")
    (out / "lm_bench.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out / "lm_loss_vs_time.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
