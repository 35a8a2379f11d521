# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The linear-attention family as one recurrence
#
# Softmax attention keeps every past key and value. Linear attention keeps a matrix
# state instead, $S_t \in \mathbb{R}^{d_k \times d_v}$, per head, and a whole family of
# recent models is the same recurrence with a different transition $M_t$ and write
# vector $w_t$:
#
# $$S_t = M_t\, S_{t-1} + w_t\, v_t^\top, \qquad o_t = s\, S_t^\top q_t, \qquad s = d_k^{-1/2}.$$
#
# | model | $M_t$ | $w_t$ | ssmjax |
# | --- | --- | --- | --- |
# | linear attention | $I$ | $k_t$ | `gated_linear_attention` |
# | RetNet | $\gamma I$, fixed per head | $k_t$ | `gated_linear_attention`, per-head decay |
# | GLA | $\operatorname{diag}(\alpha_t)$, data-dependent | $k_t$ | `gated_linear_attention`, per-channel decay |
# | DeltaNet | $I - \beta_t k_t k_t^\top$ | $\beta_t k_t$ | `delta_rule` |
# | Gated DeltaNet | $\alpha_t (I - \beta_t k_t k_t^\top)$ | $\beta_t k_t$ | `delta_rule` with `log_decay` |
# | mLSTM | $f_t I$ | $i_t k_t$ | `mlstm` |
#
# The mLSTM also carries a normaliser $n_t = f_t n_{t-1} + i_t k_t$ and reads
# $h_t = s\, S_t^\top q_t / \max(|s\, n_t^\top q_t|, 1)$, with exponential input gates
# $i_t = e^{\tilde\imath_t}$ kept finite by a running stabiliser. Gates are passed in
# log space (`log_decay` $= \log \alpha_t$, `log_f`, `log_i`).
#
# This notebook checks every variant against one plain numpy loop over that equation,
# shows the chunked evaluation equals the token-by-token one, draws the attention
# matrix each variant induces, and runs a layer token by token against its parallel call.
#
# * Linear attention: Katharopoulos, Vyas, Pappas and Fleuret (2020), *Transformers are
#   RNNs*, arXiv:2006.16236.
# * RetNet: Sun et al. (2023), *Retentive Network*, arXiv:2307.08621.
# * GLA: Yang, Wang, Shen, Panda and Kim (2024), *Gated Linear Attention Transformers with
#   Hardware-Efficient Training*, arXiv:2312.06635.
# * DeltaNet: Schlag, Irie and Schmidhuber (2021), *Linear Transformers Are Secretly Fast
#   Weight Programmers*, arXiv:2102.11174; Yang, Wang, Zhang, Shen and Kim (2024),
#   *Parallelizing Linear Transformers with the Delta Rule over Sequence Length*,
#   arXiv:2406.06484.
# * Gated DeltaNet: Yang, Kautz and Hatamizadeh (2025), *Gated Delta Networks: Improving
#   Mamba2 with Delta Rule*, arXiv:2412.06464.
# * mLSTM: Beck et al. (2024), *xLSTM: Extended Long Short-Term Memory*, arXiv:2405.04517.

# %% tags=["parameters"]
SMALL = False

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import ssmjax.layers
from ssmjax.scan import delta_rule, gated_linear_attention, mlstm, mlstm_sequential

jax.config.update("jax_enable_x64", True)  # every comparison below is in float64
rng = np.random.default_rng(0)

# %% [markdown]
# ## The oracle: one loop for all six
#
# Given the per-step transitions $M_t$ (as explicit $d_k \times d_k$ matrices) and write
# vectors $w_t$, the loop below is the equation above and nothing else. The mLSTM's
# normaliser rides along as an extra value column of ones (its last output column is
# $s\, n_t^\top q_t$).

