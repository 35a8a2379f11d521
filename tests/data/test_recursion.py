"""ssmjax.data.recursion: binary successor and tree traversal, exact values and layout."""

import numpy as np
import pytest

from ssmjax.data.recursion import (
    CLOSE,
    EOS,
    OPEN,
    SEP,
    SYMBOL0,
    binary_successor,
    random_tree,
    recursion_seq_len,
    structural_recursion,
    traverse,
    tree_depth,
    tree_tokens,
)

# 1 with children (2 with leaves 4, 5) and leaf 3
TREE = (1, (2, (4,), (5,)), (3,))


def test_binary_successor_lsb_first():
    assert binary_successor(np.array([1, 1, 0])).tolist() == [0, 0, 1, 0]  # 3 -> 4
    assert binary_successor(np.array([1, 1, 1])).tolist() == [0, 0, 0, 1]  # 7 -> 8
    assert binary_successor(np.array([0, 1])).tolist() == [1, 1, 0]  # 2 -> 3


def test_tree_serialisation_and_traversals():
    s = SYMBOL0
    assert tree_tokens(TREE) == [OPEN, s + 1, OPEN, s + 2, OPEN, s + 4, CLOSE, OPEN, s + 5, CLOSE, CLOSE,
                                 OPEN, s + 3, CLOSE, CLOSE]
    assert traverse(TREE, "inorder") == [4, 2, 5, 1, 3]
    assert traverse(TREE, "postorder") == [4, 5, 2, 3, 1]
    assert tree_depth(TREE) == 2 and tree_depth((7,)) == 0
    with pytest.raises(ValueError, match="traversal"):
        traverse(TREE, "preorder")


def test_random_trees_have_the_exact_depth_and_are_full():
    rng = np.random.default_rng(0)
    for depth in range(5):
        tree = random_tree(rng, depth, 3)
        assert tree_depth(tree) == depth
        stack = [tree]
        while stack:
            node = stack.pop()
            assert len(node) in (1, 3) and 0 <= node[0] < 3
            stack.extend(node[1:])


def test_successor_rows_are_exact():
    batch = structural_recursion(2, 0, batch_size=16, task="successor", min_size=5, max_size=5, order="msb")
    assert batch.inputs.shape == (16, recursion_seq_len("successor", 5)) == (16, 12)
    tokens = np.concatenate([batch.inputs, batch.targets[:, -1:]], axis=1)
    for row in tokens:
        bits, out = row[:5] - SYMBOL0, row[6:12] - SYMBOL0
        assert row[5] == SEP and row[12] == EOS
        assert int("".join(map(str, out)), 2) == int("".join(map(str, bits)), 2) + 1
    assert batch.mask.sum(1).tolist() == [7] * 16  # 6 bits + EOS


def test_tree_rows_are_exact():
    batch = structural_recursion(0, 1, batch_size=6, task="tree", min_size=2, max_size=2, traversal="postorder",
                                 num_labels=4)
    assert batch.inputs.shape == (6, 4 * 7 + 1)
    tokens = np.concatenate([batch.inputs, batch.targets[:, -1:]], axis=1)
    for row, mask in zip(tokens, batch.mask):
        sep = int(np.argmax(row == SEP))
        source = row[:sep]
        nodes = int((source == OPEN).sum())
        output = row[sep + 1:sep + 1 + nodes]
        assert row[sep + 1 + nodes] == EOS and mask.sum() == nodes + 1
        # rebuild the tree from the brackets and check the post-order
        tree, rest = _parse(list(source))
        assert rest == [] and tree_depth(tree) == 2
        assert (output - SYMBOL0).tolist() == traverse(tree, "postorder")


def _parse(tokens):
    assert tokens[0] == OPEN
    label, rest = int(tokens[1]) - SYMBOL0, tokens[2:]
    if rest[0] == CLOSE:
        return (label,), rest[1:]
    left, rest = _parse(rest)
    right, rest = _parse(rest)
    assert rest[0] == CLOSE
    return (label, left, right), rest[1:]


def test_seeding_and_errors():
    a = structural_recursion(3, 4, batch_size=4, task="tree", max_size=3)
    assert all((u == v).all() for u, v in zip(a, structural_recursion(3, 4, batch_size=4, task="tree", max_size=3)))
    for kwargs, name in [(dict(task="sort"), "task"), (dict(order="big"), "order"), (dict(traversal="bfs"), "traversal"),
                         (dict(min_size=0), "min_size"), (dict(min_size=5, max_size=4), "min_size"),
                         (dict(max_size=4, seq_len=5), "seq_len")]:
        with pytest.raises(ValueError, match=name):
            structural_recursion(0, 0, batch_size=2, **kwargs)
