"""A results report (tables + plots) from the runs on disk.

    python -m experiments.report [--runs runs/] [--out FILE] [--keep]

Finds every run folder below ``--runs`` at any depth (``runs/<experiment>/<run>/`` as
``python -m experiments`` writes them, ``runs/suite/<experiment>/<run>/`` as the suite
does): a folder with ``config.json`` or ``result.json``. It groups the runs by
(experiment, variant, size), read from those files, and writes one section per group:
what the paper found, a table (one row per run, labelled by its run name, its model and
the settings that differ between the group's runs; the Bayes-optimal learner where the
task has one) and a figure (eval accuracy over training, and the task's curve across
models) into ``<out dir>/results/``. A run without ``result.json`` (still running, or
killed), or resumed past the ``result.json`` of its interruption, is listed with status
``incomplete`` and the last step in its ``metrics.jsonl``.

The report goes to ``<runs>/RESULTS.md`` unless ``--out`` names a file; the committed
``experiments/RESULTS.md`` is written only when asked for by name (``make results``). Hand-written commentary belongs in ``experiments/notes/<experiment>.md``,
which is included verbatim under the section; RESULTS.md itself is never edited by hand.
``--keep`` keeps the sections of the existing file that the runs on disk do not produce
(e.g. to add the sequence-classification sections without re-running the synthetic suite).
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments import protocols
from ssmjax.train.metrics import read_metrics

TITLES = {
    "selective_copying": "Selective copying",
    "mqar": "Multi-query associative recall (MQAR)",
    "induction_heads": "Induction heads: length extrapolation",
    "boolean_icl": "In-context learning of Boolean functions",
    "algorithmic": "Algorithmic tasks: train short, test long",
    "lm": "Character-level language modelling (tinyshakespeare)",
    "smnist": "Sequential MNIST",
    "psmnist": "Permuted sequential MNIST",
    "scifar": "Sequential CIFAR-10",
    "listops": "LRA ListOps",
    "lra_text": "LRA Text (byte-level IMDb)",
    "lra_retrieval": "LRA Retrieval (AAN)",
    "lra_image": "LRA Image (grayscale CIFAR-10)",
    "pathfinder": "LRA Pathfinder-32",
    "path_x": "LRA Path-X (Pathfinder-128)",
    "arrow_pointing": "Arrow pointing: extrapolation to larger images",
    "urpe": "URPE vs RPE-only attention: position-sensitive targets",
    "sequential_functions": "Sequential functions learned in context (automata, linear recurrences)",
    "structural_recursion": "Structural recursion: binary successor and tree traversals",
}

#: Test accuracy (%) reported by the papers, per LRA task (Path-X "fail": chance level).
LRA_TASKS = ("listops", "lra_text", "lra_retrieval", "lra_image", "pathfinder", "path_x")
LRA_PAPERS = {
    "LRA Transformer (Tay et al., 2021)": (36.37, 64.27, 57.46, 42.44, 71.40, "fail"),
    "S4 (Gu et al., 2022)": (59.60, 86.82, 90.90, 88.65, 94.20, 96.35),
    "S5 (Smith et al., 2023)": (62.15, 89.31, 91.40, 88.00, 95.33, 98.58),
    "LRU (Orvieto et al., 2023)": (60.2, 89.4, 89.9, 89.0, 95.1, 94.2),
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
    "sequential_functions": (
        "In-context learning of sequential function classes: given a few (input, output) sequence pairs of one "
        "randomly drawn automaton or linear recurrence, a transformer produces the output of a new input, its "
        "accuracy rising with the number of examples."),
    "structural_recursion": (
        "Transformers trained to emulate structural recursion (binary successor, tree traversals) fit the "
        "training sizes but generalise poorly to longer inputs or deeper trees, learning shortcuts rather than the "
        "recursion."),
    "urpe": (
        "Luo et al. (2022, URPE): attention with relative positions only in the logits is row-stochastic, so it "
        "maps a sequence of identical tokens to identical outputs and cannot fit position-dependent targets; "
        "multiplying the attention probabilities by a learned Toeplitz matrix after the softmax (URPE) can."),
    "lm": (
        "nanoGPT (Karpathy, shakespeare_char, README): the CPU baby GPT (4 layers, 4 heads, n_embd 128, "
        "context 64, batch 12, 2000 iterations, ~0.8M parameters) reaches a validation loss of about 1.88 "
        "nats/char; the GPU config (6 layers, 6 heads, 384, context 256, batch 64, dropout 0.2, 5000 "
        "iterations, 10.7M) reaches 1.4697. The surveyed language-model papers (GLA, DeltaNet/Gated DeltaNet, "
        "xLSTM, Mamba/Mamba-2, RetNet, HGRN2, RAT) report gated/selective linear recurrences within a few "
        "percent of attention's perplexity at equal parameters and tokens, time-invariant SSMs (S4D, S5, LRU) "
        "and classic RNNs further behind, and decoding with a constant-size state instead of a growing KV cache."),
}

for _task in ("listops", "lra_text", "lra_retrieval", "lra_image", "pathfinder", "path_x"):
    PAPER_FINDINGS[_task] = (
        "Test accuracy (%), " + "; ".join(f"{paper}: {numbers[LRA_TASKS.index(_task)]}"
                                          for paper, numbers in LRA_PAPERS.items())
        + ". The SSMs (S4, S5, LRU) beat the Transformer by a wide margin on every task; on Path-X every "
        "Transformer of the LRA paper stays at chance. The LRA summary table below puts all tasks side by side.")
PAPER_FINDINGS.update({
    "smnist": "S5 (Smith et al., 2023): 99.65% test accuracy on sMNIST (784 pixels one per step).",
    "psmnist": ("S5 (Smith et al., 2023): 98.67% test accuracy on psMNIST (the 784 pixels in one fixed "
                "random order, destroying locality). Our rows are CPU size (see the notes)."),
    "scifar": "sCIFAR (S4, Gu et al., 2022): 1024 RGB pixels one per step, causal; the SSM papers report about 88-91%.",
    "arrow_pointing": (
        "pLSTM (Pöppel et al., 2025): trained on small images and tested on larger ones with objects of the "
        "same pixel size, pLSTM (a 2-D recurrence whose transitions follow the image grid) extrapolates, while "
        "ViT (attention with 1-D positions over patches) drops toward chance."),
})

MODEL_ORDER = ("attention", "s4d", "s5", "lru", "mamba", "mamba2", "gla", "gated_deltanet", "mlstm")


def _run_dirs(runs_dir: Path) -> list[Path]:
    """Folders below ``runs_dir`` (any depth) holding a run's ``config.json`` or
    ``result.json``, outermost only: a run's own sub-folders (its checkpoints, the per-fit
    folders of an LTSF run) are part of it, not runs."""
    found = {p.parent for name in ("config.json", "result.json") for p in runs_dir.rglob(name)}
    return sorted(d for d in found if "checkpoints" not in d.relative_to(runs_dir).parts
                  and not any(parent in found for parent in d.parents))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """One run: ``result.json`` (or, for an incomplete run, ``config.json``'s metadata with
    ``status="incomplete"`` and the last logged step), its metrics rows under ``"metrics"``
    and its settings under ``"config"``."""
    run_dir = Path(run_dir)
    saved = _read_json(run_dir / "config.json")
    metrics = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    result = _read_json(run_dir / "result.json")
    last = max((row["step"] for row in metrics if "step" in row), default=0)
    resumed = result.get("status") == "interrupted" and last > result.get("step", last)
    if not result or resumed:  # none yet, or an interrupted run resumed past it (running or killed again)
        result = {k: v for k, v in saved.items() if k != "config"}
        result.update(status="incomplete", step=last, steps=saved.get("config", {}).get("steps"))
    result.setdefault("run", run_dir.name)
    result.update(metrics=metrics, config=saved.get("config", {}), dir=str(run_dir))
    return result


def load_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every run folder below ``runs_dir`` (see :func:`load_run`), nested at any depth."""
    return [load_run(d) for d in _run_dirs(Path(runs_dir))]


