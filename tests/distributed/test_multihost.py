"""Multi-process jobs (ssmjax.distributed.launch) and training across two processes.

The layout rules (explicit arguments, then ``SSMJAX_*`` variables, then a cluster that
``jax.distributed`` detects) are tested on fake environments. The two-process case runs
``tests/distributed/multihost_case.py`` twice with a loopback coordinator (4 CPU devices
each, gloo collectives, a ``data=8`` mesh over the 8 global devices, rows fed per
process) and once as one process with 8 devices, and compares the training losses and
every parameter after two AdamW steps."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ssmjax.distributed import launch
from ssmjax.distributed.launch import Layout, check_layout, detect_cluster, initialize, layout_from

ROOT = Path(__file__).resolve().parents[2]
LR = 3e-3  # multihost_case's learning rate
SLURM = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0")


def test_explicit_layout_wins_over_the_environment():
    env = {"SSMJAX_COORDINATOR": "h:1", "SSMJAX_NUM_PROCESSES": "4", "SSMJAX_PROCESS_ID": "3", **SLURM}
    assert layout_from("10.0.0.1:1234", 2, 1, environ=env) == ("explicit", Layout("10.0.0.1:1234", 2, 1))
    assert layout_from(environ=env) == ("environment", Layout("h:1", 4, 3))
    assert layout_from(environ=SLURM) == ("slurm", None)
    assert layout_from(environ={"TPU_SKIP_MDS_QUERY": "1"}) == ("none", None)


@pytest.mark.parametrize("args, match", [
    (("h:1", None, None), "num_processes, process_id: missing; given coordinator"),
    ((None, 2, 0), "coordinator: missing"),
    (("h:1", 2, None), "process_id: missing"),
])
def test_partial_explicit_layout_names_what_is_missing(args, match):
    with pytest.raises(ValueError, match=match):
        layout_from(*args, environ={})
    with pytest.raises(ValueError, match=match):
        initialize(*args)


def test_partial_environment_names_the_missing_variables():
    with pytest.raises(ValueError, match="SSMJAX_NUM_PROCESSES, SSMJAX_PROCESS_ID: missing; the environment sets "
                                         "SSMJAX_COORDINATOR"):
        layout_from(environ={"SSMJAX_COORDINATOR": "h:1"})


@pytest.mark.parametrize("args, match", [
    (("no-port", 2, 0), "coordinator: expected HOST:PORT"), ((":80", 2, 0), "HOST:PORT"),
    (("h:70000", 2, 0), "port in"), (("h:1", 0, 0), "num_processes: expected >= 1"),
    (("h:1", 2, 2), r"process_id: expected an id in \[0, 2\)"),
    (("h:1", "two", 0), "num_processes: expected an integer"),
])
def test_malformed_layouts(args, match):
    with pytest.raises(ValueError, match=match):
        check_layout(*args)


def test_cluster_detection_follows_jax():
    no_tpu = {"TPU_SKIP_MDS_QUERY": "1"}  # what `import jax` sets on a machine without TPU chips
    assert detect_cluster(SLURM) == "slurm"
    assert detect_cluster({**SLURM, "SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    sbatch_shell = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}  # outside srun
    assert detect_cluster(sbatch_shell | no_tpu) is None
    ompi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}
    assert detect_cluster(ompi) == "ompi"
    assert detect_cluster(ompi | {"OMPI_COMM_WORLD_SIZE": "1"} | no_tpu) is None
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == "gketpu"
    assert detect_cluster(no_tpu) is None


def test_libtpu_without_tpu_chips_is_no_cluster(monkeypatch):
    # libtpu comes with jax[tpu] (the target-compile toolchain): without chips on the PCI
    # bus it must not send jax looking for a TPU VM's metadata (which logs errors)
    libtpu = {"TPU_LIBRARY_PATH": "/usr/lib/libtpu.so"}
    monkeypatch.setattr(launch, "_tpu_chips_present", lambda: False)
    assert detect_cluster(libtpu) is None
    monkeypatch.setattr(launch, "_tpu_chips_present", lambda: True)
    assert detect_cluster(libtpu) == "tpu"
    assert detect_cluster(libtpu | {"TPU_SKIP_MDS_QUERY": "1"}) is None


def test_single_machine_is_a_no_op(monkeypatch):
    for name in (*launch.ENV_VARS, *launch.SLURM_VARS, launch.OMPI_URI, *launch.TPU_WORKER_VARS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # what `import jax` sets without TPU chips
    assert jax.devices()  # the backend is up: jax.distributed.initialize would refuse now
    assert initialize() is False
    assert initialize() is False
    assert not jax.distributed.is_initialized()


def test_cli_rejects_a_partial_layout(capsys):
    from experiments.__main__ import main

    with pytest.raises(SystemExit):
        main(["mqar", "--model", "attention", "--coordinator", "127.0.0.1:1234", "--process-id", "0"])
    assert "num_processes: missing" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_json(stdout: str) -> dict:
    # gloo prints its connection lines to stdout (not always ending them): take the last object.
    return json.loads(stdout[stdout.rindex('{"joined"'):].splitlines()[0])


def _run_processes(out: Path, num_processes: int, timeout: float = 300) -> list[dict]:
    """Start ``num_processes`` copies of the case (one job), wait, and return their JSON;
    kill every one of them on a timeout or when one fails."""
    port = _free_port()
    command = [sys.executable, "-m", "tests.distributed.multihost_case", "--out", str(out)]
    if num_processes > 1:
        command += ["--num-processes", str(num_processes), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen(command + (["--process-id", str(i)] if num_processes > 1 else []), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    return [_last_json(stdout) for stdout, _ in outputs]


# Slow: two processes, then a reference process, each compiling a training step (about
# 35 s on 2 cores).
@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    job = _run_processes(tmp_path / "two", 2)
    (single,) = _run_processes(tmp_path / "one", 1)
    assert [(r["process_index"], r["process_count"], r["local_devices"], r["devices"]) for r in job] == [
        (0, 2, 4, 8), (1, 2, 4, 8)]
    assert all(r["joined"] and r["again"] for r in job) and not (single["joined"] or single["again"])
    reference = [losses[0] for losses in single["losses"]]
    assert len(reference) == 2
    for result in job:
        for step, losses in enumerate(result["losses"]):
            assert len(losses) == 1  # process 0 alone writes the shared metrics file
            np.testing.assert_allclose(losses, reference[step], rtol=1e-5)
    expected = np.load(tmp_path / "one" / "process0.npz")
    for i in range(2):
        got = np.load(tmp_path / "two" / f"process{i}.npz")
        assert sorted(got.files) == sorted(expected.files)
        for name in expected.files:
            # AdamW's first steps move each coordinate by about lr: float32 rounding of
            # the gradient shows in the parameters scaled by lr / |gradient| (as test_mesh).
            np.testing.assert_allclose(got[name], expected[name], atol=0.02 * LR, rtol=0, err_msg=name)
