"""Depth sampling of a looped transformer LM (ssmjax.models.depth_sampling) on a tiny
random-weight model in float64: the fixed-depth sampler reproduces the model's own forward
pass; the diffusion-forcing parallel sampler returns exactly the fixed-iteration output
(greedy and sampled, any window, any budget); the adaptive KL exit with threshold 0 is the
fixed sampler and a large threshold saves iterations (the parallel sampler with the same
threshold returns the same text); ACT models exit at their halting step; the Think-at-Hard
sampler of a think_at_hard_tokens model is exactly its forward pass, at the iterations its
decider chose; bad models and arguments raise clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.models import SequenceModel
from ssmjax.models.backbone import sample_logits
from ssmjax.models.depth_sampling import depth_generate, depth_layer

VOCAB, STEPS, NEW = 11, 4, 14
PROMPT = np.array([1, 2, 3, 4, 5])
KEY = jax.random.PRNGKey(7)


def tiny(halting="sampled", **fields):
    model = SequenceModel(d_model=16, n_layers=1, mixers="universal_transformer", vocab_size=VOCAB,
                          mixer_fields={"universal_transformer": dict(halting=halting, max_steps=STEPS, num_heads=2,
                                                                      max_len=32, **fields)})
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    return model, jax.tree.map(lambda a: a.astype(jnp.float64), params)


@pytest.fixture(scope="module")
def sampled():
    return tiny("sampled")


@pytest.fixture(scope="module")
def act():
    return tiny("act", halting_bias_init=3.0)  # halts within max_steps at random weights


@pytest.fixture(scope="module")
def think():
    """A Think-at-Hard model whose decider (output scaled and its bias raised; at random weights
    it stops every token) sends the generated tokens to 1, 2 or 3 iterations."""
    model, params = tiny("fixed", think_at_hard_tokens=True)

    def perturb(path, a):
        name = jax.tree_util.keystr(path)
        if "decider_out" not in name:
            return a
        return 1.5 * a if "kernel" in name else a + 5.0

    return model, jax.tree_util.tree_map_with_path(perturb, params)


def forward_logits(model, params, tokens):
    """The model's own teacher-forced logits for the generated positions (the oracle)."""
    full = jnp.asarray(np.concatenate([PROMPT, tokens]))[None]
    return jax.jit(model.apply)(params, full)[0, len(PROMPT) - 1:-1]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fixed_depth_sampler_is_the_models_forward_pass(sampled, act, temperature):
    for model, params in (sampled, act):
        out = depth_generate(model, params, PROMPT, NEW, KEY, temperature=temperature)
        logits = forward_logits(model, params, out.tokens)
        positions = len(PROMPT) + np.arange(NEW)
        expected = [int(sample_logits(logits[i], jax.random.fold_in(KEY, int(p)), temperature))
                    for i, p in enumerate(positions)]
        assert out.tokens.tolist() == expected
        assert out.depths.tolist() == [STEPS] * NEW and out.passes == NEW - 1 and out.iterations == (NEW - 1) * STEPS


def think_forward(model, params, tokens):
    """The teacher-forced logits of the generated positions and the iterations the forward's
    decider chose for their predictors (the sown think_probability >= think_threshold, chained)."""
    full = jnp.asarray(np.concatenate([PROMPT, tokens]))[None]
    logits, sown = jax.jit(lambda p, t: model.apply(p, t, mutable=["intermediates"]))(params, full)
    layer = sown["intermediates"]["group_0"]["block_0"]["mixer_layer"]
    threshold = model.mixer_fields["universal_transformer"].get("think_threshold", 0.5)
    chain = np.cumprod(np.asarray(layer["think_probability"][0][0]) >= threshold, axis=-1)
    iterations = 1 + chain.sum(-1)
    assert iterations.tolist() == np.asarray(layer["iterations"][0][0]).tolist()
    predictors = slice(len(PROMPT) - 1, -1)
    return logits[0, predictors], iterations[predictors]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_think_sampler_is_the_models_forward_at_its_deciders_depths(think, temperature):
    """Greedy and sampled (the same per-position keys): the tokens are the full forward's, the
    depths its decider's iterations (some tokens iterate, some do not), and a rerun is identical."""
    model, params = think
    out = depth_generate(model, params, PROMPT, NEW, KEY, mode="think", temperature=temperature)
    logits, iterations = think_forward(model, params, out.tokens)
    positions = len(PROMPT) + np.arange(NEW)
    expected = [int(sample_logits(logits[i], jax.random.fold_in(KEY, int(p)), temperature))
                for i, p in enumerate(positions)]
    assert out.tokens.tolist() == expected
    assert out.depths.tolist() == iterations.tolist()
    assert out.depths.min() == 1 and out.depths.max() >= 3  # the decider is not trivial
    assert out.passes == NEW - 1 and out.iterations == out.depths[1:].sum()
    again = depth_generate(model, params, PROMPT, NEW, KEY, mode="think", temperature=temperature)
    assert again.tokens.tolist() == out.tokens.tolist() and again.depths.tolist() == out.depths.tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_parallel_sampler_returns_exactly_the_fixed_iteration_output(sampled, temperature):
    """Budget iterations_per_token = max_steps (the default): the committed text is the
    fixed max_steps text, whatever the window; restarts happen and passes stay below the
    sequential count."""
    model, params = sampled
    fixed = depth_generate(model, params, PROMPT, NEW, KEY, temperature=temperature)
    for window in (None, 7) if temperature else (None,):
        par = depth_generate(model, params, PROMPT, NEW, KEY, mode="parallel", window=window,
                             temperature=temperature)
        assert par.tokens.tolist() == fixed.tokens.tolist()
        assert par.depths.tolist() == [STEPS] * NEW
        assert par.passes < (NEW - 1) * STEPS and par.iterations >= (NEW - 1) * STEPS
    assert par.restarts > 0  # the restart bookkeeping was exercised


