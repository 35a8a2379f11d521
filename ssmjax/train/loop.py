"""The training loop: optax AdamW with warmup + cosine decay and gradient clipping,
jit-compiled train/eval steps, explicit PRNG keys, orbax checkpoints, JSON-lines metrics.

Determinism and resume. Batch ``i`` (0-based) is ``task.train_batch(i)``, a pure
function of the step, and the PRNG key of update ``i`` is ``fold_in(key, i)``; the
checkpoint holds ``{params, opt_state, step}``, so the data iterator state is the step
number and ``train(..., resume=True)`` continues with the same batches, keys and numbers
as an uninterrupted run. Metrics rows past the restored step (written after the last
checkpoint by a killed run) are dropped on resume.

Failure handling. A step whose loss, gradient norm or updated parameters are not finite
is not applied: the run stops with :class:`NonFiniteLossError` (``result.json`` says
``"status": "nonfinite"``) and the newest checkpoint on disk is the last good one.
``SIGINT`` (Ctrl-C) finishes the current step, saves a checkpoint and returns with
``"status": "interrupted"``; a second ``SIGINT`` aborts immediately.

Outputs in ``run_dir``: ``config.json`` (written by the caller), ``metrics.jsonl``,
``checkpoints/<step>/``, ``result.json`` and ``learning_curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssmjax.data import Batch
from ssmjax.train.checkpoint import Checkpointer
from ssmjax.train.metrics import MetricsLog, Progress

TIMING_KEYS = ("elapsed_s", "tokens_per_s")  # metrics fields that differ between identical runs


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings shared by every experiment."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1  # cosine decays to lr * final_lr_ratio at the last step
    weight_decay: float = 0.1  # AdamW, on matrices only (not on norms, biases, 1-d params)
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    seed: int = 0
    log_every: int = 25
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2


@runtime_checkable
class Task(Protocol):
    """What the loop needs from an experiment."""

    def train_batch(self, step: int) -> Batch: ...

    def evaluate(self, predict: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
        """Score ``predict`` (int inputs ``[b, t]`` -> argmax tokens ``[b, t]``); the dict
        must contain ``"accuracy"``; other scalar entries are logged, the rest kept in
        ``result.json``."""
        ...


class NonFiniteLossError(RuntimeError):
    """The loss (or gradients, or updated parameters) became NaN/inf; training stopped.
    ``result`` is the run's ``result.json`` content (``"status": "nonfinite"``)."""

    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.result = result or {}


def make_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (Loshchilov & Hutter, 2019) with linear warmup then cosine decay, after
    global-norm gradient clipping; weight decay on parameters with ``ndim >= 2``."""
    warmup = max(0, min(config.warmup_steps, config.steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, warmup, max(config.steps, warmup + 1), config.lr * config.final_lr_ratio)
    adamw = optax.adamw(schedule, config.beta1, config.beta2, weight_decay=config.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule


def masked_loss_and_accuracy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and argmax accuracy over the positions where ``mask`` is set."""
    logits = logits.astype(jnp.float32)
    weights = mask.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(xent * weights) / count, jnp.sum(correct * weights) / count


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation) -> Callable:
    """``(state, inputs, targets, mask, key) -> (new_state, metrics)``, jit-compiled."""

    def loss_fn(params, inputs, targets, mask, key):
        logits = model.apply(params, inputs, rngs={"dropout": key})
        return masked_loss_and_accuracy(logits, targets, mask)

    @jax.jit
    def train_step(state, inputs, targets, mask, key):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], inputs, targets, mask, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
        new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1)
        return new_state, dict(loss=loss, accuracy=accuracy, grad_norm=grad_norm, finite=finite)

    return train_step


def make_predict(model: nn.Module) -> Callable:
    """``(params, inputs [b, t]) -> argmax tokens [b, t]``, jit-compiled."""
    return jax.jit(lambda params, inputs: jnp.argmax(model.apply(params, inputs), -1))


def count_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


