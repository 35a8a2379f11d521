"""Supervised online continual learning with a Transformer-XL-style memory: cumulative
(prequential) loss on non-stationary streams, against no memory, no replay and an online MLP.

    python -m experiments online_continual --model attention [--set key=value ...]

Method (Bornschein, Li & Rannen-Triki, 2024, "Transformers for Supervised Online Continual
Learning", arXiv:2403.01554). A stream ``(x_t, y_t), t = 0 .. T-1`` (:mod:`ssmjax.data.streams`:
permuted MNIST, split MNIST, piecewise-stationary linear regression) is read in segments
``S_s = {sC, ..., sC + C - 1}``, ``s = 0 .. steps - 1`` (``C = segment``, ``T = steps * C``).
The transformer reads tokens ``u_t = [x_t, e(y_{t-1})]`` (:func:`ssmjax.data.streams.context_tokens`),
so it can learn the current piece in context, and predicts ``y_t``. For segment ``s``, with
parameters ``theta_s`` and memory ``m_s`` (per block, the last ``M = memory`` block inputs
before ``S_s``, ``[b, M, d_model]``):

    h^0 = W_in u_{S_s};   h^l = Block_l([stop_grad(m_s^l), h^{l-1}])[M:]      (Transformer-XL)
    l_t = -log p_theta_s(y_t | u_{<=t})      (classes)      or  |y_hat_t - y_t|^2 / d_y   (regression)
    theta_{s+1} = Opt(theta_s, grad_theta  sum_b w_b mean_{t in row b} l_t / sum_b w_b)
    m_{s+1}^l = last M rows of [m_s^l, h^{l-1}]                                 (computed at theta_s)

Every ``l_t`` of the stream row is recorded from the forward pass at ``theta_s``, before the
update that uses it: the prequential (next-step) loss. The reported metric is the running
average ``L_t = (1/t) sum_{t' < t} l_t'`` (cumulative log-loss in nats, or MSE), its final
value ``L_T``, and for the classification streams the cumulative error rate. The stream is
preceded by ``M`` blank tokens (``u = 0``), so the first segment's memory is their block
inputs and every update has the same shapes.

Replay (``+replay``): ``R = replay_streams`` more rows in every update, each a replay stream
over the stored past: row ``r`` reads past segment ``j_r < s`` with its own memory and moves
on to ``j_r + 1`` at the next update; it jumps to a uniformly drawn past segment when it
starts (at ``s = 1``) and with probability ``replay_reset`` per update. On a jump its memory
is rebuilt from the ``M`` tokens before ``S_{j_r}`` at the current parameters. Replay rows
enter the gradient (weights ``w_b = 1``; ``0`` before there is a past) but never the
recorded loss. The paper adds replay "to maintain the benefits of multi-epoch training
while adhering to the sequential protocol"; these replay-stream mechanics are this
module's (the paper's exact scheme is not reproduced, see ``experiments/notes/online_continual.md``).

Learners (``learners``; each base name optionally with ``+replay``):

* ``xl``: the backbone (``--model`` mixers, ``d_model``, ``n_layers``, regression head of
  ``num_classes`` logits or ``d_y`` outputs) with Transformer-XL memory, as above;
* ``no_memory``: the same model over each segment alone (in-context learning within a
  segment only);
* ``mlp`` / ``linear``: ``x_t -> y_t`` per example (ReLU MLP of ``mlp_layers`` x
  ``mlp_hidden``, or one linear layer), the same online updates: plain online SGD.

All learners share the optimiser (``optimizer`` Adam or SGD at a constant learning rate,
gradient clipping ``grad_clip``, 0 = off) and the segment of ``C`` examples per update. Each
learner runs once per learning rate in ``lrs`` and is reported at the rate with the lowest
final cumulative loss on that stream (the same selection for every learner; the losses at
the other rates are kept in ``result.json``).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import regression
from ssmjax.checks import check_choice, check_positive_int
from ssmjax.data import streams
from ssmjax.data.images import load_mnist
from ssmjax.models import SequenceModel, parse_mixers

EXPERIMENT = "online_continual"
DESCRIPTION = ("online continual learning on permuted/split MNIST and piecewise regression streams: cumulative "
               "prequential loss of a Transformer-XL learner (+/- replay) vs no memory and online MLP")
PAPER_FINDING = (
    "Bornschein, Li & Rannen-Triki (2024, arXiv:2403.01554): a transformer explicitly conditioned on recent "
    "observations (Transformer-XL memory) and trained online with SGD, plus replay, combines fast in-context "
    "adaptation with sustained parametric learning, and improves significantly on the previous state of the art on "
    "CLOC (online geo-localization) in the cumulative next-step (prequential) metric.")
LEARNER_BASES = ("xl", "no_memory", "mlp", "linear")
OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class OnlineContinualConfig:
    """One run: every learner on every stream (module docstring)."""

    model: str = "attention"
    streams: tuple = streams.STREAMS
    learners: tuple = ("xl", "xl+replay", "no_memory", "mlp", "mlp+replay")
    steps: int = 500  # updates; the stream has steps * segment examples
    segment: int = 20
    memory: int = 40
    switch_every: int = 1000  # examples per stationary piece
    pool: int = 2  # MNIST 28 x 28 -> 14 x 14
    dim_x: int = 4
    dim_y: int = 1
    noise: float = 0.1
    d_model: int = 64
    n_layers: int = 2
    mlp_hidden: int = 128
    mlp_layers: int = 1
    replay_streams: int = 4
    replay_reset: float = 0.05
    optimizer: str = "adam"
    lrs: tuple = (3e-4, 1e-3, 3e-3, 1e-2)
    grad_clip: float = 1.0
    curve_points: int = 100
    seed: int = 0
    data_seed: int = 0


SIZES = {
    # 3 streams x 5 learners x 4 learning rates, 10k-example streams in 10 pieces, 500 updates of 20 examples
    # (+ 4 replay rows) each: 6.5 min wall (2 min CPU, much of it compilation) on 2 heavily shared cores.
    "cpu": OnlineContinualConfig(),
    # approx. (the paper's CLOC stream of geotagged images is not available): 10x longer streams, a wider and
    # deeper model, longer segments and memory.
    "paper": OnlineContinualConfig(steps=2000, segment=50, memory=200, switch_every=5000, d_model=128, n_layers=4,
                                   mlp_hidden=256, mlp_layers=2, lrs=(1e-4, 3e-4, 1e-3)),
}


class Learner(NamedTuple):
    """``name`` as configured; ``base`` in :data:`LEARNER_BASES`; ``replay``: extra replay rows."""

    name: str
    base: str
    replay: bool

    @property
    def memory(self) -> bool:
        return self.base == "xl"

    @property
    def in_context(self) -> bool:
        """Reads tokens ``[x_t, e(y_{t-1})]`` (transformers) rather than ``x_t`` alone."""
        return self.base in ("xl", "no_memory")


def parse_learner(name: str) -> Learner:
    base, sep, suffix = name.partition("+")
    if base not in LEARNER_BASES or (sep and suffix != "replay"):
        raise ValueError(f"learners: expected one of {LEARNER_BASES}, optionally with '+replay', got {name!r}")
    return Learner(name, base, bool(sep))


def check_config(config: OnlineContinualConfig) -> None:
    if not config.streams or not config.learners:
        raise ValueError(f"streams, learners: expected non-empty tuples, got {config.streams}, {config.learners}")
    for name in config.streams:
        check_choice("streams", name, streams.STREAMS)
    learners = [parse_learner(name) for name in config.learners]
    parse_mixers(config.model, config.n_layers)
    for field in ("steps", "segment", "memory", "switch_every", "pool", "d_model", "mlp_hidden", "curve_points"):
        check_positive_int(field, getattr(config, field))
    if any(learner.replay for learner in learners):
        check_positive_int("replay_streams", config.replay_streams)
    if not 0 <= config.replay_reset <= 1:
        raise ValueError(f"replay_reset: expected a probability in [0, 1], got {config.replay_reset}")
    check_choice("optimizer", config.optimizer, OPTIMIZERS)
    if not config.lrs or min(config.lrs) <= 0 or config.grad_clip < 0:
        raise ValueError(f"lrs, grad_clip: expected positive learning rates and grad_clip >= 0, got {config.lrs}, "
                         f"{config.grad_clip}")


# ----------------------------------------------------------------------------- models and the update


class MLP(nn.Module):
    """``[..., d_in] -> [..., output_dim]``: ReLU layers of widths ``hidden``, then a linear layer."""

    hidden: tuple[int, ...]
    output_dim: int

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.output_dim)(x)


def build_model(config: OnlineContinualConfig, learner: Learner, output_dim: int) -> nn.Module:
    """The network of ``learner`` with ``output_dim`` outputs per example (module docstring)."""
    if learner.base in ("mlp", "linear"):
        return MLP((config.mlp_hidden,) * config.mlp_layers if learner.base == "mlp" else (), output_dim)
    return SequenceModel(d_model=config.d_model, n_layers=config.n_layers, mixers=config.model, vocab_size=None,
                         head="regress", output_dim=output_dim, memory_len=config.memory if learner.memory else 0)


def make_optimizer(name: str, grad_clip: float) -> optax.GradientTransformation:
    """The update direction of Adam or SGD before the learning rate (``-lr * direction`` is the
    step, so ``lr`` can be an argument of the compiled update), after global-norm clipping at
    ``grad_clip`` (0: none)."""
    direction = optax.scale_by_adam() if name == "adam" else optax.identity()
    return optax.chain(optax.clip_by_global_norm(grad_clip), direction) if grad_clip > 0 else direction


def example_losses(outputs: jax.Array, targets: jax.Array, num_classes: int | None) -> jax.Array:
    """``[b, c]``: cross-entropy of the logits ``outputs [b, c, K]`` at int ``targets [b, c]``,
    or the squared error ``mean_k (outputs - targets)^2`` of ``[b, c, d_y]`` regressions."""
    if num_classes is None:
        return jnp.mean((outputs - targets) ** 2, -1)
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def forward(model: nn.Module, params, inputs: jax.Array, memory):
    """``(outputs [b, c, k], new memory)``; ``memory is None``: no Transformer-XL memory."""
    if memory is None:
        return model.apply(params, inputs), None
    return model.apply(params, inputs, memory, method="segment_forward")


def segment_loss(params, inputs, targets, weights, memory, *, model, num_classes):
    """The update's objective ``sum_b w_b mean_c l_bc / sum_b w_b`` and, as auxiliaries, the
    new memory and row 0's (the stream's) per-example losses and outputs."""
    outputs, memory = forward(model, params, inputs, memory)
    losses = example_losses(outputs, targets, num_classes)
    objective = jnp.sum(weights * losses.mean(1)) / jnp.sum(weights)
    return objective, (memory, losses[0], outputs[0])


@partial(jax.jit, static_argnames=("model", "num_classes", "optimizer"))
def online_update(params, opt_state, lr, inputs, targets, weights, memory, *, model, num_classes, optimizer):
    """One prequential step: the loss of ``inputs [b, c, F]`` (targets ``[b, c]`` or
    ``[b, c, d_y]``, row weights ``[b]``) at the current ``params`` (recorded), then one
    optimiser step of size ``lr`` on it. ``optimizer``: ``(name, grad_clip)``. Returns
    ``(params, opt_state, memory, stream losses [c], stream outputs [c, k])``."""
    grad_fn = jax.value_and_grad(partial(segment_loss, model=model, num_classes=num_classes), has_aux=True)
    (_, (memory, losses, outputs)), grads = grad_fn(params, inputs, targets, weights, memory)
    direction, opt_state = make_optimizer(*optimizer).update(grads, opt_state, params)
    params = jax.tree.map(lambda p, d: p - jnp.asarray(lr, p.dtype) * d.astype(p.dtype), params, direction)
    return params, opt_state, memory, losses, outputs


@partial(jax.jit, static_argnames=("model",))
def read_memory(params, window, *, model):
    """The memory ``[b, M, d_model]`` per block after reading ``window [b, M, F]`` from scratch."""
    return model.apply(params, window, method="segment_forward")[1]


# ----------------------------------------------------------------------------- the online loop


def learner_inputs(learner: Learner, stream: streams.Stream) -> np.ndarray:
    """``[T, F]``: context tokens for the transformers, ``x`` alone for the per-example learners."""
    return streams.context_tokens(stream) if learner.in_context else stream.x


@partial(jax.jit, static_argnames=("model",))
def init_params(key: jax.Array, sample: jax.Array, *, model: nn.Module):
    return model.init(key, sample)


def init_learner(config: OnlineContinualConfig, learner: Learner, stream: streams.Stream, key: jax.Array):
    """``(model, params)`` for ``stream``'s inputs and outputs. The memory adds no parameters,
    so ``xl`` is initialised as ``no_memory``: with one ``key`` both start from the same point
    (and share one compiled ``init``)."""
    output_dim = stream.num_classes or stream.y.shape[1]
    model = build_model(config, learner, output_dim)
    init_model = build_model(config, learner._replace(base="no_memory"), output_dim) if learner.memory else model
    sample = jnp.asarray(learner_inputs(learner, stream)[None, :config.segment])
    return model, init_params(key, sample, model=init_model)


def prequential(config: OnlineContinualConfig, learner: Learner, model: nn.Module, params, stream: streams.Stream,
                lr: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """Run ``learner`` at learning rate ``lr`` over the first ``steps * segment`` examples of
    ``stream`` (module docstring); returns ``(losses [T], errors [T] (classes) or None, final
    params)``: each example's loss at the parameters before the update that trains on it."""
    c, m, steps = config.segment, config.memory, config.steps
    total = steps * c
    if len(stream.x) < total:
        raise ValueError(f"stream: expected at least steps * segment = {total} examples, got {len(stream.x)}")
    inputs, targets = learner_inputs(learner, stream)[:total], stream.y[:total]
    replay = config.replay_streams if learner.replay else 0
    optimizer = (config.optimizer, config.grad_clip)
    opt_state = make_optimizer(*optimizer).init(params)
    padded = np.concatenate([np.zeros((m, inputs.shape[1]), inputs.dtype), inputs])  # M blank tokens first

    def windows(segments):  # [len, M, F]: the M tokens before each segment
        return jnp.asarray(np.stack([padded[j * c: j * c + m] for j in segments]))

    memory = read_memory(params, windows([0] * (1 + replay)), model=model) if learner.memory else None
    position = np.full(replay, -1)  # each replay row's next past segment (-1: not started)
    losses, outputs = np.empty(total, np.float32), []
    for s in range(steps):
        if s > 0 and replay:
            jump = (position < 0) | (rng.random(replay) < config.replay_reset)
            position[jump] = rng.integers(0, s, int(jump.sum()))
            if learner.memory and jump.any():  # one read of every row's window (one shape), kept where it jumped
                fresh = read_memory(params, windows([0] + position.tolist()), model=model)
                jumped = 1 + np.flatnonzero(jump)
                memory = jax.tree.map(lambda a, f: a.at[jumped].set(f[jumped]), memory, fresh)
        segments = [s] + (position.tolist() if s > 0 else [s] * replay)  # replay rows idle (weight 0) at s = 0
        weights = jnp.asarray([1.0] + [float(s > 0)] * replay)
        batch_x = jnp.asarray(np.stack([inputs[j * c:(j + 1) * c] for j in segments]))  # [1 + R, C, F]
        batch_y = jnp.asarray(np.stack([targets[j * c:(j + 1) * c] for j in segments]))
        params, opt_state, memory, row_losses, row_outputs = online_update(
            params, opt_state, lr, batch_x, batch_y, weights, memory, model=model, num_classes=stream.num_classes,
            optimizer=optimizer)
        losses[s * c:(s + 1) * c] = np.asarray(row_losses)
        outputs.append(np.asarray(row_outputs))
        if s > 0:
            position += 1
    errors = None
    if stream.num_classes is not None:
        errors = (np.concatenate(outputs).argmax(-1) != targets).astype(np.float32)
    return losses, errors, params


