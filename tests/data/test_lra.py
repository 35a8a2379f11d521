"""Long Range Arena data: the ListOps generator against an independent evaluator and its
structural limits, the LRA file formats (ListOps TSV, IMDb tree, AAN TSV, CIFAR-10 pickles)
round-tripped through tiny hand-written files, and the readers' errors."""

import pickle

import numpy as np
import pytest

from ssmjax.data.lra import (
    LISTOPS_VOCAB,
    cifar_grayscale_tokens,
    cifar_sequence,
    decode_listops,
    encode_listops,
    evaluate_listops,
    generate_listops_files,
    listops_expressions,
    load_aan_tsv,
    load_cifar10,
    load_imdb,
    load_listops_tsv,
    write_listops_tsv,
)


def structure(text):
    """(operator nesting depth, argument count of every operator) of a ListOps text."""
    depth, deepest, counts, arities = 0, 0, [], []
    for token in text.split():
        if token in "()":
            continue
        if token.startswith("["):
            depth += 1
            deepest = max(deepest, depth)
            if counts:
                counts[-1] += 1
            counts.append(0)
        elif token == "]":
            arities.append(counts.pop())
            depth -= 1
        elif counts:
            counts[-1] += 1
    assert depth == 0 and not counts, text
    return deepest, arities


def n_tokens(text):
    return sum(t not in "()" for t in text.split())


# --------------------------------------------------------------------------- ListOps


@pytest.mark.parametrize("text, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[SM 5 6 7 ]", 8),
    ("[MED 1 9 3 ]", 3),
    ("[MED 1 2 ]", 1),  # LRA: int(np.median) = int(1.5)
    ("[MED 9 3 4 7 ]", 5),  # int(5.5)
    ("[MIN 7 [SM 9 9 ] [MAX 3 [MED 8 8 0 ] ] ]", 7),  # min(7, 8, 8)
    ("( ( ( [MAX 2 ) 9 ) ] )", 9),  # LRA's release format with parentheses
    ("4", 4),
])
def test_evaluator_on_hand_written_expressions(text, value):
    assert evaluate_listops(text) == value


@pytest.mark.parametrize("text", ["[MAX 1 2", "[MAX 1 2 ] ]", "[MAX ]", "[FOO 1 2 ]", "[MAX 1 2 ] 3", "12"])
def test_evaluator_rejects_malformed_expressions(text):
    with pytest.raises(ValueError, match="text: "):
        evaluate_listops(text)


def test_generated_expressions_evaluate_to_their_labels_within_the_limits():
    rows = listops_expressions(3, 300, max_depth=6, max_args=5, min_length=20, max_length=100)
    assert len(rows) == 300 and len({text for text, _ in rows}) == 300  # distinct, as LRA's set
    depths, arities = [], []
    for text, label in rows:
        assert isinstance(label, int) and evaluate_listops(text) == label
        assert 20 < n_tokens(text) < 100  # LRA keeps min_length < length < max_length
        depth, arity = structure(text)
        depths.append(depth)
        arities += arity
    assert max(depths) <= 5  # a node at depth max_depth = 6 is a value
    assert set(arities) == {2, 3, 4, 5}  # every count in [2, max_args] occurs, no other
    assert len(set(label for _, label in rows)) >= 6


def test_tight_limits_are_reached_and_respected():
    """max_depth 3 and max_args 3: operators nest at most 2 deep (and do), 2 or 3 arguments."""
    rows = listops_expressions(0, 100, max_depth=3, max_args=3, min_length=5, max_length=60)
    shapes = [structure(text) for text, _ in rows]
    assert max(depth for depth, _ in shapes) == 2
    assert set(a for _, arity in shapes for a in arity) == {2, 3}
    with pytest.raises(ValueError, match="longest tree"):  # at most 2 + 3 * (2 + 3) = 17 tokens
        listops_expressions(0, 1, max_depth=3, max_args=3, min_length=17, max_length=60)


def test_lra_default_limits():
    rows = listops_expressions(1, 3)
    for text, label in rows:
        assert 500 < n_tokens(text) < 2000 and evaluate_listops(text) == label
        depth, arity = structure(text)
        assert depth <= 9 and 2 <= min(arity) and max(arity) <= 10


