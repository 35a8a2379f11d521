"""`python -m experiments dynamics` end to end at a tiny size: result.json, plots, the report
section, resume rules and argument errors."""

import json

import numpy as np
import pytest

from experiments import dynamics

TINY = ["d_model=8", "epochs=1", "train_trajectories=4", "train_steps=17", "val_trajectories=1", "val_steps=17",
        "window=8", "stride=8", "batch_size=4", "test_ics=3", "context=4", "horizon_lyapunov=0.2", "transient=10"]


def _args(tmp_path, system="lorenz96", model="elman", extra=()):
    return ["--system", system, "--model", model, "--out", str(tmp_path), "--quiet"] + \
        [a for item in TINY + list(extra) for a in ("--set", item)]


def test_tiny_run_writes_result_plots_and_report(tmp_path):
    assert dynamics.main(_args(tmp_path)) == 0
    run_dir = tmp_path / "dynamics" / "lorenz96-elman"
    result = json.loads((run_dir / "result.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["experiment"] == "dynamics" and config["model"] == "elman" and config["config"]["window"] == 8
    horizon = result["horizon_steps"]
    assert horizon == int(np.ceil(0.2 / (1.68 * 0.01)))
    assert len(result["nrmse_curve"]) == horizon
    assert 0 <= result["vpt_mean"] <= horizon * 0.01 * 1.68 + 1e-9
    for key in ("vpt_std", "nrmse_mean", "spectrum_error", "wall_s", "params"):
        assert result[key] is not None
    assert (run_dir / "rollout.png").exists() and (run_dir / "nrmse.png").exists()
    assert (run_dir / "seed0" / "metrics.jsonl").exists()
    # a second run without --resume/--overwrite refuses to clobber the checkpoints
    with pytest.raises(SystemExit):
        dynamics.main(_args(tmp_path))
    section = dynamics.report_section([run_dir], tmp_path / "figures")
    assert "| lorenz96 | `elman` |" in section and "Heidenreich" in section
    assert (tmp_path / "figures" / "dynamics-lorenz96-nrmse.png").exists()
    # the best model's rollout is copied (here the only one); per-run plots stay in the run
    assert "figures/dynamics-lorenz96-best-rollout.png" in section and "`lorenz96-elman`" in section
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "dynamics-lorenz96-best-rollout.png", "dynamics-lorenz96-nrmse.png"]


@pytest.mark.slow
def test_attention_run_on_ks_uses_a_sliding_window(tmp_path):
    assert dynamics.main(_args(tmp_path, "ks", "attention", ["horizon_lyapunov=0.05"])) == 0
    result = json.loads((tmp_path / "dynamics" / "ks-attention" / "result.json").read_text())
    assert result["horizon_steps"] == int(np.ceil(0.05 / (0.043 * 0.25)))
    model = dynamics.build_model(dynamics.make_config("ks", "attention", ["window=8"]), 64, 10)
    assert model.mixer_fields["attention"]["window"] == 8
    assert model.mixer_fields["attention"]["max_len"] >= 8 + 10


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        dynamics.main(["--system", "lorenz63"])
    with pytest.raises(SystemExit):
        dynamics.main(["--model", "elman", "--set", "nope=1", "--out", str(tmp_path)])
    assert "nope" in capsys.readouterr().err
    with pytest.raises(ValueError, match="window"):
        dynamics.windows(np.zeros((1, 5, 2)), 8, 8)
