"""The speech protocols (`python -m experiments.frcrn` / `experiments.mossformer2`): tiny
end-to-end runs (result.json rows, the report sections), their data on real-folder layouts
written here, the optional perceptual metrics, and argument errors."""

import importlib.util
import json

import numpy as np
import pytest

from experiments import frcrn, mossformer2
from ssmjax.data import speech
from ssmjax.data.audio import write_wav

COMMON = ["steps=2", "batch_size=2", "train_clips=4", "val_clips=2", "test_clips=2", "clip_seconds=0.02"]
FRCRN_TINY = COMMON + ["n_fft=16", "hop=8", "channels=2", "n_layers=1", "frequency_memory=2", "temporal_memory=2",
                       "fsmn_hidden=4"]
MOSSFORMER2_TINY = COMMON + ["enc_channels=4", "enc_kernel=4", "d_model=4", "n_blocks=1", "qk_dim=4", "group_size=8",
                             "conv_size=3"]


def _args(tmp_path, items):
    return ["--out", str(tmp_path), "--quiet"] + [a for s in items for a in ("--set", s)]


@pytest.mark.slow  # trains and scores two tiny FRCRN variants (~15 s of compilation)
def test_frcrn_end_to_end(tmp_path):
    assert frcrn.main(_args(tmp_path, FRCRN_TINY)) == 0
    run_dir = tmp_path / "frcrn" / "deep_fsmn"
    result = json.loads((run_dir / "result.json").read_text())
    assert [m["variant"] for m in result["models"]] == ["noisy", "frcrn", "crn"]
    assert result["clips"] == dict(train=4, val=2, test=2)
    noisy, with_fr, without = result["models"]
    assert noisy["si_snri"] == 0.0 and noisy["params"] == 0
    assert with_fr["params"] > without["params"] and with_fr["updates"] == without["updates"] == 2
    for m in (with_fr, without):
        assert np.isfinite(m["si_snri"]) and len(m["history"]) == 1 and "pesq" in m and "stoi" in m
    section = frcrn.report_section([run_dir, tmp_path], tmp_path / "figures")
    assert "| `deep_fsmn` | frcrn |" in section and "| `deep_fsmn` | crn |" in section and "3.21" in section
    assert "`deep_fsmn`: frcrn - crn = " in section and "over 2 paired test clips" in section
    with pytest.raises(SystemExit):  # the run exists: --overwrite or --name
        frcrn.main(_args(tmp_path, FRCRN_TINY))


@pytest.mark.slow  # trains and scores two tiny separators (~15 s of compilation)
def test_mossformer2_end_to_end(tmp_path):
    assert mossformer2.main(_args(tmp_path, MOSSFORMER2_TINY)) == 0
    run_dir = tmp_path / "mossformer2" / "fsmn"
    result = json.loads((run_dir / "result.json").read_text())
    assert [m["variant"] for m in result["models"]] == ["mixture", "mossformer2", "mossformer"]
    assert result["models"][1]["params"] > result["models"][2]["params"]
    assert all(np.isfinite(m["si_snri"]) for m in result["models"])
    section = mossformer2.report_section([run_dir], tmp_path / "figures")
    assert "| `fsmn` | mossformer2 |" in section and "24.1" in section and "mossformer2 - mossformer = " in section


@pytest.mark.parametrize("module, bad", [
    (frcrn, ["variants=('frcrn', 'dccrn')"]), (frcrn, ["clip_seconds=0.001"]), (mossformer2, ["variants=()"]),
    (mossformer2, ["d_model=5"]), (frcrn, ["nope=1"]),
])
def test_bad_settings(module, bad, tmp_path, capsys):
    with pytest.raises(SystemExit):
        module.main(_args(tmp_path, bad + ["steps=1"]))
    assert "error" in capsys.readouterr().err


def test_bad_model_names(tmp_path, capsys):
    for module in (frcrn, mossformer2):
        with pytest.raises(SystemExit):
            module.main(["--model", "not_a_mixer", *_args(tmp_path, ["steps=1"])])
        assert "model: expected" in capsys.readouterr().err


def _folder(path, names, signal):
    path.mkdir(parents=True)
    for name in names:
        write_wav(path / name, signal, 8000)


def test_real_folder_data(tmp_path):
    signal = np.linspace(-0.5, 0.5, 40)
    for split in ("train", "test"):
        for folder in speech.VOICEBANK_FOLDERS[split]:
            _folder(tmp_path / "vb" / folder, [f"{split}{i}.wav" for i in range(5 if split == "train" else 2)], signal)
    config = frcrn.FRCRNConfig(data_dir=str(tmp_path / "vb"), clip_seconds=0.0025)  # 20-sample clips
    data = frcrn.make_data(config)
    assert {k: v.sources.shape for k, v in data.items()} == dict(train=(9, 1, 20), val=(1, 1, 20), test=(4, 1, 20))
    for split in speech.WSJ0_2MIX_SPLITS:
        for folder in ("mix", "s1", "s2"):
            _folder(tmp_path / "wsj" / split / folder, ["a.wav"], signal)
    data = mossformer2.make_data(mossformer2.MossFormer2Config(data_dir=str(tmp_path / "wsj"), clip_seconds=0.0025))
    assert {k: v.sources.shape for k, v in data.items()} == {k: (2, 2, 20) for k in speech.SPLITS}


@pytest.mark.skipif(importlib.util.find_spec("pesq") is not None or importlib.util.find_spec("pystoi") is not None,
                    reason="pesq or pystoi is installed")
def test_perceptual_metrics_are_reported_unavailable():
    pairs = speech.enhancement_set(1, 800)
    assert frcrn.perceptual_metrics(pairs.sources, pairs, 8000) == dict(pesq=None, stoi=None)
