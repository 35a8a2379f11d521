"""Synthetic generators: shapes, label masks, determinism per (seed, step), and the
invariants each task is defined by (checked row by row against plain Python decoding)."""

import itertools

import numpy as np
import pytest

from ssmjax.data import synthetic
from ssmjax.data.synthetic import (
    ALGORITHMIC_TASKS,
    BOOLEAN_FUNCTIONS,
    algorithmic,
    algorithmic_seq_len,
    algorithmic_value,
    boolean_icl,
    boolean_optimal_predictions,
    boolean_prompt_examples,
    induction_heads,
    mqar,
    selective_copying,
)

GENERATORS = {
    "mqar": lambda seed, step, stream=0: mqar(seed, step, batch_size=6, seq_len=64, num_kv_pairs=4, vocab_size=64,
                                              stream=stream),
    "selective_copying": lambda seed, step, stream=0: selective_copying(seed, step, batch_size=6, seq_len=30,
                                                                        num_tokens=5, vocab_size=8, stream=stream),
    "induction_heads": lambda seed, step, stream=0: induction_heads(seed, step, batch_size=6, seq_len=20, stream=stream),
    "boolean_icl": lambda seed, step, stream=0: boolean_icl(seed, step, batch_size=6, num_bits=5, num_examples=7,
                                                            stream=stream),
    "algorithmic": lambda seed, step, stream=0: algorithmic(seed, step, batch_size=6, task="addition", max_len=6,
                                                            stream=stream),
}
SHAPES = {"mqar": 64, "selective_copying": 40, "induction_heads": 20, "boolean_icl": 42, "algorithmic": 20}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_shapes_dtypes_and_determinism(name):
    make = GENERATORS[name]
    batch = make(3, 7)
    for array, dtype in zip(batch, (np.int32, np.int32, np.bool_)):
        assert array.shape == (6, SHAPES[name]) and array.dtype == dtype
    assert batch.mask.any(axis=1).all(), "every row carries loss somewhere"
    assert (batch.targets[~batch.mask] == 0).all()
    again = make(3, 7)
    for a, b in zip(batch, again):
        np.testing.assert_array_equal(a, b)
    for other in (make(3, 8), make(4, 7), make(3, 7, stream=1)):
        assert not np.array_equal(batch.inputs, other.inputs)