def summarize(losses: np.ndarray, errors: np.ndarray | None, task: np.ndarray, points: int) -> dict[str, Any]:
    """Final cumulative loss (and error), the running averages at ``points`` steps and the mean
    loss of each stationary piece."""
    t = np.unique(np.linspace(1, len(losses), points).round().astype(int))
    counts = np.arange(1, len(losses) + 1)
    out = dict(cumulative_loss=float(losses.mean()), curve_t=t.tolist(),
               curve_loss=(np.cumsum(losses, dtype=np.float64) / counts)[t - 1].tolist(),
               piece_loss=[float(losses[task == k].mean()) for k in np.unique(task)])
    if errors is not None:
        out.update(cumulative_error=float(errors.mean()),
                   curve_error=(np.cumsum(errors, dtype=np.float64) / counts)[t - 1].tolist())
    return out


def make_stream(config: OnlineContinualConfig, name: str, mnist: dict | None) -> streams.Stream:
    """Stream ``name`` with ``steps * segment`` examples (MNIST streams from the training split)."""
    total = config.steps * config.segment
    if name == "piecewise_regression":
        return streams.piecewise_regression_stream(total, config.switch_every, config.data_seed, config.dim_x,
                                                   config.dim_y, config.noise)
    make = streams.permuted_mnist_stream if name == "permuted_mnist" else streams.split_mnist_stream
    return make(mnist["train"].images, mnist["train"].labels, total, config.switch_every, config.data_seed,
                config.pool)


