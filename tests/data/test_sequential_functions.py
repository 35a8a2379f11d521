"""ssmjax.data.sequential_functions: exact machine outputs, the prompt layout, seeding."""

import numpy as np
import pytest

from ssmjax.data.sequential_functions import (
    DELIM,
    SEP,
    SYMBOL0,
    example_index,
    linear_recurrence_outputs,
    mealy_outputs,
    sequential_functions,
    vocab_size,
)


def test_a_hand_written_two_state_mealy_machine():
    # "output 1 when the input differs from the previous input" (state = previous input, start 0)
    transitions = np.array([[[0, 1], [0, 1]]])  # next state = input
    outputs = np.array([[[0, 1], [1, 0]]])  # output = state xor input
    x = np.array([[[0, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0]]])
    assert mealy_outputs(transitions, outputs, x).tolist() == [[[0, 1, 0, 1, 0, 1], [1, 0, 0, 0, 1, 0]]]


def test_mealy_machines_are_per_row_and_shapes_are_checked():
    parity = np.array([[[0, 1], [1, 0]], [[0, 0], [0, 0]]])  # row 0: running parity; row 1: stays in 0
    outputs = np.array([[[0, 1], [1, 0]], [[1, 0], [1, 0]]])  # row 0: parity so far; row 1: not x
    x = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert mealy_outputs(parity, outputs, x).tolist() == [[1, 0, 1, 1], [0, 0, 1, 1]]
    with pytest.raises(ValueError, match="transitions"):
        mealy_outputs(parity[0], outputs[0], x)
    with pytest.raises(ValueError, match="x"):
        mealy_outputs(parity, outputs, x[:1])


def test_linear_recurrence_mod_p():
    # y_t = 2 y_{t-1} + 3 x_t mod 5, y_0 = 0: x = 1, 2, 0, 4 -> 3, 2*3+6=12=2, 4, 8+12=20=0
    assert linear_recurrence_outputs(np.array([2]), np.array([3]), np.array([[1, 2, 0, 4]]), 5).tolist() == \
        [[3, 2, 4, 0]]
    # a = 1, b = 1 is the running sum mod 3
    assert linear_recurrence_outputs(np.array([1]), np.array([1]), np.array([[[2, 2, 2]]]), 3).tolist() == \
        [[[2, 1, 0]]]


def test_example_index_marks_each_examples_outputs():
    # k = 1 prompt example of L = 2: tokens x x SEP y y DELIM x x SEP y y (11); targets are tokens 1..10
    assert example_index(1, 2).tolist() == [-1, -1, 0, 0, -1, -1, -1, -1, 1, 1]


@pytest.mark.parametrize("classes", ["mealy", "recurrence"])
def test_rows_follow_the_layout_and_one_function_per_row(classes):
    k, n = 3, 4
    batch = sequential_functions(5, 2, batch_size=8, classes=classes, num_examples=k, example_len=n, modulus=7)
    width = 2 * n + 2
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (8, (k + 1) * width - 2)
    tokens = np.concatenate([batch.inputs, batch.targets[:, -1:]], axis=1)  # the whole sequence
    assert (tokens[:, n::width] == SEP).all() and (tokens[:, width - 1::width] == DELIM).all()
    assert batch.mask.sum(1).tolist() == [(k + 1) * n] * 8
    assert (batch.targets[batch.mask] >= SYMBOL0).all() and batch.inputs.max() < vocab_size(2, 2, 7)
    examples = np.stack([tokens[:, e * width:e * width + 2 * n + 1] for e in range(k + 1)], 1)  # [b, k+1, 2n+1]
    x, y = examples[..., :n] - SYMBOL0, examples[..., n + 1:] - SYMBOL0
    if classes == "recurrence":  # recover (a, b) from the first two outputs of example 0 and check all
        for row in range(8):
            fits = [(a, b) for a in range(7) for b in range(1, 7)
                    if (linear_recurrence_outputs(np.array([a]), np.array([b]), x[row:row + 1], 7) == y[row]).all()]
            assert fits
    else:  # a Mealy machine is a function of the input prefix: equal prefixes give equal outputs
        for row in range(8):
            seen = {}
            for e in range(k + 1):
                for t in range(1, n + 1):
                    key = tuple(x[row, e, :t])
                    assert seen.setdefault(key, y[row, e, t - 1]) == y[row, e, t - 1]


def test_seeded_streams_and_errors():
    a = sequential_functions(1, 3, batch_size=4)
    assert all((u == v).all() for u, v in zip(a, sequential_functions(1, 3, batch_size=4)))
    assert not (a.inputs == sequential_functions(1, 3, batch_size=4, stream=1).inputs).all()
    with pytest.raises(ValueError, match="classes"):
        sequential_functions(0, 0, batch_size=2, classes="dfa")
    with pytest.raises(ValueError, match="modulus"):
        sequential_functions(0, 0, batch_size=2, modulus=1)
    with pytest.raises(ValueError, match="num_examples"):
        sequential_functions(0, 0, batch_size=2, num_examples=0)
