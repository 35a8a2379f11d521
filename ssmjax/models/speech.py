"""Speech enhancement and separation: the STFT pair, SI-SNR and permutation-invariant
training, FRCRN (a complex ratio mask on the STFT) and MossFormer2 (a time-domain masking
separator), and the training and scoring glue their experiments share.

**STFT.** Frame length ``L`` (even), hop ``H <= L / 2``, periodic Hann window ``w``. The signal
``x[0..N)`` is zero-padded by ``L / 2`` on both sides and framed without further padding
(:func:`ssmjax.data.audio.stft`): ``X[m, k] = sum_n w[n] x_p[m H + n] e^{-2 pi i k n / L}``,
``m = 0 .. N // H``, ``k = 0 .. L / 2``. The inverse is the weighted overlap-add
``x_p[t] = sum_m w[t - m H] x_m[t - m H] / sum_m w[t - m H]^2`` with ``x_m = irfft(X[m])``
(Griffin & Lim, 1984), cut back to ``[L / 2, L / 2 + N)``: exact wherever the window sum is
positive, which ``H <= L / 2`` makes true for every sample.

**SI-SNR** (Le Roux, Wisdom, Erdogan & Hershey, 2019, "SDR - half-baked or well done?"). With
zero-mean estimate ``s^`` and target ``s``: ``s_t = <s^, s> s / ||s||^2``, ``e = s^ - s_t``,
``SI-SNR = 10 log10(||s_t||^2 / ||e||^2)``; the improvement over the input mixture ``y`` is
``SI-SNRi = SI-SNR(s^, s) - SI-SNR(y, s)``. A small ``eps`` in both norms keeps a perfect
estimate finite (``10 log10(||s||^2 / eps)``). **PIT** (Yu, Kolbaek, Tan & Jensen, 2017,
"Permutation invariant training of deep models for speaker-independent multi-talker speech
separation"; utterance level): ``max_pi (1/S) sum_i SI-SNR(s^_{pi(i)}, s_i)`` over the ``S!``
assignments ``pi`` of estimates to targets.

**FRCRN** (Zhao, Ma, Watcharasupat & Gan, 2022, "FRCRN: Boosting Feature Representation
using Frequency Recurrence for Monaural Speech Enhancement", ICASSP 2022, arXiv:2206.07293).
A convolutional recurrent encoder-decoder (CRED) on the complex STFT ``Y [frames, bins]``
predicts a complex ideal ratio mask ``M`` and ``S^ = M Y``, ``s^ = iSTFT(S^)``:

* the network reads the power-law compressed spectrum ``Y |Y|^(c - 1)`` (``c = compression``,
  0.3), which stands in for the batch normalisation of the paper's layers (none here);
* complex convolutions ``W = A + iB``: ``W * Z = (A * Re Z - B * Im Z) + i (A * Im Z + B * Re Z)``
  (:class:`ComplexConv`), kernel ``(2 frames, 5 bins)``, causal in time, stride 2 in frequency
  (encoder) or transposed (decoder, fed the encoder map of the same level as a skip);
  leaky ReLU on the real and imaginary parts;
* frequency recurrence after every encoder convolution and every decoder convolution but
  the last: an FSMN run along the frequency axis of each frame, its features the channels
  (real and imaginary parts side by side) (:class:`DeepFSMN`, Zhang et al., 2015,
  "Feedforward Sequential Memory Networks"): for bins ``f = 0, 1, ...``::

      p_f = W_2 relu(W_1 z_f + b_1)
      m_f = p_f + sum_{j=0}^{N-1} a_j * p_{f-j}         (per channel; causal from low to high bins)
      z'_f = z_f + m_f

  (``W_2`` starts at zero: every FSMN starts as the identity);
* between encoder and decoder, two stacked FSMN layers along time (the same equations over
  frames; the features are the flattened last encoder map) or, with ``temporal`` set to a
  registry name, two residual blocks of that mixer (:class:`ssmjax.models.backbone.Block`);
* the mask ``M = tanh(Re O) + i tanh(Im O)`` of the last decoder output ``O``.

Without frequency recurrence (``frequency_recurrence=False``) this is the plain complex CRN
the paper improves on. The loss (:func:`frcrn_loss`) is the paper's pair of a time-domain
and a time-frequency term: ``-SI-SNR(s^, s) + mask_weight * mean |M - M*|^2`` with the cIRM
``M* = S / Y`` (real and imaginary parts clipped to the mask's range ``[-1, 1]``).

**MossFormer2** (Zhao, Ma, Ni, Zhang, Wang, Nguyen, Zhou, Yip, Ng & Ma, 2024, "MossFormer2:
Combining Transformer and RNN-Free Recurrent Network for Enhanced Time-Domain Monaural Speech
Separation", ICASSP 2024, arXiv:2312.11825), a masking separator in the time domain
(:class:`MossFormer2Separator`)::

    W = relu(Conv1d_{K, stride K/2}(y))                            encoder  [frames, N]
    h = Linear(LN(W));  R x { h = MossFormer(h);  h = h + Rec(LN h) }
    G = Linear_{S N}(PReLU(h));  M_s = relu(Linear(tanh(Linear G_s) * sigmoid(Linear G_s)))
    s^_s = ConvTranspose1d_{K, stride K/2}(M_s * W)                 decoder (shared)

``Rec`` is the recurrent module, the registered ``fsmn`` layer (:mod:`ssmjax.layers.fsmn`,
bidirectional) or any other registered mixer, or nothing (``recurrent=None``: MossFormer
alone). The MossFormer block (Zhao & Ma, 2023, "MossFormer: Pushing the Performance Limit of
Monaural Speech Separation using Gated Single-Head Transformer with Convolution-Augmented
Joint Self-Attentions", :class:`MossFormerBlock`): with ``FFConvM(x) = z + dwconv_17(z)``,
``z = silu(Linear(LN x))`` (the convolution module), and the input ``x'`` whose first half of
channels is shifted by one frame (token shift)::

    [v, u] = FFConvM_{2 E}(x'),  z = FFConvM_{d_qk}(x')              E = 2 d
    q, k, q_l, k_l = z * gamma_i + beta_i  (i = 1..4), rotary positions on each
    A(w) = relu(q k^T / g)^2 w  within groups of g frames           (local quadratic)
         + q_l (k_l^T w) / n    over the n frames                   (global linearised)
    x_out = x + FFConvM_d((A(u) * v) * sigmoid(A(v) * u))             (gated attention)

(:func:`joint_attention`). Training maximises the utterance-level PIT SI-SNR
(:func:`pit_loss`). Reduced from the paper: the scaled sinusoidal position embedding added
before the blocks is left out (rotary positions only), no dropout, and one MossFormer block
per recurrent module at whatever width and depth the caller sets.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Complex, Float

from ssmjax.checks import check_positive_int
from ssmjax.data.audio import hann_window
from ssmjax.data.audio import stft as framed_stft
from ssmjax.data.speech import SpeechPairs
from ssmjax.layers.common import dilated_causal_conv, rotary_embedding, uniform_init
from ssmjax.layers.fsmn import prelu
from ssmjax.models.backbone import Block
from ssmjax.scan.conv import causal_conv1d
from ssmjax.train.fit import FitConfig, fit, predict_in_batches

SI_SNR_EPS = 1e-8


# ----------------------------------------------------------------------------- STFT

def _check_stft(n_fft: int, hop: int) -> None:
    check_positive_int("n_fft", n_fft)
    check_positive_int("hop", hop)
    if n_fft % 2 or hop > n_fft // 2:
        raise ValueError(f"n_fft, hop: expected an even n_fft and hop <= n_fft / 2, got {n_fft}, {hop}")


def stft(x: ArrayLike, n_fft: int, hop: int) -> Complex[Array, "*b m k"]:
    """``x [..., N] -> X [..., N // hop + 1, n_fft / 2 + 1]`` (module docstring)."""
    _check_stft(n_fft, hop)
    x = jnp.asarray(x)
    pad = n_fft // 2
    real, imag = framed_stft(jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)]), n_fft, hop)
    return jax.lax.complex(real, imag)


