"""Speech enhancement and separation data: a seeded generator of speech-like signals, and
readers of the VoiceBank-DEMAND and WSJ0-2mix folder layouts.

**Generated sources** (:func:`speech_like_source`), ``N`` samples at ``fs`` Hz, ``t = n / fs``,
``D = N / fs``; every draw uniform in the named range unless said otherwise:

* pitch contour ``f0(t) = p (1 + g (t / D - 1/2)) (1 + v sin(2 pi r_v t + phi_v))``: mean ``p``
  log-uniform in :data:`PITCH_HZ`, glide ``g`` in :data:`GLIDE`, intonation depth ``v`` in
  :data:`INTONATION` at rate ``r_v`` in :data:`INTONATION_HZ`; the glottal phase is
  ``theta(t) = theta_0 + 2 pi sum_{s <= t} f0(s) / fs``;
* three formants moving as ``F_i(t) = c_i (1 + m_i sin(2 pi r_i t + phi_i))`` (centres ``c_i`` in
  :data:`FORMANT_HZ` ``[i]``, swings ``m_i`` in :data:`FORMANT_SWING`, rates ``r_i`` in
  :data:`FORMANT_RATE_HZ`) with bandwidths ``B_i`` = :data:`FORMANT_BANDWIDTH_HZ`; the vocal
  tract gain at frequency ``f`` is the sum of three resonances
  ``G(f, t) = sum_i 1 / (1 + ((f - F_i(t)) / B_i)^2)``;
* the voiced part: ``H`` = :data:`HARMONICS` harmonics with a ``1 / k`` source roll-off, each
  shaped by the formants and dropped above ``0.95 fs / 2``:
  ``h(t) = sum_{k=1}^{H} G(k f0(t), t) / k * sin(k theta(t))``;
* a syllable envelope ``e(t) = (1/2 + 1/2 sin(2 pi r_e t + phi_e))^2`` (``r_e`` in
  :data:`SYLLABLE_HZ`: pauses between syllables) and breath noise
  ``s(t) = e(t) (h(t) + a w(t))``, ``w`` white Gaussian, ``a`` = :data:`BREATH`;
* ``s`` scaled to unit RMS.

**Noise** (:func:`coloured_noise`): white Gaussian noise through the one-pole filter
``1 / (1 - c z^-1)`` (``c`` in :data:`NOISE_POLE`: from bright to rumbling; applied on the DFT
grid, i.e. circularly), amplitude-modulated by ``1 + m sin(2 pi r t + phi)`` (``m`` in
:data:`NOISE_MODULATION`, ``r`` in :data:`NOISE_MODULATION_HZ`), unit RMS.

**Sets.** Enhancement (:func:`enhancement_set`): ``y = s + n * 10^(-snr / 20)`` with a unit-RMS
source ``s`` and noise ``n``, ``snr`` uniform in ``snr_db`` (so the input SNR is exactly
``snr``). Two-source separation (:func:`separation_set`): ``y = s_1 + 10^(l / 20) s_2`` with
``l`` uniform in ``[-level_db, level_db]`` (WSJ0-2mix mixes its two speakers at 0 to 5 dB
relative level, either one louder); the scaled sources are the targets. Example ``i`` of
split ``split`` draws its randomness from ``numpy.random.default_rng([seed, split, i])``
(:data:`SPLITS` index), so the first ``m`` examples of a set of ``n`` are the set of ``m``
and the splits never share an example.

**Folders** (16-bit PCM mono WAV, read with :func:`ssmjax.data.audio.read_wav`):
VoiceBank-DEMAND (Valentini-Botinhao et al., 2016) ``<root>/noisy_testset_wav/*.wav`` paired
by file name with ``<root>/clean_testset_wav/*.wav`` (training split: ``*_trainset_28spk_wav``);
WSJ0-2mix (Hershey et al., 2016) ``<root>/<split>/mix/*.wav`` with ``s1/`` and ``s2/`` of
the same names, ``root`` being e.g. ``wsj0-2mix/wav8k/min``. Every file of a folder must
have its counterpart in the others with the same length and sample rate
(:func:`read_paired_folders`); :func:`cut_clips` cuts the utterances into fixed-length
clips for training and scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from jaxtyping import Float

from ssmjax.checks import check_choice, check_positive_int
from ssmjax.data.audio import fit_length, read_wav

SPLITS = ("train", "val", "test")
PITCH_HZ = (80.0, 260.0)
GLIDE = (-0.3, 0.3)
INTONATION = (0.0, 0.12)
INTONATION_HZ = (1.0, 4.0)
FORMANT_HZ = ((300.0, 800.0), (900.0, 2200.0), (2300.0, 3300.0))
FORMANT_SWING = (0.0, 0.25)
FORMANT_RATE_HZ = (1.0, 5.0)
FORMANT_BANDWIDTH_HZ = (80.0, 120.0, 160.0)
HARMONICS = 8
SYLLABLE_HZ = (2.0, 5.0)
BREATH = 0.05
NOISE_POLE = (-0.5, 0.95)
NOISE_MODULATION = (0.0, 0.6)
NOISE_MODULATION_HZ = (0.3, 3.0)
#: VoiceBank-DEMAND folders per split: (noisy, clean).
VOICEBANK_FOLDERS = {"train": ("noisy_trainset_28spk_wav", "clean_trainset_28spk_wav"),
                     "test": ("noisy_testset_wav", "clean_testset_wav")}
WSJ0_2MIX_SPLITS = ("tr", "cv", "tt")


class SpeechPairs(NamedTuple):
    """``mixture [n, samples]`` and its ``sources [n, S, samples]`` (float32; ``S = 1``:
    the clean speech of an enhancement pair)."""

    mixture: np.ndarray
    sources: np.ndarray


class Utterance(NamedTuple):
    """One file of a paired folder: ``mixture [samples]``, ``sources [S, samples]`` (float32)."""

    name: str
    mixture: np.ndarray
    sources: np.ndarray
    sample_rate: int


# ----------------------------------------------------------------------------- generator

def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.sqrt(np.mean(x ** 2))), 1e-12)


def speech_like_source(rng: np.random.Generator, samples: int, sample_rate: int) -> Float[np.ndarray, "samples"]:
    """One unit-RMS harmonic source with moving formants (module docstring), float64."""
    t = np.arange(samples) / sample_rate
    span = samples / sample_rate
    pitch = np.exp(rng.uniform(*np.log(PITCH_HZ)))
    f0 = (pitch * (1 + rng.uniform(*GLIDE) * (t / span - 0.5))
          * (1 + rng.uniform(*INTONATION) * np.sin(2 * np.pi * rng.uniform(*INTONATION_HZ) * t
                                                   + rng.uniform(0, 2 * np.pi))))
    theta = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.cumsum(f0) / sample_rate
    formants = [rng.uniform(*c) * (1 + rng.uniform(*FORMANT_SWING)
                                   * np.sin(2 * np.pi * rng.uniform(*FORMANT_RATE_HZ) * t + rng.uniform(0, 2 * np.pi)))
                for c in FORMANT_HZ]
    voiced = np.zeros(samples)
    for k in range(1, HARMONICS + 1):
        freq = k * f0
        gain = sum(1 / (1 + ((freq - f) / b) ** 2) for f, b in zip(formants, FORMANT_BANDWIDTH_HZ))
        voiced += np.where(freq < 0.95 * sample_rate / 2, gain / k, 0.0) * np.sin(k * theta)
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(*SYLLABLE_HZ) * t + rng.uniform(0, 2 * np.pi))) ** 2
    return _unit_rms(envelope * (voiced + BREATH * rng.standard_normal(samples)))


def coloured_noise(rng: np.random.Generator, samples: int, sample_rate: int) -> Float[np.ndarray, "samples"]:
    """Unit-RMS one-pole-coloured, amplitude-modulated Gaussian noise (module docstring)."""
    omega = 2 * np.pi * np.fft.rfftfreq(samples)
    shaped = np.fft.irfft(np.fft.rfft(rng.standard_normal(samples)) / (1 - rng.uniform(*NOISE_POLE)
                                                                      * np.exp(-1j * omega)), n=samples)
    t = np.arange(samples) / sample_rate
    modulation = 1 + rng.uniform(*NOISE_MODULATION) * np.sin(2 * np.pi * rng.uniform(*NOISE_MODULATION_HZ) * t
                                                             + rng.uniform(0, 2 * np.pi))
    return _unit_rms(shaped * modulation)


def _check_set(n: int, samples: int, sample_rate: int, split: str) -> None:
    check_positive_int("n", n)
    check_positive_int("samples", samples)
    check_positive_int("sample_rate", sample_rate)
    check_choice("split", split, SPLITS)


def _example_rngs(n: int, seed: int, split: str):
    return (np.random.default_rng([seed, SPLITS.index(split), i]) for i in range(n))


def enhancement_set(n: int, samples: int, *, sample_rate: int = 8000, seed: int = 0, split: str = "train",
                    snr_db: tuple[float, float] = (-5.0, 10.0)) -> SpeechPairs:
    """``n`` noisy/clean pairs (module docstring): ``mixture [n, samples]``,
    ``sources [n, 1, samples]``."""
    _check_set(n, samples, sample_rate, split)
    if len(snr_db) != 2 or snr_db[0] > snr_db[1]:
        raise ValueError(f"snr_db: expected (low, high) with low <= high, got {snr_db}")
    clean, noisy = [], []
    for rng in _example_rngs(n, seed, split):
        source = speech_like_source(rng, samples, sample_rate)
        noise = coloured_noise(rng, samples, sample_rate) * 10 ** (-rng.uniform(*snr_db) / 20)
        clean.append(source)
        noisy.append(source + noise)
    return SpeechPairs(np.stack(noisy).astype(np.float32), np.stack(clean)[:, None].astype(np.float32))


def separation_set(n: int, samples: int, *, sample_rate: int = 8000, seed: int = 0, split: str = "train",
                   level_db: float = 5.0) -> SpeechPairs:
    """``n`` two-source mixtures (module docstring): ``mixture [n, samples]``,
    ``sources [n, 2, samples]``."""
    _check_set(n, samples, sample_rate, split)
    if level_db < 0:
        raise ValueError(f"level_db: expected >= 0, got {level_db}")
    sources = []
    for rng in _example_rngs(n, seed, split):
        first, second = speech_like_source(rng, samples, sample_rate), speech_like_source(rng, samples, sample_rate)
        sources.append([first, second * 10 ** (rng.uniform(-level_db, level_db) / 20)])
    sources = np.asarray(sources, np.float32)
    return SpeechPairs(sources.sum(1), sources)


# ----------------------------------------------------------------------------- folders

def read_paired_folders(mixture_dir: str | Path, source_dirs: Sequence[str | Path]) -> list[Utterance]:
    """Every ``*.wav`` of ``mixture_dir`` with the files of the same name in each of
    ``source_dirs`` (sorted by name). ``ValueError`` naming the folder or file when a folder
    is missing or empty, a counterpart is missing, or paired files differ in length or
    sample rate."""
    folders = [Path(mixture_dir).expanduser(), *(Path(d).expanduser() for d in source_dirs)]
    names = []
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"data_dir: expected the folder {folder}")
        names.append({p.name for p in folder.glob("*.wav")})
    if not names[0]:
        raise ValueError(f"data_dir: no *.wav files in {folders[0]}")
    for folder, found in zip(folders[1:], names[1:]):
        missing, extra = sorted(names[0] - found), sorted(found - names[0])
        if missing or extra:
            raise ValueError(f"data_dir: {folder} does not pair with {folders[0]}: missing {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''}, unpaired {extra[:3]}"
                             f"{' ...' if len(extra) > 3 else ''}")
    utterances = []
    for name in sorted(names[0]):
        signals, rates = zip(*(read_wav(folder / name) for folder in folders))
        if len(set(rates)) != 1 or len({len(s) for s in signals}) != 1:
            found = ", ".join(f"{f.name}: {len(s)} samples at {r} Hz" for f, s, r in zip(folders, signals, rates))
            raise ValueError(f"data_dir: the files named {name} differ in sample rate or length: {found}")
        utterances.append(Utterance(name, signals[0], np.stack(signals[1:]), rates[0]))
    return utterances


def load_voicebank_demand(root: str | Path, split: str = "test") -> list[Utterance]:
    """The noisy/clean pairs of VoiceBank-DEMAND's ``split`` (module docstring)."""
    check_choice("split", split, tuple(VOICEBANK_FOLDERS))
    noisy, clean = VOICEBANK_FOLDERS[split]
    return read_paired_folders(Path(root) / noisy, [Path(root) / clean])


