"""Forecasting chaotic dynamics: the protocol of "Deconstructing Recurrence, Attention, and
Gating: Investigating the transferability of Transformers and Gated Recurrent Neural
Networks in forecasting of dynamical systems" (Heidenreich, Vlachas, Koumoutsakos et al.,
2024), after Vlachas et al. (2020).

    python -m experiments dynamics --system lorenz96|lorenz96_2scale|ks --model <mixer or pattern>
                                   [--set key=value ...] [--seeds 0,1,2] [--out runs] [--name NAME]
                                   [--resume] [--overwrite] [--quiet]

1. Data (:mod:`ssmjax.data.dynamics`): trajectories of the system after a discarded
   transient, train / validation / test from separate seeded initial conditions; states are
   standardised per dimension with the training mean and std.
2. Training: teacher-forced next-state prediction on windows of ``window`` steps (MSE on
   the standardised increment ``(x_{t+1} - x_t) / s`` when ``residual``, else on ``x_{t+1}``),
   with :func:`ssmjax.train.fit.fit` (best validation epoch kept).
3. Test: from each of ``test_ics`` (100) test initial conditions, the model's step form is
   warmed up on ``context`` true states and rolled out autoregressively for
   ``horizon_lyapunov`` Lyapunov times (:mod:`ssmjax.train.rollout`). Metrics: NRMSE(t)
   normalised by the attractor's per-dimension std, valid prediction time (first time
   NRMSE > 0.5) in Lyapunov times, and the power-spectrum error (dB).

Ablation arms (the paper's grid): gating (``elman`` vs ``gru``/``lstm`` vs ``rhn``),
attention on top of recurrent cells (``lstm,attention``), recurrence in transformers
(``attention`` vs ``rat``, RAT's recurrence inside chunks), plus our SSM / linear-attention
mixers. Attention uses a sliding window of ``window`` tokens so that rollouts beyond the
training length see the context length they were trained on.

Writes ``<out>/dynamics/<system>-<model>[-<name>]/``: ``config.json``, ``result.json``, one
``seed<k>/`` folder per seed (metrics.jsonl, checkpoints) and the rollout plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import parse_overrides
from ssmjax.checks import check_choice
from ssmjax.data import dynamics as dyn
from ssmjax.models import SequenceModel, parse_mixers, pattern_group
from ssmjax.train.fit import FitConfig, fit, predict_in_batches
from ssmjax.train.rollout import model_rollout, nrmse, power_spectrum_error, valid_prediction_time

DESCRIPTION = ("chaotic dynamics (Lorenz-96, two-scale Lorenz-96, Kuramoto-Sivashinsky): teacher-forced training, "
               "autoregressive rollouts, VPT in Lyapunov times (Heidenreich et al. 2024)")

PAPER_FINDING = (
    "Heidenreich, Vlachas, Koumoutsakos et al. (2024): neural gating and attention improve every standard RNN "
    "(Elman < GRU/LSTM; + attention better) on multiscale Lorenz-96 and Kuramoto-Sivashinsky, adding recurrence "
    "to transformers hurts, and an RHN with gating and attention is the best model on the high-dimensional systems.")


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
    """One run. Sizes: ``cpu`` defaults (minutes on 2 cores); paper-size runs use many more
    training samples, ``d_model`` up to a few hundred and 100+ epochs (see the notes)."""

    system: str = "lorenz96"
    model: str = "lstm"
    d_model: int = 64
    n_layers: int | None = None
    mlp: str = "gated"
    mixer_fields: dict = dataclasses.field(default_factory=dict)
    train_trajectories: int = 128   # many short trajectories: diverse data, little overfitting
    train_steps: int = 289          # samples per training trajectory (9 windows of 32 + 1)
    val_trajectories: int = 16
    val_steps: int = 289
    transient: int = 0              # 0: the system's default (DEFAULT_TRANSIENT)
    window: int = 32                # teacher-forced training window (also attention's sliding window)
    stride: int = 32                # between training windows
    residual: bool = True           # predict the standardised increment
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    patience: int = 0
    grad_clip: float = 1.0
    test_ics: int = 100
    context: int = 32               # teacher-forced warm-up before each test rollout
    horizon_lyapunov: float = 4.0   # rollout length in Lyapunov times
    threshold: float = 0.5          # VPT threshold on NRMSE
    seed: int = 0                   # data seed (the model seeds come from --seeds)


DEFAULT_TRANSIENT = {"lorenz96": 2000, "lorenz96_2scale": 2000, "ks": 1000}


def horizon_steps(config: DynamicsConfig, system: dyn.System) -> int:
    """Rollout length in samples: ``ceil(horizon_lyapunov / (lambda_1 dt))``."""
    return max(1, math.ceil(config.horizon_lyapunov * dyn.lyapunov_time_steps(system)))


# ----------------------------------------------------------------------------- data

def make_data(config: DynamicsConfig, system: dyn.System) -> dict[str, np.ndarray]:
    """Train / val / test trajectories (float32) from separate initial conditions (keys
    ``fold_in(seed, 0/1/2)``), with the transient discarded."""
    transient = config.transient or DEFAULT_TRANSIENT[system.name]
    key = jax.random.key(config.seed)
    sim = lambda k, n, t: np.asarray(dyn.trajectories(system, jax.random.fold_in(key, k), n, t, transient))  # noqa: E731
    test_len = config.context + horizon_steps(config, system)
    return dict(train=sim(0, config.train_trajectories, config.train_steps),
                val=sim(1, config.val_trajectories, config.val_steps),
                test=sim(2, config.test_ics, test_len))


def windows(traj: np.ndarray, window: int, stride: int) -> np.ndarray:
    """``[n_windows, window + 1, d]`` slices of ``traj [n, t, d]`` starting every ``stride`` steps."""
    n, t, _ = traj.shape
    if t < window + 1:
        raise ValueError(f"window: {window} needs trajectories of at least {window + 1} steps, got {t}")
    starts = range(0, t - window, stride)
    return np.concatenate([np.stack([traj[i, s:s + window + 1] for s in starts]) for i in range(n)])


@dataclasses.dataclass(frozen=True)
class Scaler:
    """Standardisation of states (``mean``, ``std``) and of increments (``inc_std``)."""

    mean: np.ndarray
    std: np.ndarray
    inc_std: np.ndarray

    @classmethod
    def fit(cls, train: np.ndarray) -> Scaler:
        z = (train - train.reshape(-1, train.shape[-1]).mean(0)) / train.reshape(-1, train.shape[-1]).std(0)
        inc = np.diff(z, axis=1).reshape(-1, z.shape[-1]).std(0)
        return cls(train.reshape(-1, train.shape[-1]).mean(0), train.reshape(-1, train.shape[-1]).std(0), inc)

    def __call__(self, x):
        return (x - self.mean) / self.std

    def inverse(self, z):
        return z * self.std + self.mean


def targets(win: np.ndarray, scaler: Scaler, residual: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` of standardised windows: next state, or its scaled increment."""
    x, y = win[:, :-1], win[:, 1:]
    return x, ((y - x) / scaler.inc_std if residual else y)


