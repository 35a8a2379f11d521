"""Pure scan functions: the recurrences of every ssmjax model, each with its oracle."""

from ssmjax.scan.delta import DeltaBlockSizes, delta_rule
from ssmjax.scan.gla import GLABlockSizes, gated_linear_attention
from ssmjax.scan.linear import LinearScanBlockSizes, linear_scan, matrix_scan
from ssmjax.scan.newton import NewtonResult, newton_recurrence
from ssmjax.scan.plstm import plstm_1d, plstm_2d
from ssmjax.scan.rnn import HeadwiseCell, RNNBlockSizes, RNNInfo, nonlinear_rnn
from ssmjax.scan.selective import SelectiveScanBlockSizes, selective_scan
from ssmjax.scan.softmax_attention import (
    SoftmaxState,
    causal_softmax_attention,
    prefix_softmax_attention,
    softmax_scan_combine,
)

__all__ = [
    "DeltaBlockSizes",
    "GLABlockSizes",
    "HeadwiseCell",
    "LinearScanBlockSizes",
    "NewtonResult",
    "RNNBlockSizes",
    "RNNInfo",
    "SelectiveScanBlockSizes",
    "SoftmaxState",
    "causal_softmax_attention",
    "delta_rule",
    "gated_linear_attention",
    "linear_scan",
    "matrix_scan",
    "newton_recurrence",
    "plstm_1d",
    "plstm_2d",
    "nonlinear_rnn",
    "prefix_softmax_attention",
    "selective_scan",
    "softmax_scan_combine",
]

from ssmjax.scan.mlstm import MLSTMState, mlstm, mlstm_sequential  # noqa: E402

__all__ += ["MLSTMState", "mlstm", "mlstm_sequential"]

from ssmjax.scan.chunk_attention import chunked_attention_sequential, chunked_attention_with_cache  # noqa: E402

__all__ += ["chunked_attention_sequential", "chunked_attention_with_cache"]

from ssmjax.scan.chunk_summary import attend_chunk_summaries, attend_chunk_summaries_sequential  # noqa: E402

__all__ += ["attend_chunk_summaries", "attend_chunk_summaries_sequential"]

from ssmjax.scan.lightnet import additive_attention_sequential, additive_gates  # noqa: E402

__all__ += ["additive_attention_sequential", "additive_gates"]

from ssmjax.scan._dispatch import staged_platforms  # noqa: E402

__all__ += ["staged_platforms"]
