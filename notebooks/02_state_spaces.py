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
# # State spaces: HiPPO, S4, S4D, S5 and LRU
#
# A linear time-invariant state-space model maps an input $u(t)$ to an output $y(t)$
# through a state $x(t) \in \mathbb{C}^N$:
#
# $$x'(t) = A x(t) + B u(t), \qquad y(t) = \operatorname{Re}\, C x(t).$$
#
# Sampled with a step $\Delta$ it becomes a linear recurrence, and unrolling the
# recurrence from $x_{-1} = 0$ turns it into a causal convolution:
#
# $$x_k = \bar A x_{k-1} + \bar B u_k, \qquad y_k = \operatorname{Re}\, C x_k
# = \sum_{j \le k} K_{k-j}\, u_j, \qquad K_i = \operatorname{Re}\, C \bar A^{\,i} \bar B,$$
#
# with zero-order hold $\bar A = e^{\Delta A}$, $\bar B = A^{-1}(\bar A - I) B$, or the
# bilinear rule $\bar A = (I - \tfrac\Delta2 A)^{-1}(I + \tfrac\Delta2 A)$,
# $\bar B = (I - \tfrac\Delta2 A)^{-1} \Delta B$. The models below differ in the
# structure of $A$ and how it is initialised; each is trained as a convolution (or a
# parallel scan) and can be run as a recurrence for generation.
#
# * HiPPO: Gu, Dao, Ermon, Rudra and Ré (2020), *HiPPO: Recurrent Memory with Optimal
#   Polynomial Projections*, arXiv:2008.07669.
# * S4: Gu, Goel and Ré (2022), *Efficiently Modeling Long Sequences with Structured State
#   Spaces*, arXiv:2111.00396.
# * S4D: Gu, Gupta, Goel and Ré (2022), *On the Parameterization and Initialization of
#   Diagonal State Space Models*, arXiv:2206.11893.
# * S5: Smith, Warrington and Linderman (2023), *Simplified State Space Layers for
#   Sequence Modeling*, arXiv:2208.04933.
# * LRU: Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu and De (2023), *Resurrecting
#   Recurrent Neural Networks for Long Sequences*, arXiv:2303.06349.

# %% tags=["parameters"]
SMALL = False

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import ssmjax.layers
from ssmjax.layers.common import uniform_log_init
from ssmjax.layers.hippo import hippo_legs, hippo_legs_dplr, hippo_legs_nplr, s4d_init, s5_hippo_n_init
from ssmjax.layers.lru import lru_eigenvalues, ring_init
from ssmjax.scan import linear_scan
from ssmjax.scan.lti import (
    diagonal_kernel,
    diagonal_ssm_convolution,
    discretize_diagonal,
    discretize_dplr_bilinear,
    dplr_ssm_kernel,
    unrolled_kernel,
)

jax.config.update("jax_enable_x64", True)  # every comparison below is in float64
rng = np.random.default_rng(0)
N = 64  # state size of the real system (N/2 complex conjugate pairs)

# %% [markdown]
# ## HiPPO-LegS and its normal-plus-low-rank form
#
# HiPPO-LegS is the $A$ whose state $x(t)$ holds the coefficients of the best
# approximation of the whole history $u(s), s \le t$, by Legendre polynomials
# (uniform measure on $[0, t]$):
#
# $$A_{nk} = -\begin{cases} \sqrt{2n+1}\sqrt{2k+1} & n > k \\ n + 1 & n = k \\ 0 & n < k
# \end{cases}, \qquad B_n = \sqrt{2n+1}.$$
#
# $A$ is triangular with eigenvalues $-1, \dots, -N$, but it is far from normal:
# its eigenvectors are so badly conditioned that diagonalising it is numerically
# useless (S4, Lemma 3.2). S4's way out (Theorem 1): with $P_n = \sqrt{n + 1/2}$,
# $A + P P^\top = -\tfrac12 I + S$ with $S$ skew-symmetric, a normal matrix
# (HiPPO-N) that a *unitary* $V$ diagonalises:
#
# $$A = V\left(\operatorname{diag}\Lambda - p\, p^*\right) V^*, \qquad \Lambda_n =
# -\tfrac12 + i\omega_n, \quad p = V^* P, \quad b = V^* B.$$

