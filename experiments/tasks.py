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
import os
from pathlib import Path

import numpy as np

from experiments.configs import (
    AlgorithmicConfig,
    ArrowPointingConfig,
    ClassificationConfig,
    BooleanICLConfig,
    ExperimentConfig,
    InductionHeadsConfig,
    LMConfig,
    MQARConfig,
    SelectiveCopyingConfig,
    SequentialImageConfig,
    TokenSequenceConfig,
)
from ssmjax.data import images, lra, synthetic, vision
from ssmjax.data.synthetic import Batch
from ssmjax.data.paths import DATA_ENV, default_data_dir
from ssmjax.data.text import Corpus, TextTask, load_corpus, repeat_passages
from experiments.urpe import URPETask
from experiments.sequential_functions import SequentialFunctionsTask
from experiments.structural_recursion import StructuralRecursionTask
from experiments.gsm_graphs import GsmGraphsTask

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
        batch = self.text.train_batch(step)
        if self.config.repeat_fraction:
            batch = repeat_passages(batch, self.config.repeat_fraction, self.config.seed, step)
        return batch

    def evaluate(self, model) -> dict[str, Any]:
        scores = model.loss(self.text.val_batches)
        bpc = scores["loss"] / math.log(2.0)
        return dict(accuracy=scores["accuracy"], loss=scores["loss"], val_loss=scores["loss"], bpc=bpc,
                    perplexity=scores["perplexity"], val_tokens=scores["count"],
                    summary={"val loss (nats)": scores["loss"], "bpc": bpc, "val acc": scores["accuracy"]})


