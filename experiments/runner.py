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
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    make_config,
    parse_overrides,
    replace,
)
from experiments.tasks import build_task
from ssmjax.models import SequenceModel, parse_mixers
from ssmjax.train import train


def build_model(config: ExperimentConfig, vocab_size: int) -> SequenceModel:
    """The backbone of every experiment: ``config.model`` mixers (a name or a pattern),
    token embeddings and a language-model head over ``vocab_size`` tokens."""
    parse_mixers(config.model, config.n_layers)  # a clear ValueError before any tracing
    return SequenceModel(d_model=config.d_model, n_layers=config.n_layers, mixers=config.model,
                         mixer_fields=dict(config.mixer_fields), mlp=config.mlp, vocab_size=vocab_size, head="lm")


def model_slug(model: str) -> str:
    """A directory name for a model pattern: ``"gla*3,attention"`` -> ``"gla-x3+attention"``."""
    slug = model.replace(" ", "").replace("*", "-x").replace(",", "+")
    if not re.fullmatch(r"[A-Za-z0-9_+\-.]+", slug):
        raise ValueError(f"model: cannot make a directory name from {model!r}")
    return slug


def run_name(config: ExperimentConfig, size: str, name: str | None = None) -> str:
    parts = [model_slug(config.model), config.variant, "paper" if size == "paper" else "", name or ""]
    return "-".join(p for p in parts if p)


def prepare_run(experiment: str, model: str, *, size: str = "cpu", overrides: Sequence[str] = (),
                out: str | Path = "runs", resume: bool = False, overwrite: bool = False,
                name: str | None = None) -> tuple[ExperimentConfig, Path, list[str]]:
    """``(config, run_dir, notes)``. On ``resume`` the saved ``config.json`` is the base and
    ``overrides`` are applied on top (a change other than ``steps`` is reported in ``notes``
    because the run then no longer continues exactly)."""
    config = make_config(experiment, size)
    config = replace(config, model=model)
    config = replace(config, **parse_overrides(config, list(overrides)))
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
                   stop_at: int | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train and evaluate one (experiment, model) run; returns the ``result.json`` dict
    (:func:`ssmjax.train.train` also returns the final parameters; the CLI needs only this)."""
    config, run_dir, notes = prepare_run(experiment, model, size=size, overrides=overrides, out=out, resume=resume,
                                         overwrite=overwrite, name=name)
    for note in notes:
        print(f"note: {note}", flush=True)
    task = build_task(experiment, config)
    network = build_model(config, task.vocab_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    metadata = dict(experiment=experiment, model=config.model, variant=config.variant, size=size, run=run_dir.name)
    (run_dir / "config.json").write_text(json.dumps(dict(metadata, config=config_to_dict(config)), indent=2) + "\n")
    if verbose:
        print(f"{experiment} / {config.model} -> {run_dir}", flush=True)
    return train(network, task, config, run_dir, resume=resume, stop_at=stop_at, metadata=metadata,
                 title=f"{experiment}[{config.model}]", verbose=verbose).results
