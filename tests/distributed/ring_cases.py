"""Ring attention vs the single-device quadratic reference in float64, on 8 simulated CPU
devices. Run as a script (it must own the process: the device count is fixed when JAX
starts); prints one JSON object on its last line: per case the largest absolute error of
the output and of the gradients wrt q, k, v, and the collectives in the compiled forward
and forward+backward.

    python -m tests.distributed.ring_cases [--full | --memory]

``--memory`` instead prints the compiled per-device memory (``memory_analysis()``) of ring
attention at ``T = 4096`` on ``seq = 8`` against the one-device quadratic reference.
"""

import sys

if __name__ == "__main__":  # 8 simulated devices (only as the script)
    from tests.distributed.cases import use_host_devices

    use_host_devices(8)

import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

jax.config.update("jax_enable_x64", True)

from tests.distributed.cases import compiled_with_collectives  # noqa: E402
from ssmjax.distributed.ring import ring_attention  # noqa: E402
from ssmjax.scan.softmax_attention import causal_softmax_attention  # noqa: E402

BATCH, TIME, HEADS, DK, DV = 2, 16, 2, 4, 3
SCALE = 0.7  # not dk ** -0.5, so a scale that is dropped or applied twice shows
SEGMENTS = [[0] * 5 + [1] * 7 + [2] * 4, [0] * 8 + [1] * 8]  # boundaries inside shards and on shard edges


def _inputs() -> dict:
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return dict(q=jax.random.normal(kq, (BATCH, TIME, HEADS, DK), jnp.float64),
                k=jax.random.normal(kk, (BATCH, TIME, HEADS, DK), jnp.float64),
                v=jax.random.normal(kv, (BATCH, TIME, HEADS, DV), jnp.float64))


def _loss(fn):
    return lambda x: jnp.sum(jnp.sin(fn(x)))


def output_and_grad(fn, inputs):
    """``(fn(inputs), grad of sum(sin(fn)))`` in one program (the reference's)."""
    out, pullback = jax.vjp(fn, inputs)
    return out, pullback(jnp.cos(out))[0]



@functools.cache
def _reference(documents: bool):
    """The one-device reference's output and gradients (shared by every mesh)."""
    segment_ids = jnp.array(SEGMENTS) if documents else None
    oracle = lambda x: causal_softmax_attention(x["q"], x["k"], x["v"], scale=SCALE,  # noqa: E731
                                                segment_ids=segment_ids)
    return jax.jit(lambda x: output_and_grad(oracle, x))(_inputs())


def run_case(seq: int, documents: bool, block_size: int | None = None, batch_axes: str | None = None) -> dict:
    mesh = jax.make_mesh((8 // seq, seq), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
    inputs = _inputs()
    segment_ids = jnp.array(SEGMENTS) if documents else None
    ring = lambda x: ring_attention(x["q"], x["k"], x["v"], mesh, batch_axes=batch_axes, scale=SCALE,  # noqa: E731
                                    segment_ids=segment_ids, block_size=block_size)
    out, forward = compiled_with_collectives(ring, inputs)
    grads, backward = compiled_with_collectives(jax.grad(_loss(ring)), inputs)
    out_ref, grads_ref = _reference(documents)
    errors = dict(output=float(jnp.max(jnp.abs(out - out_ref))))
    errors.update({f"grad_{name}": float(jnp.max(jnp.abs(grads[name] - grads_ref[name]))) for name in inputs})
    finite = bool(all(jnp.all(jnp.isfinite(g)) for g in grads.values()))
    return dict(errors=errors, finite=finite, forward=forward, backward=backward)


def expected_permutes(seq: int, documents: bool) -> dict:
    """The collective-permutes the ring needs (module docstring of ssmjax.distributed.ring):
    forward ``(n - 1)(1 + g)`` (``g = 1`` with segment_ids); forward+backward adds ``n``
    accumulator sends and the backward's ``(n - 1)(1 + g)`` block sends, except at ``n = 2``,
    where the backward's sends (the same swap as the forward's) are merged with the
    forward's by XLA."""
    per_ring = (seq - 1) * (2 if documents else 1)
    return dict(forward=per_ring, backward=per_ring + seq + (per_ring if seq > 2 else 0))


def memory(time: int = 4096, seq: int = 8, batch: int = 1, heads: int = 4, d: int = 64, tile: int = 128) -> dict:
    """Compiled per-device bytes (``memory_analysis()``) of the forward and of the
    forward+backward, float32: ring attention on ``seq`` devices (whole blocks, and tiles
    of ``tile`` keys) vs the reference on one."""
    shape = jax.ShapeDtypeStruct((batch, time, heads, d), jnp.float32)
    mesh = jax.make_mesh((seq,), ("seq",), axis_types=(AxisType.Auto,))
    ring = lambda q, k, v: ring_attention(q, k, v, mesh)  # noqa: E731
    ring_tiled = lambda q, k, v: ring_attention(q, k, v, mesh, block_size=tile)  # noqa: E731
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    one = jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=single)

    def analyse(fn, args) -> dict:
        stats = jax.jit(fn).lower(*args).compile().memory_analysis()
        return dict(temp=stats.temp_size_in_bytes, arguments=stats.argument_size_in_bytes,
                    outputs=stats.output_size_in_bytes)

    report = dict(shape=dict(batch=batch, time=time, heads=heads, d=d, seq=seq, tile=tile, dtype="float32"))
    for name, fn, args in (("ring", ring, (shape,) * 3), ("ring_tiled", ring_tiled, (shape,) * 3),
                           ("reference", causal_softmax_attention, (one,) * 3)):
        grad = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))
        report[name] = dict(forward=analyse(fn, args), forward_backward=analyse(grad, args))
    return report


# (seq, documents, block_size, batch_axes): shards of 16 / seq tokens, tiles of block_size keys.
DEFAULT_CASES = [(2, False, None, None), (2, True, 2, None), (8, False, None, None), (8, True, None, None)]
FULL_CASES = ([(seq, documents, block_size, None) for seq in (2, 4, 8) for documents in (False, True)
               for block_size in (None, 2) if block_size != 16 // seq]
              + [(4, True, 2, "data")])


def case_name(seq: int, documents: bool, block_size: int | None, batch_axes: str | None) -> str:
    return (f"seq{seq}/{'documents' if documents else 'plain'}" + (f"/tile{block_size}" if block_size else "")
            + (f"/batch_{batch_axes}" if batch_axes else ""))


def main(argv: list[str]) -> None:
    if "--memory" in argv:
        print(json.dumps(memory()))
        return
    cases = FULL_CASES if "--full" in argv else DEFAULT_CASES
    print(json.dumps({case_name(*case): run_case(*case) for case in cases}))


if __name__ == "__main__":
    main(sys.argv[1:])
