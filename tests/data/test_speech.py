"""Speech data (ssmjax.data.speech): the generated enhancement and separation sets (seeded,
prefix-stable, exact input SNR / relative level), and the VoiceBank-DEMAND and WSJ0-2mix
folder readers on tiny WAV files written here (pairing by name, errors), clip cutting."""

import numpy as np
import pytest

from ssmjax.data import speech
from ssmjax.data.audio import write_wav


def _db(a, b):
    return 10 * np.log10(np.sum(a.astype(np.float64) ** 2, -1) / np.sum(b.astype(np.float64) ** 2, -1))


def test_enhancement_set_is_seeded_prefix_stable_and_at_the_drawn_snr():
    a = speech.enhancement_set(5, 400, seed=3, snr_db=(-5.0, 10.0))
    assert a.mixture.shape == (5, 400) and a.sources.shape == (5, 1, 400) and a.mixture.dtype == np.float32
    b = speech.enhancement_set(3, 400, seed=3, snr_db=(-5.0, 10.0))
    np.testing.assert_array_equal(a.mixture[:3], b.mixture)  # example i does not depend on n
    other = speech.enhancement_set(3, 400, seed=3, split="test", snr_db=(-5.0, 10.0))
    assert not np.allclose(other.mixture, b.mixture)
    np.testing.assert_allclose(np.sqrt(np.mean(a.sources.astype(np.float64) ** 2, -1)), 1.0, rtol=1e-5)
    snr = _db(a.sources[:, 0], a.mixture - a.sources[:, 0])
    assert np.all((snr > -5.001) & (snr < 10.001)) and np.ptp(snr) > 1
    fixed = speech.enhancement_set(4, 400, seed=0, snr_db=(3.0, 3.0))
    np.testing.assert_allclose(_db(fixed.sources[:, 0], fixed.mixture - fixed.sources[:, 0]), 3.0, atol=1e-3)


def test_sources_are_harmonic_below_nyquist():
    rng = np.random.default_rng(0)
    source = speech.speech_like_source(rng, 8000, 8000)
    power = np.abs(np.fft.rfft(source)) ** 2
    assert power[3800:].sum() < 0.01 * power.sum()  # harmonics stop below 0.95 fs / 2; only breath noise above
    assert power[:int(speech.PITCH_HZ[0] * 0.8)].sum() < 0.05 * power.sum()  # no energy far below the pitch


def test_separation_set_sums_its_sources_at_the_drawn_level():
    s = speech.separation_set(4, 300, seed=1, level_db=5.0)
    assert s.mixture.shape == (4, 300) and s.sources.shape == (4, 2, 300)
    np.testing.assert_allclose(s.mixture, s.sources.sum(1), atol=1e-6)
    level = _db(s.sources[:, 1], s.sources[:, 0])
    assert np.all(np.abs(level) <= 5.0 + 1e-3)
    equal = speech.separation_set(3, 300, seed=1, level_db=0.0)
    np.testing.assert_allclose(_db(equal.sources[:, 1], equal.sources[:, 0]), 0.0, atol=1e-3)


@pytest.mark.parametrize("call, match", [
    (lambda: speech.enhancement_set(0, 100), "n: expected a positive int"),
    (lambda: speech.enhancement_set(2, 100, snr_db=(5.0, 1.0)), "snr_db"),
    (lambda: speech.separation_set(2, 100, split="dev"), "split: expected one of"),
    (lambda: speech.separation_set(2, 100, level_db=-1.0), "level_db"),
])
def test_generator_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _write(folder, name, samples, rate=8000):
    folder.mkdir(parents=True, exist_ok=True)
    write_wav(folder / name, samples, rate)


def test_voicebank_demand_pairs_by_name(tmp_path):
    rng = np.random.default_rng(0)
    clean = {n: rng.uniform(-0.5, 0.5, size) for n, size in (("p232_002.wav", 50), ("p232_001.wav", 30))}
    for name, x in clean.items():
        _write(tmp_path / "clean_testset_wav", name, x)
        _write(tmp_path / "noisy_testset_wav", name, x + 0.1)
    utterances = speech.load_voicebank_demand(tmp_path, "test")
    assert [u.name for u in utterances] == ["p232_001.wav", "p232_002.wav"]
    for u in utterances:
        assert u.sources.shape == (1, len(clean[u.name])) and u.sample_rate == 8000
        np.testing.assert_allclose(u.sources[0], clean[u.name], atol=1 / 32768)
        np.testing.assert_allclose(u.mixture, clean[u.name] + 0.1, atol=1 / 32768)


def test_paired_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="noisy_testset_wav"):
        speech.load_voicebank_demand(tmp_path)  # no folders
    _write(tmp_path / "noisy_testset_wav", "a.wav", np.zeros(10))
    _write(tmp_path / "noisy_testset_wav", "b.wav", np.zeros(10))
    _write(tmp_path / "clean_testset_wav", "a.wav", np.zeros(10))
    with pytest.raises(ValueError, match=r"missing \['b.wav'\]"):
        speech.load_voicebank_demand(tmp_path)
    _write(tmp_path / "clean_testset_wav", "b.wav", np.zeros(12))
    with pytest.raises(ValueError, match="b.wav differ in sample rate or length"):
        speech.load_voicebank_demand(tmp_path)
    with pytest.raises(ValueError, match="split"):
        speech.load_voicebank_demand(tmp_path, "dev")


def test_wsj0_2mix_layout_and_clip_cutting(tmp_path):
    s1, s2 = np.linspace(-0.5, 0.5, 10), np.linspace(0.3, -0.3, 10)
    for folder, x in (("mix", s1 + s2), ("s1", s1), ("s2", s2)):
        _write(tmp_path / "tt" / folder, "m.wav", x)
    (u,) = speech.load_wsj0_2mix(tmp_path, "tt")
    np.testing.assert_allclose(u.sources, np.stack([s1, s2]), atol=1 / 32768)
    clips = speech.cut_clips([u], 4, 8000)  # samples 0-3, 4-7; the last 2 dropped
    assert clips.mixture.shape == (2, 4) and clips.sources.shape == (2, 2, 4)
    np.testing.assert_allclose(clips.sources[1, 0], s1[4:8], atol=1 / 32768)
    short = speech.cut_clips([u], 16, 8000)  # one zero-padded clip
    assert short.mixture.shape == (1, 16) and np.all(short.mixture[0, 10:] == 0)
    with pytest.raises(ValueError, match="sample_rate: m.wav is at 8000 Hz, expected 16000 Hz"):
        speech.cut_clips([u], 4, 16000)