def load_wsj0_2mix(root: str | Path, split: str = "tt") -> list[Utterance]:
    """The mixtures of WSJ0-2mix's ``split`` with their two sources (module docstring)."""
    check_choice("split", split, WSJ0_2MIX_SPLITS)
    return read_paired_folders(Path(root) / split / "mix", [Path(root) / split / "s1", Path(root) / split / "s2"])


def cut_clips(utterances: Sequence[Utterance], samples: int, sample_rate: int) -> SpeechPairs:
    """The utterances cut into consecutive ``samples``-long clips (the remainder of each is
    dropped; one shorter than ``samples`` becomes one zero-padded clip). ``ValueError`` if an
    utterance is not at ``sample_rate``."""
    check_positive_int("samples", samples)
    if not utterances:
        raise ValueError("utterances: expected at least one")
    mixtures, sources = [], []
    for u in utterances:
        if u.sample_rate != sample_rate:
            raise ValueError(f"sample_rate: {u.name} is at {u.sample_rate} Hz, expected {sample_rate} Hz")
        starts = range(0, max(1, len(u.mixture) - samples + 1), samples)
        mixtures += [fit_length(u.mixture[s:s + samples], samples) for s in starts]
        sources += [np.stack([fit_length(x[s:s + samples], samples) for x in u.sources]) for s in starts]
    return SpeechPairs(np.stack(mixtures).astype(np.float32), np.stack(sources).astype(np.float32))
