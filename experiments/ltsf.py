"""Long-term time-series forecasting with the protocol of LTSF-Linear and iTransformer.

    python -m experiments ltsf --model dlinear --data ETTh1 [--set horizon=96] [--seeds 0,1,2]

Zeng et al., 2023, "Are Transformers Effective for Time Series Forecasting?" (LTSF-Linear)
and Liu et al., 2024, "iTransformer: Inverted Transformers Are Effective for Time Series
Forecasting". Multivariate ("M") setting: every variate is forecast from the look-back of
every variate (or of itself, for channel-independent models). Splits, scaler (fitted on the
train rows only) and windows are those of ``ssmjax/data/forecasting.py``. Training: Adam on
the MSE, the learning rate halved after every epoch (``lradj='type1'``), early stopping on
the validation MSE (patience 3), the best validation epoch's parameters tested.

Evaluation differs on one point, on purpose: MSE and MAE (scaled values) are averaged over
**every** test window; the LTSF-Linear code drops the last partial test batch
(``drop_last=True``), so ``result.json`` also gives that number (``mse_drop_last``) for the
comparison. iTransformer tests with batch size 1, so there both are the same.

One run directory per (model, data, seq_len[, name]) holds every horizon and seed:
``<out>/ltsf/<run>/config.json``, ``result.json`` (per-horizon mean and std over seeds, the
average over horizons as ``mse`` / ``mae``, wall time), ``H<h>_seed<s>/`` (the epoch
metrics, checkpoints and per-seed result of one fit) and ``forecast_H<h>.png``.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssmjax.data.forecasting import ForecastData, load_series, prepare, resolve_data_file, series_name
from ssmjax.models.forecasters import build_forecaster
from ssmjax.train.fit import FitConfig, fit, predict_in_batches

DESCRIPTION = ("long-term forecasting (LTSF-Linear / iTransformer protocol) on ETTh1, ETTh2, exchange or an LTSF "
               "CSV / LSTNet file: linear, nlinear, dlinear, itransformer, ci:<mixers>, inverted:<mixers>")

HORIZONS = (96, 192, 336, 720)
LINEAR_MODELS = ("linear", "nlinear", "dlinear")

#: Paper numbers (MSE, MAE) per (model, data, seq_len) and horizon, with where they are from.
PAPER = {
    ("dlinear", "ETTh1", 336): ("LTSF-Linear (Zeng et al., 2023), Table 2",
                                {96: (0.375, 0.399), 192: (0.405, 0.416), 336: (0.439, 0.443), 720: (0.472, 0.490)}),
    ("nlinear", "ETTh1", 336): ("LTSF-Linear (Zeng et al., 2023), Table 2",
                                {96: (0.374, 0.394), 192: (0.408, 0.415), 336: (0.429, 0.427), 720: (0.440, 0.453)}),
    ("dlinear", "exchange_rate", 336): ("LTSF-Linear (Zeng et al., 2023), Table 2",
                                        {96: (0.081, 0.203), 192: (0.157, 0.293), 336: (0.305, 0.414),
                                         720: (0.643, 0.601)}),
    ("itransformer", "ETTh1", 96): ("iTransformer (Liu et al., 2024), full long-term forecasting results (appendix)",
                                    {96: (0.386, 0.405), 192: (0.441, 0.436), 336: (0.487, 0.458),
                                     720: (0.503, 0.491)}),
}
#: How close our mean MSE must come to the paper's (issue 14).
TOLERANCE = {"dlinear": 0.01, "nlinear": 0.01, "linear": 0.01, "itransformer": 0.02}

#: LTSF-Linear's learning rate and batch size per data set (scripts/EXP-LongForecasting/Linear/*.sh);
#: exchange uses batch 8 for H = 96, 192 and 32 for H = 336, 720.
LINEAR_RECIPES = {"ETTh1": dict(lr=0.005, batch_size=32), "ETTh2": dict(lr=0.05, batch_size=32),
                  "exchange_rate": dict(lr=0.0005, batch_size=8)}


@dataclass
class LTSFConfig:
    """Settings of one ``ltsf`` run (``--set key=value``; LTSF-Linear's names)."""

    model: str = "dlinear"
    data: str = "ETTh1"
    target: str = "OT"
    seq_len: int = 336
    horizons: tuple[int, ...] = HORIZONS
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10
    batch_size: int = 32
    batch_size_per_horizon: dict[int, int] = field(default_factory=dict)  # recipe overrides (exchange)
    lr: float = 0.005
    lr_schedule: str = "halve"
    patience: int = 3
    grad_clip: float = 0.0
    individual: bool = False
    d_model: int = 64
    n_layers: int | None = None
    d_ff: int = 256
    n_heads: int = 8
    dropout: float = 0.1
    use_norm: bool = True
    mlp: str = "gated"
    time_features: bool = False  # iTransformer-style calendar tokens (only for data with dates)
    eval_batch_size: int = 256
    test_batch_size: int = 32  # the reference test loader's batch (for mse_drop_last); 1 for iTransformer
    plot_windows: int = 3

    def batch_for(self, horizon: int) -> int:
        return int(self.batch_size_per_horizon.get(horizon, self.batch_size))


def recipe(model: str, data_name: str) -> dict[str, Any]:
    """The paper's settings for ``model`` on ``data_name`` (the defaults ``--set`` overrides)."""
    if model in LINEAR_MODELS:
        base = dict(seq_len=336, epochs=10, patience=3, **LINEAR_RECIPES.get(data_name, dict(lr=0.005, batch_size=32)))
        if data_name == "exchange_rate":
            base["batch_size_per_horizon"] = {96: 8, 192: 8, 336: 32, 720: 32}
        return base
    if model == "itransformer":  # scripts/multivariate_forecasting/ETT/iTransformer_ETTh1.sh + run.py defaults
        return dict(seq_len=96, n_layers=2, d_model=256, d_ff=256, n_heads=8, dropout=0.1, lr=1e-4, batch_size=32,
                    epochs=10, patience=3, time_features=True, test_batch_size=1)
    if model.startswith("ci:") or model.startswith("inverted:"):  # ours: no paper recipe; CPU size
        return dict(seq_len=96, d_model=64, lr=1e-3, batch_size=32, epochs=10, patience=3,
                    time_features=model.startswith("inverted:"))
    raise ValueError(f"model: expected linear, nlinear, dlinear, itransformer, ci:<mixers> or inverted:<mixers>, "
                     f"got {model!r}")


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_config(model: str, data: str, data_dir: str | None = None, target: str = "OT",
                 overrides: list[str] = (), seeds: str | None = None) -> tuple[LTSFConfig, Path]:
    """The run's config (recipe, then ``--set`` overrides) and the data file."""
    path = resolve_data_file(data, data_dir)
    name = series_name(path)
    config = LTSFConfig(model=model, data=name, target=target, **recipe(model, name))
    known = {f.name for f in fields(LTSFConfig)} | {"horizon"}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in known - {"model", "data", "target", "seeds", "batch_size_per_horizon"}:
            raise ValueError(f"--set: expected key=value with key one of {sorted(known - {'model', 'data'})}, "
                             f"got {item!r}")
        value = _parse_value(raw)
        if key in ("horizon", "horizons"):
            value = (value,) if isinstance(value, int) else tuple(value)
            config = replace(config, horizons=tuple(int(h) for h in value))
            continue
        if key == "batch_size":
            config = replace(config, batch_size_per_horizon={})
        current = getattr(config, key)
        if isinstance(current, bool) and not isinstance(value, bool):
            raise ValueError(f"--set {key}: expected True or False, got {raw!r}")
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        config = replace(config, **{key: value})
    if seeds is not None:
        try:
            config = replace(config, seeds=tuple(int(s) for s in seeds.split(",") if s.strip()))
        except ValueError:
            raise ValueError(f"--seeds: expected comma-separated ints like 0,1,2, got {seeds!r}") from None
    for h in config.horizons:
        if h < 1:
            raise ValueError(f"horizon: expected positive ints, got {config.horizons}")
    if not config.seeds:
        raise ValueError("--seeds: expected at least one seed")
    return config, path


def model_fields(config: LTSFConfig) -> dict[str, Any]:
    if config.model in LINEAR_MODELS:
        return dict(individual=config.individual)
    if config.model == "itransformer":
        return dict(d_model=config.d_model, n_layers=config.n_layers or 2, n_heads=config.n_heads, d_ff=config.d_ff,
                    dropout=config.dropout, use_norm=config.use_norm)
    return dict(d_model=config.d_model, n_layers=config.n_layers, mlp=config.mlp, use_norm=config.use_norm)


def run_slug(config: LTSFConfig, name: str | None = None) -> str:
    model = config.model.replace(":", "-").replace("*", "x").replace(",", "+")
    return f"{config.data}_{model}_L{config.seq_len}" + (f"_{name}" if name else "")


def is_reduced(config: LTSFConfig) -> bool:
    """A run is at reduced size when it trains fewer epochs or seeds than the recipe."""
    base = recipe(config.model, config.data)
    return config.epochs < base["epochs"] or len(config.seeds) < 3


# ----------------------------------------------------------------------------- one fit


def _gather(series: jax.Array, starts: jax.Array, offset: int, length: int) -> jax.Array:
    """``series[s + offset : s + offset + length]`` for every start ``s``: ``[n, length, C]``."""
    return series[starts[:, None] + offset + jnp.arange(length)]


def fit_one(config: LTSFConfig, data: ForecastData, horizon: int, seed: int, run_dir: Path, *, resume: bool,
            verbose: bool) -> dict[str, Any]:
    """Train one (horizon, seed) and test it; returns its result dict (also written to
    ``run_dir/result.json``)."""
    L = config.seq_len
    series = jnp.asarray(data.scaled, jnp.float32)
    use_marks = config.time_features and data.marks is not None
    marks = jnp.asarray(data.marks, jnp.float32) if use_marks else None
    model = build_forecaster(config.model, horizon, **model_fields(config))

    def inputs(starts):
        x = _gather(series, starts, 0, L)
        return x, (_gather(marks, starts, 0, L) if use_marks else None)

    def loss_fn(params, batch, key):
        (starts,) = batch
        x, m = inputs(starts)
        pred = model.apply(params, x, m, deterministic=False, rngs={"dropout": key})
        return jnp.mean((pred - _gather(series, starts, L, horizon)) ** 2)

    @jax.jit
    def predict(params, starts):
        x, m = inputs(starts)
        return model.apply(params, x, m)

    @jax.jit
    def errors(params, starts):  # per-window squared and absolute error, averaged over H and C
        x, m = inputs(starts)
        diff = model.apply(params, x, m) - _gather(series, starts, L, horizon)
        return jnp.stack([jnp.mean(diff ** 2, (1, 2)), jnp.mean(jnp.abs(diff), (1, 2))], -1)

    def evaluate(params, split):
        starts = data.starts(split, horizon)
        return predict_in_batches(lambda s: errors(params, s), (starts,), config.eval_batch_size)

    x0, m0 = inputs(jnp.asarray(data.starts("train", horizon)[:2]))
    params = jax.jit(model.init)(jax.random.key(seed), x0, m0)  # compiled: op by op is slow
    fit_config = FitConfig(epochs=config.epochs, batch_size=config.batch_for(horizon), lr=config.lr,
                           lr_schedule=config.lr_schedule, patience=config.patience, seed=seed,
                           grad_clip=config.grad_clip)
    train_starts = data.starts("train", horizon).astype(np.int32)
    result = fit(loss_fn, params, (train_starts,), lambda p: float(evaluate(p, "val")[:, 0].mean()), fit_config,
                 run_dir=run_dir, resume=resume, verbose=verbose)
    fit_end = time.perf_counter()
    test = evaluate(result.params, "test")
    kept = len(test) - len(test) % config.test_batch_size  # the reference test loader's drop_last=True
    dropped = (lambda col: float(test[:kept, col].mean())) if kept else (lambda col: None)  # None: no full batch
    plot_starts = _plot_starts(data, horizon, config.plot_windows)
    out = dict(horizon=horizon, seed=seed, mse=float(test[:, 0].mean()), mae=float(test[:, 1].mean()),
               mse_drop_last=dropped(0), mae_drop_last=dropped(1),
               test_windows=len(test), val_mse=result.best_val, best_epoch=result.best_epoch + 1,
               epochs_run=len(result.history), stopped_early=result.stopped_early,
               wall_s=result.elapsed_s + time.perf_counter() - fit_end,  # elapsed_s counts resumed epochs too
               plot=dict(starts=plot_starts.tolist(),
                         pred=np.asarray(predict(result.params, jnp.asarray(plot_starts))).tolist()))
    (run_dir / "result.json").write_text(json.dumps(out) + "\n")
    return out


def _plot_starts(data: ForecastData, horizon: int, count: int) -> np.ndarray:
    starts = data.starts("test", horizon)
    return starts[np.linspace(0, len(starts) - 1, count + 2).astype(int)[1:-1]]


def plot_forecasts(data: ForecastData, config: LTSFConfig, horizon: int, plot: dict, path: Path) -> Path:
    """Look-back, truth and prediction of a few test windows (rows) and channels (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = config.seq_len
    starts, pred = np.asarray(plot["starts"]), np.asarray(plot["pred"])
    channels = sorted({0, data.n_channels // 2, data.n_channels - 1})
    fig, axes = plt.subplots(len(starts), len(channels), figsize=(4 * len(channels), 2.2 * len(starts)), squeeze=False)
    for i, s in enumerate(starts):
        for j, c in enumerate(channels):
            ax = axes[i, j]
            ax.plot(np.arange(L), data.scaled[s:s + L, c], color="0.4", lw=0.8, label="look-back")
            ax.plot(np.arange(L, L + horizon), data.scaled[s + L:s + L + horizon, c], color="C0", lw=0.8, label="truth")
            ax.plot(np.arange(L, L + horizon), pred[i, :, c], color="C3", lw=0.9, label="prediction")
            if i == 0:
                ax.set_title(f"{data.series.columns[c]}")
            if j == 0:
                ax.set_ylabel(f"test window {int(s - data.splits.test[0])}", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{config.model} on {config.data}, L={L}, H={horizon} (scaled values)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the run


def summarise(config: LTSFConfig, per_fit: list[dict[str, Any]], wall_s: float, run: str) -> dict[str, Any]:
    """``result.json``: per-horizon mean/std over seeds and the average over horizons."""
    horizons = {}
    for h in config.horizons:
        rows = [r for r in per_fit if r["horizon"] == h]
        if not rows:
            continue
        entry = {"seeds": [r["seed"] for r in rows], "wall_s": sum(r["wall_s"] for r in rows),
                 "test_windows": rows[0]["test_windows"], "best_epochs": [r["best_epoch"] for r in rows]}
        for key in ("mse", "mae", "mse_drop_last", "mae_drop_last", "val_mse"):
            if any(r[key] is None for r in rows):
                continue
            values = np.array([r[key] for r in rows])
            entry[key], entry[key + "_std"] = float(values.mean()), float(values.std())
        paper = PAPER.get((config.model, config.data, config.seq_len))
        if paper and h in paper[1]:
            entry["paper_mse"], entry["paper_mae"] = paper[1][h]
        horizons[str(h)] = entry
    mse = [e["mse"] for e in horizons.values()]
    mae = [e["mae"] for e in horizons.values()]
    seeds = sorted({r["seed"] for r in per_fit})
    seed_means = {s: np.mean([r["mse"] for r in per_fit if r["seed"] == s]) for s in seeds}
    seed_maes = {s: np.mean([r["mae"] for r in per_fit if r["seed"] == s]) for s in seeds}
    return dict(experiment="ltsf", model=config.model, data=config.data, seq_len=config.seq_len, run=run,
                size="reduced" if is_reduced(config) else "paper", status="complete",
                mse=float(np.mean(mse)), mae=float(np.mean(mae)),
                mse_std=float(np.std(list(seed_means.values()))), mae_std=float(np.std(list(seed_maes.values()))),
                horizons=horizons, wall_s=wall_s, evaluation="every test window (no drop_last); "
                "mse_drop_last: the reference test loader's drop_last=True")


def run(config: LTSFConfig, path: Path, out: str | Path = "runs", name: str | None = None, resume: bool = False,
        overwrite: bool = False, verbose: bool = True) -> dict[str, Any]:
    """Every (horizon, seed) of ``config``; writes the run directory and returns ``result.json``."""
    run_name = run_slug(config, name)
    run_dir = Path(out) / "ltsf" / run_name
    if run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    elif run_dir.exists() and not resume and any(run_dir.iterdir()):
        raise ValueError(f"--out: run directory {run_dir} exists; pass --resume to continue it or --overwrite")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = dict(experiment="ltsf", model=config.model, data=config.data, run=run_name,
                 size="reduced" if is_reduced(config) else "paper", data_file=str(path),
                 config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()})
    saved["config"]["batch_size_per_horizon"] = {str(k): v for k, v in config.batch_size_per_horizon.items()}
    (run_dir / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    series = load_series(path, config.target)
    start = time.perf_counter()
    per_fit = []
    total = len(config.horizons) * len(config.seeds)
    for h in config.horizons:
        data = prepare(series, config.seq_len, h)
        for seed in config.seeds:
            fit_dir = run_dir / f"H{h}_seed{seed}"
            done = fit_dir / "result.json"
            if resume and done.exists():
                per_fit.append(json.loads(done.read_text()))
                continue
            if verbose:
                print(f"[{len(per_fit) + 1}/{total}] {config.model} {config.data} L={config.seq_len} H={h} seed={seed}",
                      flush=True)
            per_fit.append(fit_one(config, data, h, seed, fit_dir, resume=resume, verbose=verbose))
            partial = summarise(config, per_fit, sum(r["wall_s"] for r in per_fit), run_name)
            partial["status"] = f"partial: {len(per_fit)} of {total} fits"  # an interrupted run still reports
            (run_dir / "result.json").write_text(json.dumps(partial, indent=2) + "\n")
            if verbose:
                r = per_fit[-1]
                print(f"    test mse {r['mse']:.4f}  mae {r['mae']:.4f}  (best epoch {r['best_epoch']}, "
                      f"{r['wall_s']:.0f}s)", flush=True)
        first = next(r for r in per_fit if r["horizon"] == h)
        plot_forecasts(data, config, h, first["plot"], run_dir / f"forecast_H{h}.png")
    wall_s = time.perf_counter() - start
    result = summarise(config, per_fit, sum(r["wall_s"] for r in per_fit), run_name)
    result["wall_s_this_call"] = wall_s
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_result(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} on {result['data']} (L={result['seq_len']}), mean +- std over seeds:"]
    for h, e in result["horizons"].items():
        paper = f"   paper {e['paper_mse']:.3f} / {e['paper_mae']:.3f}" if "paper_mse" in e else ""
        lines.append(f"  H={h:>4}  mse {e['mse']:.4f} +- {e['mse_std']:.4f}  mae {e['mae']:.4f} +- {e['mae_std']:.4f}"
                     + paper)
    lines.append(f"  wall time {result['wall_s']:.0f}s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments ltsf", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                                         "--set keys: seq_len, horizon (one; default 96,192,336,720), epochs, "
                                         "batch_size, lr, lr_schedule, patience, individual, d_model, n_layers, d_ff, "
                                         "n_heads, dropout, use_norm, mlp, time_features, grad_clip, eval_batch_size\n"
                                         "examples:\n"
                                         "  python -m experiments ltsf --model dlinear --data ETTh1 --set horizon=96 "
                                         "--set epochs=1\n"
                                         "  python -m experiments ltsf --model itransformer --data ETTh1\n"
                                         "  python -m experiments ltsf --model ci:s4d --data ETTh1 --seeds 0"))
    parser.add_argument("--model", required=True,
                        help="linear, nlinear, dlinear, itransformer, ci:<mixers> or inverted:<mixers>")
    parser.add_argument("--data", default="ETTh1", help="ETTh1, ETTh2, exchange, or a file name under the data dir")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $SSMJAX_DATA, else ../shared/data)")
    parser.add_argument("--target", default="OT", help="target column of an LTSF CSV file (default: OT)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--out", default="runs", help="output root (default: runs/)")
    parser.add_argument("--name", default=None, help="suffix of the run directory")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="skip finished fits, continue the unfinished one")
    group.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config, path = build_config(args.model, args.data, args.data_dir, args.target, args.overrides, args.seeds)
        result = run(config, path, args.out, args.name, args.resume, args.overwrite, verbose=not args.quiet)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_result(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- report


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """The LTSF section of ``experiments/RESULTS.md``: our mean ± std over seeds beside the
    paper's numbers, per run and horizon, with wall time and reduced-size marks."""
    lines = ["## Long-term time-series forecasting (LTSF-Linear / iTransformer protocol)", "",
             "*Papers:* LTSF-Linear (Zeng et al., 2023) finds one linear layer over the look-back "
             "(DLinear, NLinear) beats Transformer forecasters; iTransformer (Liu et al., 2024) embeds each variate's "
             "look-back as a token and attends across variates. MSE / MAE on the scaled test set, averaged over "
             "**every** test window (the reference code drops the last partial test batch; `mse_drop_last` in "
             "`result.json`), mean ± std over seeds. Δ = ours − paper (MSE); the issue asks for "
             "Δ ≤ 0.01 for the linear models and ≤ 0.02 for iTransformer (*miss* otherwise; see the notes "
             "for why).", "",
             "| model | data | L | H | MSE (ours) | MAE (ours) | MSE / MAE (paper) | Δ MSE | seeds | best epochs | "
             "wall time | size |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    figures = []
    for run_dir in sorted(map(Path, run_dirs)):
        saved = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
        result = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else None
        if result is None:
            done = len(list(run_dir.glob("H*_seed*/result.json")))
            lines.append(f"| {saved.get('model', '?')} | {saved.get('data', '?')} | "
                         f"{saved.get('config', {}).get('seq_len', '')} | | incomplete ({done} fits done) "
                         f"| | | | | | | |")
            continue
        paper = PAPER.get((result["model"], result["data"], result["seq_len"]))
        for h, e in result["horizons"].items():
            ref = f"{e['paper_mse']:.3f} / {e['paper_mae']:.3f}" if "paper_mse" in e else "–"
            delta = "–"
            if "paper_mse" in e:
                tol = TOLERANCE.get(result["model"])
                miss = tol is not None and e["mse"] - e["paper_mse"] > tol
                delta = f"{e['mse'] - e['paper_mse']:+.3f}" + (f" (miss, > {tol})" if miss else "")
            lines.append(f"| {result['model']} | {result['data']} | {result['seq_len']} | {h} | "
                         f"{_fmt(e['mse'], e['mse_std'])} | {_fmt(e['mae'], e['mae_std'])} | {ref} | {delta} | "
                         f"{len(e['seeds'])} | {','.join(map(str, e['best_epochs']))} | {e['wall_s']:.0f} s | "
                         f"{'reduced' if result['size'] == 'reduced' else 'paper'}"
                         f"{'' if result.get('status', 'complete') == 'complete' else ' (' + result['status'] + ')'} |")
        if paper:
            figures.append((result, paper[0]))
        plot = sorted(run_dir.glob("forecast_H*.png"))
        if plot:
            figures_dir.mkdir(parents=True, exist_ok=True)
            target = figures_dir / f"ltsf-{run_dir.name}.png"
            shutil.copyfile(plot[0], target)
            figures.append((result, target))
    sources = sorted({p for _, p in figures if isinstance(p, str)})
    if sources:
        lines += ["", "Paper numbers: " + "; ".join(sources) + "."]
    lines.append("")
    lines.append("Wall time: training and testing every horizon and seed of the row's run, on the machine that ran it "
                 "(2 shared CPU cores unless said otherwise). *reduced*: fewer epochs or seeds than the paper's "
                 "recipe.")
    for result, image in figures:
        if isinstance(image, Path):
            lines += ["", f"![{result['model']} on {result['data']}]({figures_dir.name}/{image.name})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
