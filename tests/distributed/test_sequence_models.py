"""Whole models under ``ssmjax.distributed.sequence_parallel``: on a ``data=2,seq=4`` mesh of 8
simulated CPU devices a hybrid model's outputs and parameter gradients equal the same
model's on one device in float64, and its compiled forward+backward moves no activation
with the full time axis (the scans all-gather O(state), ring attention and the short
convolutions pass blocks and halos with collective-permutes); the short convolution's
halo is exact across packed documents. The routing rule itself
(which calls stay on one device) is checked in this process.

The model cases run in one subprocess (``tests/distributed/model_cases.py``) because the
number of CPU devices is fixed when JAX starts."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType

from ssmjax.distributed import context
from ssmjax.scan._dispatch import SequenceParallel
from tests.distributed.cases import run_cases
from tests.distributed.model_cases import DEFAULT_MODELS


def _check(name: str, result: dict) -> None:
    for what, error in result["errors"].items():
        assert error < 1e-12, f"{name}: {what} differs from the one-device model by {error}"
    assert result["full_time"] == [], f"{name}: collectives of the full time axis: {result['full_time']}"
    assert result["collectives"]["all-to-all"] == 0, result["collectives"]


@pytest.fixture(scope="module")
def default_results():
    return run_cases("tests.distributed.model_cases")


@pytest.mark.parametrize("mixers", DEFAULT_MODELS)
def test_hybrid_model_matches_one_device(default_results, mixers):
    result = default_results[mixers]
    _check(mixers, result)
    # GLA and Mamba all-gather their (transition, state) pairs once each (their transposes
    # are the reduce-scatters); ring attention and the conv halo are collective-permutes.
    assert result["collectives"]["all-gather"] == 2 and result["collectives"]["reduce-scatter"] == 2, result


def test_short_conv_halo_with_documents_matches_one_device(default_results):
    # Outputs, final state and the gradients of x, weight, bias and initial_state; the
    # halo and the previous shard's last segment id are collective-permutes (and their
    # transposes), the final state's all-gather is of [batch, seq * (k - 1), channels].
    _check("causal_conv1d", default_results["causal_conv1d/documents"])


@pytest.mark.slow
def test_every_sequence_parallel_mixer():
    for mixers, result in run_cases("tests.distributed.model_cases", "--full").items():
        _check(mixers, result)


# ----------------------------------------------------------------------------- the rule
SETTING = SequenceParallel(AbstractMesh((2, 4), ("data", "seq"), axis_types=(AxisType.Auto,) * 2), "seq", ("data",),
                           context.route)


def _routed(name: str, **arguments) -> bool:
    return context.route(name, SETTING, arguments) is not None


def test_rule_needs_time_to_divide_over_the_seq_axis():
    q = jnp.zeros((2, 8, 1, 4))
    attention = dict(window=None, scale=None, segment_ids=None)
    assert _routed("causal_softmax_attention", q=q, k=q, v=q, **attention)
    assert not _routed("causal_softmax_attention", q=q[:, :6], k=q[:, :6], v=q[:, :6], **attention)
    assert not _routed("causal_softmax_attention", q=q[:, :1], k=q[:, :1], v=q[:, :1], **attention)  # decoding


def test_rule_keeps_unsupported_arguments_on_one_device():
    q = jnp.zeros((2, 8, 1, 4))
    assert not _routed("causal_softmax_attention", q=q, k=q, v=q, window=4, scale=None, segment_ids=None)
    traced = []
    jax.jit(lambda s: traced.append(_routed("causal_softmax_attention", q=q, k=q, v=q, window=None, scale=s,
                                            segment_ids=None)))(1.0)
    assert traced == [False]  # ring attention needs a constant scale
    u = jnp.zeros((2, 8, 3))
    selective = dict(u=u, delta=u, A=jnp.zeros((3, 2)), B=jnp.zeros((2, 8, 2)), C=jnp.zeros((2, 8, 2)), D=None,
                     z=None, delta_bias=None, delta_softplus=False, initial_state=None, segment_ids=None, reset=None,
                     method="auto", chunk_size=None, block_sizes=None)
    assert _routed("selective_scan", reverse=False, **selective)
    assert not _routed("selective_scan", reverse=True, **selective)


def test_rule_needs_a_halo_shorter_than_a_shard():
    x, conv = jnp.zeros((2, 8, 3)), dict(bias=None, initial_state=None, segment_ids=None, reset=None)
    assert _routed("causal_conv1d", x=x, weight=jnp.zeros((3, 3)), **conv)  # 2 tokens of halo, 2 per shard
    assert not _routed("causal_conv1d", x=x, weight=jnp.zeros((4, 3)), **conv)
    assert not _routed("causal_conv1d", x=x, weight=jnp.zeros((1, 3)), **conv)


def test_sequence_parallel_names_a_missing_axis():
    with pytest.raises(ValueError, match="axis: 'seq' is not an axis"):
        context.sequence_parallel(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]))
