"""The communication benchmark (experiments/comm_bench.py): the bytes counted in the
compiled HLO of every sequence-parallel scan equal the O(state) formula ``(|M| + |E|) *
4`` of its shard summary (one all-gather, nothing else), independent of T, so the ratio
to the activation bytes a device holds falls as T grows. The benchmark runs in a
subprocess because it needs 8 CPU devices (fixed when JAX starts)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.comm_bench import (
    OPS,
    SHAPES,
    activation_bytes,
    collective_bytes,
    expected_sent_bytes,
    input_shapes,
)

ROOT = Path(__file__).resolve().parents[2]
LENGTHS = (64, 128, 256)


def test_collective_bytes_resolves_operands_by_name():
    hlo = """
HloModule m
ENTRY %main {
  %p = f32[2,64]{1,0} parameter(0)
  %fusion.1 = f32[1,36]{1,0} fusion(%p), kind=kLoop, calls=%f
  %all-gather.7 = f32[8,36]{1,0} all-gather(%fusion.1), channel_id=1, dimensions={0}
  %cp = s32[2]{0} collective-permute-start(s32[2]{0} %ids), channel_id=2
  ROOT %ar = (f32[4]{0}, bf16[3]{0}) all-reduce(%fusion.1, %p), to_apply=%add
}"""
    sent = collective_bytes(hlo)
    assert sent["all-gather"] == 36 * 4  # the operand, not the gathered result
    assert sent["collective-permute"] == 2 * 4  # an operand shape printed inline
    assert sent["all-reduce"] == 36 * 4 + 2 * 64 * 4
    assert sent["reduce-scatter"] == sent["all-to-all"] == 0


def test_formulas_are_the_state_summaries():
    gla = SHAPES["gated_linear_attention"]
    assert expected_sent_bytes("gated_linear_attention", gla) == 4 * gla["b"] * gla["h"] * gla["dk"] * (1 + gla["dv"])
    assert expected_sent_bytes("linear_scan", dict(b=1, d=3), itemsize=8) == 2 * 3 * 8
    for op in OPS:
        shapes = input_shapes(op, 64, SHAPES[op])
        assert activation_bytes(op, 64, SHAPES[op]) == sum(map(math.prod, shapes.values())) * 4 // 8
    with pytest.raises(ValueError, match="op: expected one of"):
        expected_sent_bytes("attention", {})


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("comm") / "comm_bench.json"
    out = subprocess.run([sys.executable, "-m", "experiments.comm_bench", "--t", ",".join(map(str, LENGTHS)),
                          "--json", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("op", OPS)
def test_sent_bytes_are_the_state_summary_and_the_ratio_falls(bench, op):
    rows = [row for row in bench["rows"] if row["op"] == op]
    assert [row["t"] for row in rows] == list(LENGTHS), rows
    for row in rows:
        assert "error" not in row, row
        assert row["sent_bytes"] == expected_sent_bytes(op, SHAPES[op]), row
        assert set(row["collectives"]) == {"all-gather"}, row
        assert row["activation_bytes"] == activation_bytes(op, row["t"], SHAPES[op])
    ratios = [row["ratio"] for row in rows]
    assert all(a > b for a, b in zip(ratios, ratios[1:])), ratios
    assert bench["ratio_falls_with_t"][op] is True