def run(config: OnlineContinualConfig, run_dir: Path, verbose: bool = True) -> Path:
    """Every learner on every stream; writes ``result.json`` (``rows``: one per pair)."""
    check_config(config)
    start = time.perf_counter()
    mnist = load_mnist() if any(name.endswith("mnist") for name in config.streams) else None
    rows = []
    for i, name in enumerate(config.streams):
        stream = make_stream(config, name, mnist)
        for learner in map(parse_learner, config.learners):
            began = time.perf_counter()
            model, params = init_learner(config, learner, stream, jax.random.fold_in(jax.random.key(config.seed), i))
            by_rate = {}
            for lr in config.lrs:  # the same initial parameters and replay draws at every rate
                losses, errors, _ = prequential(config, learner, model, params, stream, lr,
                                                np.random.default_rng([config.seed, i]))
                by_rate[lr] = summarize(losses, errors, stream.task, config.curve_points)
            lr = min(by_rate, key=lambda r: np.nan_to_num(by_rate[r]["cumulative_loss"], nan=np.inf))
            row = dict(stream=name, learner=learner.name, lr=lr, params=regression.count_params(params),
                       lr_losses={str(r): v["cumulative_loss"] for r, v in by_rate.items()},
                       wall_s=time.perf_counter() - began, **by_rate[lr])
            rows.append(row)
            if verbose:
                error = f", error {row['cumulative_error']:.3f}" if "cumulative_error" in row else ""
                print(f"[{run_dir.name}] {name} {learner.name}: cumulative loss {row['cumulative_loss']:.4f}{error} "
                      f"at lr {lr:g} ({row['params']:,} params, {row['wall_s']:.0f}s)", flush=True)
    regression.write_json(run_dir / "result.json", dict(
        experiment=EXPERIMENT, model=config.model, status="done", rows=rows, examples=config.steps * config.segment,
        wall_s=time.perf_counter() - start, reduced_size=True))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    return regression.main(EXPERIMENT, DESCRIPTION, SIZES, run, argv)


