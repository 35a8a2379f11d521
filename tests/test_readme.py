"""The README cannot rot: every shell command in its ``bash`` blocks runs here in a quick
variant (the same entry point with a tiny step count, or ``make -n`` for the targets that
would run this suite again or install the PyTorch peers), and every ``python`` block is
one of the scripts in ``examples/`` verbatim, which ``tests/train/test_examples.py`` runs.
A README command without a quick variant below fails the test, so a new command must
come with one.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PY = sys.executable
FAST = "--set steps=2 --set eval_every=2 --set checkpoint_every=2 --set log_every=1"
#: MQAR trains and evaluates at one shape, not three: each shape is a compile of the model.
MQAR_FAST = FAST + " --set 'train_shapes=((64, 4),)' --set 'eval_shapes=((64, 4),)'"

HYBRID_THEN_REPORT = ('{py} -m experiments mqar --model "gated_deltanet*3,attention" --out {out} ' + MQAR_FAST
                      + " && {py} -m experiments.report --runs {out}")

#: README command -> the quick variant this test runs ({py}: this interpreter, {out}: a
#: temporary run folder). Make targets that run the test suite itself are dry-run.
QUICK_VARIANTS = {
    # one of the suite's three models: the entry point and its table are the same, the
    # three trainings cost a minute (every mixer trains in test_train's slow tier)
    "make suite": "make suite PY={py} SUITE_ARGS='--out {out} --model attention " + FAST + "'",
    "make test": "make -n test",
    "make test-quick": "make -n test-quick",
    "make test-slow": "make -n test-slow",
    "make test-targets": "make -n test-targets",
    "make demo": "{py} -m experiments.demo --t 64 --reps 1",
    "make notebooks": "make -n notebooks",  # test_notebooks.py runs each notebook
    "make speed": "make -n speed",
    "make results": "make -n results",
    "make peers": "make -n peers",
    ".venv/bin/python -m experiments --help": "{py} -m experiments --help",
    '.venv/bin/python -m experiments mqar --model "gated_deltanet*3,attention" --set steps=500': HYBRID_THEN_REPORT,
    ".venv/bin/python -m experiments mqar --model gla --sweep lr=1e-3,3e-3,1e-2":
        "{py} -m experiments mqar --model gla --quiet --out {out} " + MQAR_FAST + " --sweep lr=1e-3",  # test_sweep: more values
    # the report needs a run to report on: the hybrid's (one variant serves both commands)
    ".venv/bin/python -m experiments.report --runs runs": HYBRID_THEN_REPORT,
    ".venv/bin/python -m experiments.speed --quick": "{py} -m experiments.speed --quick --ops linear_scan "
                                                     "--lengths 64 --reps 1 --no-comparison --out {out}/speed.json",
    ".venv/bin/python -m experiments.speed --peers": "{py} -m experiments.bench.peers --help",
    ".venv/bin/python -m experiments.speed --backend gpu": "{py} -m experiments.speed_gpu --help",
    ".venv/bin/python -m experiments.layer_speed": "{py} -m experiments.layer_speed --layers s4d --t 16 --b 1 "
                                                   "--d 8 --reps 1 --hybrid ''",
    ".venv/bin/python -m experiments.kernel_report": "{py} -m experiments.kernel_report --help",
    # tests/experiments/test_step_speed.py runs it at a tiny shape
    ".venv/bin/python -m experiments.step_speed": "{py} -m experiments.step_speed --help",
    # real data (../shared/data) is not assumed here: their CLIs are checked, and each
    # protocol runs end to end on tiny files in tests/experiments/test_{ltsf,dynamics,lm}.py
    ".venv/bin/python -m experiments ltsf --model dlinear --data ETTh1 --set horizon=96 --set epochs=1":
        "{py} -m experiments ltsf --help",
    ".venv/bin/python -m experiments dynamics --system ks --model lstm": "{py} -m experiments dynamics --help",
    ".venv/bin/python -m experiments lm --model attention": "{py} -m experiments --help",
    "make results-forecasting": "make -n results-forecasting",
    "make results-lm": "make -n results-lm",
    # sequence classification: every experiment runs end to end on generated or tiny files
    # in tests/experiments/test_classification.py; here the targets and the CLI are checked
    "make mnist": "make -n mnist",
    ".venv/bin/python -m experiments smnist --model s4d": "{py} -m experiments --help",
    ".venv/bin/python -m experiments mqar --model gla --mesh data=1 --dry-run":
        "{py} -m experiments mqar --model gla --mesh data=1 --dry-run",
    # multi-host: the same command on every host; here one process joins a one-process job
    # through a loopback coordinator (tests/distributed/test_multihost.py runs two)
    'gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd ssmjax && .venv/bin/python -m experiments mqar '
    '--model gla --mesh data=-1"': "{py} -m experiments mqar --model gla --mesh data=-1 --dry-run",
    "srun --nodes=2 --ntasks-per-node=1 .venv/bin/python -m experiments mqar --model gla --mesh data=-1":
        "{py} -m experiments mqar --model gla --mesh data=-1 --dry-run",
    ".venv/bin/python -m experiments mqar --model gla --mesh data=-1 --coordinator 10.0.0.1:1234 --num-processes 2 "
    "--process-id 0": "{py} -m experiments mqar --model gla --mesh data=-1 --dry-run --coordinator 127.0.0.1:{port} "
                      "--num-processes 1 --process-id 0",
}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks, without trailing comments."""
    lines = (line.split("  #")[0].strip() for block in _blocks("bash") for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: str, cwd: Path) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"


def test_every_readme_command_has_a_quick_variant():
    missing = [c for c in readme_commands() if c not in QUICK_VARIANTS]
    assert not missing, f"README commands without a quick variant in tests/test_readme.py: {missing}"


def quick_variants() -> list[str]:
    """The quick variants of the README's commands, each once (several commands share
    one, e.g. ``--help`` of the same entry point)."""
    return list(dict.fromkeys(QUICK_VARIANTS[c] for c in readme_commands() if c in QUICK_VARIANTS))


@pytest.mark.parametrize("variant", quick_variants())
def test_readme_command_runs(variant, tmp_path):
    _run(variant.format(py=PY, out=tmp_path / "runs", port=_free_port()), ROOT)


def test_readme_python_blocks_are_the_tested_examples():
    examples = {path.read_text(): path.name for path in (ROOT / "examples").glob("*.py")}
    blocks = _blocks("python")
    assert blocks, "the README shows the examples"
    for block in blocks:
        assert block in examples, f"a README python block is not an examples/ script verbatim:\n{block[:300]}"