# %%
def oracle(q, M, w, v, normalise=False):
    """q, w [T, dk]; M [T, dk, dk]; v [T, dv] -> o [T, dv] for one head."""
    if normalise:
        v = np.concatenate([v, np.ones((len(v), 1))], axis=1)
    S, out = np.zeros((q.shape[1], v.shape[1])), []
    for t in range(len(q)):
        S = M[t] @ S + np.outer(w[t], v[t])
        out.append(S.T @ q[t] / np.sqrt(q.shape[1]))
    out = np.array(out)
    return out[:, :-1] / np.maximum(np.abs(out[:, -1:]), 1) if normalise else out


# %% [markdown]
# ## Six variants, two evaluations each
#
# One set of queries and unit-norm keys ($T = 32$, one head, $d_k = 8$) and, as values,
# the one-hot vectors $v_j = e_j$ ($d_v = T$). Every variant is linear in $v$,
# $o_i = \sum_{j \le i} A_{ij} v_j$, so with one-hot values the output *is* the
# attention matrix $A$ the variant induces: row $i$ says how much of each past value
# the query at $i$ reads.
#
# Linear attention, RetNet and GLA are one `gated_linear_attention` call (stacked on the
# batch axis) with per-channel log-decays $0$, $\log\gamma$ and a random $\log\alpha_t$;
# DeltaNet and Gated DeltaNet are one `delta_rule` call. `chunk_size = 12` does not
# divide $T$: the chunked forms pad the last chunk.

# %%
T, dk, chunk = 32, 8, 12
q = rng.normal(size=(T, dk))
k = rng.normal(size=(T, dk))
k /= np.linalg.norm(k, axis=1, keepdims=True)
v = np.eye(T)
gamma = 0.9  # RetNet's heads use 1 - 2^(-5-h); smaller here so the decay shows at T = 32
log_alpha = -rng.uniform(0.0, 0.4, (T, dk))  # GLA: per step and key channel
beta = 1 / (1 + np.exp(-rng.normal(size=T)))  # DeltaNet: writing strength in (0, 1)
log_a = -rng.uniform(0.0, 0.2, T)  # Gated DeltaNet: per-step scalar decay
log_f = -np.log1p(np.exp(-rng.normal(2.0, 1.0, T)))  # mLSTM: log sigmoid forget gate
log_i = rng.normal(size=T)  # mLSTM: log of the exponential input gate

I, kk = np.eye(dk), np.einsum("ti,tj->tij", k, k)
transitions = {  # name: (M_t, w_t, normalise)
    "linear attention": (np.broadcast_to(I, (T, dk, dk)), k, False),
    f"RetNet (gamma = {gamma})": (np.broadcast_to(gamma * I, (T, dk, dk)), k, False),
    "GLA": (np.einsum("ti,ij->tij", np.exp(log_alpha), I), k, False),
    "DeltaNet": (I - beta[:, None, None] * kk, beta[:, None] * k, False),
    "Gated DeltaNet": (np.exp(log_a)[:, None, None] * (I - beta[:, None, None] * kk), beta[:, None] * k, False),
    "mLSTM": (np.exp(log_f)[:, None, None] * I, np.exp(log_i)[:, None] * k, True),
}
attention = {name: oracle(q, M, w, v, normalise) for name, (M, w, normalise) in transitions.items()}

# %% [markdown]
# The library calls, batch-first `[batch, time, heads, dim]`, each compiled once per
# method. The sequential form is a `lax.scan` over tokens; the chunked form is
# quadratic inside a chunk and recurrent across chunks (for GLA, the state passing of
# the GLA paper, Sec. 3.3; for the delta rule, the WY / UT representation of Yang et al.
# 2024, which turns the product of the $I - \beta k k^\top$ inside a chunk into one
# triangular solve).

# %%
def heads(x, rows):  # [T, dim] -> [rows, T, 1 head, dim]; [T] -> [rows, T, 1 head]
    return np.broadcast_to(x[None, :, None], (rows,) + x.shape[:1] + (1,) + x.shape[1:])


