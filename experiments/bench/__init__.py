"""The benchmark library shared by every benchmark program in ``experiments/``
(``speed``: scan ops on CPU, ``speed_gpu``: Pallas kernels, ``layer_speed``: layers and
decoding, ``bench.peers``: the PyTorch peers).

* :mod:`experiments.bench.timing`: warm-up then the median of N timed calls
  (:func:`median_ms`), compiled memory from ``jit(f).lower(...).compile().memory_analysis()``
  (:func:`temp_mb`), forward and forward+backward of a JAX function in one call
  (:func:`measure_jax`), one row per configuration that survives a failing one
  (:func:`run_row`, with a labelled progress line) and the growth exponent of time in T.
* :mod:`experiments.bench.table`: :class:`Column` (key, title, format, meaning), plain-text
  and markdown tables whose skipped cells say why, the column legend, JSON output.
* :mod:`experiments.bench.peers`: the PyTorch CPU peers (``pip install -e '.[peers]'``).

The names below are imported lazily, so ``experiments.bench.clock`` and ``.peers`` load
without JAX.

PyTorch peers' threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless the environment
sets it), set here so it precedes any module of this package importing torch (libgomp reads
it when it loads): with OpenMP's default spinning, two torch threads on two shared cores run
5-30x slower whenever another process holds a core.
"""

import importlib
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_HOMES = {
    "Column": "table", "legend": "table", "markdown_table": "table", "shape_text": "table", "text_table": "table",
    "write_json": "table", "environment": "timing", "floating_argnums": "timing", "growth_exponent": "timing",
    "measure_jax": "timing", "median_ms": "timing", "run_row": "timing", "temp_mb": "timing",
    "median_of_calls": "clock",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'experiments.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"experiments.bench.{_HOMES[name]}"), name)
