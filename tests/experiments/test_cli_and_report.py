"""The experiments CLI (configs, --set, run directories, resume rules, --help) and the
report builder on a fixture runs/ folder."""

import json

import jax
import jax.numpy as jnp
import pytest

import ssmjax.layers
from experiments import report
from experiments.__main__ import main
from experiments.configs import EXPERIMENTS, SIZES, make_config, parse_overrides, replace
from experiments.runner import build_model, model_slug, run_experiment, run_name

TINY = ["d_model=16", "n_layers=1", "batch_size=4", "eval_batch_size=4", "eval_batches=1", "log_every=1",
        "warmup_steps=1", "checkpoint_every=2", "eval_every=100"]
TINY_TASK = {
    "mqar": ["vocab_size=64", "train_shapes=((16, 2), (32, 4))", "eval_shapes=((16, 2),)"],
    "selective_copying": ["seq_len=12", "num_tokens=3"],
    "induction_heads": ["seq_len=8", "eval_multiples=(1, 2)"],
    "boolean_icl": ["num_bits=3", "num_examples=4"],
    "algorithmic": ["train_max_len=3", "eval_lengths=(2, 5)", "task=addition"],
    "urpe": ["seq_len=8"],
    "sequential_functions": ["num_examples=2", "example_len=3"],
    "structural_recursion": ["train_max_bits=3", "eval_bits=(2, 5)"],
    "gsm_graphs": ["min_nodes=3", "max_nodes=5", "eval_nodes=(3, 5)", "max_edges=8"],
}


def test_every_experiment_has_cpu_and_paper_sizes_with_the_common_fields():
    assert {"mqar", "selective_copying", "induction_heads", "boolean_icl", "algorithmic", "lm"} <= set(EXPERIMENTS)
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


@pytest.mark.parametrize("experiment", list(TINY_TASK))  # lm: test_lm.py; classifiers: test_classification.py
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


def test_a_hybrid_pattern_sets_the_depth_unless_n_layers_is_given(capsys):
    assert make_config("mqar").n_layers is None  # the README's hybrid command leaves it unset
    config = replace(make_config("mqar"), model="attention*3,attention", d_model=8, mlp="none")
    tokens = jnp.zeros((1, 4), jnp.int32)
    for n_layers, groups in ((None, 1), (8, 2)):  # unset: the pattern's 4 layers; 8: tiled twice
        params = build_model(replace(config, n_layers=n_layers), 16).init(jax.random.PRNGKey(0), tokens)["params"]
        assert sorted(k for k in params if k.startswith("group_")) == [f"group_{i}" for i in range(groups)]
        assert len(params["group_0"]) == 4
    with pytest.raises(SystemExit):
        main(["mqar", "--model", "attention*3,attention", "--set", "n_layers=2"])
    error = capsys.readouterr().err  # says both rules
    assert "n_layers: 2 is not a multiple of the pattern length 4" in error and "leave n_layers unset" in error


# ----------------------------------------------------------------------------- report
def _write_run(root, experiment, run, model, summary, variant="", status="done", reference=None, config=None):
    """A fake run folder as ``python -m experiments`` writes it (``status=None``: no result.json yet)."""
    run_dir = root / experiment / run
    run_dir.mkdir(parents=True)
    metadata = dict(experiment=experiment, model=model, variant=variant, size="cpu", run=run)
    settings = {**dict(model=model, steps=10, lr=3e-3, n_layers=2), **(config or {})}
    (run_dir / "config.json").write_text(json.dumps(dict(metadata, config=settings)))
    rows = [dict(split="train", step=s, loss=1.0 / s, accuracy=0.1 * s) for s in range(1, 7)]
    rows += [dict(split="eval", step=5, accuracy=0.5)]
    if status is not None:
        rows += [dict(split="eval", step=10, accuracy=0.7)]
        curve = dict(xlabel="length", ylabel="accuracy", xscale="log", x=[8, 16], y=[0.5, 0.7])
        if reference:
            curve["reference"] = reference
        result = dict(metadata, params=123456, steps=10, step=10 if status == "done" else 6, status=status, message="",
                      wall_s=90.0, train_loss=0.5, train_accuracy=0.9, tokens_per_s=1000.0,
                      eval=dict(accuracy=0.7, summary=summary, curve=curve))
        (run_dir / "result.json").write_text(json.dumps(result))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _table_rows(text, header):
    lines = text.splitlines()
    start = lines.index(header) + 2
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_report_builds_tables_and_plots_from_a_runs_folder(tmp_path):
    runs = tmp_path / "runs"
    _write_run(runs, "induction_heads", "mamba", "mamba", {"acc @8 (train)": 1.0, "acc @16": 0.99})
    _write_run(runs, "induction_heads", "attention", "attention", {"acc @8 (train)": 1.0, "acc @16": 0.25})
    _write_run(runs, "induction_heads", "gla-x3+attention", "gla*3,attention", {"acc @8 (train)": 0.9, "acc @16": 0.5},
               status="nonfinite")
    reference = dict(label="Bayes-optimal learner", y=[0.8, 0.9], summary={"acc @1": 0.8, "acc @2": 0.9})
    _write_run(runs, "boolean_icl", "attention-parity", "attention", {"acc @1": 0.5, "acc @2": 0.6}, variant="parity",
               reference=reference)
    (runs / "induction_heads" / "empty").mkdir()  # neither config.json nor result.json: not a run
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "induction_heads.md").write_text("Hand-written commentary.")
    out = tmp_path / "docs" / "RESULTS.md"
    text = report.build_report(runs, out, notes_dir=notes)
    assert out.read_text() == text
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["## Induction heads: length extrapolation",
                        "## In-context learning of Boolean functions: parity"]
    rows = _table_rows(text, "| run | model | params | steps | status | acc @8 (train) | acc @16 | train loss | time |")
    assert [r.split(" | ")[1] for r in rows] == ["`attention`", "`mamba`", "`gla*3,attention`"]
    assert rows[0] == "| `attention` | `attention` | 123k | 10 | done | 1.000 | 0.250 | 0.500 | 1.5 min |"
    assert "| 6/10 | nonfinite |" in rows[2]
    assert "| Bayes-optimal learner | - | - | - | - | 0.800 | 0.900 | - | - |" in text
    assert "Hand-written commentary." in text and "*Paper:* Gu & Dao" in text
    for image in ("results/induction_heads.png", "results/boolean_icl-parity.png"):
        assert f"]({image})" in text and (out.parent / image).stat().st_size > 0


