"""The training loop: the returned state, exact resume (stop / SIGINT / SIGTERM to a
subprocess / kill after logging), time-based checkpoints, bad batches caught before the
step, NaN handling, the evaluation hook (validation loss against a float64 oracle),
outputs on disk, and one train + eval step for a tiny model of every registered mixer."""

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
from ssmjax.data import Batch, induction_heads
from ssmjax.models import SequenceModel
from ssmjax.train import (
    TIMING_KEYS,
    BatchSpec,
    Checkpointer,
    NonFiniteLossError,
    Progress,
    TrainConfig,
    TrainResult,
    check_batch,
    make_optimizer,
    make_predict,
    make_train_step,
    masked_loss_and_accuracy,
    read_metrics,
    train,
)

VOCAB, MAGIC = 9, 8  # induction heads over tokens 0..7; token 8 only where a test injects it


class TinyTask:
    """Induction heads, 4 x 12 tokens; ``hooks[step]()`` runs when batch ``step`` is made;
    ``delay`` seconds of sleep per batch (to signal a subprocess mid-run)."""

    def __init__(self, hooks=None, delay=0.0):
        self.hooks, self.delay = hooks or {}, delay
        self.eval_batch = induction_heads(0, 0, batch_size=16, seq_len=12, vocab_size=8, stream=1)

    def train_batch(self, step):
        time.sleep(self.delay)
        if step in self.hooks:
            return self.hooks[step]()
        return induction_heads(0, step, batch_size=4, seq_len=12, vocab_size=8)

    def evaluate(self, model):
        b = self.eval_batch
        correct = (model(b.inputs) == b.targets)[b.mask]
        scores = model.loss([b])
        return dict(accuracy=float(correct.mean()), loss=scores["loss"], summary={"acc": float(correct.mean())})


def tiny_model(mixers="attention", n_layers=1):
    return SequenceModel(d_model=16, n_layers=n_layers, mixers=mixers, vocab_size=VOCAB)


CONFIG = TrainConfig(steps=8, lr=1e-2, warmup_steps=2, log_every=2, eval_every=4, checkpoint_every=4,
                     keep_checkpoints=3)


def final_params(run_dir, model=None, config=CONFIG):
    model = model or tiny_model()
    optimizer, _ = make_optimizer(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12), jnp.int32))
    like = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    checkpoints = Checkpointer(run_dir / "checkpoints")
    try:
        return checkpoints.restore(like), checkpoints.all_steps()
    finally:
        checkpoints.close()


def metric_rows(run_dir):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in read_metrics(run_dir / "metrics.jsonl")]


