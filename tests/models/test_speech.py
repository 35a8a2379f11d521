"""Speech models (ssmjax.models.speech): the STFT against numpy's FFT and its exact
round trip; SI-SNR (scale invariance, a constructed 10 dB case, identical signals), PIT
(it finds the permutation, matches brute force); float64 loop oracles of the FSMN along an
axis, the complex (transposed) convolution and MossFormer's joint attention; FRCRN's
causality and variants; the MossFormer2 separator's shapes and recurrent module."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.models import speech

TINY_FRCRN = dict(n_fft=16, hop=8, channels=2, n_layers=2, frequency_memory=3, temporal_memory=3, fsmn_hidden=4)
TINY_SEPARATOR = dict(enc_channels=8, enc_kernel=4, d_model=8, n_blocks=1, qk_dim=4, group_size=8, conv_size=3)


# ----------------------------------------------------------------------------- STFT

def stft_oracle(x, n_fft, hop):
    padded = np.pad(x, (n_fft // 2, n_fft // 2))
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    return np.stack([np.fft.rfft(window * padded[m * hop:m * hop + n_fft]) for m in range(len(x) // hop + 1)])


@pytest.mark.parametrize("n_fft, hop, length", [(16, 4, 203), (32, 16, 77)])
def test_stft_matches_numpy_and_round_trips(n_fft, hop, length):
    x = np.random.default_rng(0).standard_normal((2, length))

    @jax.jit
    def forward_and_back(x):
        spec = speech.stft(x, n_fft, hop)
        return spec, speech.istft(spec, n_fft, hop, length)

    spec, back = forward_and_back(x)
    assert spec.dtype == jnp.complex128
    np.testing.assert_allclose(spec[1], stft_oracle(x[1], n_fft, hop), atol=1e-12)
    np.testing.assert_allclose(back, x, atol=1e-12)


def test_stft_errors():
    with pytest.raises(ValueError, match="hop <= n_fft / 2"):
        speech.stft(np.zeros(64), 16, 9)
    with pytest.raises(ValueError, match="spec: expected"):
        speech.istft(np.zeros((9, 9), complex), 16, 8, 80)  # 64 // 8 + 1 frames: 64 samples, not 80


# ----------------------------------------------------------------------------- SI-SNR, PIT

def test_si_snr_constructed_case_scale_invariance_and_identity():
    si_snr = jax.jit(speech.si_snr)
    s = np.array([1.0, -1.0, 1.0, -1.0])
    n = np.sqrt(0.1) * np.array([1.0, 1.0, -1.0, -1.0])  # zero mean, orthogonal to s, ||n||^2 = ||s||^2 / 10
    got = si_snr(np.stack([s + n, 5 * (s + n) + 2, s]), np.stack([s, 0.3 * s - 1, s]))  # gain and offset: same
    np.testing.assert_allclose(got[:2], 10.0, atol=1e-6)
    assert 80 < got[2] < np.inf  # identical: finite, eps-limited
    x = np.random.default_rng(0).standard_normal((3, 50))
    y = x + np.random.default_rng(1).standard_normal((3, 50))
    np.testing.assert_allclose(si_snr(-7 * y, x), si_snr(y, x), atol=1e-9)
    np.testing.assert_allclose(jax.jit(speech.si_snr_improvement)(y[:, None], x[:, None], y), 0.0, atol=1e-9)
    with pytest.raises(ValueError, match="estimate: expected the shape"):
        speech.si_snr(x, x[:, :10])


def si_snr_np(estimate, target):
    estimate, target = estimate - estimate.mean(), target - target.mean()
    projection = estimate @ target / (target @ target) * target
    return 10 * np.log10(projection @ projection / ((estimate - projection) @ (estimate - projection)))


def test_pit_finds_the_permutation_and_matches_brute_force():
    rng = np.random.default_rng(0)
    targets = rng.standard_normal((2, 3, 64))
    shuffle = [(2, 0, 1), (1, 0, 2)]  # estimate j is target shuffle[b][j], slightly noisy
    estimates = np.stack([targets[b, list(p)] for b, p in enumerate(shuffle)]) + 0.1 * rng.standard_normal((2, 3, 64))
    best, perm = jax.jit(speech.pit_si_snr)(estimates, targets)
    np.testing.assert_array_equal(perm, [np.argsort(p) for p in shuffle])  # perm[i]: the estimate of target i
    pair = np.array([[[si_snr_np(estimates[b, i], targets[b, j]) for j in range(3)] for i in range(3)]
                     for b in range(2)])
    brute = [max(np.mean([pair[b, p[i], i] for i in range(3)]) for p in itertools.permutations(range(3)))
             for b in range(2)]
    np.testing.assert_allclose(best, brute, atol=1e-9)


def test_paired_difference_by_hand():
    assert speech.paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]) == pytest.approx((2.0, 1 / np.sqrt(3)))
    with pytest.raises(ValueError, match="at least 2 clips"):
        speech.paired_difference([1.0], [0.0])


# ----------------------------------------------------------------------------- FRCRN parts

def test_deep_fsmn_equals_loop_oracle():
    z = np.random.default_rng(0).standard_normal((2, 7, 3))
    layer = speech.DeepFSMN(hidden=5, memory_order=3)
    params = jax.jit(layer.init)(jax.random.key(0), z)  # the projection starts at zero: give it values
    params["params"]["project"]["kernel"] = np.random.default_rng(1).standard_normal((5, 3))
    p_ = params["params"]
    p = np.maximum(z @ p_["hidden"]["kernel"] + p_["hidden"]["bias"], 0) @ p_["project"]["kernel"]
    a = np.asarray(p_["memory"])  # a[-1 - j] weighs p_{f - j}
    memory = np.zeros_like(p)
    for f in range(7):
        for j in range(3):
            if f - j >= 0:
                memory[:, f] += a[2 - j] * p[:, f - j]
    np.testing.assert_allclose(jax.jit(layer.apply)(params, z), z + p + memory, atol=1e-12)


@pytest.mark.parametrize("transpose", [False, True])
def test_complex_conv_equals_loop_oracle(transpose):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((1, 3, 5, 2)) + 1j * rng.standard_normal((1, 3, 5, 2))
    out_bins = 10 if transpose else None
    conv = speech.ComplexConv(features=2, kernel=(2, 3), transpose=transpose)
    params = jax.jit(conv.init, static_argnums=2)(jax.random.key(0), z, out_bins)
    a, b = (params["params"][k] for k in ("real", "imag"))
    w = a["kernel"] + 1j * b["kernel"]  # [kt, kf, in, out]
    bias = (a["bias"] - b["bias"]) + 1j * (a["bias"] + b["bias"])  # W acting on 1 + 0i, plus i * (the same)
    if transpose:
        source = np.zeros((1, 3, 10, 2), complex)
        source[:, :, ::2] = z  # input bin j at 2 j, zeros between
        stride, bins = 1, 10
    else:
        source, stride, bins = z, 2, 3
    want = np.zeros((1, 3, bins, 2), complex)
    for t, f, dt, df in itertools.product(range(3), range(bins), range(2), range(3)):
        st, sf = t - 1 + dt, stride * f + df - 1
        if 0 <= st < 3 and 0 <= sf < source.shape[2]:
            want[0, t, f] += source[0, st, sf] @ w[dt, df]
    np.testing.assert_allclose(jax.jit(conv.apply, static_argnums=2)(params, z, out_bins), want + bias, atol=1e-12)


def test_complex_ratio_mask_recovers_bounded_masks_and_clips():
    rng = np.random.default_rng(2)
    noisy = rng.standard_normal(6) + 1j * rng.standard_normal(6)
    mask = rng.uniform(-1, 1, 6) + 1j * rng.uniform(-1, 1, 6)
    ratio = jax.jit(lambda clean, noisy: speech.complex_ratio_mask(clean, noisy, eps=0.0))
    got = ratio(np.stack([mask * noisy, 3j * noisy]), np.stack([noisy, noisy]))
    np.testing.assert_allclose(got, [mask, 1j * np.ones(6)], atol=1e-12)


@pytest.mark.slow  # compiles FRCRN's forward and gradient (~10 s); its parts have oracles above
def test_frcrn_shapes_causality_and_gradients():
    model = speech.FRCRN(**TINY_FRCRN)
    x = np.random.default_rng(3).standard_normal((2, 160))
    changed = x.copy()
    changed[:, 96:] += 1.0

    @jax.jit
    def everything(key, inputs):  # one compiled program: init, forward, loss and gradients
        params = model.init(key, inputs)  # perturbed: the FSMN projections start at zero
        params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(key, p.shape, p.dtype), params)
        y, mask = model.apply(params, inputs, method=speech.FRCRN.estimate_with_mask)
        loss, grads = jax.value_and_grad(lambda p: speech.frcrn_loss(model, p, inputs, 0.5 * inputs[:, None]))(params)
        return y, mask, loss, grads

    y, mask, loss, grads = everything(jax.random.key(0), np.concatenate([x, changed]))
    assert y.shape == (4, 1, 160) and mask.shape == (4, 21, 9)
    assert np.all(np.abs(mask.real) <= 1) and np.all(np.abs(mask.imag) <= 1)
    # output sample n depends on input samples < n + n_fft only: frames and every layer are causal in time
    np.testing.assert_allclose(y[2:, :, :96 - 16 + 1], y[:2, :, :96 - 16 + 1], atol=1e-12)
    assert not np.allclose(y[2:, :, 96:], y[:2, :, 96:])
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_frcrn_without_frequency_recurrence_is_the_crn():
    x = np.zeros((1, 160))
    names = set(jax.eval_shape(speech.FRCRN(**TINY_FRCRN).init, jax.random.key(0), x)["params"])
    assert {"encoder_fsmn_0", "encoder_fsmn_1", "decoder_fsmn_1", "temporal_0"} <= names
    assert "decoder_fsmn_0" not in names  # the mask layer has none
    crn = speech.FRCRN(**dict(TINY_FRCRN, frequency_recurrence=False))
    assert not any("fsmn" in k for k in jax.eval_shape(crn.init, jax.random.key(0), x)["params"])
    gru = speech.FRCRN(**dict(TINY_FRCRN, temporal="gru"))  # any registered mixer along time
    assert jax.eval_shape(gru.apply, jax.eval_shape(gru.init, jax.random.key(0), x), x).shape == (1, 1, 160)


# ----------------------------------------------------------------------------- MossFormer2 parts

def test_joint_attention_equals_loop_oracle():
    rng = np.random.default_rng(4)
    q, k, ql, kl = (rng.standard_normal((1, 7, 3)) for _ in range(4))
    v = rng.standard_normal((1, 7, 2))
    g = 3
    want = np.zeros((7, 2))
    for i in range(7):
        for j in range(7):
            if i // g == j // g:  # same group
                want[i] += max(q[0, i] @ k[0, j] / g, 0.0) ** 2 * v[0, j]
            want[i] += (ql[0, i] @ kl[0, j]) * v[0, j] / 7
    np.testing.assert_allclose(jax.jit(speech.joint_attention, static_argnums=5)(q, k, ql, kl, v, g)[0], want,
                               atol=1e-12)


def test_separator_shapes_and_recurrent_module():
    x = np.random.default_rng(5).standard_normal((2, 37))  # 37 samples: the encoder pads to whole frames
    model = speech.MossFormer2Separator(**TINY_SEPARATOR)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(model.apply, params, x).shape == (2, 2, 37)
    assert "recurrent_0" in params["params"] and "fsmn" in str(jax.tree_util.tree_structure(params))
    plain = speech.MossFormer2Separator(**dict(TINY_SEPARATOR, recurrent=None))
    assert not any(k.startswith("recurrent") for k in jax.eval_shape(plain.init, jax.random.key(0), x)["params"])
    with pytest.raises(ValueError, match="enc_kernel"):
        jax.eval_shape(speech.MossFormer2Separator(**dict(TINY_SEPARATOR, enc_kernel=5)).init, jax.random.key(0), x)
