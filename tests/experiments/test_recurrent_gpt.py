"""The recurrent_gpt experiment: its statistics on hand-built steps, the openings, the report,
the CLI's errors, and (slow) the whole protocol end to end on a tiny corpus and LM."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import recurrent_gpt as rg
from experiments import regression
from ssmjax.models.recurrent_gpt import StepRecord


def record(step, paragraph, retrieved=(), scores=(), parsed=()):
    return StepRecord(step=step, prompt="", output=paragraph + "\n", retrieved=tuple(retrieved), scores=tuple(scores),
                      memory_size=step - 1, paragraph=paragraph, short_memory="", plan="", parsed=tuple(parsed))


def test_speakers_and_words():
    text = "KING RICHARD III:\nWhat say you?\n\nFirst Citizen:\nNay, we say nothing: peace.\nnot a speaker:\n"
    assert rg.speakers(text) == {"KING RICHARD III", "First Citizen"}
    assert rg.words("Nay, we say NOTHING: peace; peace!") == {"nothing", "peace"}


def test_mechanism_stats_counts_what_only_long_term_memory_supplied():
    opening = "ROMEO:\nthe moon"
    memory = [opening, "JULIET:\nwhat light", "NURSE:\nanon anon", "JULIET:\ngood night"]
    records = [record(1, "JULIET:\nwhat light"),                                    # M is empty
               record(2, "NURSE:\nanon anon", [0], [0.5]),                          # shown: "ROMEO:\nthe moon"
               record(3, "ROMEO:\nmoon light", [1, 0], [0.9, 0.2]),                  # ROMEO, from memory 0 (shown)
               record(4, "JULIET:\ngood night", [2, 1], [0.4, 0.3], ("plan",))]     # JULIET from memory 1
    stats = rg.mechanism_stats(opening, records, memory, memory_chars=100)
    assert stats["steps"] == 4 and stats["retrieval_steps"] == 3 and stats["parsed"] == 1
    assert stats["chars"] == sum(len(r.output) for r in records)
    assert stats["top1_cosine"] == pytest.approx(0.5 + 0.9 + 0.4) and stats["retrieved"] == 5
    assert stats["cosine"] == pytest.approx(0.5 + 0.9 + 0.2 + 0.4 + 0.3)
    # ages relative to the previous paragraph x_{t-1}: step 2: 1; step 3: 1, 2; step 4: 1, 2
    assert stats["age"] == 1 + (1 + 2) + (1 + 2)
    # name hits: step 3 (ROMEO is in memory 0, not in x_2 = NURSE) and step 4 (JULIET in memory 1, not in x_3)
    assert stats["name_hits"] == 2
    # long range (a speaker of an older paragraph than x_{t-1}, absent from it): steps 3 and 4
    assert stats["long_range"] == 2
    # words (speaker names included) of y in the shown memories, not in x_{t-1}: step 3 {romeo, moon, light} all
    # shown and none in "nurse anon" -> 1; step 4 {juliet, good, night}: juliet (memory 1) -> 1/3; step 2 -> 0
    assert stats["word_reuse"] == pytest.approx(1 + 1 / 3)
    heads = rg.mechanism_stats(opening, records, memory, memory_chars=5)  # shown: "ROMEO", "JULIE", "NURSE"
    assert heads["name_hits"] == 0 and heads["word_reuse"] == pytest.approx(1 / 3)  # no "NAME:" line; "romeo"
    assert stats["memory_items"] == 4 and stats["memory_chars"] == sum(map(len, memory))
    row = rg.summarize([stats, heads])
    assert row["steps"] == 8 and row["memory_items"] == 8 and row["retrieval_steps"] == 6
    row = rg.summarize([stats])
    assert row["name_hit_rate"] == pytest.approx(2 / 3) and row["long_range_rate"] == pytest.approx(0.5)
    assert row["mean_age"] == pytest.approx(7 / 5) and row["format_rate"] == pytest.approx(0.25)
    assert row["word_reuse"] == pytest.approx(4 / 9) and row["top1_cosine"] == pytest.approx(1.8 / 3)


def test_stories_pack_whole_speeches_into_paragraphs():
    valid = "".join(f"\n\nSPEAKER{i}:\nline {i}" for i in range(40))  # speeches of 16-17 characters
    out = rg.stories(valid, 2, 3, 40)
    assert out == rg.stories(valid, 2, 3, 40) and [len(s) for s in out] == [3, 3]
    assert out[0] == ["SPEAKER0:\nline 0\n\nSPEAKER1:\nline 1", "SPEAKER2:\nline 2\n\nSPEAKER3:\nline 3",
                      "SPEAKER4:\nline 4\n\nSPEAKER5:\nline 5"]
    assert out[1][0].startswith("SPEAKER2") and all(len(p) <= 40 for s in out for p in s)  # from the middle
    assert rg.stories("\n\n" + "x" * 50, 1, 1, 10) == [["x" * 10]]  # a long speech alone is cut
    with pytest.raises(ValueError, match="stories: the validation text after character 0 holds 2 paragraphs"):
        rg.stories("\n\nA:\nb\n\nC:\nd", 1, 3, 5)


def test_paired_difference_and_masked_bits():
    mean, se = rg.paired_difference([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert mean == pytest.approx(2.0) and se == pytest.approx(1.0 / np.sqrt(3))
    nats = np.log(2) * np.array([[1.0, 3.0], [5.0, 7.0]])
    assert rg.masked_bits(nats, np.array([[True, False], [True, True]])) == pytest.approx(13 / 3)
    assert np.isnan(rg.masked_bits(nats, np.zeros((2, 2), bool)))


def test_a_scripted_generator_replays_the_real_text():
    generate = rg.scripted(["one", "two"])
    assert generate("any prompt") == "one" and generate("") == "two"


def test_report_renders_a_finished_run(tmp_path):
    run = tmp_path / "attention"
    run.mkdir()
    row = dict(steps=10, chars=2560, format_rate=0.0, memory_items=10, memory_chars=2400, retrieval_steps=8,
               top1_cosine=0.31, mean_cosine=0.25, mean_age=3.5, name_hit_rate=0.5, word_reuse=0.04,
               long_range_rate=0.3, bits_per_char=2.9, true_bits_per_char=2.7, true_name_bits_per_char=1.5,
               true_bits_delta=-0.05, true_bits_delta_se=0.02)
    (run / "config.json").write_text(json.dumps(dict(experiment="recurrent_gpt", model="attention",
                                                     config=dict(stories=2, steps=5, chars=256, top_k=2))))
    (run / "result.json").write_text(json.dumps(dict(generators=dict(recurrent_gpt=row, rolling=row),
                                                     real_text_retrieval=dict(recurrent_gpt=row, recent=row),
                                                     lm=dict(context=256, valid_bits_per_char=2.5))))
    text = rg.report_section([run], tmp_path)
    assert "**Paper finding.**" in text and "2 stories x 5 steps x 256 chars" in text
    assert ("| recurrent_gpt | 10 | 2,560 | 0.00 | 10 (2,400) | 0.310 | 3.5 | 0.50 | 0.040 | 0.30 | 2.900 | 2.700 "
            "(-0.050 +- 0.020) | 1.500 |") in text
    assert "over 8 steps with memories): `recurrent_gpt` 0.50 / 0.040 / 0.310; `recent` 0.50 / 0.040 / 0.310." in text
    assert rg.report_section([], tmp_path) == ""


def test_cli_rejects_bad_settings(tmp_path, capsys):
    with pytest.raises(SystemExit):
        rg.main(["--out", str(tmp_path), "--set", "stories=0", "--quiet"])
    assert "stories: expected >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rg.main(["--out", str(tmp_path), "--set", "window=3"])
    assert "unknown field 'window'" in capsys.readouterr().err


TINY = ["d_model=16", "n_layers=1", "seq_len=24", "batch_size=4", "pretrain_steps=2", "stories=2", "steps=3",
        "chars=20", "memory_chars=6", "short_memory_chars=6", "previous_chars=6"]


@pytest.mark.slow  # ~15 s: pretraining, two compiled samplers, scoring
def test_recurrent_gpt_end_to_end_on_a_tiny_corpus(tmp_path):
    (tmp_path / "tiny.txt").write_text("ROMEO:\nthe cat sat on the mat.\n\nJULIET:\nwhat a fine day, my lord.\n\n" * 60)
    sets = [*TINY, f"data_dir={tmp_path}", "data_file=tiny.txt"]
    assert rg.main(["--out", str(tmp_path / "runs"), "--quiet", *[f"--set={s}" for s in sets]]) == 0
    run = tmp_path / "runs" / "recurrent_gpt" / "attention"
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "done" and tuple(result["generators"]) == rg.GENERATORS
    assert result["lm"]["context"] == 24 and result["lm"]["valid_bits_per_char"] > 0
    for name, row in result["generators"].items():
        assert row["steps"] == 6 and row["chars"] == 6 * 20 and row["memory_items"] == 6
        assert row["retrieval_steps"] == 4 and 0 <= row["name_hit_rate"] <= 1 and row["bits_per_char"] > 0
        assert row["true_bits_per_char"] > 0 and row["true_name_bits_per_char"] > 0 and row["true_name_chars"] > 0
        assert np.isfinite(row["true_bits_delta_se"]) and (name != "rolling" or row["true_bits_delta"] == 0)
        assert (run / f"{name}-1.txt").read_text().count("\n\n") >= 3
    memory = json.loads((run / "memory-0.json").read_text())
    assert [m["step"] for m in memory["long_memory"]] == [0, 1, 2]
    assert [s["memory_size"] for s in memory["steps"]] == [0, 1, 2]
    assert all(len(s["retrieved"]) == min(2, s["memory_size"]) for s in memory["steps"])
    assert "rolling" in rg.report_section([run], tmp_path)
    assert set(result["real_text_retrieval"]) == {"recurrent_gpt", "recent"}

    # the sampler: deterministic per prompt, ``chars`` characters of the vocabulary, any prompt length
    pretrained = tmp_path / "runs" / "finetune" / "attention-pretrain-recurrent_gpt" / "result.json"
    assert result["lm"]["run"] == str(pretrained.parent)
    stamp = pretrained.stat().st_mtime_ns
    lm = rg.load_lm(regression.make_config(rg.SIZES, "cpu", "attention", sets), tmp_path / "runs", verbose=False)
    assert pretrained.stat().st_mtime_ns == stamp  # the pretrained LM was reused, not trained again
    sample = rg.lm_generator(lm["model"], lm["params"], lm["tokenizer"], context=lm["context"], chars=20,
                             key=jax.random.key(0), temperature=1.0, top_k=0)
    texts = [sample(p) for p in ("", "ROMEO:\n", "the cat sat " * 9, "ROMEO:\n")]
    assert texts[1] == texts[3] and all(len(t) == 20 and set(t) <= set(lm["tokenizer"].chars) for t in texts)
    assert len({texts[0], texts[1], texts[2]}) == 3
    assert np.isfinite(rg.bits_per_char(lm["model"], lm["params"], lm["tokenizer"], "ROMEO:\n" * 9, 24))

    # teacher-forced nats == -log p(paragraph | prompt) from the model's own logits, per character
    step = dataclasses.replace(record(1, "JULIET:\nwhat a"), prompt="ROMEO:\nthe cat")
    nats, real, names = rg.continuation_nats(lm["model"], lm["params"], lm["tokenizer"], [step], context=24, chars=20)
    tokens = np.concatenate([rg.prompt_ids(lm["tokenizer"], step.prompt, 24), lm["tokenizer"].encode(step.paragraph)])
    logits = lm["model"].apply(lm["params"], jnp.asarray(tokens)[None, :-1])[0]
    logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
    expected = [-logp[23 + k, tokens[24 + k]] for k in range(len(step.paragraph))]
    np.testing.assert_allclose(nats[0, :len(step.paragraph)], expected, rtol=1e-5)
    assert real[0].tolist() == [True] * 14 + [False] * 6 and names[0].tolist() == [True] * 7 + [False] * 13
    assert rg.masked_bits(nats, names) == pytest.approx(np.mean(expected[:7]) / np.log(2), rel=1e-5)
