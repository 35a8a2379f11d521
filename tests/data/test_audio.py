"""The generated audio set, the WAV reader and writer, and the STFT / log-mel spectrogram."""

import wave

import numpy as np
import pytest

from ssmjax.data import audio

RATE = 8000


def dominant_hz(x, rate=RATE):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * rate / len(x)


def test_make_clips_is_seeded_balanced_and_prefix_stable():
    clips = audio.make_clips(15, seed=3, duration=0.1)
    assert clips.audio.shape == (15, 800) and clips.audio.dtype == np.float32
    assert clips.classes == audio.CLASSES and clips.sample_rate == RATE
    assert np.abs(clips.audio).max() <= 1.0
    counts = np.bincount(clips.labels, minlength=7)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 15
    np.testing.assert_array_equal(audio.make_clips(15, seed=3, duration=0.1).audio, clips.audio)
    np.testing.assert_array_equal(audio.make_clips(9, seed=3, duration=0.1).audio, clips.audio[:9])  # a prefix
    assert not np.allclose(audio.make_clips(15, seed=4, duration=0.1).audio, clips.audio)


def test_clip_classes_sound_like_their_names():
    """Nearly noise-free clips: a tone in its range, chirps sweep up / down, /i/ (F2 2290 Hz)
    has more energy above 1.5 kHz than /u/ (F2 870 Hz)."""
    clips = audio.make_clips(7 * 4, seed=1, snr_db=(60.0, 60.0))
    for x, label in zip(clips.audio, clips.labels):
        name = audio.CLASSES[label]
        active = np.flatnonzero(np.abs(x) > 1e-2 * np.abs(x).max())
        event = x[active[0]:active[-1] + 1]
        if name == "tone":
            assert audio.TONE_HZ[0] - 20 <= dominant_hz(event) <= audio.TONE_HZ[1] + 20
        elif name.startswith("chirp"):
            quarter = len(event) // 4
            rising = dominant_hz(event[-quarter:]) > 1.5 * dominant_hz(event[:quarter])
            falling = dominant_hz(event[:quarter]) > 1.5 * dominant_hz(event[-quarter:])
            assert rising if name == "chirp_up" else falling, name
    power = np.abs(np.fft.rfft(clips.audio, axis=1)) ** 2
    high = power[:, len(power[0]) * 1500 // (RATE // 2):].sum(1) / power.sum(1)
    vowel = lambda name: high[clips.labels == audio.CLASSES.index(name)]  # noqa: E731
    assert vowel("vowel_i").min() > vowel("vowel_u").max()


def test_resonator_impulse_response_solves_the_recurrence():
    h = audio.resonator_impulse_response(700.0, 90.0, RATE)
    theta, r = 2 * np.pi * 700 / RATE, np.exp(-np.pi * 90 / RATE)
    y = np.zeros(len(h))
    for n in range(len(h)):  # y[n] = x[n] + 2 r cos(theta) y[n-1] - r^2 y[n-2], x = unit impulse
        y[n] = (n == 0) + 2 * r * np.cos(theta) * (y[n - 1] if n else 0) - r * r * (y[n - 2] if n > 1 else 0)
    np.testing.assert_allclose(h, y, atol=1e-12)
    assert r ** len(h) < 1e-4 <= r ** (len(h) - 1)


def test_make_clips_errors():
    with pytest.raises(ValueError, match="snr_db"):
        audio.make_clips(2, snr_db=(10.0, 0.0))
    with pytest.raises(ValueError, match="duration"):
        audio.make_clips(2, duration=0.001)
    with pytest.raises(ValueError, match="n: expected a positive int"):
        audio.make_clips(0)
    with pytest.raises(ValueError, match="sample_rate: expected >= 8000 Hz"):
        audio.make_clips(2, sample_rate=4000)


def test_stft_matches_numpy_fft_of_each_windowed_frame():
    x = np.random.default_rng(0).standard_normal((2, 300))
    length, hop = 64, 20
    real, imag = audio.stft(x, length, hop)
    window = np.hanning(length + 1)[:-1]  # periodic Hann
    np.testing.assert_allclose(audio.hann_window(length), window, atol=1e-15)
    frames = 1 + (300 - length) // hop
    expected = np.stack([[np.fft.rfft(window * row[m * hop:m * hop + length]) for m in range(frames)] for row in x])
    assert real.shape == (2, frames, length // 2 + 1) and real.dtype == np.float64
    np.testing.assert_allclose(np.asarray(real), expected.real, atol=1e-10)
    np.testing.assert_allclose(np.asarray(imag), expected.imag, atol=1e-10)
    with pytest.raises(ValueError, match="frame_length: 400 is longer than the signal"):
        audio.stft(x, 400, hop)


def test_log_mel_of_a_tone_peaks_in_the_band_nearest_the_tone():
    weights = audio.mel_filterbank(24, 256, RATE)
    assert weights.shape == (129, 24) and weights.min() == 0 and np.all(weights.max(0) > 0.5)
    centres = audio.mel_to_hz(np.linspace(0, audio.hz_to_mel(RATE / 2), 26))[1:-1]
    for hz in (300.0, 1234.0, 3100.0):
        tone = np.sin(2 * np.pi * hz * np.arange(2000) / RATE)
        spec = np.asarray(audio.log_mel_spectrogram(tone, RATE, 256, 80, 24))
        assert spec.shape == (1 + (2000 - 256) // 80, 24)
        assert np.argmax(spec.mean(0)) == np.argmin(np.abs(centres - hz))
    with pytest.raises(ValueError, match="n_mels: 128 mel bands"):
        audio.mel_filterbank(128, 256, RATE)


def write_raw_wav(path, frames: bytes, channels=1, width=2, rate=RATE):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(frames)


def test_wav_round_trip(tmp_path):
    x = np.array([0.0, 0.5, -0.5, 0.999, -1.0, 1.7, -3.0])
    audio.write_wav(tmp_path / "a.wav", x, 16000)
    y, rate = audio.read_wav(tmp_path / "a.wav")
    assert rate == 16000 and y.dtype == np.float32
    np.testing.assert_allclose(y, np.clip(x, -1, 32767 / 32768), atol=0.5 / 32768)


def test_load_wav_folder_reads_labels_from_folders(tmp_path):
    clips = audio.make_clips(4, seed=0, duration=0.05)
    for i, name in enumerate(["b_dog", "b_dog", "a_cat"]):
        (tmp_path / name).mkdir(exist_ok=True)
        audio.write_wav(tmp_path / name / f"{i}.wav", clips.audio[i][:400 - 100 * i], RATE)
    (tmp_path / "notes").mkdir()  # a folder without WAVs is not a class
    data = audio.load_wav_folder(tmp_path)
    assert data.classes == ("a_cat", "b_dog") and data.labels.tolist() == [0, 1, 1]
    assert data.audio.shape == (3, 400) and data.sample_rate == RATE  # padded to the longest clip
    np.testing.assert_allclose(data.audio[1], clips.audio[0], atol=1 / 32768)
    assert np.all(data.audio[0, 200:] == 0)  # a_cat/2.wav had 200 samples
    assert audio.load_wav_folder(tmp_path, duration=0.01).audio.shape == (3, 80)


def test_wav_errors_name_the_file(tmp_path):
    write_raw_wav(tmp_path / "stereo.wav", b"\0\0" * 8, channels=2)
    with pytest.raises(ValueError, match="stereo.wav: expected 16-bit PCM mono, got 16-bit with 2 channels"):
        audio.read_wav(tmp_path / "stereo.wav")
    write_raw_wav(tmp_path / "8bit.wav", b"\x80" * 8, width=1)
    with pytest.raises(ValueError, match="8bit.wav: expected 16-bit PCM mono, got 8-bit"):
        audio.read_wav(tmp_path / "8bit.wav")
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(ValueError, match="text.wav is not a PCM WAV file"):
        audio.read_wav(tmp_path / "text.wav")
    with pytest.raises(ValueError, match="is not a folder"):
        audio.load_wav_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no <label>/\\*.wav files"):
        audio.load_wav_folder(tmp_path)  # WAVs at the top level are not in label folders
    for name, rate in (("x", 8000), ("y", 16000)):
        (tmp_path / name).mkdir()
        audio.write_wav(tmp_path / name / "c.wav", np.zeros(4), rate)
    with pytest.raises(ValueError, match="one sample rate, got 8000 Hz .*16000 Hz"):
        audio.load_wav_folder(tmp_path)
