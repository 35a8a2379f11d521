"""Video predictors: patchify layout and round trip, the sinusoidal table, PredFormer's stage
layouts and the official Moving MNIST parameter count, that spatial stages never mix frames
and temporal stages never mix patch positions (with attention and with a 2-D recurrence),
output shapes of every variant, the ConvLSTM cell and the whole ConvLSTM (stack, head,
feedback of its own predictions) against a float64 numpy oracle, and the ValueErrors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.models.video import (
    ConvLSTM,
    ConvLSTMCell,
    GatedStage,
    PredFormer,
    SameConv,
    check_frames,
    patchify,
    predformer_stages,
    same_conv_im2col,
    sinusoidal_embedding,
    unpatchify,
)

FRAMES = (1, 4, 16, 16, 1)  # b, t, H, W, C
TINY = dict(patch_size=4, d_model=16, num_heads=2, depth=1)


def uniform(shape, seed=0, dtype=jnp.float64):
    return jax.random.uniform(jax.random.key(seed), shape, dtype)


# ----------------------------------------------------------------------------- patches
def test_patchify_layout_and_round_trip():
    frames = uniform((2, 3, 8, 12, 2))
    patches = patchify(frames, 4)
    assert patches.shape == (2, 3, 2, 3, 32)
    for i in range(2):
        for j in range(3):
            block = frames[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4, :].reshape(2, 3, 32)  # (p1, p2, c) order
            np.testing.assert_array_equal(patches[:, :, i, j], block)
    np.testing.assert_array_equal(unpatchify(patches, 4), frames)


def test_sinusoidal_embedding_against_the_formula():
    length, dim = 7, 6
    expected = np.zeros((length, dim))
    for s in range(length):
        for i in range(dim):
            angle = s / 10000 ** (2 * (i // 2) / dim)
            expected[s, i] = math.sin(angle) if i % 2 == 0 else math.cos(angle)
    np.testing.assert_allclose(sinusoidal_embedding(length, dim, jnp.float64), expected, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- PredFormer
def test_predformer_stages():
    assert predformer_stages("full", 3) == (("full", 3),)
    assert predformer_stages("factorised", 2) == (("time", 2), ("space", 2))
    assert predformer_stages("factorised", 2, "ST") == (("space", 2), ("time", 2))
    tsst = (("time", 1), ("space", 1), ("space", 1), ("time", 1))
    assert predformer_stages("interleaved", 2) == tsst * 2
    assert predformer_stages("interleaved", 3, "TS") == (("time", 1), ("space", 1)) * 3


def test_official_moving_mnist_parameter_count():
    """patch 8, d 256, 8 heads, TSST x 6 on 64x64x1: the official PyTorch model's count.
    Per single-block stage 16 d^2 + 16 d (q/k/v 3 d^2, out d^2 + d, SwiGLU 12 d^2 + 9 d,
    three LayerNorms 6 d), embedding (64 + 1) d, head LayerNorm 2 d and (d + 1) 64."""
    d = 256
    model = PredFormer(patch_size=8, d_model=d, num_heads=8, depth=6, attention="interleaved", pattern="TSST")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 10, 64, 64, 1), jnp.float32))
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(shapes))
    assert count == 24 * (16 * d * d + 16 * d) + 65 * d + 2 * d + (d + 1) * 64 == 25_297_728


@pytest.mark.parametrize("fields", [
    # the stage-list test covers every variant's structure; the default run compiles one model
    pytest.param(dict(attention="full"), marks=pytest.mark.slow),
    pytest.param(dict(attention="factorised"), marks=pytest.mark.slow),
    pytest.param(dict(attention="factorised", pattern="ST"), marks=pytest.mark.slow),
    pytest.param(dict(attention="interleaved"), marks=pytest.mark.slow),
    pytest.param(dict(attention="interleaved", pattern="TS"), marks=pytest.mark.slow),
    dict(attention="interleaved", spatial_mixer="plstm2d"),
], ids=lambda f: "-".join(str(v) for v in f.values()))
def test_predformer_output_shapes(fields):
    frames = uniform(FRAMES, dtype=jnp.float32)
    model = PredFormer(**TINY, **fields)
    params = jax.jit(model.init)(jax.random.key(1), frames)
    y = jax.jit(model.apply)(params, frames)
    assert y.shape == FRAMES and y.dtype == jnp.float32
    assert np.all(np.isfinite(y))


def _stage_outputs(stage, x, x_perturbed):
    params = jax.jit(stage.init)(jax.random.key(2), x)
    apply = jax.jit(stage.apply)
    return np.asarray(apply(params, x)), np.asarray(apply(params, x_perturbed))


@pytest.mark.parametrize("mixer", [None, "plstm2d"])
def test_spatial_stage_does_not_mix_frames(mixer):
    """A spatial stage sees one frame: perturbing frame 0 leaves frames 1.. unchanged."""
    x = uniform((2, 3, 8, 16))  # b, t, n = 2 x 4 patches, d
    perturbed = x.at[:, 0].add(uniform((2, 8, 16), seed=1))
    stage = GatedStage(16, 2, "space", blocks=2, mixer=mixer, grid_shape=(2, 4))
    y, y_perturbed = _stage_outputs(stage, x, perturbed)
    np.testing.assert_array_equal(y[:, 1:], y_perturbed[:, 1:])
    assert np.abs(y[:, 0] - y_perturbed[:, 0]).min() > 0


def test_temporal_stage_does_not_mix_patch_positions():
    """A temporal stage sees one patch position across frames."""
    x = uniform((2, 3, 8, 16))
    perturbed = x.at[:, :, 5].add(uniform((2, 3, 16), seed=1))
    y, y_perturbed = _stage_outputs(GatedStage(16, 2, "time", blocks=2), x, perturbed)
    others = [j for j in range(8) if j != 5]
    np.testing.assert_array_equal(y[:, :, others], y_perturbed[:, :, others])
    assert np.abs(y[:, :, 5] - y_perturbed[:, :, 5]).min() > 0


def test_full_stage_mixes_frames_and_positions():
    """Control for the two tests above: full attention moves every token."""
    x = uniform((2, 3, 8, 16))
    perturbed = x.at[:, 0, 5].add(uniform((2, 16), seed=1))  # not a constant: LayerNorm would remove it
    y, y_perturbed = _stage_outputs(GatedStage(16, 2, "full"), x, perturbed)
    assert np.abs(y - y_perturbed).min() > 0


# ----------------------------------------------------------------------------- ConvLSTM
def _conv_same(x, kernel, bias=None):
    """Cross-correlation with zero 'same' padding, numpy loops: x [b, H, W, i], kernel [k, k, i, o]."""
    k = kernel.shape[0]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for dy in range(k):
        for dx in range(k):
            out += padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]] @ kernel[dy, dx]
    return out if bias is None else out + bias


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _cell_oracle(params, h, c, x):
    """Shi et al. 2015 without peepholes, gates (i, f, g, o) from one conv of [x, h]."""
    gates = _conv_same(np.concatenate([x, h], -1), np.asarray(params["gates"]["kernel"], np.float64),
                       None if "bias" not in params["gates"] else np.asarray(params["gates"]["bias"], np.float64))
    i, f, g, o = np.split(gates, 4, -1)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    return _sigmoid(o) * np.tanh(c), c


def test_convlstm_cell_against_oracle():
    cell = ConvLSTMCell(hidden=3, kernel_size=3, use_bias=True)
    xs = uniform((4, 2, 5, 6, 2))  # steps, b, H, W, channels
    state = (jnp.zeros((2, 5, 6, 3), jnp.float64),) * 2
    params = cell.init(jax.random.key(3), state, xs[0])
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(4), p.shape), params)  # nonzero bias
    h = c = np.zeros((2, 5, 6, 3))
    apply = jax.jit(cell.apply)
    for x in xs:
        state = apply(params, state, x)
        h, c = _cell_oracle(params["params"], h, c, np.asarray(x))
        np.testing.assert_allclose(state[0], h, rtol=0, atol=1e-12)
        np.testing.assert_allclose(state[1], c, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def convlstm():
    model = ConvLSTM(hidden=(4, 3), kernel_size=3, patch_size=2, output_frames=3, channels=1)
    frames = uniform((2, 4, 8, 8, 1), seed=5)
    params = jax.jit(model.init)(jax.random.key(6), frames)
    return model, params, frames


def test_convlstm_against_oracle(convlstm):
    """The stacked cells, the 1x1 head and the feedback of predictions, against numpy."""
    model, params, frames = convlstm
    p = params["params"]["stack"]
    x = np.asarray(patchify(frames, 2))
    t_in, steps = x.shape[1], x.shape[1] + model.output_frames - 1
    states = [(np.zeros((2, 4, 4, s)),) * 2 for s in model.hidden]
    predictions, previous = [], None
    for t in range(steps):
        inp = x[:, t] if t < t_in else previous
        for layer in range(len(model.hidden)):
            states[layer] = _cell_oracle(p[f"cell_{layer}"], *states[layer], inp)
            inp = states[layer][0]
        previous = _conv_same(inp, np.asarray(p["head"]["kernel"], np.float64))
        predictions.append(previous)
    expected = np.stack(predictions, 1)
    all_steps = jax.jit(model.apply, static_argnames="all_steps")(params, frames, all_steps=True)
    np.testing.assert_allclose(patchify(all_steps, 2), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(patchify(jax.jit(model.apply)(params, frames), 2), expected[:, t_in - 1:], rtol=0,
                               atol=1e-12)


def test_convlstm_feeds_back_its_prediction(convlstm):
    """Output k + 1 is the model's step applied to output k (not to a frame or zeros)."""
    model, params, frames = convlstm
    y = patchify(jax.jit(model.apply)(params, frames), 2)
    assert y.shape == (2, 3, 4, 4, 4)
    state = model.init_state(2, (4, 4), jnp.float64)
    step = jax.jit(lambda params, state, x: model.apply(params, state, x, method="step"))
    for t in range(frames.shape[1]):
        state, prediction = step(params, state, patchify(frames, 2)[:, t])
    np.testing.assert_allclose(prediction, y[:, 0], rtol=0, atol=1e-12)
    for k in range(1, model.output_frames):
        state, prediction = step(params, state, y[:, k - 1])
        np.testing.assert_allclose(prediction, y[:, k], rtol=0, atol=1e-12)
    assert np.abs(y[:, 1] - y[:, 0]).max() > 1e-6