gla = jax.jit(gated_linear_attention, static_argnames=("method", "chunk_size"))
delta = jax.jit(delta_rule, static_argnames=("method", "chunk_size"))
gla_decays = np.stack([np.zeros((T, dk)), np.full((T, dk), np.log(gamma)), log_alpha])[:, :, None]
delta_decays = np.stack([np.zeros(T), log_a])[:, :, None]

gla_methods = ("sequential", "chunked") if SMALL else ("sequential", "parallel", "chunked")
results = {}
for method in gla_methods:
    o, _ = gla(heads(q, 3), heads(k, 3), heads(v, 3), log_decay=gla_decays, method=method, chunk_size=chunk)
    results[method] = dict(zip(list(attention)[:3], o[:, :, 0]))
for method in ("sequential", "chunked"):
    o, _ = delta(heads(q, 2), heads(k, 2), heads(v, 2), heads(beta, 2), log_decay=delta_decays,
                 method=method, chunk_size=chunk)
    results[method].update(zip(list(attention)[3:5], o[:, :, 0]))
mlstm_args = (heads(q, 1), heads(k, 1), heads(v, 1), heads(log_f, 1), heads(log_i, 1))
results["sequential"]["mLSTM"] = jax.jit(mlstm_sequential)(*mlstm_args)[0][0, :, 0]
results["chunked"]["mLSTM"] = jax.jit(mlstm, static_argnames=("method", "chunk_size"))(
    *mlstm_args, method="chunked", chunk_size=chunk)[0][0, :, 0]

for method, outputs in results.items():
    for name, o in outputs.items():
        np.testing.assert_allclose(o, attention[name], rtol=1e-10, atol=1e-12)
    print(f"{method:>10}: {', '.join(outputs)} == the oracle loop")

# %% [markdown]
# ## The attention matrices
#
# Linear attention weighs every past token by $s\, q_i^\top k_j$ alone, forever.
# RetNet multiplies that by $\gamma^{i-j}$ (a fixed fade towards the lower left), GLA by
# a data-dependent, per-channel $\prod_{l=j+1}^{i} \alpha_l$, mLSTM by forget and input
# gates (and divides by the normaliser). The delta rule is different in kind: writing
# $\beta_t k_t$ first *removes* what the state held along $k_t$, so a later key that
# overlaps an earlier one changes how much of the earlier value survives, with either
# sign: $A$ is no longer a masked product of $q_i^\top k_j$ with a decay.

