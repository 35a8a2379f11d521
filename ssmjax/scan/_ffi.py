"""CPU kernels of the scan ops written in C++ and called through XLA's FFI
(:func:`jax.ffi.ffi_call`), built on first use.

A kernel's source lives next to this module (``_<name>.cc``, sharing ``_cpu_common.h``).
:func:`load` compiles it once per machine with the host's C++ compiler (``$CXX``, else
``c++``; ``-O3 -march=native``) against the FFI headers of the installed jaxlib, caches
the shared library under ``$SSMJAX_CACHE_DIR`` (default ``~/.cache/ssmjax``; the file name
hashes the sources, the flags, the compiler, jaxlib's version and the CPU), and registers
its handlers for the ``cpu`` platform. Without a compiler, or when the build fails, :func:`load` returns
``False`` (the reason in :func:`status`, logged once) and the ops keep their XLA
evaluation: the kernels are an optimisation, never a requirement.

Whether the ops use the kernels is one switch, :func:`cpu_kernels`: the environment
variable ``SSMJAX_CPU_KERNELS=0`` (read once at import) turns them off by default, and
the context manager turns them on or off for a block (tests compare both evaluations)::

    with ssmjax.scan._ffi.cpu_kernels(False):   # the XLA evaluation on CPU
        jax.grad(loss)(params)

Like :func:`ssmjax.scan.staged_platforms`, the setting is part of ``jit``'s cache key.

:func:`cpu_or` stages a kernel for the CPU next to the op's XLA evaluation for any other
platform (``jax.lax.platform_dependent``: lowering keeps one). With only the CPU staged
(:func:`ssmjax.scan.staged_platforms`, as the test session and CPU training do) on a CPU
host, it calls the kernel directly, no conditional traced: as in ``auto``'s narrowed plans,
the platforms not staged take the host's branch (so such a program is for the CPU).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

from ssmjax.scan import _dispatch

ENV = "SSMJAX_CPU_KERNELS"
CACHE_ENV = "SSMJAX_CACHE_DIR"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd")
_HERE = Path(__file__).parent
_STATUS: dict[str, str] = {}
_LOCK = threading.Lock()
_log = logging.getLogger(__name__)

_ENABLED = jax.make_user_context(os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off"))


def cpu_kernels(enabled: bool):
    """Context manager: use the C++ CPU kernels (where built) inside the block or not."""
    return _ENABLED(bool(enabled))


def enabled() -> bool:
    """The current :func:`cpu_kernels` setting."""
    return _ENABLED.value


def cpu_or(cpu, default, *args):
    """``cpu(*args)`` lowered for CPU, ``default(*args)`` for any other platform (see the
    module docstring for CPU-only staging)."""
    if set(_dispatch.staged()) | {_dispatch.host_platform()} == {"cpu"}:
        return cpu(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


def status() -> dict[str, str]:
    """Per kernel source loaded so far: ``"loaded: <path>"`` or why it is not used."""
    return dict(_STATUS)


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _headers() -> list[str]:
    """The shared headers' text (part of every kernel's cache key)."""
    return [h.read_text() for h in sorted(_HERE.glob("_*.h"))]


def _build(source: Path) -> Path:
    import jaxlib

    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (set $CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        "\0".join([source.read_text(), *_headers(), " ".join(FLAGS), version, jaxlib.__version__, _cpu_id()]).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ssmjax")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home: a per-user temporary directory
        cache = Path(tempfile.gettempdir()) / f"ssmjax-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{source.stem.lstrip('_')}-{key}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders agree
    return target


def load(name: str, handlers: tuple[tuple[str, str], ...]) -> bool:
    """Build ``_<name>.cc`` (cached) and register ``handlers`` (pairs of FFI target name and
    exported symbol) on the CPU platform, once per process; ``True`` when they are usable.
    Never raises: a failure is recorded in :func:`status` (and a failed build logged)."""
    with _LOCK:
        return _load(name, handlers)


@functools.cache
def _load(name: str, handlers: tuple[tuple[str, str], ...]) -> bool:
    source = _HERE / f"_{name}.cc"
    if jax.default_backend() != "cpu":  # an accelerator host: its own kernels, nothing to build
        _STATUS[name] = f"not used: the host backend is {jax.default_backend()}"
        return False
    try:
        if not source.exists():
            raise RuntimeError(f"{source} is missing (not installed with the package?)")
        library = ctypes.cdll.LoadLibrary(str(_build(source)))
        for target, symbol in handlers:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except Exception as error:  # noqa: BLE001 -- any failure means: use the XLA evaluation
        _STATUS[name] = f"not used: {error}"
        _log.warning("ssmjax CPU kernel %s not used (the XLA evaluation runs instead): %s", name, error)
        return False
    _STATUS[name] = f"loaded: {library._name}"
    return True
