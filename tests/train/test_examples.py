"""The two "Training on your own data" examples run end to end (2 steps each, in
parallel subprocesses) and print what they promise."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_both_examples_run_with_a_tiny_step_count(tmp_path):
    text = tmp_path / "my_text.txt"
    text.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40)
    commands = {
        "arrays": [sys.executable, str(EXAMPLES / "train_on_arrays.py"), "--steps", "2"],
        "text": [sys.executable, str(EXAMPLES / "train_on_text.py"), str(text), "--steps", "2", "--out", "lm"],
    }
    processes = {name: subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True) for name, command in commands.items()}
    outputs = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, f"{name}: {err[-3000:]}"
        outputs[name] = out
    assert re.search(r"step 2, validation: \{'loss': .*'perplexity': .*'accuracy': .*'count': 100\}", outputs["arrays"])
    result = json.loads((tmp_path / "runs" / "arrays" / "result.json").read_text())
    assert result["status"] == "done" and result["batch_size"] == 32
    nats, bits = map(float, re.search(r"validation: (\S+) nats/char = (\S+) bits/char", outputs["text"]).groups())
    assert abs(bits - nats / math.log(2)) < 2e-3 and 0 < nats < math.log(26) + 1
    assert json.loads((tmp_path / "lm" / "result.json").read_text())["step"] == 2
    after = outputs["text"].split(" bits/char\n", 1)[1]
    assert after.startswith("To be, or not to be, that is the") and len(after) > 32 + 200  # the prompt, 200 sampled
