"""The experiments CLI (configs, --set, run directories, resume rules, --help) and the
report builder on a fixture runs/ folder."""

import json

import pytest

import ssmjax.layers
from experiments import report
from experiments.__main__ import main
from experiments.configs import EXPERIMENTS, SIZES, make_config, parse_overrides
from experiments.runner import model_slug, run_experiment, run_name

TINY = ["d_model=16", "n_layers=1", "batch_size=4", "eval_batch_size=4", "eval_batches=1", "log_every=1",
        "warmup_steps=1", "checkpoint_every=2", "eval_every=100"]
TINY_TASK = {
    "mqar": ["vocab_size=64", "train_shapes=((16, 2), (32, 4))", "eval_shapes=((16, 2),)"],
    "selective_copying": ["seq_len=12", "num_tokens=3"],
    "induction_heads": ["seq_len=8", "eval_multiples=(1, 2)"],
    "boolean_icl": ["num_bits=3", "num_examples=4"],
    "algorithmic": ["train_max_len=3", "eval_lengths=(2, 5)", "task=addition"],
}


def test_every_experiment_has_cpu_and_paper_sizes_with_the_common_fields():
    assert set(EXPERIMENTS) == {"mqar", "selective_copying", "induction_heads", "boolean_icl", "algorithmic"}
    for experiment in EXPERIMENTS:
        assert set(SIZES[experiment]) == {"cpu", "paper"}
        config = make_config(experiment, "cpu")
        for field in ("steps", "batch_size", "lr", "seed", "d_model", "n_layers"):
            assert hasattr(config, field)
        assert make_config(experiment, "paper").steps > config.steps


def test_set_parses_typed_values_and_rejects_bad_ones():
    config = make_config("mqar")
    values = parse_overrides(config, ["steps=20", "lr=3e-4", "train_shapes=((64, 4),)", "model=gla*3,attention",
                                      "mixer_fields={'attention': {'num_heads': 2}}", "steps=1e3"])
    assert values == dict(steps=1000, lr=3e-4, train_shapes=((64, 4),), model="gla*3,attention",
                          mixer_fields={"attention": {"num_heads": 2}})
    assert parse_overrides(make_config("selective_copying"), ["variable=false"]) == {"variable": False}
    for bad, message in [("nope=1", "unknown field"), ("steps", "key=value"), ("steps=1.5", "cannot parse"),
                         ("lr=fast", "cannot parse"), ("train_shapes=3", "cannot parse")]:
        with pytest.raises(ValueError, match=message):
            parse_overrides(config, [bad])


def test_run_names():
    config = make_config("boolean_icl", overrides=dict(model="gla*3,attention", function="parity"))
    assert run_name(config, "cpu") == "gla-x3+attention-parity"
    assert run_name(config, "paper", "lr1e-4") == "gla-x3+attention-parity-paper-lr1e-4"
    assert run_name(make_config("mqar"), "cpu") == "attention"


