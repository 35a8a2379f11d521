"""The sequence-classification experiments (sMNIST, psMNIST, sCIFAR, the LRA tasks, arrow
pointing): batches, patches, and every experiment end to end on generated or tiny files in
the real formats."""

import json

import numpy as np
import pytest

from experiments.__main__ import main
from experiments.configs import SIZES, make_config
from experiments.runner import build_config, run_experiment, task_model
from experiments.tasks import build_task, epoch_batch_indices, image_patches
from tests.data.test_images import write_mnist
from tests.data.test_lra import write_cifar, write_imdb

CLASSIFICATION = ("smnist", "psmnist", "scifar", "lra_image", "pathfinder", "path_x", "listops", "lra_text",
                  "lra_retrieval", "arrow_pointing")
TINY = ["d_model=8", "n_layers=1", "batch_size=2", "eval_batch_size=4", "eval_rows=4", "steps=2", "eval_every=100",
        "log_every=1", "warmup_steps=1", "checkpoint_every=2"]


def test_epoch_batches_visit_every_row_once_per_epoch_in_a_fresh_order():
    epoch0 = np.concatenate([epoch_batch_indices(10, 3, 0, step) for step in range(3)])
    epoch1 = np.concatenate([epoch_batch_indices(10, 3, 0, step) for step in range(3, 6)])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # 3 batches of 3; the 10th row waits (drop last)
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(epoch_batch_indices(10, 3, 0, 4), epoch_batch_indices(10, 3, 0, 4))
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batch_indices(2, 3, 0, 0)


def test_image_patches_are_raster_order_patches():
    picture = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    patches = image_patches(picture, 2)
    assert patches.shape == (1, 4, 4)
    assert patches[0, 1].tolist() == [2, 3, 6, 7] and patches[0, 2].tolist() == [8, 9, 12, 13]
    with pytest.raises(ValueError, match="patch_size"):
        image_patches(picture, 3)


def test_every_classification_experiment_is_registered_with_both_sizes():
    for experiment in CLASSIFICATION:
        assert set(SIZES[experiment]) == {"cpu", "paper"}
        assert make_config(experiment, "paper").steps > make_config(experiment, "cpu").steps


def write_aan(folder):
    folder.mkdir(parents=True)
    rows = ["1\tp1\tp2\tState space models.\tA recurrent net.", "0.0\tp3\tp4\tGraphs\tCafé au lait",
            "1.0\tp5\tp6\tLong range arena\tattention"]
    for name in ("train", "eval", "test"):
        (folder / f"new_aan_pair.{name}.tsv").write_text("\n".join(rows) + "\n")


