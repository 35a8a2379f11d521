"""Test-wide setup: float64 oracles and runtime shape checking of ssmjax annotations.

* ``jax_enable_x64`` so oracle comparisons measure the algorithm, not rounding; tests
  that check float32 behaviour ask for float32 explicitly.
* The jaxtyping + beartype import hook checks every jaxtyping annotation in ``ssmjax``
  and ``pallas_kernels`` at call time (tests only, never the hot path). Public scan
  functions take ``ArrayLike`` and raise their own ``ValueError`` on bad shapes; the
  internal cores they call carry the dimension-named annotations that are checked here.
* Compile time dominates these small programs, so XLA's CPU backend compiles for speed of
  compilation: LLVM ``-O0`` and the classic (LLVM IR) fusion emitter instead of the MLIR
  fusion emitters; and one persistent compilation cache per test run, shared by the xdist
  workers and every subprocess a test starts, so a program compiled twice (the same model
  in a README command, a CLI test and a notebook) is compiled once.
* ``method="auto"`` stages the CPU branch only (``SSMJAX_STAGE_PLATFORMS=cpu``, read when
  ``ssmjax`` is imported): tracing every accelerator's kernel branch on this CPU host
  would slow every test; tests that check an accelerator's branch opt in with
  ``ssmjax.scan.staged_platforms(...)``.
"""

import atexit
import os
import platform
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("SSMJAX_STAGE_PLATFORMS", "cpu")
# XLA's CPU code generation is tuned for compile time: the tests' programs are small and
# compile-bound. XLA's HLO passes (fusion, layout, the collectives the distributed tests
# count) are unchanged; every process of a test must use the same flags (results may
# differ in the last bits), so subprocesses inherit this environment or import this module.
# * LLVM at -O0 cuts the suite's CPU time by about a third.
# * The classic (LLVM IR) fusion emitter instead of the MLIR fusion emitters, XLA's
#   default, cuts it by about a third again (the whole `make test` 1270 s -> 610 s).
# * No FMA (ISA capped at AVX): at -O0 LLVM contracts a*b+c into an FMA in vector code but
#   not in scalar code, so the same arithmetic rounded differently with the tiling (a
#   Pallas kernel interpreted at two block sizes differed in the last bit); without FMA
#   every path rounds each product, as the kernels' bit-for-bit invariance tests expect.
#   (x86 only; other hosts keep their default ISA.)
_X86 = platform.machine().lower() in ("x86_64", "amd64")  # the ISA cap is an x86 name
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    + (" --xla_cpu_max_isa=AVX" if _X86 else "")
)
# A cache that starts empty for every run (a fresh clone's timing) and is removed at its
# end; the first process to import this module creates it, the others inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE = tempfile.mkdtemp(prefix="ssmjax-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, _RUN_CACHE, ignore_errors=True)

import jax  # noqa: E402
from jaxtyping import install_import_hook  # noqa: E402

jax.config.update("jax_enable_x64", True)
_shape_check_hook = install_import_hook(["ssmjax", "pallas_kernels"], "beartype.beartype")