# %%
fig, axes = plt.subplots(2, 3, figsize=(12, 8))
for ax, (name, A) in zip(axes.flat, attention.items()):
    A = np.where(np.tril(np.ones((T, T))) > 0, A, np.nan)  # causal: nothing above the diagonal
    limit = np.nanmax(np.abs(A))
    ax.imshow(A, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(name)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
fig.suptitle(r"Attention matrices $A_{ij}$ induced by each recurrence (red > 0 > blue; same q, k)")
fig.tight_layout()

# %% [markdown]
# ## Decay and the delta rule's $\beta$
#
# How long a write survives (ignoring the keys) is the product of the decays since:
# RetNet's fixed $\gamma_h = 1 - 2^{-5-h}$ gives each head its own time scale; GLA's
# data-dependent gates differ per channel and per step; mLSTM's forget gates likewise.

# %%
lags = np.arange(T)
fig, ax = plt.subplots(figsize=(7, 4))
for h in range(4):
    ax.semilogy(lags, (1 - 2.0 ** (-5 - h)) ** lags, "k", lw=1, alpha=0.4 + 0.15 * h,
                label="RetNet heads 0-3" if h == 0 else None)
for c in range(3):
    ax.semilogy(lags, np.exp(np.cumsum(np.r_[0, log_alpha[1:, c]])), "C0", label="GLA channels" if c == 0 else None)
ax.semilogy(lags, np.exp(np.cumsum(np.r_[0, log_a[1:]])), "C1", label="Gated DeltaNet")
ax.semilogy(lags, np.exp(np.cumsum(np.r_[0, log_f[1:]])), "C2", label="mLSTM forget gate")
ax.set_xlabel("steps since the write, from t = 0")
ax.set_ylabel("remaining weight (product of decays)")
ax.set_title("How fast each variant forgets (this input)")
ax.legend()
fig.tight_layout()

# %% [markdown]
# $\beta$ is easiest to see with two orthogonal keys. Write $(k_1, v_1)$, $(k_2, v_2)$,
# then $(k_1, v_3)$ and read with $q = k_1$ (scale 1). Linear attention returns
# $v_1 + v_3$: the two writes under one key pile up. The delta rule moves the value
# $m = S^\top k_1$ stored under $k_1$ a fraction $\beta$ of the way to the new value,
# $m \mapsto (1 - \beta) m + \beta v_3$: with $\beta = 1$ it overwrites. The value under
# $k_2$ is untouched either way.

# %%
k1, k2 = np.eye(4)[0], np.eye(4)[1]
keys = np.stack([k1, k2, k1])
values = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # v1, v2, v3
queries = np.stack([k1, k1, k1])  # read the key k1 after each write
betas = np.array([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])  # two runs: beta = 1 and beta = 1/2

o_linear, _ = gla(heads(queries, 1), heads(keys, 1), heads(values, 1), scale=1.0, method="sequential", chunk_size=chunk)
o_delta, S = delta(heads(queries, 2), heads(keys, 2), heads(values, 2), betas[:, :, None], scale=1.0,
                   method="sequential", chunk_size=chunk)
np.testing.assert_allclose(o_linear[0, -1, 0], values[0] + values[2], atol=1e-12)
np.testing.assert_allclose(o_delta[0, -1, 0], values[2], atol=1e-12)  # beta = 1: overwritten
np.testing.assert_allclose(o_delta[1, -1, 0], 0.25 * values[0] + 0.5 * values[2], atol=1e-12)
np.testing.assert_allclose(S[:, 0].transpose(0, 2, 1) @ k2, [values[1], 0.5 * values[1]], atol=1e-12)
print("read k1 after the last write: linear attention", o_linear[0, -1, 0],
      "| delta rule beta = 1", o_delta[0, -1, 0], "| beta = 1/2", o_delta[1, -1, 0])

# %% [markdown]
# (With $\beta = 1/2$ every write is half strength, so $v_1$ went in as $\tfrac12 v_1$
# and the third write leaves $\tfrac12 \cdot \tfrac12 v_1 + \tfrac12 v_3$; $v_2$ is
# stored at half strength too.)
#
# ## Step decoding against the parallel form
#
# A layer of `ssmjax.layers` wraps the recurrence in projections, gates and norms. Its
# `__call__` runs the chunked form over the whole sequence (what training uses); its
# `step` advances the state one token from `init_state` (what generation uses). Both
# must give the same outputs. Parameters are initialised in float32 and cast to float64.

# %%
def to_float64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


d_model, T_layer = 16, 10 if SMALL else 40
x = jnp.asarray(rng.normal(size=(2, T_layer, d_model)))
layers = ("gla", "gated_deltanet") if SMALL else ("retnet", "gla", "deltanet", "gated_deltanet", "mlstm")
for name in layers:
    layer = ssmjax.layers.get(name, d_model=d_model, chunk_size=4)
    params = to_float64(jax.jit(layer.init)(jax.random.PRNGKey(1), x[:, :1].astype(jnp.float32)))
    y_call = jax.jit(layer.apply)(params, x)
    y_steps, _ = ssmjax.layers.run_steps(layer, params, x)  # step() token by token from init_state
    np.testing.assert_allclose(y_steps, y_call, rtol=1e-10, atol=1e-10)
    print(f"{name:>14}: call (chunk 4) == {T_layer} steps, max |dy| = {np.max(np.abs(y_steps - y_call)):.1e}")
