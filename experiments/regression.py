"""What the regression protocols (``enumerative_geometry``, ``universal_approximation``)
share: mean-squared-error training of a model over a fixed training set with
:func:`ssmjax.train.fit.fit` (the step-based loop of :mod:`ssmjax.train.loop` trains on
cross-entropy only), the regression metrics, and the command line (``--model``, ``--size``,
``--set``, ``--out``, ``--name``, ``--overwrite``, ``--quiet``).

``steps`` counts updates: with ``rows // batch_size`` updates per epoch a run makes
``round(steps / per_epoch)`` epochs (at least one); a run shorter than one epoch trains one
epoch on the first ``steps * batch_size`` rows (:func:`epoch_plan`). The learning rate
follows :class:`ssmjax.train.fit.FitConfig`'s per-epoch cosine; the parameters of the
best validation epoch are kept. No checkpoints (each model trains in minutes): the
per-epoch history goes into ``result.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import parse_overrides
from ssmjax.train.fit import FitConfig, FitResult, fit, predict_in_batches


def epoch_plan(steps: int, rows: int, batch_size: int) -> tuple[int, int]:
    """``(epochs, rows used)`` for about ``steps`` updates of ``batch_size`` rows over ``rows``
    training rows (module docstring)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps, batch_size: expected >= 1, got {steps}, {batch_size}")
    per_epoch = rows // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size: {batch_size} is more than the {rows} training rows")
    if steps < per_epoch:
        return 1, steps * batch_size
    return max(1, round(steps / per_epoch)), rows


def fit_mse(apply: Callable[[Any, jax.Array], jax.Array], params: Any, train: tuple[np.ndarray, np.ndarray],
            val: tuple[np.ndarray, np.ndarray], *, steps: int, batch_size: int, lr: float, weight_decay: float = 0.0,
            grad_clip: float = 1.0, seed: int = 0, verbose: bool = False) -> tuple[FitResult, int, Callable]:
    """Minimise ``mean((apply(params, x) - y)^2)`` over ``train = (x, y)`` with
    :func:`ssmjax.train.fit.fit` (AdamW, per-epoch cosine, best validation MSE kept);
    returns ``(fit result, number of updates, predict)`` where ``predict(params, x)`` gives
    the outputs of every row of ``x``, ``batch_size`` rows at a time (compiled once, shared
    with validation)."""
    x, y = train
    epochs, used = epoch_plan(steps, len(x), batch_size)

    def loss_fn(p, batch, key):
        xb, yb = batch
        return jnp.mean((apply(p, xb) - yb) ** 2)

    compiled = jax.jit(apply)

    def predict(p, inputs):
        return predict_in_batches(partial(compiled, p), (inputs,), batch_size)

    def validate(p):
        return float(np.mean((predict(p, val[0]) - val[1]) ** 2))

    config = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule="cosine", patience=0, seed=seed,
                       grad_clip=grad_clip, weight_decay=weight_decay, optimizer="adamw" if weight_decay else "adam")
    result = fit(loss_fn, params, (x[:used], y[:used]), validate, config, verbose=verbose)
    return result, epochs * (used // batch_size), predict


def regression_metrics(pred: np.ndarray, target: np.ndarray, tolerance: float) -> dict[str, float]:
    """``r2 = 1 - sum (p - y)^2 / sum (y - mean y)^2``, ``mae = mean |p - y|``,
    ``mse``, and ``accuracy`` = the fraction with ``|p - y| < tolerance``."""
    pred, target = np.asarray(pred, np.float64).ravel(), np.asarray(target, np.float64).ravel()
    if pred.shape != target.shape or not len(pred):
        raise ValueError(f"pred, target: expected equal non-empty shapes, got {pred.shape}, {target.shape}")
    error = pred - target
    spread = np.sum((target - target.mean()) ** 2)
    return dict(r2=float(1 - np.sum(error ** 2) / spread) if spread > 0 else float("nan"),
                mae=float(np.mean(np.abs(error))), mse=float(np.mean(error ** 2)),
                accuracy=float(np.mean(np.abs(error) < tolerance)))


def count_params(params) -> int:
    return int(sum(np.size(p) for p in jax.tree.leaves(params)))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(_jsonable(value), indent=2) + "\n")


def run_dir_for(out: str | Path, experiment: str, model: str, size: str, name: str | None, overwrite: bool) -> Path:
    """``<out>/<experiment>/<model slug>[-paper][-<name>]``; an existing finished run is kept
    unless ``overwrite`` (a ``FileExistsError`` says so)."""
    slug = model.replace(" ", "").replace("*", "-x").replace(",", "+")
    run_dir = Path(out) / experiment / "-".join(p for p in (slug, "paper" if size == "paper" else "", name or "") if p)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    elif (run_dir / "result.json").exists():
        raise FileExistsError(f"{run_dir} already has a result: pass --overwrite to run again or --name to make a "
                              "separate run")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def build_parser(experiment: str, description: str, config_type: type, default_model: str = "attention"
                 ) -> argparse.ArgumentParser:
    keys = ", ".join(f.name for f in dataclasses.fields(config_type) if f.name != "model")
    parser = argparse.ArgumentParser(prog=f"python -m experiments {experiment}", description=description,
                                     epilog=f"settable keys (--set): {keys}")
    parser.add_argument("--model", default=default_model,
                        help=f"a registered mixer name or a pattern (default {default_model})")
    parser.add_argument("--size", default="cpu", choices=("cpu", "paper"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="runs")
    parser.add_argument("--name", default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    return parser


def make_config(sizes: dict[str, Any], size: str, model: str, overrides: list[str]):
    """The ``size`` config for ``model`` with ``--set`` ``overrides`` applied."""
    if size not in sizes:
        raise ValueError(f"size: expected one of {tuple(sizes)}, got {size!r}")
    config = dataclasses.replace(sizes[size], model=model)
    return dataclasses.replace(config, **parse_overrides(config, overrides))


def main(experiment: str, description: str, sizes: dict[str, Any], run: Callable[..., Path],
         argv: list[str] | None, default_model: str = "attention", check: Callable[[Any], None] | None = None) -> int:
    """The command line of a regression protocol: parse, build the config, ``check(config)``
    (before the run folder is made), ``run(config, run_dir, verbose=...)``."""
    parser = build_parser(experiment, description, type(sizes["cpu"]), default_model)
    args = parser.parse_args(argv)
    try:
        config = make_config(sizes, args.size, args.model, args.overrides)
        if check is not None:
            check(config)
        run_dir = run_dir_for(args.out, experiment, config.model, args.size, args.name, args.overwrite)
        write_json(run_dir / "config.json", dict(experiment=experiment, model=config.model, size=args.size,
                                                 config=dataclasses.asdict(config)))
        run(config, run_dir, verbose=not args.quiet)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    return 0


def read_runs(run_dirs: list[Path], experiment: str) -> list[tuple[Path, dict, dict | None]]:
    """``(run folder, config.json, result.json or None)`` of the runs of ``experiment``."""
    rows = []
    for d in map(Path, run_dirs):
        config = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        if config.get("experiment") != experiment:
            continue
        result = json.loads((d / "result.json").read_text()) if (d / "result.json").exists() else None
        rows.append((d, config, result))
    return sorted(rows, key=lambda r: r[0].name)
