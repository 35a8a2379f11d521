"""Meshes, FSDP rules and training on a mesh (ssmjax.distributed.mesh, train(mesh=...)).

The argument checks run here; the training cases run on 8 simulated CPU devices in one
subprocess (``tests/distributed/mesh_cases.py``): one step of a GLA + attention model on
``data=8``, ``fsdp=8`` and ``data=2,seq=4`` equals the one-device step, and a run
checkpointed on ``data=8`` and resumed on ``data=2,fsdp=4`` equals an uninterrupted
one-device run."""

import jax
import pytest
from jax.sharding import AbstractMesh

from ssmjax.distributed import check_batch_shape, make_mesh, param_spec, parse_mesh
from tests.distributed.cases import run_cases

LR = 3e-3  # mesh_cases' learning rate


def test_parse_mesh_orders_axes():
    assert parse_mesh("seq=2, data=4") == {"data": 4, "seq": 2}


@pytest.mark.parametrize("spec, match", [("data=4,rows=2", "rows"), ("data", "axis=size"), ("data=x", "integer"),
                                         ("data=0", ">= 1"), ("data=2,data=2", "twice"), ("", "at least one"),
                                         ("data=-1,fsdp=-1", "at most one axis may be -1")])
def test_bad_mesh_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mesh(spec)


def test_mesh_must_use_every_device():
    with pytest.raises(ValueError, match="multiply to 4, but there are 1 devices"):
        make_mesh("data=2,fsdp=2", devices=jax.devices()[:1])
    assert dict(make_mesh("fsdp=1,data=-1", devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="1 devices do not divide by 2"):
        make_mesh("data=2,fsdp=-1", devices=jax.devices()[:1])


def test_batch_must_divide_over_its_axes():
    check_batch_shape(make_mesh("data=1,seq=1", devices=jax.devices()[:1]), (3, 5))
    mesh = AbstractMesh((2, 4), ("data", "seq"))
    check_batch_shape(mesh, (4, 8))
    with pytest.raises(ValueError, match="3 rows do not divide"):
        check_batch_shape(mesh, (3, 8))
    with pytest.raises(ValueError, match="time length 6 does not divide"):
        check_batch_shape(mesh, (2, 6))


def test_fsdp_rule_splits_the_largest_divisible_dimension():
    mesh = AbstractMesh((2, 4), ("data", "fsdp"))
    assert param_spec((64, 512), mesh) == jax.sharding.PartitionSpec(None, "fsdp")
    assert param_spec((512, 63), mesh) == jax.sharding.PartitionSpec("fsdp", None)
    assert param_spec((64,), mesh) == jax.sharding.PartitionSpec()  # small: replicated
    assert param_spec((129, 127), mesh) == jax.sharding.PartitionSpec()  # nothing divides


@pytest.fixture(scope="module")
def mesh_results():
    return run_cases("tests.distributed.mesh_cases")


# Slow (about 2 minutes on 2 quiet cores: three meshes plus three short training runs).
@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data=8", "fsdp=8", "data=2,seq=4"])
def test_one_step_on_a_mesh_matches_one_device(mesh_results, mesh):
    result = mesh_results[f"step/{mesh}"]
    assert result["loss"] < 1e-6
    # AdamW's first update is about lr * sign(gradient) per coordinate, so float32 rounding
    # differences in the gradient appear in the parameters scaled by lr / |gradient|.
    assert result["params"] < 0.02 * LR, result
    assert (result["fsdp_split_leaves"] > 0) == mesh.startswith("fsdp"), result


@pytest.mark.slow
def test_resume_on_another_mesh_is_exact(mesh_results):
    result = mesh_results["resume"]
    assert result["step"] == 4 and result["params"] < 0.02 * LR, result
