"""Synthetic sequence tasks, generated in-process from ``(seed, step)``.

Every generator is a pure function of its arguments: ``(seed, step)`` seed a NumPy
``Generator`` through a ``SeedSequence``, so the data "iterator" of a training run is just
the step number (checkpoint it and resume is exact) and an evaluation set is a fixed
list of steps on a separate stream. Every generator returns a :class:`Batch`:

* ``inputs``  ``[batch, time]`` int32 tokens,
* ``targets`` ``[batch, time]`` int32, the token the model must emit *at* that position
  (0 where the mask is off),
* ``mask``    ``[batch, time]`` bool, the positions the loss and accuracy are taken over.

Tasks (papers in each docstring):

* :func:`mqar`               multi-query associative recall (Zoology),
* :func:`selective_copying`  copy the scattered tokens after the noise (Mamba, Table 1),
* :func:`induction_heads`    recall the token after the special token (Mamba, Table 11),
* :func:`boolean_icl`        learn a Boolean function in context (Bhattamishra et al.),
  with :func:`boolean_optimal_predictions`, the Bayes-optimal learner of each class,
* :func:`algorithmic`        copy / reverse / addition (Universal Transformers).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np


class Batch(NamedTuple):
    """One batch of a task (the synthetic generators make the ``[b, t]`` token form).

    In general (see :class:`ssmjax.train.Task`): ``inputs`` int32 ``[b, t]`` tokens or
    float32 ``[b, t, d]`` features; ``targets`` int32 ``[b, t]`` (per position) or ``[b]``
    (per sequence); ``mask`` bool, the shape of ``targets``."""

    inputs: np.ndarray  # [b, t] int32 (or [b, t, d] float32)
    targets: np.ndarray  # [b, t] int32 (or [b])
    mask: np.ndarray  # [b, t] bool (or [b])


def batch_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator of batch ``step`` of run ``seed``; ``stream`` separates train/eval data."""
    for name, value in (("seed", seed), ("step", step), ("stream", stream)):
        if int(value) < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {value}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step), int(stream)]))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")


def _choose_without_replacement(rng: np.random.Generator, rows: int, population: int, k: int,
                                log_p: np.ndarray | None = None) -> np.ndarray:
    """``[rows, k]`` distinct draws from ``range(population)`` per row, each row in draw order.

    With ``log_p`` the draws are proportional to ``exp(log_p)`` without replacement
    (Gumbel top-k: the same distribution as sequential weighted sampling)."""
    scores = rng.gumbel(size=(rows, population))
    if log_p is not None:
        scores = scores + log_p
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _to_batch(inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> Batch:
    mask = np.asarray(mask, bool)
    return Batch(np.asarray(inputs, np.int32), np.where(mask, targets, 0).astype(np.int32), mask)


# ----------------------------------------------------------------------------- MQAR
def mqar(seed: int, step: int, *, batch_size: int, seq_len: int, num_kv_pairs: int, vocab_size: int = 8192,
         power_a: float = 0.01, random_non_queries: bool = True, stream: int = 0) -> Batch:
    """Multi-query associative recall (Arora et al., 2023, "Zoology: Measuring and
    Improving Recall in Efficient Language Models", the ``multiquery_ar`` generator).

    ``k_1 v_1 k_2 v_2 ... k_n v_n`` (``n = num_kv_pairs`` distinct keys in ``[1, V/2)``,
    distinct values in ``[V/2, V)``) is followed by the queries: key ``k_i`` reappears at
    position ``2n + 2 g_i``, where the gaps ``g_i`` are distinct draws from
    ``{0, ..., (seq_len - 2n)/2 - 1}`` with ``p(g) ~ (g + 1)^(a - 1)`` (power law, ``a =
    power_a``: short gaps are common). The target at a query position is ``v_i``; only
    those positions carry loss. Every other position holds a uniformly random token
    (Zoology's ``random_non_queries``; 0 otherwise).
    """
    _check_positive(batch_size=batch_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs)
    n, half = num_kv_pairs, vocab_size // 2
    if 4 * n > seq_len:
        raise ValueError(f"seq_len: expected >= 4 * num_kv_pairs = {4 * n}, got {seq_len}")
    if half - 1 < n:
        raise ValueError(f"vocab_size: need vocab_size // 2 - 1 >= num_kv_pairs = {n} keys, got {vocab_size}")
    rng = batch_rng(seed, step, stream)
    keys = 1 + _choose_without_replacement(rng, batch_size, half - 1, n)
    values = half + _choose_without_replacement(rng, batch_size, vocab_size - half, n)
    space = (seq_len - 2 * n) // 2
    log_p = (power_a - 1) * np.log(np.arange(1, space + 1))
    gaps = _choose_without_replacement(rng, batch_size, space, n, log_p)
    if random_non_queries:
        inputs = rng.integers(0, vocab_size, (batch_size, seq_len))
    else:
        inputs = np.zeros((batch_size, seq_len), np.int64)
    targets = np.zeros((batch_size, seq_len), np.int64)
    mask = np.zeros((batch_size, seq_len), bool)
    rows = np.arange(batch_size)[:, None]
    inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2] = keys, values
    query_pos = 2 * n + 2 * gaps
    inputs[rows, query_pos] = keys
    targets[rows, query_pos] = values
    mask[rows, query_pos] = True
    return _to_batch(inputs, targets, mask)


