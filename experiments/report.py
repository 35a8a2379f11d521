"""Regenerate ``experiments/RESULTS.md`` (tables + plots) from the runs on disk.

    python -m experiments.report [--runs runs/] [--out experiments/RESULTS.md]

Reads ``<runs>/<experiment>/<run>/{result.json, metrics.jsonl}``, groups the runs by
(experiment, variant, size), and writes one section per group: what the paper found, a
table (one row per model; the Bayes-optimal learner where the task has one) and a figure
(eval accuracy over training, and the task's curve across models) into
``<out dir>/results/``. Hand-written commentary belongs in ``experiments/notes/<experiment>.md``,
which is included verbatim under the section; RESULTS.md itself is never edited by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ssmjax.train.metrics import read_metrics

TITLES = {
    "selective_copying": "Selective copying",
    "mqar": "Multi-query associative recall (MQAR)",
    "induction_heads": "Induction heads: length extrapolation",
    "boolean_icl": "In-context learning of Boolean functions",
    "algorithmic": "Algorithmic tasks: train short, test long",
}

PAPER_FINDINGS = {
    "selective_copying": (
        "Gu & Dao (2023, Mamba, Table 1): models with input-dependent (selective) state updates "
        "(S6/Mamba) and attention solve selective copying; time-invariant SSMs (S4, S4D, LRU-like "
        "recurrences) do not, because a fixed convolution cannot skip noise tokens of varying spacing."),
    "mqar": (
        "Arora et al. (2023, Zoology): attention solves MQAR at every size; gated convolutions and "
        "recurrences with a small state lose accuracy as the number of key-value pairs grows (their "
        "state must hold every pair); a few attention layers in a hybrid recover it."),
    "induction_heads": (
        "Gu & Dao (2023, Mamba, Table 11): Mamba trained at length 256 keeps perfect accuracy up to "
        "2^20 tokens; attention with absolute position embeddings fails beyond the training length "
        "(rotary/xPos variants extrapolate only a little). The attention mixer here uses RoPE."),
    "boolean_icl": (
        "Bhattamishra et al. (2023): Transformers learn conjunctions, disjunctions and sparse "
        "majorities in context close to the optimal learner; sparse parities are hard to learn "
        "without many more examples; some recurrent models come close on the easier classes."),
    "algorithmic": (
        "Dehghani et al. (2019, Universal Transformers): standard Transformers fit copy, reverse and "
        "addition at the training lengths but fail at longer test lengths; sequence accuracy drops "
        "sharply beyond the training length."),
}

MODEL_ORDER = ("attention", "s4d", "s5", "lru", "mamba", "mamba2", "gla", "gated_deltanet", "mlstm")


def load_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``<runs>/<experiment>/<run>/result.json`` with its metrics rows."""
    runs = []
    for path in sorted(Path(runs_dir).glob("*/*/result.json")):
        result = json.loads(path.read_text())
        result["metrics"] = read_metrics(path.parent / "metrics.jsonl")
        result["dir"] = str(path.parent)
        runs.append(result)
    return runs


def _model_key(model: str):
    base = model.split("*")[0].split(",")[0]
    rank = MODEL_ORDER.index(base) if base in MODEL_ORDER else len(MODEL_ORDER)
    return (rank, "," in model or "*" in model, model)


