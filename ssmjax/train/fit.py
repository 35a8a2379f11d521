"""Epoch training with early stopping, for models fitted to a fixed set of examples
(forecasting windows, trajectories) rather than an endless stream of batches.

This is the protocol of LTSF-Linear (Zeng et al., 2023, "Are Transformers Effective for
Time Series Forecasting?") and iTransformer (Liu et al., 2024): each epoch visits every
training example once in a fresh random order, the learning rate is set per epoch
(``"halve"``: LTSF-Linear's ``lradj='type1'``, ``lr_e = lr * 0.5**e`` for epoch
``e = 0, 1, ...``), the validation metric is computed after every epoch, training stops
after ``patience`` epochs without improvement, and the parameters of the best
validation epoch are returned (the reference code reloads its best checkpoint before
testing).

Determinism and resume. The order of epoch ``e`` is ``default_rng([seed, e])``'s
permutation and the dropout key of update ``i`` is ``fold_in(key(seed), i)``, so
``fit(..., resume=True)`` after an interruption continues with the same batches and keys
as an uninterrupted run. A checkpoint is written after every epoch (current and best
parameters, optimizer state, early-stopping counters).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssmjax.checks import check_choice
from ssmjax.train.checkpoint import Checkpointer
from ssmjax.train.metrics import MetricsLog

LR_SCHEDULES = ("halve", "constant", "cosine")
OPTIMIZERS = ("adam", "adamw")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Settings of :func:`fit`. ``lr_schedule``: ``"halve"`` (``lr * 0.5**epoch``),
    ``"constant"``, or ``"cosine"`` (from ``lr`` to 0 over ``epochs``, per epoch).
    ``patience``: epochs without a better validation value before stopping (0: never
    stop early). ``drop_last``: drop the last partial training batch of each epoch (as
    PyTorch ``DataLoader(drop_last=True)`` in the reference code)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "halve"
    patience: int = 3
    seed: int = 0
    grad_clip: float = 0.0  # global-norm clipping; 0 disables
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay; needs optimizer="adamw"
    optimizer: str = "adam"
    drop_last: bool = True

    def __post_init__(self):
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ValueError(f"patience: expected >= 0 (0 disables early stopping), got {self.patience}")
        if self.weight_decay and self.optimizer != "adamw":
            raise ValueError(f"weight_decay: {self.weight_decay} needs optimizer='adamw', got {self.optimizer!r}")

    def epoch_lr(self, epoch: int) -> float:
        """The learning rate of 0-based ``epoch``."""
        if self.lr_schedule == "halve":
            return self.lr * 0.5 ** epoch
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        return self.lr


class FitResult(NamedTuple):
    """What :func:`fit` returns. ``params`` are those of the best validation epoch;
    ``history`` has one dict per finished epoch (``epoch``, ``train_loss``,
    ``val_loss``, ``lr``, ``elapsed_s``)."""

    params: Any
    best_epoch: int
    best_val: float
    history: list[dict[str, Any]]
    stopped_early: bool
    elapsed_s: float


@dataclasses.dataclass(frozen=True)
class _OptimizerRule:
    """What fixes the optimizer's compiled program: the update rule and the clipping norm. The
    learning rate and weight decay live in the optimizer state (``optax.inject_hyperparams``),
    so fits that differ only in those (a learning-rate grid, the epochs' schedule) share one
    compiled step."""

    name: str
    grad_clip: float

    def build(self, lr: float = 0.0, weight_decay: float = 0.0) -> optax.GradientTransformation:
        if self.name == "adamw":
            inner = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=weight_decay)
        else:
            inner = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
        return optax.chain(optax.clip_by_global_norm(self.grad_clip), inner) if self.grad_clip > 0 else inner


@partial(jax.jit, static_argnames=("loss_fn", "rule"))
def _train_step(loss_fn: Callable, rule: _OptimizerRule, params, opt_state, batch, loss_args, base_key, step):
    """One update; compiled once per ``(loss_fn, rule)`` and argument shapes, reused across
    :func:`fit` calls."""
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, jax.random.fold_in(base_key, step), *loss_args)
    updates, opt_state = rule.build().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _set_lr(opt_state, lr: float, clipped: bool):
    inner = opt_state[1] if clipped else opt_state
    inner.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return opt_state


def _check_rows(train_data: Sequence[np.ndarray], batch_size: int, drop_last: bool) -> int:
    if not train_data:
        raise ValueError("train_data: expected a non-empty tuple of arrays with a common leading dimension")
    rows = {np.shape(a)[0] for a in train_data}
    if len(rows) != 1:
        raise ValueError(f"train_data: arrays must share the leading (example) dimension, got {sorted(rows)}")
    (n,) = rows
    if n == 0 or (drop_last and n < batch_size):
        raise ValueError(f"train_data: {n} examples give no full batch of batch_size = {batch_size}")
    return n


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool) -> list[np.ndarray]:
    """The example indices of each batch of ``epoch``: a permutation of ``range(n)`` drawn
    from ``default_rng([seed, epoch])``, cut into ``batch_size`` pieces."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    stop = n - n % batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def fit(loss_fn: Callable[..., jax.Array], params: Any, train_data: Sequence[np.ndarray],
        validate: Callable[[Any], float], config: FitConfig, *, loss_args: tuple = (),
        run_dir: str | Path | None = None, resume: bool = False, verbose: bool = True) -> FitResult:
    """Train ``params`` by minimising ``loss_fn(params, batch, key, *loss_args)`` over the rows
    of ``train_data`` for ``config.epochs`` epochs with early stopping on ``validate(params)``
    (lower is better); see the module docstring. With ``run_dir``, metrics go to
    ``run_dir/metrics.jsonl`` and a checkpoint to ``run_dir/checkpoints`` after every
    epoch; ``resume=True`` continues after the newest one.

    The update step is compiled once per ``loss_fn`` object (and optimizer rule and shapes)
    and reused by later calls: pass the same function, with what changes between calls
    (frozen parameters, per-task arrays) in ``loss_args`` (a tuple of pytrees of arrays)
    rather than in a fresh closure, and a learning-rate grid or a sequence of tasks
    compiles one step."""
    n = _check_rows(train_data, config.batch_size, config.drop_last)
    rule = _OptimizerRule(config.optimizer, config.grad_clip)
    clipped = config.grad_clip > 0
    base_key = jax.random.key(config.seed)

    state = dict(params=params, best_params=params, opt_state=rule.build(config.lr, config.weight_decay).init(params), epoch=0, step=0,
                 best_val=np.inf, best_epoch=-1, bad_epochs=0, elapsed_s=0.0)
    checkpointer = log = None
    history: list[dict[str, Any]] = []
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointer = Checkpointer(run_dir / "checkpoints")
        if resume and checkpointer.latest_step() is not None:
            state = checkpointer.restore(state)
            if verbose:
                print(f"resumed after epoch {int(state['epoch'])} from {checkpointer.directory}", flush=True)
        elif (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()
        log = MetricsLog(run_dir / "metrics.jsonl")
        log.truncate_after(int(state["step"]))  # rows of an epoch that finished after the newest checkpoint
        history = [{k: v for k, v in r.items() if k != "split"} for r in log.rows() if r["split"] == "val"]

    start_epoch, step = int(state["epoch"]), int(state["step"])
    best_val, best_epoch, bad_epochs = float(state["best_val"]), int(state["best_epoch"]), int(state["bad_epochs"])
    params, best_params, opt_state = state["params"], state["best_params"], state["opt_state"]
    stopped_early = bool(config.patience) and bad_epochs >= config.patience
    start = time.perf_counter() - float(state["elapsed_s"])
    for epoch in range(start_epoch, config.epochs):
        if stopped_early:
            break
        lr = config.epoch_lr(epoch)
        opt_state = _set_lr(opt_state, lr, clipped)
        losses = []
        for idx in epoch_batches(n, config.batch_size, config.seed, epoch, config.drop_last):
            batch = tuple(jnp.asarray(a[idx]) for a in train_data)
            params, opt_state, loss = _train_step(loss_fn, rule, params, opt_state, batch, loss_args, base_key, step)
            losses.append(loss)
            step += 1
        train_loss = float(np.mean(jax.device_get(losses)))
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"loss: not finite in epoch {epoch} (lr {lr:g}); lower lr or set grad_clip")
        val = float(validate(params))
        if val < best_val:
            best_val, best_epoch, best_params, bad_epochs = val, epoch, params, 0
        else:
            bad_epochs += 1
        stopped_early = bool(config.patience) and bad_epochs >= config.patience
        elapsed = time.perf_counter() - start
        row = dict(epoch=epoch, step=step, train_loss=train_loss, val_loss=val, lr=lr, elapsed_s=elapsed)
        history.append(row)
        if verbose:
            mark = " *" if best_epoch == epoch else ""
            print(f"epoch {epoch + 1}/{config.epochs}  lr {lr:.2e}  train {train_loss:.4f}  val {val:.4f}{mark}  "
                  f"{elapsed:.0f}s" + ("  (early stop)" if stopped_early else ""), flush=True)
        if log is not None:
            log.write(dict(split="train", epoch=epoch, step=step, loss=train_loss, lr=lr, elapsed_s=elapsed))
            log.write(dict(split="val", **row))
        if checkpointer is not None:
            checkpointer.save(epoch + 1, dict(params=params, best_params=best_params, opt_state=opt_state,
                                              epoch=epoch + 1, step=step, best_val=best_val, best_epoch=best_epoch,
                                              bad_epochs=bad_epochs, elapsed_s=elapsed))
    return FitResult(best_params, best_epoch, best_val, history, stopped_early, time.perf_counter() - start)


def predict_in_batches(fn: Callable[..., Any], arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """``fn(*rows)`` over every row of ``arrays`` (common leading dimension), ``batch_size``
    rows at a time, concatenated on the host. No row is dropped: the last partial batch is
    padded by repeating its last row (one compiled shape) and the padding is cut off."""
    n = np.shape(arrays[0])[0]
    outputs = []
    for begin in range(0, n, batch_size):
        idx = np.minimum(np.arange(begin, begin + batch_size), n - 1)
        out = np.asarray(fn(*(jnp.asarray(a[idx]) for a in arrays)))
        outputs.append(out[:min(batch_size, n - begin)])
    return np.concatenate(outputs, axis=0)
