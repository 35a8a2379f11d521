# %% [markdown]
# # Forecasting: real series and chaotic dynamics
#
# Two kinds of forecasting with the library's protocol code:
#
# 1. **Long-term series forecasting** on ETTh1 (electricity transformer temperature, hourly, 7
#    variates) with the protocol of LTSF-Linear (Zeng et al. 2023, "Are Transformers Effective
#    for Time Series Forecasting?", arXiv 2205.13504): 12 / 4 / 4 months for train / validation /
#    test, each variate standardised with the *training* mean and std, windows of $L$ look-back
#    rows and $H$ target rows. Two models: **DLinear**, which splits the look-back into a trend
#    (moving average of 25 steps) and the rest and maps each linearly to the horizon,
#
#    $$\hat y = W_s\,(x - \operatorname{MA}_{25}(x)) + W_t\, \operatorname{MA}_{25}(x),
#    \qquad W_s, W_t \in \mathbb{R}^{H \times L},$$
#
#    and a **channel-independent S4D** stack (`ci:s4d`): each variate, instance-normalised, is one
#    univariate sequence through the SSM backbone, whose last output is mapped to the horizon.
# 2. **Chaotic dynamics**: Lorenz-96, autoregressive rollouts of a trained model and their *valid
#    prediction time* (VPT) in Lyapunov times (Vlachas et al. 2020, arXiv 1910.05266; Heidenreich,
#    Vlachas & Koumoutsakos 2024, arXiv 2410.02654).
#
# Real data are never downloaded: ETTh1.csv is read from `$SSMJAX_DATA` or `../shared/data` next to
# the repository (`ssmjax.data.paths.default_data_dir`).

# %% tags=["parameters"]
SMALL = False

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments import dynamics
from experiments.ltsf import PAPER
from ssmjax.data import dynamics as dyn
from ssmjax.data.forecasting import load_series, prepare, resolve_data_file
from ssmjax.models.forecasters import build_forecaster
from ssmjax.train.fit import FitConfig, fit, predict_in_batches
from ssmjax.train.rollout import valid_prediction_time

H = 96  # forecast horizon (hours)
#: per model: look-back, learning rate, epochs, every how many training windows to keep, extra fields
FORECASTERS = {
    "dlinear": dict(seq_len=336, lr=0.005, epochs=1 if SMALL else 3, every=1, fields={}),
    "ci:s4d": dict(seq_len=96, lr=1e-3, epochs=1 if SMALL else 2, every=4, fields=dict(d_model=16 if SMALL else 32)),
}
MAX_TRAIN = 64 if SMALL else None     # SMALL: a slice of the training windows (two steps of 32)
VAL_EVERY, TEST_EVERY = (64, 64) if SMALL else (8, 4)

# %% [markdown]
# ## ETTh1: data and protocol
#
# `resolve_data_file` finds the file (a clear error if it is missing), `load_series` reads it
# (target column `OT` last) and `prepare` splits it, fits the scaler on the training rows and
# checks that every split has a window. A window is a start row `s`: look-back `scaled[s : s+L]`,
# target `scaled[s+L : s+L+H]`.

# %%
try:
    path = resolve_data_file("ETTh1")
except ValueError as error:
    raise FileNotFoundError(f"this notebook needs ETTh1.csv and does not download it: {error}. Put the file in "
                            "../shared/data next to the repository or point SSMJAX_DATA at its folder.") from None
series = load_series(path)
data = {name: prepare(series, spec["seq_len"], H) for name, spec in FORECASTERS.items()}
scaled = jnp.asarray(data["dlinear"].scaled, jnp.float32)  # the same for every look-back: train-row scaler
print(f"{path.name}: {series.values.shape[0]} rows, columns {series.columns}")
for name, d in data.items():
    print(f"{name:>8} (L = {d.seq_len}): windows train {len(d.starts('train', H))}, "
          f"val {len(d.starts('val', H))}, test {len(d.starts('test', H))}")


def gather(starts, offset, length):
    """``scaled[s + offset : s + offset + length]`` for every start ``s``: ``[n, length, C]``."""
    return scaled[starts[:, None] + offset + jnp.arange(length)]