def istft(spec: ArrayLike, n_fft: int, hop: int, length: int) -> Float[Array, "*b n"]:
    """The weighted overlap-add inverse of :func:`stft` (module docstring):
    ``[..., M, n_fft / 2 + 1] -> [..., length]``."""
    _check_stft(n_fft, hop)
    spec = jnp.asarray(spec)
    frames, pad = spec.shape[-2], n_fft // 2
    if spec.shape[-1] != pad + 1 or not (frames - 1) * hop <= length < frames * hop:
        raise ValueError(f"spec: expected [..., frames, {pad + 1}] with frames = length // hop + 1 = "
                         f"{length // hop + 1}, got {tuple(spec.shape)}")
    window = hann_window(n_fft)
    index = hop * np.arange(frames)[:, None] + np.arange(n_fft)[None, :]  # [M, L]
    norm = np.bincount(index.ravel(), np.broadcast_to(window ** 2, index.shape).ravel())  # sum_m w[t - m H]^2
    segments = jnp.fft.irfft(spec, n=n_fft, axis=-1) * jnp.asarray(window, spec.real.dtype)
    padded = jnp.zeros(spec.shape[:-2] + norm.shape, segments.dtype).at[..., index].add(segments)
    return padded[..., pad:pad + length] / jnp.asarray(norm[pad:pad + length], segments.dtype)


