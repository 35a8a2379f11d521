"""``--sweep KEY=v1,v2,...`` for ``python -m experiments`` and ``python -m experiments.suite``:
one run per value, the best by the final eval accuracy, bad keys/values refused before any
training, and the report labelling the runs by the swept setting."""

import json

import pytest

from experiments import report, runner, suite
from experiments.__main__ import main
from experiments.runner import parse_sweep, run_sweep, split_values, sweep_label

TINY = ["d_model=16", "n_layers=1", "batch_size=4", "eval_batch_size=4", "eval_batches=1", "log_every=1",
        "warmup_steps=1", "checkpoint_every=2", "eval_every=100", "num_bits=3", "num_examples=4", "steps=2"]


def test_split_values_keeps_commas_inside_brackets():
    assert split_values("1e-3,3e-3, 1e-2") == ["1e-3", "3e-3", "1e-2"]
    assert split_values("((64, 4), (64, 8)),((32, 2),)") == ["((64, 4), (64, 8))", "((32, 2),)"]
    assert sweep_label("lr", "1e-3") == "lr1e-3"
    assert sweep_label("train_shapes", "((32, 2),)") == "train_shapes32_2"


def test_cli_sweep_makes_one_run_per_value_and_picks_the_best(tmp_path, capsys):
    args = ["boolean_icl", "--model", "attention", "--out", str(tmp_path), "--quiet",
            *[f"--set={s}" for s in TINY], "--sweep", "lr=1e-3,3e-2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    run_dirs = {d.name: d for d in (tmp_path / "boolean_icl").iterdir()}
    assert set(run_dirs) == {"attention-conjunction-lr1e-3", "attention-conjunction-lr3e-2"}
    scores = {}
    for name, run_dir in run_dirs.items():
        result = json.loads((run_dir / "result.json").read_text())
        assert result["status"] == "done" and result["step"] == 2
        assert json.loads((run_dir / "config.json").read_text())["config"]["lr"] == (1e-3 if "1e-3" in name else 3e-2)
        scores[name] = result["eval"]["accuracy"]
        assert f"{scores[name]:.4f}" in out  # every value's score is printed
    best = max(sorted(scores), key=lambda name: (scores[name], name.endswith("1e-3")))  # ties: the first value
    assert f"best: lr={'1e-3' if best.endswith('1e-3') else '3e-2'}" in out
    # the report labels the two runs by the setting that differs between them
    text = report.table(report.load_runs(tmp_path))
    assert "| settings |" in text and "lr=0.001" in text and "lr=0.03" in text


def _fake_results(scores: dict[str, float | None], calls: list):
    """A stand-in for run_experiment: the result ``lr`` would give (``None``: diverged)."""

    def fake(experiment, model, *, overrides, name, **_):
        value = [o for o in overrides if o.startswith("lr=")][-1].partition("=")[2]
        calls.append((model, value, name))
        if scores[value] is None:
            raise runner.NonFiniteLossError("loss is nan", dict(status="nonfinite", run=name))
        return dict(status="done", run=name, eval=dict(accuracy=scores[value]))

    return fake


def test_best_is_the_highest_accuracy_and_a_diverged_value_never_wins(monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run_experiment", _fake_results({"1e-3": 0.5, "3e-3": 0.9, "1e-2": None,
                                                                  "3e-2": 0.9}, calls))
    sweep = run_sweep("boolean_icl", "attention", "lr=1e-3,3e-3,1e-2,3e-2", overrides=TINY, name="x")
    assert [c[2] for c in calls] == ["x-lr1e-3", "x-lr3e-3", "x-lr1e-2", "x-lr3e-2"]
    assert sweep["key"] == "lr" and sweep["best"] == 1  # highest; the tie goes to the first value
    assert sweep["scores"][2] != sweep["scores"][2]  # NaN for the diverged run
    text = runner.format_sweep(sweep)
    assert "best: lr=3e-3" in text and "nonfinite" in text and "final eval accuracy" in text


@pytest.mark.parametrize("spec, message", [
    ("nope=1,2", "unknown field"), ("lr=1e-3,fast", "cannot parse"), ("lr", "KEY=v1"), ("lr=", "KEY=v1"),
    ("lr=1e-3,,3e-3", "KEY=v1"), ("lr=1e-3,1e-3", "repeated"), ("steps=2", "also given with --set"),
    ("n_layers=2,3", "n_layers=3"),
])
def test_bad_sweeps_fail_before_any_training(spec, message, tmp_path, capsys):
    model = "attention" if not spec.startswith("n_layers") else "attention*2"
    overrides = [s for s in TINY if not (spec.startswith("n_layers") and s.startswith("n_layers"))]
    with pytest.raises(ValueError, match=message):
        parse_sweep("boolean_icl", model, spec, overrides=overrides)
    with pytest.raises(SystemExit):
        main(["boolean_icl", "--model", model, "--out", str(tmp_path), *[f"--set={s}" for s in overrides],
              "--sweep", spec])
    assert "--sweep" in capsys.readouterr().err and not (tmp_path / "boolean_icl").exists()


def test_suite_sweeps_every_model_and_checks_all_values_first(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(runner, "run_experiment", _fake_results({"1e-3": 0.6, "1e-2": 0.8}, calls))
    results, table = suite.run_suite("boolean_icl", ["attention", "gla"], TINY, str(tmp_path), verbose=False,
                                     sweep="lr=1e-3,1e-2")
    assert [(c[0], c[1]) for c in calls] == [("attention", "1e-3"), ("attention", "1e-2"), ("gla", "1e-3"),
                                             ("gla", "1e-2")]
    assert len(results) == 4 and capsys.readouterr().out.count("best: lr=1e-2") == 2
    calls.clear()
    with pytest.raises(ValueError, match="nope"):  # the second model's pattern is checked before the first trains
        suite.run_suite("boolean_icl", ["attention", "nope"], TINY, str(tmp_path), verbose=False, sweep="lr=1e-3,1e-2")
    assert calls == []


def test_boolean_icl_example_encoding_has_one_token_per_input_and_the_same_labels():
    """The ``encoding="example"`` layout (used by the suite) asks the same question at the
    same examples as the bit layout: the label of ``x_i`` given the earlier examples."""
    from experiments.configs import make_config
    from experiments.tasks import build_task
    from ssmjax.data import synthetic

    fields = dict(num_bits=3, num_examples=5, eval_batch_size=8, eval_batches=1)
    bits = build_task("boolean_icl", make_config("boolean_icl", overrides=dict(fields, encoding="bits")))
    packed = build_task("boolean_icl", make_config("boolean_icl", overrides=dict(fields, encoding="example")))
    assert (bits.vocab_size, packed.vocab_size) == (synthetic.BOOLEAN_VOCAB_SIZE, synthetic.BOOLEAN_VOCAB_SIZE + 8)
    b, p = bits.eval_set[0], packed.eval_set[0]
    assert p.inputs.shape == (8, 10) and (p.inputs < packed.vocab_size).all()
    assert (p.targets[p.mask] == b.targets[b.mask]).all() and (p.inputs[:, 1::2] == p.targets[:, ::2]).all()
    x, _ = synthetic.boolean_prompt_examples(b.inputs, 3)
    assert (p.inputs[:, ::2] == 4 + x[..., 0] + 2 * x[..., 1] + 4 * x[..., 2]).all()
    assert (packed.optimal == bits.optimal).all()
    with pytest.raises(ValueError, match="encoding"):
        build_task("boolean_icl", make_config("boolean_icl", overrides=dict(fields, encoding="bytes")))
