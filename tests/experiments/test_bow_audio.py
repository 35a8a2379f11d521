"""The bag-of-words audio protocol end to end on tiny data (a WAV folder; the generated set
with the SSM baselines is slow)."""

import json

import numpy as np
import pytest

from experiments import bow_audio
from ssmjax.data import audio

TINY = ["micro_codes=4", "macro_codes=3", "kmeans_iterations=2", "kmeans_points=100", "mlp_hidden=8", "steps=2",
        "batch_size=4", "patch=(4, 4)", "patch_stride=(4, 4)", "n_mels=8", "clip_seconds=0.1"]


def write_folder(root, per_class=6):
    """``per_class`` tones and rising chirps of 0.1 s as ``root/<class>/<i>.wav``."""
    clips = audio.make_clips(7 * per_class, seed=0, duration=0.1)
    for i, (x, label) in enumerate(zip(clips.audio, clips.labels)):
        if label < 2:
            folder = root / audio.CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            audio.write_wav(folder / f"{i}.wav", x, clips.sample_rate)


def test_bag_of_words_heads_on_a_wav_folder(tmp_path):
    write_folder(tmp_path / "wavs")
    argv = ["--out", str(tmp_path / "runs"), "--quiet", "--set", f"data_dir={tmp_path / 'wavs'}",
            "--set", "train_clips=(8,)", "--set", "ssm_inputs=()", *(a for s in TINY for a in ("--set", s))]
    assert bow_audio.main(argv) == 0
    run_dir = tmp_path / "runs" / "bow_audio" / "s4d"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["classes"] == ["chirp_up", "tone"] and result["clips"] == dict(train=9, val=1, test=2)
    assert [(m["method"], m["train_clips"]) for m in result["models"]] == [(h, 8) for h in bow_audio.BOW_HEADS]
    for m in result["models"]:
        assert 0 <= m["test_accuracy"] <= 1 and len(m["per_class_accuracy"]) == 2
    inertia = np.asarray(result["kmeans_inertia"]["8"]["micro"])
    assert inertia.shape == (2,) and inertia[1] <= inertia[0]
    section = bow_audio.report_section([run_dir], tmp_path / "figures")
    assert "**Paper finding.**" in section and "| bow_macro |" in section and "| 8 clips |" in section
    with pytest.raises(SystemExit):  # 10 > the 9 training clips of the folder
        bow_audio.main([*argv, "--set", "train_clips=(10,)", "--overwrite"])


def test_config_errors(tmp_path, capsys):
    for item, message in (("ssm_inputs=('mfcc',)", "ssm_inputs: expected one of"),
                          ("train_clips=(70, 14)", "train_clips: expected a non-empty increasing tuple"),
                          ("dynamic_range=0.0", "dynamic_range: expected > 0")):
        with pytest.raises(SystemExit):
            bow_audio.main(["--out", str(tmp_path), "--set", item])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bow_audio").exists()


@pytest.mark.slow
def test_generated_set_with_both_ssm_baselines(tmp_path):
    argv = ["--out", str(tmp_path), "--quiet", "--model", "lru", "--set", "train_clips=(14,)", "--set", "val_clips=7",
            "--set", "test_clips=7", "--set", "d_model=8", "--set", "n_layers=1",
            *(a for s in TINY for a in ("--set", s))]
    assert bow_audio.main(argv) == 0
    result = json.loads((tmp_path / "bow_audio" / "lru" / "result.json").read_text())
    assert [m["method"] for m in result["models"]] == [*bow_audio.BOW_HEADS, "lru_frames", "lru_logmel"]
    assert result["clips"] == dict(train=14, val=7, test=7) and len(result["classes"]) == 7
