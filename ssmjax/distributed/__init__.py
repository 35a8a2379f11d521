"""Beyond one device: sequence-parallel scans over a ``jax.sharding`` mesh axis
(:mod:`ssmjax.distributed.sequence`)."""

from ssmjax.distributed.sequence import (
    delta_rule_sp,
    gated_linear_attention_sp,
    linear_scan_sp,
    selective_scan_sp,
)

__all__ = ["delta_rule_sp", "gated_linear_attention_sp", "linear_scan_sp", "selective_scan_sp"]
