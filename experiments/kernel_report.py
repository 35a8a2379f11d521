"""What every Pallas kernel costs on every accelerator target, compiled ahead of time here.

    python -m experiments.kernel_report                 # default configurations, all targets
    python -m experiments.kernel_report --all           # the whole target-test matrix (long)
    python -m experiments.kernel_report --targets h100,tpu_v5e --kernels chunked_gla

For each (kernel, direction, configuration, target) of ``pallas_kernels.target_cases``,
with the target's default block sizes (``pallas_kernels.targets.default_block_sizes``),
it lowers and compiles for the target (``pallas_kernels.targets.compile_for_target``) and
reports the compile time, the on-chip memory (GPU shared memory per launch, TPU VMEM of
the pipelined blocks) against the target's limit, registers per thread and spill bytes
(GPU, ``ptxas -v``), and the block sizes used; a configuration that fails to compile is
reported with the compiler's message. Prints a Markdown table and writes it to ``--out``
(``experiments/results/kernels.md``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

# The targets are compiled from a CPU host: an installed CUDA plugin without a GPU must not
# become the default backend (it cannot describe a cuda topology then).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from pallas_kernels import targets  # noqa: E402
from pallas_kernels.target_cases import Case, cases  # noqa: E402

HEADER = (
    "| kernel | dir | configuration | target | compiles | compile s | on-chip memory (limit) "
    "| regs | spills | block sizes | known issue |"
)


def _kib(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def measure(case: Case, target: str) -> str:
    """One Markdown row: compile ``case`` for ``target`` and describe the result."""
    block_sizes = targets.default_block_sizes(case.kernel, target)
    config = f"{case.option} {case.dtype} T={case.time}" + (f" d={case.dim}" if case.dim else "") + (
        " x64" if case.x64 else ""
    )
    issue = targets.known_issue(case, target) or ""
    head = f"| {case.kernel} | {case.direction} | {config} | {target} "
    platform = targets.get_target(target).platform
    try:
        with jax.enable_x64(case.x64):
            fn, args = case.build(platform, block_sizes)
            s = targets.compile_for_target(fn, args, target)
    except Exception as e:  # the compiler's verdict is the measurement
        msg = " ".join(str(e).split())[:160].replace("|", "/")
        return head + f"| **no**: {type(e).__name__}: {msg} | | | | | `{block_sizes}` | {issue} |"
    ok = "yes" if s.within_limits else f"yes, over the {targets.get_target(target).memory_kind} limit"
    if s.spill_bytes:
        ok += ", spills"
    regs = "" if s.registers is None else str(s.registers)
    spills = "" if s.spill_bytes is None else str(s.spill_bytes)
    return head + (
        f"| {ok} | {s.seconds:.1f} | {_kib(s.memory_bytes)} ({_kib(s.memory_limit)}) | {regs} | {spills} "
        f"| `{block_sizes}` | {issue} |"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(targets.TARGETS), help="comma-separated target names")
    parser.add_argument("--kernels", default="", help="comma-separated kernels (default: all)")
    parser.add_argument("--all", action="store_true", help="the whole matrix, not only the default configurations")
    parser.add_argument("--out", default="experiments/results/kernels.md")
    args = parser.parse_args(argv)
    names = [n for n in args.targets.split(",") if n]
    for name in names:
        targets.get_target(name)  # unknown names fail before any compilation
    kernels = set(args.kernels.split(",")) - {""}
    lines = [
        "# Pallas kernels compiled ahead of time for GPU and TPU targets",
        "",
        f"`python -m experiments.kernel_report{' --all' if args.all else ''}` on "
        f"{time.strftime('%Y-%m-%d')}, jax {jax.__version__}, compiled from a CPU host "
        "(`pallas_kernels.targets`). Memory: GPU shared memory of the launch (XLA thunk "
        "sequence), TPU VMEM of the double-buffered blocks plus scratch; regs / spills: "
        "`ptxas -v` on the compiled PTX (bytes of spill stores + loads). Compile time: "
        "lowering + compilation on a loaded 2-core machine.",
        "",
        HEADER,
        "|" + "---|" * (HEADER.count("|") - 1),
    ]
    print("\n".join(lines), flush=True)
    for name in names:
        missing = targets.toolchain_missing(name)
        if missing is not None:
            row = f"| | | | {name} | skipped: {missing} | | | | | | |"
            print(row, flush=True)
            lines.append(row)
            continue
        platform = targets.get_target(name).platform
        chosen = cases(platform, True) + (cases(platform, False) if args.all else [])
        for case in chosen:
            if kernels and case.kernel not in kernels:
                continue
            row = measure(case, name)
            print(row, flush=True)
            lines.append(row)
    lines += ["", "## Known issues (`pallas_kernels.targets.KNOWN_ISSUES`: `auto` must not pick Pallas there)", ""]
    lines += [
        "- " + ", ".join(f"{k}={v}" for k, v in fields.items()) + f": {reason}"
        for fields, reason in targets.KNOWN_ISSUES
    ]
    print("\n".join(lines[-len(targets.KNOWN_ISSUES) - 2 :]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
