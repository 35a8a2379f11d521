"""One attention layer plus a ReLU feed-forward layer as an approximator of continuous
sequence-to-sequence maps, error against width.

    python -m experiments universal_approximation --model attention [--set key=value ...]

The claim under test (Yun, Bhojanapalli, Rawat, Reddi & Kumar, 2020, "Are Transformers
universal approximators of sequence-to-sequence functions?", and the later results that
one attention layer followed by a ReLU FFN suffices, e.g. Kajitsuka & Sato, 2024, "Are
Transformers with One Layer Self-Attention Using Low-Rank Weight Matrices Universal
Approximators?"): continuous maps ``f: R^{T x d} -> R^{T x d}`` on a compact set are
approximated to any accuracy by such a block (with positional information for maps that
are not permutation-equivariant) as the width grows. Here we measure it: for each map
below and each ``d_model`` in ``widths``, one block ``x + attn(norm x)``, ``+ FFN_relu(norm
.)`` (the backbone with ``n_layers=1``, ``mlp="relu"``, bidirectional attention with RoPE
positions, a linear input projection and output head) is trained by MSE on
``train_rows`` random sequences and scored on ``test_rows`` fresh ones.

The maps (:func:`target_map`), on scalar sequences ``x_1..x_T`` drawn i.i.d. N(0, 1):

* ``moving_average``: ``y_t = mean{x_s : |s - t| <= 1}`` (window cut at the ends);
* ``softmax_context``: ``y_t = sum_s softmax_s(beta x_t x_s) x_s`` with ``beta = 2``;
* ``soft_sort``: soft order statistics, ``y_t = sum_s softmax_s(-(r_s - t)^2 / tau) x_s``
  with soft ranks ``r_s = sum_{u != s} sigmoid((x_s - x_u) / eps)`` (0-based),
  ``eps = 0.1``, ``tau = 0.25``: as ``eps, tau -> 0`` this is ``sort(x)``.

Metric: normalised MSE ``mean (f_hat - f)^2 / var f`` on the test sequences (0 is exact, 1
is predicting the mean). The papers' statements are existence results (no rate, no
training); what differs here is that the widths are small and the block is trained by
gradient descent for a fixed budget, so the table shows achieved, not best possible, error.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import regression
from ssmjax.checks import check_choice
from ssmjax.models import SequenceModel, parse_mixers
from ssmjax.models.activations import ACTIVATIONS

EXPERIMENT = "universal_approximation"
DESCRIPTION = ("one attention + ReLU-FFN layer fitted to continuous seq-to-seq maps (moving average, softmax "
               "context, soft sort): normalised test MSE against width (Yun et al. 2020)")
PAPER_FINDING = (
    "Yun et al. (ICLR 2020) and Kajitsuka & Sato (ICLR 2024): Transformers (with positional encodings) are "
    "universal approximators of continuous sequence-to-sequence maps on compact sets; one self-attention layer "
    "followed by ReLU feed-forward layers is enough, the error going to 0 as the width grows.")
MAPS = ("moving_average", "softmax_context", "soft_sort")
SOFTMAX_BETA = 2.0
SORT_EPS = 0.1
SORT_TAU = 0.25


def moving_average(x: np.ndarray, radius: int = 1) -> np.ndarray:
    """``[b, T] -> [b, T]``: ``y_t = mean{x_s : |s - t| <= radius}``, the window cut at the ends."""
    t = x.shape[1]
    near = np.abs(np.arange(t)[:, None] - np.arange(t)[None, :]) <= radius  # [T, T]
    return x @ (near / near.sum(1, keepdims=True)).T


def _softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis, keepdims=True)


def softmax_context(x: np.ndarray, beta: float = SOFTMAX_BETA) -> np.ndarray:
    """``[b, T] -> [b, T]``: ``y_t = sum_s softmax_s(beta x_t x_s) x_s``."""
    weights = _softmax(beta * x[:, :, None] * x[:, None, :])  # [b, t, s]
    return np.einsum("bts,bs->bt", weights, x)


def soft_ranks(x: np.ndarray, eps: float = SORT_EPS) -> np.ndarray:
    """``[b, T]``: ``r_s = sum_{u != s} sigmoid((x_s - x_u) / eps)`` (0-based ranks when ``eps -> 0``)."""
    z = (x[:, :, None] - x[:, None, :]) / eps
    sig = 0.5 * (1 + np.tanh(z / 2))
    return sig.sum(-1) - 0.5  # the u = s term is sigmoid(0) = 1/2


def soft_sort(x: np.ndarray, eps: float = SORT_EPS, tau: float = SORT_TAU) -> np.ndarray:
    """``[b, T] -> [b, T]``: ``y_t = sum_s softmax_s(-(r_s - t)^2 / tau) x_s`` (module docstring)."""
    ranks = soft_ranks(x, eps)  # [b, s]
    t = np.arange(x.shape[1], dtype=x.dtype)
    weights = _softmax(-(ranks[:, None, :] - t[None, :, None]) ** 2 / tau)  # [b, t, s]
    return np.einsum("bts,bs->bt", weights, x)


def target_map(name: str, x: np.ndarray) -> np.ndarray:
    """The map ``name`` (one of :data:`MAPS`) applied to scalar sequences ``x [b, T]``."""
    check_choice("map", name, MAPS)
    return dict(moving_average=moving_average, softmax_context=softmax_context, soft_sort=soft_sort)[name](x)


@dataclasses.dataclass(frozen=True)
class UniversalApproximationConfig:
    """One run: a model per (map, width) (module docstring)."""

    model: str = "attention"
    maps: tuple = MAPS
    widths: tuple = (8, 16, 32, 64)
    mlp: str = "relu"
    mlp_ratio: float = 4.0
    num_heads: int = 1
    seq_len: int = 8
    train_rows: int = 4096
    test_rows: int = 1024
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    data_seed: int = 0


SIZES = {
    # 3 maps x 4 widths, T = 8, 1.5k updates each: ~10-20 s per model on 2 cores.
    "cpu": UniversalApproximationConfig(),
    # approx. (the papers are existence results with no training protocol): longer sequences, more data and
    # updates, widths up to 256.
    "paper": UniversalApproximationConfig(widths=(8, 16, 32, 64, 128, 256), seq_len=16, train_rows=65_536,
                                          test_rows=4096, steps=20_000, batch_size=128, lr=1e-3),
}


def check_config(config: UniversalApproximationConfig) -> None:
    for name in config.maps:
        check_choice("maps", name, MAPS)
    check_choice("mlp", config.mlp, ("gated", "none", *ACTIVATIONS))
    if not config.maps or not config.widths:
        raise ValueError(f"maps, widths: expected non-empty tuples, got {config.maps}, {config.widths}")
    for width in config.widths:
        if width < 1 or width % config.num_heads:
            raise ValueError(f"widths: {width} is not a positive multiple of num_heads = {config.num_heads}")
    if config.seq_len < 2:
        raise ValueError(f"seq_len: expected >= 2, got {config.seq_len}")


def make_data(config: UniversalApproximationConfig, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``train`` / ``val`` / ``test``: inputs ``[N, T, 1]`` i.i.d. N(0, 1) (seeded by
    ``data_seed``; the same inputs for every map) and targets ``[N, T, 1]``; ``val`` is
    ``test_rows // 4`` separate rows."""
    rng = np.random.default_rng(config.data_seed)
    sizes = dict(train=config.train_rows, val=max(1, config.test_rows // 4), test=config.test_rows)
    out = {}
    for split, rows in sizes.items():
        x = rng.standard_normal((rows, config.seq_len))
        out[split] = (x[..., None].astype(np.float32), target_map(name, x)[..., None].astype(np.float32))
    return out


def build_model(config: UniversalApproximationConfig, width: int) -> SequenceModel:
    """One block (``n_layers=1``) of ``config.model`` at ``d_model = width``, bidirectional,
    float inputs and a 1-output regression head."""
    parse_mixers(config.model, 1)
    fields = {"attention": {"num_heads": config.num_heads}}
    return SequenceModel(d_model=width, n_layers=1, mixers=config.model, mixer_fields=fields, mlp=config.mlp,
                         mlp_ratio=config.mlp_ratio, vocab_size=None, head="regress", output_dim=1,
                         bidirectional=True)


def train_one(config: UniversalApproximationConfig, width: int, data: dict[str, Any]) -> dict[str, Any]:
    """Train one width on one map's data; normalised test MSE (module docstring)."""
    model = build_model(config, width)
    params = jax.jit(model.init)(jax.random.key(config.seed), jnp.asarray(data["train"][0][:1]))
    start = time.perf_counter()
    result, updates, predict = regression.fit_mse(model.apply, params, data["train"], data["val"], steps=config.steps,
                                         batch_size=config.batch_size, lr=config.lr,
                                         weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                                         seed=config.seed)
    x, y = data["test"]
    pred = predict(result.params, x)
    mse = float(np.mean((pred - y) ** 2))
    return dict(width=width, nmse=mse / float(np.var(y)), mse=mse, params=regression.count_params(result.params),
                updates=updates, train_s=time.perf_counter() - start)


def run(config: UniversalApproximationConfig, run_dir: Path, verbose: bool = True) -> Path:
    """Every (map, width); writes ``result.json`` (``models``: one row each) and returns ``run_dir``."""
    check_config(config)
    start = time.perf_counter()
    models = []
    for name in config.maps:
        data = make_data(config, name)
        for width in config.widths:
            out = dict(map=name, **train_one(config, width, data))
            models.append(out)
            if verbose:
                print(f"[{run_dir.name}] {name} d_model={width}: normalised test MSE {out['nmse']:.4f} "
                      f"({out['params']:,} params, {out['train_s']:.0f}s)", flush=True)
    regression.write_json(run_dir / "result.json", dict(experiment=EXPERIMENT, model=config.model, status="done",
                                                        models=models, wall_s=time.perf_counter() - start,
                                                        reduced_size=True))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    return regression.main(EXPERIMENT, DESCRIPTION, SIZES, run, argv)


def error_table(models: list[dict[str, Any]]) -> str:
    """Markdown: one row per map, one column per width, normalised test MSE."""
    widths = sorted({m["width"] for m in models})
    maps = list(dict.fromkeys(m["map"] for m in models))
    value = {(m["map"], m["width"]): m["nmse"] for m in models}
    lines = ["| map | " + " | ".join(f"d={w}" for w in widths) + " |", "|---|" + "---|" * len(widths)]
    for name in maps:
        cells = [f"{value[(name, w)]:.4f}" if (name, w) in value else "-" for w in widths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """Per run, the normalised-test-MSE table (maps x widths)."""
    runs = regression.read_runs(run_dirs, EXPERIMENT)
    if not runs:
        return ""
    lines = ["## Universal approximation: one attention + ReLU-FFN layer (Yun et al. 2020)", "",
             f"**Paper finding.** {PAPER_FINDING}", "",
             "Normalised test MSE (MSE / variance of the target; 0 exact, 1 the mean) against d_model, CPU size; see "
             "`experiments/notes/universal_approximation.md`.", ""]
    for d, config, result in runs:
        c = config.get("config", {})
        lines.append(f"`{d.name}` (`{config.get('model')}`, mlp {c.get('mlp')}, T = {c.get('seq_len')}, "
                     f"{c.get('steps')} updates):")
        lines += ["", error_table(result["models"]) if result else "incomplete", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
