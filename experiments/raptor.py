"""Block-recurrent dynamics of a small ViT on MNIST: the layer-by-layer similarity matrix,
its phases, and block-recurrent surrogates (Raptor) with k = 1, 2, 3 shared blocks.

    python -m experiments raptor --model attention [--set key=value ...]

The claim under test (Jacobs, Fel, Hakim, Brondetta, Ba & Keller, 2025, "Block-Recurrent
Dynamics in Vision Transformers", arXiv:2512.19941): the L blocks of a trained ViT fall into
a few contiguous phases of similar layers (block-diagonal layer-similarity matrices), and
the ViT is recovered by a surrogate of k << L blocks, each phase one block applied as many
times as the phase is long, trained to match every intermediate representation
(:mod:`ssmjax.models.raptor` writes the equations out). Their foundation-model result: a
2-block Raptor of DINOv2 ViT-B recovers 96% of its ImageNet-1k linear-probe accuracy.

The protocol here, one run:

1. **ViT.** ``n_layers`` bidirectional backbone blocks of ``--model`` (attention with RoPE;
   other registered mixers pass through, but only attention has been run) over the ``(28 / patch_size)^2`` patches of an
   MNIST digit (:func:`experiments.tasks.image_patches`), a cls token (or mean pooling)
   and a linear head, trained by cross-entropy (:func:`ssmjax.train.fit.fit`, Adam,
   per-epoch cosine, the best validation epoch kept) with stochastic depth ``drop_path``.
2. **Similarity.** Linear CKA between the token representations ``a_0..a_L`` (every token
   of the first ``analysis_rows`` test digits) gives ``S [L + 1, L + 1]``.
3. **Phases.** For each ``k`` in ``ks``, the contiguous segmentation of the block outputs
   ``a_1..a_L`` into ``k`` phases that best fits ``S[1:, 1:]`` by a block-constant matrix
   (``block_fit``: the fraction of its variance explained).
4. **Raptor.** ``k`` tied blocks (with the paper's depth conditioning unless
   ``depth_gains=false``) trained on the frozen ViT's activations, as the paper: first
   teacher-forced (each block maps the ViT's ``a_{l-1}`` to ``a_l``), then autoregressive
   (the surrogate's own rollout from ``a_0`` matched to ``a_1..a_L``), each stage
   ``round(raptor_step_ratio * steps)`` updates on the training digits, MSE with the cls
   token weighted ``cls_weight`` against the patch tokens.
5. **Scores** on the test digits: the ViT's head on the surrogate's ``a_hat_L``: accuracy,
   its ratio to the ViT's (*recovery*), agreement with the ViT's predictions, and the R^2
   of ``a_hat_L`` (and of every layer on the analysis digits) against the ViT's; and, as
   the floor, the ViT's head on ``a_0`` (no blocks at all).

``--set steps=5`` runs the whole protocol end to end in 56 s on 2 quiet cores (nearly all
compilation and the 10k-digit test passes, ~15 s per k).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import regression
from experiments.tasks import image_patches
from ssmjax.checks import check_choice, check_positive_int
from ssmjax.data.images import load_mnist
from ssmjax.models import parse_mixers
from ssmjax.models.activations import ACTIVATIONS
from ssmjax.models.raptor import (POOLINGS, Raptor, ViT, find_phases, r2_score, similarity_matrix,
                                  trajectory_mse)
from ssmjax.train.fit import FitConfig, fit, predict_in_batches

EXPERIMENT = "raptor"
DESCRIPTION = ("block-recurrent surrogates (Raptor) of a small MNIST ViT: CKA layer-similarity phases and the "
               "accuracy k = 1, 2, 3 tied blocks recover (Jacobs et al. 2025)")
PAPER_FINDING = (
    "Jacobs et al. (2025, arXiv:2512.19941): trained ViTs show a few contiguous phases in their layer-similarity "
    "matrices, and a surrogate of k << L blocks, each phase one block applied recurrently, fitted to all "
    "intermediate activations, recovers the ViT: 2 blocks recover 96% of DINOv2 ViT-B's ImageNet-1k linear-probe "
    "accuracy at the same compute; stochastic depth and training promote the block-recurrent structure.")


@dataclasses.dataclass(frozen=True)
class RaptorConfig:
    """One run (module docstring)."""

    model: str = "attention"
    d_model: int = 64
    n_layers: int = 8
    num_heads: int = 4
    mlp: str = "gelu"
    mlp_ratio: float = 2.0
    patch_size: int = 7
    pooling: str = "cls"
    drop_path: float = 0.1
    steps: int = 780  # ViT updates (2 epochs of the 50k training digits at batch 128)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_rows: int = 2000
    ks: tuple = (1, 2, 3)
    raptor_step_ratio: float = 0.125  # updates of each Raptor stage, as a fraction of steps
    raptor_lr: float = 1e-3
    depth_gains: bool = True
    cls_weight: float = 0.5
    analysis_rows: int = 512
    data_dir: str = ""
    seed: int = 0


SIZES = {
    # L = 8, d = 64, 17 tokens: 4 min on 2 cores at load ~2 (ViT 1.7 min, ~36 s per k), ~8 min at load 4-8.
    "cpu": RaptorConfig(),
    # approx. (the paper's headline models are DINOv2 ViT-S/B, L = 12, on ImageNet-1k; not run here): a
    # deeper and wider ViT over 4x4 patches, trained longer, and the paper's 2-4 blocks.
    "paper": RaptorConfig(d_model=192, n_layers=12, num_heads=3, mlp_ratio=4.0, patch_size=4, drop_path=0.2,
                          steps=7800, ks=(2, 3, 4), raptor_step_ratio=0.5, analysis_rows=1024),
}


def check_config(config: RaptorConfig) -> None:
    parse_mixers(config.model, 1)
    check_choice("pooling", config.pooling, POOLINGS)
    check_choice("mlp", config.mlp, ("gated", *ACTIVATIONS))
    for name in ("d_model", "n_layers", "num_heads", "steps", "batch_size", "val_rows", "analysis_rows"):
        check_positive_int(name, getattr(config, name))
    if config.d_model % config.num_heads:
        raise ValueError(f"num_heads: {config.num_heads} does not divide d_model = {config.d_model}")
    if 28 % config.patch_size:
        raise ValueError(f"patch_size: expected a divisor of 28, got {config.patch_size}")
    if not config.ks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.n_layers
                            for k in config.ks):
        raise ValueError(f"ks: expected block counts in [1, n_layers = {config.n_layers}], got {config.ks}")
    if config.raptor_step_ratio <= 0:
        raise ValueError(f"raptor_step_ratio: expected > 0, got {config.raptor_step_ratio}")
    if not 0.0 <= config.cls_weight <= 1.0:
        raise ValueError(f"cls_weight: expected a weight in [0, 1], got {config.cls_weight}")


def load_data(config: RaptorConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``train`` / ``val`` / ``test``: MNIST patches ``[n, (28 / p)^2, p^2]`` in [0, 1) and
    labels; ``val`` is the first ``val_rows`` of MNIST's validation split."""
    splits = load_mnist(config.data_dir or None)
    rows = dict(train=None, val=config.val_rows, test=None)
    source = dict(train="train", val="valid", test="test")
    return {name: (image_patches(splits[source[name]].images[:n], config.patch_size), splits[source[name]].labels[:n])
            for name, n in rows.items()}


