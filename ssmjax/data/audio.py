"""Audio clips for classification: a seeded generator of synthetic sounds, a reader of a
folder of labelled WAV files, and the short-time Fourier transform and log-mel spectrogram
written from their definitions.

**Generated set** (:func:`make_clips`). Seven classes (:data:`CLASSES`), one sound event per
clip of ``duration`` seconds at ``sample_rate`` Hz, the rest of the clip silent, then white
Gaussian noise over the whole clip:

* ``tone``: ``sin(2 pi f t + phi)``, ``f`` log-uniform in ``TONE_HZ``;
* ``chirp_up`` / ``chirp_down``: an exponential sweep ``sin(2 pi f_a D (r^(t/D) - 1) / ln r)``
  from ``f_a`` to ``f_b = r f_a`` over the event's ``D`` seconds, ``f_low`` log-uniform in
  ``CHIRP_START_HZ`` and ``f_high / f_low`` log-uniform in ``CHIRP_RATIO`` (up: low -> high,
  down: high -> low);
* ``noise_burst``: white noise through one wide two-pole resonator (centre uniform in
  ``BURST_CENTRE_HZ``, bandwidth in ``BURST_BANDWIDTH_HZ``);
* ``vowel_a`` / ``vowel_i`` / ``vowel_u``: a source-filter vowel, a glottal pulse train (one
  unit impulse per period ``1 / f0``, ``f0`` log-uniform in ``PITCH_HZ``) through a cascade
  of three two-pole resonators at the vowel's formants (:data:`VOWEL_FORMANTS_HZ`, Peterson &
  Barney 1952 adult-male means, scaled per clip by a "speaker" factor uniform in
  ``SPEAKER_SCALE``) with bandwidths :data:`FORMANT_BANDWIDTHS_HZ`.

A two-pole resonator at centre ``F`` and bandwidth ``B`` is
``y[n] = x[n] + 2 r cos(theta) y[n-1] - r^2 y[n-2]``, ``theta = 2 pi F / fs``,
``r = exp(-pi B / fs)``, whose impulse response is ``h[n] = r^n sin((n + 1) theta) / sin theta``
(:func:`resonator_impulse_response`); filtering is convolution with ``h`` cut where ``r^n``
falls below ``1e-4``. Per clip, uniformly at random: the event lasts a fraction
``EVENT_FRACTION`` of the clip and starts anywhere it fits; it has 10 ms raised-cosine ramps,
peak amplitude in ``AMPLITUDE``; the noise power is the event's mean power over
``10^(snr / 10)``, ``snr`` uniform in ``snr_db`` dB; a clip whose peak then exceeds 1 is
scaled down to peak 1. Clip ``i`` has label ``i mod 7`` (every class within one clip of
balanced) and draws its randomness from ``numpy.random.default_rng([*seed, i])``, so the
first ``m`` clips of a set of ``n`` are the set of ``m``.

**WAV folders** (:func:`load_wav_folder`): ``<root>/<label>/*.wav``, 16-bit PCM, mono, one
sample rate, read with the standard library's :mod:`wave`; labels are the sorted folder names.

**Spectrograms.** For a signal ``x[0..N)``, frame length ``L``, hop ``H`` and the periodic
Hann window ``w[n] = 1/2 - 1/2 cos(2 pi n / L)``, frame ``m = 0 .. M-1``
(``M = 1 + floor((N - L) / H)``, no padding) has the DFT

    X[m, k] = sum_{n=0}^{L-1} w[n] x[m H + n] exp(-2 pi i k n / L),   k = 0 .. L/2,

computed here as two real matrix products with the cosine and sine tables (:func:`stft`).
The mel spectrogram weights the power ``|X[m, k]|^2`` by ``n_mels`` triangles on bin
frequencies ``f_k = k fs / L``, their corners equally spaced on the (HTK) mel scale
``mel(f) = 2595 log10(1 + f / 700)`` from 0 to ``fs / 2`` (:func:`mel_filterbank`), and
takes ``log(. + floor)`` (:func:`log_mel_spectrogram`).
"""

from __future__ import annotations

import wave
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Float

from ssmjax.checks import check_positive_int

