"""The training loop: exact resume (stop / SIGINT / kill after logging), NaN handling,
outputs on disk, and one train + eval step for a tiny model of every registered mixer."""

import io
import json
import math
import os
import shutil
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
from ssmjax.data import induction_heads
from ssmjax.models import SequenceModel
from ssmjax.train import (
    TIMING_KEYS,
    Checkpointer,
    NonFiniteLossError,
    Progress,
    TrainConfig,
    make_optimizer,
    make_predict,
    make_train_step,
    masked_loss_and_accuracy,
    read_metrics,
    train,
)

VOCAB, MAGIC = 9, 8  # induction heads over tokens 0..7; token 8 only where a test injects it


class TinyTask:
    """Induction heads, 4 x 12 tokens; ``hooks[step]()`` runs when batch ``step`` is made."""

    def __init__(self, hooks=None):
        self.hooks = hooks or {}
        self.eval_batch = induction_heads(0, 0, batch_size=16, seq_len=12, vocab_size=8, stream=1)

    def train_batch(self, step):
        if step in self.hooks:
            return self.hooks[step]()
        return induction_heads(0, step, batch_size=4, seq_len=12, vocab_size=8)

    def evaluate(self, predict):
        b = self.eval_batch
        correct = (predict(b.inputs) == b.targets)[b.mask]
        return dict(accuracy=float(correct.mean()), summary={"acc": float(correct.mean())})


def tiny_model(mixers="attention", n_layers=1):
    return SequenceModel(d_model=16, n_layers=n_layers, mixers=mixers, vocab_size=VOCAB)


CONFIG = TrainConfig(steps=8, batch_size=4, lr=1e-2, warmup_steps=2, log_every=2, eval_every=4, checkpoint_every=4,
                     keep_checkpoints=3)


def final_params(run_dir, model=None):
    model = model or tiny_model()
    optimizer, _ = make_optimizer(CONFIG)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12), jnp.int32))
    like = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    checkpoints = Checkpointer(run_dir / "checkpoints")
    try:
        return checkpoints.restore(like), checkpoints.all_steps()
    finally:
        checkpoints.close()


def metric_rows(run_dir):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in read_metrics(run_dir / "metrics.jsonl")]


def assert_same_run(a, b):
    state_a, _ = final_params(a)
    state_b, _ = final_params(b)
    assert int(state_a["step"]) == int(state_b["step"]) == CONFIG.steps
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert metric_rows(a) == metric_rows(b)
    result_a, result_b = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert result_a["eval"] == result_b["eval"] and result_a["train_loss"] == result_b["train_loss"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    result = train(tiny_model(), TinyTask(), CONFIG, run_dir, verbose=False)
    assert result["status"] == "done" and result["step"] == CONFIG.steps
    return run_dir


def test_outputs_on_disk(straight_run):
    for name in ("metrics.jsonl", "result.json", "learning_curves.png"):
        assert (straight_run / name).stat().st_size > 0
    rows = read_metrics(straight_run / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, CONFIG.steps + 1))
    assert [r["step"] for r in rows if r["split"] == "eval"] == [4, 8]
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    assert [("tokens_per_s" in r) for r in train_rows] == [s % 2 == 0 for s in range(1, 9)]
    assert train_rows[0]["lr"] == 0.0 and train_rows[2]["lr"] == pytest.approx(CONFIG.lr)
    result = json.loads((straight_run / "result.json").read_text())
    assert result["eval"]["summary"]["acc"] == rows[-1]["acc"]
    _, steps = final_params(straight_run)
    assert steps == [4, 8]


def test_stop_then_resume_equals_one_run(straight_run, tmp_path):
    first = train(tiny_model(), TinyTask(), CONFIG, tmp_path, stop_at=4, verbose=False)
    assert first["status"] == "stopped" and first["step"] == 4
    with pytest.raises(FileExistsError, match="already has checkpoints"):
        train(tiny_model(), TinyTask(), CONFIG, tmp_path, verbose=False)
    second = train(tiny_model(), TinyTask(), CONFIG, tmp_path, resume=True, verbose=False)
    assert second["status"] == "done"
    assert_same_run(straight_run, tmp_path)


def test_sigint_saves_and_resume_is_exact(straight_run, tmp_path):
    def interrupt_then_batch():
        os.kill(os.getpid(), signal.SIGINT)  # arrives while batch 5 is being made: update 6 completes
        return induction_heads(0, 5, batch_size=4, seq_len=12, vocab_size=8)

    previous = signal.getsignal(signal.SIGINT)
    result = train(tiny_model(), TinyTask({5: interrupt_then_batch}), CONFIG, tmp_path, verbose=False)
    assert signal.getsignal(signal.SIGINT) is previous, "the handler is restored"
    assert result["status"] == "interrupted" and result["step"] == 6
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "interrupted"
    assert final_params(tmp_path)[1] == [4, 6]
    train(tiny_model(), TinyTask(), CONFIG, tmp_path, resume=True, verbose=False)
    assert_same_run(straight_run, tmp_path)


def test_resume_after_a_kill_drops_metrics_past_the_checkpoint(straight_run, tmp_path):
    # A kill after step 8 was logged but before its checkpoint: the newest checkpoint is 4.
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(dict(split="train", step=9, loss=123.0, accuracy=0.0)) + "\n")
    train(tiny_model(), TinyTask(), CONFIG, tmp_path, resume=True, verbose=False)
    assert_same_run(straight_run, tmp_path)