def test_report_labels_runs_by_name_and_differing_settings(tmp_path):
    runs = tmp_path / "runs"
    summary = {"accuracy": 0.5}
    _write_run(runs, "mqar", "attention", "attention", summary)
    _write_run(runs, "mqar", "attention-lr1e-2", "attention", summary, config=dict(lr=1e-2))
    _write_run(runs, "mqar", "attention-deep", "attention", summary, config=dict(n_layers=4))
    rows = _table_rows(report.build_report(runs, tmp_path / "R.md"),
                       "| run | model | settings | params | steps | status | accuracy | train loss | time |")
    assert [r.split(" | ")[:3] for r in rows] == [["| `attention`", "`attention`", "lr=0.003, n_layers=2"],
                                                   ["| `attention-deep`", "`attention`", "lr=0.003, n_layers=4"],
                                                   ["| `attention-lr1e-2`", "`attention`", "lr=0.01, n_layers=2"]]


def test_report_lists_incomplete_runs_and_finds_nested_run_folders(tmp_path):
    runs = tmp_path / "runs"
    _write_run(runs / "suite", "mqar", "mamba", "mamba", {"accuracy": 0.9})
    running = _write_run(runs / "suite", "mqar", "attention", "attention", {}, status=None)
    (running / "checkpoints" / "5").mkdir(parents=True)
    (running / "checkpoints" / "5" / "result.json").write_text("{}")  # inside a checkpoint: not a run
    (running / "H96_seed0").mkdir()
    (running / "H96_seed0" / "result.json").write_text('{"mse": 0.4}')  # one fit of the run: not a run
    # interrupted at step 6 (its result.json), then resumed: metrics up to step 10, no new result yet
    _write_run(runs / "suite", "mqar", "gla", "gla", {"accuracy": 0.4}, status="interrupted")
    text = report.build_report(runs, tmp_path / "R.md")
    rows = _table_rows(text, "| run | model | params | steps | status | accuracy | train loss | time |")
    assert rows[0] == "| `attention` | `attention` | - | 6/10 | incomplete | - | - | - |"
    assert rows[1].startswith("| `mamba` | `mamba` | 123k | 10 | done | 0.900 |")
    assert rows[2] == "| `gla` | `gla` | - | 10 | incomplete | - | - | - |"
    assert len(rows) == 3 and "## Multi-query associative recall (MQAR)" in text
    assert "H96_seed0" not in text and "## ?" not in text


def test_report_cli_writes_into_the_runs_folder_unless_out_is_given(tmp_path, capsys):
    report.main(["--runs", str(tmp_path)])
    assert "No runs found" in (tmp_path / "RESULTS.md").read_text()
    assert f"wrote {tmp_path / 'RESULTS.md'}" in capsys.readouterr().out
    report.main(["--runs", str(tmp_path), "--out", str(tmp_path / "other" / "R.md")])
    assert (tmp_path / "other" / "R.md").exists()
    with pytest.raises(SystemExit):
        report.main(["--runs", str(tmp_path / "missing")])
    assert "--runs" in capsys.readouterr().err


def test_suite_defaults_are_registered_and_settings_valid():
    from experiments.suite import DEFAULT_MODELS, SUITE_SETTINGS

    assert set(DEFAULT_MODELS) <= set(ssmjax.layers.names())
    assert set(SUITE_SETTINGS) <= set(EXPERIMENTS)
    for experiment, settings in SUITE_SETTINGS.items():  # the suite's reduced settings are valid
        parse_overrides(make_config(experiment), settings)


def test_report_keep_merges_sections_in_place():
    old = "# Results\n\nold preamble\n\n## A\n\nold a\n\n## B\n\nold b\n"
    new = "# Results\n\nnew preamble\n\n## B\n\nnew b\n\n## C\n\nnew c\n"
    assert report.merge_sections(old, new) == "# Results\n\nnew preamble\n\n## A\n\nold a\n\n## B\n\nnew b\n\n## C\n\nnew c\n"
