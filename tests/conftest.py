"""Test-wide setup: float64 oracles and runtime shape checking of ssmjax annotations.

* ``jax_enable_x64`` so oracle comparisons measure the algorithm, not rounding; tests
  that check float32 behaviour ask for float32 explicitly.
* The jaxtyping + beartype import hook checks every jaxtyping annotation in ``ssmjax``
  and ``pallas_kernels`` at call time (tests only, never the hot path). Public scan
  functions take ``ArrayLike`` and raise their own ``ValueError`` on bad shapes; the
  internal cores they call carry the dimension-named annotations that are checked here.
* LLVM ``-O0`` for XLA's CPU code (compile time dominates these small programs).
* ``method="auto"`` stages the CPU branch only (``SSMJAX_STAGE_PLATFORMS=cpu``, read when
  ``ssmjax`` is imported): tracing every accelerator's kernel branch on this CPU host
  would slow every test; tests that check an accelerator's branch opt in with
  ``ssmjax.scan.staged_platforms(...)``.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("SSMJAX_STAGE_PLATFORMS", "cpu")
# LLVM at -O0 for the CPU code XLA emits: the tests' programs are small and compile-bound,
# and -O0 cuts the suite's CPU time by about a third. XLA's HLO passes (fusion, layout,
# the collectives the distributed tests count) are unchanged; results may differ from -O2
# in the last bits (vectorised reductions), so every process of a test must use the same
# setting: subprocesses inherit this environment or import this module.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"

import jax  # noqa: E402
from jaxtyping import install_import_hook  # noqa: E402

jax.config.update("jax_enable_x64", True)
_shape_check_hook = install_import_hook(["ssmjax", "pallas_kernels"], "beartype.beartype")