# ----------------------------------------------------------------------------- model

def build_model(config: DynamicsConfig, dim: int, horizon: int) -> SequenceModel:
    """``SequenceModel(vocab_size=None, head="regress", output_dim=dim)`` over ``config.model``.
    Attention gets a sliding ``window`` and caches long enough for warm-up + rollout."""
    parse_mixers(config.model, config.n_layers)  # a clear ValueError before tracing
    fields = {k: dict(v) for k, v in config.mixer_fields.items()}
    names = set(pattern_group(config.model))
    needed = config.context + horizon + 1
    if "attention" in names:
        fields["attention"] = {"window": config.window, "max_len": needed, **fields.get("attention", {})}
    if "rat" in names:
        fields["rat"] = {"max_len": needed, **fields.get("rat", {})}
    return SequenceModel(d_model=config.d_model, n_layers=config.n_layers, mixers=config.model,
                         mixer_fields=fields, mlp=config.mlp, vocab_size=None, head="regress", output_dim=dim)


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- one seed

def evaluate(model: SequenceModel, params, test_z: np.ndarray, scaler: Scaler, config: DynamicsConfig,
             system: dyn.System, horizon: int) -> dict[str, Any]:
    """Rollouts from every test initial condition and the metrics (module docstring)."""
    inc = jnp.asarray(scaler.inc_std, jnp.float32)
    update = (lambda x, y: x + y * inc) if config.residual else None
    roll = jax.jit(lambda ctx: model_rollout(model, params, ctx, horizon, update=update))
    pred_z = predict_in_batches(roll, (test_z[:, :config.context],), 25)
    pred = scaler.inverse(pred_z)
    truth = scaler.inverse(test_z[:, config.context:config.context + horizon])
    std = jnp.asarray(scaler.std)  # the attractor's per-dimension std (training data)
    errors = np.asarray(nrmse(jnp.asarray(pred), jnp.asarray(truth), std))
    errors = np.where(np.isfinite(errors), errors, np.inf)
    vpt = np.asarray(valid_prediction_time(jnp.asarray(errors), system.dt, system.lyapunov, config.threshold))
    finite = np.isfinite(pred).all()
    spec = float(power_spectrum_error(jnp.asarray(pred), jnp.asarray(truth))) if finite and system.spatial else None
    return dict(vpt=vpt, errors=errors, pred=pred, truth=truth, spectrum_error=spec)


