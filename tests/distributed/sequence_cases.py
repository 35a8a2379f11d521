"""Sequence-parallel scans vs the single-device sequential oracle in float64, on 8
simulated CPU devices. Run as a script (it must own the process: the device count is
fixed when JAX starts); prints one JSON object: per case the largest absolute error of
the outputs, the final state and every gradient, and the collectives in the compiled
forward and forward+backward.

    python -m tests.distributed.sequence_cases [--full]
"""

import sys

if __name__ == "__main__":  # 8 simulated devices (only as the script)
    from tests.distributed.cases import use_host_devices

    use_host_devices(8)

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

jax.config.update("jax_enable_x64", True)

from tests.distributed.cases import compiled_with_collectives  # noqa: E402
from ssmjax.distributed import (  # noqa: E402
    delta_rule_sp,
    gated_linear_attention_sp,
    linear_scan_sp,
    selective_scan_sp,
)
from ssmjax.scan import delta_rule, gated_linear_attention, linear_scan, selective_scan  # noqa: E402

BATCH, TIME = 2, 16
SEGMENTS = jnp.array([[0] * 5 + [1] * 7 + [2] * 4, [0] * 8 + [1] * 8])  # boundaries inside and at shard edges


def _inputs(op: str):
    keys = iter(jax.random.split(jax.random.key(0), 8))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float64)  # noqa: E731
    if op.startswith("linear_scan"):
        return dict(a=jax.random.uniform(next(keys), (BATCH, TIME, 3), jnp.float64, 0.5, 1.0), b=normal(BATCH, TIME, 3),
                    initial_state=normal(BATCH, 3))
    if op == "selective_scan":
        return dict(u=normal(BATCH, TIME, 3), delta=normal(BATCH, TIME, 3), B=normal(BATCH, TIME, 4),
                    C=normal(BATCH, TIME, 4), initial_state=normal(BATCH, 3, 4))
    k = normal(BATCH, TIME, 2, 4)
    args = dict(q=normal(BATCH, TIME, 2, 4), k=k / jnp.linalg.norm(k, axis=-1, keepdims=True), v=normal(BATCH, TIME, 2, 3),
                log_decay=-jax.random.uniform(next(keys), (BATCH, TIME, 2), jnp.float64),
                initial_state=normal(BATCH, 2, 4, 3))
    if op == "delta_rule":
        args["beta"] = jax.nn.sigmoid(normal(BATCH, TIME, 2))
    return args


A_SELECTIVE = -jnp.exp(jax.random.normal(jax.random.key(1), (3, 4), jnp.float64))


def _pair(op: str, mesh, documents):
    """``(sharded op, single-device oracle)``, both ``**inputs -> (outputs, final_state)``."""
    common = dict(segment_ids=SEGMENTS) if documents else {}
    sp = dict(mesh=mesh, axis="seq", **common)
    if op.startswith("linear_scan"):
        reverse = op.endswith("reverse")
        return (lambda **x: linear_scan_sp(**x, reverse=reverse, **sp),
                lambda **x: linear_scan(**x, reverse=reverse, method="sequential", **common))
    if op == "selective_scan":
        return (lambda **x: selective_scan_sp(A=A_SELECTIVE, delta_softplus=True, **x, **sp),
                lambda **x: selective_scan(A=A_SELECTIVE, delta_softplus=True, **x, method="sequential", **common))
    if op == "gla":
        return (lambda **x: gated_linear_attention_sp(**x, chunk_size=4, **sp),
                lambda **x: gated_linear_attention(**x, method="sequential", **common))
    return (lambda **x: delta_rule_sp(**x, chunk_size=4, **sp),
            lambda **x: delta_rule(**x, method="sequential", **common))


def _loss(fn):
    def loss(inputs):
        outputs, final = fn(**inputs)
        return jnp.sum(jnp.sin(outputs)) + jnp.sum(final ** 2)
    return loss



def run_case(op: str, seq: int, documents: bool) -> dict:
    mesh = jax.make_mesh((8 // seq, seq), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
    inputs = _inputs(op)
    sharded, oracle = _pair(op, mesh, documents)
    (out, final), forward = compiled_with_collectives(lambda x: sharded(**x), inputs)
    grads, backward = compiled_with_collectives(jax.grad(_loss(sharded)), inputs)
    out_ref, final_ref = jax.jit(lambda x: oracle(**x))(inputs)
    grads_ref = jax.jit(jax.grad(_loss(oracle)))(inputs)
    errors = dict(outputs=float(jnp.max(jnp.abs(out - out_ref))), final_state=float(jnp.max(jnp.abs(final - final_ref))))
    errors.update({f"grad_{name}": float(jnp.max(jnp.abs(grads[name] - grads_ref[name]))) for name in inputs})
    return dict(errors=errors, forward=forward, backward=backward)


DEFAULT_CASES = [("linear_scan", 8, True), ("linear_scan_reverse", 4, True),
                 ("gla", 4, True), ("delta_rule", 4, True), ("selective_scan", 4, True)]
FULL_CASES = [(op, seq, documents) for op in ("linear_scan", "linear_scan_reverse", "gla", "delta_rule",
                                              "selective_scan") for seq in (2, 4, 8) for documents in (False, True)]


def main(argv: list[str]) -> None:
    cases = FULL_CASES if "--full" in argv else DEFAULT_CASES
    print(json.dumps({f"{op}/seq{seq}/{'documents' if documents else 'plain'}": run_case(op, seq, documents)
                      for op, seq, documents in cases}))


if __name__ == "__main__":
    main(sys.argv[1:])