def test_generator_is_deterministic_per_seed():
    a = listops_expressions(7, 20, min_length=20, max_length=100)
    assert a == listops_expressions(7, 20, min_length=20, max_length=100)
    assert a != listops_expressions(8, 20, min_length=20, max_length=100)
    assert a[:5] == listops_expressions(7, 5, min_length=20, max_length=100)  # a prefix of the stream


def lra_to_string(text):
    """LRA's release text of a plain expression: its tree as nested binary tuples
    ``(((op, a0), a1), ..., "]")``, each written ``( left right )`` (``listops.py``)."""
    stack = [[]]
    for token in text.split():
        if token.startswith("["):
            stack.append([token])
        elif token == "]":
            op, *args = stack.pop()
            node = (op, args[0])
            for arg in args[1:]:
                node = (node, arg)
            stack[-1].append((node, "]"))
        else:
            stack[-1].append(token)

    def to_string(node):
        return node if isinstance(node, str) else f"( {to_string(node[0])} {to_string(node[1])} )"

    return to_string(stack[0][0])


def test_parentheses_format_is_lras_binary_nodes():
    assert lra_to_string("[MAX 2 9 ]") == "( ( ( [MAX 2 ) 9 ) ] )"
    plain = listops_expressions(5, 10, min_length=20, max_length=100)
    parens = listops_expressions(5, 10, min_length=20, max_length=100, parens=True)
    for (text, label), (ptext, plabel) in zip(plain, parens):
        assert " ".join(t for t in ptext.split() if t not in "()") == text and label == plabel
        assert ptext == lra_to_string(text)
        assert ptext.count("(") == ptext.count(")") == sum(k + 1 for k in structure(text)[1])
        np.testing.assert_array_equal(encode_listops(ptext), encode_listops(text))


def test_encoding_uses_the_fixed_vocabulary():
    assert LISTOPS_VOCAB == ("<pad>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
                             "[MIN", "[MAX", "[MED", "[SM", "]")
    ids = encode_listops("( [MAX 2 9 ] )")
    assert ids.dtype == np.int32 and ids.tolist() == [12, 3, 10, 15]
    assert decode_listops(np.array([12, 3, 10, 15, 0, 0])) == "[MAX 2 9 ]"
    with pytest.raises(ValueError, match="'\\[FOO'"):
        encode_listops("[FOO 1 2 ]")


def test_tsv_round_trip(tmp_path):
    rows = listops_expressions(2, 12, min_length=20, max_length=100)
    path = write_listops_tsv(tmp_path / "basic_val.tsv", rows)
    assert path.read_text().splitlines()[0] == "Source\tTarget"
    tokens, lengths, labels = load_listops_tsv(path, max_length=100)
    assert tokens.shape == (12, 100) and tokens.dtype == lengths.dtype == labels.dtype == np.int32
    assert labels.tolist() == [label for _, label in rows]
    assert lengths.tolist() == [n_tokens(text) for text, _ in rows]
    for row, length, (text, _) in zip(tokens, lengths, rows):
        assert decode_listops(row) == text and not row[length:].any() and row[:length].all()


def test_reads_lras_release_format(tmp_path):
    """LRA's csv writer: parentheses, \\r\\n line ends; same ids as the plain text."""
    plain = listops_expressions(4, 5, min_length=20, max_length=100)
    parens = listops_expressions(4, 5, min_length=20, max_length=100, parens=True)
    release = tmp_path / "basic_test.tsv"
    release.write_bytes("".join(f"{t}\t{y}\r\n" for t, y in [("Source", "Target"), *parens]).encode())
    expected = load_listops_tsv(write_listops_tsv(tmp_path / "plain.tsv", plain), max_length=100)
    for got, want in zip(load_listops_tsv(release, max_length=100), expected):
        np.testing.assert_array_equal(got, want)


def test_generate_listops_files_writes_three_disjoint_splits(tmp_path):
    paths = generate_listops_files(tmp_path / "listops", seed=1, sizes=(6, 3, 2), min_length=20, max_length=100)
    assert [p.name for p in paths] == ["basic_train.tsv", "basic_val.tsv", "basic_test.tsv"]
    texts = [[line.split("\t")[0] for line in p.read_text().splitlines()[1:]] for p in paths]
    assert [len(t) for t in texts] == [6, 3, 2] and len(set(sum(texts, []))) == 11
    assert sum(texts, []) == [t for t, _ in listops_expressions(1, 11, min_length=20, max_length=100)]


