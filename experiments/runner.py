"""Run one experiment: config -> task + model -> :func:`ssmjax.train.train` in a run
directory ``<out>/<experiment>/<run name>``. Used by the CLI (``python -m experiments``),
the suite and the tests."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.configs import (
    ClassificationConfig,
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    make_config,
    parse_overrides,
    replace,
)
from experiments.tasks import build_task
from ssmjax.models import DualEncoderClassifier, SequenceModel, parse_mixers
from ssmjax.train import NonFiniteLossError, train


def build_model(config: ExperimentConfig, vocab_size: int | None, num_classes: int | None = None, *,
                pad_id: int | None = None, pair: bool = False) -> SequenceModel | DualEncoderClassifier:
    """The backbone of every experiment: ``config.model`` mixers (a name or a pattern),
    token embeddings over ``vocab_size`` tokens (``None``: float features, an input
    projection) and a language-model head, or with ``num_classes`` a pooled classifier
    (:class:`experiments.configs.ClassificationConfig`; pooling skips ``pad_id``), or with
    ``pair`` too the two-tower classifier of document pairs
    (:class:`ssmjax.models.DualEncoderClassifier`, head width ``config.mlp_dim``)."""
    parse_mixers(config.model, config.n_layers)  # a clear ValueError before any tracing
    fields = dict(d_model=config.d_model, n_layers=config.n_layers, mixers=config.model, mlp=config.mlp,
                  mlp_ratio=config.mlp_ratio, norm=config.norm, vocab_size=vocab_size)
    mixer_fields = dict(config.mixer_fields)
    if num_classes is None:
        return SequenceModel(**fields, mixer_fields=mixer_fields, head="lm")
    if not isinstance(config, ClassificationConfig):
        raise ValueError(f"num_classes: a classifier needs a ClassificationConfig, got {type(config).__name__}")
    pooled = dict(fields, mixer_fields=mixer_fields, pooling=config.pooling, pad_id=pad_id, dropout=config.dropout,
                  bidirectional=config.bidirectional)
    if pair:
        return DualEncoderClassifier(SequenceModel(**pooled, head="pool"), num_classes, config.mlp_dim)
    return SequenceModel(**pooled, head="classify", num_classes=num_classes)


def task_model(config: ExperimentConfig, task) -> SequenceModel | DualEncoderClassifier:
    """:func:`build_model` for ``task``: its ``vocab_size`` and, for a classification task,
    its ``num_classes``."""
    return build_model(config, task.vocab_size, getattr(task, "num_classes", None), pad_id=getattr(task, "pad_id", None),
                       pair=getattr(task, "pair", False))


def model_slug(model: str) -> str:
    """A directory name for a model pattern: ``"gla*3,attention"`` -> ``"gla-x3+attention"``."""
    slug = model.replace(" ", "").replace("*", "-x").replace(",", "+")
    if not re.fullmatch(r"[A-Za-z0-9_+\-.]+", slug):
        raise ValueError(f"model: cannot make a directory name from {model!r}")
    return slug


def run_name(config: ExperimentConfig, size: str, name: str | None = None) -> str:
    parts = [model_slug(config.model), config.variant, "paper" if size == "paper" else "", name or ""]
    return "-".join(p for p in parts if p)


def build_config(experiment: str, model: str, *, size: str = "cpu", overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The ``size`` config of ``experiment`` for ``model`` with ``--set`` ``overrides`` applied."""
    config = replace(make_config(experiment, size), model=model)
    return replace(config, **parse_overrides(config, list(overrides)))


