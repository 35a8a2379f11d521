"""Finetuning methods (ssmjax.train.finetune): LoRA and adapters start equal to the
pretrained model, one optimizer step moves only the trainable parameters, the LoRA merge
is W + (alpha / r) A B, trainable counts by hand, and the errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ssmjax.models import SequenceModel
from ssmjax.train import HEAD, NORMS, FinetunedModel, Finetuning, TrainConfig, last_blocks, make_optimizer, \
    make_train_step, merge_lora, parameter_counts

D, V, T = 16, 11, 6
MIXERS = ("attention", "gla")


def tiny(mixer: str, **fields) -> SequenceModel:
    return SequenceModel(d_model=D, n_layers=2, mixers=mixer, vocab_size=V, mlp_ratio=2.0, **fields)


def inputs(seed: int = 0) -> jnp.ndarray:
    return jax.random.randint(jax.random.key(seed), (2, T), 0, V)


@functools.cache
def pretrained(mixer: str = "attention"):
    model = tiny(mixer)
    return model, model.init(jax.random.key(0), inputs())


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def one_step(finetuned: FinetunedModel, variables):
    optimizer, _ = make_optimizer(TrainConfig(steps=10, lr=1e-2, warmup_steps=0), trainable=finetuned.trainable_mask)
    step = make_train_step(finetuned, optimizer)
    x = inputs(1)
    state = dict(params=variables, opt_state=optimizer.init(variables), step=jnp.zeros((), jnp.int32))
    new, metrics = step(state, x, jnp.roll(x, -1, 1), jnp.ones(x.shape, bool), jax.random.key(2))
    assert bool(metrics["finite"])
    return new["params"]


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("method", ["lora", "adapters"])
def test_lora_and_adapters_start_exactly_at_the_pretrained_model(mixer, method):
    model, params = pretrained(mixer)
    finetuned = FinetunedModel(model, params, Finetuning(method, rank=2, bottleneck=3))
    variables = finetuned.init(jax.random.key(1), inputs())
    assert method in variables
    np.testing.assert_array_equal(finetuned.apply(variables, inputs(3)), model.apply(params, inputs(3)))


@pytest.mark.parametrize("mixer, method, trainable, moved", [
    ("attention", "full", (), ["base/params/lm_head/kernel", "base/params/embed/embedding"]),
    ("attention", "partial", (HEAD, NORMS), ["base/params/lm_head/kernel", "base/params/final_norm/scale"]),
    *[(mixer, "lora", (), ["lora/params/group_1/block_0/mixer_layer/out_proj/kernel/b"]) for mixer in MIXERS],
    *[(mixer, "adapters", (HEAD,), ["adapters/group_1/block_0/mlp_layer/up", "base/params/lm_head/kernel"])
      for mixer in MIXERS],
])
def test_one_step_moves_only_the_trainable_parameters(mixer, method, trainable, moved):
    model, params = pretrained(mixer)
    finetuned = FinetunedModel(model, params, Finetuning(method, trainable=trainable, rank=2, bottleneck=3))
    before = finetuned.init(jax.random.key(1), inputs())
    after = one_step(finetuned, before)
    mask = flat(finetuned.trainable_mask(before))
    old, new = flat(before), flat(after)
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    frozen = {k for k, t in mask.items() if not t}
    assert not changed & frozen, f"frozen parameters moved: {sorted(changed & frozen)}"
    assert set(moved) <= changed
    if method == "full":
        assert not frozen
    else:
        assert any(k.startswith("base/params/group_") for k in frozen)  # the blocks stayed as pretrained


def test_lora_merge_is_w_plus_scaled_ab_by_hand():
    model, params = pretrained()
    finetuned = FinetunedModel(model, params, Finetuning("lora", rank=3, alpha=6.0))
    variables = finetuned.init(jax.random.key(1), inputs())
    q = flat(variables["lora"])
    assert q["params/group_0/block_0/mixer_layer/q_proj/kernel/a"].shape == (D, 3)  # [in, r]
    assert q["params/group_0/block_0/mixer_layer/out_proj/kernel/a"].shape == (4, 4, 3)  # [heads, head dim, r]
    assert not np.any(q["params/group_0/block_0/mixer_layer/q_proj/kernel/b"])  # B = 0
    # give B values so the update is not zero, then merge
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(jax.random.key(len(p)), x.shape) if p[-1].key == "b" else x, variables["lora"])
    merged = flat(merge_lora(params, lora, 6.0))
    factors = flat(lora)
    w = flat(params)
    for kernel in ("params/group_0/block_0/mixer_layer/q_proj/kernel", "params/group_1/block_0/mixer_layer/out_proj/kernel"):
        a, b = factors[kernel + "/a"], factors[kernel + "/b"]
        n_in = a.ndim - 1  # q_proj [d, h, dh]: 1 input axis; out_proj [h, dh, d]: 2
        a2 = a.reshape(int(np.prod(a.shape[:n_in])), 3)
        b2 = b.reshape(3, -1)
        expected = w[kernel] + (6.0 / 3) * (a2 @ b2).reshape(w[kernel].shape)
        np.testing.assert_allclose(merged[kernel], expected, rtol=1e-5, atol=1e-6)
    untouched = "params/group_0/block_0/mlp_layer/in_proj/kernel"  # not a default target (mixers only)
    np.testing.assert_array_equal(merged[untouched], w[untouched])
    # the finetuned model is the plain model at the merged parameters
    variables = dict(variables, lora=lora)
    np.testing.assert_allclose(finetuned.apply(variables, inputs(3)), model.apply(finetuned.merged(variables), inputs(3)),
                               rtol=1e-5, atol=1e-5)


def test_trainable_counts_by_hand():
    model = tiny("attention")  # d = 16, 4 heads of 4, SwiGLU hidden 32, 2 layers, vocab 11
    params = model.init(jax.random.key(0), inputs())
    total = 11 * 16 + 16 + 2 * (4 * 16 * 16 + 16 * 64 + 32 * 16 + 2 * 16) + 16 * 11
    counts = lambda f: parameter_counts(*(lambda m: (m, m.init(jax.random.key(1), inputs())))(FinetunedModel(model, params, f)))  # noqa: E731
    assert counts(Finetuning("full")) == dict(method="full", trainable=total, total=total, pretrained=total, added=0,
                                              fraction=1.0)
    assert counts(Finetuning("partial", trainable=(HEAD,)))["trainable"] == 16 * 11
    assert counts(Finetuning("partial", trainable=(NORMS,)))["trainable"] == 2 * 2 * 16 + 16
    last = counts(Finetuning("partial", trainable=last_blocks(params, 1)))["trainable"]
    assert last == 4 * 16 * 16 + 16 * 64 + 32 * 16 + 2 * 16
    # LoRA r = 2 on q, k, v ([16, 4, 4]: A 16x2, B 2x16) and out ([4, 4, 16]: A 16x2, B 2x16), 2 layers
    lora = counts(Finetuning("lora", rank=2))
    assert (lora["trainable"], lora["added"], lora["total"]) == (2 * 4 * (16 * 2 + 2 * 16),) * 2 + (total + 512,)
    # adapters m = 3 after the mixer and the MLP of 2 layers: 16x3 + 3 + 3x16 + 16, plus the norms
    adapters = counts(Finetuning("adapters", trainable=(NORMS,), bottleneck=3))
    assert adapters["added"] == 4 * (16 * 3 + 3 + 3 * 16 + 16)
    assert adapters["trainable"] == adapters["added"] + 2 * 2 * 16 + 16


def test_adapters_also_adapt_the_step_form():
    """Decoding token by token (each mixer's ``step``) matches the full forward pass of the
    adapted model (the interceptor adapts ``step`` as well as ``__call__``)."""
    model = tiny("gla")
    params = model.init(jax.random.key(0), inputs())
    finetuned = FinetunedModel(model, params, Finetuning("adapters", bottleneck=3))
    variables = finetuned.init(jax.random.key(1), inputs())
    variables["adapters"] = jax.tree.map(lambda x: x + 0.3, variables["adapters"])  # not the identity any more
    x = inputs(4)
    full = finetuned.apply(variables, x)
    logits, state = finetuned.apply(variables, x[:, :3], return_state=True)
    stepped = [logits[:, -1]]
    for t in range(3, T):
        logits_t, state = finetuned.apply(variables, x[:, t], state, method="step")
        stepped.append(logits_t)
    np.testing.assert_allclose(np.stack(stepped, 1), full[:, 2:], rtol=2e-4, atol=2e-4)
    assert not np.allclose(full, model.apply(params, x), atol=1e-3)


def test_errors_name_the_argument():
    model = tiny("attention")
    params = model.init(jax.random.key(0), inputs())
    with pytest.raises(ValueError, match="method: expected one of"):
        Finetuning("prefix")
    with pytest.raises(ValueError, match="rank: expected an integer >= 1"):
        Finetuning("lora", rank=0)
    with pytest.raises(ValueError, match="bottleneck: expected an integer >= 1"):
        Finetuning("adapters", bottleneck=0)
    with pytest.raises(ValueError, match="trainable: method='partial' needs"):
        Finetuning("partial")
    with pytest.raises(ValueError, match="trainable: pattern 'nope' matches no parameter path"):
        FinetunedModel(model, params, Finetuning("partial", trainable=("nope",)))
    with pytest.raises(ValueError, match="lora_targets: pattern 'nope' matches no Dense kernel"):
        FinetunedModel(model, params, Finetuning("lora", lora_targets=("nope",))).init(jax.random.key(0), inputs())
    with pytest.raises(ValueError, match="adapter_modules: pattern 'nope' matches no module"):
        FinetunedModel(model, params, Finetuning("adapters", adapter_modules=("nope",))).init(jax.random.key(0), inputs())
    with pytest.raises(ValueError, match="k: expected 1 <= k <= 2"):
        last_blocks(params, 3)
    scanned = tiny("attention", layer_scan=True)
    with pytest.raises(ValueError, match="model: layer_scan=True"):
        FinetunedModel(scanned, scanned.init(jax.random.key(0), inputs()), Finetuning("lora"))