def epoch_batch_indices(num_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The rows of training batch ``step`` when every epoch visits the ``num_rows`` rows in a
    fresh order: epoch ``e = step // (num_rows // batch_size)`` shuffles with
    ``default_rng([seed, e])`` and the batch is its ``step mod that``-th slice (the last
    partial batch of each epoch is dropped). A pure function of ``step``, so resume is exact."""
    per_epoch = num_rows // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size: {batch_size} is larger than the {num_rows} training rows")
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    return order[index * batch_size:(index + 1) * batch_size]


def classification_batches(inputs: np.ndarray, labels: np.ndarray, batch_size: int) -> list[Batch]:
    """Consecutive evaluation batches (the last may be smaller), one label per row."""
    return [Batch(inputs[i:i + batch_size], labels[i:i + batch_size], np.ones(len(labels[i:i + batch_size]), bool))
            for i in range(0, len(labels), batch_size)]


class ClassificationTask:
    """One label per sequence from in-memory splits ``{"train", "valid", "test"}`` ->
    ``(inputs, labels)``: training batches visit the training rows in a fresh order every
    epoch (:func:`epoch_batch_indices`); the evaluation scores the first ``eval_rows`` (0:
    all) rows of the validation and test splits. ``accuracy`` (the headline) is the test
    accuracy, as the papers report; the summary has both."""

    def __init__(self, config: ClassificationConfig, splits: dict[str, tuple[np.ndarray, np.ndarray]], *,
                 num_classes: int, vocab_size: int | None = None, pad_id: int | None = None, pair: bool = False):
        missing = {"train", "valid", "test"} - set(splits)
        if missing:
            raise ValueError(f"splits: missing {sorted(missing)}")
        self.config, self.splits = config, splits
        self.num_classes, self.vocab_size, self.pad_id, self.pair = num_classes, vocab_size, pad_id, pair
        rows = config.eval_rows or None
        self.eval_sets = {name: classification_batches(x[:rows], y[:rows], config.eval_batch_size)
                          for name, (x, y) in splits.items() if name != "train"}

    def train_batch(self, step: int) -> Batch:
        x, y = self.splits["train"]
        rows = epoch_batch_indices(len(y), self.config.batch_size, self.config.seed, step)
        return Batch(x[rows], y[rows], np.ones(len(rows), bool))

    def evaluate(self, model) -> dict[str, Any]:
        scores = {name: model.loss(batches) for name, batches in self.eval_sets.items()}
        return dict(accuracy=scores["test"]["accuracy"], loss=scores["valid"]["loss"],
                    summary={"test acc": scores["test"]["accuracy"], "val acc": scores["valid"]["accuracy"],
                             "val loss": scores["valid"]["loss"]})


def _data_dir(config, what: str) -> Path:
    if not config.data_dir:
        raise ValueError(f"data_dir: {what} is not in the repository and is never downloaded; pass the folder "
                         f"holding it with --set data_dir=DIR")
    return Path(config.data_dir).expanduser()


def _standardised(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Float inputs scaled by the training split's mean and standard deviation (per channel)."""
    x = splits["train"][0]
    mean, std = x.mean((0, 1)), x.std((0, 1))
    return {name: ((x - mean) / np.maximum(std, 1e-8), y) for name, (x, y) in splits.items()}


def _split_last(x: np.ndarray, y: np.ndarray, fraction: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first ``1 - fraction`` of the rows train, the rest validate (LRA's ``train[:90%]``)."""
    cut = int(round(len(y) * (1 - fraction)))
    return dict(train=(x[:cut], y[:cut]), valid=(x[cut:], y[cut:]))


def image_splits(config: SequentialImageConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The float pixel sequences ``[n, t, c]`` of ``config.dataset``, standardised
    (:class:`experiments.configs.SequentialImageConfig`)."""
    if config.dataset == "mnist":
        order = images.pixel_permutation(seed=config.permutation_seed) if config.permuted else None
        data = images.load_mnist(config.data_dir or None)
        splits = {name: (images.pixel_sequences(split.images, order), split.labels) for name, split in data.items()}
    elif config.dataset in ("cifar10", "cifar10_gray"):
        folder = _data_dir(config, "CIFAR-10 (the python version, cifar-10-batches-py/)")

        def sequences(split):
            pixels, labels = lra.load_cifar10(folder, split)
            if config.dataset == "cifar10":
                return lra.cifar_sequence(pixels), labels
            return lra.cifar_grayscale_tokens(pixels)[..., None].astype(np.float32) / 255.0, labels

        splits = dict(_split_last(*sequences("train"), 0.1), test=sequences("test"))
    elif config.dataset == "pathfinder":
        splits = pathfinder_splits(config)
    else:
        raise ValueError(f"dataset: expected one of {IMAGE_DATASETS}, got {config.dataset!r}")
    if config.permuted and config.dataset != "mnist":
        raise ValueError("permuted: only the MNIST dataset has a permuted variant")
    return _standardised(splits)


IMAGE_DATASETS = ("mnist", "cifar10", "cifar10_gray", "pathfinder")


def pathfinder_splits(config: SequentialImageConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pathfinder pixel sequences ``[n, res^2, 1]`` in ``[0, 1]``: the released files under
    ``data_dir`` if set, else ``train_rows`` generated examples plus 10% each to validate and
    test (cached under ``cache_dir``), LRA's 80/10/10."""
    if config.data_dir:
        pixels, labels = vision.load_pathfinder_released(config.data_dir, config.difficulty)
        n = len(labels)
        cuts = (int(0.8 * n), int(0.9 * n))
        parts = dict(train=slice(0, cuts[0]), valid=slice(*cuts), test=slice(cuts[1], n))
        arrays = {name: (pixels[part], labels[part]) for name, part in parts.items()}
    else:
        held_out = max(1, config.train_rows // 8)
        path = vision.cache_pathfinder(config.cache_dir, config.data_seed, config.train_rows + 2 * held_out,
                                       resolution=config.resolution, difficulty=config.difficulty,
                                       workers=max(1, min(os.cpu_count() or 1, held_out // 500)))  # spawning costs s
        pixels, labels = vision.load_pathfinder_cache(path)
        cut = config.train_rows
        arrays = dict(train=(pixels[:cut], labels[:cut]), valid=(pixels[cut:cut + held_out], labels[cut:cut + held_out]),
                      test=(pixels[cut + held_out:], labels[cut + held_out:]))
    return {name: (x.reshape(len(x), -1, 1).astype(np.float32) / 255.0, y.astype(np.int32))
            for name, (x, y) in arrays.items()}


def image_task(config: SequentialImageConfig) -> ClassificationTask:
    return ClassificationTask(config, image_splits(config), num_classes=2 if config.dataset == "pathfinder" else 10)


TOKEN_DATASETS = ("listops", "imdb", "aan")


def token_task(config: TokenSequenceConfig) -> ClassificationTask:
    """The LRA token tasks (:class:`experiments.configs.TokenSequenceConfig`): int32 ids
    ``[n, max_length]`` padded with 0 (``[n, 2 max_length]``, the two documents side by
    side, for the AAN pairs)."""
    if config.dataset == "listops":
        folder = Path(config.data_dir).expanduser() if config.data_dir else listops_cache(config)
        files = dict(zip(("train", "valid", "test"), lra.LISTOPS_FILES))
        splits = {}
        for name, file in files.items():
            tokens, _, labels = lra.load_listops_tsv(folder / file, config.max_length)
            splits[name] = (tokens, labels)
        return ClassificationTask(config, splits, num_classes=10, vocab_size=len(lra.LISTOPS_VOCAB),
                                  pad_id=lra.PAD)
    if config.dataset == "imdb":
        folder = _data_dir(config, "IMDb (the aclImdb/ folder)")
        train, test = (lra.load_imdb(folder, split, config.max_length) for split in ("train", "test"))
        if config.val_rows >= len(train[2]):
            raise ValueError(f"val_rows: {config.val_rows} leaves no training rows of the {len(train[2])}")
        held_out = config.val_rows / len(train[2]) if config.val_rows else 0.0
        # LRA validates on the test split; with val_rows the last val_rows of a shuffled
        # training split validate instead (the shuffle is fixed by data_seed).
        order = np.random.default_rng(config.data_seed).permutation(len(train[2]))
        splits = _split_last(train[0][order], train[2][order], held_out) if held_out else dict(
            train=(train[0], train[2]), valid=(test[0], test[2]))
        return ClassificationTask(config, dict(splits, test=(test[0], test[2])), num_classes=2,
                                  vocab_size=lra.BYTE_VOCAB_SIZE, pad_id=lra.PAD)
    if config.dataset == "aan":
        folder = _data_dir(config, "the AAN pairs (new_aan_pair.{train,eval,test}.tsv)")
        splits = {}
        for name, file in dict(train="train", valid="eval", test="test").items():
            first, second, _, _, labels = lra.load_aan_tsv(folder / f"new_aan_pair.{file}.tsv", config.max_length)
            splits[name] = (np.concatenate([first, second], 1), labels)
        return ClassificationTask(config, splits, num_classes=2, vocab_size=lra.BYTE_VOCAB_SIZE,
                                  pad_id=lra.PAD, pair=True)
    raise ValueError(f"dataset: expected one of {TOKEN_DATASETS}, got {config.dataset!r}")


def image_patches(pictures: np.ndarray, patch_size: int) -> np.ndarray:
    """``[n, h, w]`` -> ``[n, (h / p) (w / p), p p]`` float32: non-overlapping patches in raster
    order, each flattened row by row (a ViT's patch tokens before the projection)."""
    n, h, w = pictures.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size: {patch_size} does not divide the image size {h} x {w}")
    grid = pictures.reshape(n, h // patch_size, patch_size, w // patch_size, patch_size)
    return grid.transpose(0, 1, 3, 2, 4).reshape(n, -1, patch_size * patch_size).astype(np.float32)


class ArrowPointingTask:
    """Arrow pointing (:class:`experiments.configs.ArrowPointingConfig`): training batch
    ``step`` is items ``step * b ...`` of the training stream (seed ``seed``); each test size
    has ``eval_rows`` items of stream ``seed + 1`` drawn at that size with the training
    size's object sizes. ``accuracy`` is the accuracy at the training size; the summary has
    every size."""

    num_classes, vocab_size = 2, None

    def __init__(self, config: ArrowPointingConfig):
        self.config = config
        for size in (config.resolution, *config.eval_resolutions):
            if size % config.patch_size:
                raise ValueError(f"patch_size: {config.patch_size} does not divide the image size {size}")
        rows = config.eval_rows or 1000
        self.eval_sets = {}
        for size in config.eval_resolutions:
            pictures, labels = vision.arrow_pointing_dataset(config.seed + 1, rows, resolution=size,
                                                             base_resolution=config.resolution)
            self.eval_sets[size] = classification_batches(image_patches(pictures, config.patch_size), labels,
                                                          config.eval_batch_size)

    def train_batch(self, step: int) -> Batch:
        c = self.config
        pictures, labels = vision.arrow_pointing_dataset(c.seed, c.batch_size, resolution=c.resolution,
                                                         start=step * c.batch_size)
        return Batch(image_patches(pictures, c.patch_size), labels, np.ones(len(labels), bool))

    def evaluate(self, model) -> dict[str, Any]:
        accuracy = {size: model.loss(batches)["accuracy"] for size, batches in self.eval_sets.items()}
        train_size = self.config.resolution
        return dict(accuracy=accuracy.get(train_size, next(iter(accuracy.values()))),
                    summary={f"acc @{size}" + (" (train)" if size == train_size else ""): a
                             for size, a in accuracy.items()},
                    curve=dict(xlabel="test image size (px)", ylabel="accuracy", x=list(accuracy),
                               y=list(accuracy.values()), vline=train_size))


def listops_cache(config: TokenSequenceConfig) -> Path:
    """The folder of generated ListOps files for this config's sizes, lengths and seed (made
    once): ``train_rows`` / 2k / 2k trees (at most ``train_rows`` each to validate and test) of
    ``max_length / 4`` to ``max_length`` tokens (LRA's 500 to 2000 at the default)."""
    held_out = min(lra.LISTOPS_SIZES[1], config.train_rows)  # 2k, or fewer for a tiny training set
    sizes = (config.train_rows, held_out, held_out)
    lengths = (config.max_length // 4, config.max_length)
    folder = Path(config.cache_dir) / (f"listops-seed{config.data_seed}-{'-'.join(map(str, sizes))}"
                                       f"-len{lengths[0]}-{lengths[1]}")
    if not all((folder / file).exists() for file in lra.LISTOPS_FILES):
        print(f"generating ListOps {sizes} into {folder} (once)", flush=True)
        lra.generate_listops_files(folder, seed=config.data_seed, sizes=sizes, min_length=lengths[0],
                                   max_length=lengths[1])
    return folder


TASKS = {
    "mqar": MQARTask,
    "selective_copying": SelectiveCopyingTask,
    "induction_heads": InductionHeadsTask,
    "boolean_icl": BooleanICLTask,
    "algorithmic": AlgorithmicTask,
    "lm": LMTask,
    "smnist": image_task,
    "psmnist": image_task,
    "scifar": image_task,
    "lra_image": image_task,
    "pathfinder": image_task,
    "path_x": image_task,
    "listops": token_task,
    "lra_text": token_task,
    "lra_retrieval": token_task,
    "arrow_pointing": ArrowPointingTask,
    "urpe": URPETask,
    "sequential_functions": SequentialFunctionsTask,
    "structural_recursion": StructuralRecursionTask,
    "gsm_graphs": GsmGraphsTask,
}

DESCRIPTIONS = {
    "mqar": "multi-query associative recall (Zoology): query accuracy per (seq_len, kv pairs)",
    "selective_copying": "copy the tokens scattered in noise (Mamba Table 1)",
    "induction_heads": "recall the token after a special token; length extrapolation (Mamba Table 11)",
    "boolean_icl": "learn Boolean functions in context; accuracy per prompt position vs the optimal learner",
    "algorithmic": "copy / reverse / addition; train short, test long (Universal Transformers)",
    "lm": "character-level language modelling on tinyshakespeare (nanoGPT shakespeare_char): val nats, bits/char",
    "smnist": "sequential MNIST: classify a digit from its 784 pixels one per step (test accuracy)",
    "psmnist": "permuted sequential MNIST: the pixels in one fixed random order (test accuracy)",
    "scifar": "sequential CIFAR-10: 1024 steps of RGB pixels, causal (S4); needs --set data_dir=DIR",
    "lra_image": "LRA Image: grayscale CIFAR-10 as 1024 pixels; needs --set data_dir=DIR",
    "pathfinder": "LRA Pathfinder-32: are the two dots joined by a path? (1024 pixels, generated)",
    "path_x": "LRA Path-X: Pathfinder at 128 x 128 (16384 pixels, generated)",
    "listops": "LRA ListOps: evaluate nested MIN/MAX/MED/SM lists, up to 2000 tokens (generated)",
    "lra_text": "LRA Text: byte-level IMDb sentiment, 4096 bytes; needs --set data_dir=DIR",
    "lra_retrieval": "LRA Retrieval: do two AAN papers cite each other? 2 x 4000 bytes; needs --set data_dir=DIR",
    "arrow_pointing": "pLSTM's arrow pointing: does the arrow point at the circle? train at 32 px, test larger",
    "urpe": "URPE: predict each token's position (random and constant rows); RPE-only attention cannot (Luo 2022)",
    "sequential_functions": "learn Mealy machines / linear recurrences mod p in context; output accuracy per class and by examples",
    "structural_recursion": "binary successor / tree traversal: train small, test larger; exact match vs bits / depth",
    "gsm_graphs": "GSM++ graph tasks (connectivity, cycle, shortest path, counts) as token sequences; acc vs nodes",
}


def build_task(experiment: str, config: ExperimentConfig):
    if experiment not in TASKS:
        raise ValueError(f"experiment: expected one of {tuple(TASKS)}, got {experiment!r}")
    return TASKS[experiment](config)
