"""Transformer-XL segment recurrence in the backbone (SequenceModel.memory_len /
segment_forward): with a memory covering the whole past, segment-by-segment == one
forward pass; with a shorter memory, each block sees exactly its own cached inputs (an
oracle assembled from Block.forward); no gradient reaches earlier segments; off by
default."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers  # noqa: F401  (registers every mixer)
from ssmjax.models import SequenceModel

VOCAB = 11
TOL = dict(rtol=1e-5, atol=1e-5)


def model(**fields):
    base = dict(d_model=16, n_layers=2, vocab_size=VOCAB, memory_len=8,
                mixer_fields={"attention": {"max_len": 64, "num_heads": 2},
                              "fsmn": {"memory_order": 3, "conv_size": 3, "inner_channels": 8}})
    return SequenceModel(**{**base, **fields})


def tokens(time=20, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (2, time), 0, VOCAB)


@functools.lru_cache
def init(mixers="attention", layer_scan=False):
    """Parameters shared by the tests (memory_len adds none; compiling init is costly)."""
    return jax.jit(model(mixers=mixers, layer_scan=layer_scan).init)(jax.random.PRNGKey(1), tokens())


def run_segments(m, params, toks, bounds):
    segment = jax.jit(lambda p, x, mem: m.apply(p, x, mem, method="segment_forward"))
    first = jax.jit(lambda p, x: m.apply(p, x, method="segment_forward"))
    outs, memory = [], None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out, memory = first(params, toks[:, lo:hi]) if memory is None else segment(params, toks[:, lo:hi], memory)
        outs.append(out)
    return jnp.concatenate(outs, 1), memory


@pytest.mark.parametrize("mixers,layer_scan", [("attention", False), ("attention", True),
                                               pytest.param("attention,fsmn", False, marks=pytest.mark.slow)])
def test_full_memory_equals_one_pass(mixers, layer_scan):
    m = model(mixers=mixers, layer_scan=layer_scan, memory_len=64)
    toks = tokens()
    params = init(mixers, layer_scan)
    full = jax.jit(m.apply)(params, toks)
    segmented, memory = run_segments(m, params, toks, [0, 7, 13, 20])
    np.testing.assert_allclose(segmented, full, **TOL)
    assert all(leaf.shape[-2] == 20 for leaf in jax.tree.leaves(memory))


def block_oracle(m, params, toks, bounds, memory_len):
    """Segment by segment with the model's own Block.forward: every block runs over
    [its cached inputs (last memory_len), the segment] and keeps the segment's outputs."""

    def segment(mdl, x, memories):
        h, new = mdl._inputs(x), []
        for g, group in enumerate(mdl.groups):
            for i, block in enumerate(group.blocks):
                context = h if memories is None else jnp.concatenate([memories[g][i], h], 1)
                new.append(context[:, -memory_len:])
                h = block.forward(context)[:, context.shape[1] - h.shape[1]:]
        return mdl._outputs(h), [new[g * len(mdl.groups[0].blocks):(g + 1) * len(mdl.groups[0].blocks)]
                                 for g in range(len(mdl.groups))]

    run = jax.jit(lambda p, x, memory: m.apply(p, x, memory, method=segment))
    outs, memory = [], None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out, memory = run(params, toks[:, lo:hi], memory)
        outs.append(out)
    return jnp.concatenate(outs, 1), memory


def test_short_memory_equals_the_block_oracle():
    m = model(memory_len=5)
    toks = tokens(21)
    params = init()
    bounds = [0, 8, 11, 21]
    segmented, memory = run_segments(m, params, toks, bounds)
    expected, memory_ref = block_oracle(m, params, toks, bounds, 5)
    np.testing.assert_allclose(segmented, expected, **TOL)
    for a, b in zip(jax.tree.leaves(memory), jax.tree.leaves(memory_ref), strict=True):
        assert a.shape == (2, 5, 16)
        np.testing.assert_allclose(a, b, **TOL)
    # differs from running the segment alone: the memory is used
    alone = jax.jit(lambda p, x: m.apply(p, x, method="segment_forward"))(params, toks[:, 11:])[0]
    assert float(jnp.abs(alone - segmented[:, 11:]).max()) > 1e-3


def test_no_gradient_flows_into_the_memory():
    m = model()
    toks = tokens()
    params = init()
    _, memory = jax.jit(lambda p, x: m.apply(p, x, method="segment_forward"))(params, toks[:, :10])

    def loss(memory):
        out, _ = m.apply(params, toks[:, 10:], memory, method="segment_forward")
        return jnp.sum(out**2)

    grads = jax.jit(jax.grad(loss))(memory)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_off_by_default():
    toks = tokens()
    default = model(memory_len=0)
    params = init()
    with pytest.raises(ValueError, match="memory_len"):
        default.apply(params, toks, method="segment_forward")
    # the option adds no parameters and leaves the ordinary forward pass unchanged
    with_memory = model(memory_len=8)
    shapes = jax.eval_shape(default.init, jax.random.PRNGKey(1), toks)
    assert jax.tree.structure(shapes) == jax.tree.structure(jax.eval_shape(with_memory.init, jax.random.PRNGKey(1), toks))
    np.testing.assert_allclose(jax.jit(with_memory.apply)(params, toks), jax.jit(default.apply)(params, toks),
                               rtol=1e-6, atol=1e-6)
