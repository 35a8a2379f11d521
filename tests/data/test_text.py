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


# --- unknown-character policy, byte-level corpora, split boundaries, hand-computed loss ---

from ssmjax.data.text import (  # noqa: E402
    ENWIK8_SPLIT,
    UNKNOWN_CHAR,
    ByteTokenizer,
    load_corpus,
    split_counts,
)


def test_unknown_policy_errors_by_default_and_maps_to_a_reserved_id():
    strict = CharTokenizer.fit("abc")
    with pytest.raises(ValueError, match=r"not in the vocabulary of 3: 'xz' \(unknown='map'"):
        strict.encode("axcz")
    mapped = CharTokenizer.fit("abc", unknown="map")
    assert mapped.vocab_size == 4 and mapped.unknown_id == 3
    assert mapped.encode("axcz").tolist() == [0, 3, 2, 3]
    assert mapped.decode([0, 3, 2]) == "a" + UNKNOWN_CHAR + "c"
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 4\)"):
        mapped.decode([4])
    with pytest.raises(ValueError, match="unknown"):
        CharTokenizer.fit("abc", unknown="ignore")


def test_char_corpus_vocabulary_comes_from_the_training_split_only(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("ab" * 45 + "abcdefghiz", encoding="utf-8")  # 100 chars: validation = the last 10
    with pytest.raises(ValueError, match=r"validation split \(last 10%\).*'cdefghiz'"):
        load_corpus(path)
    corpus = load_corpus(path, unknown="map")
    assert corpus.tokenizer.chars == "ab" and corpus.tokenizer.vocab_size == 3
    assert len(corpus.train) == 90 and len(corpus.valid) == 10 and corpus.test is None
    assert corpus.valid.tolist() == [0, 1] + [2] * 8
    assert corpus.tokenizer.decode(corpus.train) == "ab" * 45


def test_split_counts_boundaries():
    tokens = np.arange(20)
    train, valid, test = split_counts(tokens, (12, 5, 3))
    assert (train.tolist(), valid.tolist(), test.tolist()) == (list(range(12)), list(range(12, 17)), [17, 18, 19])
    assert [len(p) for p in split_counts(tokens, (10, 5, 2))] == [10, 5, 2]  # a shorter tail is ignored
    with pytest.raises(ValueError, match="counts"):
        split_counts(tokens, (15, 5, 5))
    assert ENWIK8_SPLIT == (90_000_000, 5_000_000, 5_000_000)


def test_enwik8_and_bytes_formats_are_byte_level(tmp_path):
    data = bytes(range(256)) * 2 + "héllo".encode()  # 518 bytes, with a 2-byte UTF-8 character
    path = tmp_path / "enwik8"
    path.write_bytes(data)
    corpus = load_corpus(path, "enwik8", split_sizes=(400, 60, 58))
    assert corpus.tokenizer.vocab_size == 256
    assert corpus.train.tolist() == list(data[:400]) and corpus.valid.tolist() == list(data[400:460])
    assert corpus.test.tolist() == list(data[460:518])
    with pytest.raises(ValueError, match="counts"):
        load_corpus(path, "enwik8")  # far fewer than 100M bytes for the default split
    plain = load_corpus(path, "bytes")
    assert len(plain.train) == int(518 * 0.9) and np.concatenate([plain.train, plain.valid]).tobytes() == \
        np.frombuffer(data, np.uint8).astype(np.int32).tobytes()
    assert ByteTokenizer().decode(ByteTokenizer().encode("héllo")) == "héllo"
    with pytest.raises(ValueError, match="format"):
        load_corpus(path, "bpe")
    with pytest.raises(ValueError, match="no file"):
        load_corpus(tmp_path / "missing.txt")


def test_wikitext_reads_the_three_token_files(tmp_path):
    for split, text in (("train", " = A = \n the cat \n"), ("valid", " dog \n"), ("test", " <unk> \n")):
        (tmp_path / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    corpus = load_corpus(tmp_path, "wikitext")
    assert corpus.tokenizer.decode(corpus.train) == " = A = \n the cat \n"
    assert corpus.tokenizer.decode(corpus.valid) == " dog \n" and corpus.tokenizer.decode(corpus.test) == " <unk> \n"
    (tmp_path / "wiki.test.tokens").unlink()
    with pytest.raises(ValueError, match=r"no wiki\.test\.tokens"):
        load_corpus(tmp_path, "wikitext")


def test_loss_in_nats_matches_a_hand_computed_cross_entropy(tmp_path):
    """A bigram model (logits = table[previous token]) scored by the TextTask pipeline
    equals -mean log softmax(table[x_t])[x_{t+1}] over the validation windows, in float64."""
    import flax.linen as nn
    import jax

    from ssmjax.data.text import TextTask
    from ssmjax.train.evaluation import Evaluator

    class Bigram(nn.Module):
        vocab_size: int

        @nn.compact
        def __call__(self, x):
            return nn.Embed(self.vocab_size, self.vocab_size, embedding_init=nn.initializers.normal(1.0))(x)

    path = tmp_path / "tiny.txt"
    path.write_text(TEXT, encoding="utf-8")
    task = TextTask.from_corpus(load_corpus(path), seq_len=8, batch_size=4, eval_windows=None)
    model = Bigram(task.vocab_size)
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))
    scores = task.evaluate(Evaluator(model).at(params))
    table = np.asarray(params["params"]["Embed_0"]["embedding"], np.float64)
    log_probs = table - np.log(np.exp(table).sum(-1, keepdims=True))
    val = task.val_tokens[: 11 * 8 + 1]  # 11 windows of 8 cover the first 88 + 1 tokens
    expected = -np.mean(log_probs[val[:-1], val[1:]])
    assert scores["loss"] == pytest.approx(expected, rel=1e-5)  # float32 logits in the evaluator
    assert scores["bits_per_char"] == pytest.approx(expected / math.log(2), rel=1e-5)


def test_repeat_passages_turns_the_chosen_rows_into_exact_repeats():
    from ssmjax.data.synthetic import Batch
    from ssmjax.data.text import repeat_passages

    tokens = np.arange(8 * 9).reshape(8, 9)  # 8 rows of T + 1 = 9 tokens
    batch = Batch(tokens[:, :-1], tokens[:, 1:], np.ones((8, 8), bool))
    out = repeat_passages(batch, 0.5, seed=0, step=3)
    full = np.concatenate([out.inputs, out.targets[:, -1:]], axis=1)
    assert (out.inputs[:, 1:] == out.targets[:, :-1]).all(), "still next-token targets"
    changed = (full != tokens).any(axis=1)
    assert 0 < changed.sum() < 8
    for row, u in zip(full[changed], tokens[changed]):
        assert list(row) == list(u[:4]) + list(u[:5]), "L = 9 // 2 = 4: u[:4] then u[:5]"
    assert (full[~changed] == tokens[~changed]).all()
    again = repeat_passages(batch, 0.5, seed=0, step=3)
    assert (again.inputs == out.inputs).all(), "a pure function of (seed, step)"
    assert repeat_passages(batch, 0.0, seed=0, step=3) is batch
    with pytest.raises(ValueError, match="fraction"):
        repeat_passages(batch, 1.5, seed=0, step=3)
