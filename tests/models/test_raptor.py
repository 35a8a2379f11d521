"""Raptor (ssmjax.models.raptor): linear CKA against a float64 numpy HSIC oracle and its
invariances, the contiguous phase search on planted block matrices, and the models: a
Raptor with one phase per layer and the ViT's own blocks reproduces the ViT's trajectory
(rollout and teacher-forced), a phase is one block applied repeatedly (the ViT with tied
layers), the parameter count depends on k only, stochastic depth drops or rescales whole
updates; losses and R^2 by hand; clear errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.models.raptor import (Raptor, ViT, block_fit, find_phases, linear_cka, phase_index, r2_score,
                                  segmentations, similarity_matrix, trajectory_mse)

FIELDS = dict(d_model=8, mixer_fields={"attention": {"num_heads": 2}}, mlp_ratio=2.0)
L, B, N, P = 3, 2, 4, 5  # layers, images, patches, pixels per patch


def cka_oracle(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC form with linear Gram matrices: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_matches_the_hsic_oracle_and_is_invariant():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 5)), rng.standard_normal((20, 7))
    y[:, :3] += 2 * x[:, :3]  # correlated, so CKA is away from 0 and 1
    cka = jax.jit(linear_cka)
    value = float(cka(jnp.asarray(x), jnp.asarray(y)))
    assert value == pytest.approx(cka_oracle(x, y), rel=1e-12) and 0.1 < value < 0.99
    assert float(cka(jnp.asarray(x), jnp.asarray(x))) == pytest.approx(1.0, abs=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    for transformed in (x @ q, 3.7 * x, x + 5.0):  # orthogonal, isotropic scaling, mean shift
        assert float(cka(jnp.asarray(transformed), jnp.asarray(y))) == pytest.approx(value, rel=1e-10)
    assert float(cka(jnp.asarray(x * np.array([1, 1, 1, 1, 9.0])), jnp.asarray(y))) != pytest.approx(value)
    reps = rng.standard_normal((3, 20, 5))
    expected = [[cka_oracle(a, b) for b in reps] for a in reps]
    np.testing.assert_allclose(np.asarray(similarity_matrix(jnp.asarray(reps))), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="x, y"):
        linear_cka(jnp.zeros((4, 2)), jnp.zeros((5, 2)))


def planted(lengths, within=(0.9, 0.6, 0.8), between=0.2):
    phase = phase_index(lengths)
    return np.where(phase[:, None] == phase[None, :], np.asarray(within)[phase][:, None], between)


def test_phase_search_finds_planted_blocks():
    assert list(segmentations(4, 2)) == [(1, 3), (2, 2), (3, 1)]
    assert sum(1 for _ in segmentations(8, 3)) == math.comb(7, 2)
    s = planted((3, 2, 3))
    assert find_phases(s, 3) == ((3, 2, 3), 1.0)
    noisy = s + 0.02 * np.random.default_rng(1).standard_normal(s.shape)
    assert find_phases(noisy, 3)[0] == (3, 2, 3)
    assert block_fit(s, (8,)) == pytest.approx(0.0, abs=1e-12)
    # by hand: [[1, 0], [0, 1]] with one phase of two: mean 1/2, SST = 1, fitted = 1/2 -> 0; two phases -> 1
    assert block_fit(np.eye(2), (2,)) == 0.0 and block_fit(np.eye(2), (1, 1)) == 1.0
    with pytest.raises(ValueError, match="k: 4 phases"):
        list(segmentations(3, 4))
    with pytest.raises(ValueError, match="lengths"):
        block_fit(s, (4, 3))


@pytest.fixture(scope="module")
def vit():
    """A random float64 ViT, its inputs, and its jitted trajectory ``(params, patches, train, key)``."""
    model = ViT(num_classes=3, n_layers=L, drop_path=0.9, **FIELDS)
    patches = jax.random.normal(jax.random.key(0), (B, N, P), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), jax.jit(model.init)(jax.random.key(1), patches))
    trajectory = jax.jit(lambda p, x, train, key: model.apply(p, x, train, method=ViT.trajectory,
                                                               rngs={"drop_path": key}), static_argnums=2)
    return model, params, patches, trajectory


def vit_blocks(vit_params, layers):
    """The ViT's blocks ``layers`` stacked as a Raptor's ``blocks/block`` (one per phase)."""
    return jax.tree.map(lambda a: a[jnp.asarray(layers)], vit_params["params"]["layers"]["block"])


def check_raptor_is(raptor: Raptor, r_params, trajectory):
    """Rollout from a_0 and teacher-forced steps both give ``trajectory[1:]``."""
    both = jax.jit(lambda p, a: (raptor.apply(p, a[0]), raptor.apply(p, a[:-1], method=Raptor.teacher_forced)))
    rollout, forced = both(r_params, trajectory)
    np.testing.assert_allclose(rollout, trajectory[1:], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(forced, trajectory[1:], rtol=1e-12, atol=1e-12)


def test_one_phase_per_layer_with_the_vits_blocks_is_the_vit(vit):
    model, params, patches, trajectory = vit
    a = trajectory(params, patches, False, jax.random.key(0))
    assert a.shape == (L + 1, B, N + 1, 8)
    raptor = Raptor((1,) * L, depth_gains=False, **FIELDS)  # its parameters are its blocks only
    check_raptor_is(raptor, {"params": {"blocks": {"block": vit_blocks(params, range(L))}}}, a)


@pytest.mark.slow  # ~2.5 s (a Raptor with depth gains to initialise and compile)
def test_a_phase_is_one_block_applied_repeatedly(vit):
    """Phases (2, 1) with blocks (b_0, b_2) is the ViT whose layers hold (b_0, b_0, b_2); the
    depth gains start at exactly 1; the parameter count depends on k only."""
    model, params, patches, trajectory = vit
    tied = jax.tree.map(lambda a: a[jnp.array([0, 0, 2])], params["params"]["layers"])
    a = trajectory({"params": {**params["params"], "layers": tied}}, patches, False, jax.random.key(0))
    raptor = Raptor((2, 1), **FIELDS)
    init = jax.jit(raptor.init)(jax.random.key(2), a[0])["params"]["blocks"]
    r_params = {"params": {"blocks": {**init, "block": vit_blocks(params, (0, 2))}}}
    check_raptor_is(raptor, r_params, a)
    with pytest.raises(ValueError, match="inputs"):
        raptor.apply(r_params, a, method=Raptor.teacher_forced)

    def count(lengths):
        shapes = jax.eval_shape(Raptor(lengths, **FIELDS).init, jax.random.key(0), a[0])
        return sum(x.size for x in jax.tree.leaves(shapes))

    assert count((1, 5)) == count((3, 3)) == 2 * count((6,)) == sum(x.size for x in jax.tree.leaves(init))


@pytest.mark.slow  # ~1.5 s (the training trajectory compiled, 8 draws)
def test_stochastic_depth_drops_or_rescales_whole_updates(vit):
    model, params, patches, trajectory = vit
    assert model.drop_rates().tolist() == pytest.approx([0.3, 0.6, 0.9])
    clean = trajectory(params, patches, False, jax.random.key(0))
    kept = set()
    for seed in range(8):
        dropped = trajectory(params, patches, True, jax.random.key(seed))
        np.testing.assert_array_equal(dropped[0], clean[0])
        # layer 1 has the same input in both: its update is 0 or 1 / (1 - p_1) times the clean one, per image
        update, clean_update = dropped[1] - dropped[0], clean[1] - clean[0]
        for i in range(B):
            zero = np.allclose(update[i], 0.0)
            assert zero or np.allclose(update[i], clean_update[i] / (1 - 0.3), rtol=1e-10)
            kept.add(not zero)
    assert kept == {True, False}  # these seeds draw both (the test is not vacuous)


def test_losses_and_r2_by_hand():
    pred, target = jnp.zeros((1, 1, 3, 2)), jnp.ones((1, 1, 3, 2)).at[..., 0, :].set(3.0)
    assert float(trajectory_mse(pred, target)) == pytest.approx((2 * 9 + 4 * 1) / 6)
    assert float(trajectory_mse(pred, target, 0.25)) == pytest.approx(0.25 * 9 + 0.75 * 1)
    target_np = np.array([[1.0, 0.0], [3.0, 2.0]])  # per-feature means 2, 1; SST = 2 + 2
    assert r2_score(np.array([[1.0, 1.0], [3.0, 2.0]]), target_np) == pytest.approx(1 - 1 / 4)
    with pytest.raises(ValueError, match="cls_weight"):
        trajectory_mse(pred, target, 1.5)
    with pytest.raises(ValueError, match="pred, target"):
        trajectory_mse(pred, target[..., :1])


@pytest.mark.parametrize("model, message", [(ViT(3, pooling="max"), "pooling"), (ViT(3, drop_path=1.0), "drop_path"),
                                            (Raptor((2, 0)), "phase_lengths"), (Raptor(()), "phase_lengths")])
def test_errors_name_the_argument(model, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 64 if isinstance(model, Raptor) else 5)))
