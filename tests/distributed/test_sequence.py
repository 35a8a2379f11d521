"""Sequence-parallel scans (ssmjax.distributed.sequence) on 8 simulated CPU devices equal
the single-device sequential oracle in float64 (outputs, final state, the gradient of
every input including the initial state), with packed documents whose boundaries fall
inside shards and on shard edges; the compiled forward has exactly one all-gather (plus
one ppermute of a segment id per row when segment_ids are given) and no all-reduce.

The cases run in one subprocess (``tests/distributed/sequence_cases.py``) because the
number of CPU devices is fixed when JAX starts."""

import pytest

from tests.distributed.cases import run_cases
from tests.distributed.sequence_cases import DEFAULT_CASES



def _run(full: bool) -> dict:
    return run_cases("tests.distributed.sequence_cases", *(["--full"] if full else []))


@pytest.fixture(scope="module")
def default_results():
    return _run(full=False)


def _check(name: str, result: dict) -> None:
    for what, error in result["errors"].items():
        assert error < 1e-12, f"{name}: {what} differs from the single-device oracle by {error}"
    forward = result["forward"]
    assert forward["all-gather"] == 1, f"{name}: {forward}"
    assert forward["all-reduce"] == 0 and forward["all-to-all"] == 0 and forward["reduce-scatter"] == 0, forward
    assert forward["collective-permute"] == (1 if name.endswith("documents") else 0), forward


@pytest.mark.parametrize("op, seq, documents", DEFAULT_CASES)
def test_sequence_parallel_matches_one_device(default_results, op, seq, documents):
    name = f"{op}/seq{seq}/{'documents' if documents else 'plain'}"
    _check(name, default_results[name])


@pytest.mark.slow
def test_every_op_every_mesh():
    for name, result in _run(full=True).items():
        _check(name, result)
