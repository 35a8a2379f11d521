"""In-context learning of sequential functions (sequence-to-sequence maps), generated
in-process from ``(seed, step)`` like :mod:`ssmjax.data.synthetic`.

The experiment of the "Sequential function classes in context" issue, in the spirit of
Garg et al., 2022, "What Can Transformers Learn In-Context? A Case Study of Simple
Function Classes" (a prompt of labelled examples of one random function, then a query),
with the functions made *sequential*: every example is an input string and the output
string one randomly drawn machine writes for it. Two classes:

* ``"mealy"``: a Mealy machine (a deterministic finite-state transducer; Mealy, 1955)
  with ``num_states`` states over ``num_symbols`` input and ``num_outputs`` output
  symbols, transition and output tables drawn uniformly, started in state 0 on every
  example: ``y_t = lambda(q_{t-1}, x_t)``, ``q_t = delta(q_{t-1}, x_t)``
  (:func:`mealy_outputs`);
* ``"recurrence"``: a first-order linear recurrence modulo ``modulus``,
  ``y_t = (a y_{t-1} + b x_t) mod p`` with ``y_0 = 0``, ``a`` uniform in ``[0, p)`` and
  ``b`` uniform in ``[1, p)`` (:func:`linear_recurrence_outputs`).

Layout of one row (``k = num_examples`` prompt examples, then the query, all
``example_len`` long)::

    x^1_1 .. x^1_L SEP y^1_1 .. y^1_L DELIM  ...  x^{k+1}_1 .. x^{k+1}_L SEP y^{k+1}_1 .. y^{k+1}_L

shifted for next-token prediction; the mask is on every output symbol, so the accuracy
of example ``i`` is the accuracy after ``i - 1`` in-context examples and the last
example is the query (:func:`example_index`).
"""

from __future__ import annotations

import numpy as np

from ssmjax.data.synthetic import Batch, _check_positive, _to_batch, batch_rng

FUNCTION_CLASSES = ("mealy", "recurrence")
PAD, SEP, DELIM, SYMBOL0 = 0, 1, 2, 3  # symbol s (input or output) is token 3 + s


def vocab_size(num_symbols: int, num_outputs: int, modulus: int) -> int:
    """Tokens the generator can emit for these class sizes (inputs and outputs share symbols)."""
    return SYMBOL0 + max(num_symbols, num_outputs, modulus)


