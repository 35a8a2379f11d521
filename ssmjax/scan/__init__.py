"""Pure scan functions: the recurrences of every ssmjax model, each with its oracle."""

from ssmjax.scan.delta import delta_rule
from ssmjax.scan.gla import gated_linear_attention
from ssmjax.scan.linear import linear_scan, matrix_scan
from ssmjax.scan.newton import NewtonResult, newton_recurrence
from ssmjax.scan.plstm import plstm_1d, plstm_2d
from ssmjax.scan.rnn import HeadwiseCell, RNNInfo, nonlinear_rnn
from ssmjax.scan.selective import selective_scan
from ssmjax.scan.softmax_attention import (
    SoftmaxState,
    causal_softmax_attention,
    prefix_softmax_attention,
    softmax_scan_combine,
)

__all__ = [
    "HeadwiseCell",
    "NewtonResult",
    "RNNInfo",
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