def run_seed(config: DynamicsConfig, seed: int, data: dict, scaler: Scaler, system: dyn.System, run_dir: Path,
             resume: bool, verbose: bool) -> dict[str, Any]:
    horizon = horizon_steps(config, system)
    model = build_model(config, system.dim, horizon)
    z = {k: scaler(v).astype(np.float32) for k, v in data.items()}
    x_tr, y_tr = targets(windows(z["train"], config.window, config.stride), scaler, config.residual)
    x_va, y_va = targets(windows(z["val"], config.window, config.window), scaler, config.residual)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.asarray(x_tr[:1]))  # compiled: op by op is slow

    def loss_fn(params, batch, key):
        x, y = batch
        return jnp.mean((model.apply(params, x) - y) ** 2)

    predict = jax.jit(lambda p, x: model.apply(p, x))

    def validate(params):
        out = predict_in_batches(partial(predict, params), (x_va,), 64)
        return float(np.mean((out - y_va) ** 2))

    fit_config = FitConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                           lr_schedule=config.lr_schedule, patience=config.patience, seed=seed,
                           grad_clip=config.grad_clip)
    start = time.perf_counter()
    result = fit(loss_fn, params, (x_tr, y_tr), validate, fit_config, run_dir=run_dir, resume=resume, verbose=verbose)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    ev = evaluate(model, result.params, z["test"], scaler, config, system, horizon)
    ev.update(train_s=train_s, eval_s=time.perf_counter() - start, best_epoch=result.best_epoch,
              best_val=result.best_val, params=count_params(result.params), train_windows=len(x_tr))
    return ev


# ----------------------------------------------------------------------------- plots

def plot_rollout(ev: dict, system: dyn.System, path: Path, title: str) -> Path:
    """KS: Hovmoller diagrams (true, predicted, error) of the first test rollout; Lorenz-96:
    a few components, true vs predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth, pred = ev["truth"][0], ev["pred"][0]
    t = np.arange(1, truth.shape[0] + 1) * system.dt * system.lyapunov
    if system.name == "ks":
        fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
        vmax = np.abs(truth).max()
        extent = (t[0], t[-1], 0, truth.shape[1])
        for ax, field, label in zip(axes, (truth, pred, pred - truth), ("true", "predicted", "error")):
            im = ax.imshow(field.T, aspect="auto", origin="lower", extent=extent, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_ylabel(f"{label}\ngrid point")
            fig.colorbar(im, ax=ax)
        axes[-1].set_xlabel("time (Lyapunov times)")
    else:
        comps = (0, 1, 2, 3) if system.name == "lorenz96" else (0, 1, 8, 9)
        fig, axes = plt.subplots(len(comps), 1, figsize=(8, 7), sharex=True)
        for ax, c in zip(axes, comps):
            ax.plot(t, truth[:, c], "k", label="true")
            ax.plot(t, pred[:, c], "r--", label="predicted")
            ax.set_ylabel(f"x{c}")
        axes[0].legend(loc="upper right")
        axes[-1].set_xlabel("time (Lyapunov times)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_nrmse(curves: dict[str, np.ndarray], lyap_dt: float, path: Path, title: str, threshold: float = 0.5) -> Path:
    """Mean NRMSE over the test initial conditions against time in Lyapunov times, one line per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1) * lyap_dt, curve, label=label)
    ax.axhline(threshold, color="gray", ls=":", label=f"VPT threshold {threshold}")
    ax.set_xlabel("time (Lyapunov times)")
    ax.set_ylabel("NRMSE")
    ax.set_ylim(0, 1.6)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI

