"""Ring attention (ssmjax.distributed.ring) equals the single-device quadratic reference
``causal_softmax_attention`` in float64, output and gradients wrt q, k, v (dv != dk), on
8 simulated CPU devices with seq = 2 and 8 (4 and a batch sharded over "data" in the slow
run), with and without packed documents whose boundaries fall inside shards and on shard
edges. The compiled forward and forward+backward contain no all-gather, all-reduce,
reduce-scatter or all-to-all, and exactly the collective-permutes the ring needs.

The mesh cases run in one subprocess (``tests/distributed/ring_cases.py``) because the
number of CPU devices is fixed when JAX starts; the argument checks and a one-device ring
run in this process."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from ssmjax.distributed.ring import ring_attention
from ssmjax.scan.softmax_attention import causal_softmax_attention
from tests.distributed.cases import run_cases
from tests.distributed.ring_cases import DEFAULT_CASES, SEGMENTS, case_name, expected_permutes, output_and_grad

ZERO = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")


def _run(full: bool) -> dict:
    return run_cases("tests.distributed.ring_cases", *(["--full"] if full else []))


@pytest.fixture(scope="module")
def default_results():
    return _run(full=False)


def _check(name: str, result: dict) -> None:
    for what, error in result["errors"].items():
        assert error < 1e-12, f"{name}: {what} differs from the single-device reference by {error}"
    assert result["finite"], f"{name}: non-finite gradients"
    seq, documents = int(name.split("/")[0][3:]), name.split("/")[1] == "documents"
    expected = expected_permutes(seq, documents)
    for program in ("forward", "backward"):
        counts = result[program]
        assert all(counts[c] == 0 for c in ZERO), f"{name} {program}: {counts}"
        assert counts["collective-permute"] == expected[program], f"{name} {program}: {counts} vs {expected}"


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda case: case_name(*case))
def test_ring_matches_one_device(default_results, case):
    name = case_name(*case)
    _check(name, default_results[name])


@pytest.mark.slow
def test_ring_every_mesh():
    results = _run(full=True)
    assert len(results) == 11
    for name, result in results.items():
        _check(name, result)


def _qkv(time=8, dk=4, dv=3):
    keys = jax.random.split(jax.random.key(1), 3)
    shapes = [(2, time, 2, dk), (2, time, 2, dk), (2, time, 2, dv)]
    return [jax.random.normal(key, shape, jnp.float64) for key, shape in zip(keys, shapes)]


def _one_device_mesh():
    return jax.make_mesh((1,), ("seq",), axis_types=(AxisType.Auto,))


def test_one_device_ring_matches_reference():
    """The degenerate ring (n = 1: no sends) in tiles of 2 keys, in this process under the
    jaxtyping checks."""
    mesh = _one_device_mesh()
    q, k, v = _qkv()
    segment_ids = jnp.array(SEGMENTS)[:, ::2]  # [2, 8]: boundaries at 3 and 6, and 4
    ring = lambda x: ring_attention(*x, mesh, scale=0.7, segment_ids=segment_ids, block_size=2)  # noqa: E731
    reference = lambda x: causal_softmax_attention(*x, scale=0.7, segment_ids=segment_ids)  # noqa: E731
    got = jax.jit(lambda x: output_and_grad(ring, x))((q, k, v))
    want = jax.jit(lambda x: output_and_grad(reference, x))((q, k, v))
    for name, a, b in zip(("o", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        assert float(jnp.max(jnp.abs(a - b))) < 1e-12, name


@pytest.mark.parametrize("change, match", [
    (dict(q=jnp.zeros((2, 8, 4))), r"q: expected shape \[batch, time, heads, dk\]"),
    (dict(k=jnp.zeros((2, 8, 2, 5))), r"k: expected shape \[batch, time, heads, dk\]"),
    (dict(v=jnp.zeros((2, 6, 2, 3))), r"v: expected shape \[batch, time, heads, dv\]"),
    (dict(q=jnp.zeros((2, 6, 2, 4)), k=jnp.zeros((2, 6, 2, 4)), v=jnp.zeros((2, 6, 2, 3))),
     "q: time length 6 must be divisible by the 4 devices of mesh axis 'seq'"),
    (dict(axis="time"), "axis: 'time' is not an axis of the mesh"),
    (dict(segment_ids=jnp.zeros((2, 7), int)), r"segment_ids: expected shape \[batch, time\]"),
    (dict(segment_ids=jnp.zeros((2, 8))), "segment_ids: expected an integer dtype"),
    (dict(q=jnp.zeros((2, 8, 2, 4), int)), "q: expected a floating"),
    (dict(block_size=3), "block_size: 3 must divide the 2 tokens of each shard"),
    (dict(block_size=0), "block_size: expected a positive int"),
])
def test_bad_inputs(change, match):
    q, k, v = _qkv()
    # A 2 x 4 mesh of one CPU device repeated: the checks only read the mesh's shape.
    args = dict(q=q, k=k, v=v, mesh=Mesh(np.array(jax.devices()[:1] * 8).reshape(2, 4), ("data", "seq")))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ring_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("mesh"), **args)


def test_traced_scale_is_rejected():
    mesh = _one_device_mesh()
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale: expected a Python float"):
        jax.jit(lambda s: ring_attention(q, k, v, mesh, scale=s))(0.5)
