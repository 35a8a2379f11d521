"""Whole models under ``ssmjax.distributed.sequence_parallel`` on a ``data=2,seq=4`` mesh of 8
simulated CPU devices vs the same model on one device, in float64. Run as a script (the
device count is fixed when JAX starts); prints one JSON object with, per model:

* ``errors``: the largest difference of the outputs and of every parameter's gradient (of
  a scalar loss of the outputs) from the one-device model (absolute, or relative to the
  largest value where that exceeds 1);
* ``collectives``: how many of each collective the compiled forward+backward has;
* ``full_time``: the collectives whose result has an axis of the full sequence length
  (``TIME``, chosen so that no other axis of the models has that size): the time axis
  gathered onto one device. The sequence-parallel scans' all-gathers are O(state);

and ``causal_conv1d/documents``: the short convolution's halo exchange with packed
documents (outputs, final state, gradients) vs one device.

    python -m tests.distributed.model_cases [--full]
"""

import sys

if __name__ == "__main__":  # 8 simulated devices (only as the script)
    from tests.distributed.cases import use_host_devices

    use_host_devices(8)

import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

jax.config.update("jax_enable_x64", True)

from ssmjax.distributed import batch_spec, make_mesh, sequence_parallel  # noqa: E402
from ssmjax.models import SequenceModel  # noqa: E402
from ssmjax.scan.conv import causal_conv1d  # noqa: E402
from tests.distributed.cases import COLLECTIVES  # noqa: E402

BATCH, TIME, FEATURES = 4, 24, 3  # TIME: no other axis of these models is 24 long
MESH = "data=2,seq=4"
#: One hybrid: GLA, Mamba (selective scan + short conv halo) and ring attention.
DEFAULT_MODELS = ("gla,mamba,attention",)
#: Also: the delta rule, Mamba-2 (GLA with a per-head decay + short conv), RetNet (a
#: broadcast decay, RoPE), HGRN (linear_scan), linear attention (no decay).
FULL_MODELS = DEFAULT_MODELS + ("gated_deltanet,mamba2", "retnet,hgrn", "linear_attention,attention")


def _model(mixers: str) -> SequenceModel:
    return SequenceModel(d_model=16, mixers=mixers, head="regress", output_dim=2, mlp="none")


def _random_params(model, x):
    """Normal float64 parameters of the model's shapes (``model.init`` would compile as
    long as the whole test; any values serve to compare two evaluations)."""
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda p: jnp.asarray(0.5 * rng.normal(size=p.shape)),
                        jax.eval_shape(model.init, jax.random.key(0), x))


def _step(model):
    """``(params, x) -> ((loss, outputs), gradient of the loss wrt params)``."""
    def loss(params, x):
        outputs = model.apply(params, x)
        return jnp.sum(jnp.sin(outputs)), outputs
    return jax.value_and_grad(loss, has_aux=True)


def _collectives(text: str) -> tuple[dict[str, int], list[str]]:
    """Per collective its count in optimised HLO ``text``, and the result shapes of those
    with a ``TIME``-long axis."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    full_time = []
    for line in text.splitlines():
        match = re.search(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", line)
        if not match:
            continue
        counts[match.group(2)] += 1
        shapes = re.findall(r"\[([\d,]*)\]", match.group(1))
        if any(str(TIME) in dims.split(",") for dims in shapes):
            full_time.append(f"{match.group(2)} {match.group(1)}")
    return counts, full_time


def _error(x, reference) -> float:
    """``max |x - reference|``, relative to ``max |reference|`` where that exceeds 1 (a
    gradient summed over the batch and time may be in the hundreds)."""
    return float(jnp.max(jnp.abs(x - reference)) / jnp.maximum(1.0, jnp.max(jnp.abs(reference))))


def run_case(mixers: str) -> dict:
    model = _model(mixers)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, TIME, FEATURES)))
    params = _random_params(model, x)
    step = _step(model)
    (_, outputs_ref), grads_ref = jax.jit(step)(params, x)

    mesh = make_mesh(MESH)
    x_sharded = jax.device_put(x, NamedSharding(mesh, batch_spec(mesh, 3)))
    with sequence_parallel(mesh):  # active while tracing
        compiled = jax.jit(step).lower(params, x_sharded).compile()
    (_, outputs), grads = compiled(params, x_sharded)
    counts, full_time = _collectives(compiled.as_text())
    errors = dict(outputs=_error(outputs, outputs_ref))
    for (path, g), g_ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_ref)):
        errors["grad" + jax.tree_util.keystr(path)] = _error(g, g_ref)
    return dict(errors=errors, collectives=counts, full_time=full_time)


#: Documents ending inside a shard, one token before a shard edge (the halo spans two
#: documents) and on a shard edge (shards of 6 tokens).
SEGMENTS = np.tile(np.repeat([[0, 1, 2, 3], [0, 1, 1, 2]], [5, 7, 7, 5], axis=1), (BATCH // 2, 1))


def conv_case() -> dict:
    """``causal_conv1d`` of 4 taps with packed documents and an initial state, routed to
    the halo exchange: outputs, final state and every gradient vs one device."""
    rng = np.random.default_rng(2)
    inputs = dict(x=rng.normal(size=(BATCH, TIME, FEATURES)), weight=rng.normal(size=(4, FEATURES)),
                  bias=rng.normal(size=FEATURES), initial_state=rng.normal(size=(BATCH, 3, FEATURES)))
    inputs = jax.tree.map(jnp.asarray, inputs)

    def loss(inputs):
        y, final = causal_conv1d(**inputs, segment_ids=SEGMENTS)
        return jnp.sum(jnp.sin(y)) + jnp.sum(final ** 2), (y, final)

    step = jax.value_and_grad(loss, has_aux=True)

    reference = jax.jit(step)(inputs)
    mesh = make_mesh(MESH)
    with sequence_parallel(mesh):
        compiled = jax.jit(step).lower(inputs).compile()
    result = compiled(inputs)
    errors = {jax.tree_util.keystr(path): _error(x, x_ref) for (path, x), x_ref in
              zip(jax.tree_util.tree_flatten_with_path(result)[0], jax.tree.leaves(reference))}
    counts, full_time = _collectives(compiled.as_text())
    return dict(errors=errors, collectives=counts, full_time=full_time)


def main(argv: list[str]) -> None:
    models = FULL_MODELS if "--full" in argv else DEFAULT_MODELS
    results = {mixers: run_case(mixers) for mixers in models}
    results["causal_conv1d/documents"] = conv_case()
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
