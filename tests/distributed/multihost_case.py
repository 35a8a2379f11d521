"""Two training steps on a mesh over 8 CPU devices, as one process of a multi-process job
or as a single process. Run as a script (it must own the process: the device count and
the distributed job are fixed when JAX starts):

    python -m tests.distributed.multihost_case --out DIR --process-id I --num-processes 2 --port P
    python -m tests.distributed.multihost_case --out DIR                   # one process, 8 devices

Every process has ``8 / num_processes`` CPU devices and joins the job through
:func:`ssmjax.distributed.launch.initialize` with the loopback coordinator
``127.0.0.1:P``; the mesh (``--mesh``, default ``data=8``) spans the 8 global devices.
The task is the same in both layouts: global batch ``s`` is 16 rows drawn from
``default_rng([0, s])``, and process ``i`` feeds rows ``[8 i, 8 i + 8)`` of it (what
``train`` turns into one global array with ``jax.make_array_from_process_local_data``);
a single process feeds all 16. All processes share the run directory ``DIR/run``
(orbax saves one checkpoint from all of them; process 0
writes the metrics and results). Process ``i`` writes ``DIR/process{i}.npz`` (every
parameter, gathered from all processes) and prints one JSON line: the per-step training
losses, the process count, index and device counts, and a parameter checksum.
"""

import argparse
import sys


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.distributed.multihost_case")
    parser.add_argument("--out", required=True, help="folder for process{i}.npz and the run directories")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (several processes)")
    parser.add_argument("--mesh", default="data=8")
    parser.add_argument("--steps", type=int, default=2)
    return parser.parse_args(argv)


ARGS = _arguments(sys.argv[1:]) if __name__ == "__main__" else None
GLOBAL_DEVICES = 8
if ARGS is not None:  # only as the script: this process's share of the 8 devices
    from tests.distributed.cases import use_host_devices

    use_host_devices(GLOBAL_DEVICES // ARGS.num_processes)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

VOCAB, GLOBAL_BATCH, TIME = 32, 16, 16


class ProcessRowsTask:
    """Predict the previous token; this process's rows of global batch ``step`` (a pure
    function of the step, so every layout sees the same global batch)."""

    vocab_size = VOCAB

    def __init__(self, process_id: int, num_processes: int):
        rows = GLOBAL_BATCH // num_processes
        self.rows = slice(process_id * rows, (process_id + 1) * rows)

    def train_batch(self, step):
        from ssmjax.data import Batch

        tokens = np.random.default_rng([0, step]).integers(0, VOCAB, (GLOBAL_BATCH, TIME + 1), dtype=np.int32)
        tokens = tokens[self.rows]
        return Batch(tokens[:, 1:], tokens[:, :-1], np.ones((len(tokens), TIME), bool))

    def evaluate(self, model):
        return dict(accuracy=0.0)


def main(args: argparse.Namespace) -> None:
    from ssmjax.distributed.launch import initialize

    layout = (f"127.0.0.1:{args.port}", args.num_processes, args.process_id) if args.num_processes > 1 else ()
    joined = initialize(*layout)
    again = initialize(*layout)  # idempotent: the same answer, nothing initialised twice

    import jax
    from jax.experimental import multihost_utils

    from ssmjax.distributed import make_mesh
    from ssmjax.models import SequenceModel
    from ssmjax.train import TrainConfig, train

    model = SequenceModel(d_model=32, n_layers=1, mixers="gla", vocab_size=VOCAB, head="lm")
    config = TrainConfig(steps=args.steps, lr=3e-3, warmup_steps=0, eval_every=100, checkpoint_every=100,
                         checkpoint_every_minutes=0, log_every=1)
    out = Path(args.out)
    # One run directory for all processes: orbax writes one checkpoint from all of them.
    result = train(model, ProcessRowsTask(args.process_id, args.num_processes), config, out / "run", verbose=False,
                   mesh=make_mesh(args.mesh))
    params = multihost_utils.process_allgather(result.params, tiled=True)  # global NumPy arrays on every process
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(out / f"process{args.process_id}.npz",
             **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})
    losses: dict[int, list[float]] = {}  # process 0 alone logs each step's (global) loss
    for row in map(json.loads, (out / "run" / "metrics.jsonl").open()):
        if row["split"] == "train":
            losses.setdefault(row["step"], []).append(row["loss"])
    checksum = float(sum(np.abs(np.asarray(leaf, np.float64)).sum() for _, leaf in leaves))
    print(json.dumps(dict(joined=joined, again=again, process_index=jax.process_index(),
                          process_count=jax.process_count(), local_devices=jax.local_device_count(),
                          devices=jax.device_count(), losses=[losses[step] for step in sorted(losses)],
                          checksum=checksum)))


if __name__ == "__main__":
    main(ARGS)