# %% [markdown]
# ## Training DLinear and the S4D forecaster
#
# `ssmjax.train.fit` is the epoch trainer of the LTSF protocol: Adam on the MSE, the learning rate
# halved after every epoch, the parameters of the best validation epoch kept. We train briefly
# (a few epochs, the SSM on every fourth training window) and test on every fourth test window.

# %%
results = {}
for name, spec in FORECASTERS.items():
    d, L = data[name], spec["seq_len"]
    model = build_forecaster(name, H, **spec["fields"])
    train_starts = d.starts("train", H)[::spec["every"]][:MAX_TRAIN].astype(np.int32)
    val_starts = d.starts("val", H)[::VAL_EVERY].astype(np.int32)
    test_starts = d.starts("test", H)[::TEST_EVERY].astype(np.int32)

    def loss_fn(params, batch, key, model=model, L=L):
        (starts,) = batch
        return jnp.mean((model.apply(params, gather(starts, 0, L)) - gather(starts, L, H)) ** 2)

    predict = jax.jit(lambda params, starts, model=model, L=L: model.apply(params, gather(starts, 0, L)))

    def mse(params, starts, predict=predict, L=L):
        pred = predict_in_batches(lambda s: predict(params, s), (starts,), 256)
        return float(np.mean((pred - np.asarray(gather(jnp.asarray(starts), L, H))) ** 2))

    params = jax.jit(model.init)(jax.random.key(0), gather(jnp.asarray(train_starts[:2]), 0, L))
    fitted = fit(loss_fn, params, (train_starts,), lambda p: mse(p, val_starts),
                 FitConfig(epochs=spec["epochs"], batch_size=32, lr=spec["lr"], patience=0), verbose=False)
    pred = predict_in_batches(lambda s: predict(fitted.params, s), (test_starts,), 256)
    truth = np.asarray(gather(jnp.asarray(test_starts), L, H))
    results[name] = dict(pred=pred, truth=truth, origins=test_starts + L, lookback=L,
                         mse=float(np.mean((pred - truth) ** 2)), mae=float(np.mean(np.abs(pred - truth))))
    print(f"{name:>8}: test MSE {results[name]['mse']:.3f}  MAE {results[name]['mae']:.3f}  "
          f"({len(train_starts)} training windows, {fitted.elapsed_s:.0f} s)")

# the naive forecast: repeat the last observed value for all H steps
origins = results["dlinear"]["origins"]
assert np.array_equal(origins, results["ci:s4d"]["origins"])  # both models forecast the same test rows
last = np.asarray(scaled)[origins - 1][:, None]
repeat_mse = float(np.mean((results["dlinear"]["truth"] - last) ** 2))
paper_mse, paper_mae = PAPER[("dlinear", "ETTh1", 336)][1][H]
print(f"  repeat: test MSE {repeat_mse:.3f};  DLinear in the paper (full training): MSE {paper_mse}, MAE {paper_mae}")

# %%
i = len(origins) // 2  # one test window from the middle of the test months
channels = [series.columns.index("OT"), series.columns.index("HUFL")]
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for ax, c in zip(axes[:2], channels):
    o = origins[i]
    back = np.arange(o - 2 * H, o)
    ax.plot(back - o, np.asarray(scaled)[back, c], color="0.5", lw=0.9, label="look-back")
    ax.plot(np.arange(H), results["dlinear"]["truth"][i, :, c], color="k", lw=1.2, label="truth")
    for name, color in (("dlinear", "C0"), ("ci:s4d", "C3")):
        ax.plot(np.arange(H), results[name]["pred"][i, :, c], color=color, lw=1.2, label=name)
    ax.axvline(0, color="0.7", ls=":")
    ax.set_xlabel("hours from the forecast origin")
    ax.set_ylabel(f"{series.columns[c]} (standardised)")
    ax.set_title(f"ETTh1 {series.columns[c]}, one test window, H = {H}")
    ax.legend(fontsize=7)