def test_resuming_a_finished_run_changes_nothing(straight_run, tmp_path):
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    result = train(tiny_model(), TinyTask(), CONFIG, tmp_path, resume=True, verbose=False)
    assert result["status"] == "done" and result["step"] == CONFIG.steps
    assert_same_run(straight_run, tmp_path)  # one eval row at the last step, not two


class NaNWhenMagic(nn.Module):
    """The tiny model, whose logits turn NaN when the batch contains the MAGIC token."""

    @nn.compact
    def __call__(self, tokens):
        logits = tiny_model()(tokens)
        return jnp.where(jnp.any(tokens == MAGIC), jnp.nan, logits)


def test_nan_stops_and_keeps_the_last_good_checkpoint(straight_run, tmp_path):
    def poisoned():
        batch = induction_heads(0, 6, batch_size=4, seq_len=12, vocab_size=8)
        batch.inputs[0, 0] = MAGIC
        return batch

    config = TrainConfig(**{**CONFIG.__dict__, "checkpoint_every": 3})
    with pytest.raises(NonFiniteLossError, match=r"step 7 .*last good checkpoint: step 6"):
        train(NaNWhenMagic(), TinyTask({6: poisoned}), config, tmp_path, verbose=False)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "nonfinite" and result["step"] == 6
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) == 6
    state, steps = final_params(tmp_path, NaNWhenMagic())
    assert steps == [3, 6] and int(state["step"]) == 6
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state["params"]))


def test_nan_learning_rate_stops_before_any_update(tmp_path):
    config = TrainConfig(**{**CONFIG.__dict__, "lr": float("nan")})
    with pytest.raises(NonFiniteLossError, match="step 1 .*no checkpoint had been written"):
        train(tiny_model(), TinyTask(), config, tmp_path, verbose=False)
    assert not list((tmp_path / "checkpoints").iterdir())
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "nonfinite"


def test_schedule_and_masked_loss():
    config = TrainConfig(steps=100, lr=2e-3, warmup_steps=10, final_lr_ratio=0.1)
    _, schedule = make_optimizer(config)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(2e-3)
    assert float(schedule(100)) == pytest.approx(2e-4) and float(schedule(55)) < 2e-3
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))
    targets = jnp.array([[1, 2, 3], [0, 4, 4]])
    mask = jnp.array([[True, False, True], [False, False, True]])
    loss, accuracy = masked_loss_and_accuracy(logits, targets, mask)
    xent = -jax.nn.log_softmax(logits)[jnp.arange(2)[:, None], jnp.arange(3), targets]
    np.testing.assert_allclose(loss, (xent[0, 0] + xent[0, 2] + xent[1, 2]) / 3, rtol=1e-6)
    hits = jnp.argmax(logits, -1) == targets
    assert float(accuracy) == pytest.approx(float(hits[0, 0] + hits[0, 2] + hits[1, 2]) / 3)


def test_progress_lines():
    stream = io.StringIO()
    progress = Progress(steps=5, every=2, title="t", stream=stream)
    rates = [progress.update(s, 1.0, 0.5, 100) for s in range(1, 6)]
    assert [r is not None for r in rates] == [False, True, False, True, True]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("t step 2/5  loss 1.0000  acc 0.500") and "tok/s" in lines[0]


def check_one_train_and_eval_step(mixers: str, n_layers: int):
    model = tiny_model(mixers, n_layers)
    batch = jax.tree.map(jnp.asarray, induction_heads(0, 0, batch_size=2, seq_len=12, vocab_size=8))
    optimizer, _ = make_optimizer(TrainConfig(steps=2, lr=1e-3, warmup_steps=0))
    train_step, predict = make_train_step(model, optimizer), make_predict(model)

    @jax.jit  # one compilation for init, the train step and the eval step (compiling dominates on CPU)
    def init_train_predict(key):
        params = model.init(key, batch.inputs)
        state = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
        new_state, metrics = train_step(state, batch.inputs, batch.targets, batch.mask, jax.random.PRNGKey(1))
        return params, new_state, metrics, predict(new_state["params"], batch.inputs)

    params, new_state, metrics, predictions = init_train_predict(jax.random.PRNGKey(0))
    assert bool(metrics["finite"]) and float(metrics["loss"]) > 0 and int(new_state["step"]) == 1
    for i, name in enumerate(mixers.split(",")):  # every layer's parameters moved
        before, after = (p["params"]["group_0"][f"block_{i}"] for p in (params, new_state["params"]))
        changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
        assert any(changed), f"{name}: no parameter changed"
    assert predictions.shape == batch.inputs.shape and jnp.issubdtype(predictions.dtype, jnp.integer)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(new_state["params"]))


def test_one_train_and_eval_step_for_a_hybrid():
    check_one_train_and_eval_step("attention,attention", 2)


@pytest.mark.slow  # ~5 s of compilation per mixer on 2 CPU cores
@pytest.mark.parametrize("mixer", ssmjax.layers.names())
def test_one_train_and_eval_step_for_every_mixer(mixer):
    check_one_train_and_eval_step(mixer, 1)