# ----------------------------------------------------------------------------- SI-SNR, PIT

def si_snr(estimate: ArrayLike, target: ArrayLike, eps: float = SI_SNR_EPS) -> Float[Array, "*b"]:
    """SI-SNR in dB of ``estimate`` against ``target`` over the last axis (module docstring)."""
    estimate, target = jnp.asarray(estimate), jnp.asarray(target)
    if estimate.shape != target.shape:
        raise ValueError(f"estimate: expected the shape of target {tuple(target.shape)}, got {tuple(estimate.shape)}")
    estimate = estimate - estimate.mean(-1, keepdims=True)
    target = target - target.mean(-1, keepdims=True)
    scale = (estimate * target).sum(-1, keepdims=True) / ((target ** 2).sum(-1, keepdims=True) + eps)
    projection = scale * target
    error = estimate - projection
    return 10 * jnp.log10(((projection ** 2).sum(-1) + eps) / ((error ** 2).sum(-1) + eps))


def pairwise_si_snr(estimates: ArrayLike, targets: ArrayLike) -> Float[Array, "*b s s"]:
    """``[..., i, j] = SI-SNR(estimates[..., i, :], targets[..., j, :])``."""
    estimates, targets = jnp.asarray(estimates), jnp.asarray(targets)
    return si_snr(*jnp.broadcast_arrays(estimates[..., :, None, :], targets[..., None, :, :]))


def pit_si_snr(estimates: ArrayLike, targets: ArrayLike) -> tuple[Float[Array, "*b"], Array]:
    """Utterance-level PIT over ``[..., S, T]`` (module docstring): the best mean SI-SNR and
    the permutation ``perm [..., S]`` reaching it (``estimates[..., perm[i], :]`` is matched
    to ``targets[..., i, :]``)."""
    estimates, targets = jnp.asarray(estimates), jnp.asarray(targets)
    if estimates.shape != targets.shape or estimates.ndim < 2:
        raise ValueError(f"estimates: expected the shape [..., sources, time] of targets {tuple(targets.shape)}, "
                         f"got {tuple(estimates.shape)}")
    n = targets.shape[-2]
    perms = np.array(list(itertools.permutations(range(n))))  # [P, S]
    pair = pairwise_si_snr(estimates, targets)  # [..., S_est, S_tgt]
    scores = pair[..., perms, np.arange(n)].mean(-1)  # [..., P]
    best = jnp.argmax(scores, -1)
    return jnp.take_along_axis(scores, best[..., None], -1)[..., 0], jnp.asarray(perms)[best]


