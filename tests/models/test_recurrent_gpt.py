"""RecurrentGPT's loop (ssmjax.models.recurrent_gpt) with scripted, deterministic generators:
the embedding (determinism, normalisation, a plain-dict oracle), retrieval order against a
brute-force cosine ranking, prompt contents, parsing and its fallback, and the memory
bookkeeping of whole runs."""

import math
import zlib
from collections import Counter

import numpy as np
import pytest

from ssmjax.models.recurrent_gpt import (PAPER_TEMPLATE, LoopConfig, PromptTemplate, build_prompt, embed,
                                         initial_state, lead_line_memory, parse_output, query_text, recurrent_step,
                                         retrieve, run_loop)

TOPICS = ["the dragon slept on a hill of gold in the northern mountains",
          "a merchant sailed the river to sell silk and pepper at the market",
          "the old queen wrote letters to her exiled son every winter",
          "children played football in the muddy field behind the school",
          "the dragon woke and flew south, burning the wheat fields",
          "a merchant sailed the river to sell silk and pepper at the market"]  # a duplicate: ties keep the older


def oracle_counts(text: str, dim: int, n: int) -> Counter:
    """Hashed n-gram counts written out with a Counter (the module docstring's definition)."""
    chars = " " + " ".join(text.lower().split()) + " "
    return Counter(zlib.crc32(chars[i:i + n].encode()) % dim for i in range(len(chars) - n + 1))


def oracle_cosine(a: Counter, b: Counter) -> float:
    dot = sum(a[j] * b[j] for j in a)
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0


def test_embedding_is_deterministic_unit_norm_and_matches_the_hashed_ngram_counts():
    for text in TOPICS:
        e = embed(text, dim=64, ngram=3)
        assert e.shape == (64,) and e.dtype == np.float64
        np.testing.assert_array_equal(e, embed(text, dim=64, ngram=3))
        assert np.linalg.norm(e) == pytest.approx(1.0, abs=1e-12)
        counts = oracle_counts(text, 64, 3)
        expected = np.zeros(64)
        for j, c in counts.items():
            expected[j] = c
        np.testing.assert_allclose(e, expected / np.linalg.norm(expected), rtol=0, atol=1e-15)
    # case and whitespace layout do not matter; text too short for one n-gram embeds to zero
    np.testing.assert_array_equal(embed("The  Dragon\nslept"), embed("the dragon slept"))
    assert not embed("", ngram=3).any() and not embed("ab", ngram=5).any()
    assert embed("ab", ngram=3).any()  # " ab " has two trigrams
    with pytest.raises(ValueError, match="dim: expected a positive int"):
        embed("x", dim=0)


@pytest.mark.parametrize("k", [0, 1, 3, 6, 10])
def test_retrieval_order_matches_a_brute_force_cosine_ranking(k):
    dim, n = 256, 3
    keys = np.stack([embed(t, dim, n) for t in TOPICS])
    query = "a merchant on the river with silk; the dragon"
    hits = retrieve(embed(query, dim, n), keys, k)
    q = oracle_counts(query, dim, n)
    scores = [oracle_cosine(q, oracle_counts(t, dim, n)) for t in TOPICS]
    ranking = sorted(range(len(TOPICS)), key=lambda i: (-scores[i], i))[:k]
    assert [i for i, _ in hits] == ranking
    np.testing.assert_allclose([s for _, s in hits], [scores[i] for i in ranking], rtol=1e-12)
    if k >= 3:
        assert ranking[:2] == [1, 5]  # the duplicated merchant text ties; the older comes first


def test_retrieve_rejects_bad_arguments():
    keys = np.stack([embed(t, 32) for t in TOPICS[:2]])
    with pytest.raises(ValueError, match="k: expected >= 0"):
        retrieve(embed("x y", 32), keys, -1)


def test_template_fields_are_checked_and_the_prompt_holds_every_part():
    with pytest.raises(ValueError, match=r"template body: unknown field\(s\) \['outline'\]"):
        PromptTemplate(body="{paragraph} {outline}")
    with pytest.raises(ValueError, match="template memory_item"):
        PromptTemplate(body="{memories}", memory_item="{score}")
    prompt = build_prompt(PAPER_TEMPLATE, ["first memory", "second memory"], "SHORT-MEM", "PREV-PARA", "THE-PLAN")
    assert "Related Paragraph 1: first memory\nRelated Paragraph 2: second memory" in prompt
    assert prompt.index("Input Memory:\nSHORT-MEM") < prompt.index("Input Paragraph:\nPREV-PARA") \
        < prompt.index("Input Instruction:\nTHE-PLAN") < prompt.index("Input Related Paragraphs:")
    plain = PromptTemplate(body="{memories}|{short_memory}|{plan}|{paragraph}", memory_separator="//")
    assert build_prompt(plain, ["a", "b"], "h", "x", "p") == "a//b|h|p|x"
    assert build_prompt(plain, [], "h", "x", "p") == "|h|p|x"