def assert_same_run(a, b, config=CONFIG):
    state_a, _ = final_params(a, config=config)
    state_b, _ = final_params(b, config=config)
    assert int(state_a["step"]) == int(state_b["step"]) == config.steps
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert metric_rows(a) == metric_rows(b)
    result_a, result_b = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert result_a["eval"] == result_b["eval"] and result_a["train_loss"] == result_b["train_loss"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """``(run_dir, TrainResult)`` of one uninterrupted run of CONFIG."""
    run_dir = tmp_path_factory.mktemp("straight")
    run = train(tiny_model(), TinyTask(), CONFIG, run_dir, verbose=False)
    assert isinstance(run, TrainResult) and run.results["status"] == "done" and run.step == CONFIG.steps
    return run_dir, run


@pytest.fixture(scope="module")
def straight_run(straight):
    return straight[0]


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
    first = train(tiny_model(), TinyTask(), CONFIG, tmp_path, stop_at=4, verbose=False).results
    assert first["status"] == "stopped" and first["step"] == 4
    with pytest.raises(FileExistsError, match="already has checkpoints"):
        train(tiny_model(), TinyTask(), CONFIG, tmp_path, verbose=False)
    second = train(tiny_model(), TinyTask(), CONFIG, tmp_path, resume=True, verbose=False).results
    assert second["status"] == "done"
    assert_same_run(straight_run, tmp_path)


def test_a_resumed_run_stopped_before_its_next_eval_reports_the_last_eval(straight_run, tmp_path):
    at_4 = train(tiny_model(), TinyTask(), CONFIG, tmp_path, stop_at=4, verbose=False).results["eval"]
    assert at_4["accuracy"] == [r for r in read_metrics(straight_run / "metrics.jsonl") if r["split"] == "eval"][0]["acc"]
    stopped = train(tiny_model(), TinyTask(), CONFIG, tmp_path, resume=True, stop_at=6, verbose=False).results
    assert stopped["status"] == "stopped" and stopped["eval"] == at_4


def test_an_eval_past_the_resumed_checkpoint_is_not_reported(straight_run, tmp_path):
    # A kill after step 8's evaluation but before its checkpoint: the resumed run redoes steps 5-8.
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    evals = json.loads((tmp_path / "evals.json").read_text())
    assert sorted(evals) == ["4", "8"]
    stopped = train(tiny_model(), TinyTask(), CONFIG, tmp_path, resume=True, stop_at=5, verbose=False).results
    assert stopped["status"] == "stopped" and stopped["eval"] == evals["4"]


def test_sigint_saves_and_resume_is_exact(straight_run, tmp_path):
    def interrupt_then_batch():
        os.kill(os.getpid(), signal.SIGINT)  # arrives while batch 5 is being made: update 6 completes
        return induction_heads(0, 5, batch_size=4, seq_len=12, vocab_size=8)

    previous = signal.getsignal(signal.SIGINT)
    result = train(tiny_model(), TinyTask({5: interrupt_then_batch}), CONFIG, tmp_path, verbose=False).results
    assert signal.getsignal(signal.SIGINT) is previous, "the handler is restored"
    assert result["status"] == "interrupted" and result["step"] == 6 and result["signal"] == "SIGINT"
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
    result = train(tiny_model(), TinyTask(), CONFIG, tmp_path, resume=True, verbose=False).results
    assert result["status"] == "done" and result["step"] == CONFIG.steps
    assert_same_run(straight_run, tmp_path)  # one eval row at the last step, not two


def test_train_returns_the_final_state_and_the_eval_loss_matches_a_float64_oracle(straight):
    run_dir, run = straight
    saved, _ = final_params(run_dir)
    assert run.step == int(saved["step"]) == CONFIG.steps
    returned, on_disk = (run.params, run.opt_state), (saved["params"], saved["opt_state"])
    for x, y in zip(jax.tree.leaves(returned), jax.tree.leaves(on_disk), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert run.results == json.loads((run_dir / "result.json").read_text()) and run.results["batch_size"] == 4
    b = TinyTask().eval_batch  # oracle: log-softmax in float64 of the returned parameters' logits
    logits = np.asarray(tiny_model().apply(run.params, jnp.asarray(b.inputs)), np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    xent = -np.take_along_axis(log_p, b.targets[..., None], -1)[..., 0]
    assert run.results["eval"]["loss"] == pytest.approx(xent[b.mask].mean(), rel=1e-5)


SIGNAL_CONFIG = TrainConfig(steps=40, lr=1e-2, warmup_steps=2, log_every=1, eval_every=10, checkpoint_every=1000,
                            checkpoint_every_minutes=0.0, keep_checkpoints=2)


def run_for_a_signal(run_dir: str) -> None:
    """The subprocess of the SIGTERM test: 0.1 s per batch, so the signal lands mid-run."""
    train(tiny_model(), TinyTask(delay=0.1), SIGNAL_CONFIG, run_dir, verbose=False)


def test_sigterm_to_a_subprocess_saves_and_resume_is_exact(tmp_path, capsys):
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "signalled"
    train(tiny_model(), TinyTask(), SIGNAL_CONFIG, straight_dir, verbose=False)
    code = ("import sys, tests.conftest; from tests.train.test_train import run_for_a_signal; "  # conftest: x64 as here
            "run_for_a_signal(sys.argv[1])")
    process = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 300
    while max((r["step"] for r in read_metrics(run_dir / "metrics.jsonl")), default=0) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "the subprocess ended before the signal"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, "SIGTERM: a clean exit"
    result = json.loads((run_dir / "result.json").read_text())
    stopped = result["step"]
    assert result["status"] == "interrupted" and result["signal"] == "SIGTERM" and 3 <= stopped < SIGNAL_CONFIG.steps
    assert final_params(run_dir, config=SIGNAL_CONFIG)[1] == [stopped], "a checkpoint at the interrupted step"
    capsys.readouterr()
    train(tiny_model(), TinyTask(), SIGNAL_CONFIG, run_dir, resume=True)
    assert f"resumed from step {stopped} of 40: {run_dir.absolute() / 'checkpoints' / str(stopped)}" in \
        capsys.readouterr().out
    assert_same_run(straight_dir, run_dir, SIGNAL_CONFIG)


def test_checkpoints_every_n_minutes(tmp_path):
    config = TrainConfig(**{**CONFIG.__dict__, "checkpoint_every": 1000, "checkpoint_every_minutes": 1e-9})
    train(tiny_model(), TinyTask(), config, tmp_path, verbose=False)
    assert final_params(tmp_path)[1] == [6, 7, 8]  # every step (keep_checkpoints=3), not only the last


def test_a_bad_token_id_raises_before_its_step(tmp_path):
    def bad_token():
        batch = induction_heads(0, 2, batch_size=4, seq_len=12, vocab_size=8)
        batch.inputs[1, 3] = VOCAB
        return batch

    with pytest.raises(ValueError, match=r"task.train_batch\(2\): batch.inputs: token ids must lie in \[0, 9\), got "
                       r"values in \[0, 9\]; first offending value 9 at index \(1, 3\)"):
        train(tiny_model(), TinyTask({2: bad_token}), CONFIG, tmp_path, verbose=False)
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) == 2


def test_a_bad_target_raises_before_the_first_step(tmp_path):
    def bad_target():
        batch = induction_heads(0, 0, batch_size=4, seq_len=12, vocab_size=8)
        batch.targets[2, 11] = 12
        return batch

    with pytest.raises(ValueError, match=r"batch.targets: class ids \(where mask is True\) must lie in \[0, 9\).* "
                       r"12 at index \(2, 11\)"):
        train(tiny_model(), TinyTask({0: bad_target}), CONFIG, tmp_path, verbose=False)


B, T, D = 2, 3, 4
TOKENS = np.zeros((B, T), np.int32)
FEATURES = np.zeros((B, T, D), np.float32)
LABELS, MASK = np.zeros((B, T), np.int32), np.ones((B, T), bool)
TOKEN_SPEC = BatchSpec(vocab_size=9, num_classes=5, float_inputs=False)
FEATURE_SPEC = BatchSpec(vocab_size=None, num_classes=5, float_inputs=True)


def _with(array, index, value):
    array = array.copy()
    array[index] = value
    return array


@pytest.mark.parametrize("batch, spec, message", [
    (Batch(_with(FEATURES, (0, 1, 2), np.nan), LABELS, MASK), FEATURE_SPEC,
     r"batch.inputs: expected finite floats, got 1 NaN/inf values; first nan at index \(0, 1, 2\)"),
    (Batch(_with(FEATURES, (1, 0, 0), -np.inf), LABELS, MASK), FEATURE_SPEC, r"first -inf at index \(1, 0, 0\)"),
    (Batch(_with(TOKENS, (0, 2), -1), LABELS, MASK), TOKEN_SPEC,
     r"batch.inputs: token ids must lie in \[0, 9\), got values in \[-1, 0\]"),
    (Batch(TOKENS, LABELS, MASK), FEATURE_SPEC, "batch.inputs: expected float features"),
    (Batch(FEATURES, LABELS, MASK), TOKEN_SPEC, "batch.inputs: expected int token ids"),
    (Batch(TOKENS.astype(bool), LABELS, MASK), TOKEN_SPEC, "batch.inputs: expected int token ids or float features"),
    (Batch(TOKENS, LABELS.astype(np.float32), MASK), TOKEN_SPEC,
     "batch.targets: expected int class ids, got dtype float32"),
    (Batch(TOKENS, LABELS, MASK.astype(np.float32)), TOKEN_SPEC, "batch.mask: expected bool"),
    (Batch(TOKENS, _with(LABELS, (1, 1), 5), MASK), TOKEN_SPEC,
     r"batch.targets: class ids \(where mask is True\) must lie in \[0, 5\).* 5 at index \(1, 1\)"),
    (Batch(TOKENS, LABELS, MASK[:, :2]), TOKEN_SPEC, r"targets \(2, 3\), mask \(2, 2\)"),
    (Batch(TOKENS[0], LABELS[0], MASK[0]), TOKEN_SPEC, r"batch.inputs: expected \[batch, time\]"),
    ((TOKENS, LABELS), TOKEN_SPEC, r"expected a Batch\(inputs, targets, mask\), got tuple"),
])
def test_check_batch_names_the_field_and_the_offending_value(batch, spec, message):
    with pytest.raises(ValueError, match="where: " + message if message.startswith("batch.") else message):
        check_batch(batch, spec, "where")


def test_check_batch_accepts_valid_batches_and_ignores_masked_off_targets():
    check_batch(Batch(FEATURES, LABELS, MASK), FEATURE_SPEC)
    check_batch(Batch(FEATURES, LABELS[:, 0], MASK[:, 0]), FEATURE_SPEC)  # one label per sequence
    check_batch(Batch(_with(TOKENS, (0, 0), 8), _with(LABELS, (0, 0), -100), _with(MASK, (0, 0), False)), TOKEN_SPEC)


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
    with pytest.raises(NonFiniteLossError, match="step 1 .*no checkpoint had been written") as error:
        train(tiny_model(), TinyTask(), config, tmp_path, verbose=False)
    message = str(error.value)  # causes in library terms; the CLI adds its flags itself
    assert "TrainConfig.lr" in message and "grad_clip" in message and "resume=True" in message
    assert "--set" not in message and "--resume" not in message
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
    ignored = jnp.where(mask, targets, -100)  # targets where mask is False are never looked up
    assert masked_loss_and_accuracy(logits, ignored, mask) == (loss, accuracy)


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


def test_learning_curves_leave_pyplot_alone(tmp_path):
    """The figure is a bare Figure: importing the module and plotting neither switches
    pyplot's backend (a notebook's inline one, say) nor leaves a pyplot figure open."""
    import importlib

    import matplotlib
    import matplotlib.pyplot as plt

    import ssmjax.train.plots

    backend = matplotlib.get_backend()
    try:
        matplotlib.use("svg")
        plots = importlib.reload(ssmjax.train.plots)
        rows = [dict(split="train", step=s, loss=1.0 / s, accuracy=0.1 * s) for s in range(1, 5)]
        path = plots.plot_learning_curves(rows + [dict(split="eval", step=4, loss=0.3, accuracy=0.5)],
                                          tmp_path / "c.png", "t")
        assert matplotlib.get_backend() == "svg" and not plt.get_fignums()
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(backend)
