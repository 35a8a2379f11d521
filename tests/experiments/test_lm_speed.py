"""experiments.lm_speed (ours vs nanoGPT): the pure helpers, and the PyTorch peer's model
when torch is importable (skipped otherwise)."""

from __future__ import annotations

import pytest

from experiments import lm_speed
from experiments.bench import peers
from experiments.bench.table import markdown_table


def test_tokens_per_s_and_its_argument_checks():
    assert lm_speed.tokens_per_s(100.0, 768) == pytest.approx(7680.0)
    with pytest.raises(ValueError, match="ms, tokens"):
        lm_speed.tokens_per_s(0.0, 768)
    with pytest.raises(ValueError, match="ms, tokens"):
        lm_speed.tokens_per_s(1.0, 0)


def test_summarize_takes_median_and_spread_per_key():
    summary = lm_speed.summarize([dict(a=3.0, b=1.0), dict(a=1.0), dict(a=2.0, b=5.0)])
    assert summary["a"] == dict(median=2.0, min=1.0, max=3.0, n=3)
    assert summary["b"] == dict(median=3.0, min=1.0, max=5.0, n=2)
    with pytest.raises(ValueError, match="rounds"):
        lm_speed.summarize([])


def test_paired_ratios_compare_within_each_round():
    rounds = [dict(a=2.0, b=1.0), dict(a=4.0, b=4.0), dict(a=1.0)]  # load doubled in round 2
    assert lm_speed.paired_ratios(rounds, "a", "b") == [0.5, 1.0]


def test_comparison_rows_ratio_target_and_missing_sides():
    rows = lm_speed.comparison_rows([dict(ours_train_ms=150.0, nanogpt_train_ms=100.0, ours_decode_ms=1.0,
                                          nanogpt_decode_ms=2.0)])
    by = {(r["what"], r["side"]): r for r in rows}
    train = by[("train step (12 x 64 tokens)", "ours")]
    assert train["tokens_per_s"] == pytest.approx(768 / 0.15)
    assert train["ratio"] == pytest.approx(100 / 150) and train["target"] == pytest.approx(1 / 1.5)
    assert train["met"] == "yes"  # exactly 1.5x slower is within the bound
    decode = by[("decode, step per call", "ours")]
    assert decode["ratio"] == pytest.approx(2.0) and decode["met"] == "yes" and decode["tokens_per_s"] == 1000
    assert "ratio" not in by[("train step (12 x 64 tokens)", "nanoGPT")]
    assert len(rows) == 4  # unmeasured rows are left out
    slow = lm_speed.comparison_rows([dict(ours_train_ms=151.0, nanogpt_train_ms=100.0),
                                     dict(ours_train_ms=300.0, nanogpt_train_ms=150.0),
                                     dict(ours_train_ms=100.0, nanogpt_train_ms=100.0)])
    assert slow[0]["ratio"] == pytest.approx(100 / 151) and slow[0]["ratio_spread"] == "0.50-1.00"
    assert slow[0]["met"] == "no" and slow[0]["ms"] == 151.0
    alone = lm_speed.comparison_rows([dict(ours_train_ms=151.0)])
    assert len(alone) == 1 and "ratio" not in alone[0]  # no peer: no ratio
    table = markdown_table(rows, lm_speed.COLUMNS)
    assert "| ours / nanoGPT | range | target | met |" in table.splitlines()[0] and "0.67" in table


def test_time_block_checks_calls():
    assert lm_speed.time_block(lambda: None, 3) >= 0
    with pytest.raises(ValueError, match="calls"):
        lm_speed.time_block(lambda: None, 0)


def test_peer_shape_is_written_out_for_torchless_environments():
    pytest.importorskip("torch")
    from experiments.bench import nanogpt

    assert peers.SHAPES["nanogpt"] == nanogpt.BABY_GPT


def test_nanogpt_parameter_count_and_kv_cache_decode_match_the_full_forward():
    torch = pytest.importorskip("torch")
    from experiments.bench import nanogpt

    model = nanogpt.build()
    assert nanogpt.param_count(model) == 801_664  # nanoGPT prints "number of parameters: 0.80M"
    assert nanogpt.param_count(model, non_embedding=False) == 809_856
    small = nanogpt.build(n_layer=2, n_embd=32, n_head=2, block_size=8).eval()
    idx = torch.randint(65, (2, 8))
    with torch.no_grad():
        full = small(idx)
        caches = small.new_caches(2)
        prefix = small(idx[:, :3], caches, 0)  # a chunk, then one token per call
        steps = [small(idx[:, i:i + 1], caches, i) for i in range(3, 8)]
    torch.testing.assert_close(torch.cat([prefix, *steps], 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="idx"):
        small(torch.zeros(1, 9, dtype=torch.long))
    step = nanogpt.train_step_fn(small, batch_size=2)
    losses = [step() for _ in range(4)]  # AdamW at lr 1e-3 on one fixed batch
    assert losses[-1] < losses[0]
    assert nanogpt.decode_fn(small)().shape == (1, 8) and nanogpt.recompute_fn(small)().shape == (1, 8)
