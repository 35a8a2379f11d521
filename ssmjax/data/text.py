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

Unknown characters. A user's corpus may have validation characters the training split
lacks. ``unknown="error"`` (the default) makes that a ``ValueError``; ``unknown="map"``
reserves one extra id (``vocab_size - 1``, decoded as U+FFFD) that every unseen
character encodes to, so the loss stays defined (and the model is charged for them).

Byte-level corpora (:func:`load_corpus`): ``"bytes"`` reads any file as bytes (vocabulary
of 256, split 90/10 like the text); ``"enwik8"`` is the standard split of the enwik8 /
text8 raw files (first 90M bytes train, next 5M validation, last 5M test; Mahoney's
Hutter-prize data as used by Al-Rfou et al., 2019, and Transformer-XL); ``"wikitext"``
reads WikiText's ``wiki.{train,valid,test}.tokens`` (or ``.raw``) files of a directory
(Merity et al., 2016) as bytes. Bits per byte there is ``nats / ln 2`` per byte.
"""

from __future__ import annotations

import math
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Int

from ssmjax.checks import check_choice
from ssmjax.data.synthetic import Batch, batch_rng

UNKNOWN_POLICIES = ("error", "map")
UNKNOWN_CHAR = "\ufffd"  # what the reserved unknown id decodes to
CORPUS_FORMATS = ("char", "bytes", "enwik8", "wikitext")
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)  # train / validation / test bytes of enwik8 and text8


class CharTokenizer:
    """Characters <-> int ids, ``id = position in the sorted vocabulary``.

    ``unknown``: ``"error"`` (encoding a character outside ``chars`` is a ``ValueError``)
    or ``"map"`` (it encodes to the reserved id ``len(chars)``, which decodes to
    :data:`UNKNOWN_CHAR`; ``vocab_size`` is then ``len(chars) + 1``).
    """

    def __init__(self, chars: str, unknown: str = "error"):
        if not chars or len(set(chars)) != len(chars):
            raise ValueError(f"chars: expected a non-empty string of distinct characters, got {chars[:40]!r}")
        self.unknown = check_choice("unknown", unknown, UNKNOWN_POLICIES)
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}
        self.unknown_id = len(chars) if unknown == "map" else None

    @classmethod
    def fit(cls, text: str, unknown: str = "error") -> CharTokenizer:
        """The tokenizer whose vocabulary is the sorted set of characters of ``text``."""
        return cls("".join(sorted(set(text))), unknown)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + (self.unknown_id is not None)

    def encode(self, text: str) -> Int[np.ndarray, " n"]:
        """int32 ids of ``text``; a character outside the vocabulary is a ``ValueError``
        (``unknown="error"``) or the reserved id (``unknown="map"``)."""
        unknown = sorted(set(text) - self._ids.keys())
        if unknown and self.unknown_id is None:
            raise ValueError(f"text: {len(unknown)} character(s) not in the vocabulary of {self.vocab_size}: "
                             f"{''.join(unknown)[:40]!r} (unknown='map' maps them to a reserved id)")
        ids, default = self._ids, self.unknown_id
        return np.fromiter((ids.get(c, default) for c in text), np.int32, len(text))

    def decode(self, ids: Any) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids: expected values in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        return "".join(self.chars[i] if i < len(self.chars) else UNKNOWN_CHAR for i in ids)


class ByteTokenizer:
    """Bytes <-> ids ``0..255`` (text is UTF-8 encoded; decoding replaces invalid UTF-8)."""

    vocab_size = 256
    unknown = "error"

    def encode(self, text: str | bytes) -> Int[np.ndarray, " n"]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"ids: expected values in [0, 256), got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


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


def repeat_passages(batch: Batch, fraction: float, seed: int, step: int, *, stream: int = 1) -> Batch:
    """``batch`` with a ``fraction`` of its rows (drawn by ``batch_rng(seed, step, stream)``)
    turned into an exact repeat: the row's tokens ``u = inputs + last target`` (``T + 1``)
    become ``u[:L] u[:T + 1 - L]``, ``L = (T + 1) // 2``, so the second half copies the first
    (and then continues it). Mixed into language-model training, this teaches in-context
    copying, which a character model does not learn from a short context of natural text
    alone; the rows stay ordinary next-token targets."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: expected a value in [0, 1], got {fraction}")
    tokens = np.concatenate([batch.inputs, batch.targets[:, -1:]], axis=1)
    rows = batch_rng(seed, step, stream).random(len(tokens)) < fraction
    if not rows.any():
        return batch
    half = tokens.shape[1] // 2
    tokens = tokens.copy()
    tokens[rows] = np.concatenate([tokens[rows, :half], tokens[rows, :tokens.shape[1] - half]], axis=1)
    return Batch(tokens[:, :-1], tokens[:, 1:], batch.mask)


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


def split_counts(tokens: Int[np.ndarray, " n"], counts: tuple[int, ...]) -> list[np.ndarray]:
    """Consecutive pieces of ``counts[i]`` tokens from the start (enwik8: 90M / 5M / 5M);
    ``sum(counts)`` must not exceed ``len(tokens)``."""
    if any(c < 1 for c in counts) or sum(counts) > len(tokens):
        raise ValueError(f"counts: expected positive counts summing to at most the {len(tokens)} tokens, got {counts}")
    edges = np.cumsum((0, *counts))
    return [np.asarray(tokens[a:b]) for a, b in zip(edges[:-1], edges[1:])]


