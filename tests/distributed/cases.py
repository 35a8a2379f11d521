"""Running a ``*_cases.py`` script in a fresh process (the number of CPU devices is fixed
when JAX starts, so the mesh cases cannot run inside the pytest process), and counting the
collectives of a compiled program."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def use_host_devices(count: int) -> None:
    """Before JAX starts (a cases script's first lines, only when run as the script:
    importing one for its case lists must not change the importer's devices): ``count``
    simulated CPU devices, without YNNPACK fusions (with several host devices jaxlib
    0.10.2's YNN fusion of GLA's per-channel-decay einsums segfaults), and LLVM at -O0 as
    in the test session (tests/conftest.py)."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
                               " --xla_cpu_experimental_ynn_fusion_type= --xla_backend_optimization_level=0")
    os.environ["JAX_PLATFORMS"] = "cpu"


def run_cases(module: str, *args: str, timeout: float = 1800) -> dict:
    """``python -m module args`` from the repository root; its last stdout line, parsed as
    JSON (the test fails with the script's stderr when it exits non-zero)."""
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "reduce-scatter", "all-to-all")


def compiled_with_collectives(fn, inputs):
    """``(fn(inputs), {collective: count in the compiled program})``: one compilation, whose
    optimised HLO is read for each collective (and its asynchronous ``-start`` form)."""
    import jax  # in the cases scripts, after they set the device count

    compiled = jax.jit(fn).lower(inputs).compile()
    text = compiled.as_text()
    return compiled(inputs), {name: len(re.findall(re.escape(name) + r"(?:-start)?\(", text)) for name in COLLECTIVES}