def test_same_conv_is_nn_conv_on_every_lowering():
    """SameConv has nn.Conv's parameters and numbers: its CPU lowering (im2col, a matmul)
    and XLA's convolution, in float64, values and gradients."""
    x = uniform((2, 5, 6, 3))
    conv = SameConv(4, 3, use_bias=True)
    params = jax.jit(conv.init)(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.1, params)  # float64, a nonzero bias
    reference = nn.Conv(4, (3, 3), padding="SAME", use_bias=True)
    np.testing.assert_allclose(jax.jit(conv.apply)(params, x), reference.apply(params, x), rtol=1e-12, atol=1e-12)
    kernel = params["params"]["kernel"]
    xla = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    for f in (lambda x, k: jnp.sum(same_conv_im2col(x, k) ** 2), lambda x, k: jnp.sum(xla(x, k) ** 2)):
        grads = jax.grad(f, argnums=(0, 1))(x, kernel)
        expected = jax.grad(lambda x, k: jnp.sum(reference.apply({"params": {"kernel": k, "bias": 0 * params[
            "params"]["bias"]}}, x) ** 2), argnums=(0, 1))(x, kernel)
        for a, b in zip(grads, expected):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="kernel_size"):
        SameConv(4, 2).init(jax.random.key(0), x)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("model, shape, match", [
    (PredFormer(**TINY), (1, 4, 18, 16, 1), "patch_size.*18x16"),
    (PredFormer(**{**TINY, "attention": "axial"}), FRAMES, "attention"),
    (PredFormer(**{**TINY, "num_heads": 3}), FRAMES, "num_heads"),
    (PredFormer(**{**TINY, "pattern": "TXS"}), FRAMES, "pattern"),
    (PredFormer(**{**TINY, "attention": "factorised", "pattern": "TSST"}), FRAMES, "pattern"),
    (PredFormer(**{**TINY, "attention": "full", "spatial_mixer": "plstm2d"}), FRAMES, "spatial_mixer"),
    (PredFormer(**{**TINY, "depth": 0}), FRAMES, "depth"),
    (ConvLSTM(patch_size=3), FRAMES, "patch_size"),
    (ConvLSTM(kernel_size=4), FRAMES, "kernel_size"),
    (ConvLSTM(hidden=()), FRAMES, "hidden"),
    (ConvLSTM(channels=3), FRAMES, "channels"),
    (ConvLSTM(output_frames=0), FRAMES, "output_frames"),
])
def test_value_errors(model, shape, match):
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))


def test_frame_and_patch_value_errors():
    """(The modules' annotations already reject a wrong rank under the tests' type-check hook.)"""
    with pytest.raises(ValueError, match="frames"):
        check_frames(jnp.zeros((1, 16, 16, 1)), 4)
    with pytest.raises(ValueError, match="patch_size"):
        check_frames(jnp.zeros((1, 2, 16, 16, 1)), 0)
    with pytest.raises(ValueError, match="patch_size"):
        unpatchify(jnp.zeros((1, 2, 2, 2, 6)), 2)
