"""The ``urpe`` experiment end to end (URPE vs RPE-only attention, 2 steps) and its task:
position targets, constant-input evaluation, registration with the CLI."""

import json

import numpy as np
import pytest

from experiments.configs import EXPERIMENTS, make_config, replace
from experiments.runner import run_experiment
from experiments.tasks import DESCRIPTIONS, build_task
from experiments.urpe import position_batch

TINY = ["d_model=16", "n_layers=1", "batch_size=4", "eval_batch_size=4", "eval_batches=1", "log_every=1",
        "warmup_steps=1", "checkpoint_every=2", "eval_every=100", "seq_len=8", "steps=2"]


@pytest.mark.slow  # ~8 s; the default run covers urpe through test_cli_and_report's tiny runs
@pytest.mark.parametrize("urpe", [True, False])
def test_urpe_experiment_runs_end_to_end(urpe, tmp_path):
    overrides = TINY + [f"mixer_fields={{'urpe_attention': {{'urpe': {urpe}, 'max_len': 8}}}}"]
    result = run_experiment("urpe", "urpe_attention", overrides=overrides, out=tmp_path, verbose=False,
                            name="urpe" if urpe else "rpe")
    assert result["status"] == "done" and result["step"] == 2
    run_dir = next((tmp_path / "urpe").iterdir())
    for name in ("config.json", "metrics.jsonl", "result.json", "learning_curves.png"):
        assert (run_dir / name).exists()
    assert json.loads((run_dir / "config.json").read_text())["config"]["mixer_fields"]["urpe_attention"]["urpe"] == urpe
    summary = result["eval"]["summary"]
    assert set(summary) == {"acc", "acc (random rows)", "acc (constant rows)"}
    assert all(0.0 <= v <= 1.0 for v in summary.values())


def test_task_targets_are_positions_and_constant_inputs_repeat_one_token():
    assert "urpe" in EXPERIMENTS and "urpe" in DESCRIPTIONS
    config = replace(make_config("urpe"), seq_len=6, num_tokens=3)
    batch = position_batch(config, 0, 4)
    assert batch.inputs.shape == batch.targets.shape == (4, 6) and batch.inputs.max() < 3
    np.testing.assert_array_equal(batch.targets, np.tile(np.arange(6), (4, 1)))
    constant = position_batch(config, 0, 4, constant_fraction=1.0)
    assert np.all(constant.inputs == constant.inputs[:, :1])
    mixed = position_batch(replace(config, seq_len=16), 0, 64)
    rows = np.all(mixed.inputs == mixed.inputs[:, :1], axis=1)
    assert 0 < rows.sum() < 64  # about half the rows repeat one token
    parity = position_batch(replace(config, task="parity"), 0, 2)
    np.testing.assert_array_equal(parity.targets[0], [0, 1, 0, 1, 0, 1])
    assert build_task("urpe", config).vocab_size == 6
    with pytest.raises(ValueError, match="task"):
        build_task("urpe", replace(config, task="sort"))
