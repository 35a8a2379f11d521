"""The training loop: optax AdamW with warmup + cosine decay and gradient clipping,
jit-compiled train/eval steps, explicit PRNG keys, orbax checkpoints, JSON-lines metrics.

``train(model, task, config, run_dir)`` returns a :class:`TrainResult`: the final
``params``, ``opt_state`` and ``step`` and the ``results`` dict (``result.json``).

Determinism and resume. Batch ``i`` (0-based) is ``task.train_batch(i)``, a pure
function of the step, and the PRNG key of update ``i`` is ``fold_in(key, i)``; the
checkpoint holds ``{params, opt_state, step}``, so the data iterator state is the step
number and ``train(..., resume=True)`` continues with the same batches, keys and numbers
as an uninterrupted run. Metrics rows past the restored step (written after the last
checkpoint by a killed run) are dropped on resume.

Bad data. Every batch is validated on the host before its step
(:func:`ssmjax.train.checks.check_batch`): token ids outside ``[0, vocab_size)``, NaN/inf
float inputs, targets outside ``[0, num_classes)`` and wrong dtypes or shapes raise a
``ValueError`` naming the field and the offending value.

Failure handling. A step whose loss, gradient norm or updated parameters are not finite
is not applied: the run stops with :class:`NonFiniteLossError` (``result.json`` says
``"status": "nonfinite"``) and the newest checkpoint on disk is the last good one.

Preemption. ``SIGINT`` (Ctrl-C) and ``SIGTERM`` (what SLURM, Kubernetes and TPU
preemption send) finish the current step, save a checkpoint and return with
``"status": "interrupted"`` (``"signal"`` names it); a second signal aborts at once.
Checkpoints are written every ``checkpoint_every`` steps and every
``checkpoint_every_minutes`` of wall time, whichever comes first.

Outputs in ``run_dir``: ``config.json``, ``metrics.jsonl``, ``checkpoints/<step>/``,
``result.json``, ``evals.json`` (every evaluation in full: ``result.json`` reports the newest
even when a resumed run stops before evaluating again) and ``learning_curves.png``. In a multi-process job
(:func:`ssmjax.distributed.launch.initialize`) every process trains and checkpoints (orbax
coordinates them); process 0 alone writes the other files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssmjax.data import Batch
from ssmjax.train.checkpoint import Checkpointer
from ssmjax.train.checks import BatchSpec, check_batch, model_spec
from ssmjax.train.evaluation import Evaluator, Model, masked_loss_and_accuracy
from ssmjax.train.metrics import MetricsLog, Progress

TIMING_KEYS = ("elapsed_s", "tokens_per_s")  # metrics fields that differ between identical runs


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings. The batch size is not here: it is the
    task's (the number of rows ``task.train_batch(step)`` returns)."""

    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1  # cosine decays to lr * final_lr_ratio at the last step
    weight_decay: float = 0.1  # AdamW, on matrices only (not on norms, biases, 1-d params)
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    ssm_lr: float = 0.0  # > 0: the model's SSM parameters train at this peak lr without weight decay (S4/S5/LRU)
    seed: int = 0
    log_every: int = 25
    eval_every: int = 500
    checkpoint_every: int = 500
    checkpoint_every_minutes: float = 10.0  # also save after this much wall time since the last save; 0 disables
    keep_checkpoints: int = 2


