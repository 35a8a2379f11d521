"""The gsm_graphs task: evaluation maths, config wiring and a tiny run."""

import numpy as np
import pytest

from experiments.configs import make_config
from experiments.gsm_graphs import GsmGraphsTask
from experiments.runner import run_experiment
from experiments.tasks import DESCRIPTIONS, TASKS, build_task
from ssmjax.data import graphs

SMALL = dict(min_nodes=3, max_nodes=6, eval_nodes=(4, 6, 8), eval_batch_size=8, eval_batches=1, max_edges=12,
             batch_size=4)
TINY = ["d_model=16", "n_layers=1", "batch_size=4", "eval_batch_size=4", "eval_batches=1", "log_every=1",
        "warmup_steps=1", "checkpoint_every=2", "eval_every=100", "steps=2", "min_nodes=3", "max_nodes=5",
        "eval_nodes=(4, 6)", "max_edges=10"]


def _lookup(task):
    table = {b.inputs.tobytes(): b.targets for batches in task.eval_sets.values() for b in batches}
    return lambda inputs: table[np.asarray(inputs).tobytes()]


@pytest.mark.parametrize("task_name,ordering", [("connectivity", "bfs"), ("shortest_path", "hierarchical"),
                                                ("cycle", "random"), ("edge_count", "degree")])
def test_a_perfect_predictor_scores_one(task_name, ordering):
    task = GsmGraphsTask(make_config("gsm_graphs", overrides=dict(SMALL, task=task_name, ordering=ordering)))
    result = task.evaluate(_lookup(task))
    assert result["accuracy"] == 1.0 and all(v == 1.0 for v in result["summary"].values())
    assert result["curve"]["x"] == [4, 6, 8] and result["curve"]["vline"] == 6
    batch = task.train_batch(0)
    # one length and vocabulary for training and evaluation, sized for the 8-node eval set
    assert batch.inputs.shape[1] == task.eval_sets[8][0].inputs.shape[1]
    eval_max = max(b.targets.max() for batches in task.eval_sets.values() for b in batches)
    assert max(batch.targets.max(), eval_max) < task.vocab_size
    assert task.vocab_size == graphs.vocab_size(task_name, 8, 12, 4)


def test_headline_is_over_training_node_counts():
    task = GsmGraphsTask(make_config("gsm_graphs", overrides=SMALL))
    table = {b.inputs.tobytes(): b.targets for n in (4, 6) for b in task.eval_sets[n]}
    result = task.evaluate(lambda inputs: table.get(np.asarray(inputs).tobytes(), np.zeros_like(inputs)))
    assert result["accuracy"] == 1.0 and result["summary"]["acc @8 nodes"] == 0.0


def test_registered_and_bad_config_raises():
    assert "gsm_graphs" in TASKS and "gsm_graphs" in DESCRIPTIONS
    config = make_config("gsm_graphs")
    assert config.task == "connectivity" and config.ordering == "bfs" and config.variant == "connectivity-bfs"
    assert make_config("gsm_graphs", "paper").steps > config.steps
    for overrides, name in [(dict(task="planarity"), "task"), (dict(ordering="spectral"), "ordering"),
                            (dict(eval_nodes=()), "eval_nodes")]:
        with pytest.raises(ValueError, match=name):
            build_task("gsm_graphs", make_config("gsm_graphs", overrides=overrides))


@pytest.mark.slow  # a few seconds per model
def test_runs_end_to_end(tmp_path):
    for model, extra in [("mamba,attention", ["task=connectivity", "ordering=hierarchical", "n_layers=2"]),
                         ("attention", ["task=shortest_path", "ordering=bfs"])]:
        result = run_experiment("gsm_graphs", model, overrides=TINY + extra, out=tmp_path, verbose=False)
        assert result["status"] == "done" and 0.0 <= result["eval"]["accuracy"] <= 1.0
        assert set(result["eval"]["summary"]) == {"acc @4 nodes", "acc @6 nodes"}