FORMATTED = """Output Paragraph:
The knight rode north.
He found the cave.

Output Memory:
Rational: drop the market, add the cave;
Updated Memory: The knight is at the cave.

Output Instruction:
Instruction 1: He enters the cave.
Instruction 2: He turns back.
Instruction 3: He waits for dawn."""


def test_parse_reads_the_papers_format():
    out = parse_output(FORMATTED, "old memory", "old plan", 100)
    assert out.paragraph == "The knight rode north.\nHe found the cave."
    assert out.short_memory == "The knight is at the cave."
    assert out.plan == "He enters the cave."  # the first of the three instructions
    assert out.parsed == ("paragraph", "short_memory", "plan")
    lower = parse_output(FORMATTED.lower(), "m", "p", 100)  # headers are case-insensitive
    assert lower.paragraph == "the knight rode north.\nhe found the cave." and lower.parsed == out.parsed


def test_parse_falls_back_field_by_field():
    raw = "\n\nROMEO:\nBut soft, what light\nthrough yonder window breaks?\n"
    out = parse_output(raw, "JULIET:\nOLD LINE", "the balcony", 20)
    assert out.paragraph == raw.strip() and out.plan == "the balcony" and out.parsed == ()
    assert out.short_memory == "OLD LINE\nROMEO:"  # lead line appended; the oldest lines dropped to fit 20 chars
    only_paragraph = parse_output("Output Paragraph: A short one.\nOutput Memory:\n", "m", "p", 50)
    assert only_paragraph.parsed == ("paragraph",) and only_paragraph.paragraph == "A short one."
    assert only_paragraph.short_memory == "m\nA short one." and only_paragraph.plan == "p"
    bare_instruction = parse_output("text\nOutput Instruction: go west", "m", "p", 50)
    assert bare_instruction.plan == "go west" and bare_instruction.parsed == ("plan",)


def test_lead_line_memory_keeps_the_newest_whole_lines_within_budget():
    assert lead_line_memory("", "\n\n  first line  \nsecond", 40) == "first line"
    assert lead_line_memory("aaaa\nbbbb", "cccc\nzzz", 9) == "bbbb\ncccc"
    assert lead_line_memory("aaaa", "a very long lead line", 6) == "a very"  # the newest line alone is cut
    assert lead_line_memory("keep", "", 10) == "keep"
    with pytest.raises(ValueError, match="max_chars"):
        lead_line_memory("", "x", 0)


class ScriptedWriter:
    """A deterministic fake generator: step ``i`` writes ``paragraphs[i]`` in the paper's format
    with plan ``plans[i]``; it records every prompt it is given."""

    def __init__(self, paragraphs, plans):
        self.paragraphs, self.plans, self.prompts = paragraphs, plans, []

    def __call__(self, prompt: str) -> str:
        i = len(self.prompts)
        self.prompts.append(prompt)
        return (f"Output Paragraph:\n{self.paragraphs[i]}\n\nOutput Memory:\nRational: none;\n"
                f"Updated Memory: memory after step {i + 1}\n\nOutput Instruction:\n"
                f"Instruction 1: {self.plans[i]}\nInstruction 2: other\nInstruction 3: another")