def test_parallel_sampler_with_a_smaller_budget_is_the_fixed_sampler_at_that_depth(sampled):
    model, params = sampled
    fixed = depth_generate(model, params, PROMPT, NEW, KEY, iterations_per_token=2, temperature=1.0)
    par = depth_generate(model, params, PROMPT, NEW, KEY, mode="parallel", iterations_per_token=2, temperature=1.0)
    assert par.tokens.tolist() == fixed.tokens.tolist() and par.depths.tolist() == [2] * NEW


def test_adaptive_exit(sampled):
    model, params = sampled
    fixed = depth_generate(model, params, PROMPT, NEW, KEY)
    zero = depth_generate(model, params, PROMPT, NEW, KEY, mode="adaptive", threshold=0.0)
    assert zero.tokens.tolist() == fixed.tokens.tolist() and zero.depths.tolist() == fixed.depths.tolist()
    loose = depth_generate(model, params, PROMPT, NEW, KEY, mode="adaptive", threshold=1e-2)
    assert loose.iterations < fixed.iterations and 2 <= loose.depths.min() and loose.depths[0] == STEPS
    # the parallel sampler with the same early commit returns the adaptive text and depths
    par = depth_generate(model, params, PROMPT, NEW, KEY, mode="parallel", threshold=1e-2)
    assert par.tokens.tolist() == loose.tokens.tolist() and par.depths.tolist() == loose.depths.tolist()


def test_act_model_exits_at_its_halting_step(act):
    model, params = act
    out = depth_generate(model, params, PROMPT, NEW, KEY, mode="adaptive", criterion="act")
    assert out.depths[1:].min() < STEPS
    # the first generated token comes from the prompt (full depth): exactly the forward pass's
    assert out.tokens[0] == int(jnp.argmax(forward_logits(model, params, out.tokens)[0]))
    par = depth_generate(model, params, PROMPT, NEW, KEY, mode="parallel", criterion="act")
    assert par.tokens.tolist() == out.tokens.tolist() and par.depths.tolist() == out.depths.tolist()


def test_think_mode_and_think_at_hard_layers_go_together(think):
    """A think_at_hard_tokens layer is sampled by mode='think' only (the other modes say so);
    mode='think' takes no KL threshold and no iteration cut."""
    model, params = think
    assert depth_layer(model).think_at_hard_tokens
    for mode in ("fixed", "adaptive", "parallel"):
        with pytest.raises(ValueError, match="^model: .*think_at_hard_tokens.*mode='think'"):
            depth_generate(model, params, PROMPT, NEW, KEY, mode=mode)
    for kwargs, message in [(dict(threshold=0.1), "^threshold: "), (dict(iterations_per_token=2),
                                                                     "^iterations_per_token: ")]:
        with pytest.raises(ValueError, match=message):
            depth_generate(model, params, PROMPT, NEW, KEY, mode="think", **kwargs)


def test_errors_name_the_argument(sampled):
    model, params = sampled
    bad_models = [SequenceModel(d_model=16, mixers="attention", vocab_size=VOCAB),
                  SequenceModel(d_model=16, n_layers=2, mixers="universal_transformer", vocab_size=VOCAB),
                  SequenceModel(d_model=16, n_layers=1, mixers="universal_transformer", head="regress", output_dim=2)]
    for bad in bad_models:
        with pytest.raises(ValueError, match="^model: "):
            depth_layer(bad)
    cases = [(dict(mode="beam"), "^mode: "), (dict(iterations_per_token=0), "^iterations_per_token: "),
             (dict(iterations_per_token=STEPS + 1), "^iterations_per_token: "),
             (dict(mode="adaptive", threshold=-1.0), "^threshold: "), (dict(threshold=0.1), "^threshold: .*adaptive"),
             (dict(mode="adaptive", criterion="act"), "^criterion: .*halting='act'"),
             (dict(criterion="entropy"), "^criterion: "), (dict(mode="parallel", window=0), "^window: "),
             (dict(temperature=-1.0), "^temperature: "), (dict(top_k=0), "^top_k: "),
             (dict(mode="think"), "^mode: 'think' .*think_at_hard_tokens=False")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            depth_generate(model, params, PROMPT, NEW, KEY, **kwargs)
    with pytest.raises(ValueError, match="^prompt: "):
        depth_generate(model, params, PROMPT[None], NEW, KEY)
    with pytest.raises(ValueError, match="^num_tokens: "):
        depth_generate(model, params, PROMPT, 0, KEY)
