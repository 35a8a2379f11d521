"""The benchmark library (experiments/bench) and the programs built on it, at tiny sizes."""

import json

import jax.numpy as jnp
import pytest

from experiments import layer_speed, speed
from experiments.bench import peers
from experiments.bench.clock import median_of_calls
from experiments.bench.table import Column, legend, markdown_table, text_table
from experiments.bench.timing import growth_exponent, measure_jax, run_row


def test_median_of_calls_warms_up_then_times_reps_calls():
    calls = []
    ms = median_of_calls(lambda: calls.append(1), reps=3, warmup=2)
    assert len(calls) == 5 and ms >= 0.0
    with pytest.raises(ValueError, match="reps"):
        median_of_calls(lambda: None, reps=0)


def test_measure_jax_times_forward_and_backward_and_says_why_it_skips():
    fn = lambda a, b: (a * b, jnp.cumsum(a))  # noqa: E731
    args = (jnp.ones((4, 8), jnp.float32), jnp.ones((4, 8), jnp.float32))
    row = measure_jax(fn, args, reps=1, warmup=1)
    assert {"fwd_ms", "fwd_bwd_ms", "fwd_temp_mb", "temp_mb"} <= set(row) and "note" not in row
    assert "fwd_ms" not in measure_jax(fn, args, timed=False) and "memory only" in measure_jax(fn, args, timed=False)["note"]
    big = measure_jax(lambda a: jnp.cumsum(jnp.outer(a, a)), (jnp.ones(512, jnp.float32),), max_memory_gb=1e-9)
    assert "fwd_ms" not in big and big["note"].startswith("not timed: compiled temp memory >")


def test_run_row_keeps_going_after_a_failure(capsys):
    rows = []
    run_row(rows, dict(op="ok"), lambda: dict(fwd_ms=1.0), progress="[1/2]")
    run_row(rows, dict(op="bad"), lambda: 1 / 0, progress="[2/2]")
    assert rows[0] == dict(op="ok", fwd_ms=1.0) and rows[1]["error"].startswith("ZeroDivisionError")
    err = capsys.readouterr().err
    assert "[1/2] ok ... " in err and "[2/2] bad ... FAILED" in err


def test_growth_exponent_of_a_power_law():
    assert growth_exponent([(t, 3.0 * t**1.5) for t in (64, 256, 1024)]) == pytest.approx(1.5)
    assert growth_exponent([(64, 1.0)]) is None


def test_tables_mark_missing_cells_and_explain_columns():
    columns = (Column("op", "op", meaning="the op"), Column("ms", "ms", "{:.1f}", "median ms"),
               Column("unused", "unused", "{}", "never shown"), Column("note", "note", meaning="why a cell is empty"))
    rows = [dict(op="a", ms=1.25), dict(op="b", note="not timed")]
    text = text_table(rows, columns).splitlines()
    assert text[0].split() == ["op", "ms", "note"] and text[2].split() == ["a", "1.2"]
    assert text[3].split() == ["b", "-", "not", "timed"]
    assert markdown_table(rows, columns).splitlines()[3] == "| b |  | not timed |"
    explained = legend(rows, columns)
    assert "median ms" in explained and "never shown" not in explained and "'-'" in explained


def test_peers_without_torch_skip_with_the_reason(tmp_path, capsys):
    if peers.missing("torch") is None:
        pytest.skip("torch is installed here: the peers would really run")
    result = peers.main(["--reps", "1", "--json", str(tmp_path / "peers.json")])
    assert set(result["skipped"]) == set(peers.PEERS) and "pip install -e '.[peers]'" in result["skipped"][
        "mambapy_selective_scan_fb_ms"]
    assert json.loads((tmp_path / "peers.json").read_text()) == result
    assert "skipped: torch not importable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        peers.main(["--reps", "0"])


def test_speed_report_labels_progress_explains_columns_and_skips(tmp_path, capsys):
    out = tmp_path / "speed.json"
    result = speed.main(["--ops", "linear_scan", "--lengths", "32,64", "--reps", "1", "--no-comparison",
                         "--max-memory-gb", "1e-9", "--out", str(out)])
    captured = capsys.readouterr()
    assert "[linear_scan 1/2] linear_scan t=32 sequential ..." in captured.err
    assert "columns:" in captured.out and "x seq" in captured.out and "not measured; the row's note says why" in captured.out
    assert all(r["note"].startswith("not timed: compiled temp memory") for r in result["rows"])
    assert json.loads(out.read_text())["rows"][0]["op"] == "linear_scan"


def test_layer_speed_one_layer(capsys):
    rows = layer_speed.main(["--layers", "attention,nope", "--b", "1", "--t", "8", "--d", "8", "--reps", "1",
                             "--hybrid", ""])
    assert rows[0]["layer"] == "attention" and rows[0]["fwd_bwd_ms"] > 0 and "unknown layer" in rows[1]["error"]
    assert "| attention |" in capsys.readouterr().out


def test_pararnn_speed_config_and_errors(capsys):
    """The ParaRNN benchmark times the ``lm`` cpu model with only the method, length and
    batch changed; unknown cells and lengths are argument errors."""
    from experiments import pararnn_speed
    from experiments.configs import SIZES

    config = pararnn_speed.lm_config("gru", "newton", 256, 3)
    cpu = SIZES["lm"]["cpu"]
    assert (config.model, config.d_model, config.seq_len, config.batch_size) == ("gru", 104, 256, 3)
    assert (config.n_layers, config.lr, config.weight_decay, config.grad_clip) == (
        cpu.n_layers, cpu.lr, cpu.weight_decay, cpu.grad_clip)
    assert config.mixer_fields == {"gru": {"method": "newton"}}
    for args, message in ((["--cells", "rnn"], "--cells"), (["--lengths", "1k"], "--lengths")):
        with pytest.raises(SystemExit):
            pararnn_speed.main(args)
        assert message in capsys.readouterr().err


def test_pararnn_curve_gaps_against_the_seed_noise():
    from experiments.pararnn_speed import curve_gaps

    def run(name, losses, val):
        metrics = [dict(split="train", step=i + 1, loss=v) for i, v in enumerate(losses)]
        return dict(run=name, metrics=metrics + [dict(split="eval", step=3, loss=val)], eval=dict(val_loss=val),
                    wall_s=10.0)

    rows = curve_gaps([run("gru-sequential-seed0", [3.0, 2.0, 1.5], 1.6), run("gru-newton-seed0", [3.0, 2.01, 1.5], 1.61),
                       run("gru-sequential-seed1", [3.2, 2.1, 1.4], 1.5), run("lstm-newton-seed0", [1.0], 1.0)])
    assert [r["compared"] for r in rows] == ["newton vs sequential (seed 0)", "sequential seed 1 vs seed 0 (noise)"]
    assert rows[0]["max_gap"] == pytest.approx(0.01) and rows[0]["mean_gap"] == pytest.approx(0.01 / 3)
    assert rows[1]["max_gap"] == pytest.approx(0.2) and rows[1]["val_loss"] == 1.5
    assert rows[0]["reference_val_loss"] == 1.6 and rows[0]["steps"] == 3
