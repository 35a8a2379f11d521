# %% [markdown]
# # Selection and recall
#
# A **time-invariant** (LTI) state space model such as S4D updates its state with the same
# matrices at every step,
#
# $$h_t = \bar A\, h_{t-1} + \bar B\, x_t, \qquad y_t = C h_t,$$
#
# so the whole layer is one fixed convolution $y = \bar K * x$ with $\bar K_k = C \bar A^k \bar B$.
# It cannot decide, from the content of $x_t$, to *ignore* a token or to *keep* one. A
# **selective** SSM (Mamba; Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
# State Spaces", arXiv 2312.00752) makes the step size and the projections functions of the input,
#
# $$\Delta_t = \operatorname{softplus}(W_\Delta x_t), \qquad
# h_t = e^{\Delta_t A}\, h_{t-1} + \Delta_t B(x_t)\, x_t, \qquad y_t = C(x_t)\, h_t,$$
#
# so a small $\Delta_t$ leaves the state untouched (skip this token) and a large one overwrites it
# (remember this token). Gated linear attention (GLA; Yang et al. 2023, arXiv 2312.06635) and
# Mamba-2 (Dao & Gu 2024, arXiv 2405.21060) get the same ability from an input-dependent decay,
# $S_t = \operatorname{diag}(\alpha(x_t))\, S_{t-1} + k_t v_t^\top$.
#
# This notebook trains small models with the library's own tasks and trainer
# (`experiments.tasks`, `ssmjax.train.train`) on two synthetic tasks:
#
# * **selective copying** (Mamba, Table 1): a few content tokens scattered at random positions in
#   noise must be reproduced in order at the end;
# * **multi-query associative recall** (MQAR; Arora et al. 2023, "Zoology: Measuring and Improving
#   Recall in Efficient Language Models", arXiv 2312.04927): key-value pairs, then queries of the
#   keys whose values must be recalled.

# %% tags=["parameters"]
SMALL = False

# %%
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments.runner import build_config, build_model
from experiments.tasks import build_task
from ssmjax.train import read_metrics, train

SC_MODELS = ("mamba",) if SMALL else ("s4d", "mamba", "gla")              # LTI vs selective
MQAR_MODELS = ("s4d,attention",) if SMALL else ("s4d", "s4d,attention")  # recurrent vs hybrid
EVAL = ["eval_batches=1", "eval_batch_size=8"] if SMALL else ["eval_batches=2", "eval_batch_size=64"]
SC_SETTINGS = (["seq_len=16", "num_tokens=2", "d_model=16", "n_layers=1", "mlp=none", "batch_size=8", "steps=3"]
               if SMALL else ["seq_len=64", "num_tokens=4", "d_model=32", "batch_size=32", "steps=500"])
MQAR_SETTINGS = (["d_model=16", "mlp=none", "batch_size=8", "steps=3"] if SMALL else
                 ["d_model=64", "batch_size=32", "steps=600"])
COMMON = ["lr=3e-3", "warmup_steps=30", "log_every=10", "eval_every=100000", "checkpoint_every=100000"]


def run(experiment, model, settings):
    """Train ``model`` on ``experiment`` in a temporary run directory; returns
    ``(network, task, params, result, metrics rows)``."""
    config = build_config(experiment, model, overrides=COMMON + EVAL + settings)
    task = build_task(experiment, config)
    network = build_model(config, task.vocab_size)
    with tempfile.TemporaryDirectory() as run_dir:
        params, _, _, result = train(network, task, config, run_dir, verbose=False)
        rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    return network, task, params, result, [r for r in rows if r["split"] == "train"]


# %% [markdown]
# ## Selective copying
#
# Each sequence holds $L$ noise tokens (id 0) with $M$ content tokens at random, sorted positions,
# then $M$ marker tokens; at the $j$-th marker the model must output the $j$-th content token. The
# positions change from example to example, so no fixed convolution kernel can pick them out.

# %%
sc = {}
for model in SC_MODELS:
    sc[model] = run("selective_copying", model, SC_SETTINGS)
    summary = sc[model][3]["eval"]["summary"]
    print(f"{model:>6}: token accuracy {summary['token acc']:.3f}, sequence accuracy {summary['sequence acc']:.3f}, "
          f"{sc[model][3]['params']:,} parameters, {sc[model][3]['wall_s']:.0f} s")

example = sc[SC_MODELS[0]][1].eval_set[0]
print("one example (0 = noise, last id = marker):", example.inputs[0].tolist())

# %%
def smooth(values, width):
    width = max(1, min(width, len(values)))
    return np.convolve(values, np.ones(width) / width, mode="valid")


fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for model, (_, _, _, _, rows) in sc.items():
    steps = np.array([r["step"] for r in rows])
    for ax, key in zip(axes, ("loss", "accuracy")):
        values = smooth(np.array([r[key] for r in rows]), 5)
        ax.plot(steps[len(steps) - len(values):], values, label=model)
for ax, key in zip(axes, ("training loss (nats)", "training accuracy on the copied tokens")):
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(key.split(" (")[0].capitalize())
    ax.legend()
fig.suptitle("Selective copying: time-invariant (S4D) against selective (Mamba, GLA) layers")
fig.tight_layout()

