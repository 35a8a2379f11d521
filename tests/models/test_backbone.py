"""Backbone: pattern parsing, heads, generate() == forward, layer-scan."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers.attention  # noqa: F401  (registers "attention")
from ssmjax.models import SequenceModel, generate, hybrid_pattern, model_depth, parse_mixers
from ssmjax.models.backbone import MoE, SwiGLU


def test_parse_mixers():
    assert parse_mixers("attention*3,attention") == ("attention",) * 4
    assert parse_mixers("attention", 3) == ("attention",) * 3
    assert hybrid_pattern("attention", 3) == "attention*3,attention"
    for bad, message in [("", "mixers"), ("attention**2", "malformed"), ("attention*0", "malformed"),
                         ("nope", "unknown layer"), ("attention,,attention", "malformed")]:
        with pytest.raises(ValueError, match=message):
            parse_mixers(bad)
    with pytest.raises(ValueError, match="n_layers"):
        parse_mixers("attention*2", 3)


def test_a_pattern_sets_the_depth_unless_n_layers_is_given():
    assert model_depth("attention*3,attention") == 4  # the hybrid example: one copy of the pattern
    assert model_depth("attention") == 2 and model_depth("attention,attention*2") == 3
    assert model_depth("attention*3,attention", 8) == 8  # a multiple tiles it
    assert parse_mixers("attention") == ("attention",) * 2
    for bad in (2, 6, 0, -4, True):
        with pytest.raises(ValueError) as error:
            model_depth("attention*3,attention", bad)
        message = str(error.value)  # names the argument, the rule and the default depth
        assert message.startswith("n_layers:") and "multiple of the pattern length 4" in message
        assert "leave n_layers unset" in message and "(4 layers)" in message
    x = jnp.zeros((1, 3), jnp.int32)
    for n_layers, groups in ((None, 1), (8, 2)):
        model = SequenceModel(d_model=8, n_layers=n_layers, mixers="attention*3,attention", vocab_size=5, mlp="none")
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
        assert sorted(params) == ["embed", "final_norm", *[f"group_{i}" for i in range(groups)], "lm_head"]
        assert len(params["group_0"]) == 4


def lm(**kw):
    fields = dict(d_model=16, n_layers=2, vocab_size=11, mixer_fields={"attention": {"max_len": 32}})
    fields.update(kw)
    return SequenceModel(**fields)


@pytest.mark.parametrize("layer_scan", [False, True])
@pytest.mark.parametrize("mlp", ["gated", "moe", "none"])
def test_generate_logits_equal_forward(layer_scan, mlp):
    model = lm(layer_scan=layer_scan, mlp=mlp, moe_experts=4)
    prompt = jax.random.randint(jax.random.PRNGKey(0), (2, 5), 0, 11)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), prompt)
    sample = jax.jit(lambda p, prompt, key: generate(model, p, prompt, steps=6, key=key, temperature=1.0, top_k=5))
    tokens, logits = sample(params, prompt, jax.random.PRNGKey(2))
    full = jax.jit(model.apply)(params, jnp.concatenate([prompt, tokens], 1))
    np.testing.assert_allclose(logits, full[:, 4:-1], rtol=1e-4, atol=1e-4)
    greedy, _ = jax.jit(lambda p, prompt, key: generate(model, p, prompt, steps=3, key=key))(params, prompt,
                                                                                             jax.random.PRNGKey(2))
    np.testing.assert_array_equal(greedy[:, 0], jnp.argmax(full[:, 4], -1))


def test_heads_and_tied_embeddings():
    """Shapes only: traced (``eval_shape``), not run op by op."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 5))

    def output_shape(model, inputs):
        return jax.eval_shape(lambda: model.apply(model.init(jax.random.PRNGKey(1), inputs), inputs)).shape

    assert output_shape(SequenceModel(d_model=16, head="classify", num_classes=4), x) == (3, 4)
    assert output_shape(SequenceModel(d_model=16, head="regress", output_dim=2), x) == (3, 7, 2)
    tokens = jnp.zeros((2, 4), jnp.int32)
    count = lambda m: sum(a.size for a in jax.tree.leaves(jax.eval_shape(m.init, jax.random.PRNGKey(0), tokens)))  # noqa: E731
    assert count(lm()) - count(lm(tie_embeddings=True)) == 16 * 11
    with pytest.raises(ValueError, match="num_classes"):
        jax.eval_shape(SequenceModel(head="classify").init, jax.random.PRNGKey(0), x)


def test_single_expert_moe_is_the_mlp():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    moe = MoE(8, 16, num_experts=1, top_k=1)
    params = jax.jit(moe.init)(jax.random.PRNGKey(1), x)
    expert = jax.tree.map(lambda p: p[0], params["params"]["experts"])
    np.testing.assert_allclose(jax.jit(moe.apply)(params, x), jax.jit(SwiGLU(8, 16).apply)({"params": expert}, x),
                               rtol=1e-6, atol=1e-6)


def test_layer_scan_compile_time_is_flat_in_depth():
    tokens = jnp.zeros((2, 16), jnp.int32)

    def compile_seconds(n_layers):
        model = lm(n_layers=n_layers, layer_scan=True)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
        start = time.perf_counter()
        jax.jit(jax.grad(lambda p: model.apply(p, tokens).sum())).lower(params).compile()
        return time.perf_counter() - start

    two, twelve = compile_seconds(2), compile_seconds(12)
    print(f"compile fwd+bwd with layer_scan: 2 layers {two:.2f}s, 12 layers {twelve:.2f}s ({twelve / two:.2f}x)")
    assert twelve < 2.0 * two + 0.5  # loose: the target is 1.5x, timings are noisy here
