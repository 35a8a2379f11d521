"""The sequential_functions and structural_recursion tasks: evaluation maths and a tiny run."""

import numpy as np
import pytest

from experiments.configs import make_config
from experiments.runner import run_experiment
from experiments.sequential_functions import SequentialFunctionsTask, accuracy_by_examples
from experiments.structural_recursion import StructuralRecursionTask

TINY = ["d_model=16", "n_layers=1", "batch_size=4", "eval_batch_size=4", "eval_batches=1", "log_every=1",
        "warmup_steps=1", "checkpoint_every=2", "eval_every=100", "steps=2"]


def test_accuracy_by_examples_averages_each_examples_outputs():
    # k = 1, L = 2: example 0's outputs are targets 2, 3; example 1's are 8, 9
    correct = np.zeros((2, 10), bool)
    correct[0, [2, 3, 8]] = True
    correct[1, 2] = True
    assert accuracy_by_examples(correct, 1, 2).tolist() == [0.75, 0.25]


def test_a_perfect_predictor_scores_one():
    config = make_config("sequential_functions", overrides=dict(num_examples=2, example_len=3, eval_batches=1))
    task = SequentialFunctionsTask(config)
    lookup = {b.inputs.tobytes(): b.targets for batches in task.eval_sets.values() for b in batches}
    result = task.evaluate(lambda inputs: lookup[np.asarray(inputs).tobytes()])
    assert result["accuracy"] == 1.0 and result["summary"]["mealy query"] == 1.0
    assert result["curve"]["x"] == [0, 1, 2]
    for experiment, overrides in [("structural_recursion", dict(task="tree", eval_depths=(1, 2), eval_batches=1)),
                                  ("structural_recursion", dict(eval_bits=(3, 12), eval_batches=1))]:
        task = StructuralRecursionTask(make_config(experiment, overrides=overrides))
        lookup = {b.inputs.tobytes(): b.targets for batches in task.eval_sets.values() for b in batches}
        result = task.evaluate(lambda inputs: lookup[np.asarray(inputs).tobytes()])
        assert result["accuracy"] == 1.0 and all(v == 1.0 for v in result["summary"].values())


def test_structural_recursion_headline_is_over_training_sizes():
    task = StructuralRecursionTask(make_config("structural_recursion",
                                               overrides=dict(train_max_bits=4, eval_bits=(2, 8), eval_batches=1)))
    short = task.eval_sets[2][0].inputs.shape[1]
    # right on the 2-bit set, all wrong on the 8-bit set
    lookup = {b.inputs.tobytes(): b.targets for b in task.eval_sets[2]}
    result = task.evaluate(lambda inputs: lookup.get(np.asarray(inputs).tobytes(), np.zeros_like(inputs)))
    assert short == 6 and result["accuracy"] == 1.0
    assert result["summary"]["exact @8"] == 0.0 and result["curve"]["vline"] == 4


def test_structural_recursion_variant_names_a_non_default_order_or_traversal():
    names = {tuple(o.items()): make_config("structural_recursion", overrides=o).variant
             for o in (dict(), dict(order="msb"), dict(task="tree"), dict(task="tree", traversal="postorder"))}
    assert list(names.values()) == ["successor", "successor-msb", "tree", "tree-postorder"]


@pytest.mark.slow  # ~12 s; the default run covers both through test_cli_and_report's tiny runs
def test_both_run_end_to_end(tmp_path):
    for experiment, extra in [("sequential_functions", ["num_examples=2", "example_len=3", "classes=('mealy',)"]),
                              ("structural_recursion", ["task=tree", "train_max_depth=2", "eval_depths=(1, 3)"])]:
        result = run_experiment(experiment, "mamba", overrides=TINY + extra, out=tmp_path, verbose=False)
        assert result["status"] == "done" and 0.0 <= result["eval"]["accuracy"] <= 1.0
