"""The raptor protocol (experiments/raptor.py): a tiny end-to-end run into result.json (slow:
it reads MNIST and compiles a ViT and two Raptors), the report section and its similarity
figure from a written result, and argument errors."""

import json

import numpy as np
import pytest

from experiments import raptor

TINY = ["d_model=8", "n_layers=3", "num_heads=2", "patch_size=14", "steps=2", "batch_size=16", "val_rows=16",
        "analysis_rows=8", "ks=(1, 2)", "raptor_step_ratio=1.0"]


def _args(tmp_path, items, name=None):
    args = ["--model", "attention", "--out", str(tmp_path), "--quiet"] + [a for s in items for a in ("--set", s)]
    return args + (["--name", name] if name else [])


@pytest.mark.slow  # ~40 s: MNIST, a ViT and two Raptors compiled
def test_end_to_end(tmp_path):
    assert raptor.main(_args(tmp_path, TINY)) == 0
    run_dir = tmp_path / "raptor" / "attention"
    result = json.loads((run_dir / "result.json").read_text())
    similarity = np.asarray(result["similarity"])
    assert similarity.shape == (4, 4) and np.allclose(np.diag(similarity), 1) and np.allclose(similarity, similarity.T)
    assert 0 <= result["vit"]["accuracy"] <= 1 and 0 <= result["vit"]["head_on_a0_accuracy"] <= 1
    assert result["vit"]["updates"] == 2
    assert [(r["k"], sum(r["phases"]), len(r["phases"])) for r in result["raptors"]] == [(1, 3, 1), (2, 3, 2)]
    for r in result["raptors"]:
        assert r["updates"] == 4 and len(r["r2_layers"]) == 3 and 0 <= r["agreement"] <= 1
        assert r["recovery"] == pytest.approx(r["accuracy"] / result["vit"]["accuracy"])
    assert result["raptors"][1]["params"] == 2 * result["raptors"][0]["params"]
    section = raptor.report_section([run_dir], tmp_path / "figures")
    assert "| Raptor, k = 2 |" in section and (tmp_path / "figures" / "raptor_attention_similarity.png").exists()


def test_report_renders_a_written_run(tmp_path):
    run_dir = tmp_path / "raptor" / "attention"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(dict(experiment="raptor", model="attention", size="cpu",
                                                         config=dict(n_layers=2, d_model=8, patch_size=7,
                                                                     drop_path=0.1, steps=10))))
    rows = [dict(k=1, phases=[2], block_fit=0.0, params=100, accuracy=0.5, recovery=0.625, agreement=0.55,
                 r2_final=0.25, updates=6)]
    vit = dict(params=300, accuracy=0.8, head_on_a0_accuracy=0.2)
    (run_dir / "result.json").write_text(json.dumps(dict(experiment="raptor", vit=vit, similarity=np.eye(3).tolist(),
                                                         raptors=rows)))
    section = raptor.report_section([run_dir, tmp_path], tmp_path / "figs")
    assert "| ViT, L = 2 untied blocks | - | - | 300 | 0.8000 | 1 | 1 | 1 |" in section
    assert "| no blocks: the ViT's head on a_0 | - | - | - | 0.2000 | 0.250 | - | - |" in section
    assert "| Raptor, k = 1 | 2 | 0.000 | 100 | 0.5000 | 0.625 | 0.550 | 0.250 |" in section
    assert "10 ViT updates, 6 Raptor updates" in section
    assert "Jacobs" in section and "![layer similarity of attention](figs/raptor_attention_similarity.png)" in section
    assert (tmp_path / "figs" / "raptor_attention_similarity.png").stat().st_size > 0
    assert raptor.report_section([tmp_path], tmp_path / "figs") == ""


@pytest.mark.parametrize("bad, message", [("ks=(0,)", "ks"), ("ks=(9,)", "ks"), ("patch_size=5", "patch_size"),
                                          ("num_heads=3", "num_heads"), ("cls_weight=2.0", "cls_weight"),
                                          ("pooling=max", "pooling"), ("raptor_step_ratio=0.0", "raptor_step_ratio")])
def test_bad_settings_are_rejected(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit):
        raptor.main(_args(tmp_path, [bad], name="bad"))
    assert f"error: {message}:" in capsys.readouterr().err
