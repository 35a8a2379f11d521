"""Training on a device mesh vs one device, on 8 simulated CPU devices. Run as a script
(the device count is fixed when JAX starts); prints one JSON object:

* ``step/<mesh>``: the largest difference of the parameters and the loss after one
  training step of a hybrid model (GLA + attention) on the mesh vs on one device;
* ``resume``: a run trained 2 steps on ``data=8``, checkpointed, resumed on
  ``data=2,fsdp=4`` to 4 steps, vs 4 uninterrupted steps on one device;
* ``fsdp_sharded``: how many parameter leaves the fsdp=8 rule splits.

    python -m tests.distributed.mesh_cases
"""


if __name__ == "__main__":  # 8 simulated devices (only as the script)
    from tests.distributed.cases import use_host_devices

    use_host_devices(8)

import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ssmjax.data import Batch  # noqa: E402
from ssmjax.distributed import batch_spec, make_mesh, state_shardings  # noqa: E402
from ssmjax.models import SequenceModel  # noqa: E402
from ssmjax.train import TrainConfig, make_optimizer, make_train_step, train  # noqa: E402

MESHES = ("data=8", "fsdp=8", "data=2,seq=4")
VOCAB, BATCH, TIME = 32, 8, 16


class CopyTask:
    """Random tokens, predict the previous one (a pure function of the step)."""

    vocab_size = VOCAB

    def train_batch(self, step):
        tokens = np.random.default_rng([0, step]).integers(0, VOCAB, (BATCH, TIME + 1), dtype=np.int32)
        return Batch(tokens[:, 1:], tokens[:, :-1], np.ones((BATCH, TIME), bool))

    def evaluate(self, model):
        return dict(accuracy=0.0)


def _model():
    return SequenceModel(d_model=64, n_layers=2, mixers="gla,attention", vocab_size=VOCAB, head="lm")


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def one_step(mesh_spec: str | None):
    model, config = _model(), TrainConfig(steps=10, lr=3e-3, warmup_steps=0)
    optimizer, _ = make_optimizer(config)
    batch = CopyTask().train_batch(0)
    params = model.init(jax.random.key(0), jnp.asarray(batch.inputs))
    state = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    fields = [jnp.asarray(x) for x in (batch.inputs, batch.targets, batch.mask)]
    shardings = None
    if mesh_spec is not None:
        mesh = make_mesh(mesh_spec)
        shardings = (state_shardings(state, mesh), jax.sharding.NamedSharding(mesh, batch_spec(mesh, 2)))
        state = jax.device_put(state, shardings[0])
        fields = [jax.device_put(x, shardings[1]) for x in fields]
    new_state, metrics = make_train_step(model, optimizer, shardings)(state, *fields, jax.random.key(1))
    return jax.device_get(new_state), float(metrics["loss"]), shardings


def main() -> None:
    results = {}
    reference, reference_loss, _ = one_step(None)
    for spec in MESHES:
        state, loss, shardings = one_step(spec)
        split = sum("fsdp" in str(s.spec) for s in jax.tree.leaves(shardings[0]["params"]))
        results[f"step/{spec}"] = dict(params=_max_diff(state["params"], reference["params"]),
                                       loss=abs(loss - reference_loss), fsdp_split_leaves=split)
    config = TrainConfig(steps=4, lr=3e-3, warmup_steps=0, eval_every=100, checkpoint_every=2, log_every=1)
    with tempfile.TemporaryDirectory() as tmp:
        whole = train(_model(), CopyTask(), config, f"{tmp}/whole", verbose=False)
        train(_model(), CopyTask(), config, f"{tmp}/split", verbose=False, mesh=make_mesh("data=8"), stop_at=2)
        resumed = train(_model(), CopyTask(), config, f"{tmp}/split", verbose=False, resume=True,
                        mesh=make_mesh("data=2,fsdp=4"))
        results["resume"] = dict(params=_max_diff(resumed.params, whole.params), step=resumed.step)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