def tiny_data(experiment, tmp_path) -> list[str]:
    """``--set`` items that point ``experiment`` at a tiny dataset in its real format."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if experiment in ("smnist", "psmnist"):
        write_mnist(tmp_path / "mnist.pkl.gz")
        return [f"data_dir={tmp_path}"]
    if experiment in ("scifar", "lra_image"):
        write_cifar(tmp_path)
        return [f"data_dir={tmp_path}"]
    if experiment == "lra_text":
        write_imdb(tmp_path)
        return [f"data_dir={tmp_path}", "val_rows=1", "max_length=32"]
    if experiment == "lra_retrieval":
        write_aan(tmp_path / "aan")
        return [f"data_dir={tmp_path / 'aan'}", "max_length=16", "mlp_dim=8"]
    if experiment == "listops":
        return [f"cache_dir={tmp_path}", "train_rows=8", "max_length=60"]
    if experiment in ("pathfinder", "path_x"):
        return [f"cache_dir={tmp_path}", "train_rows=8"]
    return ["eval_resolutions=(32, 48)"]  # arrow_pointing


# Two in the default run (a float-feature task with the SSM learning-rate group, the two-tower
# pair model on token files); the rest, ListOps with bidirectional attention among them, are slow.
DEFAULT = {"smnist": "s4d", "lra_retrieval": "lru"}
MODELS = {"listops": "attention", "arrow_pointing": "plstm2d"}


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=() if e in DEFAULT else pytest.mark.slow)
                                        for e in CLASSIFICATION])
def test_each_classification_experiment_runs_end_to_end(experiment, tmp_path):
    model = DEFAULT.get(experiment) or MODELS.get(experiment, "s4d")
    overrides = TINY + tiny_data(experiment, tmp_path / "data") + (["bidirectional=true"] if model != "plstm2d" and
                                                                     experiment not in ("smnist", "psmnist", "scifar")
                                                                     else [])
    result = run_experiment(experiment, model, overrides=overrides, out=tmp_path / "runs", verbose=False)
    assert result["status"] == "done" and result["step"] == 2
    summary = result["eval"]["summary"]
    assert summary and all(0.0 <= v <= 1.0 for k, v in summary.items() if "acc" in k)
    run_dir = next((tmp_path / "runs" / experiment).iterdir())
    assert json.loads((run_dir / "config.json").read_text())["config"]["model"] == model


def test_tasks_build_the_models_the_recipe_asks_for(tmp_path):
    write_aan(tmp_path / "aan")
    config = build_config("lra_retrieval", "s4d", overrides=[f"data_dir={tmp_path / 'aan'}", "max_length=16",
                                                                    "batch_size=2"])
    task = build_task("lra_retrieval", config)
    model = task_model(config, task)
    assert type(model).__name__ == "DualEncoderClassifier" and model.encoder.pad_id == 0
    assert model.encoder.bidirectional  # the LRA configs are non-causal
    assert task.train_batch(0).inputs.shape == (config.batch_size, 32)  # two documents side by side


def test_missing_data_is_a_clear_cli_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["lra_text", "--model", "s4d", "--out", str(tmp_path), "--quiet"])
    assert "data_dir: IMDb" in capsys.readouterr().err


def test_lra_summary_puts_our_best_run_beside_the_papers():
    from experiments.report import LRA_PAPERS, lra_summary

    def run(task, model, accuracy, status="done"):
        return dict(experiment=task, model=model, size="cpu", status=status, eval=dict(summary={"test acc": accuracy}))

    text = lra_summary([run("listops", "s4d", 0.41), run("listops", "s4d", 0.45), run("pathfinder", "s4d", 0.6, "x"),
                        run("listops", "attention", 0.3)])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["ours: `s4d` (CPU size)"].split(" | ")[1:] == ["45.00", "-", "-", "-", "60.00*", "- |"]
    assert "30.00" in rows["ours: `attention` (CPU size)"]
    assert all(paper in rows for paper in LRA_PAPERS) and "59.6" in rows["S4 (Gu et al., 2022)"]


# (inputs of one row at the paper size, vocabulary or None, classes, pair)
PAPER_INPUTS = {"smnist": ((784, 1), None, 10, False), "psmnist": ((784, 1), None, 10, False),
                "scifar": ((1024, 3), None, 10, False), "lra_image": ((1024, 1), None, 10, False),
                "pathfinder": ((1024, 1), None, 2, False), "path_x": ((16384, 1), None, 2, False),
                "listops": ((2000,), 16, 10, False), "lra_text": ((4096,), 257, 2, False),
                "lra_retrieval": ((8000,), 257, 2, True), "arrow_pointing": ((144, 256), None, 2, False)}


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=() if e in ("smnist", "listops") else pytest.mark.slow)
                                        for e in CLASSIFICATION])  # each traces a full-length model: seconds
def test_paper_size_models_build_at_the_papers_lengths(experiment):
    """Every paper-size config makes a valid model for S5 (the configs' source) at the task's
    full length (shapes only: nothing is allocated or compiled)."""
    import jax
    import jax.numpy as jnp

    from experiments.runner import build_model

    shape, vocab, classes, pair = PAPER_INPUTS[experiment]
    config = build_config(experiment, "s5", size="paper")
    model = build_model(config, vocab, classes, pad_id=0 if vocab else None, pair=pair)
    inputs = jax.ShapeDtypeStruct((2, *shape), jnp.int32 if vocab else jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), inputs)
    assert jax.eval_shape(model.apply, params, inputs).shape == (2, classes)
    assert config.steps >= 10 * config.eval_every
    assert (config.ssm_lr > 0) == (experiment != "arrow_pointing")  # the S4/S5/LRU recipe, not pLSTM's