def test_help_lists_experiments_and_models(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in (*EXPERIMENTS, *ssmjax.layers.names()):
        assert name in text


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_runs_end_to_end(experiment, tmp_path):
    result = run_experiment(experiment, "attention", overrides=TINY + TINY_TASK[experiment] + ["steps=2"], out=tmp_path,
                            verbose=False)
    assert result["status"] == "done" and result["experiment"] == experiment
    run_dir = next((tmp_path / experiment).iterdir())
    for name in ("config.json", "metrics.jsonl", "result.json", "learning_curves.png"):
        assert (run_dir / name).exists()
    assert 0.0 <= result["eval"]["accuracy"] <= 1.0 and result["eval"]["summary"]
    assert json.loads((run_dir / "config.json").read_text())["config"]["steps"] == 2


def test_cli_pattern_run_dir_resume_and_errors(tmp_path, capsys):
    args = ["induction_heads", "--model", "attention*2", "--out", str(tmp_path), "--quiet",
            *[f"--set={s}" for s in TINY + TINY_TASK["induction_heads"] + ["steps=2", "n_layers=2"]]]
    assert main(args) == 0
    run_dir = tmp_path / "induction_heads" / model_slug("attention*2")
    assert run_dir.name == "attention-x2" and (run_dir / "checkpoints" / "2").exists()
    assert "done: step 2/2" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the run exists: --resume, --overwrite or --name
        main(args)
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume", "--set", "steps=4"]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 4 and json.loads((run_dir / "config.json").read_text())["config"]["steps"] == 4
    for bad in (["--model", "nope"], ["--model", "attention*2", "--set", "n_layers=3"], ["--set", "bogus=1"]):
        with pytest.raises(SystemExit):
            main(["mqar", "--model", "attention", "--out", str(tmp_path), *bad])
        assert "error" in capsys.readouterr().err


# ----------------------------------------------------------------------------- report
def _write_run(root, experiment, run, model, summary, variant="", status="done", reference=None):
    run_dir = root / experiment / run
    run_dir.mkdir(parents=True)
    curve = dict(xlabel="length", ylabel="accuracy", xscale="log", x=[8, 16], y=list(summary.values())[:2])
    if reference:
        curve["reference"] = reference
    result = dict(experiment=experiment, model=model, variant=variant, size="cpu", run=run, params=123456, steps=10,
                  step=10 if status == "done" else 6, status=status, message="", wall_s=90.0, train_loss=0.5,
                  train_accuracy=0.9, tokens_per_s=1000.0, eval=dict(accuracy=0.7, summary=summary, curve=curve))
    (run_dir / "result.json").write_text(json.dumps(result))
    rows = [dict(split="train", step=s, loss=1.0 / s, accuracy=0.1 * s) for s in range(1, 7)]
    rows += [dict(split="eval", step=5, accuracy=0.5), dict(split="eval", step=10, accuracy=0.7)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_builds_tables_and_plots_from_a_runs_folder(tmp_path):
    runs = tmp_path / "runs"
    _write_run(runs, "induction_heads", "mamba", "mamba", {"acc @8 (train)": 1.0, "acc @16": 0.99})
    _write_run(runs, "induction_heads", "attention", "attention", {"acc @8 (train)": 1.0, "acc @16": 0.25})
    _write_run(runs, "induction_heads", "gla-x3+attention", "gla*3,attention", {"acc @8 (train)": 0.9, "acc @16": 0.5},
               status="nonfinite")
    reference = dict(label="Bayes-optimal learner", y=[0.8, 0.9], summary={"acc @1": 0.8, "acc @2": 0.9})
    _write_run(runs, "boolean_icl", "attention-parity", "attention", {"acc @1": 0.5, "acc @2": 0.6}, variant="parity",
               reference=reference)
    (runs / "induction_heads" / "unfinished").mkdir()  # a run without result.json is skipped
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "induction_heads.md").write_text("Hand-written commentary.")
    out = tmp_path / "docs" / "RESULTS.md"
    text = report.build_report(runs, out, notes_dir=notes)
    assert out.read_text() == text
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["## Induction heads: length extrapolation",
                        "## In-context learning of Boolean functions: parity"]
    lines = text.splitlines()
    header = lines.index("| model | params | steps | status | acc @8 (train) | acc @16 | train loss | time |")
    rows = lines[header + 2:header + 5]
    assert [r.split(" | ")[0] for r in rows] == ["| `attention`", "| `mamba`", "| `gla*3,attention`"]
    assert rows[0] == "| `attention` | 123k | 10 | done | 1.000 | 0.250 | 0.500 | 1.5 min |"
    assert "| 6/10 | nonfinite |" in rows[2]
    assert "| Bayes-optimal learner | - | - | - | 0.800 | 0.900 | - | - |" in text
    assert "Hand-written commentary." in text and "*Paper:* Gu & Dao" in text
    for image in ("results/induction_heads.png", "results/boolean_icl-parity.png"):
        assert f"]({image})" in text and (out.parent / image).stat().st_size > 0


def test_report_cli_on_an_empty_folder(tmp_path, capsys):
    report.main(["--runs", str(tmp_path), "--out", str(tmp_path / "R.md")])
    assert "No runs found" in (tmp_path / "R.md").read_text()


def test_suite_defaults_are_registered_and_settings_valid():
    from experiments.suite import DEFAULT_MODELS, SUITE_SETTINGS

    assert set(DEFAULT_MODELS) <= set(ssmjax.layers.names())
    for experiment in EXPERIMENTS:  # the suite's reduced settings are valid for every task
        parse_overrides(make_config(experiment), SUITE_SETTINGS[experiment])