CLASSES = ("tone", "chirp_up", "chirp_down", "noise_burst", "vowel_a", "vowel_i", "vowel_u")
#: F1, F2, F3 in Hz (Peterson & Barney, 1952, adult men): /a/ as in "father", /i/ "heed", /u/ "who'd".
VOWEL_FORMANTS_HZ = {"vowel_a": (730.0, 1090.0, 2440.0), "vowel_i": (270.0, 2290.0, 3010.0),
                     "vowel_u": (300.0, 870.0, 2240.0)}
FORMANT_BANDWIDTHS_HZ = (80.0, 100.0, 140.0)
PITCH_HZ = (90.0, 220.0)
SPEAKER_SCALE = (0.9, 1.1)
TONE_HZ = (200.0, 3000.0)
CHIRP_START_HZ = (200.0, 1200.0)
CHIRP_RATIO = (2.0, 3.0)
BURST_CENTRE_HZ = (500.0, 3000.0)
BURST_BANDWIDTH_HZ = (400.0, 1500.0)
EVENT_FRACTION = (0.4, 0.9)
AMPLITUDE = (0.1, 0.8)
RAMP_SECONDS = 0.01
MIN_SAMPLE_RATE = 8000  # Nyquist 4 kHz: above the highest chirp (1.2 kHz x 3) and formant (3010 Hz x 1.1)
PCM_SCALE = 32768.0  # 16-bit PCM: sample s in [-32768, 32767] is s / 32768 in [-1, 1)


class LabelledAudio(NamedTuple):
    """``audio`` float32 ``[n, samples]`` in ``[-1, 1]``, ``labels`` int32 ``[n]`` indexing
    ``classes``, all at ``sample_rate`` Hz."""

    audio: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    sample_rate: int


# ----------------------------------------------------------------------------- generator

def resonator_impulse_response(centre_hz: float, bandwidth_hz: float, sample_rate: int,
                               cutoff: float = 1e-4) -> Float[np.ndarray, "n"]:
    """``h[n] = r^n sin((n + 1) theta) / sin theta`` of the two-pole resonator (module
    docstring), cut where ``r^n < cutoff``."""
    theta = 2 * np.pi * centre_hz / sample_rate
    r = np.exp(-np.pi * bandwidth_hz / sample_rate)
    n = np.arange(int(np.ceil(np.log(cutoff) / np.log(r))))
    return r ** n * np.sin((n + 1) * theta) / np.sin(theta)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


def _event(name: str, rng: np.random.Generator, length: int, sample_rate: int) -> np.ndarray:
    """The ``length`` samples of one event of class ``name`` (module docstring), before ramps
    and scaling."""
    t = np.arange(length) / sample_rate
    if name == "tone":
        return np.sin(2 * np.pi * _log_uniform(rng, TONE_HZ) * t + rng.uniform(0, 2 * np.pi))
    if name in ("chirp_up", "chirp_down"):
        low, ratio = _log_uniform(rng, CHIRP_START_HZ), _log_uniform(rng, CHIRP_RATIO)
        start, rate = (low, ratio) if name == "chirp_up" else (low * ratio, 1 / ratio)
        span = length / sample_rate
        return np.sin(2 * np.pi * start * span * (rate ** (t / span) - 1) / np.log(rate))
    if name == "noise_burst":
        h = resonator_impulse_response(rng.uniform(*BURST_CENTRE_HZ), rng.uniform(*BURST_BANDWIDTH_HZ), sample_rate)
        return np.convolve(rng.standard_normal(length), h)[:length]
    pitch, speaker = _log_uniform(rng, PITCH_HZ), rng.uniform(*SPEAKER_SCALE)
    cycles = pitch * t + rng.uniform()  # a pulse where the glottal cycle count passes an integer
    signal = np.diff(np.floor(cycles), prepend=np.floor(cycles[0]))
    for formant, bandwidth in zip(VOWEL_FORMANTS_HZ[name], FORMANT_BANDWIDTHS_HZ):
        signal = np.convolve(signal, resonator_impulse_response(speaker * formant, bandwidth, sample_rate))[:length]
    return signal