def mealy_outputs(transitions: np.ndarray, outputs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Output strings of a batch of Mealy machines (Mealy, 1955), each run from state 0.

    ``transitions`` and ``outputs`` ``[b, Q, A]`` (next state and output symbol of state
    ``q`` on input ``a``); ``x`` ``[b, ..., L]`` input symbols in ``[0, A)``. Returns
    ``y`` of ``x``'s shape: ``y_t = outputs[q_{t-1}, x_t]``, ``q_t = transitions[q_{t-1}, x_t]``,
    ``q_0 = 0``, every string of row ``r`` through machine ``r``.
    """
    transitions, outputs, x = np.asarray(transitions), np.asarray(outputs), np.asarray(x)
    if transitions.ndim != 3 or outputs.shape != transitions.shape:
        raise ValueError(f"transitions: expected [b, Q, A] with outputs of the same shape, got "
                         f"{transitions.shape} and {outputs.shape}")
    if x.ndim < 2 or x.shape[0] != transitions.shape[0]:
        raise ValueError(f"x: expected [b, ..., L] with b = {transitions.shape[0]}, got {x.shape}")
    flat = x.reshape(len(x), -1, x.shape[-1])  # [b, m, L]
    rows = np.arange(len(x))[:, None]
    state = np.zeros(flat.shape[:2], np.int64)
    y = np.zeros_like(flat)
    for t in range(flat.shape[-1]):
        symbol = flat[:, :, t]
        y[:, :, t] = outputs[rows, state, symbol]
        state = transitions[rows, state, symbol]
    return y.reshape(x.shape)


def linear_recurrence_outputs(a: np.ndarray, b: np.ndarray, x: np.ndarray, modulus: int) -> np.ndarray:
    """``y_t = (a y_{t-1} + b x_t) mod modulus`` with ``y_0 = 0``, per row.

    ``a``, ``b`` ``[batch]``; ``x`` ``[batch, ..., L]``; returns ``y`` of ``x``'s shape.
    """
    _check_positive(modulus=modulus)
    x = np.asarray(x, np.int64)
    shape = (len(x),) + (1,) * (x.ndim - 2)
    a, b = np.asarray(a, np.int64).reshape(shape), np.asarray(b, np.int64).reshape(shape)
    y = np.zeros_like(x)
    previous = np.zeros(x.shape[:-1], np.int64)
    for t in range(x.shape[-1]):
        previous = (a * previous + b * x[..., t]) % modulus
        y[..., t] = previous
    return y


def example_index(num_examples: int, example_len: int) -> np.ndarray:
    """``[T]`` for the generator's (shifted) positions: the example ``0..num_examples``
    whose output the target at that position belongs to (``-1`` off the outputs)."""
    _check_positive(num_examples=num_examples, example_len=example_len)
    width = 2 * example_len + 2  # L inputs, SEP, L outputs, DELIM
    total = (num_examples + 1) * width - 1  # no DELIM after the query
    position = np.arange(1, total)  # target positions (token index of the target)
    offset = position % width
    return np.where((offset > example_len) & (offset <= 2 * example_len), position // width, -1)


def sequential_functions(seed: int, step: int, *, batch_size: int, classes: tuple | str = FUNCTION_CLASSES,
                         num_examples: int = 8, example_len: int = 6, num_states: int = 3, num_symbols: int = 2,
                         num_outputs: int = 2, modulus: int = 5, stream: int = 0) -> Batch:
    """A batch of in-context prompts of sequential functions (module docstring): each
    row draws its class uniformly from ``classes`` (one name or a tuple), then one
    function of that class, then ``num_examples + 1`` input strings of ``example_len``
    uniform symbols (``num_symbols`` for ``"mealy"``, ``modulus`` for ``"recurrence"``).

    inputs/targets/mask ``[batch_size, (num_examples + 1)(2 example_len + 2) - 2]``.
    """
    classes = (classes,) if isinstance(classes, str) else tuple(classes)
    if not classes or any(c not in FUNCTION_CLASSES for c in classes):
        raise ValueError(f"classes: expected names from {FUNCTION_CLASSES}, got {classes!r}")
    _check_positive(batch_size=batch_size, num_examples=num_examples, example_len=example_len,
                    num_states=num_states, num_symbols=num_symbols, num_outputs=num_outputs)
    if modulus < 2:
        raise ValueError(f"modulus: expected >= 2, got {modulus}")
    rng = batch_rng(seed, step, stream)
    k, n = num_examples + 1, example_len
    which = rng.integers(0, len(classes), batch_size)
    transitions = rng.integers(0, num_states, (batch_size, num_states, num_symbols))
    outputs = rng.integers(0, num_outputs, (batch_size, num_states, num_symbols))
    a = rng.integers(0, modulus, batch_size)
    b = rng.integers(1, modulus, batch_size)
    uniform = rng.random((batch_size, k, n))
    is_mealy = np.array([classes[i] == "mealy" for i in which])[:, None, None]
    x = np.where(is_mealy, (uniform * num_symbols).astype(np.int64), (uniform * modulus).astype(np.int64))
    y = np.where(is_mealy, mealy_outputs(transitions, outputs, np.minimum(x, num_symbols - 1)),
                 linear_recurrence_outputs(a, b, x, modulus))
    sep = np.full((batch_size, k, 1), SEP)
    delim = np.full((batch_size, k, 1), DELIM)
    tokens = np.concatenate([SYMBOL0 + x, sep, SYMBOL0 + y, delim], axis=2).reshape(batch_size, -1)[:, :-1]
    mask = np.broadcast_to(example_index(num_examples, example_len) >= 0, (batch_size, tokens.shape[1] - 1))
    return _to_batch(tokens[:, :-1], tokens[:, 1:], mask)
