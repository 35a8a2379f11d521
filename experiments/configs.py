"""Experiment configurations: one plain dataclass per experiment, each with a CPU size
(finishes in minutes on 2 cores) and the paper size, and ``--set key=value`` overrides.

Every config has the training fields of :class:`ssmjax.train.TrainConfig` (``steps``,
``lr``, ``seed``, ...), ``batch_size`` (the rows of every training batch the task makes),
the model fields (``model``: a registry name or
a hybrid pattern such as ``"gated_deltanet*3,attention"``; ``d_model``, ``n_layers``,
``mlp``, ``mixer_fields``) and the task fields below.

Paper sizes follow the papers' descriptions; where a paper leaves a detail open (or a
setting cannot run on one accelerator) the value here is the nearest faithful one and
is marked "approx." in the comment.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from ssmjax.train import TrainConfig


@dataclasses.dataclass
class ExperimentConfig(TrainConfig):
    batch_size: int = 32  # rows of each training batch (the tasks in experiments/tasks.py read it)
    model: str = "attention"
    d_model: int = 64
    n_layers: int | None = None  # None: the pattern sets the depth (ssmjax.models.model_depth)
    mlp: str = "gated"
    mixer_fields: dict = dataclasses.field(default_factory=dict)  # {"mamba": {"d_state": 16}, ...}
    eval_batch_size: int = 64
    eval_batches: int = 2

    @property
    def variant(self) -> str:
        """Which sub-task a run is (part of its directory name); empty if there is one."""
        return ""


@dataclasses.dataclass
class MQARConfig(ExperimentConfig):
    """Arora et al., 2023, "Zoology": train on a mixture of (seq_len, kv pairs) shapes
    (round-robin over steps), report query accuracy per shape."""

    vocab_size: int = 8192
    train_shapes: tuple = ((64, 4), (128, 8), (256, 16))
    eval_shapes: tuple = ((64, 4), (128, 8), (256, 16))
    power_a: float = 0.01


@dataclasses.dataclass
class SelectiveCopyingConfig(ExperimentConfig):
    """Gu & Dao, 2023, "Mamba", Table 1: ``seq_len`` noise tokens (L), ``num_tokens`` to
    copy (M), ``vocab_size`` (A) including noise and marker."""

    seq_len: int = 256
    num_tokens: int = 8
    vocab_size: int = 10
    variable: bool = True


@dataclasses.dataclass
class InductionHeadsConfig(ExperimentConfig):
    """Gu & Dao, 2023, "Mamba", Table 11: train at ``seq_len``, evaluate at
    ``seq_len * m`` for ``m`` in ``eval_multiples``."""

    seq_len: int = 64
    vocab_size: int = 16
    eval_multiples: tuple = (1, 2, 4, 8, 16)
    eval_tokens: int = 2 ** 18  # per length at most this many tokens (fewer sequences at long lengths)


@dataclasses.dataclass
class BooleanICLConfig(ExperimentConfig):
    """Bhattamishra et al., 2023: learn ``function`` from ``num_examples`` labelled
    examples of ``num_bits`` bits in context; accuracy per prompt position. ``encoding``:
    ``"bits"`` (one token per bit, then the label) or ``"example"`` (one token per input
    ``x``, then the label: the paper's one position per input, with a learned embedding of
    the ``2^num_bits`` inputs in place of its linear map of the bit vector)."""

    function: str = "conjunction"
    encoding: str = "bits"
    num_bits: int = 8
    num_examples: int = 24
    sparsity: int = 3
    planted_fraction: float = 0.3

    @property
    def variant(self) -> str:
        return self.function


@dataclasses.dataclass
class AlgorithmicConfig(ExperimentConfig):
    """Dehghani et al., 2019, "Universal Transformers": ``task`` in copy / reverse /
    addition, trained on lengths ``1..train_max_len``, tested at ``eval_lengths``."""

    task: str = "copy"
    train_max_len: int = 20
    eval_lengths: tuple = (5, 10, 20, 40, 60, 80)

    @property
    def variant(self) -> str:
        return self.task


@dataclasses.dataclass
class LMConfig(ExperimentConfig):
    """Character-level language modelling on a real text file (nanoGPT's ``shakespeare_char``
    protocol: first ``1 - val_fraction`` of the characters train, the rest validate).

    ``data_file`` is read from ``data_dir`` (empty: ``$SSMJAX_DATA``, else
    ``../shared/data`` next to the repository); ``format``: ``"char"`` (a UTF-8 file, the
    vocabulary is the training split's characters), ``"bytes"`` (any file, 256 byte ids,
    the same fractional split), ``"enwik8"`` (enwik8 / text8 raw files: 90M / 5M / 5M
    bytes) or ``"wikitext"`` (``data_file`` is a directory holding WikiText's
    ``wiki.{train,valid,test}.tokens``, read as bytes); see :mod:`ssmjax.data.text`.
    ``unknown``: what a validation character outside the training vocabulary does,
    ``"error"`` or ``"map"`` (to a reserved id). ``eval_windows``: consecutive
    validation windows scored at each evaluation (``0``: all of them).
    """

    data_file: str = "tinyshakespeare.txt"
    data_dir: str = ""
    format: str = "char"
    unknown: str = "error"
    seq_len: int = 64
    val_fraction: float = 0.1
    eval_windows: int = 0


_CPU_TRAIN = dict(lr=3e-3, warmup_steps=50, weight_decay=0.1, log_every=25, checkpoint_every=250)

SIZES: dict[str, dict[str, ExperimentConfig]] = {
    "mqar": {
        "cpu": MQARConfig(steps=1000, batch_size=32, eval_every=250, eval_batch_size=32, eval_batches=4, **_CPU_TRAIN),
        # Zoology: 2 layers, d_model up to 512 (swept), lr swept, 64 epochs of 100k examples
        # over (seq, kv) up to (256, 64); approx.: one width, one lr, 64 * 100k / 64 steps.
        "paper": MQARConfig(steps=100_000, batch_size=64, lr=1e-3, warmup_steps=1000, d_model=256,
                            train_shapes=((64, 4), (128, 8), (256, 16), (256, 32), (256, 64)),
                            eval_shapes=((64, 4), (128, 8), (256, 16), (256, 32), (256, 64), (512, 64), (512, 128)),
                            eval_every=5000, checkpoint_every=5000, log_every=100, eval_batches=16),
    },
    "selective_copying": {
        "cpu": SelectiveCopyingConfig(steps=1500, batch_size=32, eval_every=500, **_CPU_TRAIN),
        # Mamba E.1: L = 4096, vocab 16, 16 tokens, 2 layers, d = 64, 400k steps, batch 64,
        # constant lr 1e-4 (approx.: cosine to 10% after a short warmup).
        "paper": SelectiveCopyingConfig(steps=400_000, batch_size=64, lr=1e-4, warmup_steps=1000, seq_len=4096,
                                        num_tokens=16, vocab_size=16, final_lr_ratio=1.0, eval_every=10_000,
                                        checkpoint_every=10_000, log_every=100, eval_batches=8),
    },
    "induction_heads": {
        "cpu": InductionHeadsConfig(steps=1500, batch_size=32, eval_every=500, eval_batches=4, **_CPU_TRAIN),
        # Mamba E.1: vocab 16, train length 256, 2 layers, d = 64, batch 8, 25 "epochs" of
        # 8192 steps, test lengths 2^6 .. 2^20.
        "paper": InductionHeadsConfig(steps=204_800, batch_size=8, lr=1e-3, warmup_steps=1000, seq_len=256,
                                      eval_multiples=(0.25, 0.5, 1, 2, 4, 8, 16, 64, 256, 1024, 4096),
                                      eval_every=8192, checkpoint_every=8192, log_every=100, eval_batches=8),
    },
    "boolean_icl": {
        # one token per input, 5 bits, 20 examples: attention's accuracy rises with the prompt
        # position to near the Bayes-optimal learner's in ~4 minutes (experiments/notes/boolean_icl.md)
        "cpu": BooleanICLConfig(steps=6000, batch_size=32, eval_every=2000, eval_batches=4, encoding="example",
                                num_bits=5, num_examples=20, **_CPU_TRAIN),
        # Bhattamishra et al.: n = 28 bits, prompts of up to 70 examples, 12-layer d = 256
        # models (approx.; Bayes-optimal baseline is not enumerable at n = 28; one token per bit,
        # as 2^28 input tokens cannot be embedded, where the paper embeds each input at one position).
        "paper": BooleanICLConfig(steps=30_000, batch_size=64, lr=1e-4, warmup_steps=1000, num_bits=28,
                                  num_examples=70, d_model=256, n_layers=12, eval_every=2000, checkpoint_every=2000,
                                  log_every=100, eval_batches=8),
    },
    "algorithmic": {
        "cpu": AlgorithmicConfig(steps=2000, batch_size=32, eval_every=500, **_CPU_TRAIN),
        # Universal Transformers: train on lengths up to 40, test at 400 (approx. sizes).
        "paper": AlgorithmicConfig(steps=100_000, batch_size=64, lr=1e-3, warmup_steps=1000, train_max_len=40,
                                   eval_lengths=(10, 20, 40, 100, 200, 400), d_model=256, n_layers=6,
                                   eval_every=5000, checkpoint_every=5000, log_every=100, eval_batches=8),
    },
    "lm": {
        # nanoGPT's CPU "baby GPT" on shakespeare_char (README: 4 layers, 4 heads, n_embd 128,
        # block 64, batch 12, 2000 iterations, lr_decay_iters 2000, dropout 0) with
        # config/train_shakespeare_char.py's optimiser (lr 1e-3 -> min_lr 1e-4, warmup 100,
        # beta2 0.99, weight decay 0.1, grad clip 1); val loss ~1.88 nats/char.
        "cpu": LMConfig(steps=2000, batch_size=12, seq_len=64, d_model=128, n_layers=4, lr=1e-3, final_lr_ratio=0.1,
                        warmup_steps=100, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_every=500,
                        eval_batch_size=64, log_every=50, checkpoint_every=500),
        # nanoGPT's GPU config (6 layers, 6 heads, 384, block 256, batch 64, 5000 iterations,
        # lr 1e-3 -> 1e-4); val loss 1.4697. approx.: no dropout (0.2 in nanoGPT; the backbone has none).
        "paper": LMConfig(steps=5000, batch_size=64, seq_len=256, d_model=384, n_layers=6, lr=1e-3,
                          final_lr_ratio=0.1, warmup_steps=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
                          mixer_fields={"attention": {"num_heads": 6}}, eval_every=250, eval_batch_size=64,
                          log_every=50, checkpoint_every=500),
    },
}

EXPERIMENTS = tuple(SIZES)


def make_config(experiment: str, size: str = "cpu", overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """A fresh copy of the ``experiment``'s ``size`` config with ``overrides`` applied."""
    if experiment not in SIZES:
        raise ValueError(f"experiment: expected one of {EXPERIMENTS}, got {experiment!r}")
    if size not in SIZES[experiment]:
        raise ValueError(f"size: expected one of {tuple(SIZES[experiment])}, got {size!r}")
    return replace(SIZES[experiment][size], **(overrides or {}))