# ----------------------------------------------------------------------------- selective copying
def selective_copying(seed: int, step: int, *, batch_size: int, seq_len: int = 256, num_tokens: int = 8,
                      vocab_size: int = 10, variable: bool = True, stream: int = 0) -> Batch:
    """Selective copying (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with
    Selective State Spaces", Table 1; the generator of the S4 repository's copying task).

    ``M = num_tokens`` content tokens in ``[1, A - 1)`` (``A = vocab_size``) are placed at
    ``M`` sorted random positions of a length ``L + M`` noise sequence (noise token 0;
    ``L = seq_len``), followed by ``M`` marker tokens ``A - 1``. At the ``j``-th marker the
    target is the ``j``-th content token. ``variable=False`` puts the tokens first (the
    plain copying task). Total length ``L + 2M``; loss on the last ``M`` positions.
    """
    _check_positive(batch_size=batch_size, seq_len=seq_len, num_tokens=num_tokens)
    if vocab_size < 3:
        raise ValueError(f"vocab_size: need >= 3 (noise, one content token, marker), got {vocab_size}")
    rng = batch_rng(seed, step, stream)
    m, span = num_tokens, seq_len + num_tokens
    tokens = rng.integers(1, vocab_size - 1, (batch_size, m))
    if variable:
        positions = np.sort(_choose_without_replacement(rng, batch_size, span, m), axis=1)
    else:
        positions = np.broadcast_to(np.arange(m), (batch_size, m))
    inputs = np.zeros((batch_size, span + m), np.int64)
    inputs[np.arange(batch_size)[:, None], positions] = tokens
    inputs[:, span:] = vocab_size - 1
    targets = np.zeros_like(inputs)
    targets[:, span:] = tokens
    mask = np.zeros(inputs.shape, bool)
    mask[:, span:] = True
    return _to_batch(inputs, targets, mask)


# ----------------------------------------------------------------------------- induction heads
def induction_heads(seed: int, step: int, *, batch_size: int, seq_len: int = 256, vocab_size: int = 16,
                    stream: int = 0) -> Batch:
    """Induction heads (Olsson et al., 2022; as set up in Gu & Dao, 2023, "Mamba", Table 11
    and in the H3 synthetic suite).

    Tokens are uniform in ``[0, V - 1)``; the special token ``V - 1`` appears once at a
    random position ``p <= seq_len - 3``, followed by the answer token, and again as the last
    token. The only target is at the last position: the token that followed the first
    special token.
    """
    _check_positive(batch_size=batch_size)
    if seq_len < 3:
        raise ValueError(f"seq_len: expected >= 3, got {seq_len}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size: expected >= 2, got {vocab_size}")
    rng = batch_rng(seed, step, stream)
    special, rows = vocab_size - 1, np.arange(batch_size)
    inputs = rng.integers(0, special, (batch_size, seq_len))
    position = rng.integers(0, seq_len - 2, batch_size)
    inputs[rows, position] = special
    inputs[:, -1] = special
    targets = np.zeros_like(inputs)
    targets[:, -1] = inputs[rows, position + 1]
    mask = np.zeros(inputs.shape, bool)
    mask[:, -1] = True
    return _to_batch(inputs, targets, mask)


# ----------------------------------------------------------------------------- Boolean functions in context
BOOLEAN_FUNCTIONS = ("conjunction", "disjunction", "sparse_conjunction", "sparse_disjunction",
                     "parity", "sparse_parity", "majority", "sparse_majority")
BOOLEAN_LABEL_OFFSET = 2  # label tokens are 2 (false) and 3 (true); bits are tokens 0 and 1
BOOLEAN_VOCAB_SIZE = 4