class _InterruptFlag:
    """SIGINT sets the flag (the loop saves and stops); a second SIGINT raises at once."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        print("\ninterrupt: finishing this step, saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def _nonfinite_message(step: int, metrics: Mapping[str, Any], checkpoints: Checkpointer) -> str:
    last = checkpoints.latest_step()
    kept = (f"last good checkpoint: step {last} in {checkpoints.directory}" if last is not None
            else "no checkpoint had been written yet")
    return (f"non-finite loss/gradients at step {step} (loss {float(metrics['loss'])}, grad norm "
            f"{float(metrics['grad_norm'])}); the update was not applied and training stopped; {kept}. "
            "Lower the learning rate (--set lr=...) and --resume, or start again.")


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)


def train(model: nn.Module, task: Task, config: TrainConfig, run_dir: str | Path, *, resume: bool = False,
          stop_at: int | None = None, metadata: Mapping[str, Any] | None = None, title: str = "",
          verbose: bool = True) -> dict[str, Any]:
    """Train ``model`` on ``task`` for ``config.steps`` updates; returns the result dict
    (also written to ``run_dir/result.json``).

    ``resume``: continue from the newest checkpoint in ``run_dir`` (a fresh start if there
    is none); without it an existing checkpoint is an error. ``stop_at``: stop (and save)
    after that many updates as if interrupted, e.g. to split a run. ``metadata`` is copied
    into ``result.json``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer, schedule = make_optimizer(config)
    key = jax.random.PRNGKey(config.seed)
    init_key, step_key = jax.random.split(key)
    first = task.train_batch(0)
    params = jax.jit(model.init)(init_key, jnp.asarray(first.inputs))
    state = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    checkpoints = Checkpointer(run_dir / "checkpoints", keep=config.keep_checkpoints)
    log = MetricsLog(run_dir / "metrics.jsonl")
    try:
        if checkpoints.latest_step() is not None and not resume:
            raise FileExistsError(f"run_dir: {run_dir} already has checkpoints; resume it or choose another directory")
        if resume and checkpoints.latest_step() is not None:
            state = checkpoints.restore(state)
            restored = int(state["step"])
            log.truncate_after(restored, keep_eval=restored < config.steps)  # a finished run re-evaluates
        else:
            log.truncate_after(0)
        if not (run_dir / "config.json").exists():
            _write_json(run_dir / "config.json", _jsonable(dict(metadata or {}, config=dataclasses.asdict(config))))
        return _run(model, task, config, run_dir, state, optimizer, schedule, step_key, checkpoints, log,
                    stop_at=stop_at, metadata=dict(metadata or {}), title=title, verbose=verbose)
    finally:
        checkpoints.close()


def _run(model, task, config, run_dir, state, optimizer, schedule, step_key, checkpoints, log, *, stop_at,
         metadata, title, verbose) -> dict[str, Any]:
    train_step, predict = make_train_step(model, optimizer), make_predict(model)
    start = int(state["step"])
    end = config.steps if stop_at is None else min(config.steps, stop_at)
    progress = Progress(config.steps, config.log_every, title, enabled=verbose)
    elapsed0 = log.last_value("elapsed_s", 0.0)
    clock = time.perf_counter()
    status, message, saved_at = "running", "", start
    result_base = dict(metadata, params=count_params(state["params"]), steps=config.steps)

    def evaluate(params, step):
        scores = task.evaluate(lambda inputs: np.asarray(predict(params, jnp.asarray(inputs))))
        log.write(dict(split="eval", step=step, **{**_scalars(scores.get("summary", {})), **_scalars(scores)}))
        progress.eval(step, scores["accuracy"])
        return scores

    scores: dict[str, Any] = {}
    with _InterruptFlag() as interrupted:
        step = start
        while step < end:
            batch = task.train_batch(step)
            new_state, m = train_step(state, jnp.asarray(batch.inputs), jnp.asarray(batch.targets),
                                      jnp.asarray(batch.mask), jax.random.fold_in(step_key, step))
            if not bool(m["finite"]):
                status, message = "nonfinite", _nonfinite_message(step + 1, m, checkpoints)
                break
            state, step = new_state, step + 1
            loss, accuracy = float(m["loss"]), float(m["accuracy"])
            row = dict(split="train", step=step, loss=loss, accuracy=accuracy, grad_norm=float(m["grad_norm"]),
                       lr=float(schedule(step - 1)), elapsed_s=round(elapsed0 + time.perf_counter() - clock, 3))
            tokens_per_s = progress.update(step, loss, accuracy, batch.inputs.size)
            if tokens_per_s is not None:
                row["tokens_per_s"] = round(tokens_per_s, 1)
            log.write(row)
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoints.save(step, state)
                saved_at = step
            if step % config.eval_every == 0 and step < config.steps:
                scores = evaluate(state["params"], step)
            if interrupted.set:
                status, message = "interrupted", f"interrupted at step {step}; resume with --resume"
                break
        if status == "running" and step < config.steps:
            status, message = "stopped", f"stopped at step {step} of {config.steps}; resume with --resume"
    if status in ("interrupted", "stopped") and saved_at != step:
        checkpoints.save(step, state)
    if status == "running":
        status = "done"
        scores = evaluate(state["params"], step)
    progress.close()
    elapsed = elapsed0 + time.perf_counter() - clock
    result = dict(result_base, status=status, step=step, message=message, wall_s=round(elapsed, 2),
                  **log.summary(), eval=scores)
    _write_json(run_dir / "result.json", _jsonable(result))
    from ssmjax.train.plots import plot_learning_curves  # matplotlib only when writing outputs

    plot_learning_curves(log.rows(), run_dir / "learning_curves.png", title or run_dir.name)
    if status == "nonfinite":
        raise NonFiniteLossError(message, result)
    if message and verbose:
        print(message, flush=True)
    return result


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
