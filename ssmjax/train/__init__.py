"""Training: the optax loop, orbax checkpoints, JSON-lines metrics, progress and plots."""

from ssmjax.train.checkpoint import Checkpointer
from ssmjax.train.loop import (
    TIMING_KEYS,
    NonFiniteLossError,
    Task,
    TrainConfig,
    count_params,
    make_optimizer,
    make_predict,
    make_train_step,
    masked_loss_and_accuracy,
    train,
)
from ssmjax.train.metrics import MetricsLog, Progress, read_metrics

__all__ = [
    "TIMING_KEYS", "Checkpointer", "MetricsLog", "NonFiniteLossError", "Progress", "Task", "TrainConfig",
    "count_params", "make_optimizer", "make_predict", "make_train_step", "masked_loss_and_accuracy",
    "read_metrics", "train",
]