def build_vit(config: RaptorConfig) -> ViT:
    return ViT(num_classes=10, d_model=config.d_model, n_layers=config.n_layers, mixer=config.model,
               mixer_fields=_mixer_fields(config), mlp=config.mlp, mlp_ratio=config.mlp_ratio,
               pooling=config.pooling, drop_path=config.drop_path)


def build_raptor(config: RaptorConfig, phases: tuple[int, ...]) -> Raptor:
    return Raptor(phase_lengths=tuple(phases), d_model=config.d_model, mixer=config.model,
                  mixer_fields=_mixer_fields(config), mlp=config.mlp, mlp_ratio=config.mlp_ratio,
                  depth_gains=config.depth_gains)


def _mixer_fields(config: RaptorConfig) -> dict:
    return {"attention": {"num_heads": config.num_heads}}


def _fit_config(config: RaptorConfig, steps: int, rows: int, lr: float) -> tuple[FitConfig, int, int]:
    """``(FitConfig, training rows used, updates)`` for about ``steps`` updates
    (:func:`experiments.regression.epoch_plan`)."""
    epochs, used = regression.epoch_plan(steps, rows, config.batch_size)
    fit_config = FitConfig(epochs=epochs, batch_size=config.batch_size, lr=lr, lr_schedule="cosine", patience=0,
                           seed=config.seed, grad_clip=config.grad_clip, weight_decay=config.weight_decay,
                           optimizer="adamw" if config.weight_decay else "adam")
    return fit_config, used, epochs * (used // config.batch_size)


def train_vit(config: RaptorConfig, data: dict, verbose: bool) -> tuple[ViT, Any, dict[str, Any], np.ndarray]:
    """The ViT trained by cross-entropy with stochastic depth: ``(model, params, row with its
    test accuracy and that of its head on a_0 with no blocks, its test predictions)``."""
    vit = build_vit(config)
    x, y = data["train"]
    params = jax.jit(vit.init)(jax.random.key(config.seed), jnp.asarray(x[:1]))
    logits = jax.jit(vit.apply)

    def loss_fn(p, batch, key):
        xb, yb = batch
        out = vit.apply(p, xb, True, rngs={"drop_path": key})
        return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean()

    def predict(p, split):
        return predict_in_batches(partial(logits, p), (data[split][0],), config.batch_size).argmax(-1)

    fit_config, used, updates = _fit_config(config, config.steps, len(x), config.lr)
    start = time.perf_counter()
    result = fit(loss_fn, params, (x[:used], y[:used]), lambda p: float(np.mean(predict(p, "val") != data["val"][1])),
                 fit_config, verbose=verbose)
    train_s = time.perf_counter() - start
    predictions = predict(result.params, "test")
    head_on_a0 = jax.jit(lambda p, xb: vit.apply(p, vit.apply(p, xb, method=ViT.embed), method=ViT.classify))
    no_blocks = predict_in_batches(partial(head_on_a0, result.params), (data["test"][0],), config.batch_size)
    row = dict(accuracy=float(np.mean(predictions == data["test"][1])), updates=updates,
               params=regression.count_params(result.params), train_s=train_s,
               head_on_a0_accuracy=float(np.mean(no_blocks.argmax(-1) == data["test"][1])))
    return vit, result.params, row, predictions


def layer_similarity(vit: ViT, params, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(trajectory [L + 1, n, T, d], CKA matrix [L + 1, L + 1])`` on ``patches``; CKA over
    every token of the ``n`` digits."""
    traj = jax.jit(partial(vit.apply, method=ViT.trajectory))(params, jnp.asarray(patches))
    flat = traj.reshape(traj.shape[0], -1, traj.shape[-1])
    return np.asarray(traj), np.asarray(jax.jit(similarity_matrix)(flat))


def train_raptor(config: RaptorConfig, vit: ViT, vit_params, phases: tuple[int, ...], data: dict,
                 analysis: tuple[np.ndarray, np.ndarray], vit_predictions: np.ndarray, verbose: bool) -> dict[str, Any]:
    """A Raptor with ``phases`` fitted to the frozen ViT (teacher-forced, then
    autoregressive); its test scores (module docstring). ``analysis``: ``(patches,
    ViT trajectory [L + 1, n, T, d])`` of the analysis digits."""
    raptor = build_raptor(config, phases)
    cls_weight = config.cls_weight if config.pooling == "cls" else None
    x = data["train"][0]
    a0 = jax.jit(partial(vit.apply, vit_params, method=ViT.embed))(jnp.asarray(x[:1]))
    params = jax.jit(raptor.init)(jax.random.key(config.seed + 1), a0)

    def teacher_forced(p, batch, key, teacher):  # the frozen ViT's parameters arrive as ``teacher``
        a = jax.lax.stop_gradient(vit.apply(teacher, batch[0], method=ViT.trajectory))
        return trajectory_mse(raptor.apply(p, a[:-1], method=Raptor.teacher_forced), a[1:], cls_weight)

    def autoregressive(p, batch, key, teacher):
        a = jax.lax.stop_gradient(vit.apply(teacher, batch[0], method=ViT.trajectory))
        return trajectory_mse(raptor.apply(p, a[0]), a[1:], cls_weight)

    val_x = jnp.asarray(data["val"][0][:config.batch_size])
    val_loss = jax.jit(autoregressive)
    stage_steps = max(1, round(config.raptor_step_ratio * config.steps))
    fit_config, used, updates = _fit_config(config, stage_steps, len(x), config.raptor_lr)
    start = time.perf_counter()
    for loss_fn in (teacher_forced, autoregressive):
        params = fit(loss_fn, params, (x[:used],), lambda p: float(val_loss(p, (val_x,), None, vit_params)),
                     fit_config, loss_args=(vit_params,), verbose=verbose).params
    train_s = time.perf_counter() - start

    @jax.jit
    def surrogate(xb):  # the ViT's head on the rollout from the ViT's a_0: (logits, a_hat_1..a_hat_L)
        a_hat = raptor.apply(params, vit.apply(vit_params, xb, method=ViT.embed))
        return vit.apply(vit_params, a_hat[-1], method=ViT.classify), jnp.swapaxes(a_hat, 0, 1)

    test_x, test_y = data["test"]
    pred = predict_in_batches(lambda xb: surrogate(xb)[0], (test_x,), config.batch_size).argmax(-1)
    a_hat = np.swapaxes(predict_in_batches(lambda xb: surrogate(xb)[1], (analysis[0],), config.batch_size), 0, 1)
    a = analysis[1][1:]
    return dict(accuracy=float(np.mean(pred == test_y)), agreement=float(np.mean(pred == vit_predictions)),
                r2_final=r2_score(a_hat[-1], a[-1]), r2_layers=[r2_score(h, t) for h, t in zip(a_hat, a)],
                params=regression.count_params(params), updates=2 * updates, train_s=train_s)


def run(config: RaptorConfig, run_dir: Path, verbose: bool = True) -> Path:
    """The whole protocol (module docstring); writes ``result.json`` and returns ``run_dir``."""
    check_config(config)
    start = time.perf_counter()
    data = load_data(config)
    vit, vit_params, vit_row, vit_predictions = train_vit(config, data, verbose)
    if verbose:
        print(f"[{run_dir.name}] ViT L={config.n_layers}: test accuracy {vit_row['accuracy']:.4f} "
              f"({vit_row['params']:,} params, {vit_row['train_s']:.0f}s)", flush=True)
    analysis = data["test"][0][:config.analysis_rows]
    trajectory, similarity = layer_similarity(vit, vit_params, analysis)
    raptors = []
    for k in config.ks:
        phases, fit_r2 = find_phases(similarity[1:, 1:], k)
        row = dict(k=k, phases=list(phases), block_fit=fit_r2,
                   **train_raptor(config, vit, vit_params, phases, data, (analysis, trajectory), vit_predictions,
                                    verbose))
        row["recovery"] = row["accuracy"] / vit_row["accuracy"]
        raptors.append(row)
        if verbose:
            print(f"[{run_dir.name}] Raptor k={k} phases {phases}: accuracy {row['accuracy']:.4f} "
                  f"(recovery {row['recovery']:.3f}, R^2 of a_L {row['r2_final']:.3f}, {row['train_s']:.0f}s)",
                  flush=True)
    regression.write_json(run_dir / "result.json", dict(
        experiment=EXPERIMENT, model=config.model, status="done", vit=vit_row, similarity=similarity.tolist(),
        raptors=raptors, wall_s=time.perf_counter() - start, reduced_size=True))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    return regression.main(EXPERIMENT, DESCRIPTION, SIZES, run, argv)


# ----------------------------------------------------------------------------- report


def plot_similarity(similarity: np.ndarray, phases: list[int] | None, path: Path, title: str) -> Path:
    """The CKA matrix over ``a_0..a_L`` with the boundaries of ``phases`` (of ``a_1..a_L``)
    drawn (a bare :class:`matplotlib.figure.Figure`: no pyplot backend is touched)."""
    from matplotlib.figure import Figure

    size = len(similarity)
    fig = Figure(figsize=(5.2, 4.4))
    ax = fig.subplots()
    image = ax.imshow(similarity, vmin=0, vmax=1, cmap="viridis")
    for i in range(size):
        for j in range(size):
            ax.text(j, i, f"{similarity[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if similarity[i, j] > 0.6 else "white")
    for edge in np.cumsum(phases or [])[:-1]:  # boundary after block output a_edge
        ax.axhline(edge + 0.5, color="red", lw=1.5)
        ax.axvline(edge + 0.5, color="red", lw=1.5)
    ax.set_xticks(range(size), [f"a{i}" for i in range(size)], fontsize=7)
    ax.set_yticks(range(size), [f"a{i}" for i in range(size)], fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, label="linear CKA")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def raptor_table(vit: dict[str, Any], raptors: list[dict[str, Any]], n_layers: int) -> str:
    """Markdown: the ViT, its head on the patch embedding ``a_0`` (the floor of any
    surrogate read out by that head), then one row per Raptor."""
    lines = ["| model | phases | block fit | params | test acc | recovery | agreement w/ ViT | R^2 of a_L |",
             "|---|---|---|---|---|---|---|---|",
             f"| ViT, L = {n_layers} untied blocks | - | - | {vit['params']:,} | {vit['accuracy']:.4f} | 1 | 1 | 1 |"]
    if "head_on_a0_accuracy" in vit:
        lines.append(f"| no blocks: the ViT's head on a_0 | - | - | - | {vit['head_on_a0_accuracy']:.4f} | "
                     f"{vit['head_on_a0_accuracy'] / vit['accuracy']:.3f} | - | - |")
    for r in raptors:
        lines.append(f"| Raptor, k = {r['k']} | {'+'.join(map(str, r['phases']))} | {r['block_fit']:.3f} | "
                     f"{r['params']:,} | {r['accuracy']:.4f} | {r['recovery']:.3f} | {r['agreement']:.3f} | "
                     f"{r['r2_final']:.3f} |")
    return "\n".join(lines)


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """Per run: the ViT/Raptor table and the similarity matrix (a figure in ``figures_dir``)."""
    runs = regression.read_runs(run_dirs, EXPERIMENT)
    if not runs:
        return ""
    lines = ["## Raptor: block-recurrent surrogates of a ViT (Jacobs et al. 2025)", "",
             f"**Paper finding.** {PAPER_FINDING}", "",
             "MNIST ViT trained from scratch, CPU size; phases from the linear-CKA matrix of the block outputs, the "
             "surrogate read out by the ViT's own head; recovery = Raptor accuracy / ViT accuracy. See "
             "`experiments/notes/raptor.md`.", ""]
    for d, config, result in runs:
        c = config.get("config", {})
        head = (f"`{d.name}` (`{config.get('model')}`, L = {c.get('n_layers')}, d = {c.get('d_model')}, "
                f"patch {c.get('patch_size')}, stochastic depth {c.get('drop_path')}, {c.get('steps')} ViT updates")
        if not result:
            lines += [head + "):", "", "incomplete", ""]
            continue
        lines.append(head + f", {result['raptors'][0]['updates']} Raptor updates, teacher-forced then "
                            "autoregressive):")
        lines += ["", raptor_table(result["vit"], result["raptors"], c.get("n_layers")), ""]
        figures_dir.mkdir(parents=True, exist_ok=True)
        widest = max(result["raptors"], key=lambda r: r["k"])
        path = plot_similarity(np.asarray(result["similarity"]), widest["phases"],
                               figures_dir / f"raptor_{d.name}_similarity.png",
                               f"{d.name}: linear CKA, phases for k = {widest['k']}")
        lines += [f"![layer similarity of {d.name}]({figures_dir.name}/{path.name})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