def make_clip(label: int, rng: np.random.Generator, samples: int, sample_rate: int,
              snr_db: tuple[float, float]) -> Float[np.ndarray, "samples"]:
    """One clip of class ``CLASSES[label]`` (module docstring), float32 in ``[-1, 1]``."""
    length = int(round(rng.uniform(*EVENT_FRACTION) * samples))
    onset = int(rng.integers(0, samples - length + 1))
    event = _event(CLASSES[label], rng, length, sample_rate)
    ramp = min(int(RAMP_SECONDS * sample_rate), length // 2)
    rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    event[:ramp] *= rise
    event[length - ramp:] *= rise[::-1]
    event *= rng.uniform(*AMPLITUDE) / max(np.max(np.abs(event)), 1e-12)
    clip = np.zeros(samples)
    clip[onset:onset + length] = event
    noise_power = np.mean(event ** 2) / 10 ** (rng.uniform(*snr_db) / 10)
    clip += np.sqrt(noise_power) * rng.standard_normal(samples)
    return (clip / max(1.0, np.max(np.abs(clip)))).astype(np.float32)


def make_clips(n: int, *, seed: int | Sequence[int] = 0, sample_rate: int = 8000, duration: float = 0.5,
               snr_db: tuple[float, float] = (0.0, 20.0)) -> LabelledAudio:
    """``n`` generated clips (module docstring): clip ``i`` has label ``i mod 7`` and the
    randomness of ``default_rng([*seed, i])``."""
    check_positive_int("n", n)
    if sample_rate < MIN_SAMPLE_RATE:
        raise ValueError(f"sample_rate: expected >= {MIN_SAMPLE_RATE} Hz (the sounds reach 3.6 kHz), got {sample_rate}")
    samples = int(round(duration * sample_rate))
    if samples < 2 * int(RAMP_SECONDS * sample_rate) + 1:
        raise ValueError(f"duration: expected at least {2 * RAMP_SECONDS + 1 / sample_rate:g} s, got {duration}")
    if len(snr_db) != 2 or snr_db[0] > snr_db[1]:
        raise ValueError(f"snr_db: expected (low, high) with low <= high, got {snr_db}")
    seed = (seed,) if isinstance(seed, int) else tuple(seed)
    labels = np.arange(n, dtype=np.int32) % len(CLASSES)
    audio = np.stack([make_clip(int(labels[i]), np.random.default_rng([*seed, i]), samples, sample_rate, snr_db)
                      for i in range(n)])
    return LabelledAudio(audio, labels, CLASSES, sample_rate)


# ----------------------------------------------------------------------------- WAV files

def write_wav(path: str | Path, audio: ArrayLike, sample_rate: int) -> None:
    """``audio`` (``[samples]`` in ``[-1, 1]``) as a 16-bit PCM mono WAV file; values are
    clipped to the 16-bit range."""
    pcm = np.clip(np.round(np.asarray(audio, np.float64) * PCM_SCALE), -PCM_SCALE, PCM_SCALE - 1).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def read_wav(path: str | Path) -> tuple[Float[np.ndarray, "samples"], int]:
    """``(samples float32 in [-1, 1), sample_rate)`` of a 16-bit PCM mono WAV file;
    ``ValueError`` naming the file otherwise."""
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            data = f.readframes(frames)
    except (wave.Error, EOFError) as error:
        raise ValueError(f"wav: {path} is not a PCM WAV file ({error})") from None
    if channels != 1 or width != 2:
        raise ValueError(f"wav: {path}: expected 16-bit PCM mono, got {8 * width}-bit with {channels} channels")
    return (np.frombuffer(data, "<i2") / PCM_SCALE).astype(np.float32), rate


def fit_length(audio: Float[np.ndarray, "n"], samples: int) -> Float[np.ndarray, "samples"]:
    """The first ``samples`` samples of ``audio``, zero-padded at the end when shorter."""
    return np.pad(audio[:samples], (0, max(0, samples - len(audio))))


def load_wav_folder(root: str | Path, duration: float | None = None) -> LabelledAudio:
    """The clips of ``<root>/<label>/*.wav`` (module docstring), each cut or zero-padded to
    ``duration`` seconds (``None``: the longest clip). Labels index the sorted folder names."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"root: {root} is not a folder (expected <root>/<label>/*.wav)")
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.wav"))))
    if not classes:
        raise ValueError(f"root: no <label>/*.wav files under {root}")
    clips, labels, rates = [], [], {}
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.wav")):
            audio, rates[path] = read_wav(path)
            clips.append(audio)
            labels.append(label)
    if len(set(rates.values())) != 1:
        found = sorted({rate: path for path, rate in rates.items()}.items())
        raise ValueError(f"root: expected one sample rate, got {', '.join(f'{r} Hz ({p})' for r, p in found)}")
    rate = next(iter(rates.values()))
    samples = max(map(len, clips)) if duration is None else int(round(duration * rate))
    if samples < 1:
        raise ValueError(f"duration: expected a length of at least one sample, got {duration} s at {rate} Hz")
    audio = np.stack([fit_length(c, samples) for c in clips])
    return LabelledAudio(audio, np.asarray(labels, np.int32), classes, rate)


# ----------------------------------------------------------------------------- spectrograms

def hann_window(length: int) -> Float[np.ndarray, "length"]:
    """The periodic Hann window ``w[n] = 1/2 - 1/2 cos(2 pi n / L)``."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)


def num_frames(samples: int, frame_length: int, hop: int) -> int:
    """``M = 1 + floor((N - L) / H)``: the frames of :func:`stft` (``ValueError`` if none)."""
    check_positive_int("frame_length", frame_length)
    check_positive_int("hop", hop)
    if samples < frame_length:
        raise ValueError(f"frame_length: {frame_length} is longer than the signal ({samples} samples)")
    return 1 + (samples - frame_length) // hop


def stft(x: ArrayLike, frame_length: int, hop: int) -> tuple[Float[Array, "*b m k"], Float[Array, "*b m k"]]:
    """``(Re X, Im X)`` of the Hann-windowed STFT of ``x [..., N]`` (module docstring):
    ``[..., M, L // 2 + 1]`` each, in ``x``'s float dtype."""
    x = jnp.asarray(x)
    frames = num_frames(x.shape[-1], frame_length, hop)
    index = hop * np.arange(frames)[:, None] + np.arange(frame_length)[None, :]  # [M, L]
    windowed = x[..., index] * jnp.asarray(hann_window(frame_length), x.dtype)  # [..., M, L]
    kn = np.outer(np.arange(frame_length), np.arange(frame_length // 2 + 1)) % frame_length  # k n mod L: [L, K]
    angle = 2 * np.pi * kn / frame_length
    return windowed @ jnp.asarray(np.cos(angle), x.dtype), -(windowed @ jnp.asarray(np.sin(angle), x.dtype))


def hz_to_mel(hz: ArrayLike):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel: ArrayLike):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, frame_length: int, sample_rate: int) -> Float[np.ndarray, "k n_mels"]:
    """Triangles ``[L // 2 + 1, n_mels]`` on the bin frequencies ``k fs / L``: filter ``j``
    rises from corner ``j`` to ``j + 1`` and falls to ``j + 2``, the ``n_mels + 2`` corners
    equally spaced in mel from 0 to ``fs / 2`` (module docstring). ``ValueError`` if a filter
    holds no bin (too many mels for the frame length)."""
    check_positive_int("n_mels", n_mels)
    bins = np.arange(frame_length // 2 + 1) * sample_rate / frame_length  # [k]
    corners = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
    low, centre, high = corners[:-2], corners[1:-1], corners[2:]
    rising = (bins[:, None] - low) / (centre - low)
    falling = (high - bins[:, None]) / (high - centre)
    weights = np.clip(np.minimum(rising, falling), 0.0, None)
    if not np.all(weights.max(0) > 0):
        raise ValueError(f"n_mels: {n_mels} mel bands leave some without an FFT bin at frame_length = "
                         f"{frame_length}, sample_rate = {sample_rate}; use fewer bands or longer frames")
    return weights


def log_mel_spectrogram(x: ArrayLike, sample_rate: int, frame_length: int, hop: int, n_mels: int,
                        floor: float = 1e-6) -> Float[Array, "*b m n_mels"]:
    """``log(|X|^2 @ mel_filterbank + floor)``: ``[..., N] -> [..., M, n_mels]`` (module docstring)."""
    real, imag = stft(x, frame_length, hop)
    weights = jnp.asarray(mel_filterbank(n_mels, frame_length, sample_rate), real.dtype)
    return jnp.log((real ** 2 + imag ** 2) @ weights + floor)