@runtime_checkable
class Task(Protocol):
    """What the loop needs from your data: two methods (and optionally ``vocab_size``).

    ``train_batch(step) -> Batch``: the training batch of update ``step`` (0-based), a
    :class:`ssmjax.data.Batch` of NumPy arrays. It must be a pure function of ``step``
    (e.g. draw from ``np.random.default_rng([seed, step])``): that is what makes resume
    exact. The number of rows is the batch size. Fields:

    * ``inputs``: int32 token ids ``[b, t]`` in ``[0, vocab_size)`` (models with an
      embedding, ``SequenceModel(vocab_size=V)``), or float32 features ``[b, t, d]``,
      finite (models with an input projection, ``SequenceModel(vocab_size=None)``);
    * ``targets``: int32 class ids, ``[b, t]`` (one per position: language modelling,
      tagging; heads ``"lm"`` or ``"regress"`` with ``output_dim=C``) or ``[b]`` (one per
      sequence; head ``"classify"``), in ``[0, C)`` where ``C`` is the model's last
      output dimension (the vocabulary for a language model);
    * ``mask``: bool, the shape of ``targets``: where the loss and accuracy are taken
      (targets elsewhere are ignored).

    The loss is the masked mean cross-entropy (see :mod:`ssmjax.train.evaluation`).
    Batches are validated before each step; bad values raise ``ValueError``.

    ``evaluate(model) -> dict``: called every ``eval_every`` steps and at the end, with
    an :class:`~ssmjax.train.evaluation.Evaluator`: ``model(inputs)`` gives argmax
    predictions, ``model.logits(inputs)`` the outputs, ``model.loss(batches)`` the
    validation loss, perplexity and accuracy over a list of batches. The dict must
    contain ``"accuracy"``; other scalar entries (and those of an optional ``"summary"``
    dict) are logged to ``metrics.jsonl``, everything is kept in ``result.json``.
    """

    def train_batch(self, step: int) -> Batch: ...

    def evaluate(self, model: Evaluator) -> dict[str, Any]: ...


class TrainResult(NamedTuple):
    """What :func:`train` returns: the final training state and the results
    (``result.json``: ``status``, ``step``, ``train_loss``, ``eval``, ...)."""

    params: Any
    opt_state: Any
    step: int
    results: dict[str, Any]


class NonFiniteLossError(RuntimeError):
    """The loss (or gradients, or updated parameters) became NaN/inf; training stopped.
    ``result`` is the run's ``result.json`` content (``"status": "nonfinite"``)."""

    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.result = result or {}


def make_optimizer(config: TrainConfig, ssm_mask: Callable[[Any], Any] | None = None,
                   trainable: Callable[[Any], Any] | None = None,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (Loshchilov & Hutter, 2019) with linear warmup then cosine decay, after
    global-norm gradient clipping; weight decay on parameters with ``ndim >= 2``.

    With ``config.ssm_lr > 0`` and ``ssm_mask`` (``params -> tree of bools``, e.g.
    :meth:`ssmjax.models.SequenceModel.ssm_parameter_mask`), the SSM parameters form a
    second group: the same schedule shape at peak ``ssm_lr`` and no weight decay, the
    recipe of S4 (Gu et al., 2022), S5 (Smith et al., 2023) and the LRU (Orvieto et al.,
    2023). With ``trainable`` (``params -> tree of bools``, e.g.
    :meth:`ssmjax.train.finetune.FinetunedModel.trainable_mask`) the parameters marked
    ``False`` are frozen: ``optax.set_to_zero`` in an ``optax.multi_transform`` (no optimizer
    state, no weight decay; clipping sees their gradients, which a frozen model makes zero).
    Returns the optimizer and the schedule of the main group."""
    def schedule_at(peak: float) -> optax.Schedule:
        warmup = max(0, min(config.warmup_steps, config.steps - 1))
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(config.steps, warmup + 1),
                                                  peak * config.final_lr_ratio)

    schedule = schedule_at(config.lr)
    adamw = optax.adamw(schedule, config.beta1, config.beta2, weight_decay=config.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    if config.ssm_lr > 0 and ssm_mask is not None:
        ssm = optax.adam(schedule_at(config.ssm_lr), config.beta1, config.beta2)
        labels = lambda params: jax.tree.map(lambda is_ssm: "ssm" if is_ssm else "other", ssm_mask(params))  # noqa: E731
        adamw = optax.multi_transform({"other": adamw, "ssm": ssm}, labels)
    if trainable is not None:
        frozen = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))  # noqa: E731
        adamw = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, frozen)
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _sequence_parallel(mesh: jax.sharding.Mesh | None):
    """:func:`ssmjax.distributed.sequence_parallel` over the ``seq`` axis of ``mesh``, or no
    context when there is no mesh or no ``seq`` axis (its size 1 activates nothing)."""
    if mesh is None or "seq" not in mesh.shape:
        return contextlib.nullcontext()
    from ssmjax.distributed.context import sequence_parallel  # ssmjax.distributed only when training on a mesh

    return sequence_parallel(mesh, "seq")


def make_train_step(model: Model, optimizer: optax.GradientTransformation, shardings: Any = None):
    """``(state, inputs, targets, mask, key) -> (new_state, metrics)``, jit-compiled.

    ``shardings``: ``(state shardings, batch sharding)`` to compile the step for a device
    mesh (:mod:`ssmjax.distributed.mesh`): the state keeps its layout across steps and its
    buffers are donated (updated in place); metrics are replicated. On a mesh whose
    ``seq`` axis has more than one device the model is applied under
    :func:`ssmjax.distributed.sequence_parallel`, so its scans, softmax attention and short
    convolutions run sequence-parallel (:mod:`ssmjax.distributed.context`)."""
    mesh = None if shardings is None else shardings[1].mesh

    def loss_fn(params, inputs, targets, mask, key):
        with _sequence_parallel(mesh):
            logits = model.apply(params, inputs, rngs={"dropout": key})
        return masked_loss_and_accuracy(logits, targets, mask)

    def train_step(state, inputs, targets, mask, key):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], inputs, targets, mask, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
        new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1)
        return new_state, dict(loss=loss, accuracy=accuracy, grad_norm=grad_norm, finite=finite)

    if shardings is None:
        return jax.jit(train_step)
    state_shardings, batch_sharding = shardings
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, batch_sharding, batch_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def count_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


class InterruptFlag:
    """SIGINT or SIGTERM sets the flag (the loop saves and stops); a second signal raises
    ``KeyboardInterrupt`` at once. Handlers are installed only on the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, verbose: bool = True):
        self.name: str | None = None
        self.verbose = verbose
        self._previous: dict[int, Any] = {}

    @property
    def set(self) -> bool:
        return self.name is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        if self.verbose:
            print(f"\n{self.name}: finishing this step, saving a checkpoint (send it again to abort)", flush=True)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def nonfinite_message(step: int, loss: float, grad_norm: float, last_checkpoint: str | None) -> str:
    """Why a run stopped on NaN/inf, with the likely causes in library terms."""
    kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint had been written yet"
    return (f"non-finite loss/gradients at step {step} (loss {loss}, grad norm {grad_norm}); the update was not "
            f"applied and training stopped; {kept}. Likely causes: a learning rate too high for this model "
            "(TrainConfig.lr; warmup_steps), unclipped gradient spikes (TrainConfig.grad_clip; 0 disables "
            "clipping), or extreme input values (inputs are checked for NaN/inf and range, not scale). Lower lr or "
            "grad_clip and train(..., resume=True) from the checkpoint, or start again.")


