"""Classification heads of the backbone (pooling that skips padding, the pooled-features
head, residual dropout), the two-tower pair classifier, and which parameters are SSM
parameters (the S4/S5/LRU optimizer recipe)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ssmjax.layers
from ssmjax.models import DualEncoderClassifier, SequenceModel
from ssmjax.train import TrainConfig, make_optimizer


def pooled_model(pooling, mixers="s4d", **fields):
    return SequenceModel(d_model=8, n_layers=1, mixers=mixers, mixer_fields={"s4d": {"d_state": 4}}, mlp="none",
                         vocab_size=5, head="pool", pooling=pooling, **fields)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooling_skips_padding(pooling):
    tokens = jnp.array([[3, 1, 4, 2, 0, 0, 0]])  # 4 tokens then padding (id 0)
    # causal attention: position i's output is the same float32 arithmetic whatever follows it
    # (masked keys add exact zeros), so padding that pooling skips changes nothing at all
    padded, plain = pooled_model(pooling, "attention", pad_id=0), pooled_model(pooling, "attention")
    params = jax.jit(plain.init)(jax.random.key(0), tokens)
    expected = jax.jit(plain.apply)(params, tokens[:, :4])
    np.testing.assert_allclose(jax.jit(padded.apply)(params, tokens), expected, rtol=1e-12, atol=1e-12)
    assert not np.allclose(jax.jit(plain.apply)(params, tokens), expected)  # without pad_id the padding counts
    with pytest.raises(ValueError, match="pad_id"):
        SequenceModel(d_model=8, mixers="s4d", head="pool", pad_id=0).init(jax.random.key(0), jnp.ones((1, 3, 2)))
    with pytest.raises(ValueError, match="pooling"):
        pooled_model("max").init(jax.random.key(0), tokens)


def test_dropout_only_with_a_dropout_rng():
    model = SequenceModel(d_model=8, n_layers=1, mixers="s4d", mixer_fields={"s4d": {"d_state": 4}}, vocab_size=5,
                          head="classify", num_classes=3, dropout=0.5)
    tokens = jnp.array([[1, 2, 3, 4]])
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    apply = jax.jit(model.apply)
    evaluated = apply(params, tokens)
    np.testing.assert_array_equal(apply(params, tokens), evaluated)  # deterministic without an rng
    dropped = [apply(params, tokens, rngs={"dropout": jax.random.key(i)}) for i in range(2)]
    assert not np.allclose(dropped[0], evaluated) and not np.allclose(dropped[0], dropped[1])


def test_ssm_parameter_mask_picks_each_layers_declared_parameters():
    model = SequenceModel(d_model=8, mixers="s4d,lru,s5,attention", vocab_size=5, head="classify", num_classes=2)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 6), jnp.int32))  # the mask reads names only
    mask = model.ssm_parameter_mask(params)
    chosen = sorted("/".join(str(getattr(k, "key", k)) for k in path)
                    for path, leaf in jax.tree_util.tree_leaves_with_path(mask) if leaf)
    group = "params/group_0"
    assert chosen == sorted(
        [f"{group}/block_0/mixer_layer/{n}" for n in ("log_A_real", "A_imag", "B", "log_dt")]
        + [f"{group}/block_1/mixer_layer/forward/{n}" for n in ("nu_log", "theta_log", "gamma_log")]
        + [f"{group}/block_2/mixer_layer/{n}" for n in ("Lambda_re", "Lambda_im", "B", "log_step")])
    assert ssmjax.layers.ssm_parameter_names("attention") == frozenset()


def test_ssm_group_has_its_own_learning_rate_and_no_weight_decay():
    model = SequenceModel(d_model=8, n_layers=1, mixers="s4d", mixer_fields={"s4d": {"d_state": 4}}, vocab_size=5,
                          head="classify", num_classes=2)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 6), jnp.int32))
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    config = TrainConfig(steps=10, lr=1e-2, ssm_lr=1e-3, weight_decay=0.5, warmup_steps=0, grad_clip=0.0)
    optimizer, _ = make_optimizer(config, model.ssm_parameter_mask)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    ssm, other = optax.adam(1e-3, config.beta1, config.beta2), optax.adamw(
        1e-2, config.beta1, config.beta2, weight_decay=0.5, mask=lambda t: jax.tree.map(lambda p: p.ndim >= 2, t))
    expected_ssm = ssm.update(grads, ssm.init(params), params)[0]
    expected_other = other.update(grads, other.init(params), params)[0]
    mask = model.ssm_parameter_mask(params)
    flat = flax.traverse_util.flatten_dict(updates)
    for key, is_ssm in flax.traverse_util.flatten_dict(mask).items():
        reference = flax.traverse_util.flatten_dict(expected_ssm if is_ssm else expected_other)[key]
        np.testing.assert_allclose(flat[key], reference, rtol=1e-6, err_msg=str(key))
    assert any(flax.traverse_util.flatten_dict(mask).values())
    # without ssm_lr every parameter follows the main group
    plain, _ = make_optimizer(TrainConfig(steps=10, lr=1e-2, warmup_steps=0, grad_clip=0.0), model.ssm_parameter_mask)
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(
        make_optimizer(TrainConfig(steps=10, lr=1e-2, warmup_steps=0, grad_clip=0.0))[0].init(params))


def test_dual_encoder_scores_pairs_with_one_shared_encoder():
    encoder = pooled_model("mean", pad_id=0)
    model = DualEncoderClassifier(encoder, num_classes=2, mlp_dim=16)
    first, second = jnp.array([[1, 2, 3, 0]]), jnp.array([[4, 4, 2, 1]])
    params = jax.jit(model.init)(jax.random.key(0), jnp.concatenate([first, second], 1))
    assert set(params["params"]) == {"encoder", "hidden", "classifier"}  # one encoder for both documents
    u = encoder.apply({"params": params["params"]["encoder"]}, first)
    v = encoder.apply({"params": params["params"]["encoder"]}, second)
    z = jnp.concatenate([u, v, u * v, u - v], -1)
    dense = lambda name, x: x @ params["params"][name]["kernel"] + params["params"][name]["bias"]  # noqa: E731
    np.testing.assert_allclose(model.apply(params, jnp.concatenate([first, second], 1)),
                               dense("classifier", jax.nn.relu(dense("hidden", z))), rtol=1e-12)
    assert any(jax.tree.leaves(model.ssm_parameter_mask(params)))
    with pytest.raises(ValueError, match="2 L"):
        model.apply(params, jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="head='pool'"):
        DualEncoderClassifier(SequenceModel(d_model=8, vocab_size=5, mixers="s4d")).init(
            jax.random.key(0), jnp.ones((1, 4), jnp.int32))


def test_bidirectional_uses_a_layers_own_option_else_a_reversed_copy():
    x = jax.random.normal(jax.random.key(0), (2, 6, 3), jnp.float64)
    own = SequenceModel(d_model=8, n_layers=1, mixers="s4d", mlp="none", head="regress", output_dim=2,
                        bidirectional=True)
    params = jax.eval_shape(own.init, jax.random.key(1), x)
    assert params["params"]["group_0"]["block_0"]["mixer_layer"]["C"].shape[0] == 2  # S4D's two directions
    wrapped = SequenceModel(d_model=8, n_layers=1, mixers="gla", mlp="none", head="regress", output_dim=2,
                            bidirectional=True)
    params = jax.jit(wrapped.init)(jax.random.key(1), x)
    block = params["params"]["group_0"]["block_0"]
    assert set(block) >= {"mixer_layer", "reverse_layer"}
    apply = jax.jit(wrapped.apply)
    y = apply(params, x)
    assert not np.allclose(apply(params, x.at[:, -1].add(1.0))[:, 0], y[:, 0])  # the first position sees the last
    layer = ssmjax.layers.get("gla", d_model=8)
    h = flax.linen.RMSNorm().apply({"params": block["mixer_norm"]}, x @ params["params"]["input_proj"]["kernel"]
                                   + params["params"]["input_proj"]["bias"])
    layer_apply = jax.jit(layer.apply)
    mixed = (layer_apply({"params": block["mixer_layer"]}, h)
             + jnp.flip(layer_apply({"params": block["reverse_layer"]}, jnp.flip(h, 1)), 1))
    hidden = flax.linen.RMSNorm().apply({"params": params["params"]["final_norm"]}, x @ params["params"]["input_proj"][
        "kernel"] + params["params"]["input_proj"]["bias"] + mixed)
    np.testing.assert_allclose(y, hidden @ params["params"]["regress_head"]["kernel"]
                               + params["params"]["regress_head"]["bias"], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="no recurrent state"):
        wrapped.apply(params, x, return_state=True)
