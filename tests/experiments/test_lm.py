"""The ``lm`` experiment end to end on a tiny text file (``--set data_dir``), and
``lm-sample``: deterministic for a fixed seed, clear errors for a bad run directory or a
prompt outside the vocabulary."""

import json

import pytest

from experiments.__main__ import main
from experiments.configs import SIZES, make_config
from experiments.tasks import LMTask

TEXT = "ROMEO:\nthe cat sat on the mat.\nJULIET:\nthe dog sat on the log.\n" * 40
TINY = ["d_model=16", "n_layers=1", "batch_size=4", "seq_len=16", "eval_batch_size=8", "eval_windows=8",
        "log_every=5", "warmup_steps=2", "checkpoint_every=20", "eval_every=100"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    (root / "tiny.txt").write_text(TEXT, encoding="utf-8")
    args = ["lm", "--model", "attention", "--set", "steps=20", "--set", f"data_dir={root}",
            "--set", "data_file=tiny.txt", "--out", str(root / "runs"), "--quiet"]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    return root, root / "runs" / "lm" / "attention"


def test_lm_config_is_nanogpt_baby_gpt():
    cpu, paper = SIZES["lm"]["cpu"], SIZES["lm"]["paper"]
    assert (cpu.n_layers, cpu.d_model, cpu.seq_len, cpu.batch_size, cpu.steps) == (4, 128, 64, 12, 2000)
    assert (cpu.lr, cpu.lr * cpu.final_lr_ratio, cpu.warmup_steps, cpu.beta2) == (1e-3, 1e-4, 100, 0.99)
    assert (paper.n_layers, paper.d_model, paper.seq_len, paper.batch_size, paper.steps) == (6, 384, 256, 64, 5000)
    assert paper.mixer_fields["attention"]["num_heads"] == 6


def test_lm_writes_val_loss_and_bpc(lm_run):
    _, run_dir = lm_run
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "done" and result["step"] == 20
    scores = result["eval"]
    assert scores["val_loss"] == pytest.approx(scores["loss"]) and 0 < scores["val_loss"] < 5
    assert scores["bpc"] == pytest.approx(scores["val_loss"] / 0.6931471805599453)
    assert scores["val_tokens"] == 8 * 16


def test_missing_data_file_names_the_path_and_the_fix(tmp_path):
    config = make_config("lm", overrides=dict(data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=rf"{tmp_path}/tinyshakespeare.txt not found.*--set data_dir=DIR.*SSMJAX_DATA"):
        LMTask(config)


def test_lm_sample_is_deterministic_for_a_seed(lm_run, capsys):
    _, run_dir = lm_run
    outputs = []
    for seed in (3, 3, 4):
        assert main(["lm-sample", "--run", str(run_dir), "--prompt", "ROMEO:", "--tokens", "24", "--seed",
                     str(seed)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("ROMEO:") and len(outputs[0]) == 6 + 24 + 1
    assert outputs[2] != outputs[0]
    assert set(outputs[0]) <= set(TEXT) | {"\n"}


def test_lm_sample_errors_are_clear(lm_run, tmp_path, capsys):
    _, run_dir = lm_run
    cases = [(["--run", str(tmp_path / "nope")], "not a run directory"),
             (["--run", str(run_dir), "--prompt", "ROMEO@#"], r"2 character\(s\) outside the run's vocabulary"),
             (["--run", str(run_dir), "--tokens", "0"], "--tokens: expected >= 1")]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["lm-sample", *args])
        assert exit_info.value.code == 2
        assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "") or \
            pytest.fail(f"{args}: expected {message!r}")


def test_decode_state_bytes_of_attention_is_its_kv_cache():
    """lm_bench's state size: attention at context n holds k and v (n x d_model float32
    each) per layer plus an int32 position: 2 n d 4 + 4 bytes per layer."""
    import jax
    import jax.numpy as jnp

    from experiments.lm_bench import state_bytes
    from experiments.lm_sample import with_context
    from experiments.runner import build_model

    config = make_config("lm", overrides=dict(d_model=16, n_layers=2, seq_len=8))
    model = build_model(with_context(config, 8), 5)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert state_bytes(model, params) == 2 * (2 * 8 * 16 * 4 + 4)


def test_copy_probe_scores_a_perfect_copier_exactly():
    """A fake LM that, from position L on, puts logit 10 on the token L - 1 back (the answer
    of an exact repeat) and logit 10 on token 0 before: copy accuracy 1 and the loss of
    ``log_softmax([10, 0, ..])``; the first copy is right only where the target is 0."""
    import types

    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.lm_bench import copy_probe, repeated_passages

    vocab, length = 5, 6
    tokens = np.random.default_rng(0).integers(0, vocab, 400)
    rows = repeated_passages(tokens, length, count=20, seed=1)
    assert rows.shape == (20, 2 * length) and (rows[:, :length] == rows[:, length:]).all()

    def apply(params, x):
        guess = jnp.concatenate([jnp.zeros_like(x[:, :length]), x[:, 1:length + 1]], axis=1)
        return 10.0 * jax.nn.one_hot(guess, vocab)

    scores = copy_probe(types.SimpleNamespace(apply=apply), None, rows, batch_size=7)
    right = 10.0 - np.log(np.exp(10.0) + vocab - 1)
    wrong = -np.log(np.exp(10.0) + vocab - 1)
    first_hits = (rows[:, 1:length] == 0).mean()
    f32 = dict(abs=1e-6)  # the probe's log-softmax is float32 (logits near 10: ulp ~1e-6)
    assert scores["copy_acc"] == 1.0 and scores["copy_loss"] == pytest.approx(-right, **f32)
    assert scores["first_acc"] == pytest.approx(first_hits)
    assert scores["first_loss"] == pytest.approx(-(first_hits * right + (1 - first_hits) * wrong), **f32)


def test_hybrid_ratio_table_pivots_family_by_ratio():
    from experiments.lm_bench import hybrid_markdown, hybrid_ratio
    from ssmjax.models.backbone import parse_mixers

    assert hybrid_ratio(parse_mixers("gla*7,attention", 8)) == ("gla", "7:1")
    assert hybrid_ratio(parse_mixers("gla*3,attention", 8)) == ("gla", "3:1")
    assert hybrid_ratio(parse_mixers("gla,attention", 8)) == ("gla", "1:1")
    assert hybrid_ratio(parse_mixers("gla", 8)) == ("gla", "all linear")
    assert hybrid_ratio(parse_mixers("attention", 8)) == ("attention", "all attention")
    with pytest.raises(ValueError, match="one linear family"):
        hybrid_ratio(["gla", "mamba2", "attention"])
    rows = [dict(mixers=list(parse_mixers(m, 8)), val_loss=v, copy_acc=c) for m, v, c in
            [("attention", 1.5, 0.9), ("gla", 1.7, 0.2), ("gla*3,attention", 1.6, 0.8), ("mlstm", 1.8, None)]]
    lines = hybrid_markdown(rows).splitlines()
    assert lines[0] == "| family | all linear | 3:1 | all attention |"
    assert lines[2] == "| gla | 1.700 / 0.20 | 1.600 / 0.80 | 1.500 / 0.90 |"
    assert lines[3] == "| mlstm | 1.800 / - | - | 1.500 / 0.90 |"