# %% [markdown]
# ## What the state does on one example
#
# Every layer also has a step form (`step`, one token at a time, carrying the state), so we can
# watch the recurrent state of the first layer token by token, $\lVert h_t - h_{t-1} \rVert$.
# (Mamba's state also holds the short convolution's last inputs; we leave those out and keep the
# SSM state.) A selective layer should change its state at the content tokens and leave it
# alone on the noise; a time-invariant one moves at every token.

# %%
def memory(layer_state):
    """The recurrent memory of one layer as ``[batch, -1]``: every state leaf except the short
    convolution's input buffer (``"conv"``)."""
    if isinstance(layer_state, dict):
        layer_state = {k: v for k, v in layer_state.items() if k != "conv"}
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(layer_state)], axis=1)


def state_updates(network, params, tokens):
    """``||h_t - h_{t-1}||`` of the first layer's state for every position of ``tokens [t]``."""
    def body(state, token):
        _, new = network.apply(params, token[None], state, method="step")
        return new, jnp.linalg.norm(memory(new[0][0]) - memory(state[0][0]))

    state = network.apply(params, 1, method="init_state")  # a list (groups) of lists (blocks)
    return np.asarray(jax.jit(lambda x: jax.lax.scan(body, state, x)[1])(jnp.asarray(tokens)))


tokens = example.inputs[0]
content = np.nonzero((tokens > 0) & (tokens < tokens.max()))[0]
fig, axes = plt.subplots(len(SC_MODELS), 1, figsize=(10, 2.2 * len(SC_MODELS) + 0.4), squeeze=False)
axes = axes[:, 0]
ratios = {}
for ax, model in zip(axes, SC_MODELS):
    network, _, params, _, _ = sc[model]
    update = state_updates(network, params, tokens)
    noise = (tokens == 0)
    ratios[model] = update[content].mean() / update[noise].mean()
    ax.plot(update / update.max(), color="C0", lw=1.2)
    for p in content:
        ax.axvline(p, color="C3", alpha=0.5, lw=1)
    ax.axvspan(len(tokens) - len(content) - 0.5, len(tokens) - 0.5, color="0.85", label="markers")
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("relative\nupdate")
    ax.set_title(f"{model}: state update per token (content tokens red); content / noise = {ratios[model]:.1f}",
                 fontsize=10)
axes[0].legend(loc="upper left", fontsize=8)
fig.tight_layout()

# %% [markdown]
# The trained selective layers write at the content tokens and barely move on noise (a large
# content / noise ratio; in Mamba the short causal convolution in front of the SSM spreads each
# content token over the next few steps). S4D's state keeps evolving at every step, since its
# update $\bar A h + \bar B x$ does not depend on what $x_t$ is.

# %%
accuracy = {m: sc[m][3]["eval"]["accuracy"] for m in SC_MODELS}
if not SMALL:
    for model in SC_MODELS[1:]:
        assert accuracy[model] > accuracy["s4d"] + 0.05, accuracy  # selection beats a fixed convolution
        assert ratios[model] > 1.8 * ratios["s4d"], ratios         # ... and shows in the state
print({m: round(a, 3) for m, a in accuracy.items()})

# %% [markdown]
# ## Recall needs memory: MQAR and the hybrid argument
#
# In MQAR the model sees $k_1 v_1 \dots k_n v_n$ and later the keys again, each of which must be
# answered with its value. A recurrent layer has to hold all $n$ pairs in a fixed-size state
# ($d \cdot N$ numbers for an SSM, whatever $T$ is), while attention keeps every key and value
# (a cache of $2 T d$ numbers) and looks the key up. Zoology finds that attention-free models
# lose MQAR accuracy as $n$ grows and that **a few attention layers** in an otherwise recurrent
# stack recover it. Here: a two-layer S4D against the hybrid `"s4d,attention"` (one S4D layer,
# one attention layer), trained on 4 pairs in sequences of 32 tokens over a 32-token vocabulary.

# %%
mqar = {}
for model in MQAR_MODELS:
    mqar[model] = run("mqar", model, ["vocab_size=32", "train_shapes=((32, 4),)", "eval_shapes=((32, 4),)",
                                      *MQAR_SETTINGS])
    print(f"{model:>14}: query accuracy {mqar[model][3]['eval']['accuracy']:.3f}")

fig, ax = plt.subplots(figsize=(6.5, 3.8))
for model, (_, _, _, _, rows) in mqar.items():
    values = smooth(np.array([r["accuracy"] for r in rows]), 5)
    ax.plot(np.array([r["step"] for r in rows])[len(rows) - len(values):], values, label=model)
ax.axhline(1 / 16, color="gray", ls=":", label="chance (16 values)")
ax.set_xlabel("step")
ax.set_ylabel("training accuracy on the queries")
ax.set_title("MQAR: a recurrent stack against a hybrid with one attention layer")
ax.legend()
fig.tight_layout()
if not SMALL:
    assert mqar["s4d,attention"][3]["eval"]["accuracy"] > 0.9
    assert mqar["s4d,attention"][3]["eval"]["accuracy"] > mqar["s4d"][3]["eval"]["accuracy"] + 0.3

# %% [markdown]
# **Summary.** Selection (an input-dependent update) is what lets a recurrent layer skip noise and
# keep content, which a time-invariant SSM's fixed convolution cannot do; recall of many
# associations needs memory that grows with the context, which one attention layer provides in a
# hybrid. The full experiments, at larger sizes and with more models, are
# `python -m experiments selective_copying --model mamba` and `python -m experiments mqar --model
# "gated_deltanet*3,attention"` (results in `experiments/RESULTS.md`).
