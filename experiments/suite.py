"""The short synthetic suite: one task, three models, a results table in a few minutes
on 2 CPU cores.

    python -m experiments.suite [--task selective_copying] [--model NAME ...]
                                [--set key=value ...] [--sweep key=v1,v2,...] [--out runs/suite]

Default: selective copying (Gu & Dao, 2023, "Mamba", Table 1) at a reduced size, for
attention, a selective SSM (Mamba) and a time-invariant SSM (S4D). The paper's finding:
attention and the selective model solve it, the time-invariant one does not. The
full experiments are ``python -m experiments <experiment> --model <name>``.
"""

from __future__ import annotations

import argparse
import time

from experiments import report
from experiments.runner import format_sweep, parse_sweep, run_experiment, run_sweep
from ssmjax.train import NonFiniteLossError

#: attention, a selective SSM and a time-invariant SSM: the contrast of Mamba's Table 1.
DEFAULT_MODELS = ("attention", "mamba", "s4d")

# Reduced sizes that learn within ~1 minute per model on 2 cores (the CPU size of each
# experiment in experiments/configs.py is the fuller version).
SUITE_SETTINGS = {
    "selective_copying": ["seq_len=64", "num_tokens=4", "batch_size=16", "steps=600", "lr=3e-3", "warmup_steps=50",
                          "eval_every=200", "checkpoint_every=600", "log_every=50"],
    "mqar": ["vocab_size=128", "train_shapes=((64, 4), (64, 8))", "eval_shapes=((64, 4), (64, 8), (64, 16))",
             "steps=1500", "eval_every=500", "checkpoint_every=1500", "log_every=50"],
    "induction_heads": ["seq_len=32", "eval_multiples=(1, 2, 4, 8, 16)", "steps=600", "eval_every=200",
                        "checkpoint_every=600", "log_every=50"],
    # one token per input x (encoding=example), 4 bits, 16 examples: attention follows the
    # Bayes-optimal learner's curve over prompt positions (experiments/notes/boolean_icl.md)
    "boolean_icl": ["encoding=example", "num_bits=4", "num_examples=16", "steps=1500", "lr=3e-3", "eval_every=500",
                    "checkpoint_every=1500", "log_every=100"],
    "lm": [],  # the cpu size is already nanoGPT's CPU "baby GPT" (a few minutes on 2 cores)
    "algorithmic": ["train_max_len=10", "eval_lengths=(5, 10, 20, 40)", "steps=600", "eval_every=200",
                    "checkpoint_every=600", "log_every=50"],
}


def run_suite(task: str = "selective_copying", models: list[str] | None = None, overrides: list[str] | None = None,
              out: str = "runs/suite", verbose: bool = True, sweep: str | None = None) -> tuple[list[dict], str]:
    """Train each model on ``task`` (fresh runs under ``out``); returns ``(results, table)``.
    With ``sweep`` (``"KEY=v1,v2,..."``) each model runs once per value (all values of all
    models are checked before any training) and the best value per model is printed."""
    models = list(models or DEFAULT_MODELS)
    swept_key = sweep.partition("=")[0].strip() if sweep is not None else None
    settings = [s for s in SUITE_SETTINGS[task] if s.partition("=")[0] != swept_key] + list(overrides or [])
    if sweep is not None:
        for model in models:
            parse_sweep(task, model, sweep, overrides=settings)
    results, summaries = [], []
    for model in models:
        start = time.perf_counter()
        if sweep is not None:
            swept = run_sweep(task, model, sweep, overrides=settings, out=out, overwrite=True, verbose=verbose)
            summaries.append(f"{model}: {format_sweep(swept)}")
            runs = swept["results"]
        else:
            runs = [_run_one(task, model, settings, out, verbose)]
        results += runs
        for result in runs:
            print(f"{result.get('run', model)}: {result.get('status')} in {time.perf_counter() - start:.0f} s, eval "
                  f"accuracy {(result.get('eval') or {}).get('accuracy', float('nan')):.3f}", flush=True)
    for summary in summaries:
        print(summary)
    return results, report.table(results)


def _run_one(task: str, model: str, settings: list[str], out: str, verbose: bool) -> dict:
    try:
        return run_experiment(task, model, overrides=settings, out=out, overwrite=True, verbose=verbose)
    except NonFiniteLossError as error:  # reported in the table; the other models still run
        print(f"{model}: {error}", flush=True)
        return error.result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.suite", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="selective_copying", choices=tuple(SUITE_SETTINGS))
    parser.add_argument("--model", dest="models", action="append", default=None,
                        help="a registry name or pattern (repeatable; default: attention, a selective SSM and a "
                        "time-invariant SSM)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                        help="each model once per value (e.g. lr=1e-3,3e-3,1e-2; replaces the suite's own KEY "
                        "setting); prints each value's final eval accuracy and the best per model")
    parser.add_argument("--out", default="runs/suite")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        _, table = run_suite(args.task, args.models, args.overrides, args.out, verbose=not args.quiet, sweep=args.sweep)
    except ValueError as error:
        parser.error(str(error))
    print(f"\n{report.TITLES[args.task]} (reduced size; {time.perf_counter() - start:.0f} s in total)\n")
    print(table)
    print(f"\nPaper: {report.PAPER_FINDINGS[args.task]}")


if __name__ == "__main__":
    main()
