"""experiments.step_speed at a tiny shape: our rows, the table with its legend, the JSON,
and the PyTorch peer skipped with the reason when it cannot run."""

import json

from experiments import step_speed


def test_step_speed_tiny_run_reports_rows(tmp_path, capsys):
    out = tmp_path / "step_speed.json"
    result = step_speed.main(["--models", "lru", "--reps", "1", "--batch", "2", "--length", "8",
                              "--set", "n_layers=1", "--set", "d_model=8", "--out", str(out)])
    (row,) = result["rows"]
    assert row["model"] == "lru" and row["step_ms"] > 0 and row["params"] > 0 and row["temp_mb"] is not None
    printed = capsys.readouterr().out
    assert "step ms" in printed and "temp MB" in printed and "columns:" in printed
    assert "peer: not run" in printed and result["peers"] is None  # the peer has the sMNIST shape only
    assert json.loads(out.read_text())["shape"] == dict(step_speed.SHAPE, batch=2, t=8)


def test_peer_step_without_its_interpreter_says_why(tmp_path, capsys):
    assert step_speed.peer_step(str(tmp_path / "no-python")) == (None, None)
    assert "peers: skipped" in capsys.readouterr().out