#: Every evaluation in full, by step (``metrics.jsonl`` keeps only their scalars), so that a
#: run resumed and stopped again before its next evaluation still reports one in ``result.json``.
EVALS = "evals.json"


def _evals(run_dir: Path) -> dict[str, Any]:
    path = run_dir / EVALS
    return json.loads(path.read_text()) if path.exists() else {}


def _newest_eval(run_dir: Path, step: int) -> dict[str, Any]:
    """The scores of the newest evaluation at or before ``step`` (``{}`` if none); those
    after it (made before a kill, past the checkpoint a run resumes from) are for redone steps."""
    done = {int(k): v for k, v in _evals(run_dir).items() if int(k) <= step}
    return done[max(done)] if done else {}


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)


def train(model: Model, task: Task, config: TrainConfig, run_dir: str | Path, *, resume: bool = False,
          stop_at: int | None = None, metadata: Mapping[str, Any] | None = None, title: str = "",
          verbose: bool = True, mesh: jax.sharding.Mesh | None = None) -> TrainResult:
    """Train ``model`` on ``task`` (see :class:`Task`) for ``config.steps`` updates.

    Returns a :class:`TrainResult` ``(params, opt_state, step, results)``; ``results`` is
    also written to ``run_dir/result.json``. ``resume``: continue from the newest
    checkpoint in ``run_dir`` (printed; a fresh start if there is none); without it an
    existing checkpoint is an error. ``stop_at``: stop (and save) after that many updates
    as if interrupted, e.g. to split a run. ``metadata`` is copied into ``result.json``.
    Raises ``ValueError`` on an invalid batch and :class:`NonFiniteLossError` on NaN/inf.
    A model with a ``trainable_mask`` (a :class:`ssmjax.train.finetune.FinetunedModel`)
    trains only the parameters it marks (:func:`make_optimizer`).

    ``mesh``: train on a device mesh (:func:`ssmjax.distributed.make_mesh`): the state is
    sharded FSDP-style by :func:`ssmjax.distributed.state_shardings`, batches are split
    ``P(("data", "fsdp"), "seq")`` from each process's local rows
    (``jax.make_array_from_process_local_data``), checkpoints are saved and restored
    sharded (a run may resume on a different mesh).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer, schedule = make_optimizer(config, getattr(model, "ssm_parameter_mask", None),
                                         getattr(model, "trainable_mask", None))
    key = jax.random.PRNGKey(config.seed)
    init_key, step_key = jax.random.split(key)
    first = task.train_batch(0)
    check_batch(first, model_spec(model, task), "task.train_batch(0)")
    params = jax.jit(model.init)(init_key, jnp.asarray(first.inputs))
    spec = _batch_spec(model, task, params, first)
    state = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    shardings = None
    if mesh is not None:
        from ssmjax.distributed.mesh import batch_spec, check_batch_shape, state_shardings

        local = np.shape(first.inputs)  # this process's rows; every process feeds as many
        check_batch_shape(mesh, (local[0] * jax.process_count(), *local[1:]),
                          "task.train_batch(0).inputs" + (" (all processes' rows)" if jax.process_count() > 1 else ""))
        shardings = (state_shardings(state, mesh), jax.sharding.NamedSharding(mesh, batch_spec(mesh, 2)))
        state = jax.device_put(state, shardings[0])
    checkpoints = Checkpointer(run_dir / "checkpoints", keep=config.keep_checkpoints)
    primary = jax.process_index() == 0  # writes the run directory's files (orbax coordinates the checkpoints)
    log = MetricsLog(run_dir / "metrics.jsonl", writes=primary)
    try:
        if checkpoints.latest_step() is not None and not resume:
            raise FileExistsError(f"run_dir: {run_dir} already has checkpoints; resume it or choose another directory")
        if resume and checkpoints.latest_step() is not None:
            state = checkpoints.restore(state)
            restored = int(state["step"])
            log.truncate_after(restored, keep_eval=restored < config.steps)  # a finished run re-evaluates
            if verbose:
                print(f"resumed from step {restored} of {config.steps}: {checkpoints.directory / str(restored)}",
                      flush=True)
        else:
            if resume and verbose:
                print(f"resume: no checkpoint in {checkpoints.directory}; starting from step 0", flush=True)
            log.truncate_after(0)
        if primary and not (run_dir / "config.json").exists():
            _write_json(run_dir / "config.json", _jsonable(dict(metadata or {}, config=dataclasses.asdict(config))))
        return _run(model, task, config, spec, run_dir, state, optimizer, schedule, step_key, checkpoints, log,
                    stop_at=stop_at, metadata=dict(metadata or {}), title=title, verbose=verbose, shardings=shardings)
    finally:
        checkpoints.close()


def _batch_spec(model: Model, task: Task, params: Any, first: Batch) -> BatchSpec:
    """The model's :class:`BatchSpec`, with the number of classes read off its outputs
    (checked against ``first.targets``' shape)."""
    out = jax.eval_shape(model.apply, params, jnp.asarray(first.inputs))
    shape = getattr(out, "shape", None)
    targets = np.shape(first.targets)
    if shape is None or tuple(shape[:-1]) != targets:
        raise ValueError(f"task.train_batch(0): batch.targets: shape {targets} does not match the model's outputs "
                         f"{shape if shape is not None else type(out).__name__} (expected the outputs' shape without "
                         "the last, class axis: [b, t] for per-position heads, [b] for a classifier)")
    return dataclasses.replace(model_spec(model, task), num_classes=int(shape[-1]))


def _device_batch(batch: Batch, shardings) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(inputs, targets, mask)`` on the devices: this process's rows of the global batch
    placed by the batch sharding when training on a mesh."""
    fields = (batch.inputs, batch.targets, batch.mask)
    if shardings is None:
        return tuple(jnp.asarray(x) for x in fields)
    mesh = shardings[1].mesh
    from ssmjax.distributed.mesh import batch_spec

    return tuple(jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, batch_spec(mesh, np.ndim(x))),
                                                        np.asarray(x)) for x in fields)


def _run(model, task, config, spec, run_dir, state, optimizer, schedule, step_key, checkpoints, log, *, stop_at,
         metadata, title, verbose, shardings=None) -> TrainResult:
    train_step = make_train_step(model, optimizer, shardings)
    evaluator = Evaluator(model, lambda b, w: check_batch(b, spec, w))
    start = int(state["step"])
    end = config.steps if stop_at is None else min(config.steps, stop_at)
    progress = Progress(config.steps, config.log_every, title, enabled=verbose)
    elapsed0 = log.last_value("elapsed_s", 0.0)
    clock = last_save = time.perf_counter()
    status, message, saved_at, batch_size, interrupt = "running", "", start, None, None
    result_base = dict(metadata, params=count_params(state["params"]), steps=config.steps)

    def evaluate(params, step):
        scores = task.evaluate(evaluator.at(params))
        log.write(dict(split="eval", step=step, **{**_scalars(scores.get("summary", {})), **_scalars(scores)}))
        if log.writes:
            _write_json(run_dir / EVALS, _jsonable({**_evals(run_dir), str(step): scores}))
        progress.eval(step, scores["accuracy"], scores.get("loss"))
        return scores

    def save(step):
        nonlocal saved_at, last_save
        checkpoints.save(step, state)
        saved_at, last_save = step, time.perf_counter()

    scores = _newest_eval(run_dir, start)
    with InterruptFlag(verbose) as interrupted:
        step = start
        while step < end:
            batch = task.train_batch(step)
            check_batch(batch, spec, f"task.train_batch({step})")
            new_state, m = train_step(state, *_device_batch(batch, shardings), jax.random.fold_in(step_key, step))
            if not bool(m["finite"]):
                last = checkpoints.latest_step()
                status = "nonfinite"
                message = nonfinite_message(step + 1, float(m["loss"]), float(m["grad_norm"]),
                                            None if last is None else f"step {last} in {checkpoints.directory}")
                break
            state, step = new_state, step + 1
            batch_size = np.shape(batch.inputs)[0]
            loss, accuracy = float(m["loss"]), float(m["accuracy"])
            row = dict(split="train", step=step, loss=loss, accuracy=accuracy, grad_norm=float(m["grad_norm"]),
                       lr=float(schedule(step - 1)), elapsed_s=round(elapsed0 + time.perf_counter() - clock, 3))
            tokens_per_s = progress.update(step, loss, accuracy, int(np.prod(np.shape(batch.inputs)[:2])))
            if tokens_per_s is not None:
                row["tokens_per_s"] = round(tokens_per_s, 1)
            log.write(row)
            minutes = (time.perf_counter() - last_save) / 60
            if (step % config.checkpoint_every == 0 or step == config.steps
                    or 0 < config.checkpoint_every_minutes <= minutes):
                save(step)
            if step % config.eval_every == 0 and step < config.steps:
                scores = evaluate(state["params"], step)
            if interrupted.set:
                interrupt = interrupted.name
                status, message = "interrupted", f"{interrupt} at step {step}; checkpoint saved, resume to continue"
                break
        if status == "running" and step < config.steps:
            status, message = "stopped", f"stopped at step {step} of {config.steps}; resume to continue"
        if status in ("interrupted", "stopped") and saved_at != step:
            save(step)
    if status == "running":
        status = "done"
        scores = evaluate(state["params"], step)
    progress.close()
    elapsed = elapsed0 + time.perf_counter() - clock
    extra = dict(signal=interrupt) if interrupt else {}
    result = dict(result_base, status=status, step=step, message=message, **extra, batch_size=batch_size,
                  wall_s=round(elapsed, 2), **log.summary(), eval=scores)
    if log.writes:
        _write_json(run_dir / "result.json", _jsonable(result))
        from ssmjax.train.plots import plot_learning_curves  # matplotlib only when writing outputs

        plot_learning_curves(log.rows(), run_dir / "learning_curves.png", title or run_dir.name)
    if status == "nonfinite":
        raise NonFiniteLossError(message, result)
    if message and verbose:
        print(message, flush=True)
    return TrainResult(state["params"], state["opt_state"], step, result)


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