@dataclasses.dataclass
class Corpus:
    """Token ids of a corpus' splits and the tokenizer that made them (``test`` may be ``None``)."""

    tokenizer: Any
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray | None = None


def _wikitext_files(path: Path) -> dict[str, Path]:
    folder = path if path.is_dir() else path.parent
    files = {}
    for split in ("train", "valid", "test"):
        found = [p for p in (folder / f"wiki.{split}.tokens", folder / f"wiki.{split}.raw") if p.exists()]
        if not found:
            raise ValueError(f"path: {folder} has no wiki.{split}.tokens (or .raw) file; format='wikitext' expects "
                             "the WikiText raw release's wiki.train/valid/test.tokens in one directory")
        files[split] = found[0]
    return files


def load_corpus(path: str | Path, format: str = "char", *, val_fraction: float = 0.1, unknown: str = "error",
                split_sizes: tuple[int, int, int] = ENWIK8_SPLIT) -> Corpus:
    """The tokenized splits of the corpus at ``path`` (read, never copied; see the module
    docstring): ``"char"`` (UTF-8 text, vocabulary from the training split, ``unknown``
    policy for the rest, ``val_fraction`` split), ``"bytes"`` (any file, 256 byte ids,
    ``val_fraction`` split), ``"enwik8"`` (``split_sizes`` bytes train / valid / test,
    default 90M / 5M / 5M) or ``"wikitext"`` (the directory's ``wiki.*.tokens`` as bytes)."""
    check_choice("format", format, CORPUS_FORMATS)
    path = Path(path)
    if format == "wikitext":
        files = _wikitext_files(path)
        tok = ByteTokenizer()
        return Corpus(tok, *(tok.encode(files[s].read_bytes()) for s in ("train", "valid", "test")))
    if not path.is_file():
        raise ValueError(f"path: no file at {path}")
    if format == "char":
        train_text, val_text = split_text(path.read_text(encoding="utf-8"), val_fraction)
        tok = CharTokenizer.fit(train_text, unknown)
        try:
            return Corpus(tok, tok.encode(train_text), tok.encode(val_text))
        except ValueError as error:
            raise ValueError(f"text: the validation split (last {val_fraction:.0%}) has characters the training "
                             f"split lacks: {error}") from None
    tok, data = ByteTokenizer(), path.read_bytes()
    ids = tok.encode(data)
    if format == "enwik8":
        return Corpus(tok, *split_counts(ids, tuple(split_sizes)))
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a fraction in (0, 1), got {val_fraction}")
    cut = int(len(ids) * (1.0 - val_fraction))
    return Corpus(tok, ids[:cut], ids[cut:])


class TextTask:
    """A character-level causal language model on ``text`` (a :class:`ssmjax.train.Task`).

    ``train_batch(step)``: ``batch_size`` random windows of ``seq_len`` characters of the
    training split. ``evaluate(model)``: the loss over the first ``eval_windows``
    consecutive windows of the validation split (all of them if ``None``): ``loss``
    (nats/char), ``bits_per_char``, ``perplexity`` and next-character ``accuracy``.
    """

    def __init__(self, text: str, *, seq_len: int = 128, batch_size: int = 32, seed: int = 0,
                 val_fraction: float = 0.1, eval_windows: int | None = 256, unknown: str = "error"):
        train_text, val_text = split_text(text, val_fraction)
        tokenizer = CharTokenizer.fit(train_text, unknown)
        train_tokens = tokenizer.encode(train_text)
        try:
            val_tokens = tokenizer.encode(val_text)
        except ValueError as error:
            raise ValueError(f"text: the validation split (last {val_fraction:.0%}) has characters the training "
                             f"split lacks: {error}") from None
        self._setup(tokenizer, train_tokens, val_tokens, seq_len, batch_size, seed, eval_windows)

    def _setup(self, tokenizer, train_tokens, val_tokens, seq_len, batch_size, seed, eval_windows):
        self.tokenizer, self.vocab_size = tokenizer, tokenizer.vocab_size
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        random_windows(self.train_tokens, seed, 0, batch_size=batch_size, seq_len=seq_len)  # validates the sizes
        self.val_batches = sequential_windows(self.val_tokens, seq_len=seq_len, batch_size=batch_size,
                                              max_windows=eval_windows)

    @classmethod
    def from_corpus(cls, corpus: Corpus, *, seq_len: int = 128, batch_size: int = 32, seed: int = 0,
                    eval_windows: int | None = 256, eval_batch_size: int | None = None) -> TextTask:
        """The task on a :func:`load_corpus` corpus (training on ``train``, scoring ``valid``);
        validation batches hold ``eval_batch_size`` windows (default ``batch_size``)."""
        task = cls.__new__(cls)
        task._setup(corpus.tokenizer, corpus.train, corpus.valid, seq_len, batch_size, seed, eval_windows)
        if eval_batch_size is not None:
            task.val_batches = sequential_windows(corpus.valid, seq_len=seq_len, batch_size=eval_batch_size,
                                                  max_windows=eval_windows)
        return task

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
