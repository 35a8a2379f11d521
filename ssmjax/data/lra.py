"""Long Range Arena token tasks: ListOps (generator, evaluator, TSV files, tokenizer),
byte-level IMDb text, AAN retrieval pairs and CIFAR-10 images (grayscale tokens and sCIFAR).

The protocol is the one of Tay et al., 2021, "Long Range Arena: A Benchmark for Efficient
Transformers" (ICLR), code ``google-research/long-range-arena`` (``lra_benchmarks/``):

* **ListOps** (``data/listops.py``, ``listops/input_pipeline.py``). A tree is grown from the
  root at depth 1: a node at depth ``< max_depth`` is an operator with probability 0.25
  (else a value), a node at depth ``max_depth`` is a value; an operator draws its argument
  count uniformly from ``[2, max_args]``; values are uniform in 0-9; operators are MIN, MAX,
  MED and SM (sum mod 10) with equal probability. MED is ``int(np.median(args))``: for an even
  count the mean of the two middle values, truncated (``[MED 1 2 ]`` is 1). The length is the
  number of operator, value and ``]`` tokens; a tree is kept when ``min_length < length <
  max_length`` (strict, 500 and 2000) and is not a duplicate; 96k / 2k / 2k distinct trees
  are written to ``basic_{train,val,test}.tsv`` (a ``Source\\tTarget`` header, then rows). LRA
  writes each binary node with parentheses (``( ( ( [MAX 2 ) 9 ) ] )``, ``parens=True``
  here); the tokenizer drops them. LRA's own tokenizer (``tfds`` ``Tokenizer``, alphanumeric
  only) also drops ``[`` and ``]``; like S4 (Gu et al., 2022, ``src/dataloaders/lra.py``,
  which keeps ``]`` as a token) the vocabulary here keeps the closing bracket, so the
  sequence determines the tree: :data:`LISTOPS_VOCAB`.
* **Text** (``text_classification/input_pipeline.py``): IMDb reviews (Maas et al., 2011) as
  UTF-8 bytes, ``tfds`` ``ByteTextEncoder`` ids ``byte + 1`` (0 is padding, vocabulary 257),
  truncated to 4096 (the LRA text task's length), 25k train / 25k test (LRA validates on test).
* **Retrieval** (``matching/input_pipeline.py``): AAN citation pairs, TSV files
  ``new_aan_pair.{train,eval,test}.tsv`` read with ``header=False``, 5 columns ``label id1 id2
  text1 text2`` (label parsed as a float, cast to int), quotes not special; each text as
  byte ids (as above) truncated to 4000.
* **Image** (``image/input_pipeline.py``): CIFAR-10 as
  ``tf.image.rgb_to_grayscale`` (``0.2989 R + 0.5870 G + 0.1140 B`` on pixels scaled to
  ``[0, 1]`` in float32, back to uint8 by ``floor(gray * 255.5)``), 1024 tokens in
  ``[0, 256)``; LRA splits ``train[:90%]`` / ``train[90%:]`` / ``test``. sCIFAR (the 3-channel
  sequence of S4) is the raster-order pixel sequence ``[1024, 3]``.

Readers raise ``ValueError`` naming the file (and the line where there is one) and the
problem. Nothing is downloaded: the files are the official archives, unpacked.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int, UInt8

PAD = 0  # padding id of every tokenisation here
LISTOPS_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_END = "]"
#: Fixed ListOps vocabulary: id = position (PAD, digits 0-9, the four operators, ``]``).
LISTOPS_VOCAB = ("<pad>", *(str(v) for v in range(10)), *LISTOPS_OPERATORS, LISTOPS_END)
LISTOPS_SIZES = (96_000, 2_000, 2_000)  # LRA train / val / test
LISTOPS_FILES = ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv")
LISTOPS_HEADER = "Source\tTarget"
LISTOPS_OPERATOR_P = 0.25  # LRA's VALUE_P: a node below max_depth is an operator with this probability
LISTOPS_MAX_LENGTH = 2000
BYTE_VOCAB_SIZE = 257  # byte + 1, 0 = PAD
IMDB_MAX_LENGTH = 4096
AAN_MAX_LENGTH = 4000
GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

_LISTOPS_IDS = {token: i for i, token in enumerate(LISTOPS_VOCAB) if i != PAD}
_DIGITS = {str(v): v for v in range(10)}
_LISTOPS_DROPPED = ("(", ")")


# --------------------------------------------------------------------------------------
# ListOps: generator and evaluator


def _max_listops_length(max_depth: int, max_args: int) -> int:
    length = 1  # a value at depth max_depth
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


def _uniforms(rng: np.random.Generator):
    while True:
        yield from rng.random(4096).tolist()


def _grow_listops(draw, max_depth: int, max_args: int, max_length: int, parens: bool
                  ) -> tuple[str, int, int] | None:
    """One random tree as ``(text, value, length)``, grown depth-first (node kind, argument
    count, operator, then the arguments in order); ``None`` as soon as the length reaches
    ``max_length`` (LRA would reject it). One loop, no per-node calls (fast under the
    tests' type-checking hook). ``parens``: LRA's ``to_string`` of its binary tuples, i.e.
    ``k + 1`` opening ``(`` before an operator of ``k`` arguments, ``)`` after each
    argument and after the ``]``."""
    tokens: list[str] = []
    stack: list[tuple[str, int, list[int]]] = []  # open operators: (op, argument count, values so far)
    length = 0
    while True:
        if len(stack) + 1 < max_depth and next(draw) < LISTOPS_OPERATOR_P:
            count = 2 + int(next(draw) * (max_args - 1))
            op = LISTOPS_OPERATORS[int(next(draw) * len(LISTOPS_OPERATORS))]
            if parens:
                tokens += ["("] * (count + 1)
            tokens.append(op)
            stack.append((op, count, []))
            length += 2
            continue
        length += 1
        if length >= max_length:
            return None
        value = int(next(draw) * 10)
        tokens.append(str(value))
        while stack:
            op, count, values = stack[-1]
            values.append(value)
            if parens:
                tokens.append(")")
            if len(values) < count:
                break
            stack.pop()
            tokens += ["]", ")"] if parens else ["]"]
            if op == "[MIN":
                value = min(values)
            elif op == "[MAX":
                value = max(values)
            elif op == "[MED":  # LRA's int(np.median(values)): the middle pair's mean, truncated
                values.sort()
                value = (values[(count - 1) // 2] + values[count // 2]) // 2
            else:  # [SM
                value = sum(values) % 10
        else:
            return " ".join(tokens), value, length


def listops_expressions(seed: int, n: int, *, max_depth: int = 10, max_args: int = 10, min_length: int = 500,
                        max_length: int = 2000, parens: bool = False) -> list[tuple[str, int]]:
    """``n`` distinct random ListOps expressions ``(text, label)``, deterministic per ``seed``.

    LRA's generator (``lra_benchmarks/data/listops.py``, see the module docstring): root at
    depth 1, operator with probability 0.25 below ``max_depth`` (so operators nest at most
    ``max_depth - 1`` deep), ``[2, max_args]`` arguments, values 0-9, kept when
    ``min_length < length < max_length`` (length = operator, value and ``]`` tokens) and not
    already drawn. Text like ``[MAX 2 9 [MIN 4 7 ] 0 ]``; ``parens=True`` writes LRA's
    release format ``( ( ( ( [MAX 2 ) 9 ) ...``. Labels are in ``[0, 10)``.
    """
    if n < 0:
        raise ValueError(f"n: expected a count >= 0, got {n}")
    if max_depth < 1 or max_args < 2:
        raise ValueError(f"max_depth, max_args: expected >= 1 and >= 2, got {max_depth} and {max_args}")
    longest = _max_listops_length(max_depth, max_args)
    if max_length - min_length < 2 or min_length + 1 > longest:
        raise ValueError(f"min_length, max_length: no tree has min_length {min_length} < length < max_length "
                         f"{max_length} (the longest tree of max_depth {max_depth}, max_args {max_args} has {longest})")
    draw = _uniforms(np.random.default_rng(seed))
    rows, seen = [], set()
    while len(rows) < n:
        tree = _grow_listops(draw, max_depth, max_args, max_length, parens)
        if tree is None or tree[2] <= min_length:
            continue
        text, label, _ = tree
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    return rows


def _listops_tokens(text: str) -> list[str]:
    return [t for t in text.split() if t not in _LISTOPS_DROPPED]


def evaluate_listops(text: str) -> int:
    """The value of a ListOps expression (LRA text, with or without parentheses), by a
    token stack: ``[OP`` opens a frame, a value joins the top frame, ``]`` closes it with
    MIN / MAX / MED = ``int(np.median(args))`` / SM = sum mod 10 (LRA's ``to_value``)."""
    stack: list[tuple[str, list[int]]] = []
    result: list[int] = []
    for token in _listops_tokens(text):
        if token in LISTOPS_OPERATORS:
            stack.append((token, []))
            continue
        if token == LISTOPS_END:
            if not stack or not stack[-1][1]:
                raise ValueError(f"text: ']' without an open operator with arguments in {text[:80]!r}")
            op, args = stack.pop()
            if op == "[MIN":
                value = min(args)
            elif op == "[MAX":
                value = max(args)
            elif op == "[MED":
                value = int(np.median(args))
            else:
                value = int(np.sum(args)) % 10
        elif token in _DIGITS:
            value = _DIGITS[token]
        else:
            raise ValueError(f"text: unknown token {token!r} in {text[:80]!r}")
        (stack[-1][1] if stack else result).append(value)
    if stack or len(result) != 1:
        raise ValueError(f"text: expected one complete expression, got {len(stack)} unclosed operator(s) and "
                         f"{len(result)} top-level value(s) in {text[:80]!r}")
    return result[0]


def write_listops_tsv(path: str | Path, rows: list[tuple[str, int]]) -> Path:
    """Writes ``rows`` in LRA's ``basic_*.tsv`` format: a ``Source\\tTarget`` header line,
    then one ``text\\tlabel`` line per row (``\\n`` line ends; the reader also takes LRA's
    ``\\r\\n``). Returns the path."""
    path = Path(path)
    lines = [LISTOPS_HEADER]
    for i, (text, label) in enumerate(rows):
        if any(c in text for c in "\t\r\n"):
            raise ValueError(f"rows[{i}]: the text has a tab or line break")
        if not 0 <= label < 10:
            raise ValueError(f"rows[{i}]: label {label} not in [0, 10)")
        lines.append(f"{text}\t{int(label)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def generate_listops_files(directory: str | Path, seed: int = 0, sizes: tuple[int, int, int] = LISTOPS_SIZES, *,
                           max_depth: int = 10, max_args: int = 10, min_length: int = 500, max_length: int = 2000,
                           parens: bool = False) -> tuple[Path, Path, Path]:
    """Writes ``basic_train.tsv``, ``basic_val.tsv`` and ``basic_test.tsv`` (LRA's 96k / 2k /
    2k by default) into ``directory``: ``sum(sizes)`` distinct expressions of
    :func:`listops_expressions`, split in order, so no expression is in two files.
    Returns the three paths."""
    if len(sizes) != 3 or min(sizes) < 0:
        raise ValueError(f"sizes: expected 3 counts >= 0 (train, val, test), got {sizes}")
    rows = listops_expressions(seed, sum(sizes), max_depth=max_depth, max_args=max_args, min_length=min_length,
                               max_length=max_length, parens=parens)
    directory = Path(directory)
    bounds = np.cumsum([0, *sizes])
    return tuple(write_listops_tsv(directory / name, rows[bounds[i]:bounds[i + 1]])
                 for i, name in enumerate(LISTOPS_FILES))


# --------------------------------------------------------------------------------------
# ListOps: tokenizer and loader


def encode_listops(text: str) -> Int[np.ndarray, " n"]:
    """int32 ids of a ListOps text in :data:`LISTOPS_VOCAB` (whitespace tokens; ``(`` and
    ``)`` are dropped as LRA's tokenizer does); an unknown token is a ``ValueError``."""
    tokens = _listops_tokens(text)
    unknown = sorted(set(tokens) - _LISTOPS_IDS.keys())
    if unknown:
        raise ValueError(f"text: unknown ListOps token(s) {', '.join(map(repr, unknown[:5]))} "
                         f"(vocabulary: digits 0-9, {', '.join(LISTOPS_OPERATORS)}, ']'; '(' and ')' are dropped)")
    return np.fromiter((_LISTOPS_IDS[t] for t in tokens), np.int32, len(tokens))


def decode_listops(ids: np.ndarray) -> str:
    """The text of ListOps ids (PAD dropped, tokens joined by spaces)."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= len(LISTOPS_VOCAB)):
        raise ValueError(f"ids: expected values in [0, {len(LISTOPS_VOCAB)}), got [{ids.min()}, {ids.max()}]")
    return " ".join(LISTOPS_VOCAB[i] for i in ids.tolist() if i != PAD)


def _read_lines(path: Path, what: str) -> list[bytes]:
    if not path.is_file():
        raise ValueError(f"{path}: file not found (expected {what})")
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _pad(rows: list[np.ndarray], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(rows), max_length), np.int32)
    lengths = np.zeros(len(rows), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        lengths[i] = len(row)
    return tokens, lengths


def load_listops_tsv(path: str | Path, max_length: int = LISTOPS_MAX_LENGTH
                     ) -> tuple[Int[np.ndarray, "n l"], Int[np.ndarray, " n"], Int[np.ndarray, " n"]]:
    """Reads an LRA ListOps TSV (``basic_{train,val,test}.tsv``): ``(tokens [n, max_length]``
    int32 ids of :data:`LISTOPS_VOCAB` padded with ``PAD = 0``, ``lengths [n]``, ``labels
    [n])``. The header must be ``Source\\tTarget``; every row is ``text\\tlabel`` with a label
    in ``[0, 10)``; a sequence longer than ``max_length`` is an error (LRA would truncate;
    the generator keeps every tree under 2000 tokens)."""
    path = Path(path)
    lines = _read_lines(path, "an LRA ListOps TSV")
    if not lines or lines[0].decode("utf-8", "replace") != LISTOPS_HEADER:
        got = repr(lines[0][:40].decode("utf-8", "replace")) if lines else "an empty file"
        raise ValueError(f"{path}: line 1: expected the header {LISTOPS_HEADER!r}, got {got}")
    if len(lines) < 2:
        raise ValueError(f"{path}: no rows after the header")
    rows, labels = [], np.zeros(len(lines) - 1, np.int32)
    for i, raw in enumerate(lines[1:]):
        line = i + 2
        fields = raw.decode("utf-8", "replace").split("\t")
        if len(fields) != 2:
            raise ValueError(f"{path}: line {line}: expected 2 tab-separated fields (Source, Target), "
                             f"got {len(fields)}")
        try:
            label = int(fields[1])
        except ValueError:
            label = None
        if label is None or not 0 <= label < 10:
            raise ValueError(f"{path}: line {line}: label {fields[1]!r} is not an integer in [0, 10)")
        try:
            ids = encode_listops(fields[0])
        except ValueError as err:
            raise ValueError(f"{path}: line {line}: {err}") from None
        if len(ids) > max_length:
            raise ValueError(f"{path}: line {line}: {len(ids)} tokens, longer than max_length {max_length}")
        rows.append(ids)
        labels[i] = label
    tokens, lengths = _pad(rows, max_length)
    return tokens, lengths, labels


# --------------------------------------------------------------------------------------
# Byte-level text: IMDb and AAN


def encode_bytes(data: bytes, max_length: int) -> Int[np.ndarray, " n"]:
    """LRA's byte ids (``tfds`` ``ByteTextEncoder``): ``byte + 1`` (0 is PAD, vocabulary
    257) of the first ``max_length`` bytes, int32."""
    return np.frombuffer(data[:max_length], np.uint8).astype(np.int32) + 1


def load_imdb(data_dir: str | Path, split: str, max_length: int = IMDB_MAX_LENGTH
              ) -> tuple[Int[np.ndarray, "n l"], Int[np.ndarray, " n"], Int[np.ndarray, " n"]]:
    """The LRA text task: IMDb reviews of ``aclImdb/{split}/{neg,pos}/*.txt`` as UTF-8 byte
    ids (:func:`encode_bytes`) truncated to ``max_length`` (4096). ``data_dir`` holds
    ``aclImdb/`` or is it. Order: ``neg`` (label 0) then ``pos`` (label 1), sorted file names.
    Returns ``(tokens [n, max_length]`` int32 padded with 0, ``lengths [n], labels [n])``."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    root = Path(data_dir)
    if (root / "aclImdb").is_dir():
        root = root / "aclImdb"
    rows, labels = [], []
    for label, name in ((0, "neg"), (1, "pos")):
        folder = root / split / name
        if not folder.is_dir():
            raise ValueError(f"{folder}: folder not found (expected the IMDb tree aclImdb/{split}/{name}/*.txt)")
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise ValueError(f"{folder}: no .txt reviews (empty {split} split)")
        rows += [encode_bytes(f.read_bytes(), max_length) for f in files]
        labels += [label] * len(files)
    tokens, lengths = _pad(rows, max_length)
    return tokens, lengths, np.asarray(labels, np.int32)


def load_aan_tsv(path: str | Path, max_length: int = AAN_MAX_LENGTH
                 ) -> tuple[Int[np.ndarray, "n l"], Int[np.ndarray, "n l"], Int[np.ndarray, " n"],
                            Int[np.ndarray, " n"], Int[np.ndarray, " n"]]:
    """The LRA retrieval task: an AAN pair TSV (``new_aan_pair.{train,eval,test}.tsv``), 5
    tab-separated columns ``label id1 id2 text1 text2`` per line, no header (LRA reads with
    ``header=False``; a first line whose first field is ``label`` is skipped), label 0/1
    possibly written as a float (``1.0``). Texts as byte ids (:func:`encode_bytes`)
    truncated to ``max_length`` (4000). Returns ``(tokens1 [n, L], tokens2 [n, L],
    lengths1 [n], lengths2 [n], labels [n])``, int32."""
    path = Path(path)
    lines = _read_lines(path, "an LRA AAN pair TSV")
    start = 1 if lines and lines[0].split(b"\t")[0].strip() == b"label" else 0
    if len(lines) <= start:
        raise ValueError(f"{path}: no rows")
    first, second, labels = [], [], np.zeros(len(lines) - start, np.int32)
    for i, raw in enumerate(lines[start:]):
        line = i + start + 1
        fields = raw.split(b"\t")
        if len(fields) != 5:
            raise ValueError(f"{path}: line {line}: expected 5 tab-separated fields (label id1 id2 text1 text2), "
                             f"got {len(fields)}")
        try:
            label = float(fields[0])
        except ValueError:
            label = math.nan
        if label not in (0.0, 1.0):
            raise ValueError(f"{path}: line {line}: label {fields[0][:20]!r} is not 0 or 1")
        labels[i] = int(label)
        first.append(encode_bytes(fields[3], max_length))
        second.append(encode_bytes(fields[4], max_length))
    tokens1, lengths1 = _pad(first, max_length)
    tokens2, lengths2 = _pad(second, max_length)
    return tokens1, tokens2, lengths1, lengths2, labels


# --------------------------------------------------------------------------------------
# Images: CIFAR-10


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"{path}: file not found (expected a CIFAR-10 python pickle of {CIFAR_DIR})")
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ValueError(f"{path}: cannot unpickle ({err})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels', got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: expected keys b'data' and b'labels', got {sorted(map(str, batch))[:6]}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be uint8 [n, 3072] (R, G, B planes of 32x32), got {got}")
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: b'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise ValueError(f"{path}: labels must be in [0, 10), got [{labels.min()}, {labels.max()}]")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int32)


def load_cifar10(data_dir: str | Path, split: str
                 ) -> tuple[UInt8[np.ndarray, "n 32 32 3"], Int[np.ndarray, " n"]]:
    """CIFAR-10 (Krizhevsky, 2009) from the python pickles of ``cifar-10-batches-py``
    (``data_batch_1..5`` for ``"train"``, ``test_batch`` for ``"test"``; ``data_dir`` holds
    the folder or is it). Each pickle is ``{b"data": uint8 [10000, 3072] (R, G, B planes,
    row-major 32x32), b"labels": [...]}``. Returns ``(images uint8 [n, 32, 32, 3], labels
    int32 [n])``. LRA validates on the last 10% of train (``train[90%:]``). Pickles run
    code when loaded: read only the official archive."""
    if split not in CIFAR_FILES:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    root = Path(data_dir)
    if (root / CIFAR_DIR).is_dir():
        root = root / CIFAR_DIR
    parts = [_load_cifar_batch(root / name) for name in CIFAR_FILES[split]]
    return (np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
            np.concatenate([p[1] for p in parts]))


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [n, h, w, 3], got {images.dtype} {images.shape}")
    return images


def cifar_grayscale_tokens(images: np.ndarray) -> Int[np.ndarray, "n l"]:
    """LRA's image task tokens: ``tf.image.rgb_to_grayscale`` of uint8 ``[n, h, w, 3]``
    images, in float32 as TF computes it (``x / 255``, ``0.2989 R + 0.5870 G + 0.1140 B``,
    ``floor(gray * 255.5)``; pure red / green / blue 255 give 76 / 149 / 29), flattened in
    raster order: int32 ``[n, h * w]`` in ``[0, 256)`` (1024 for CIFAR)."""
    images = _check_images(images)
    unit = images.astype(np.float32) * np.float32(1.0 / 255)
    weights = np.asarray(GRAYSCALE_WEIGHTS, np.float32)
    gray = unit[..., 0] * weights[0] + unit[..., 1] * weights[1] + unit[..., 2] * weights[2]
    return (gray * np.float32(255.5)).astype(np.int32).reshape(len(images), -1)


def cifar_sequence(images: np.ndarray) -> Float[np.ndarray, "n l 3"]:
    """sCIFAR: the raster-order pixel sequence of uint8 ``[n, h, w, 3]`` images, float32
    ``[n, h * w, 3]`` in ``[0, 1]`` (``/ 255``; any normalisation is the caller's)."""
    images = _check_images(images)
    return images.reshape(len(images), -1, 3).astype(np.float32) / np.float32(255)
