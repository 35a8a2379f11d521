"""The regression protocols end to end at a tiny size (`python -m experiments
enumerative_geometry` / `universal_approximation`), their shared helpers and target maps
by hand, the report sections and argument errors."""

import json

import numpy as np
import pytest

from experiments import enumerative_geometry as eg
from experiments import protocols, regression
from experiments import universal_approximation as ua

EG_TINY = ["d_model=8", "n_layers=1", "max_genus=2", "max_points=3", "ood_genus=3", "steps=2", "batch_size=2",
           "activations=('dra', 'gelu')"]
UA_TINY = ["widths=(4,)", "maps=('moving_average', 'soft_sort')", "seq_len=4", "train_rows=16", "test_rows=8",
           "steps=2", "batch_size=4"]


def _args(tmp_path, items, model="attention"):
    return ["--model", model, "--out", str(tmp_path), "--quiet"] + [a for s in items for a in ("--set", s)]


def test_both_are_registered_protocols():
    assert protocols.load("enumerative_geometry") is eg and protocols.load("universal_approximation") is ua


def test_epoch_plan_and_metrics_by_hand():
    assert regression.epoch_plan(5, 100, 8) == (1, 40)  # shorter than an epoch: the first 5 x 8 rows
    assert regression.epoch_plan(12, 100, 8) == (1, 100)  # 12 updates per epoch
    assert regression.epoch_plan(30, 100, 8) == (2, 100)  # round(30 / 12)
    with pytest.raises(ValueError, match="batch_size"):
        regression.epoch_plan(5, 4, 8)
    m = regression.regression_metrics(np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 5.0]), tolerance=0.5)
    # errors 0, -1, -1; target mean 3, spread 4 + 0 + 4 = 8
    assert m == dict(r2=1 - 2 / 8, mae=2 / 3, mse=2 / 3, accuracy=1 / 3)


def test_enumerative_geometry_end_to_end(tmp_path):
    assert eg.main(_args(tmp_path, EG_TINY)) == 0
    run_dir = tmp_path / "enumerative_geometry" / "attention"
    result = json.loads((run_dir / "result.json").read_text())
    rows = result["data"]["rows"]
    assert rows["train"] + rows["val"] + rows["test"] == len(eg.intersection.intersection_table(2, 3))
    assert rows["ood"] == len(eg.intersection.intersection_table(3, 3, min_genus=3))
    assert [m["activation"] for m in result["models"]] == ["dra", "gelu"]
    for m in result["models"]:
        assert set(m["scores"]) == {"train", "test", "ood"} and m["updates"] == 2
        assert 0 <= m["scores"]["test"]["accuracy"] <= 1 and np.isfinite(m["scores"]["test"]["mae"])
    section = eg.report_section([run_dir, tmp_path], tmp_path / "figures")
    assert "| `attention` | dra |" in section and "| `attention` | gelu |" in section and "Hashemi" in section
    with pytest.raises(SystemExit):  # the run exists: --overwrite or --name
        eg.main(_args(tmp_path, EG_TINY))


def test_enumerative_geometry_bad_settings(tmp_path, capsys):
    for bad in (["activations=('dra', 'tanh')"], ["ood_genus=2"], ["encoding=words"], ["nope=1"]):
        with pytest.raises(SystemExit):
            eg.main(_args(tmp_path, EG_TINY + bad))
        assert "error" in capsys.readouterr().err


def test_enumerative_geometry_value_encoding_splits():
    config = regression.make_config(eg.SIZES, "cpu", "attention", EG_TINY + ["encoding=values"])
    data, info = eg.prepare_data(config)
    assert data["train"][0].shape[1:] == (5, 4) and data["ood"][0].dtype == np.float32
    # standardised with the training split's log10 mean and std
    assert abs(float(data["train"][1].mean())) < 1e-5 and info["log10_max"] == pytest.approx(0.0)  # <tau_0^3>_0 = 1


def test_target_maps_by_hand():
    x = np.array([[1.0, 2.0, 3.0, 6.0]])
    np.testing.assert_allclose(ua.moving_average(x), [[1.5, 2.0, 11 / 3, 4.5]])
    np.testing.assert_allclose(ua.softmax_context(np.full((1, 3), 0.7)), np.full((1, 3), 0.7))  # constant in, out
    np.testing.assert_allclose(ua.softmax_context(np.array([[0.0, 1.0]])),
                               [[0.5, np.exp(2) / (1 + np.exp(2))]], rtol=1e-12)  # beta = 2
    z = np.array([[0.3, -1.2, 2.0, 0.9]])
    np.testing.assert_allclose(ua.soft_ranks(z, eps=1e-3), [[1, 0, 3, 2]], atol=1e-6)
    np.testing.assert_allclose(ua.soft_sort(z, eps=1e-3, tau=1e-3), np.sort(z), atol=1e-6)
    with pytest.raises(ValueError, match="map"):
        ua.target_map("cumsum", z)


def test_universal_approximation_end_to_end(tmp_path, capsys):
    assert ua.main(_args(tmp_path, UA_TINY)) == 0
    run_dir = tmp_path / "universal_approximation" / "attention"
    result = json.loads((run_dir / "result.json").read_text())
    assert [(m["map"], m["width"]) for m in result["models"]] == [("moving_average", 4), ("soft_sort", 4)]
    assert all(m["nmse"] >= 0 and m["updates"] == 2 for m in result["models"])
    section = ua.report_section([run_dir], tmp_path / "figures")
    assert "| map | d=4 |" in section and "| soft_sort |" in section
    model = ua.build_model(regression.make_config(ua.SIZES, "cpu", "attention", []), 8)
    assert model.n_layers == 1 and model.mlp == "relu" and model.bidirectional
    for bad in (["widths=(6,)", "num_heads=4"], ["maps=('sort',)"], ["mlp=tanh"]):
        with pytest.raises(SystemExit):
            ua.main(_args(tmp_path, UA_TINY + bad) + ["--name", "bad"])
        assert "error" in capsys.readouterr().err
