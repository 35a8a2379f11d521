"""Character-level language modelling on a text file: a tokenizer, token windows and a
training :class:`TextTask`.

The text is split into the first ``1 - val_fraction`` (training) and the last
``val_fraction`` (validation) characters, as nanoGPT's ``shakespeare_char`` does (90% /
10%). The vocabulary is the sorted set of characters of the *training* part; a
validation character absent from it is an error (the model has no id for it, so its
loss is undefined).

A window starting at offset ``o`` of a token array ``x`` is the causal-LM pair

    inputs = x[o : o + T],   targets = x[o + 1 : o + T + 1],   mask = True

(next-character prediction at every position). Training windows start at offsets drawn
uniformly from the training tokens by ``batch_rng(seed, step)``, so batch ``step`` is a
pure function of the step (exact resume); validation windows are the consecutive,
non-overlapping windows from the start of the validation tokens (fixed for a run).
The validation loss is reported in nats per character and in bits per character
(``nats / ln 2``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Int

from ssmjax.data.synthetic import Batch, batch_rng


class CharTokenizer:
    """Characters <-> int ids, ``id = position in the sorted vocabulary``."""

    def __init__(self, chars: str):
        if not chars or len(set(chars)) != len(chars):
            raise ValueError(f"chars: expected a non-empty string of distinct characters, got {chars[:40]!r}")
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is the sorted set of characters of ``text``."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Int[np.ndarray, " n"]:
        """int32 ids of ``text``; a character outside the vocabulary is a ``ValueError``."""
        unknown = sorted(set(text) - self._ids.keys())
        if unknown:
            raise ValueError(f"text: {len(unknown)} character(s) not in the vocabulary of {self.vocab_size}: "
                             f"{''.join(unknown)[:40]!r}")
        return np.fromiter((self._ids[c] for c in text), np.int32, len(text))

    def decode(self, ids: Any) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids: expected values in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        return "".join(self.chars[i] for i in ids)


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """``(first 1 - val_fraction, last val_fraction)`` of ``text`` by characters."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a fraction in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def windows(tokens: Int[np.ndarray, " n"], starts: Int[np.ndarray, " b"], seq_len: int) -> Batch:
    """The causal-LM :class:`Batch` of the windows of ``tokens`` starting at ``starts``:
    inputs ``tokens[o:o+T]``, targets ``tokens[o+1:o+T+1]`` (``[b, T]`` int32), mask all
    True. Every start needs ``o + T + 1 <= len(tokens)``."""
    starts = np.asarray(starts, np.int64)
    if starts.size and (starts.min() < 0 or starts.max() + seq_len + 1 > len(tokens)):
        raise ValueError(f"starts: windows of seq_len + 1 = {seq_len + 1} tokens must fit in {len(tokens)} tokens, "
                         f"got starts in [{starts.min()}, {starts.max()}]")
    index = starts[:, None] + np.arange(seq_len + 1)
    chunk = np.asarray(tokens, np.int32)[index]
    return Batch(chunk[:, :-1], chunk[:, 1:], np.ones((len(starts), seq_len), bool))


def random_windows(tokens: Int[np.ndarray, " n"], seed: int, step: int, *, batch_size: int, seq_len: int,
                   stream: int = 0) -> Batch:
    """Batch ``step``: ``batch_size`` windows at uniform offsets drawn by
    ``batch_rng(seed, step, stream)``."""
    count = len(tokens) - seq_len
    if count < 1:
        raise ValueError(f"seq_len: {seq_len} needs at least seq_len + 1 = {seq_len + 1} tokens, got {len(tokens)}")
    return windows(tokens, batch_rng(seed, step, stream).integers(0, count, batch_size), seq_len)


def sequential_windows(tokens: Int[np.ndarray, " n"], *, seq_len: int, batch_size: int,
                       max_windows: int | None = None) -> list[Batch]:
    """The consecutive non-overlapping windows ``0, T, 2T, ...`` of ``tokens`` (at most
    ``max_windows``), in batches of up to ``batch_size``."""
    count = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(f"seq_len: {seq_len} needs at least seq_len + 1 = {seq_len + 1} tokens, got {len(tokens)}")
    starts = np.arange(count) * seq_len
    return [windows(tokens, starts[i:i + batch_size], seq_len) for i in range(0, count, batch_size)]


class TextTask:
    """A character-level causal language model on ``text`` (a :class:`ssmjax.train.Task`).

    ``train_batch(step)``: ``batch_size`` random windows of ``seq_len`` characters of the
    training split. ``evaluate(model)``: the loss over the first ``eval_windows``
    consecutive windows of the validation split (all of them if ``None``): ``loss``
    (nats/char), ``bits_per_char``, ``perplexity`` and next-character ``accuracy``.
    """

    def __init__(self, text: str, *, seq_len: int = 128, batch_size: int = 32, seed: int = 0,
                 val_fraction: float = 0.1, eval_windows: int | None = 256):
        train_text, val_text = split_text(text, val_fraction)
        self.tokenizer = CharTokenizer.fit(train_text)
        self.vocab_size = self.tokenizer.vocab_size
        self.train_tokens = self.tokenizer.encode(train_text)
        try:
            self.val_tokens = self.tokenizer.encode(val_text)
        except ValueError as error:
            raise ValueError(f"text: the validation split (last {val_fraction:.0%}) has characters the training "
                             f"split lacks: {error}") from None
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        random_windows(self.train_tokens, seed, 0, batch_size=batch_size, seq_len=seq_len)  # validates the sizes
        self.val_batches = sequential_windows(self.val_tokens, seq_len=seq_len, batch_size=batch_size,
                                              max_windows=eval_windows)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> TextTask:
        """The task on the UTF-8 text file at ``path`` (read, never copied)."""
        return cls(Path(path).read_text(encoding="utf-8"), **kwargs)

    def train_batch(self, step: int) -> Batch:
        return random_windows(self.train_tokens, self.seed, step, batch_size=self.batch_size, seq_len=self.seq_len)

    def evaluate(self, model: Any) -> dict[str, Any]:
        scores = model.loss(self.val_batches)
        bits = scores["loss"] / math.log(2.0)
        return dict(accuracy=scores["accuracy"], loss=scores["loss"], bits_per_char=bits,
                    perplexity=scores["perplexity"], val_chars=scores["count"],
                    summary={"val loss (nats/char)": scores["loss"], "val bits/char": bits,
                             "val acc": scores["accuracy"]})
