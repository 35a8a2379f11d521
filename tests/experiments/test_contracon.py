"""`python -m experiments contracon`: split-MNIST tasks, patch tokens and shifted views by
hand, average accuracy and forgetting by hand, training a later task leaves every earlier
task's parameters and predictions unchanged bit for bit under ConTraCon (and not under
fine-tuning), a tiny end-to-end run with its report section, and argument errors."""

import dataclasses
import json
from functools import partial

import jax
import numpy as np
import pytest

from experiments import contracon as cc
from ssmjax.data.images import LabelledImages, load_mnist
from ssmjax.train.fit import predict_in_batches
from tests.data.test_images import write_mnist

TINY = dict(num_tasks=2, d_model=8, n_layers=1, num_heads=2, mlp_ratio=1.0, patch_size=14, kernel_size=3, steps=2,
            batch_size=4, val_per_task=4, test_per_task=6, augmentations=2, copies=1, eval_batch_size=8)


@pytest.fixture(scope="module")
def mnist_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mnist") / "mnist.pkl.gz"
    write_mnist(path, sizes=(60, 30, 30))
    return path


def test_tasks_tokens_and_views_by_hand():
    split = LabelledImages(np.zeros((5, 28, 28), np.float32), np.array([0, 3, 1, 2, 5]))
    _, labels = cc.task_images(split, 0)
    np.testing.assert_array_equal(labels, [0, 1])  # digits 0 and 1 in file order
    images, labels = cc.task_images(split, 1)
    np.testing.assert_array_equal(labels, [1, 0])  # digits 3 then 2
    assert len(cc.task_images(split, 1, limit=1)[1]) == 1 and len(cc.task_images(split, 2)[1]) == 1

    image = np.arange(784, dtype=np.float32).reshape(1, 28, 28)
    tokens = cc.to_tokens(image, 14)
    assert tokens.shape == (1, 4, 196)
    np.testing.assert_array_equal(tokens[0, 1], image[0, :14, 14:].ravel())  # patch (row 0, column 1)
    np.testing.assert_array_equal(cc.to_tokens(image, 28)[0, 0], image[0].ravel())

    digits = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    views = cc.shifted_views(digits, views=4, max_shift=1, seed=(0, 1))
    assert views.shape == (4, 3, 28, 28)
    np.testing.assert_array_equal(views, cc.shifted_views(digits, views=4, max_shift=1, seed=(0, 1)))
    np.testing.assert_array_equal(cc.shifted_views(digits, 2, max_shift=0, seed=0), np.stack([digits, digits]))
    for view in views:
        for shown, digit in zip(view, digits):  # each view is the digit moved by some offset in [-1, 1]^2
            padded = np.pad(digit, 1)
            moved = [padded[1 - dy:29 - dy, 1 - dx:29 - dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            assert any(np.array_equal(shown, m) for m in moved)


def test_average_accuracy_and_forgetting_by_hand():
    nan = np.nan
    matrix = np.array([[0.9, nan, nan], [0.8, 0.95, nan], [0.7, 0.9, 1.0]])
    assert cc.average_accuracy(matrix) == pytest.approx((0.7 + 0.9 + 1.0) / 3)
    assert cc.forgetting(matrix) == pytest.approx(((0.9 - 0.7) + (0.95 - 0.9)) / 2)  # best past minus final
    with pytest.raises(ValueError, match="matrix"):
        cc.forgetting(np.array([[1.0]]))


def learn_second_task(method, mnist_file):
    """Task 1 (an untrained first task: enough for what training task 2 may change) and
    task 2 learned after it: ``(task 1's test logits before, after, (shared, adapter 1)
    before, after)``."""
    config = cc.ContraconConfig(**TINY, data_dir=str(mnist_file))
    tasks = cc.make_tasks(config, load_mnist(mnist_file))
    network = cc.make_network(config)
    shared = network.init(jax.random.key(0), tasks[0]["test"][0][:1])["params"]
    first = cc.contracon.parent_adapter(shared, cc.METHOD_SPECS[method].components)

    def task_1_logits(shared):
        return predict_in_batches(partial(network.predict, shared, first), tasks[0]["test"][:1], config.eval_batch_size)

    before, logits = jax.tree.map(np.array, (shared, first)), task_1_logits(shared)  # host copies
    new_shared, second, updates = cc.learn_task(method, network, config, shared, 1, tasks[1], jax.random.key(1))
    assert updates == 2 and (method == "contracon") == bool(second.convs)
    return logits, task_1_logits(new_shared), before, (new_shared, first)


def test_a_later_task_leaves_earlier_tasks_bit_for_bit(mnist_file):
    logits, after, before, now = learn_second_task("contracon", mnist_file)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before, now)))  # only the new adapter trained
    np.testing.assert_array_equal(after, logits)


