"""``lm-depth`` end to end on a tiny looped-transformer run (two training steps): every mode
writes a row, the parallel sampler at the full budget agrees exactly with the fixed
reference, and a run that is not a one-layer universal_transformer is refused clearly."""

import json

import pytest

from experiments.__main__ import main

TEXT = "ROMEO:\nthe cat sat on the mat.\nJULIET:\nthe dog sat on the log.\n" * 40
TINY = ["d_model=16", "batch_size=4", "seq_len=16", "eval_batch_size=8", "eval_windows=8", "log_every=5",
        "warmup_steps=2", "checkpoint_every=20", "eval_every=100", "steps=2"]
UT = ("{'universal_transformer': {'halting': 'sampled', 'max_steps': 4, 'mean_steps': 2.0, 'num_heads': 2, "
      "'max_len': 32}}")


def train(root, model, *extra):
    args = ["lm", "--model", model, "--set", f"data_dir={root}", "--set", "data_file=tiny.txt",
            "--out", str(root / "runs"), "--quiet"]
    for item in TINY + list(extra):
        args += ["--set", item]
    assert main(args) == 0
    return root / "runs" / "lm" / model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_depth")
    (root / "tiny.txt").write_text(TEXT, encoding="utf-8")
    return root


@pytest.mark.slow  # ~35 s: trains and samples every mode; the samplers' exactness is tests/models/test_depth_sampling.py
def test_lm_depth_writes_every_mode(root, capsys):
    run_dir = train(root, "universal_transformer", "n_layers=1", f"mixer_fields={UT}")
    assert main(["lm-depth", "--run", str(run_dir), "--prompts", "2", "--prompt-len", "6", "--tokens", "5",
                 "--temperatures", "1", "--thresholds", "1e-2"]) == 0
    result = json.loads((run_dir / "depth_sampling.json").read_text())
    rows = {(r["temperature"], r["mode"]): r for r in result["rows"]}
    names = ["fixed r=4", "fixed r=2", "fixed r=1", "adaptive kl<0.01", "parallel r=4", "parallel r=4 kl<0.01",
             "parallel r=2"]
    assert sorted(rows) == sorted((1.0, n) for n in names)
    for t in (1.0,):
        assert rows[t, "fixed r=4"]["agreement"] == 1.0 and rows[t, "parallel r=4"]["agreement"] == 1.0
        assert rows[t, "parallel r=4"]["nll"] == pytest.approx(rows[t, "fixed r=4"]["nll"])
        assert rows[t, "fixed r=2"]["depth"] == 2 and rows[t, "fixed r=4"]["passes_per_token"] == 1
        assert all(r["tokens_per_s"] > 0 and r["nll"] > 0 for r in rows.values())
    table = (run_dir / "depth_sampling.md").read_text()
    assert "| 1 | parallel r=4 | 1.000 |" in table and table in capsys.readouterr().out


def test_modes_follow_the_layer():
    """A Think-at-Hard layer gets the one mode 'think'; any other layer the three samplers."""
    import ssmjax.layers
    from experiments.lm_depth import modes

    def layer(**fields):
        return ssmjax.layers.get("universal_transformer", d_model=16, halting="fixed", max_steps=4, **fields)

    assert modes(layer(think_at_hard_tokens=True), [1e-2]) == [("think", dict(mode="think"))]
    names = [name for name, _ in modes(layer(), [1e-2])]
    assert names == ["fixed r=4", "fixed r=2", "fixed r=1", "adaptive kl<0.01", "parallel r=4",
                     "parallel r=4 kl<0.01", "parallel r=2"]


def test_lm_depth_refuses_other_models(root, capsys):
    run_dir = train(root, "attention", "n_layers=1")
    with pytest.raises(SystemExit) as exit_info:
        main(["lm-depth", "--run", str(run_dir)])
    assert exit_info.value.code == 2
    assert "is not a looped-transformer run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["lm-depth", "--run", str(root / "nope")])
    assert "not a run directory" in capsys.readouterr().err
