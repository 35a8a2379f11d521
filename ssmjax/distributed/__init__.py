"""Beyond one device: meshes and FSDP shardings of a training state
(:mod:`ssmjax.distributed.mesh`, used by ``ssmjax.train.train(..., mesh=...)``),
sequence-parallel scans over a mesh axis (:mod:`ssmjax.distributed.sequence`), ring
attention (:mod:`ssmjax.distributed.ring`), the context that makes a model's layers use
them (:func:`sequence_parallel`, :mod:`ssmjax.distributed.context`) and joining a multi-process job
(:mod:`ssmjax.distributed.launch`)."""

from ssmjax.distributed.launch import initialize
from ssmjax.distributed.mesh import (
    AXES,
    batch_spec,
    check_batch_shape,
    describe_shardings,
    make_mesh,
    param_spec,
    parse_mesh,
    state_shardings,
)
from ssmjax.distributed.ring import ring_attention
from ssmjax.distributed.sequence import (
    causal_conv1d_sp,
    delta_rule_sp,
    gated_linear_attention_sp,
    linear_scan_sp,
    selective_scan_sp,
)
from ssmjax.distributed.context import sequence_parallel

__all__ = [
    "AXES", "batch_spec", "check_batch_shape", "describe_shardings", "initialize", "make_mesh", "param_spec",
    "parse_mesh", "state_shardings", "causal_conv1d_sp", "delta_rule_sp", "gated_linear_attention_sp",
    "linear_scan_sp", "ring_attention", "selective_scan_sp", "sequence_parallel",
]
