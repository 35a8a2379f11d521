"""``python -m experiments ltsf`` end to end on tiny files, and (slow, needs ../shared/data)
the issue's check command on ETTh1."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import ltsf
from ssmjax.data.paths import default_data_dir


def write_tiny_csv(path: Path, n_rows: int = 120) -> Path:
    t = np.arange(n_rows)
    rng = np.random.default_rng(0)
    lines = ["date,x1,x2,OT"]
    for i in t:
        stamp = str(np.datetime64("2020-01-01T00:00:00") + np.timedelta64(int(i), "h")).replace("T", " ")
        row = [np.sin(i / 5), np.cos(i / 7), 0.5 * np.sin(i / 5) + 0.1 * rng.normal()]
        lines.append(stamp + "," + ",".join(f"{v:.6f}" for v in row))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_end_to_end_on_a_tiny_file(tmp_path, capsys):
    write_tiny_csv(tmp_path / "tiny.csv")
    args = ["--model", "dlinear", "--data", "tiny.csv", "--data-dir", str(tmp_path), "--set", "seq_len=8",
            "--set", "horizon=4", "--set", "epochs=1", "--seeds", "0,1", "--out", str(tmp_path / "runs"), "--quiet"]
    assert ltsf.main(args) == 0
    run_dir = tmp_path / "runs" / "ltsf" / "tiny_dlinear_L8"
    result = json.loads((run_dir / "result.json").read_text())
    assert np.isfinite(result["mse"]) and np.isfinite(result["mae"]) and result["mse"] > 0
    entry = result["horizons"]["4"]
    assert entry["seeds"] == [0, 1] and entry["test_windows"] == 24 + 8 - 8 - 4 + 1  # Dataset_Custom: n_test = 24
    assert result["mse"] == pytest.approx(entry["mse"]) and entry["mse_std"] >= 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["experiment"] == "ltsf" and saved["model"] == "dlinear" and saved["config"]["seq_len"] == 8
    assert (run_dir / "forecast_H4.png").stat().st_size > 0
    assert (run_dir / "H4_seed1" / "metrics.jsonl").exists()
    # A finished run is not redone on --resume; an existing run needs --resume or --overwrite.
    assert ltsf.main(args + ["--resume"]) == 0
    assert json.loads((run_dir / "result.json").read_text())["horizons"]["4"]["mse"] == entry["mse"]
    assert ltsf.main(args) == 2 and "--resume" in capsys.readouterr().err
    section = ltsf.report_section([run_dir], tmp_path / "figures")
    assert "| dlinear | tiny | 8 | 4 |" in section and (tmp_path / "figures" / "ltsf-tiny_dlinear_L8.png").exists()


def test_cli_errors(tmp_path, capsys):
    write_tiny_csv(tmp_path / "tiny.csv")
    base = ["--data", "tiny.csv", "--data-dir", str(tmp_path), "--out", str(tmp_path / "runs"), "--quiet"]
    assert ltsf.main(["--model", "dlinear", "--set", "nonsense=1"] + base) == 2
    assert "--set" in capsys.readouterr().err
    assert ltsf.main(["--model", "transformer"] + base) == 2
    assert "model" in capsys.readouterr().err
    assert ltsf.main(["--model", "dlinear", "--data", "missing.csv", "--data-dir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_recipes():
    assert ltsf.recipe("dlinear", "ETTh1")["lr"] == 0.005 and ltsf.recipe("dlinear", "ETTh2")["lr"] == 0.05
    exchange = ltsf.recipe("dlinear", "exchange_rate")
    assert exchange["lr"] == 0.0005 and exchange["batch_size_per_horizon"] == {96: 8, 192: 8, 336: 32, 720: 32}
    it = ltsf.recipe("itransformer", "ETTh1")
    assert (it["seq_len"], it["n_layers"], it["d_model"], it["d_ff"], it["lr"]) == (96, 2, 256, 256, 1e-4)


@pytest.mark.slow
@pytest.mark.skipif(default_data_dir() is None or not (default_data_dir() / "ETTh1.csv").exists(),
                    reason="real data (../shared/data/ETTh1.csv or $SSMJAX_DATA) is absent")
def test_issue_check_command(tmp_path):
    """``python -m experiments ltsf --model dlinear --data ETTh1 --set horizon=96 --set epochs=1``."""
    assert ltsf.main(["--model", "dlinear", "--data", "ETTh1", "--set", "horizon=96", "--set", "epochs=1",
                      "--out", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "ltsf" / "ETTh1_dlinear_L336" / "result.json").read_text())
    assert result["horizons"]["96"]["test_windows"] == 2785
    assert 0.3 < result["mse"] < 0.6 and 0.3 < result["mae"] < 0.6  # one epoch: near the paper's 0.375 / 0.399