def test_mqar_queries_recall_the_paired_value():
    vocab, n = 128, 8
    batch = mqar(0, 1, batch_size=32, seq_len=128, num_kv_pairs=n, vocab_size=vocab)
    for inputs, targets, mask in zip(*batch):
        keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
        assert ((1 <= keys) & (keys < vocab // 2)).all() and len(set(keys)) == n
        assert ((vocab // 2 <= values) & (values < vocab)).all() and len(set(values)) == n
        positions = np.flatnonzero(mask)
        assert len(positions) == n and (positions >= 2 * n).all() and ((positions - 2 * n) % 2 == 0).all()
        pairs = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(inputs[positions].tolist()) == sorted(keys.tolist()), "each key is queried once"
        for p in positions:
            assert targets[p] == pairs[int(inputs[p])]


def test_mqar_gaps_follow_the_power_law():
    # p(g) ~ (g + 1)^(a - 1) with a = 0.01 makes short gaps far likelier than under a uniform draw
    batch = mqar(0, 0, batch_size=256, seq_len=256, num_kv_pairs=4, vocab_size=64)
    gaps = (np.nonzero(batch.mask)[1] - 8) // 2
    assert gaps.max() < (256 - 8) // 2
    assert np.median(gaps) < 0.25 * (256 - 8) // 2 / 2  # uniform median would be ~62; power law ~ 10
    uniform = mqar(0, 0, batch_size=256, seq_len=256, num_kv_pairs=4, vocab_size=64, power_a=1.0)
    assert np.median((np.nonzero(uniform.mask)[1] - 8) // 2) > 40


def test_mqar_validates_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        mqar(0, 0, batch_size=2, seq_len=15, num_kv_pairs=4)
    with pytest.raises(ValueError, match="vocab_size"):
        mqar(0, 0, batch_size=2, seq_len=64, num_kv_pairs=8, vocab_size=16)
    with pytest.raises(ValueError, match="step"):
        mqar(0, -1, batch_size=2, seq_len=64, num_kv_pairs=4)


@pytest.mark.parametrize("variable", [True, False])
def test_selective_copying_targets_are_the_scattered_tokens_in_order(variable):
    length, m, vocab = 40, 6, 10
    batch = selective_copying(1, 2, batch_size=16, seq_len=length, num_tokens=m, vocab_size=vocab, variable=variable)
    for inputs, targets, mask in zip(*batch):
        body, markers = inputs[:length + m], inputs[length + m:]
        assert (markers == vocab - 1).all()
        tokens = body[body != 0]
        assert len(tokens) == m and ((1 <= tokens) & (tokens < vocab - 1)).all()
        np.testing.assert_array_equal(mask, np.arange(length + 2 * m) >= length + m)
        np.testing.assert_array_equal(targets[mask], tokens)
        if not variable:
            np.testing.assert_array_equal(body[:m], tokens)


def test_induction_heads_target_follows_the_first_special_token():
    vocab = 8
    batch = induction_heads(5, 0, batch_size=64, seq_len=24, vocab_size=vocab)
    for inputs, targets, mask in zip(*batch):
        special = np.flatnonzero(inputs == vocab - 1)
        assert len(special) == 2 and special[1] == 23 and special[0] <= 21
        assert mask.tolist() == [False] * 23 + [True]
        assert targets[-1] == inputs[special[0] + 1]


@pytest.mark.parametrize("function", BOOLEAN_FUNCTIONS)
def test_boolean_prompts_are_labelled_by_one_function_of_the_class(function):
    n, k = 4, 12
    batch = boolean_icl(2, 3, batch_size=16, function=function, num_bits=n, num_examples=k, sparsity=2)
    x, y = boolean_prompt_examples(batch.inputs, n)
    assert set(np.unique(x)) <= {0, 1}
    layout = np.arange(k * (n + 1)) % (n + 1)
    for inputs, targets, mask in zip(*batch):
        np.testing.assert_array_equal(mask, layout == n - 1)
        np.testing.assert_array_equal(targets[mask], inputs[layout == n])  # target = the next (label) token
    family = function.removeprefix("sparse_")
    hypotheses = synthetic._boolean_hypotheses(function, n, 2)
    labels = synthetic._evaluate_boolean(family, hypotheses[None, :, None, :], x[:, None])  # [b, H, k]
    assert (labels == y[:, None]).all(-1).any(-1).all(), "some function of the class fits every prompt"


def test_planted_inputs_balance_conjunction_labels():
    batch = boolean_icl(0, 0, batch_size=256, function="conjunction", num_bits=8, num_examples=20)
    _, y = boolean_prompt_examples(batch.inputs, 8)
    assert 0.25 < y.mean() < 0.5  # ~0.3 planted + rare uniform positives; without planting ~0.04
    plain = boolean_icl(0, 0, batch_size=256, function="conjunction", num_bits=8, num_examples=20, planted_fraction=0.0)
    assert boolean_prompt_examples(plain.inputs, 8)[1].mean() < 0.1


def _brute_force_optimal(x, y, function, n, sparsity, q):
    """Posterior-predictive argmax by explicit sums over the class (the definition)."""
    family = function.removeprefix("sparse_")
    planted = {"conjunction": 1, "disjunction": 0}.get(family)
    hyps = synthetic._boolean_hypotheses(function, n, sparsity)
    out = np.zeros(y.shape, bool)
    for b, i in itertools.product(range(x.shape[0]), range(x.shape[1])):
        mass = {True: 0.0, False: 0.0}
        for h in hyps:
            weight = 1.0
            for j in range(i + 1):
                label = bool(synthetic._evaluate_boolean(family, h[None], x[b, j][None])[0])
                px = 2.0 ** -n
                if planted is not None:
                    px = (1 - q) * 2.0 ** -n + q * (label == bool(planted)) * 2.0 ** (np.sum(h != 0) - n)
                weight *= px * (1.0 if j == i or label == y[b, j] else 0.0)
                if j == i:
                    mass[label] += weight
        out[b, i] = mass[True] > mass[False]
    return out


@pytest.mark.parametrize("function", ["conjunction", "sparse_disjunction", "parity", "majority"])
def test_bayes_optimal_learner_matches_its_definition(function):
    n, k, q = 3, 5, 0.3
    batch = boolean_icl(1, 0, batch_size=3, function=function, num_bits=n, num_examples=k, sparsity=2,
                        planted_fraction=q)
    x, y = boolean_prompt_examples(batch.inputs, n)
    fast = boolean_optimal_predictions(batch.inputs, function=function, num_bits=n, sparsity=2, planted_fraction=q)
    np.testing.assert_array_equal(fast, _brute_force_optimal(x, y, function, n, 2, q))


def test_bayes_optimal_learner_learns_parity_after_n_examples():
    n, k = 6, 30
    batch = boolean_icl(0, 0, batch_size=64, function="parity", num_bits=n, num_examples=k)
    _, y = boolean_prompt_examples(batch.inputs, n)
    accuracy = (boolean_optimal_predictions(batch.inputs, function="parity", num_bits=n) == y).mean(0)
    assert abs(accuracy[0] - 0.5) < 0.2 and accuracy[-10:].min() > 0.95
    big = boolean_icl(0, 0, batch_size=1, function="conjunction", num_bits=28, num_examples=2)
    assert boolean_optimal_predictions(big.inputs, function="conjunction", num_bits=28) is None


@pytest.mark.parametrize("task", ALGORITHMIC_TASKS)
def test_algorithmic_outputs_are_the_task_applied_to_the_inputs(task):
    max_len = 7
    batch = algorithmic(4, 1, batch_size=32, task=task, min_len=1, max_len=max_len)
    assert batch.inputs.shape[1] == algorithmic_seq_len(task, max_len)
    seen_lengths = set()
    for inputs, targets, mask in zip(*batch):
        sequence = np.concatenate([inputs, targets[-1:]])  # inputs shifted by one are the targets
        np.testing.assert_array_equal(targets[mask], sequence[1:][mask])
        sep = int(np.flatnonzero(sequence == synthetic.SEP)[0])
        output = targets[mask] - synthetic.DIGIT0
        assert np.flatnonzero(mask)[0] == sep, "the first output digit is predicted at the separator"
        source = sequence[:sep]
        if task == "addition":
            plus = int(np.flatnonzero(source == synthetic.PLUS)[0])
            a, b = source[:plus] - synthetic.DIGIT0, source[plus + 1:] - synthetic.DIGIT0
            assert len(a) == len(b) and len(output) == len(a) + 1
            assert algorithmic_value(output) == algorithmic_value(a) + algorithmic_value(b)
            seen_lengths.add(len(a))
        else:
            digits = source - synthetic.DIGIT0
            np.testing.assert_array_equal(output, digits if task == "copy" else digits[::-1])
            seen_lengths.add(len(digits))
        end = sep + 1 + len(output)
        assert (sequence[end:] == synthetic.PAD).all()
    assert min(seen_lengths) >= 1 and max(seen_lengths) <= max_len and len(seen_lengths) > 3


def test_algorithmic_fixed_length_and_errors():
    batch = algorithmic(0, 0, batch_size=4, task="reverse", min_len=9, max_len=9)
    assert batch.mask.sum(1).tolist() == [9] * 4
    with pytest.raises(ValueError, match="task"):
        algorithmic(0, 0, batch_size=2, task="sort")
    with pytest.raises(ValueError, match="min_len"):
        algorithmic(0, 0, batch_size=2, min_len=5, max_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        algorithmic(0, 0, batch_size=2, task="copy", max_len=5, seq_len=8)
    with pytest.raises(ValueError, match="function"):
        boolean_icl(0, 0, batch_size=2, function="xor")