def run_name(config: DynamicsConfig, name: str | None) -> str:
    slug = config.model.replace(" ", "").replace("*", "-x").replace(",", "+")
    return "-".join(p for p in (config.system, slug, name or "") if p)


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def run(config: DynamicsConfig, seeds: list[int], out: Path, *, name: str | None = None, resume: bool = False,
        overwrite: bool = False, verbose: bool = True) -> Path:
    """Train and evaluate ``config`` for every seed; returns the run directory."""
    check_choice("system", config.system, dyn.SYSTEMS)
    run_dir = Path(out) / "dynamics" / run_name(config, name)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    elif not resume and any(run_dir.glob("seed*/checkpoints/*")):
        raise FileExistsError(f"{run_dir} already has checkpoints: pass --resume to continue it, --overwrite to "
                              "start again, or --name to make a separate run")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(
        {"experiment": "dynamics", "model": config.model, "seeds": seeds, "config": dataclasses.asdict(config)},
        indent=2))
    system = dyn.make_system(config.system)
    start = time.perf_counter()
    data = make_data(config, system)
    data_s = time.perf_counter() - start
    scaler = Scaler.fit(data["train"])
    per_seed, evs = [], []
    for seed in seeds:
        if verbose:
            print(f"[{run_dir.name}] seed {seed}", flush=True)
        ev = run_seed(config, seed, data, scaler, system, run_dir / f"seed{seed}", resume, verbose)
        evs.append(ev)
        per_seed.append(dict(seed=seed, vpt_mean=float(ev["vpt"].mean()), vpt_std=float(ev["vpt"].std()),
                             nrmse_mean=float(np.mean(np.minimum(ev["errors"], 10.0))),
                             spectrum_error=ev["spectrum_error"], train_s=ev["train_s"], eval_s=ev["eval_s"],
                             best_epoch=ev["best_epoch"], best_val=ev["best_val"]))
    vpt = np.concatenate([ev["vpt"] for ev in evs])
    errors = np.concatenate([np.minimum(ev["errors"], 10.0) for ev in evs])
    horizon = errors.shape[1]
    lyap_dt = system.dt * system.lyapunov
    one = min(horizon, max(1, round(1.0 / lyap_dt)))
    specs = [s["spectrum_error"] for s in per_seed if s["spectrum_error"] is not None]
    result = dict(
        experiment="dynamics", system=config.system, model=config.model, seeds=seeds, status="done",
        vpt_mean=float(vpt.mean()), vpt_std=float(vpt.std()), vpt_seed_std=float(np.std([s["vpt_mean"] for s in per_seed])),
        nrmse_mean=float(errors.mean()), nrmse_1lyap=float(errors[:, :one].mean()),
        spectrum_error=float(np.mean(specs)) if specs else None,
        nrmse_curve=errors.mean(0).tolist(), lyapunov=system.lyapunov, dt=system.dt, horizon_steps=horizon,
        params=evs[0]["params"], train_windows=evs[0]["train_windows"], per_seed=per_seed,
        data_s=data_s, wall_s=time.perf_counter() - start, reduced_size=True,
    )
    title = f"{config.system} {config.model}: VPT {result['vpt_mean']:.2f} +- {result['vpt_std']:.2f} Lyapunov times"
    plot_rollout(evs[0], system, run_dir / "rollout.png", title)
    plot_nrmse({config.model: errors.mean(0)}, lyap_dt, run_dir / "nrmse.png", f"{config.system} {config.model}",
               config.threshold)
    (run_dir / "result.json").write_text(json.dumps({k: _jsonable(v) for k, v in result.items()}, indent=2))
    if verbose:
        print(f"[{run_dir.name}] VPT {result['vpt_mean']:.3f} +- {result['vpt_std']:.3f} Lyapunov times, "
              f"NRMSE {result['nrmse_mean']:.3f}, spectrum error {result['spectrum_error']}, "
              f"{result['wall_s']:.0f}s -> {run_dir}", flush=True)
    return run_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments dynamics", description=DESCRIPTION,
                                     epilog="settable keys (--set): " + ", ".join(
                                         f.name for f in dataclasses.fields(DynamicsConfig)
                                         if f.name not in ("system", "model")))
    parser.add_argument("--system", default="lorenz96", choices=dyn.SYSTEMS)
    parser.add_argument("--model", default="lstm", help="a registered mixer name or a pattern, e.g. lstm,attention")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", default="0", help="comma-separated model seeds (default 0)")
    parser.add_argument("--out", default="runs")
    parser.add_argument("--name", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    return parser


#: Per-system CPU defaults on top of :class:`DynamicsConfig`: Lorenz-96 overfits 128
#: trajectories (validation loss 0.3 vs 0.01 with 256, see the notes).
SYSTEM_DEFAULTS = {"lorenz96": {"train_trajectories": 256}, "lorenz96_2scale": {"train_trajectories": 256}}


def make_config(system: str, model: str, overrides: list[str]) -> DynamicsConfig:
    """The CPU config of ``system`` (with :data:`SYSTEM_DEFAULTS`) for ``model``, ``--set`` applied."""
    config = DynamicsConfig(system=system, model=model, **SYSTEM_DEFAULTS.get(system, {}))
    return dataclasses.replace(config, **parse_overrides(config, overrides))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = make_config(args.system, args.model, args.overrides)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if not seeds:
            raise ValueError(f"--seeds: expected comma-separated ints, got {args.seeds!r}")
        run(config, seeds, Path(args.out), name=args.name, resume=args.resume, overwrite=args.overwrite,
            verbose=not args.quiet)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    return 0


# ----------------------------------------------------------------------------- report

MODEL_ORDER = ("elman", "gru", "lstm", "rhn", "elman,attention", "gru,attention", "lstm,attention", "rhn,attention",
               "attention", "rat", "s4d", "lru", "mamba", "gla", "gated_deltanet", "mlstm")


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """The dynamics section of ``experiments/RESULTS.md``: one table (system, model, VPT mean +-
    std over the test initial conditions, NRMSE, spectrum error, size, wall time), the paper's
    finding, one NRMSE-vs-time figure per system and the rollout plot of each system's best
    model (by VPT); figures are written or copied into ``figures_dir`` and linked as
    ``<figures_dir name>/<file>`` (relative to the report next to that folder). Every run's
    own plots stay in its run folder (the table names it), so the report does not copy a
    few hundred kB per run."""
    rows = []
    for d in run_dirs:
        d = Path(d)
        res = json.loads((d / "result.json").read_text()) if (d / "result.json").exists() else None
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        if cfg.get("experiment", (res or {}).get("experiment")) != "dynamics":
            continue
        rows.append((d, cfg.get("config", {}), res))
    if not rows:
        return ""
    order = {m: i for i, m in enumerate(MODEL_ORDER)}
    key = lambda r: (r[1].get("system", ""), order.get(r[1].get("model", ""), 99), r[0].name)  # noqa: E731
    rows.sort(key=key)
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    lines = ["## Chaotic dynamics: gating, attention and recurrence (Heidenreich et al. 2024)", "",
             f"**Paper finding.** {PAPER_FINDING}", "",
             "Reduced size (CPU): see the settings column and `experiments/notes/dynamics.md`. VPT: time until "
             "the NRMSE (normalised by the attractor's per-dimension std) first exceeds 0.5, in Lyapunov times, "
             "mean +- std over the test initial conditions (pooled over seeds). NRMSE: mean over the horizon; "
             "NRMSE@1: over the first Lyapunov time. Spectrum error: RMSE of the spatial power spectra, dB.", "",
             "| system | model | VPT (Lyapunov times) | NRMSE | NRMSE@1 | spectrum err (dB) | params | seeds | "
             "settings (d_model, window, epochs, train trajectories x steps) | wall (s) | run folder |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    curves: dict[str, dict[str, np.ndarray]] = {}
    lyap_dt: dict[str, float] = {}
    best: dict[str, tuple[Path, float, str]] = {}  # system -> (run folder, VPT, model)
    for d, cfg, res in rows:
        system, model = cfg.get("system", "?"), cfg.get("model", "?")
        settings = (f"d{cfg.get('d_model')} w{cfg.get('window')} ep{cfg.get('epochs')} "
                    f"traj{cfg.get('train_trajectories')}x{cfg.get('train_steps')}")
        if res is None:
            lines.append(f"| {system} | `{model}` | incomplete | | | | | | {settings} | | |")
            continue
        lines.append(f"| {system} | `{model}` | {res['vpt_mean']:.2f} +- {res['vpt_std']:.2f} | "
                     f"{_fmt(res.get('nrmse_mean'))} | {_fmt(res.get('nrmse_1lyap'))} | "
                     f"{_fmt(res.get('spectrum_error'), '.2f')} | {res.get('params', 0):,} | "
                     f"{len(res.get('seeds', []))} | {settings} | {res.get('wall_s', 0):.0f} | `{d.name}` |")
        curves.setdefault(system, {})[model] = np.asarray(res["nrmse_curve"])
        lyap_dt[system] = res["dt"] * res["lyapunov"]
        if res["vpt_mean"] > best.get(system, (None, -np.inf))[1]:
            best[system] = (d, res["vpt_mean"], model)
    lines.append("")
    for system, per_model in curves.items():
        path = plot_nrmse(per_model, lyap_dt[system], figures_dir / f"dynamics-{system}-nrmse.png",
                          f"{system}: mean NRMSE over the test initial conditions")
        lines.append(f"![{system} NRMSE vs time]({figures_dir.name}/{path.name})")
        d, _, model = best[system]
        if (d / "rollout.png").exists():
            target = figures_dir / f"dynamics-{system}-best-rollout.png"
            shutil.copyfile(d / "rollout.png", target)
            lines += ["", f"![{system}: rollout of the best model, {model}]({figures_dir.name}/{target.name})"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
