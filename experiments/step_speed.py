"""Training-step speed of the sequential-MNIST models, with the PyTorch S4D peer in the same sitting.

    python -m experiments.step_speed [--models s4d,lru,mamba] [--reps 5] [--peers-python .peers-venv/bin/python]

Our side is the model ``python -m experiments smnist --model M`` trains at its cpu size
(:func:`experiments.runner.build_config` / :func:`experiments.runner.build_model`: d_model 64,
4 layers, no MLP, LayerNorm, mean pooling, 10 classes; the layers' default sizes) and the
training loop's step (:func:`ssmjax.train.loop.make_train_step` with
:func:`ssmjax.train.loop.make_optimizer`'s AdamW and the SSM parameter group), jitted with
the training state donated, on a fixed random batch of 50 sequences of 784 pixels. Each
time is the median of ``--reps`` steps after a compile-and-warm-up step, the loss read back
every step; ``temp MB`` is XLA's compiled scratch memory of the step
(:func:`experiments.bench.timing.temp_mb`).

The peer is the PyTorch S4D classifier of :mod:`experiments.bench.s4d_torch` (the same
layer structure, S4D-Lin, ZOH, Vandermonde kernel, FFT convolution) and its AdamW step,
timed by :mod:`experiments.bench.peers` in the peers' interpreter (``--peers-python``, e.g.
``.peers-venv/bin/python``; :func:`experiments.speed.run_peers`) right after our rows, at the
sMNIST shape only (not with ``--set``, ``--batch`` or ``--length``). The table gives each
model's ratio to the peer's step (> 1: slower than the peer). Prints the table and the load
average before and after; writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.table import Column, legend, text_table, write_json
from experiments.bench.timing import environment, median_ms, run_row, temp_mb

#: The sMNIST training shape (experiments.configs SIZES["smnist"]["cpu"]: batch 50, 784 pixels, 1 feature).
SHAPE = dict(batch=50, t=784, features=1, classes=10)
MODELS = ("s4d", "lru", "mamba")
#: the peer result key our rows are compared with
PEER_KEY = "s4d_torch_train_step_ms"
COLUMNS = (
    Column("model", "model", meaning="the mixer of every layer (python -m experiments smnist --model M)"),
    Column("params", "params", "{:,}", "trainable parameters"),
    Column("step_ms", "step ms", "{:.1f}", "median ms of one jitted training step (fwd+bwd+AdamW, state donated)"),
    Column("vs_peer", "x peer", "{:.2f}", "this step / the PyTorch S4D step of the same sitting (> 1: slower)"),
    Column("temp_mb", "temp MB", "{:.1f}", "compiled scratch memory of the step (XLA memory_analysis)"),
    Column("note", "note", meaning="why a cell is empty"),
    Column("error", "error", meaning="the exception of a failing model"),
)


class TrainStep:
    """One donated, jitted training step of ``experiments smnist --model model`` (its cpu
    size, ``overrides``: ``--set`` strings) at ``shape`` on a fixed random batch; calling it
    runs one step and reads the loss back, as the training loop does."""

    def __init__(self, model: str, shape: dict = SHAPE, overrides: tuple[str, ...] = (), seed: int = 0):
        from experiments.runner import build_config, build_model
        from ssmjax.train.loop import make_optimizer, make_train_step

        self.config = build_config("smnist", model, overrides=overrides)
        self.model = build_model(self.config, vocab_size=None, num_classes=shape["classes"])
        optimizer, _ = make_optimizer(self.config, getattr(self.model, "ssm_parameter_mask", None))
        rng = np.random.default_rng(seed)
        inputs = rng.standard_normal((shape["batch"], shape["t"], shape["features"])).astype(np.float32)
        targets = rng.integers(0, shape["classes"], shape["batch"]).astype(np.int32)
        self.batch = (jnp.asarray(inputs), jnp.asarray(targets), jnp.ones(shape["batch"], bool))
        init_key, self.key = jax.random.split(jax.random.PRNGKey(self.config.seed))
        params = jax.jit(self.model.init)(init_key, self.batch[0])
        self.params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
        self.state = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
        # the training loop's step function, jitted here with the state donated (updated in place)
        self.compiled = jax.jit(make_train_step(self.model, optimizer).__wrapped__, donate_argnums=0).lower(
            self.state, *self.batch, self.key).compile()

    def __call__(self) -> float:
        self.state, metrics = self.compiled(self.state, *self.batch, self.key)
        return float(metrics["loss"])

    def measure(self, reps: int) -> dict:
        return dict(params=self.params, temp_mb=temp_mb(self.compiled), step_ms=median_ms(self, reps))


def peer_step(python: str | None) -> tuple[float | None, dict | None]:
    """The PyTorch S4D step's ms (``None`` with the reason printed when it cannot run) and the
    peers' whole result, through :func:`experiments.speed.run_peers` limited to that peer."""
    from experiments import speed
    from experiments.bench import peers

    # the peers' interpreter inherits the environment: only this peer, torch threads waiting
    # passively (as experiments.bench.nanogpt sets it; spinning threads are slow on shared cores)
    saved = {k: os.environ.get(k) for k in (peers.ONLY_ENV, "OMP_WAIT_POLICY")}
    os.environ[peers.ONLY_ENV] = PEER_KEY
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        result = speed.run_peers(python)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return (None if result is None else result.get(PEER_KEY)), result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.step_speed", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated mixers (default {','.join(MODELS)})")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per model (median; default 5)")
    parser.add_argument("--peers-python", default=None,
                        help="interpreter with torch for the S4D peer (e.g. .peers-venv/bin/python); none: skipped "
                             "unless torch imports here")
    parser.add_argument("--no-peer", action="store_true", help="time ours only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every model (experiments' --set), e.g. n_layers=1")
    parser.add_argument("--batch", type=int, default=SHAPE["batch"], help=f"batch size (default {SHAPE['batch']})")
    parser.add_argument("--length", type=int, default=SHAPE["t"], help=f"sequence length (default {SHAPE['t']})")
    parser.add_argument("--out", default="results/step_speed.json")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.batch < 1 or args.length < 1:
        parser.error(f"--reps, --batch, --length: expected >= 1, got {args.reps}, {args.batch}, {args.length}")
    models = [m for m in args.models.split(",") if m]
    shape = dict(SHAPE, batch=args.batch, t=args.length)
    env = environment()
    load_before = os.getloadavg()
    print(f"jax {env['jax']} on {env['device']}, {env['cpus']} cpus; load average {load_before[0]:.2f}; "
          f"sMNIST step at batch {shape['batch']} x {shape['t']}; {args.reps} timed steps per model after a "
          "compile-and-warm-up step; progress on stderr")
    rows: list[dict] = []
    for i, model in enumerate(models):
        run_row(rows, dict(model=model), lambda m=model: TrainStep(m, shape, tuple(args.overrides)).measure(args.reps),
                label=model, progress=f"[{i + 1}/{len(models)}]")
    peer_ms, peer = None, None
    if args.overrides or shape != SHAPE:  # the peer is the sMNIST-size classifier only
        if not args.no_peer:
            print("\npeer: not run (it is timed at the sMNIST shape and size only; --set/--batch/--length given)")
    elif not args.no_peer:
        peer_ms, peer = peer_step(args.peers_python)
    if peer_ms is not None:
        rows.append(dict(model="s4d, PyTorch peer", step_ms=peer_ms, vs_peer=1.0,
                         note=f"torch {peer.get('torch')}: the s4d row's layers and parameter count"))
        for row in rows[:-1]:
            if "step_ms" in row:
                row["vs_peer"] = row["step_ms"] / peer_ms
    load_after = os.getloadavg()
    print(f"\n{text_table(rows, COLUMNS)}\n\ncolumns:\n{legend(rows, COLUMNS)}")
    print(f"\nload average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    result = dict(env, shape=shape, reps=args.reps, overrides=args.overrides, rows=rows, peers=peer,
                  load_before=load_before, load_after=load_after)
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
