"""The training behaviour of the experiments CLI: ``--set batch_size`` sets the rows of
every training batch (and ``result.json`` records it), and a non-finite loss names the
CLI flags (the library message does not)."""

import json

import pytest

from experiments.__main__ import main
from experiments.configs import EXPERIMENTS, make_config, parse_overrides, replace
from experiments.tasks import build_task
from tests.experiments.test_classification import CLASSIFICATION, tiny_data
from tests.experiments.test_cli_and_report import TINY_TASK

TINY_RUN = ["d_model=16", "n_layers=1", "eval_batch_size=4", "eval_batches=1", "log_every=1", "warmup_steps=1",
            "eval_every=100", "steps=2", *TINY_TASK["selective_copying"]]


def tiny_task(experiment, tmp_path):
    """``TINY_TASK``'s overrides; ``lm`` reads a text file, written here; the classification
    experiments read tiny files (or generate tiny sets) of ``tiny_data``."""
    if experiment in CLASSIFICATION:
        return [*tiny_data(experiment, tmp_path / "data"), "eval_rows=2", "eval_resolutions=(32,)"
                if experiment == "arrow_pointing" else "eval_rows=2"]
    if experiment != "lm":
        return TINY_TASK[experiment]
    (tmp_path / "tiny.txt").write_text("the cat sat on the mat.\n" * 20, encoding="utf-8")
    return [f"data_dir={tmp_path}", "data_file=tiny.txt", "seq_len=8"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_set_batch_size_sets_the_rows_of_every_training_batch(experiment, tmp_path):
    config = make_config(experiment)
    config = replace(config, **parse_overrides(config, tiny_task(experiment, tmp_path)))
    for batch_size in (1, 2) if experiment in CLASSIFICATION else (3, 5):  # the tiny files have a few rows
        task = build_task(experiment, replace(config, **parse_overrides(config, [f"batch_size={batch_size}"])))
        assert [task.train_batch(step).inputs.shape[0] for step in range(3)] == [batch_size] * 3


def test_cli_batch_size_reaches_the_run_and_nonfinite_names_the_flags(tmp_path, capsys):
    args = ["selective_copying", "--model", "attention", "--out", str(tmp_path), "--quiet"]
    assert main([*args, *[f"--set={s}" for s in TINY_RUN + ["batch_size=3"]]]) == 0
    assert json.loads((tmp_path / "selective_copying" / "attention" / "result.json").read_text())["batch_size"] == 3
    capsys.readouterr()
    assert main([*args, "--name", "nan", *[f"--set={s}" for s in TINY_RUN + ["lr=nan"]]]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "TrainConfig.lr" in err  # the library's causes ...
    assert "--set lr=" in err and "--resume" in err  # ... and the CLI's flags