@pytest.mark.slow
def test_fine_tuning_does_move_earlier_tasks(mnist_file):
    logits, after, (shared, _), (new_shared, _) = learn_second_task("finetune", mnist_file)
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, shared, new_shared)))
    assert not np.array_equal(after, logits)


def _args(tmp_path, items):
    return ["--model", "attention", "--out", str(tmp_path), "--quiet"] + [a for s in items for a in ("--set", s)]


@pytest.mark.slow
def test_end_to_end_result_and_report(tmp_path, mnist_file):
    tiny = [f"{k}={v}" for k, v in TINY.items()] + [f"data_dir={mnist_file}"]
    assert cc.main(_args(tmp_path, tiny)) == 0
    run_dir = tmp_path / "contracon" / "attention"
    result = json.loads((run_dir / "result.json").read_text())
    assert [m["method"] for m in result["methods"]] == list(cc.METHODS) and result["status"] == "done"
    for m in result["methods"]:
        for setting in ("til", "cil"):
            matrix = np.array(m[setting]["matrix"], dtype=float)
            assert matrix.shape == (2, 2) and np.isnan(matrix[0, 1]) and np.all((matrix[[0, 1, 1], [0, 0, 1]] >= 0))
            assert m[setting]["average"] == pytest.approx(matrix[1].mean())
        assert m["til"]["matrix"][0][0] == m["cil"]["matrix"][0][0]  # one task learned: nothing to confuse
        assert m["updates"] == 4 and len(m["params"]["per_task"]) == 2
    contracon_row, finetune_row = result["methods"][0], result["methods"][1]
    # a ConTraCon task adds 3 projections x 2 heads x (3 x 3 kernel + bias + gate), 3 LayerNorms and an 8 -> 2 head
    assert contracon_row["params"]["per_task"][1] == 3 * 2 * 11 + 3 * 16 + 18
    assert finetune_row["params"]["per_task"] == [18, 18]
    section = cc.report_section([run_dir, tmp_path], tmp_path / "figures")
    assert "| contracon |" in section and "| frozen |" in section and "Paper finding" in section
    with pytest.raises(SystemExit):  # the run exists: --overwrite or --name
        cc.main(_args(tmp_path, tiny))


@pytest.mark.parametrize("bad", ["model=gla", "methods=('ewc',)", "methods=()", "num_tasks=6", "patch_size=5",
                                 "kernel_size=4", "num_heads=3", "projections=('w_proj',)", "copies=0", "nope=1"])
def test_bad_settings_name_the_key(tmp_path, capsys, bad):
    key = bad.split("=")[0]
    if key == "model":
        args = ["--model", "gla", "--out", str(tmp_path), "--quiet"]
    else:
        args = _args(tmp_path, [bad])
    with pytest.raises(SystemExit):
        cc.main(args)
    assert key in capsys.readouterr().err
    if key not in ("model", "nope"):
        with pytest.raises(ValueError, match=key):
            cc.check_config(dataclasses.replace(cc.ContraconConfig(), **eval(f"dict({bad})")))
