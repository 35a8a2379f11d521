"""The five synthetic experiments as training tasks: training batches from
:mod:`ssmjax.data.synthetic` and the evaluation each paper reports.

``evaluate(predict)`` receives an :class:`ssmjax.train.Evaluator` (``predict(inputs)``
gives argmax predictions; ``.loss`` and ``.logits`` give more) and returns ``accuracy``
(the headline number), ``summary`` (the table columns of ``experiments/RESULTS.md``, in
order) and ``curve`` (the per-run series the report plots across models, optionally with
a ``reference`` such as the optimal learner). Evaluation data come from a separate
stream (``stream=1``) of the same seed and are fixed for a run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import math
from pathlib import Path

import numpy as np

from experiments.configs import (
    AlgorithmicConfig,
    BooleanICLConfig,
    ExperimentConfig,
    InductionHeadsConfig,
    LMConfig,
    MQARConfig,
    SelectiveCopyingConfig,
)
from ssmjax.data import synthetic
from ssmjax.data.synthetic import Batch
from ssmjax.data.paths import DATA_ENV, default_data_dir
from ssmjax.data.text import Corpus, TextTask, load_corpus

EVAL_STREAM = 1
Predict = Callable[[np.ndarray], np.ndarray]


def _correct(predict: Predict, batch: Batch) -> np.ndarray:
    """``[b, t]`` bool: prediction == target (meaningful where ``batch.mask``)."""
    return np.asarray(predict(batch.inputs)) == batch.targets


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sum(values * mask) / max(np.sum(mask), 1))


def _sequence_accuracy(correct: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row: every masked position correct."""
    return np.all(correct | ~mask, axis=1)


class MQARTask:
    def __init__(self, config: MQARConfig):
        self.config = config
        self.vocab_size = config.vocab_size
        for seq_len, kv in (*config.train_shapes, *config.eval_shapes):
            if 4 * kv > seq_len:
                raise ValueError(f"train_shapes/eval_shapes: (seq_len, kv) = ({seq_len}, {kv}) needs seq_len >= 4 kv")
        self.eval_sets = {shape: [self._batch(shape, config.eval_batch_size, i, EVAL_STREAM)
                                  for i in range(config.eval_batches)] for shape in config.eval_shapes}

    def _batch(self, shape, batch_size, step, stream):
        seq_len, kv = shape
        return synthetic.mqar(self.config.seed, step, batch_size=batch_size, seq_len=seq_len, num_kv_pairs=kv,
                              vocab_size=self.config.vocab_size, power_a=self.config.power_a, stream=stream)

    def train_batch(self, step: int) -> Batch:
        shapes = self.config.train_shapes
        return self._batch(shapes[step % len(shapes)], self.config.batch_size, step, 0)

    def evaluate(self, predict: Predict) -> dict[str, Any]:
        accuracy = {}
        for shape, batches in self.eval_sets.items():
            correct = np.concatenate([_correct(predict, b)[b.mask] for b in batches])
            accuracy[shape] = float(correct.mean())
        shapes = list(accuracy)
        return dict(
            accuracy=float(np.mean(list(accuracy.values()))),
            summary={f"acc {s}/{kv}": accuracy[(s, kv)] for s, kv in shapes},
            curve=dict(xlabel="key-value pairs (sequence length)", ylabel="query accuracy", xscale="log",
                       x=[kv for _, kv in shapes], xticklabels=[f"{kv} ({s})" for s, kv in shapes],
                       y=[accuracy[s] for s in shapes]),
        )


