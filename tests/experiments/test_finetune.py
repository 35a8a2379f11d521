"""The finetune experiment end to end at tiny size: one pretraining run shared by the
methods, each method's result.json (parameter counts, bits/char before and after), the
report table, and the CLI's errors."""

import json

import pytest

from experiments import protocols
from experiments.__main__ import main
from experiments.finetune import report_section

TINY = ["d_model=16", "n_layers=1", "seq_len=8", "batch_size=4", "eval_windows=2", "eval_batch_size=4", "steps=2",
        "pretrain_steps=2", "warmup_steps=1", "log_every=1"]


def tiny_args(tmp_path, *extra):
    (tmp_path / "tiny.txt").write_text("ROMEO:\nthe cat sat on the mat.\n\nJULIET:\nwhat a fine day, my lord.\n\n" * 12)
    sets = [*TINY, f"data_dir={tmp_path}", "data_file=tiny.txt", *extra]
    return ["finetune", "--model", "attention", "--out", str(tmp_path / "runs"), "--quiet",
            *[f"--set={s}" for s in sets]]


@pytest.mark.slow  # ~13 s; the methods themselves are tests/train/test_finetune.py
def test_finetune_runs_every_method_on_one_pretrained_model(tmp_path):
    assert "finetune" in protocols.PROTOCOLS
    counts = {}
    for method in ("lora", "adapters", "partial"):
        assert main(tiny_args(tmp_path, f"method={method}")) == 0
        result = json.loads((tmp_path / "runs" / "finetune" / f"attention-{method}" / "result.json").read_text())
        assert result["status"] == "done" and result["step"] == 2 and result["method"] == method
        assert result["eval"]["bits_per_char"] > 0 and result["zero_shot_bpc"] > 0
        counts[method] = result["parameters"]
        if method == "lora":
            pretrain_result = tmp_path / "runs" / "finetune" / "attention-pretrain" / "result.json"
            stamp = pretrain_result.stat().st_mtime_ns
    assert pretrain_result.stat().st_mtime_ns == stamp  # the later methods reused the pretrained run
    pretrained = counts["lora"]["pretrained"]
    assert all(c["pretrained"] == pretrained for c in counts.values())
    # LoRA r = 4 on q, k, v, out of one attention layer (d = 16): 4 x (16 x 4 + 4 x 16)
    assert counts["lora"]["trainable"] == counts["lora"]["added"] == 4 * (16 * 4 + 4 * 16)
    assert counts["partial"]["added"] == 0 and 0 < counts["partial"]["trainable"] < pretrained
    table = report_section([p for p in (tmp_path / "runs" / "finetune").iterdir()], tmp_path)
    assert table.count("| attention |") == 3 and "pretrain" not in table.split("\n", 1)[1]


def test_finetune_cli_rejects_an_unknown_method(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(tiny_args(tmp_path, "method=prefix", "pretrain_steps=1"))
    assert "method: expected one of" in capsys.readouterr().err