ax = axes[2]
for name, color in (("dlinear", "C0"), ("ci:s4d", "C3")):
    ax.plot(np.arange(1, H + 1), np.mean((results[name]["pred"] - results[name]["truth"]) ** 2, axis=(0, 2)),
            color=color, label=f"{name} (MSE {results[name]['mse']:.3f})")
ax.axhline(repeat_mse, color="0.5", ls="--", label=f"repeat last value ({repeat_mse:.3f})")
ax.set_xlabel("lead time (hours)")
ax.set_ylabel("test MSE (standardised)")
ax.set_title("Error against lead time")
ax.legend(fontsize=7)
fig.tight_layout()
if not SMALL:
    assert results["dlinear"]["mse"] < 0.45, results["dlinear"]["mse"]  # paper: 0.375 with full training
    assert results["ci:s4d"]["mse"] < 0.8 * repeat_mse, (results["ci:s4d"]["mse"], repeat_mse)

# %% [markdown]
# ## Lorenz-96: rollouts and the valid prediction time
#
# Lorenz-96 has $J = 40$ variables on a ring with forcing $F = 8$,
#
# $$\frac{dx_i}{dt} = (x_{i+1} - x_{i-2})\, x_{i-1} - x_i + F,$$
#
# integrated with RK4 at $\Delta t = 0.01$; its largest Lyapunov exponent is $\lambda_1 \approx 1.68$,
# so one Lyapunov time $1/\lambda_1$ is about 60 steps and small errors grow by a factor $e$ per
# Lyapunov time. The protocol of `experiments.dynamics` trains a model teacher-forced to predict the
# standardised increment $x_{t+1} - x_t$ on windows of 32 steps, then warms it up on 32 true states
# of a test trajectory and rolls it out autoregressively with its step form. The error is the
# NRMSE normalised by the attractor's per-variable std $\sigma_i$,
#
# $$\mathrm{NRMSE}(t) = \sqrt{\tfrac{1}{J} \textstyle\sum_i (\hat x_i(t) - x_i(t))^2 / \sigma_i^2},$$
#
# and the VPT is the time, in Lyapunov times, until it first exceeds 0.5.

# %%
MODEL = "elman"  # the Elman RNN, h_t = tanh(W x_t + U h_{t-1} + b): the fastest to train here
config = dynamics.make_config("lorenz96", MODEL, [
    f"train_trajectories={4 if SMALL else 256}", f"train_steps={33 if SMALL else 289}",
    f"val_trajectories={2 if SMALL else 8}", f"val_steps={33 if SMALL else 289}",
    f"epochs={1 if SMALL else 20}", f"batch_size={4 if SMALL else 32}", f"d_model={16 if SMALL else 64}",
    f"test_ics={2 if SMALL else 20}", f"horizon_lyapunov={0.5 if SMALL else 3.0}"])
system = dyn.make_system("lorenz96")
trajectories = dynamics.make_data(config, system)  # train / val / test from separate initial conditions
scaler = dynamics.Scaler.fit(trajectories["train"])  # per-variable mean and std of the training states
z = {split: scaler(v).astype(np.float32) for split, v in trajectories.items()}
horizon = dynamics.horizon_steps(config, system)
print({split: v.shape for split, v in trajectories.items()}, f"rollout horizon {horizon} steps")

# teacher forcing: windows of `window` + 1 states; inputs x_0..x_{w-1}, targets the scaled increments
x_train, y_train = dynamics.targets(dynamics.windows(z["train"], config.window, config.stride), scaler, True)
x_val, y_val = dynamics.targets(dynamics.windows(z["val"], config.window, config.window), scaler, True)
model = dynamics.build_model(config, system.dim, horizon)  # SequenceModel(head="regress"), 40 outputs
params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(x_train[:1]))
apply = jax.jit(model.apply)


def loss_fn(params, batch, key):
    x, y = batch
    return jnp.mean((model.apply(params, x) - y) ** 2)


def validate(params):
    return float(np.mean((predict_in_batches(lambda x: apply(params, x), (x_val,), 64) - y_val) ** 2))