@pytest.mark.parametrize("content, message", [
    ("", r"line 1: expected the header 'Source\\tTarget'"),
    ("Source,Target\n[MAX 1 2 ]\t2\n", r"line 1: expected the header"),
    ("Source\tTarget\n", "no rows after the header"),
    ("Source\tTarget\n[MAX 1 2 ]\t2\n[MAX 1 2 ]\t10\n", r"line 3: label '10' is not an integer in \[0, 10\)"),
    ("Source\tTarget\n[MAX 1 2 ]\tx\n", "line 2: label 'x'"),
    ("Source\tTarget\n[MAX 1 2 ]\t2\textra\n", "line 2: expected 2 tab-separated fields .* got 3"),
    ("Source\tTarget\n[MAX 1 2 ]\n", "line 2: expected 2 tab-separated fields .* got 1"),
    ("Source\tTarget\n[MAX 1 [AVG 2 ] ]\t2\n", r"line 2: .*unknown ListOps token\(s\) '\[AVG'"),
    ("Source\tTarget\n[MAX 1 2 3 4 5 ]\t5\n", "line 2: 7 tokens, longer than max_length 6"),
])
def test_listops_tsv_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad_listops.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad_listops.tsv: " + message):
        load_listops_tsv(path, max_length=6)


def test_listops_missing_file(tmp_path):
    with pytest.raises(ValueError, match="basic_train.tsv: file not found"):
        load_listops_tsv(tmp_path / "basic_train.tsv")


# --------------------------------------------------------------------------- IMDb


def write_imdb(root):
    reviews = {"neg": {"0_2.txt": "bad", "1_1.txt": "awful!"},
               "pos": {"0_9.txt": "café ok", "1_10.txt": "a great, long film"}}
    for split in ("train", "test"):
        for label, files in reviews.items():
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for name, text in files.items():
                (folder / name).write_text(text, encoding="utf-8")
    (root / "aclImdb" / "train" / "unsup").mkdir()  # ignored, as in the release


def test_imdb_bytes_labels_and_truncation(tmp_path):
    write_imdb(tmp_path)
    tokens, lengths, labels = load_imdb(tmp_path, "train", max_length=8)
    assert tokens.shape == (4, 8) and tokens.dtype == lengths.dtype == labels.dtype == np.int32
    assert labels.tolist() == [0, 0, 1, 1]
    assert lengths.tolist() == [3, 6, 8, 8]  # "café ok" is 8 bytes (é = C3 A9); the last is truncated
    assert tokens[0].tolist() == [ord("b") + 1, ord("a") + 1, ord("d") + 1, 0, 0, 0, 0, 0]
    assert tokens[2].tolist() == [100, 98, 103, 0xC3 + 1, 0xA9 + 1, 33, 112, 108]
    assert bytes((tokens[3] - 1).tolist()) == b"a great,"
    again = load_imdb(tmp_path / "aclImdb", "test", max_length=8)  # aclImdb itself
    for a, b in zip(again, (tokens, lengths, labels)):
        np.testing.assert_array_equal(a, b)


def test_imdb_errors(tmp_path):
    write_imdb(tmp_path)
    with pytest.raises(ValueError, match="split: expected 'train' or 'test'"):
        load_imdb(tmp_path, "val")
    with pytest.raises(ValueError, match="nowhere/train/neg: folder not found"):
        load_imdb(tmp_path / "nowhere", "train")
    for f in (tmp_path / "aclImdb" / "test" / "pos").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"aclImdb/test/pos: no \.txt reviews"):
        load_imdb(tmp_path, "test")


# --------------------------------------------------------------------------- AAN