def replace(config: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """``dataclasses.replace`` that names the valid fields when one is unknown."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"--set: unknown field(s) {unknown} for {type(config).__name__}; fields: {sorted(names)}")
    return dataclasses.replace(config, **changes)


def parse_overrides(config: ExperimentConfig, items: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "train_shapes=((64, 4),)"]`` -> typed values, using each field's
    current value as the type (bools accept true/false/1/0; tuples, lists and dicts are
    Python literals)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        if key not in fields:
            raise ValueError(f"--set: unknown field {key!r} for {type(config).__name__}; fields: {sorted(fields)}")
        out[key] = _parse_value(key, text.strip(), fields[key])
    return out


def _parse_value(key: str, text: str, current: Any) -> Any:
    try:
        if current is None:  # an optional field (e.g. n_layers): any literal; the consumer validates it
            return ast.literal_eval(text)
        if isinstance(current, bool):
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if isinstance(current, int):
            value = ast.literal_eval(text.replace("_", ""))
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise ValueError
            return value
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        value = ast.literal_eval(text)
        if isinstance(current, tuple) and isinstance(value, (list, tuple)):
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if not isinstance(value, type(current)):
            raise ValueError
        return value
    except (ValueError, SyntaxError):
        raise ValueError(f"--set: cannot parse {key}={text!r} as {type(current).__name__}") from None


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(experiment: str, values: dict[str, Any]) -> ExperimentConfig:
    """Inverse of :func:`config_to_dict` (JSON turns tuples into lists; they are restored)."""
    base = SIZES[experiment]["cpu"]
    fixed = {}
    for f in dataclasses.fields(base):
        if f.name in values:
            v = values[f.name]
            fixed[f.name] = _as_tuple(v) if isinstance(getattr(base, f.name), tuple) else v
    return replace(base, **fixed)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value