def _boolean_family(function: str) -> str:
    if function not in BOOLEAN_FUNCTIONS:
        raise ValueError(f"function: expected one of {BOOLEAN_FUNCTIONS}, got {function!r}")
    return function.removeprefix("sparse_")


def _planted_value(function: str) -> int | None:
    """The label planted examples are drawn to have (conjunctions are rarely true on uniform
    inputs, disjunctions rarely false); ``None`` where inputs are plain uniform."""
    return {"conjunction": 1, "disjunction": 0}.get(_boolean_family(function))


def _evaluate_boolean(family: str, h: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``h [..., n]`` (literals in {0 absent, 1 positive, 2 negated} for conjunction /
    disjunction, relevant-variable indicators for parity / majority), ``x [..., n]`` bits
    (broadcast against ``h``) -> labels ``[...]`` bool."""
    if family in ("conjunction", "disjunction"):
        satisfied = np.where(h == 1, x == 1, x == 0)
        relevant = h != 0
        if family == "conjunction":
            return np.all(satisfied | ~relevant, axis=-1)
        return np.any(satisfied & relevant, axis=-1)
    ones = np.sum(h * x, axis=-1)
    if family == "parity":
        return ones % 2 == 1
    return 2 * ones > np.sum(h, axis=-1)  # majority of the relevant bits (ties are false)


def _sample_boolean_functions(rng: np.random.Generator, function: str, batch_size: int, num_bits: int,
                              sparsity: int) -> np.ndarray:
    family, sparse = _boolean_family(function), function.startswith("sparse_")
    literal = family in ("conjunction", "disjunction")
    if not sparse:
        return rng.integers(0, 3 if literal else 2, (batch_size, num_bits))
    h = np.zeros((batch_size, num_bits), np.int64)
    chosen = _choose_without_replacement(rng, batch_size, num_bits, sparsity)
    h[np.arange(batch_size)[:, None], chosen] = rng.integers(1, 3, chosen.shape) if literal else 1
    return h


def _planted_inputs(h: np.ndarray, x: np.ndarray, value: int) -> np.ndarray:
    """Set every literal of ``h`` to ``value``: a uniform draw among the inputs whose
    conjunction is true (value 1) / disjunction is false (value 0)."""
    positive = h[:, None, :] == 1
    negated = h[:, None, :] == 2
    return np.where(positive, value, np.where(negated, 1 - value, x))


def boolean_icl(seed: int, step: int, *, batch_size: int, function: str = "conjunction", num_bits: int = 8,
                num_examples: int = 24, sparsity: int = 3, planted_fraction: float = 0.3,
                stream: int = 0) -> Batch:
    """In-context learning of Boolean functions (Bhattamishra, Patel, Blunsom & Kanade,
    2023, "Understanding In-Context Learning in Transformers and LLMs by Learning to Learn
    Discrete Functions").

    Each row draws one function ``f`` of ``n = num_bits`` variables from the class, then
    ``k = num_examples`` inputs ``x_i in {0,1}^n`` (uniform; for conjunctions and
    disjunctions each input is, with probability ``planted_fraction``, drawn uniformly from
    the inputs where ``f`` is true (conjunction) / false (disjunction), so both labels
    occur). The prompt is ``x_1 y_1 x_2 y_2 ...``: ``n`` bit tokens (0/1) then the label
    token ``2 + f(x_i)``. At the last bit of every example the target is its label, so the
    accuracy at example ``i`` measures learning from ``i`` earlier examples.

    Classes (uniform prior over each): ``conjunction`` / ``disjunction`` (each variable
    absent, positive or negated with probability 1/3), ``parity`` and ``majority`` (each
    variable relevant with probability 1/2; majority is true when more than half of the
    relevant bits are 1), and ``sparse_*`` variants with exactly ``sparsity`` relevant
    variables (uniform subset, uniform signs).
    """
    _check_positive(batch_size=batch_size, num_bits=num_bits, num_examples=num_examples)
    family = _boolean_family(function)
    if function.startswith("sparse_") and not 1 <= sparsity <= num_bits:
        raise ValueError(f"sparsity: expected 1 <= sparsity <= num_bits = {num_bits}, got {sparsity}")
    if not 0.0 <= planted_fraction <= 1.0:
        raise ValueError(f"planted_fraction: expected a probability, got {planted_fraction}")
    rng = batch_rng(seed, step, stream)
    h = _sample_boolean_functions(rng, function, batch_size, num_bits, sparsity)
    x = rng.integers(0, 2, (batch_size, num_examples, num_bits))
    planted = _planted_value(function)
    if planted is not None:
        plant = rng.random((batch_size, num_examples, 1)) < planted_fraction
        x = np.where(plant, _planted_inputs(h, x, planted), x)
    y = _evaluate_boolean(family, h[:, None, :], x)
    example = np.concatenate([x, BOOLEAN_LABEL_OFFSET + y[..., None]], -1)  # [b, k, n + 1]
    inputs = example.reshape(batch_size, -1)
    targets = np.zeros_like(example)
    targets[..., num_bits - 1] = BOOLEAN_LABEL_OFFSET + y
    mask = np.zeros(example.shape, bool)
    mask[..., num_bits - 1] = True
    return _to_batch(inputs, targets.reshape(batch_size, -1), mask.reshape(batch_size, -1))


def boolean_prompt_examples(inputs: np.ndarray, num_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Invert the prompt layout of :func:`boolean_icl`: ``(x [b, k, n], y [b, k] bool)``."""
    example = np.asarray(inputs).reshape(inputs.shape[0], -1, num_bits + 1)
    return example[..., :num_bits], example[..., num_bits] == BOOLEAN_LABEL_OFFSET + 1


def _boolean_hypotheses(function: str, num_bits: int, sparsity: int) -> np.ndarray:
    """Every function of the class, ``[H, n]`` (uniform prior, as sampled)."""
    literal = _planted_value(function) is not None
    if not function.startswith("sparse_"):
        return np.array(list(itertools.product(range(3 if literal else 2), repeat=num_bits)), np.int64)
    rows = []
    for subset in itertools.combinations(range(num_bits), sparsity):
        for signs in itertools.product((1, 2) if literal else (1,), repeat=sparsity):
            row = np.zeros(num_bits, np.int64)
            row[list(subset)] = signs
            rows.append(row)
    return np.array(rows, np.int64)


MAX_ENUMERATED_HYPOTHESES = 200_000


def boolean_optimal_predictions(inputs: np.ndarray, *, function: str, num_bits: int, sparsity: int = 3,
                                planted_fraction: float = 0.3) -> np.ndarray | None:
    """The Bayes-optimal in-context learner for prompts of :func:`boolean_icl`.

    For every example ``i`` it predicts ``argmax_y P(y_i = y | x_1, y_1, ..., x_{i-1},
    y_{i-1}, x_i)`` under the generator's own prior: the posterior over the enumerated class
    weights each function by its likelihood ``prod_j P(x_j | f) 1[f(x_j) = y_j]`` (the
    input likelihood matters for the planted conjunction / disjunction inputs:
    ``P(x | f) = (1 - q) 2^-n + q 1[f(x) = planted] / 2^(n - |f|)``); ties predict false.
    No learner can be more accurate in expectation. Returns ``[b, k]`` bool, or ``None``
    when the class has more than :data:`MAX_ENUMERATED_HYPOTHESES` functions.
    """
    family = _boolean_family(function)
    sparse = function.startswith("sparse_")
    literal = _planted_value(function) is not None
    size = math.comb(num_bits, sparsity) * (2 ** sparsity if literal else 1) if sparse else (3 if literal else 2) ** num_bits
    if size > MAX_ENUMERATED_HYPOTHESES:
        return None
    h = _boolean_hypotheses(function, num_bits, sparsity)  # [H, n]
    x, y = boolean_prompt_examples(inputs, num_bits)  # [b, k, n], [b, k]
    rows = max(1, 4_000_000 // (h.size * x.shape[1]))  # bound the [rows, H, k, n] intermediate
    return np.concatenate([
        _bayes_predictions(family, h, x[i:i + rows], y[i:i + rows], _planted_value(function), planted_fraction)
        for i in range(0, x.shape[0], rows)])


def _bayes_predictions(family: str, h: np.ndarray, x: np.ndarray, y: np.ndarray, planted: int | None,
                       planted_fraction: float) -> np.ndarray:
    """Posterior-predictive argmax over hypotheses ``h [H, n]`` for ``x [b, k, n]``, ``y [b, k]``."""
    num_bits = h.shape[-1]
    labels = _evaluate_boolean(family, h[None, :, None, :], x[:, None, :, :])  # [b, H, k]
    log_px = np.zeros(labels.shape)
    if planted is not None and planted_fraction > 0:
        literals = np.sum(h != 0, -1)[None, :, None]
        in_planted_set = labels == bool(planted)
        with np.errstate(divide="ignore"):
            log_px = np.log((1 - planted_fraction) * 2.0 ** -num_bits
                            + planted_fraction * in_planted_set * 2.0 ** (literals - num_bits))
    consistent = np.where(labels == y[:, None, :], log_px, -np.inf)
    # log P(f, data before example i): the sum over j < i; then the predictive at example i
    before = np.concatenate([np.zeros(consistent.shape[:2] + (1,)), np.cumsum(consistent, -1)[..., :-1]], -1)
    joint = before + log_px
    log_true = _logsumexp(np.where(labels, joint, -np.inf), axis=1)
    log_false = _logsumexp(np.where(labels, -np.inf, joint), axis=1)
    return log_true > log_false


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(top, axis) + np.log(np.sum(np.exp(a - top), axis=axis))


# ----------------------------------------------------------------------------- algorithmic tasks
ALGORITHMIC_TASKS = ("copy", "reverse", "addition")
PAD, SEP, PLUS, DIGIT0 = 0, 1, 2, 3  # digits d are tokens 3 + d
ALGORITHMIC_VOCAB_SIZE = DIGIT0 + 10


def algorithmic_seq_len(task: str, max_len: int) -> int:
    """Padded input length that holds every example of length ``<= max_len``."""
    if task not in ALGORITHMIC_TASKS:
        raise ValueError(f"task: expected one of {ALGORITHMIC_TASKS}, got {task!r}")
    return 2 * max_len if task != "addition" else 3 * max_len + 2


def algorithmic(seed: int, step: int, *, batch_size: int, task: str = "copy", min_len: int = 1, max_len: int = 20,
                seq_len: int | None = None, stream: int = 0) -> Batch:
    """Algorithmic tasks of Dehghani et al., 2019, "Universal Transformers" (from the
    Neural GPU suite): ``copy``, ``reverse`` and ``addition`` of decimal digit strings.

    A length ``l`` is drawn uniformly from ``[min_len, max_len]`` per row, then
    ``copy``/``reverse``: ``d_1 .. d_l SEP o_1 .. o_l`` with ``o = d`` or reversed ``d``;
    ``addition``: ``a_1 .. a_l + b_1 .. b_l SEP s_1 .. s_{l+1}``, every number written least
    significant digit first (so the carry flows left to right) with ``l + 1`` sum digits.
    The token sequence is shifted for next-token prediction (inputs = all but the last
    token, targets = all but the first); loss on the output digits only; rows are
    right-padded with PAD to ``seq_len`` (default :func:`algorithmic_seq_len`).
    """
    _check_positive(batch_size=batch_size, min_len=min_len, max_len=max_len)
    if min_len > max_len:
        raise ValueError(f"min_len: expected <= max_len = {max_len}, got {min_len}")
    need = algorithmic_seq_len(task, max_len)
    seq_len = need if seq_len is None else seq_len
    if seq_len < need:
        raise ValueError(f"seq_len: expected >= {need} for task {task!r} with max_len {max_len}, got {seq_len}")
    rng = batch_rng(seed, step, stream)
    lengths = rng.integers(min_len, max_len + 1, batch_size)
    digits = rng.integers(0, 10, (batch_size, 2, max_len))
    tokens = np.full((batch_size, seq_len + 1), PAD, np.int64)
    output = np.zeros((batch_size, seq_len + 1), bool)
    for row, length in enumerate(lengths):  # rows differ in length; the loop is over the batch only
        sequence, start = _algorithmic_example(task, digits[row, :, :length])
        tokens[row, :len(sequence)] = sequence
        output[row, start:len(sequence)] = True
    return _to_batch(tokens[:, :-1], tokens[:, 1:], output[:, 1:])


def _algorithmic_example(task: str, digits: np.ndarray) -> tuple[np.ndarray, int]:
    """``(token sequence, index of the first output token)`` for one example."""
    a, b = digits
    if task == "copy":
        source, output = DIGIT0 + a, DIGIT0 + a
    elif task == "reverse":
        source, output = DIGIT0 + a, DIGIT0 + a[::-1]
    else:
        source, output = np.concatenate([DIGIT0 + a, [PLUS], DIGIT0 + b]), DIGIT0 + _add_lsd_first(a, b)
    return np.concatenate([source, [SEP], output]), len(source) + 1


def _add_lsd_first(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Digits of ``a + b`` (``len(a) + 1`` of them), all least significant first."""
    out, carry = [], 0
    for u, v in zip(a, b):
        carry, digit = divmod(int(u) + int(v) + carry, 10)
        out.append(digit)
    return np.array(out + [carry], np.int64)


def algorithmic_value(digits: np.ndarray) -> int:
    """The integer written least-significant-digit first by ``digits`` (digit values 0-9)."""
    return sum(int(d) * 10 ** i for i, d in enumerate(digits))