def test_aan_pairs(tmp_path):
    path = tmp_path / "new_aan_pair.eval.tsv"
    path.write_bytes(b"1.0\tP01\tP02\tabc def\txy\n"
                     b"0\tP03\tP04\tna\xc3\xafve\tq\n"
                     b"1\tP05\tP06\tlonger than six\tz\n")
    tokens1, tokens2, lengths1, lengths2, labels = load_aan_tsv(path, max_length=6)
    assert tokens1.shape == tokens2.shape == (3, 6) and tokens1.dtype == np.int32
    assert labels.tolist() == [1, 0, 1] and labels.dtype == np.int32
    assert lengths1.tolist() == [6, 6, 6] and lengths2.tolist() == [2, 1, 1]
    assert bytes((tokens1[0] - 1).tolist()) == b"abc de"
    assert tokens1[1].tolist() == [ord("n") + 1, ord("a") + 1, 0xC4, 0xB0, ord("v") + 1, ord("e") + 1]
    assert tokens2[0].tolist() == [ord("x") + 1, ord("y") + 1, 0, 0, 0, 0]
    header = tmp_path / "with_header.tsv"
    header.write_bytes(b"label\tid1\tid2\ttext1\ttext2\n" + path.read_bytes())
    np.testing.assert_array_equal(load_aan_tsv(header, max_length=6)[0], tokens1)


@pytest.mark.parametrize("content, message", [
    (b"1\ta\tb\tx\ty\n0\ta\tb\tx\n", "line 2: expected 5 tab-separated fields .* got 4"),
    (b"1\ta\tb\tx\ty\n\n1\ta\tb\tx\ty\n", "line 2: expected 5 tab-separated fields .* got 1"),
    (b"2\ta\tb\tx\ty\n", "line 1: label b'2' is not 0 or 1"),
    (b"yes\ta\tb\tx\ty\n", "line 1: label b'yes' is not 0 or 1"),
    (b"", "no rows"),
])
def test_aan_errors_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad_aan.tsv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad_aan.tsv: " + message):
        load_aan_tsv(path)


# --------------------------------------------------------------------------- CIFAR-10


def write_cifar(root, per_file=4):
    """Random CIFAR pickles; returns {file name: (data, labels)}."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_file).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        written[name] = (data, labels)
    return written


def test_cifar_layout_and_order(tmp_path):
    written = write_cifar(tmp_path)
    images, labels = load_cifar10(tmp_path, "train")
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
    assert labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    data = written["data_batch_2"][0]  # images 4..7
    for image, row, col, channel in [(1, 0, 0, 0), (2, 5, 17, 1), (3, 31, 30, 2), (0, 31, 31, 2)]:
        assert images[4 + image, row, col, channel] == data[image, channel * 1024 + row * 32 + col]
    test_images, test_labels = load_cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert test_images.shape == (4, 32, 32, 3) and test_labels.tolist() == written["test_batch"][1]
    sequence = cifar_sequence(test_images)
    assert sequence.shape == (4, 1024, 3) and sequence.dtype == np.float32
    np.testing.assert_allclose(sequence[2, 5 * 32 + 17], test_images[2, 5, 17] / 255, rtol=1e-6)


def test_grayscale_is_tf_rgb_to_grayscale():
    pixels = np.array([[[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]]], np.uint8)
    assert cifar_grayscale_tokens(pixels).tolist() == [[76, 149, 29, 255, 0]]  # floor(w * 255.5)
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    tokens = cifar_grayscale_tokens(images)
    assert tokens.shape == (3, 1024) and tokens.dtype == np.int32 and 0 <= tokens.min() and tokens.max() < 256
    reference = np.floor(images @ np.array([0.2989, 0.5870, 0.1140]) / 255 * 255.5).reshape(3, 1024)
    assert np.abs(tokens - reference).max() <= 1 and np.mean(tokens == reference) > 0.99
    with pytest.raises(ValueError, match=r"images: expected uint8 \[n, h, w, 3\]"):
        cifar_grayscale_tokens(images.astype(np.float32))


def test_cifar_errors_name_the_file(tmp_path):
    write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(ValueError, match="split: expected 'train' or 'test'"):
        load_cifar10(tmp_path, "val")
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(ValueError, match=r"data_batch_3: b'data' must be uint8 \[n, 3072\].*\(4, 3000\)"):
        load_cifar10(tmp_path, "train")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]}, f)
    with pytest.raises(ValueError, match=r"test_batch: labels must be in \[0, 10\), got \[3, 10\]"):
        load_cifar10(tmp_path, "test")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.float32), b"labels": [3, 1]}, f)
    with pytest.raises(ValueError, match="test_batch: b'data' must be uint8"):
        load_cifar10(tmp_path, "test")
    (folder / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="data_batch_3: file not found"):
        load_cifar10(tmp_path, "train")