def test_the_loop_keeps_its_memories_and_retrieves_by_the_plan():
    config = LoopConfig(top_k=2, dim=512)
    plans = ["go on", "go on", "go on", "wake the dragon on its hill of gold", "go on"]
    writer = ScriptedWriter(TOPICS[1:], plans)
    start = initial_state(TOPICS[0], plan="begin", config=config)
    assert start.short_memory == TOPICS[0] and start.long_memory == ()
    state, records = run_loop(start, writer, 5, config)

    # bookkeeping: M holds every paragraph but the newest, in order, with the step that wrote it
    assert [m.text for m in state.long_memory] == TOPICS[:5] and [m.step for m in state.long_memory] == list(range(5))
    assert state.paragraph == TOPICS[5] and state.step == 5 and state.plan == plans[4]
    assert state.short_memory == "memory after step 5"
    assert [r.memory_size for r in records] == list(range(5)) and [r.step for r in records] == list(range(1, 6))
    assert all(r.parsed == ("paragraph", "short_memory", "plan") for r in records)
    for m in state.long_memory:
        np.testing.assert_array_equal(m.embedding, embed(m.text, 512))

    # each step's retrieval is the brute-force ranking of M_t for the query h_t + "\n" + p_t
    states = [start] + [initial_state(TOPICS[t], plan=plans[t - 1], short_memory=f"memory after step {t}")
                        for t in range(1, 5)]
    for t, (before, record) in enumerate(zip(states, records)):
        q = oracle_counts(query_text(before), 512, 3)
        scores = [oracle_cosine(q, oracle_counts(TOPICS[i], 512, 3)) for i in range(t)]
        ranking = sorted(range(t), key=lambda i: (-scores[i], i))[:2]
        assert list(record.retrieved) == ranking
        np.testing.assert_allclose(record.scores, [scores[i] for i in ranking], rtol=1e-12)
        # the prompt holds the retrieved memories (most similar first), h_t, x_t, p_t, and no other memory
        prompt = writer.prompts[t]
        assert prompt == record.prompt
        related = prompt.split("Input Related Paragraphs:\n")[1].split("\n\nAnswer")[0]
        assert related == "\n".join(f"Related Paragraph {j + 1}: {TOPICS[i]}" for j, i in enumerate(ranking))
        assert f"Input Memory:\n{before.short_memory}\n" in prompt and f"Input Paragraph:\n{TOPICS[t]}\n" in prompt
        assert f"Input Instruction:\n{before.plan}\n" in prompt
    # step 4's plan "wake the dragon ..." makes step 5 retrieve the dragon paragraph (the opening) first
    assert records[4].retrieved[0] == 0 and records[4].scores[0] > records[4].scores[1]


def test_the_loop_falls_back_when_the_generator_ignores_the_format():
    outputs = iter(["  \nKING:\nFirst speech.\n", "QUEEN:\nSecond.", "KING:\nThird, and more."])
    config = LoopConfig(top_k=1, short_memory_chars=12, memory_chars=4, paragraph_chars=7,
                        template=PromptTemplate(body="[{memories}][{short_memory}][{plan}][{paragraph}]"))
    state, records = run_loop(initial_state("OPENING LINE\nmore", "PLAN", config=config),
                              lambda prompt: next(outputs), 3, config)
    assert [r.paragraph for r in records] == ["KING:\nFirst speech.", "QUEEN:\nSecond.", "KING:\nThird, and more."]
    assert [r.parsed for r in records] == [(), (), ()] and state.plan == "PLAN"
    assert [r.short_memory for r in records] == ["KING:", "KING:\nQUEEN:", "QUEEN:\nKING:"]
    # budgets: the head of the retrieved memory, the tail of the previous paragraph
    assert records[0].prompt == "[][OPENING LINE][PLAN][NE\nmore]" and records[0].retrieved == ()  # M_1 is empty
    # step 3: the query "KING:\nQUEEN:\nPLAN" shares "king:" with paragraph 1, little with the opening
    assert records[2].retrieved == (1,) and records[2].prompt == "[KING][KING:\nQUEEN:][PLAN][Second.]"
    with pytest.raises(ValueError, match="generate: expected a callable returning str"):
        recurrent_step(state, lambda prompt: 3, config)


def test_recent_retrieval_takes_the_newest_memories():
    config = LoopConfig(top_k=2, retrieval="recent", template=PromptTemplate(body="{memories}"), dim=64)
    state, records = run_loop(initial_state("p0"), lambda prompt: f"p{prompt.count('p') + 1}", 4, config)
    assert [r.retrieved for r in records] == [(), (0,), (1, 0), (2, 1)]
    assert [r.prompt for r in records] == ["", "p0", "p1\np0", "p2\np1"]
    q = embed(query_text(initial_state("x", short_memory=records[2].short_memory)), 64)
    np.testing.assert_allclose(records[3].scores, [embed("p2", 64) @ q, embed("p1", 64) @ q], rtol=1e-12)


def test_loop_config_errors():
    with pytest.raises(ValueError, match=r"retrieval: expected one of \('cosine', 'recent'\)"):
        LoopConfig(retrieval="bm25")
    with pytest.raises(ValueError, match="top_k: expected >= 0"):
        LoopConfig(top_k=-1)
    with pytest.raises(ValueError, match="memory_chars: expected None or >= 0"):
        LoopConfig(memory_chars=-2)
    with pytest.raises(ValueError, match="steps: expected >= 0"):
        run_loop(initial_state("x"), str, -1)
