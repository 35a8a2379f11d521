"""Train and evaluate a model on one experiment.

    python -m experiments <experiment> --model <name or pattern> [--size cpu|paper]
                          [--set key=value ...] [--sweep key=v1,v2,...] [--out runs/]
                          [--resume] [--name NAME]
    python -m experiments <protocol> ...        # ltsf, dynamics, lm-sample: see <protocol> --help

The protocols (:mod:`experiments.protocols`) have their own options: epoch training on
real data (``ltsf``), rollouts of chaotic systems (``dynamics``), sampling (``lm-sample``).

Writes ``<out>/<experiment>/<run>/``: config.json, metrics.jsonl, checkpoints/,
result.json, learning_curves.png. ``python -m experiments.report`` turns all runs into
``experiments/RESULTS.md``. Ctrl-C (SIGINT) and SIGTERM (preemption) save a checkpoint and
exit with 128 + the signal number; checkpoints are also written every
``checkpoint_every`` steps and ``checkpoint_every_minutes``; ``--resume`` continues
exactly where the run stopped and prints the step and checkpoint it restored.

``--sweep lr=1e-3,3e-3,1e-2`` makes one run per value (run names end in ``lr1e-3`` ...)
and prints every value's final eval accuracy (the task's headline validation number) and
the best, as Zoology (Arora et al., 2023) picks its learning rate.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap

import ssmjax.layers
from experiments import protocols
from experiments.configs import EXPERIMENTS
from experiments.protocols import PROTOCOLS
from experiments.runner import describe_run_shardings, format_sweep, run_experiment, run_sweep
from ssmjax.distributed import initialize, make_mesh
from experiments.tasks import DESCRIPTIONS
from ssmjax.train import NonFiniteLossError

COMMON_FIELDS = ("steps", "batch_size", "lr", "seed", "d_model", "n_layers")


def _epilog(models: list[str]) -> str:
    width = max(map(len, (*EXPERIMENTS, *PROTOCOLS))) + 2
    lines = ["experiments:"]
    lines += [f"  {name:<{width}}{DESCRIPTIONS[name]}" for name in EXPERIMENTS]
    lines += [f"  {name:<{width}}{protocols.load(name).DESCRIPTION} (options: {name} --help)"
              for name in PROTOCOLS]
    lines += ["", "models (registered mixers, or a hybrid pattern such as 'gla*3,attention': the pattern sets the",
              "depth unless --set n_layers=N, a multiple of its length, tiles it):"]
    lines += textwrap.wrap(", ".join(models) or "(none registered)", 88, initial_indent="  ", subsequent_indent="  ")
    lines += ["", f"--set fields of every experiment: {', '.join(COMMON_FIELDS)}, warmup_steps, weight_decay,",
              "  grad_clip, eval_every, checkpoint_every, checkpoint_every_minutes, log_every, mlp,",
              "  mixer_fields (a dict per mixer name),",
              "  and the experiment's own fields (e.g. mqar: vocab_size, train_shapes; algorithmic: task;",
              "  boolean_icl: function, num_bits, num_examples, encoding=bits|example).",
              "", "examples:",
              "  python -m experiments selective_copying --model attention --set steps=200",
              "  python -m experiments mqar --model 'gla*3,attention' --set n_layers=4",
              "  python -m experiments algorithmic --model attention --set task=reverse",
              "  python -m experiments mqar --model attention --resume",
              "  python -m experiments boolean_icl --model attention --sweep lr=1e-3,3e-3,1e-2"]
    return "\n".join(lines)


def build_parser(models: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n\n")[0],
                                     epilog=_epilog(models), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=EXPERIMENTS, metavar="experiment", help="one of: " + ", ".join((*EXPERIMENTS, *PROTOCOLS)))
    parser.add_argument("--model", required=True, help="registered mixer name or hybrid pattern")
    parser.add_argument("--size", default="cpu", choices=("cpu", "paper"), help="config size (default: cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                        help="one run per value (e.g. lr=1e-3,3e-3,1e-2; run names end in KEY+value); prints "
                        "every value's final eval accuracy and the best")
    parser.add_argument("--out", default="runs", help="output root (default: runs/)")
    parser.add_argument("--name", default=None, help="suffix of the run directory, to keep variants apart")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    group.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                        help="train on a device mesh, e.g. data=4,fsdp=2 (axes data, fsdp, seq, tensor; sizes multiply "
                        "to the number of devices, one may be -1: the rest): batch over data/fsdp, parameters "
                        "FSDP-sharded over fsdp")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --mesh: print each parameter's sharding and bytes per device, then exit")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="multi-process job: process 0's address and a free port (with --num-processes and "
                        "--process-id; or SSMJAX_COORDINATOR etc.; SLURM, Open MPI and Cloud TPU pods are detected)")
    parser.add_argument("--num-processes", type=int, default=None, metavar="N", help="multi-process job: N processes")
    parser.add_argument("--process-id", type=int, default=None, metavar="I", help="multi-process job: this one's id")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PROTOCOLS:
        return protocols.load(argv[0]).main(argv[1:])
    models = ssmjax.layers.names()
    parser = build_parser(models)
    args = parser.parse_args(argv)
    if args.sweep is not None:
        return _main_sweep(parser, args)
    try:
        initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX call; no-op on one machine
        mesh = None if args.mesh is None else make_mesh(args.mesh)
        if args.dry_run:
            if mesh is None:
                parser.error("--dry-run: needs --mesh")
            print(describe_run_shardings(args.experiment, args.model, mesh, size=args.size, overrides=args.overrides))
            return 0
        result = run_experiment(args.experiment, args.model, size=args.size, overrides=args.overrides, out=args.out,
                                resume=args.resume, overwrite=args.overwrite, name=args.name, verbose=not args.quiet,
                                mesh=mesh)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    except NonFiniteLossError as error:
        print(f"error: {error}\nFrom the command line: --set lr=... (or --set grad_clip=...) with --resume, or "
              "--overwrite to start again.", file=sys.stderr)
        return 1
    if result["status"] == "interrupted":
        return _interrupted(result)
    summary = "  ".join(f"{k} {v:.3f}" for k, v in result["eval"].get("summary", {}).items()) if result["eval"] else ""
    print(f"{result['status']}: step {result['step']}/{result['steps']}, train loss {result['train_loss']:.4f}"
          + (f"; eval {summary}" if summary else ""))
    return 0


def _interrupted(result: dict) -> int:
    return 128 + signal.Signals[result.get("signal", "SIGINT")].value


def _main_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--sweep``: every value's run, then each value's score and the best."""
    try:
        sweep = run_sweep(args.experiment, args.model, args.sweep, size=args.size, overrides=args.overrides,
                          out=args.out, resume=args.resume, overwrite=args.overwrite, name=args.name,
                          verbose=not args.quiet)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(format_sweep(sweep))
    interrupted = [r for r in sweep["results"] if r.get("status") == "interrupted"]
    return _interrupted(interrupted[0]) if interrupted else (0 if sweep["best"] is not None else 1)


if __name__ == "__main__":
    sys.exit(main())