def si_snr_improvement(estimates: ArrayLike, targets: ArrayLike, mixture: ArrayLike) -> Float[Array, "*b"]:
    """PIT SI-SNR of ``estimates [..., S, T]`` minus the mean SI-SNR of the ``mixture
    [..., T]`` against each target (``S = 1``: the plain SI-SNRi)."""
    targets = jnp.asarray(targets)
    best, _ = pit_si_snr(estimates, targets)
    mixture = jnp.broadcast_to(jnp.asarray(mixture)[..., None, :], targets.shape)
    return best - si_snr(mixture, targets).mean(-1)


# ----------------------------------------------------------------------------- FRCRN

class DeepFSMN(nn.Module):
    """One FSMN layer along axis 1 of ``z [batch, length, features]`` (module docstring):
    ``z + p + sum_j a_j * p_{. - j}``, ``p = W_2 relu(W_1 z + b_1)``, ``memory_order`` taps."""

    hidden: int
    memory_order: int

    @nn.compact
    def __call__(self, z):
        check_positive_int("memory_order", self.memory_order)
        project = nn.Dense(z.shape[-1], use_bias=False, kernel_init=nn.initializers.zeros, name="project")
        p = project(jax.nn.relu(nn.Dense(self.hidden, name="hidden")(z)))
        taps = self.param("memory", uniform_init(1.0 / np.sqrt(self.memory_order)), (self.memory_order, z.shape[-1]))
        memory, _ = causal_conv1d(p, taps.astype(p.dtype))  # taps[-1] weighs p_f, taps[-1 - j] weighs p_{f - j}
        return z + p + memory


def _as_real(z):
    """Complex ``[..., C] -> [..., 2 C]`` (real parts, then imaginary parts)."""
    return jnp.concatenate([z.real, z.imag], -1)


def _as_complex(x):
    half = x.shape[-1] // 2
    return jax.lax.complex(x[..., :half], x[..., half:])


def _complex_leaky_relu(z):
    return jax.lax.complex(jax.nn.leaky_relu(z.real), jax.nn.leaky_relu(z.imag))


