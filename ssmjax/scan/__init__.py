"""Pure scan functions: the recurrences of every ssmjax model, each with its oracle."""

from ssmjax.scan.linear import linear_scan, matrix_scan
from ssmjax.scan.newton import NewtonResult, newton_recurrence
from ssmjax.scan.selective import selective_scan

__all__ = [
    "NewtonResult",
    "linear_scan",
    "matrix_scan",
    "newton_recurrence",
    "selective_scan",
]