class SelectiveCopyingTask:
    def __init__(self, config: SelectiveCopyingConfig):
        self.config = config
        self.vocab_size = config.vocab_size
        self.eval_set = [self._batch(config.eval_batch_size, i, EVAL_STREAM) for i in range(config.eval_batches)]

    def _batch(self, batch_size, step, stream):
        c = self.config
        return synthetic.selective_copying(c.seed, step, batch_size=batch_size, seq_len=c.seq_len,
                                           num_tokens=c.num_tokens, vocab_size=c.vocab_size, variable=c.variable,
                                           stream=stream)

    def train_batch(self, step: int) -> Batch:
        return self._batch(self.config.batch_size, step, 0)

    def evaluate(self, predict: Predict) -> dict[str, Any]:
        m = self.config.num_tokens
        correct = np.concatenate([_correct(predict, b)[:, -m:] for b in self.eval_set])  # [n, M]
        token = float(correct.mean())
        return dict(
            accuracy=token,
            summary={"token acc": token, "sequence acc": float(correct.all(1).mean())},
            curve=dict(xlabel="copied token index", ylabel="accuracy", x=list(range(1, m + 1)),
                       y=correct.mean(0).tolist()),
        )


class InductionHeadsTask:
    def __init__(self, config: InductionHeadsConfig):
        self.config = config
        self.vocab_size = config.vocab_size
        self.lengths = [max(3, int(round(config.seq_len * m))) for m in config.eval_multiples]
        per_length = config.eval_batch_size * config.eval_batches
        self.eval_sets = {}
        for length in self.lengths:
            batch_size = max(1, min(config.eval_batch_size, config.eval_tokens // length))
            count = max(1, -(-per_length // batch_size))
            self.eval_sets[length] = [synthetic.induction_heads(config.seed, length * 1000 + i, batch_size=batch_size,
                                                                seq_len=length, vocab_size=config.vocab_size,
                                                                stream=EVAL_STREAM) for i in range(count)]

    def train_batch(self, step: int) -> Batch:
        c = self.config
        return synthetic.induction_heads(c.seed, step, batch_size=c.batch_size, seq_len=c.seq_len,
                                         vocab_size=c.vocab_size)

    def evaluate(self, predict: Predict) -> dict[str, Any]:
        accuracy = {length: float(np.concatenate([_correct(predict, b)[:, -1] for b in batches]).mean())
                    for length, batches in self.eval_sets.items()}
        train_length = self.config.seq_len
        headline = accuracy.get(train_length, next(iter(accuracy.values())))
        return dict(
            accuracy=headline,
            summary={f"acc @{length}" + (" (train)" if length == train_length else ""): a
                     for length, a in accuracy.items()},
            curve=dict(xlabel="test sequence length", ylabel="accuracy", xscale="log", x=list(accuracy),
                       y=list(accuracy.values()), vline=train_length),
        )


BOOLEAN_ENCODINGS = ("bits", "example")


def boolean_examples_as_tokens(batch: Batch, num_bits: int) -> Batch:
    """Re-encode a :func:`ssmjax.data.synthetic.boolean_icl` batch with one token per input:
    ``x_1 y_1 x_2 y_2 ...`` where ``x_i`` is the token ``BOOLEAN_VOCAB_SIZE + sum_j x_ij 2^j``
    and ``y_i`` the label token; the target at ``x_i`` is its label (the same prediction the
    bit layout asks for at the last bit of ``x_i``).

    inputs ``[b, k (n + 1)]`` -> ``[b, 2k]`` (vocabulary ``BOOLEAN_VOCAB_SIZE + 2^n``).
    """
    x, y = synthetic.boolean_prompt_examples(batch.inputs, num_bits)  # [b, k, n], [b, k]
    ids = synthetic.BOOLEAN_VOCAB_SIZE + x @ (2 ** np.arange(num_bits))
    labels = synthetic.BOOLEAN_LABEL_OFFSET + y.astype(np.int64)
    return Batch(_interleave(ids, labels).astype(np.int32), _interleave(labels, np.zeros_like(labels)).astype(np.int32),
                 _interleave(np.ones_like(y, bool), np.zeros_like(y, bool)))


def _interleave(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``[b, k]``, ``[b, k]`` -> ``[b, 2k]``: ``first_1 second_1 first_2 second_2 ...``."""
    return np.stack([first, second], -1).reshape(len(first), -1)


class BooleanICLTask:
    def __init__(self, config: BooleanICLConfig):
        if config.encoding not in BOOLEAN_ENCODINGS:
            raise ValueError(f"encoding: expected one of {BOOLEAN_ENCODINGS}, got {config.encoding!r}")
        if config.encoding == "example" and config.num_bits > 16:
            raise ValueError(f"num_bits: encoding='example' needs 2^num_bits tokens, so num_bits <= 16; "
                             f"got {config.num_bits}")
        self.config = config
        packed = config.encoding == "example"
        self.vocab_size = synthetic.BOOLEAN_VOCAB_SIZE + (2 ** config.num_bits if packed else 0)
        bit_batches = [self._bit_batch(config.eval_batch_size, i, EVAL_STREAM) for i in range(config.eval_batches)]
        self.eval_set = [self._encode(b) for b in bit_batches]
        inputs = np.concatenate([b.inputs for b in bit_batches])
        optimal = synthetic.boolean_optimal_predictions(
            inputs, function=config.function, num_bits=config.num_bits, sparsity=config.sparsity,
            planted_fraction=config.planted_fraction)
        _, labels = synthetic.boolean_prompt_examples(inputs, config.num_bits)
        self.optimal = None if optimal is None else (optimal == labels).mean(0)  # per position

    def _bit_batch(self, batch_size, step, stream):
        c = self.config
        return synthetic.boolean_icl(c.seed, step, batch_size=batch_size, function=c.function, num_bits=c.num_bits,
                                     num_examples=c.num_examples, sparsity=c.sparsity,
                                     planted_fraction=c.planted_fraction, stream=stream)

    def _encode(self, batch: Batch) -> Batch:
        return boolean_examples_as_tokens(batch, self.config.num_bits) if self.config.encoding == "example" else batch

    def _batch(self, batch_size, step, stream):
        return self._encode(self._bit_batch(batch_size, step, stream))

    def train_batch(self, step: int) -> Batch:
        return self._batch(self.config.batch_size, step, 0)

    def _columns(self, per_position: np.ndarray) -> dict[str, float]:
        k = len(per_position)
        positions = sorted({p for p in (1, 2, 4, 8, 16, 32, 64, k) if p <= k})
        return {"mean acc": float(per_position.mean()), **{f"acc @{p}": float(per_position[p - 1]) for p in positions}}

    def evaluate(self, predict: Predict) -> dict[str, Any]:
        correct = np.concatenate([_correct(predict, b)[b.mask].reshape(b.inputs.shape[0], -1) for b in self.eval_set])
        per_position = correct.mean(0)
        curve = dict(xlabel="example index in the prompt", ylabel="accuracy", x=list(range(1, len(per_position) + 1)),
                     y=per_position.tolist())
        if self.optimal is not None:
            curve["reference"] = dict(label="Bayes-optimal learner", y=self.optimal.tolist(),
                                      summary=self._columns(self.optimal))
        return dict(accuracy=float(per_position.mean()), summary=self._columns(per_position), curve=curve)


class AlgorithmicTask:
    def __init__(self, config: AlgorithmicConfig):
        self.config = config
        self.vocab_size = synthetic.ALGORITHMIC_VOCAB_SIZE
        self.eval_sets = {length: [synthetic.algorithmic(config.seed, length * 1000 + i, batch_size=config.eval_batch_size,
                                                         task=config.task, min_len=length, max_len=length,
                                                         stream=EVAL_STREAM) for i in range(config.eval_batches)]
                          for length in config.eval_lengths}

    def train_batch(self, step: int) -> Batch:
        c = self.config
        return synthetic.algorithmic(c.seed, step, batch_size=c.batch_size, task=c.task, max_len=c.train_max_len)

    def evaluate(self, predict: Predict) -> dict[str, Any]:
        char, seq = {}, {}
        for length, batches in self.eval_sets.items():
            results = [(_correct(predict, b), b.mask) for b in batches]
            char[length] = float(np.mean([_masked_mean(c, m) for c, m in results]))
            seq[length] = float(np.concatenate([_sequence_accuracy(c, m) for c, m in results]).mean())
        inside = [char[n] for n in char if n <= self.config.train_max_len] or list(char.values())
        summary = {}
        for length in char:
            summary[f"char @{length}"] = char[length]
            summary[f"seq @{length}"] = seq[length]
        return dict(
            accuracy=float(np.mean(inside)), summary=summary,
            curve=dict(xlabel="test length", ylabel="sequence accuracy", x=list(seq), y=list(seq.values()),
                       vline=self.config.train_max_len),
        )


def lm_data_dir(config: LMConfig) -> Path:
    """Where ``lm`` reads its corpus: ``data_dir`` if set, else ``$SSMJAX_DATA``, else
    ``../shared/data`` next to the repository root (:func:`ssmjax.data.paths.default_data_dir`)."""
    if config.data_dir:
        return Path(config.data_dir).expanduser()
    return default_data_dir() or Path("../shared/data")


def lm_corpus(config: LMConfig) -> Corpus:
    """The tokenized corpus of an ``lm`` config (a clear ``ValueError`` if it is missing)."""
    path = lm_data_dir(config) / config.data_file
    if not path.exists():
        raise ValueError(f"data_file: {path} not found; point at the folder holding {config.data_file!r} with "
                         f"--set data_dir=DIR or the {DATA_ENV} environment variable (or --set data_file=NAME)")
    return load_corpus(path, config.format, val_fraction=config.val_fraction, unknown=config.unknown)


class LMTask:
    """Character/byte-level language modelling on a real corpus (nanoGPT's
    ``shakespeare_char`` protocol): training batches are ``batch_size`` random windows of
    ``seq_len`` tokens of the training split; the evaluation scores the first
    ``eval_windows`` (0: all) consecutive non-overlapping validation windows, every
    position of every window (nanoGPT instead averages 200, or 20 on its CPU command, random
    batches). ``val_loss`` is nats per token, ``bpc`` bits per character/byte."""

    def __init__(self, config: LMConfig):
        self.config = config
        corpus = lm_corpus(config)
        self.text = TextTask.from_corpus(corpus, seq_len=config.seq_len, batch_size=config.batch_size,
                                         seed=config.seed, eval_windows=config.eval_windows or None,
                                         eval_batch_size=config.eval_batch_size)
        self.tokenizer, self.vocab_size = corpus.tokenizer, corpus.tokenizer.vocab_size

    def train_batch(self, step: int) -> Batch:
        return self.text.train_batch(step)

    def evaluate(self, model) -> dict[str, Any]:
        scores = model.loss(self.text.val_batches)
        bpc = scores["loss"] / math.log(2.0)
        return dict(accuracy=scores["accuracy"], loss=scores["loss"], val_loss=scores["loss"], bpc=bpc,
                    perplexity=scores["perplexity"], val_tokens=scores["count"],
                    summary={"val loss (nats)": scores["loss"], "bpc": bpc, "val acc": scores["accuracy"]})


TASKS = {
    "mqar": MQARTask,
    "selective_copying": SelectiveCopyingTask,
    "induction_heads": InductionHeadsTask,
    "boolean_icl": BooleanICLTask,
    "algorithmic": AlgorithmicTask,
    "lm": LMTask,
}

DESCRIPTIONS = {
    "mqar": "multi-query associative recall (Zoology): query accuracy per (seq_len, kv pairs)",
    "selective_copying": "copy the tokens scattered in noise (Mamba Table 1)",
    "induction_heads": "recall the token after a special token; length extrapolation (Mamba Table 11)",
    "boolean_icl": "learn Boolean functions in context; accuracy per prompt position vs the optimal learner",
    "algorithmic": "copy / reverse / addition; train short, test long (Universal Transformers)",
    "lm": "character-level language modelling on tinyshakespeare (nanoGPT shakespeare_char): val nats, bits/char",
}


def build_task(experiment: str, config: ExperimentConfig):
    if experiment not in TASKS:
        raise ValueError(f"experiment: expected one of {tuple(TASKS)}, got {experiment!r}")
    return TASKS[experiment](config)