class ComplexConv(nn.Module):
    """Complex convolution ``W = A + iB`` over ``z [batch, frames, bins, channels]``, causal
    over ``kernel[0]`` frames and centred over ``kernel[1]`` (odd) bins, with stride 2 in
    bins (``bins -> (bins - 1) // 2 + 1``) or, with ``transpose``, the transposed
    convolution back to ``out_bins`` (input bin ``j`` at output bin ``2 j``: the same
    centred filter over the input with zeros between its bins)."""

    features: int
    kernel: tuple[int, int] = (2, 5)
    transpose: bool = False

    @nn.compact
    def __call__(self, z, out_bins: int | None = None):
        kt, kf = self.kernel
        if kf % 2 == 0:
            raise ValueError(f"kernel: expected an odd number of bins, got {self.kernel}")
        if self.transpose:
            if out_bins is None or not 2 * z.shape[2] - 1 <= out_bins <= 2 * z.shape[2]:
                raise ValueError(f"out_bins: expected {2 * z.shape[2] - 1} or {2 * z.shape[2]}, got {out_bins}")
            z = jnp.stack([z, jnp.zeros_like(z)], 3).reshape(z.shape[0], z.shape[1], -1, z.shape[3])[:, :, :out_bins]
        make = partial(nn.Conv, self.features, (kt, kf), strides=(1, 1 if self.transpose else 2),
                       padding=((kt - 1, 0), (kf // 2, kf // 2)))
        a, b = make(name="real"), make(name="imag")
        return jax.lax.complex(a(z.real) - b(z.imag), a(z.imag) + b(z.real))


class FRCRN(nn.Module):
    """FRCRN (module docstring): ``noisy [batch, samples] -> enhanced [batch, 1, samples]``."""

    n_fft: int = 128
    hop: int = 64
    channels: int = 16
    n_layers: int = 3
    kernel: tuple[int, int] = (2, 5)
    frequency_recurrence: bool = True
    frequency_memory: int = 8
    temporal: str = "deep_fsmn"
    temporal_memory: int = 10
    fsmn_hidden: int = 64
    compression: float = 0.3

    def _frequency_fsmn(self, z, name: str):
        """FSMN along the bins of each frame of ``z [b, frames, bins, C]`` (complex)."""
        if not self.frequency_recurrence:
            return z
        b, t, f, c = z.shape
        y = DeepFSMN(self.fsmn_hidden, self.frequency_memory, name=name)(_as_real(z).reshape(b * t, f, 2 * c))
        return _as_complex(y.reshape(b, t, f, 2 * c))

    def _temporal(self, z):
        """Two layers along frames of the flattened map ``[b, frames, bins * 2 C]``."""
        b, t, f, c = z.shape
        x = _as_real(z).reshape(b, t, f * 2 * c)
        for i in range(2):
            if self.temporal == "deep_fsmn":
                x = DeepFSMN(self.fsmn_hidden, self.temporal_memory, name=f"temporal_{i}")(x)
            else:
                x = Block(self.temporal, f * 2 * c, {}, mlp="none", norm="layer", name=f"temporal_{i}").forward(x)
        return _as_complex(x.reshape(b, t, f, 2 * c))

    @nn.compact
    def estimate_with_mask(self, noisy):
        """``(enhanced [b, 1, samples], mask [b, frames, bins])``."""
        check_positive_int("n_layers", self.n_layers)
        noisy = jnp.asarray(noisy)
        spec = stft(noisy, self.n_fft, self.hop)  # [b, M, K]
        z, skips, bins = (spec * (jnp.abs(spec) + 1e-8) ** (self.compression - 1))[..., None], [], []
        for i in range(self.n_layers):
            bins.append(z.shape[2])
            z = _complex_leaky_relu(ComplexConv(self.channels, self.kernel, name=f"encoder_{i}")(z))
            z = self._frequency_fsmn(z, f"encoder_fsmn_{i}")
            skips.append(z)
        z = self._temporal(z)
        for i in reversed(range(self.n_layers)):
            z = ComplexConv(self.channels if i else 1, self.kernel, transpose=True, name=f"decoder_{i}")(
                jnp.concatenate([z, skips[i]], -1), bins[i])
            if i:
                z = self._frequency_fsmn(_complex_leaky_relu(z), f"decoder_fsmn_{i}")
        mask = jax.lax.complex(jnp.tanh(z.real), jnp.tanh(z.imag))[..., 0]
        return istft(mask * spec, self.n_fft, self.hop, noisy.shape[-1])[:, None], mask

    def __call__(self, noisy):
        return self.estimate_with_mask(noisy)[0]


def complex_ratio_mask(clean_spec: ArrayLike, noisy_spec: ArrayLike, bound: float = 1.0,
                       eps: float = SI_SNR_EPS) -> Complex[Array, "*shape"]:
    """The cIRM ``S / Y = S conj(Y) / |Y|^2`` with real and imaginary parts clipped to
    ``[-bound, bound]``."""
    clean_spec, noisy_spec = jnp.asarray(clean_spec), jnp.asarray(noisy_spec)
    ratio = clean_spec * jnp.conj(noisy_spec) / (jnp.abs(noisy_spec) ** 2 + eps)
    return jax.lax.complex(jnp.clip(ratio.real, -bound, bound), jnp.clip(ratio.imag, -bound, bound))


def frcrn_loss(model: FRCRN, params, mixture: ArrayLike, sources: ArrayLike, mask_weight: float = 1.0) -> Array:
    """``-SI-SNR(s^, s) + mask_weight mean |M - cIRM|^2`` (module docstring), ``sources [b, 1, T]``."""
    mixture, sources = jnp.asarray(mixture), jnp.asarray(sources)
    estimate, mask = model.apply(params, mixture, method=FRCRN.estimate_with_mask)
    target = complex_ratio_mask(stft(sources[:, 0], model.n_fft, model.hop), stft(mixture, model.n_fft, model.hop))
    return -si_snr(estimate[:, 0], sources[:, 0]).mean() + mask_weight * jnp.mean(jnp.abs(mask - target) ** 2)


# ----------------------------------------------------------------------------- MossFormer2

def joint_attention(q: ArrayLike, k: ArrayLike, q_lin: ArrayLike, k_lin: ArrayLike, values: ArrayLike,
                    group_size: int) -> Float[Array, "b n e"]:
    """MossFormer's joint attention (module docstring) of ``values [b, n, e]`` with queries
    and keys ``[b, n, d]``: ``relu(q k^T / g)^2`` inside consecutive groups of ``g`` frames
    (the last zero-padded) plus the linearised ``q_lin (k_lin^T values) / n`` over all ``n``."""
    check_positive_int("group_size", group_size)
    q, k, q_lin, k_lin, values = map(jnp.asarray, (q, k, q_lin, k_lin, values))
    b, n, _ = values.shape
    pad = -n % group_size

    def grouped(x):  # [b, n, c] -> [b, groups, g, c], zero frames after the end
        return jnp.pad(x, [(0, 0), (0, pad), (0, 0)]).reshape(b, -1, group_size, x.shape[-1])

    weights = jax.nn.relu(jnp.einsum("bgid,bgjd->bgij", grouped(q), grouped(k)) / group_size) ** 2
    local = jnp.einsum("bgij,bgje->bgie", weights, grouped(values)).reshape(b, -1, values.shape[-1])[:, :n]
    return local + q_lin @ (jnp.swapaxes(k_lin, -1, -2) @ values) / n


class FFConvM(nn.Module):
    """MossFormer's convolution module: ``z + dwconv_K(z)``, ``z = silu(Linear(LN x))``,
    the depthwise filter centred (``K`` odd)."""

    features: int
    conv_size: int = 17

    @nn.compact
    def __call__(self, x):
        if self.conv_size % 2 == 0:
            raise ValueError(f"conv_size: expected an odd size (a centred filter), got {self.conv_size}")
        z = jax.nn.silu(nn.Dense(self.features)(nn.LayerNorm()(x)))
        taps = self.param("conv", uniform_init(1.0 / np.sqrt(self.conv_size)), (self.conv_size, self.features))
        conv, _ = dilated_causal_conv(z, taps.astype(z.dtype), 1, None, self.conv_size // 2)
        return z + conv


class MossFormerBlock(nn.Module):
    """The gated single-head MossFormer block with joint local/global attention (module
    docstring): ``x [b, n, d_model] -> [b, n, d_model]``."""

    d_model: int
    qk_dim: int = 32
    group_size: int = 64
    conv_size: int = 17
    rope_base: float = 10000.0

    @nn.compact
    def __call__(self, x):
        half = self.d_model // 2
        shifted = jnp.concatenate([jnp.pad(x[:, :-1, :half], [(0, 0), (1, 0), (0, 0)]), x[..., half:]], -1)
        v, u = jnp.split(FFConvM(4 * self.d_model, self.conv_size, name="to_hidden")(shifted), 2, -1)
        z = FFConvM(self.qk_dim, self.conv_size, name="to_qk")(shifted)
        gamma = self.param("qk_gamma", nn.initializers.normal(0.02), (4, self.qk_dim))
        beta = self.param("qk_beta", nn.initializers.zeros, (4, self.qk_dim))
        heads = rotary_embedding(z[:, :, None] * gamma + beta, jnp.arange(x.shape[1]), self.rope_base)  # [b, n, 4, d]
        q, q_lin, k, k_lin = (heads[:, :, i] for i in range(4))
        attended = joint_attention(q, k, q_lin, k_lin, jnp.concatenate([v, u], -1), self.group_size)
        att_v, att_u = jnp.split(attended, 2, -1)
        gated = att_u * v * jax.nn.sigmoid(att_v * u)
        return x + FFConvM(self.d_model, self.conv_size, name="to_out")(gated)


class MossFormer2Separator(nn.Module):
    """The MossFormer2 masking separator (module docstring): ``mixture [batch, samples] ->
    estimates [batch, n_sources, samples]``. ``recurrent``: the registry name of the
    recurrent module after each MossFormer block (``"fsmn"``), or ``None``."""

    n_sources: int = 2
    enc_channels: int = 64
    enc_kernel: int = 16
    d_model: int = 64
    n_blocks: int = 2
    recurrent: str | None = "fsmn"
    qk_dim: int = 32
    group_size: int = 64
    conv_size: int = 17

    @nn.compact
    def __call__(self, mixture):
        mixture = jnp.asarray(mixture)
        batch, samples = mixture.shape
        kernel, stride = self.enc_kernel, self.enc_kernel // 2
        if kernel < 2 or kernel % 2 or samples < kernel:
            raise ValueError(f"enc_kernel: expected an even kernel of at most {samples} samples, got {kernel}")
        frames = -(-(samples - kernel) // stride) + 1
        padded = jnp.pad(mixture, [(0, 0), (0, (frames - 1) * stride + kernel - samples)])
        w = jax.nn.relu(nn.Conv(self.enc_channels, (kernel,), strides=(stride,), padding="VALID", name="encoder")(
            padded[..., None]))  # [b, frames, N]
        h = nn.Dense(self.d_model, name="bottleneck")(nn.LayerNorm(name="encoder_norm")(w))
        for i in range(self.n_blocks):
            h = MossFormerBlock(self.d_model, self.qk_dim, self.group_size, self.conv_size, name=f"mossformer_{i}")(h)
            if self.recurrent is not None:
                h = Block(self.recurrent, self.d_model, {}, mlp="none", norm="layer", bidirectional=True,
                          name=f"recurrent_{i}").forward(h)
        slope = self.param("prelu", nn.initializers.constant(0.25), ())
        g = nn.Dense(self.n_sources * self.enc_channels, name="to_masks")(prelu(h, slope.astype(h.dtype)))
        g = g.reshape(batch, frames, self.n_sources, self.enc_channels)
        g = jnp.tanh(nn.Dense(self.enc_channels, name="mask_tanh")(g)) * jax.nn.sigmoid(
            nn.Dense(self.enc_channels, name="mask_gate")(g))
        masks = jax.nn.relu(nn.Dense(self.enc_channels, name="mask_out")(g))
        masked = (w[:, :, None] * masks).transpose(0, 2, 1, 3).reshape(batch * self.n_sources, frames, -1)
        out = nn.ConvTranspose(1, (kernel,), strides=(stride,), padding="VALID", name="decoder")(masked)
        return out[:, :samples, 0].reshape(batch, self.n_sources, samples)


def pit_loss(model: nn.Module, params, mixture: ArrayLike, sources: ArrayLike) -> Array:
    """``-mean`` utterance-level PIT SI-SNR of ``model``'s estimates (module docstring)."""
    return -pit_si_snr(model.apply(params, mixture), sources)[0].mean()


# ----------------------------------------------------------------------------- training glue

def score(estimates: np.ndarray, data: SpeechPairs) -> dict[str, np.ndarray]:
    """Per example: the PIT ``si_snr`` of ``estimates [n, S, T]`` and its ``si_snri`` over
    the mixture (dB)."""
    best, _ = pit_si_snr(estimates, data.sources)
    return dict(si_snr=np.asarray(best), si_snri=np.asarray(si_snr_improvement(estimates, data.sources,
                                                                              data.mixture)))


def input_si_snr(data: SpeechPairs) -> float:
    """Mean SI-SNR of the unprocessed mixture against its sources (dB)."""
    mixture = np.broadcast_to(data.mixture[:, None], data.sources.shape)
    return float(np.mean(np.asarray(si_snr(mixture, data.sources))))


def train_and_score(model: nn.Module, loss: Callable[..., Array], data: dict[str, SpeechPairs], config: FitConfig, *,
                    extra_metrics: Callable[[np.ndarray, SpeechPairs], dict] | None = None,
                    verbose: bool = False) -> dict[str, Any]:
    """Fit ``model`` by ``loss(model, params, mixture, sources)`` on ``data["train"]`` with
    :func:`ssmjax.train.fit.fit` (the epoch of best mean validation SI-SNRi is kept), then
    score ``data["test"]``: mean SI-SNR / SI-SNRi (dB), the SI-SNRi of every test clip (for
    paired comparisons), anything ``extra_metrics(test estimates, test data)`` adds,
    parameter count, updates, history and wall time."""
    start = time.perf_counter()
    params = jax.jit(model.init)(jax.random.key(config.seed), jnp.asarray(data["train"].mixture[:1]))
    compiled = jax.jit(model.apply)

    def predict(p, split):
        return predict_in_batches(partial(compiled, p), (data[split].mixture,), config.batch_size)

    def validate(p):
        return -float(np.mean(score(predict(p, "val"), data["val"])["si_snri"]))

    train = data["train"]
    result = fit(lambda p, batch, key: loss(model, p, *batch), params, (train.mixture, train.sources), validate,
                 config, verbose=verbose)
    estimates = predict(result.params, "test")
    test = score(estimates, data["test"])
    return dict(si_snri=float(np.mean(test["si_snri"])), si_snr=float(np.mean(test["si_snr"])),
                **(extra_metrics(estimates, data["test"]) if extra_metrics else {}),
                si_snri_per_clip=[round(float(v), 4) for v in test["si_snri"]],
                val_si_snri=-result.best_val, best_epoch=result.best_epoch,
                params=int(sum(np.size(p) for p in jax.tree.leaves(params))),
                updates=config.epochs * (len(train.mixture) // config.batch_size),
                history=[dict(epoch=r["epoch"], train_loss=r["train_loss"], val_si_snri=-r["val_loss"])
                         for r in result.history],
                train_s=time.perf_counter() - start)


def paired_difference(first: list[float], second: list[float]) -> tuple[float, float]:
    """Mean and standard error of ``first - second`` over paired test clips (dB)."""
    if len(first) != len(second) or len(first) < 2:
        raise ValueError(f"first, second: expected equal lists of at least 2 clips, got {len(first)}, {len(second)}")
    diff = np.asarray(first, np.float64) - np.asarray(second, np.float64)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def compare_variants(variants: dict[str, tuple[nn.Module, Callable[..., Array]]], data: dict[str, SpeechPairs],
                     config: FitConfig, *, baseline: str = "input",
                     extra_metrics: Callable[[np.ndarray, SpeechPairs], dict] | None = None,
                     verbose: bool = False) -> list[dict[str, Any]]:
    """One row per variant ``name -> (model, loss)`` from :func:`train_and_score` on the same
    data and settings, after a ``baseline`` row for the unprocessed mixture (SI-SNRi 0)."""
    test = data["test"]
    extra = extra_metrics(np.broadcast_to(test.mixture[:, None], test.sources.shape), test) if extra_metrics else {}
    rows = [dict(variant=baseline, si_snri=0.0, si_snr=input_si_snr(test), params=0, **extra)]
    for name, (model, loss) in variants.items():
        rows.append(dict(variant=name, **train_and_score(model, loss, data, config, extra_metrics=extra_metrics,
                                                         verbose=verbose)))
        if verbose:
            r = rows[-1]
            print(f"{name}: test SI-SNRi {r['si_snri']:.2f} dB (SI-SNR {r['si_snr']:.2f} dB, {r['params']:,} params, "
                  f"{r['train_s']:.0f}s)", flush=True)
    return rows
