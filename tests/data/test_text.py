"""Character-level text data: tokenizer, 90/10 split, causal windows, determinism per
step, and the TextTask's validation scores (nats and bits per character)."""

import math

import numpy as np
import pytest

from ssmjax.data import CharTokenizer, TextTask, random_windows, sequential_windows, split_text, windows

TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n" * 20  # 960 characters, 15 distinct


def test_tokenizer_round_trip_and_errors():
    tokenizer = CharTokenizer.fit("banana!")
    assert tokenizer.chars == "!abn" and tokenizer.vocab_size == 4
    ids = tokenizer.encode("nab!")
    assert ids.dtype == np.int32 and ids.tolist() == [3, 1, 2, 0]
    assert tokenizer.decode(ids) == "nab!"
    with pytest.raises(ValueError, match=r"text: 2 character\(s\) not in the vocabulary of 4: 'xz'"):
        tokenizer.encode("abzx")
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 4\)"):
        tokenizer.decode([4])
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer("aa")


def test_split_is_first_90_and_last_10_percent():
    train, val = split_text("0123456789" * 10)
    assert len(train) == 90 and len(val) == 10 and train + val == "0123456789" * 10
    with pytest.raises(ValueError, match="val_fraction"):
        split_text("abc", 1.0)


def test_windows_are_next_token_pairs():
    tokens = np.arange(20, dtype=np.int32)
    batch = windows(tokens, np.array([0, 5, 15]), seq_len=4)
    assert batch.inputs.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8], [15, 16, 17, 18]]
    np.testing.assert_array_equal(batch.targets, batch.inputs + 1)
    assert batch.mask.all() and batch.mask.shape == (3, 4) and batch.inputs.dtype == np.int32
    with pytest.raises(ValueError, match="must fit in 20 tokens"):
        windows(tokens, np.array([16]), seq_len=4)  # needs tokens 16..20


def test_random_windows_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.int32)
    a, b = (random_windows(tokens, 3, 7, batch_size=8, seq_len=16) for _ in range(2))
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, random_windows(tokens, 3, 8, batch_size=8, seq_len=16).inputs)
    starts = a.inputs[:, 0]
    assert starts.min() >= 0 and starts.max() + 16 < 1000
    with pytest.raises(ValueError, match=r"seq_len: 16 needs at least seq_len \+ 1 = 17 tokens, got 10"):
        random_windows(tokens[:10], 0, 0, batch_size=1, seq_len=16)


def test_sequential_windows_cover_the_tokens_in_order():
    tokens = np.arange(23, dtype=np.int32)
    batches = sequential_windows(tokens, seq_len=5, batch_size=3)  # (23 - 1) // 5 = 4 windows
    assert [b.inputs.shape for b in batches] == [(3, 5), (1, 5)]
    assert np.concatenate([b.inputs for b in batches]).reshape(-1).tolist() == list(range(20))
    assert len(sequential_windows(tokens, seq_len=5, batch_size=3, max_windows=2)[0].inputs) == 2


def test_text_task_uses_the_training_vocabulary_and_the_last_tenth_for_validation(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT, encoding="utf-8")
    task = TextTask.from_file(path, seq_len=8, batch_size=4, eval_windows=None)
    assert task.vocab_size == len(set(TEXT[:864])) == 15
    assert task.tokenizer.decode(task.train_tokens) == TEXT[:864]
    assert task.tokenizer.decode(task.val_tokens) == TEXT[864:]
    assert sum(len(b.inputs) for b in task.val_batches) == (96 - 1) // 8
    batch = task.train_batch(5)
    assert batch.inputs.shape == (4, 8) and np.array_equal(batch.inputs, task.train_batch(5).inputs)
    with pytest.raises(ValueError, match="validation split .* characters the training split lacks.*'!'"):
        TextTask("abcd" * 30 + "!", seq_len=4)


class UniformModel:
    """An Evaluator stand-in: every character equally likely (the loss is ln V)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def loss(self, batches):
        count = sum(int(b.mask.sum()) for b in batches)
        return dict(loss=math.log(self.vocab_size), perplexity=float(self.vocab_size), accuracy=0.0, count=count)


def test_text_task_reports_nats_and_bits_per_character():
    task = TextTask(TEXT, seq_len=8, batch_size=4)
    scores = task.evaluate(UniformModel(task.vocab_size))
    assert scores["loss"] == pytest.approx(math.log(15)) and scores["bits_per_char"] == pytest.approx(math.log2(15))
    assert scores["perplexity"] == 15 and scores["val_chars"] == 11 * 8
    assert scores["summary"] == {"val loss (nats/char)": scores["loss"], "val bits/char": scores["bits_per_char"],
                                 "val acc": 0.0}