def _group_key(run):
    return (run.get("experiment", "?"), run.get("variant", ""), run.get("size", "cpu"))


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _params(n) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def table(runs: list[dict[str, Any]]) -> str:
    """A markdown table, one row per run (plus the reference learner where present)."""
    columns = []
    for run in runs:
        for column in (run.get("eval") or {}).get("summary", {}):
            if column not in columns:
                columns.append(column)
    header = ["model", "params", "steps", "status", *columns, "train loss", "time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in sorted(runs, key=lambda r: _model_key(r.get("model", ""))):
        summary = (run.get("eval") or {}).get("summary", {})
        steps = f"{run.get('step', '-')}" + ("" if run.get("step") == run.get("steps") else f"/{run.get('steps')}")
        wall = run.get("wall_s")
        row = [f"`{run.get('model', '?')}`", _params(run.get("params")), steps, run.get("status", "?"),
               *[_format(summary.get(c)) for c in columns], _format(run.get("train_loss")),
               "-" if wall is None else f"{wall / 60:.1f} min"]
        lines.append("| " + " | ".join(row) + " |")
    reference = next((r["eval"]["curve"]["reference"] for r in runs
                      if (r.get("eval") or {}).get("curve", {}).get("reference")), None)
    if reference and reference.get("summary"):
        row = [reference["label"], "-", "-", "-", *[_format(reference["summary"].get(c)) for c in columns], "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_group(runs: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Left: eval accuracy against the training step; right: the task curve per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    reference, curve_meta = None, {}
    for i, run in enumerate(sorted(runs, key=lambda r: _model_key(r.get("model", "")))):
        color, label = f"C{i % 10}", run.get("model", "?")
        evals = [r for r in run["metrics"] if r.get("split") == "eval"]
        if evals:
            ax_train.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", ms=3, color=color, label=label)
        curve = (run.get("eval") or {}).get("curve")
        if curve:
            ax_curve.plot(curve["x"], curve["y"], "o-", ms=3, color=color, label=label)
            curve_meta = curve_meta or curve
            reference = reference or curve.get("reference")
    if reference:
        ax_curve.plot(curve_meta["x"], reference["y"], "k--", label=reference["label"])
    ax_train.set(xlabel="training step", ylabel="eval accuracy", ylim=(-0.02, 1.02), title="during training")
    if curve_meta:
        ax_curve.set(xlabel=curve_meta["xlabel"], ylabel=curve_meta["ylabel"], ylim=(-0.02, 1.02), title="final model")
        if curve_meta.get("xscale") == "log":
            ax_curve.set_xscale("log", base=2)
        if curve_meta.get("xticklabels"):
            ax_curve.set_xticks(curve_meta["x"], curve_meta["xticklabels"])
        if curve_meta.get("vline") is not None:
            ax_curve.axvline(curve_meta["vline"], color="gray", ls=":", lw=1)
    for ax in (ax_train, ax_curve):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _section_title(experiment: str, variant: str, size: str) -> str:
    title = TITLES.get(experiment, experiment)
    if variant:
        title += f": {variant}"
    return title + (" (paper size)" if size == "paper" else "")


def build_report(runs_dir: str | Path, out: str | Path, notes_dir: str | Path | None = None) -> str:
    """Write ``out`` (markdown) and its figures; returns the markdown."""
    out = Path(out)
    notes_dir = Path(notes_dir) if notes_dir is not None else out.parent / "notes"
    runs = load_runs(runs_dir)
    groups: dict[tuple, list] = defaultdict(list)
    for run in runs:
        groups[_group_key(run)].append(run)
    order = list(TITLES)
    lines = ["# Results", "",
             f"Generated by `python -m experiments.report` from `{runs_dir}` on "
             f"{datetime.date.today().isoformat()}; do not edit by hand (commentary goes in "
             "`experiments/notes/<experiment>.md`). Reproduce a row with "
             "`python -m experiments <experiment> --model <model> [--set ...]`; the settings of each run "
             "are in its `config.json`.", ""]
    if not groups:
        lines.append(f"No runs found under `{runs_dir}`.")
    seen_notes = set()
    for key in sorted(groups, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[1], k[2])):
        experiment, variant, size = key
        group = groups[key]
        title = _section_title(experiment, variant, size)
        image = out.parent / "results" / ("-".join(p for p in (experiment, variant, size if size != "cpu" else "") if p) + ".png")
        plot_group(group, image, title)
        lines += [f"## {title}", ""]
        if experiment in PAPER_FINDINGS:
            lines += [f"*Paper:* {PAPER_FINDINGS[experiment]}", ""]
        lines += [table(group), "", f"![{title}]({image.relative_to(out.parent).as_posix()})", ""]
        note = notes_dir / f"{experiment}.md"
        if note.exists() and experiment not in seen_notes:
            seen_notes.add(experiment)
            lines += [note.read_text().strip(), ""]
    text = "\n".join(lines).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="runs directory (default: runs/)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"),
                        help="markdown file to write (default: experiments/RESULTS.md)")
    args = parser.parse_args(argv)
    build_report(args.runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