def prepare_run(experiment: str, model: str, *, size: str = "cpu", overrides: Sequence[str] = (),
                out: str | Path = "runs", resume: bool = False, overwrite: bool = False,
                name: str | None = None) -> tuple[ExperimentConfig, Path, list[str]]:
    """``(config, run_dir, notes)``. On ``resume`` the saved ``config.json`` is the base and
    ``overrides`` are applied on top (a change other than ``steps`` is reported in ``notes``
    because the run then no longer continues exactly)."""
    config = build_config(experiment, model, size=size, overrides=overrides)
    run_dir = Path(out) / experiment / run_name(config, size, name)
    notes = []
    saved_path = run_dir / "config.json"
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    elif resume and saved_path.exists():
        saved = config_from_dict(experiment, json.loads(saved_path.read_text())["config"])
        changes = parse_overrides(saved, list(overrides))
        resumed = replace(saved, **changes)
        changed = sorted(k for k, v in changes.items() if getattr(saved, k) != v)
        if [k for k in changed if k != "steps"]:
            notes.append(f"resumed with changed settings {changed}: not an exact continuation of the saved run")
        config = resumed
    elif not resume and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise FileExistsError(f"{run_dir} already has checkpoints: pass --resume to continue it, --overwrite to "
                              "start again, or --name to make a separate run")
    return config, run_dir, notes


def run_experiment(experiment: str, model: str, *, size: str = "cpu", overrides: Sequence[str] = (),
                   out: str | Path = "runs", resume: bool = False, overwrite: bool = False, name: str | None = None,
                   stop_at: int | None = None, verbose: bool = True, mesh=None) -> dict[str, Any]:
    """Train and evaluate one (experiment, model) run; returns the ``result.json`` dict
    (:func:`ssmjax.train.train` also returns the final parameters; the CLI needs only this)."""
    config, run_dir, notes = prepare_run(experiment, model, size=size, overrides=overrides, out=out, resume=resume,
                                         overwrite=overwrite, name=name)
    for note in notes:
        print(f"note: {note}", flush=True)
    task = build_task(experiment, config)
    network = task_model(config, task)
    run_dir.mkdir(parents=True, exist_ok=True)
    metadata = dict(experiment=experiment, model=config.model, variant=config.variant, size=size, run=run_dir.name)
    (run_dir / "config.json").write_text(json.dumps(dict(metadata, config=config_to_dict(config)), indent=2) + "\n")
    if verbose:
        print(f"{experiment} / {config.model} -> {run_dir}", flush=True)
    return train(network, task, config, run_dir, resume=resume, stop_at=stop_at, metadata=metadata,
                 title=f"{experiment}[{config.model}]", verbose=verbose, mesh=mesh).results


def describe_run_shardings(experiment: str, model: str, mesh, *, size: str = "cpu", overrides: Sequence[str] = ()) -> str:
    """``--dry-run``: the parameters of the run's model and their shardings on ``mesh``
    (:func:`ssmjax.distributed.describe_shardings`), without training or allocating them."""
    import jax
    import jax.numpy as jnp

    from ssmjax.distributed import check_batch_shape, describe_shardings

    config = build_config(experiment, model, size=size, overrides=overrides)
    task = build_task(experiment, config)
    network = task_model(config, task)
    inputs = task.train_batch(0).inputs
    check_batch_shape(mesh, inputs.shape, "task.train_batch(0).inputs")
    params = jax.eval_shape(network.init, jax.random.key(0), jnp.asarray(inputs))
    return describe_shardings(params, mesh)


#: What a sweep ranks its runs by: the task's headline validation accuracy (``result["eval"]
#: ["accuracy"]``, on the fixed evaluation stream, at the run's final evaluation), as Zoology
#: (Arora et al., 2023) reports the best validation accuracy over its learning-rate sweep.
SWEEP_METRIC = "accuracy"