# ----------------------------------------------------------------------------- report


def loss_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per learner, one column per stream: final cumulative loss (error), at
    the selected learning rate."""
    names = list(dict.fromkeys(r["stream"] for r in rows))
    learners = list(dict.fromkeys(r["learner"] for r in rows))
    cell = {(r["learner"], r["stream"]): r for r in rows}

    def fmt(r):
        if r is None:
            return "-"
        error = f" ({r['cumulative_error']:.3f})" if "cumulative_error" in r else ""
        return f"{r['cumulative_loss']:.3f}{error}, lr {r['lr']:g}"

    lines = ["| learner | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {learner} | " + " | ".join(fmt(cell.get((learner, n))) for n in names) + " |" for learner in learners]
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, Any]], switch_every: int, path: Path, title: str) -> Path:
    """One panel per stream: the running-average prequential loss against the step, one line
    per learner, dotted lines at the switch points (a bare ``Figure``: no pyplot backend)."""
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["stream"] for r in rows))
    fig = Figure(figsize=(4.2 * len(names), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name in zip(axes, names):
        for r in (r for r in rows if r["stream"] == name):
            ax.plot(r["curve_t"], r["curve_loss"], label=r["learner"])
        end = max(r["curve_t"][-1] for r in rows if r["stream"] == name)
        for switch in range(switch_every, end, switch_every):
            ax.axvline(switch, color="gray", ls=":", lw=0.7)
        ylabel = "cumulative MSE" if name == "piecewise_regression" else "cumulative log-loss (nats)"
        ax.set(xlabel="examples seen", ylabel=ylabel, title=name, yscale="log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """Per run, the final-cumulative-loss table (learners x streams) and the curves figure,
    written into ``figures_dir`` and linked as ``<figures_dir name>/<file>``."""
    runs = regression.read_runs(run_dirs, EXPERIMENT)
    if not runs:
        return ""
    lines = ["## Online continual learning: Transformer-XL memory + online SGD + replay (Bornschein et al. 2024)", "",
             f"**Paper finding.** {PAPER_FINDING}", "",
             "Final cumulative prequential loss (each example scored before it is trained on): log-loss in nats with "
             "the cumulative error rate in parentheses for the MNIST streams, MSE for the regression stream. Reduced "
             "size (CPU, not the paper's CLOC); see `experiments/notes/online_continual.md`.", ""]
    figures_dir = Path(figures_dir)
    for d, config, result in runs:
        c = config.get("config", {})
        lines.append(f"`{d.name}` (`{config.get('model')}`, d_model {c.get('d_model')} x {c.get('n_layers')} layers, "
                     f"{c.get('steps')} updates of {c.get('segment')} examples, memory {c.get('memory')}, "
                     f"{c.get('replay_streams')} replay streams, switch every {c.get('switch_every')}):")
        if not result:
            lines += ["", "incomplete", ""]
            continue
        figures_dir.mkdir(parents=True, exist_ok=True)
        path = plot_curves(result["rows"], c.get("switch_every", result["examples"]),
                           figures_dir / f"{EXPERIMENT}-{d.name}.png", f"{EXPERIMENT}: {d.name}")
        lines += ["", loss_table(result["rows"]), "", f"![cumulative loss curves]({figures_dir.name}/{path.name})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