def differing_settings(runs: list[dict[str, Any]]) -> list[str]:
    """The config fields (other than ``model``) whose values are not the same in every run."""
    keys = sorted({k for run in runs for k in run.get("config", {})} - {"model"})
    return [k for k in keys if len({json.dumps(run.get("config", {}).get(k), sort_keys=True) for run in runs}) > 1]


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


def _settings(run: dict[str, Any], keys: list[str]) -> str:
    config = run.get("config", {})
    return ", ".join(f"{k}={json.dumps(config[k]) if not isinstance(config.get(k), str) else config[k]}"
                     for k in keys if k in config) or "-"


def _run_order(run: dict[str, Any]):
    return (_model_key(run.get("model", "")), run.get("run", ""))


def table(runs: list[dict[str, Any]]) -> str:
    """A markdown table, one row per run (plus the reference learner where present). Rows are
    labelled by run name and model, plus a ``settings`` column with the fields that differ
    between the runs when any do."""
    columns = []
    for run in runs:
        for column in (run.get("eval") or {}).get("summary", {}):
            if column not in columns:
                columns.append(column)
    differing = differing_settings(runs)
    labels = ["run", "model", *(["settings"] if differing else [])]
    header = [*labels, "params", "steps", "status", *columns, "train loss", "time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in sorted(runs, key=_run_order):
        summary = (run.get("eval") or {}).get("summary", {})
        steps = f"{run.get('step', '-')}" + ("" if run.get("step") == run.get("steps") else f"/{run.get('steps')}")
        wall = run.get("wall_s")
        row = [f"`{run.get('run', '?')}`", f"`{run.get('model', '?')}`",
               *([_settings(run, differing)] if differing else []), _params(run.get("params")), steps,
               run.get("status", "?"), *[_format(summary.get(c)) for c in columns], _format(run.get("train_loss")),
               "-" if wall is None else f"{wall / 60:.1f} min"]
        lines.append("| " + " | ".join(row) + " |")
    reference = next((r["eval"]["curve"]["reference"] for r in runs
                      if (r.get("eval") or {}).get("curve", {}).get("reference")), None)
    if reference and reference.get("summary"):
        row = [reference["label"], *["-"] * (len(labels) + 2), *[_format(reference["summary"].get(c)) for c in columns],
               "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def lra_summary(runs: list[dict[str, Any]]) -> str:
    """Test accuracy (%) per LRA task: one row per (model, size) of ours (the best finished run
    of each task; ``*`` marks a run cut short), then the papers' rows (:data:`LRA_PAPERS`)."""
    best: dict[tuple, dict] = {}
    for run in runs:
        accuracy = (run.get("eval") or {}).get("summary", {}).get("test acc")
        if accuracy is None:
            continue
        key = (run.get("model", "?"), run.get("size", "cpu"), run.get("experiment"))
        if key not in best or accuracy > best[key]["accuracy"]:
            best[key] = dict(accuracy=accuracy, done=run.get("status") == "done")
    header = ["model", *(TITLES[t].removeprefix("LRA ") for t in LRA_TASKS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, size in sorted({k[:2] for k in best}, key=lambda k: (_model_key(k[0]), k[1])):
        cells = []
        for task in LRA_TASKS:
            entry = best.get((model, size, task))
            cells.append("-" if entry is None else f"{100 * entry['accuracy']:.2f}" + ("" if entry["done"] else "*"))
        label = f"ours: `{model}`" + (" (paper size)" if size == "paper" else " (CPU size)")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    for paper, numbers in LRA_PAPERS.items():
        lines.append("| " + " | ".join([paper, *map(str, numbers)]) + " |")
    return "\n".join(lines) + "\n\n* run cut short. CPU size: the papers' sequence lengths with a reduced model and budget."


def plot_group(runs: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Left: eval accuracy against the training step; right: the task curve per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    reference, curve_meta = None, {}
    for i, run in enumerate(sorted(runs, key=_run_order)):
        color, label = f"C{i % 10}", run.get("run", "?")
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


def build_report(runs_dir: str | Path, out: str | Path, notes_dir: str | Path | None = None,
                 keep: bool = False) -> str:
    """Write ``out`` (markdown) and its figures; returns the markdown. ``keep``: the sections
    of the existing ``out`` that these runs do not produce stay (in their place; new sections
    go after them), so results from runs no longer on disk are not lost."""
    out = Path(out)
    notes_dir = Path(notes_dir) if notes_dir is not None else out.parent / "notes"
    protocol_dirs: dict[str, list[Path]] = defaultdict(list)
    token_dirs = []
    for run_dir in _run_dirs(Path(runs_dir)):
        experiment = _read_json(run_dir / "config.json").get("experiment")
        (protocol_dirs[experiment] if experiment in protocols.PROTOCOLS else token_dirs).append(run_dir)
    groups: dict[tuple, list] = defaultdict(list)
    for run in map(load_run, token_dirs):
        groups[_group_key(run)].append(run)
    order = list(TITLES)
    lines = ["# Results", "",
             f"Generated by `python -m experiments.report` from `{runs_dir}` on "
             f"{datetime.date.today().isoformat()}; do not edit by hand (commentary goes in "
             "`experiments/notes/<experiment>.md`). Reproduce a row with "
             "`python -m experiments <experiment> --model <model> [--set ...]`; the settings of each run "
             "are in its `config.json`.", ""]
    if not groups and not protocol_dirs:
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
    lra_runs = [run for key, runs in groups.items() if key[0] in LRA_TASKS for run in runs]
    if lra_runs:
        lines += ["## Long Range Arena: summary", "", lra_summary(lra_runs), ""]
    for experiment in [name for name in protocols.PROTOCOLS if protocol_dirs.get(name)]:
        lines += [protocols.load(experiment).report_section(protocol_dirs[experiment], out.parent / "results").strip(), ""]
        note = notes_dir / f"{experiment}.md"
        if note.exists():
            lines += [note.read_text().strip(), ""]
    text = "\n".join(lines).rstrip() + "\n"
    if keep and out.exists():
        text = merge_sections(out.read_text(), text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def _sections(text: str) -> tuple[str, dict[str, str]]:
    """``(preamble, {"## title": section text})`` of a report, in order."""
    head, *parts = text.split("\n## ")
    return head, {"## " + part.split("\n", 1)[0]: "## " + part.rstrip() + "\n" for part in parts}


def merge_sections(old: str, new: str) -> str:
    """``new``'s preamble, then ``old``'s sections in order with those that ``new`` also has
    replaced by ``new``'s, then ``new``'s other sections."""
    _, kept = _sections(old)
    preamble, fresh = _sections(new)
    merged = [fresh.get(title, section) for title, section in kept.items()]
    merged += [section for title, section in fresh.items() if title not in kept]
    return preamble.rstrip() + "\n\n" + "\n".join(merged)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="runs directory, searched at any depth (default: runs/)")
    parser.add_argument("--out", default=None, help="markdown file to write (default: <runs>/RESULTS.md)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the sections of the existing --out file that these runs do not produce")
    args = parser.parse_args(argv)
    if not Path(args.runs).is_dir():
        parser.error(f"--runs: {args.runs!r} is not a directory")
    out = Path(args.out) if args.out else Path(args.runs) / "RESULTS.md"
    build_report(args.runs, out, keep=args.keep)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