# %%
A, B = hippo_legs(N)
Lambda, p, b, V = hippo_legs_nplr(N)
S = A + np.outer(np.sqrt(np.arange(N) + 0.5), np.sqrt(np.arange(N) + 0.5)) + 0.5 * np.eye(N)
np.testing.assert_allclose(S, -S.T, atol=1e-12)  # A + P P^T = -1/2 I + skew
np.testing.assert_allclose(V @ V.conj().T, np.eye(N), atol=1e-12)  # V unitary
np.testing.assert_allclose(V @ (np.diag(Lambda) - np.outer(p, p.conj())) @ V.conj().T, A, atol=1e-10)
np.testing.assert_allclose(V @ b, B, atol=1e-10)
np.testing.assert_allclose(Lambda.real, -0.5, atol=1e-12)

eigenvalues, eigenvectors = np.linalg.eig(A)
assert np.linalg.cond(eigenvectors) > 1e10 and np.linalg.cond(V) < 1 + 1e-9
print(f"eigenvalues of A: {eigenvalues.real.min():.0f} .. {eigenvalues.real.max():.0f}; "
      f"condition number of its eigenvectors {np.linalg.cond(eigenvectors):.1e}, of V {np.linalg.cond(V):.1f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 4))
im = axes[0].imshow(A, cmap="RdBu", vmin=-np.abs(A).max(), vmax=np.abs(A).max())
fig.colorbar(im, ax=axes[0])
axes[0].set_title(f"HiPPO-LegS A (N = {N})")
axes[0].set_xlabel("column k")
axes[0].set_ylabel("row n")
im = axes[1].imshow(S, cmap="RdBu", vmin=-np.abs(S).max(), vmax=np.abs(S).max())
fig.colorbar(im, ax=axes[1])
axes[1].set_title(r"$A + PP^\top + \frac{1}{2}I$: skew-symmetric")
axes[1].set_xlabel("column k")
axes[1].set_ylabel("row n")
fig.suptitle("HiPPO-LegS: a non-normal matrix with a normal part")
fig.tight_layout()

# %% [markdown]
# ## Eigenvalues of each initialisation
#
# The real system has its eigenvalues in conjugate pairs, so every layer here keeps one
# of each pair ($N/2$ complex modes) and takes $2\operatorname{Re}$ of the output.
#
# * **S4** keeps the DPLR form: $\Lambda$ of HiPPO-N plus the rank-one $p p^*$.
# * **S4D** drops the low-rank term and keeps only a diagonal $\Lambda$: S4D-LegS is
#   HiPPO-N's $\Lambda$, S4D-Lin is $-\tfrac12 + i\pi n$ (Fourier frequencies),
#   S4D-Inv is $-\tfrac12 + i \tfrac N\pi\left(\tfrac{N}{2n+1} - 1\right)$.
# * **S5** uses one multi-input SSM for all channels with HiPPO-N's eigenvalues,
#   here block-diagonal (4 blocks of $N/4$), and a step $\Delta_n$ per state.
# * **LRU** parameterises the *discrete* eigenvalues directly,
#   $\lambda = \exp(-e^{\nu} + i e^{\theta})$, drawn uniformly on a ring
#   $r_{\min} \le |\lambda| \le r_{\max}$ (here $[0.9, 0.999]$, phases up to $\pi/10$ as
#   in the paper's long-range runs).
#
# On the left the continuous-time eigenvalues (log scale on the frequency axis, which
# spans nearly four decades); on the right the discrete ones, $\bar\lambda = e^{\Delta\lambda}$
# for the S4 family with $\Delta = 0.01$ (S5: its log-uniform $\Delta_n \in [10^{-3}, 10^{-1}]$),
# all inside the unit circle: the recurrence is stable.

# %%
inits = {"S4D-LegS": s4d_init("legs", N)[0], "S4D-Lin": s4d_init("lin", N)[0],
         "S4D-Inv": s4d_init("inv", N)[0]}
s5_lambda, _, _ = s5_hippo_n_init(N, blocks=4)
dt = 0.01
keys = jax.random.split(jax.random.PRNGKey(0), 3)
s5_dt = np.exp(uniform_log_init(1e-3, 1e-1)(keys[0], (N // 2,)))  # S5's step per state
nu_init, theta_init = ring_init(r_min=0.9, r_max=0.999, max_phase=np.pi / 10)  # the LRU layer's initialisers
lru_lambda = np.asarray(lru_eigenvalues(nu_init(keys[1], (N // 2,)), theta_init(keys[2], (N // 2,))))
assert np.all((np.abs(lru_lambda) >= 0.9 - 1e-6) & (np.abs(lru_lambda) <= 0.999 + 1e-6))
discrete = [np.exp(dt * lam) for lam in inits.values()] + [np.exp(s5_dt * s5_lambda), lru_lambda]
assert all(np.all(np.abs(z) < 1) for z in discrete)  # stable: every mode decays

fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
ax = axes[0]
ax.plot(eigenvalues.real, np.full(N, 0.3), "k|", ms=12, label="HiPPO-LegS A (real, plotted at 0.3)")
for (name, lam), marker in zip(inits.items(), "os^"):
    label = "S4D-LegS = S4's diagonal (HiPPO-N)" if name == "S4D-LegS" else name
    ax.plot(lam.real, lam.imag, marker, mfc="none", label=label)
ax.plot(s5_lambda.real, s5_lambda.imag, "x", label="S5 (HiPPO-N, 4 blocks)")
ax.set_yscale("log")
ax.set_xlim(-N - 4, 4)
ax.set_xlabel(r"Re $\lambda$")
ax.set_ylabel(r"Im $\lambda$ (log)")
ax.set_title("continuous time: eigenvalues of A")
ax.legend(fontsize=8)

ax = axes[1]
circle = np.exp(1j * np.linspace(0, 2 * np.pi, 400))
ax.plot(circle.real, circle.imag, "k-", lw=0.8)
for (name, lam), marker in zip(inits.items(), "os^"):
    z = np.exp(dt * lam)
    ax.plot(z.real, z.imag, marker, mfc="none", label=f"{name}, $\\Delta$ = {dt}")
z = np.exp(s5_dt * s5_lambda)
ax.plot(z.real, z.imag, "x", label="S5")
ax.plot(lru_lambda.real, lru_lambda.imag, ".", label="LRU ring [0.9, 0.999]")
ax.set_aspect("equal")
ax.set_xlabel(r"Re $\bar\lambda$")
ax.set_ylabel(r"Im $\bar\lambda$")
ax.set_title(r"discrete time: $\bar\lambda = e^{\Delta\lambda}$ (LRU: directly)")
ax.legend(fontsize=8, loc="lower left")
fig.tight_layout()

# %% [markdown]
# ## Convolution kernels: fast algorithms against the unrolled recurrence
#
# Training uses the kernel $K$ and an FFT. For a diagonal $A$ (S4D, S5, LRU)
# $K_i = \sum_n C_n \bar B_n \bar\lambda_n^{\,i}$ is a Vandermonde product
# (`ssmjax.scan.lti.diagonal_kernel`). For S4's DPLR $A$ the powers $\bar A^i$ are never
# formed: the truncated generating function $\sum_{i<L} C\bar A^i \bar B z^i$ is
# evaluated at the roots of unity through Cauchy kernels and the Woodbury identity, then
# inverted by FFT (S4, Algorithm 1; `dplr_ssm_kernel`). Both must equal the oracle
# `unrolled_kernel`, which runs $x_0 = \bar B$, $x_i = \bar A x_{i-1}$ step by step.
# Here all four share one random $C$ and $\Delta = 0.01$ (S4 bilinear, S4D zero-order hold).

# %%
L = 256 if SMALL else 1000
C = rng.normal(size=N // 2) + 1j * rng.normal(size=N // 2)
conj_extend = lambda z: np.concatenate([z, z.conj()], axis=-1)  # noqa: E731

Lam4, p4, b4, _ = hippo_legs_dplr(N)
s4_system = (conj_extend(Lam4)[None], conj_extend(p4)[None, None], conj_extend(b4)[None])
kernels = {"S4 (DPLR, Cauchy)": np.asarray(dplr_ssm_kernel(*s4_system, conj_extend(C)[None], np.array([dt]), L))[0]}
A_bar, B_bar = discretize_dplr_bilinear(*s4_system, np.array([dt]))
oracle = np.asarray(unrolled_kernel(A_bar, B_bar, conj_extend(C)[None], L)).real[0]
np.testing.assert_allclose(kernels["S4 (DPLR, Cauchy)"], oracle, atol=1e-12)

names = ("legs", "lin", "inv")
lam, b_init = (np.stack(z) for z in zip(*(s4d_init(name, N) for name in names)))  # [3, N/2] each
K = 2 * np.asarray(diagonal_kernel(lam, b_init, C, dt, L)).real  # 2 Re: the conjugate halves
log_A_bar, B_bar = discretize_diagonal(lam, b_init, dt)
np.testing.assert_allclose(K, 2 * np.asarray(unrolled_kernel(np.exp(log_A_bar), B_bar, C, L)).real, atol=1e-12)
kernels.update({f"S4D-{name} (Vandermonde)": K_n for name, K_n in zip(("LegS", "Lin", "Inv"), K)})
print(f"all {len(kernels)} kernels equal the unrolled recurrence to 1e-12 (L = {L})")

fig, axes = plt.subplots(len(kernels), 1, figsize=(8, 9), sharex=True)
for ax, (name, K) in zip(axes, kernels.items()):
    ax.plot(np.arange(L) * dt, K, lw=1)
    ax.set_title(name, fontsize=10)
    ax.set_ylabel(r"$K_i$")
    ax.set_xlabel(r"time $i\Delta$")
fig.suptitle(r"Convolution kernels $K_i = \mathrm{Re}\, C \bar A^i \bar B$ (same C, $\Delta$ = 0.01)")
fig.tight_layout()

# %% [markdown]
# The frequencies show: S4D-Lin's modes are spaced like a Fourier basis, S4D-Inv adds a
# few very fast modes, and S4D-LegS mixes slow and fast. Every S4D mode decays at rate
# $1/2$ ($\operatorname{Re}\lambda = -\tfrac12$), so those kernels fade over $t \approx 10$;
# S4's full DPLR matrix is HiPPO-LegS itself, with eigenvalues $-1, \dots, -N$, and its
# kernel fades faster.
#
# ## One SSM, two evaluations
#
# The same discretised diagonal SSM over a sequence, once as an FFT convolution with its
# kernel (`diagonal_ssm_convolution`, also returning the final state in parallel) and
# once as the recurrence $x_k = \bar A x_{k-1} + \bar B u_k$ (`linear_scan` on complex
# inputs), for 3 channels with their own $\Delta$:

# %%
T = 128 if SMALL else 1024
lam, b_init = s4d_init("lin", N)
dts = np.array([[0.003], [0.03], [0.3]])  # one step per channel
log_A_bar, B_bar = discretize_diagonal(lam, b_init, dts)  # [3, N/2]
u = rng.normal(size=(2, T, 3))
y_conv, x_conv = diagonal_ssm_convolution(u, log_A_bar, B_bar, 2 * C)
x_seq, x_last = linear_scan(np.exp(log_A_bar), B_bar * u[..., None], method="sequential")
y_seq = np.einsum("btcn,n->btc", x_seq, 2 * C).real
np.testing.assert_allclose(y_conv, y_seq, rtol=1e-10, atol=1e-10)
np.testing.assert_allclose(x_conv, x_last, rtol=1e-10, atol=1e-10)
print(f"FFT convolution == recurrence: max |dy| = {np.max(np.abs(y_conv - y_seq)):.1e}")

# %% [markdown]
# ## The layers: whole-sequence call against token-by-token steps
#
# Each layer of `ssmjax.layers` has a whole-sequence `__call__` (S4 and S4D: the FFT
# convolution of their kernel; S5 and LRU: one `linear_scan` over the sequence) and a
# `step` that advances the recurrence one token from `init_state`: S4's step uses the
# dense bilinear $\bar A$ (an $N \times N$ `matrix_scan` of length 1), never the Cauchy
# kernel. The two must agree. Parameters are initialised in float32 and cast to float64,
# so the comparison is to rounding. (At test size only S4 and S5 run.)

# %%
def to_float64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


d_model, T_layer = 8, 12 if SMALL else 48
x = jnp.asarray(rng.normal(size=(2, T_layer, d_model)))
for name in ("s4", "s5") if SMALL else ("s4", "s4d", "s5", "lru"):
    layer = ssmjax.layers.get(name, d_model=d_model, d_state=16)
    params = to_float64(jax.jit(layer.init)(jax.random.PRNGKey(1), x[:, :1].astype(jnp.float32)))
    y_call = jax.jit(layer.apply)(params, x)
    y_steps, _ = ssmjax.layers.run_steps(layer, params, x)  # step() token by token from init_state
    np.testing.assert_allclose(y_steps, y_call, rtol=1e-10, atol=1e-10)
    print(f"{name:>4}: call == {T_layer} steps, max |dy| = {np.max(np.abs(y_steps - y_call)):.1e}")
