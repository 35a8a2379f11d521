"""Experiments with their own protocol and command line (epochs over fixed real data,
autoregressive rollouts, sampling) rather than the step-based token tasks of
:mod:`experiments.tasks`. Each is a module with ``DESCRIPTION`` (one line for
``python -m experiments --help``), ``main(argv) -> int`` (``python -m experiments <name>
...``) and, if it writes runs, ``report_section(run_dirs, figures_dir) -> str`` (its
section of the results report)."""

from __future__ import annotations

import importlib
from types import ModuleType

PROTOCOLS = {"ltsf": "experiments.ltsf", "dynamics": "experiments.dynamics", "lm-sample": "experiments.lm_sample",
             "lm-depth": "experiments.lm_depth", "moving_mnist": "experiments.moving_mnist",
             "enumerative_geometry": "experiments.enumerative_geometry",
             "universal_approximation": "experiments.universal_approximation",
             "finetune": "experiments.finetune", "online_continual": "experiments.online_continual",
             "bow_audio": "experiments.bow_audio", "recurrent_gpt": "experiments.recurrent_gpt",
             "contracon": "experiments.contracon", "frcrn": "experiments.frcrn", "mossformer2": "experiments.mossformer2",
             "raptor": "experiments.raptor"}


def load(name: str) -> ModuleType:
    """The module of protocol ``name`` (imported on first use: each pulls in its own data code)."""
    return importlib.import_module(PROTOCOLS[name])
