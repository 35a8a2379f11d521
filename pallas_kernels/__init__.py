"""Pallas kernels for the hot loops of ssmjax (depends on jax only, never on ssmjax).

One module per kernel family, each with a forward kernel, a backward kernel (or a
documented recompute strategy), a frozen ``BlockSizes`` dataclass, an ``interpret``
switch (CPU tests run every kernel with ``interpret=True``) and a ``platform`` override
(lower for another backend than ``jax.default_backend()``):

* :mod:`pallas_kernels.linear_scan`: ``h_t = a_t h_{t-1} + b_t`` over ``[b, t, d]``,
  forward and reverse (the reverse run is the backward).
* :mod:`pallas_kernels.selective_scan`: Mamba-1's selective scan fused with
  discretisation and readout; forward emits chunk-boundary states, the backward kernel
  recomputes each chunk from them. Its Mosaic TPU version,
  :mod:`pallas_kernels.selective_scan_tpu`, tiles time over a sequential grid axis.
* :mod:`pallas_kernels.chunked_gla`: chunked gated linear attention / SSD (no, per-head
  or per-key-channel log decay); fp32 state carried across chunks, intra-chunk masked
  matmuls with log-space decays; the backward runs the chunks in reverse carrying dS.
* :mod:`pallas_kernels.chunked_delta`: the (gated) delta rule in the WY/UT form, same
  structure. Their Mosaic TPU versions, :mod:`pallas_kernels.chunked_gla_tpu` and
  :mod:`pallas_kernels.chunked_delta_tpu`, take head-major ``(chunk, head dim)`` blocks
  over a sequential chunk axis with the state in VMEM scratch.
* :mod:`pallas_kernels.rnn`: the sequential head-wise nonlinear RNN (Elman, LSTM, GRU,
  sLSTM; FlashRNN's idea): one program per (batch block, head) keeps its recurrent
  weights resident and loops over the whole sequence; the backward is a reverse-time
  loop recomputing each step.

Shared pieces: :mod:`pallas_kernels._common` (backend selection, int32 block specs,
the unrolled time loop, dtype checks), :mod:`pallas_kernels._chunked_common` (layouts,
tiling and the ``pallas_call`` launches of the two chunked attention kernels, GPU and
TPU) and :mod:`pallas_kernels._tpu_common` (TPU dtypes, the sequential-grid layout). A
family's ``_tpu`` module imports the per-chunk or per-token math it shares with its GPU
twin by public name from the family module; no module imports another's privates.

Ahead-of-time compilation for real accelerators from any host:
:mod:`pallas_kernels.targets` (named GPU/TPU targets, the per-target default block sizes,
compile-and-measure) and :mod:`pallas_kernels.target_cases` (the configurations
``tests/kernels/test_targets.py`` and ``python -m experiments.kernel_report`` compile).

``custom_vjp`` wiring lives in ``ssmjax.scan`` (``method="pallas"``), not here.
"""