def split_values(text: str) -> list[str]:
    """``"1e-3,3e-3"`` -> ``["1e-3", "3e-3"]``; commas inside brackets stay (``"(1, 2),(3,)"``
    -> ``["(1, 2)", "(3,)"]``)."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_sweep(experiment: str, model: str, spec: str, *, size: str = "cpu",
                overrides: Sequence[str] = ()) -> tuple[str, list[str]]:
    """``"lr=1e-3,3e-3"`` -> ``("lr", ["1e-3", "3e-3"])``, after checking that every value
    makes a valid config, model and task together with ``overrides`` (so a bad key or value
    fails before any training)."""
    key, sep, text = spec.partition("=")
    key = key.strip()
    values = split_values(text) if sep else []
    if not key or not values or not all(values):
        raise ValueError(f"--sweep: expected KEY=v1,v2,... (e.g. lr=1e-3,3e-3), got {spec!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"--sweep: repeated values in {spec!r}")
    if any(item.partition("=")[0].strip() == key for item in overrides):
        raise ValueError(f"--sweep: {key!r} is also given with --set; give it in one place")
    for value in values:
        try:
            config = build_config(experiment, model, size=size, overrides=[*overrides, f"{key}={value}"])
            task_model(config, build_task(experiment, config))
        except ValueError as error:
            raise ValueError(f"--sweep {key}={value}: {str(error).removeprefix('--set: ')}") from None
    return key, values


def sweep_label(key: str, value: str) -> str:
    """The run-name suffix of one sweep value: ``("lr", "1e-3")`` -> ``"lr1e-3"``."""
    return key + re.sub(r"[^A-Za-z0-9_.+\-]+", "_", value).strip("_")


def run_sweep(experiment: str, model: str, sweep: str, *, size: str = "cpu", overrides: Sequence[str] = (),
              out: str | Path = "runs", resume: bool = False, overwrite: bool = False, name: str | None = None,
              verbose: bool = True) -> dict[str, Any]:
    """One :func:`run_experiment` per value of ``sweep`` (``"KEY=v1,v2,..."``), each in its own
    run directory (``<run name>-<KEY><value>``); the best run is the one with the highest
    :data:`SWEEP_METRIC` (ties: the first value; runs that diverged or did not finish never
    win). Returns ``dict(key, values, results, scores, best)`` with ``best`` an index into
    ``values`` (``None`` if no run finished), and stops early if a run is interrupted."""
    key, values = parse_sweep(experiment, model, sweep, size=size, overrides=overrides)
    results, scores = [], []
    for value in values:
        label = sweep_label(key, value)
        try:
            result = run_experiment(experiment, model, size=size, overrides=[*overrides, f"{key}={value}"], out=out,
                                    resume=resume, overwrite=overwrite, name="-".join(filter(None, [name, label])),
                                    verbose=verbose)
        except NonFiniteLossError as error:  # a diverged value is a result of the sweep, not its end
            print(f"{key}={value}: {error}", flush=True)
            result = error.result
        results.append(result)
        finished = result.get("status") == "done" and result.get("eval")
        scores.append(float(result["eval"][SWEEP_METRIC]) if finished else float("nan"))
        if result.get("status") == "interrupted":
            break
    ranked = [i for i, score in enumerate(scores) if score == score]
    best = max(ranked, key=lambda i: (scores[i], -i)) if ranked else None
    return dict(key=key, values=values, results=results, scores=scores, best=best)


def format_sweep(sweep: dict[str, Any]) -> str:
    """Every value's score (``-``: diverged or not finished), the best marked, for the end of a sweep."""
    key, best = sweep["key"], sweep["best"]
    lines = [f"sweep {key} (metric: final eval {SWEEP_METRIC}; higher is better):"]
    for i, value in enumerate(sweep["values"]):
        if i >= len(sweep["results"]):
            lines.append(f"  {key}={value:<12} {'-':>8}  not run")
            continue
        result, score = sweep["results"][i], sweep["scores"][i]
        shown = "-" if score != score else f"{score:.4f}"
        lines.append(f"  {key}={value:<12} {shown:>8}  {result.get('status', '?'):<12} {result.get('run', '')}"
                     + ("  <- best" if i == best else ""))
    lines.append(f"best: {key}={sweep['values'][best]}" if best is not None else "best: none (no run finished)")
    return "\n".join(lines)