fitted = fit(loss_fn, params, (x_train, y_train), validate,
             FitConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, lr_schedule="cosine",
                       patience=0, grad_clip=config.grad_clip), verbose=False)
# rollouts from every test initial condition: warm-up on `context` true states, then the step form
ev = dynamics.evaluate(model, fitted.params, z["test"], scaler, config, system, horizon)
lyapunov_dt = system.dt * system.lyapunov  # one step in Lyapunov times
print(f"{MODEL}: trained {fitted.elapsed_s:.0f} s on {len(x_train)} windows (validation MSE {fitted.best_val:.3f}); "
      f"VPT over {config.test_ics} test initial conditions: {ev['vpt'].mean():.2f} +- {ev['vpt'].std():.2f} "
      f"Lyapunov times")

# %% [markdown]
# The VPT is read off the NRMSE curve: the number of predictions before the first one above the
# threshold, times $\Delta t\, \lambda_1$. A direct check of `valid_prediction_time` on the curves:

# %%
errors = ev["errors"]  # [initial conditions, horizon]
above = errors > config.threshold
first = np.where(above.any(1), above.argmax(1), errors.shape[1])
np.testing.assert_allclose(ev["vpt"], first * lyapunov_dt, rtol=1e-6)
np.testing.assert_allclose(valid_prediction_time(jnp.asarray(errors), system.dt, system.lyapunov), ev["vpt"],
                           rtol=1e-6)
if not SMALL:
    assert ev["vpt"].mean() > 0.5, ev["vpt"].mean()  # half a Lyapunov time and more

# %%
k = int(np.argsort(ev["vpt"])[len(ev["vpt"]) // 2])  # the test initial condition with the median VPT
truth, pred = ev["truth"][k], ev["pred"][k]
t = np.arange(1, truth.shape[0] + 1) * lyapunov_dt
extent = (t[0], t[-1], 0, truth.shape[1])
vmax = np.abs(truth).max()
fig, axes = plt.subplots(2, 2, figsize=(13, 6.5))
for ax, field, title, cmap in ((axes[0, 0], truth, "truth", "RdBu_r"), (axes[0, 1], pred, f"{MODEL} rollout", "RdBu_r"),
                               (axes[1, 0], pred - truth, "error (rollout - truth)", "RdBu_r")):
    im = ax.imshow(field.T, aspect="auto", origin="lower", extent=extent, cmap=cmap, vmin=-vmax, vmax=vmax)
    ax.axvline(ev["vpt"][k], color="k", ls="--", lw=1)
    ax.set_xlabel("time (Lyapunov times)")
    ax.set_ylabel("variable i")
    ax.set_title(f"Lorenz-96 {title}")
    fig.colorbar(im, ax=ax)
ax = axes[1, 1]
ax.plot(t, errors[k], color="C3", label=f"this initial condition (VPT {ev['vpt'][k]:.2f})")
ax.plot(t, np.minimum(errors, 10).mean(0), color="C0", label=f"mean over {len(errors)} initial conditions")
ax.axhline(config.threshold, color="0.4", ls=":", label=f"threshold {config.threshold}")
ax.axvline(ev["vpt"][k], color="k", ls="--", lw=1, label="VPT")
ax.set_ylim(0, 1.6)
ax.set_xlabel("time (Lyapunov times)")
ax.set_ylabel("NRMSE")
ax.set_title("Normalised error of the rollout")
ax.legend(fontsize=8)
fig.suptitle(f"Lorenz-96 (J = 40, F = 8): {MODEL} rollout after a {config.context}-step warm-up")
fig.tight_layout()

# %% [markdown]
# The rollout tracks the true pattern of travelling waves for most of a Lyapunov time, then
# diverges: no model can follow a chaotic trajectory much beyond a few Lyapunov times, since errors
# grow like $e^{\lambda_1 t}$. The full experiment (`python -m experiments dynamics --system lorenz96
# --model elman`, 256 trajectories, 30 epochs; other mixers with `--model`) and its numbers are in
# `experiments/notes/dynamics.md`.
