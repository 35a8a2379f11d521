"""Beyond one device: meshes and FSDP shardings of a training state
(:mod:`ssmjax.distributed.mesh`, used by ``ssmjax.train.train(..., mesh=...)``),
sequence-parallel scans over a mesh axis (:mod:`ssmjax.distributed.sequence`), ring
attention (:mod:`ssmjax.distributed.ring`) and joining a multi-process job
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
from ssmjax.distributed.sequence import delta_rule_sp, gated_linear_attention_sp, linear_scan_sp, selective_scan_sp

__all__ = [
    "AXES", "batch_spec", "check_batch_shape", "describe_shardings", "initialize", "make_mesh", "param_spec",
    "parse_mesh", "state_shardings", "delta_rule_sp", "gated_linear_attention_sp", "linear_scan_sp",
    "ring_attention", "selective_scan_sp",
]
