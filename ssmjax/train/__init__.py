"""Training: the optax loop, the epoch trainer with early stopping (:mod:`ssmjax.train.fit`),
batch validation, the evaluation hook, finetuning (:mod:`ssmjax.train.finetune`: full, partial,
LoRA, adapters), orbax checkpoints, JSON-lines metrics, progress and
plots."""

from ssmjax.train.checkpoint import Checkpointer
from ssmjax.train.checks import BatchSpec, check_batch, model_spec
from ssmjax.train.fit import FitConfig, FitResult, fit, predict_in_batches
from ssmjax.train.finetune import (
    HEAD,
    METHODS,
    NORMS,
    FinetunedModel,
    Finetuning,
    last_blocks,
    merge_lora,
    parameter_counts,
)
from ssmjax.train.evaluation import Evaluator, make_predict, masked_loss_and_accuracy, masked_sums
from ssmjax.train.loop import (
    TIMING_KEYS,
    NonFiniteLossError,
    Task,
    TrainConfig,
    TrainResult,
    count_params,
    make_optimizer,
    make_train_step,
    nonfinite_message,
    train,
)
from ssmjax.train.metrics import MetricsLog, Progress, read_metrics

__all__ = [
    "TIMING_KEYS", "BatchSpec", "Checkpointer", "Evaluator", "MetricsLog", "NonFiniteLossError", "Progress", "Task",
    "TrainConfig", "TrainResult", "HEAD", "METHODS", "NORMS", "FinetunedModel", "Finetuning", "last_blocks",
    "merge_lora", "parameter_counts", "FitConfig", "FitResult", "fit", "predict_in_batches", "check_batch", "count_params", "make_optimizer", "make_predict", "make_train_step",
    "masked_loss_and_accuracy", "masked_sums", "model_spec", "nonfinite_message", "read_metrics", "train",
]
