"""Structural-recursion tasks, generated in-process from ``(seed, step)`` like
:mod:`ssmjax.data.synthetic`: the "emulating structural recursion" experiment of issue
20, after Zhang et al., 2023, "Can Transformers Learn to Solve Problems Recursively?",
which asks whether a sequence model trained on small instances of a structurally
recursive function (binary successor, tree traversal) computes it on larger ones.

* ``task="successor"``: a binary number of ``size`` bits in, its successor
  (``size + 1`` bits, the carry out included) out. ``order="lsb"`` writes both least
  significant bit first (the carry flows left to right, as the recursion unfolds),
  ``"msb"`` most significant first. The length ``r`` of the run of trailing ones (the
  carry chain: how far the recursion goes) is uniform in ``[0, size]``, the next bit 0
  and the rest uniform, so long carries are as common as short ones
  (:func:`binary_successor`).
* ``task="tree"``: a full binary tree (every node a leaf or with two children) of exact
  depth ``size`` with labels from ``num_labels`` symbols, written in pre-order with
  brackets, ``( label left right )`` and a leaf ``( label )``; out its labels in
  ``traversal`` order, ``"inorder"`` or ``"postorder"`` (:func:`tree_tokens`,
  :func:`traverse`).

Layout: ``source SEP output EOS``, shifted for next-token prediction, the loss and the
exact-match accuracy over the output and its EOS, rows right-padded with PAD.
"""

from __future__ import annotations

import numpy as np

from ssmjax.data.synthetic import Batch, _check_positive, _to_batch, batch_rng

RECURSION_TASKS = ("successor", "tree")
ORDERS = ("lsb", "msb")
TRAVERSALS = ("inorder", "postorder")
PAD, SEP, EOS, OPEN, CLOSE, SYMBOL0 = 0, 1, 2, 3, 4, 5  # bit / label s is token 5 + s


def vocab_size(num_labels: int) -> int:
    """Tokens of both tasks (bits are symbols 0 and 1, labels ``0..num_labels - 1``)."""
    return SYMBOL0 + max(2, num_labels)


def binary_successor(bits: np.ndarray) -> np.ndarray:
    """``n + 1`` bits of ``value(bits) + 1``, both least significant bit first.

    >>> binary_successor(np.array([1, 1, 0]))  # 3 + 1 = 4
    array([0, 0, 1, 0])
    """
    out, carry = [], 1
    for bit in np.asarray(bits):
        carry, value = divmod(int(bit) + carry, 2)
        out.append(value)
    return np.array(out + [carry], np.int64)


def max_tree_nodes(depth: int) -> int:
    """Nodes of the complete binary tree of ``depth`` (a leaf has depth 0)."""
    return 2 ** (depth + 1) - 1


def random_tree(rng: np.random.Generator, depth: int, num_labels: int) -> tuple:
    """A full binary tree of exact ``depth``: ``(label,)`` for a leaf, ``(label, left, right)``
    otherwise. One child (side uniform) has depth ``depth - 1``, the other a depth uniform
    in ``[0, depth - 1]``; labels uniform in ``[0, num_labels)``."""
    label = int(rng.integers(0, num_labels))
    if depth == 0:
        return (label,)
    deep = random_tree(rng, depth - 1, num_labels)
    other = random_tree(rng, int(rng.integers(0, depth)), num_labels)
    return (label, deep, other) if rng.random() < 0.5 else (label, other, deep)


def tree_depth(tree: tuple) -> int:
    return 0 if len(tree) == 1 else 1 + max(tree_depth(tree[1]), tree_depth(tree[2]))


def tree_tokens(tree: tuple) -> list[int]:
    """Pre-order with brackets: ``OPEN label [left right] CLOSE`` (label tokens ``SYMBOL0 + label``)."""
    children = [] if len(tree) == 1 else tree_tokens(tree[1]) + tree_tokens(tree[2])
    return [OPEN, SYMBOL0 + int(tree[0]), *children, CLOSE]


def traverse(tree: tuple, traversal: str) -> list[int]:
    """The labels of ``tree`` in ``traversal`` order (``"inorder"``: left, node, right;
    ``"postorder"``: left, right, node)."""
    if traversal not in TRAVERSALS:
        raise ValueError(f"traversal: expected one of {TRAVERSALS}, got {traversal!r}")
    if len(tree) == 1:
        return [int(tree[0])]
    left, right = traverse(tree[1], traversal), traverse(tree[2], traversal)
    return left + [int(tree[0])] + right if traversal == "inorder" else left + right + [int(tree[0])]


def recursion_seq_len(task: str, max_size: int) -> int:
    """Padded (shifted) length that holds every example of size ``<= max_size``."""
    if task not in RECURSION_TASKS:
        raise ValueError(f"task: expected one of {RECURSION_TASKS}, got {task!r}")
    if task == "successor":
        return 2 * max_size + 2  # n bits, SEP, n + 1 bits, EOS; minus the shift
    return 4 * max_tree_nodes(max_size) + 1  # 3 tokens a node, SEP, a label a node, EOS; minus the shift


def _successor_example(rng: np.random.Generator, size: int, order: str) -> tuple[np.ndarray, np.ndarray]:
    ones = int(rng.integers(0, size + 1))
    bits = np.concatenate([np.ones(ones, np.int64), np.zeros(1, np.int64), rng.integers(0, 2, size)])[:size]
    out = binary_successor(bits)
    if order == "msb":
        bits, out = bits[::-1], out[::-1]
    return SYMBOL0 + bits, SYMBOL0 + out


def structural_recursion(seed: int, step: int, *, batch_size: int, task: str = "successor", min_size: int = 1,
                         max_size: int = 8, order: str = "lsb", traversal: str = "inorder", num_labels: int = 10,
                         seq_len: int | None = None, stream: int = 0) -> Batch:
    """A batch of structural-recursion examples (module docstring); ``size`` (bits, or
    tree depth) uniform in ``[min_size, max_size]`` per row; ``seq_len`` defaults to
    :func:`recursion_seq_len` of ``max_size``."""
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    if traversal not in TRAVERSALS:
        raise ValueError(f"traversal: expected one of {TRAVERSALS}, got {traversal!r}")
    _check_positive(batch_size=batch_size, max_size=max_size, num_labels=num_labels)
    if task == "tree" and min_size < 0 or task != "tree" and min_size < 1:
        raise ValueError(f"min_size: expected >= {0 if task == 'tree' else 1} for task {task!r}, got {min_size}")
    if min_size > max_size:
        raise ValueError(f"min_size: expected <= max_size = {max_size}, got {min_size}")
    need = recursion_seq_len(task, max_size)
    seq_len = need if seq_len is None else seq_len
    if seq_len < need:
        raise ValueError(f"seq_len: expected >= {need} for task {task!r} with max_size {max_size}, got {seq_len}")
    rng = batch_rng(seed, step, stream)
    tokens = np.full((batch_size, seq_len + 1), PAD, np.int64)
    output = np.zeros((batch_size, seq_len + 1), bool)
    for row, size in enumerate(rng.integers(min_size, max_size + 1, batch_size)):  # rows differ in length
        if task == "successor":
            source, target = _successor_example(rng, int(size), order)
        else:
            tree = random_tree(rng, int(size), num_labels)
            source, target = np.array(tree_tokens(tree)), SYMBOL0 + np.array(traverse(tree, traversal))
        sequence = np.concatenate([source, [SEP], target, [EOS]])
        tokens[row, :len(sequence)] = sequence
        output[row, len(source) + 1:len(sequence)] = True
    return _to_batch(tokens[:, :-1], tokens[:, 1:], output[:, 1:])
