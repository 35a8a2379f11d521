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
# # Scans from first principles
#
# Every model in ssmjax is a recurrence. The simplest one is the first-order linear
# recurrence, elementwise over features:
#
# $$h_t = a_t \odot h_{t-1} + b_t, \qquad t = 0, \dots, T-1, \qquad h_{-1} = 0.$$
#
# Written as a loop it takes $T$ dependent steps. This notebook shows why it can be
# evaluated in $O(\log T)$ parallel steps instead, evaluates it three ways with
# `ssmjax.scan.linear_scan` (plus a plain numpy loop as the oracle), draws the parallel
# algorithm for $T = 8$, and measures what each evaluation costs on this machine.
#
# References: Blelloch (1990), *Prefix Sums and Their Applications*; Hillis and Steele
# (1986), *Data Parallel Algorithms*; Martin and Cundy (2018), *Parallelizing Linear
# Recurrent Neural Nets Over Sequence Length*, arXiv:1709.04057; Smith, Warrington and
# Linderman (2023), *Simplified State Space Layers for Sequence Modeling* (S5),
# arXiv:2208.04933.

# %% tags=["parameters"]
SMALL = False

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np

from ssmjax.scan import linear_scan

jax.config.update("jax_enable_x64", True)  # compare the algorithms, not the rounding
rng = np.random.default_rng(0)

# %% [markdown]
# ## One recurrence, four evaluations
#
# The oracle is the definition, a Python loop over time. `linear_scan` takes batch-first
# arrays `[batch, time, features]` and returns `(h, final_state)`; `method=` picks the
# evaluation:
#
# * `"sequential"`: `lax.scan` over time, the same loop compiled;
# * `"associative"`: `lax.associative_scan` with the combine operator below,
#   $O(\log T)$ depth;
# * `"chunked"`: a loop inside chunks of about $\sqrt T$ steps (all chunks at once), a
#   loop over the $T / C$ chunk summaries, then a fix-up: $O(T)$ work in about
#   $2\sqrt T$ sequential steps.
#
# Each is compiled once with `jax.jit` (`method` is a static, Python-level choice).

# %%
def numpy_oracle(a, b):
    h = np.zeros_like(b[:, 0])
    out = np.empty_like(b)
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out[:, t] = h
    return out


scan = jax.jit(linear_scan, static_argnames="method")
batch, T, d = 2, 100 if SMALL else 1000, 16
a = rng.uniform(0.8, 1.0, (batch, T, d))
b = rng.normal(size=(batch, T, d))
h_oracle = numpy_oracle(a, b)

for method in ("sequential", "associative", "chunked"):
    h, h_last = scan(a, b, method=method)
    np.testing.assert_allclose(h, h_oracle, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h_last, h_oracle[:, -1], rtol=1e-12, atol=1e-12)
    print(f"{method:>11}: max |h - oracle| = {np.max(np.abs(h - h_oracle)):.1e}")

# %% [markdown]
# ## The combine operator
#
# One step $h \mapsto a h + b$ is an affine map, so write it as the pair $(a, b)$.
# Applying $(a_1, b_1)$ and then $(a_2, b_2)$ gives $a_2 (a_1 h + b_1) + b_2$, the pair
#
# $$(a_1, b_1) \circ (a_2, b_2) = (a_2 a_1,\; a_2 b_1 + b_2).$$
#
# Composition of maps is associative, so $\circ$ is too, and the prefix
# $(a_0, b_0) \circ \dots \circ (a_t, b_t)$ has $b$-component $h_t$ (with $h_{-1} = 0$).
# Any bracketing of the prefix gives the same answer: that freedom is what a parallel
# scan exploits. (It is not commutative: the order of time matters.)

# %%
def combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a2 * a1, a2 * b1 + b2


x, y, z = (tuple(rng.normal(size=(2, 1000))) for _ in range(3))
left, right = combine(combine(x, y), z), combine(x, combine(y, z))
np.testing.assert_allclose(left, right, rtol=1e-12)  # associative, to rounding
assert not np.allclose(combine(x, y), combine(y, x))  # but not commutative

_, h_assoc = jax.jit(lambda a, b: jax.lax.associative_scan(combine, (a, b), axis=1))(a, b)
np.testing.assert_allclose(h_assoc, h_oracle, rtol=1e-12, atol=1e-12)
print("(x.y).z == x.(y.z); lax.associative_scan(combine) == the loop")

# %% [markdown]
# ## Two parallel scans for T = 8
#
# Below, each scan is run in numpy on the pairs $(a_t, b_t)$, recording which pairs it
# combines at each parallel step (a step is one round of independent combines). The
# recorded steps are what the figure draws; the result is checked against the oracle.
#
# * **Hillis-Steele** (1986): at step $s$ every position $t \ge 2^s$ combines with
#   $t - 2^s$. $\log_2 T$ steps, $T \log_2 T$ combines: shallow but not work-efficient.
# * **Odd-even / Blelloch-style** (the recursion `lax.associative_scan` uses): combine
#   neighbouring pairs, scan the $T/2$ results recursively, then give every remaining
#   even position the prefix of its left neighbour. $2 \log_2 T - 1$ steps but fewer
#   than $2T$ combines, the same order of work as the loop.

# %%
def hillis_steele(pairs):
    x, steps, shift = list(pairs), [], 1
    while shift < len(x):
        step = [(t - shift, t) for t in range(shift, len(x))]  # every combine of one step
        x = x[:shift] + [combine(x[s], x[t]) for s, t in step]
        steps.append(step)
        shift *= 2
    return x, steps


def odd_even(pairs):
    x, steps = list(pairs), []

    def scan(idx, depth):  # prefix-scan the positions idx of x, in place
        if len(idx) < 2:
            return
        up = [(idx[i], idx[i + 1]) for i in range(0, len(idx) - 1, 2)]
        steps.append(up)
        for s, t in up:
            x[t] = combine(x[s], x[t])
        scan(idx[1::2], depth + 1)
        down = [(idx[i - 1], idx[i]) for i in range(2, len(idx), 2)]
        if down:
            steps.append(down)
        for s, t in down:
            x[t] = combine(x[s], x[t])

    scan(list(range(len(x))), 0)
    return x, steps


a8, b8 = rng.uniform(0.5, 1.0, 8), rng.normal(size=8)
h8 = numpy_oracle(a8[None, :, None], b8[None, :, None])[0, :, 0]
schemes = {"Hillis-Steele": hillis_steele(zip(a8, b8)), "odd-even (Blelloch-style)": odd_even(zip(a8, b8))}
for name, (result, steps) in schemes.items():
    np.testing.assert_allclose([hb for _, hb in result], h8, rtol=1e-12)
    print(f"{name}: {len(steps)} steps, {sum(map(len, steps))} combines (the loop: 7 steps, 7 combines)")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for ax, (name, (_, steps)) in zip(axes, schemes.items()):
    for level, step in enumerate(steps):
        for t in range(8):
            ax.plot([t, t], [level, level + 1], color="0.85", zorder=0)  # the value passes down
        for s, t in step:
            ax.annotate("", xy=(t, level + 1), xytext=(s, level),
                        arrowprops=dict(arrowstyle="->", color="C0", lw=1.5))
            ax.plot(t, level + 1, "o", color="C1", zorder=3)
    ax.plot(range(8), [0] * 8, "s", color="k")
    ax.set_xticks(range(8))
    ax.set_yticks(range(len(steps) + 1))
    ax.invert_yaxis()
    ax.set_xlabel("position t")
    ax.set_ylabel("parallel step")
    ax.set_title(f"{name}: {len(steps)} steps, {sum(map(len, steps))} combines")
fig.suptitle(r"Parallel scans of $h_t = a_t h_{t-1} + b_t$, T = 8 (arrow: earlier $\circ$ later)")
fig.tight_layout()

# %% [markdown]
# ## What each evaluation costs
#
# Depth is not time. On a CPU there is little parallel hardware to fill,
# and the sequential loop does the least work and touches memory once per step; the
# associative scan does about twice the work and reads the sequence $O(\log T)$ times.
# Below, each method is jitted and timed (`experiments.bench.timing.measure_jax`: one
# warm-up call, then the median of several calls) on the benchmark's workload
# (`experiments.speed.linear_scan_workload`: batch 2, 256 features, float32).

# %%
from experiments.bench.timing import measure_jax
from experiments.speed import linear_scan_workload

lengths = [64, 512] if SMALL else [64, 256, 1024, 4096, 16384]
reps = 3 if SMALL else 7
methods = ("sequential", "associative", "chunked")
times = {m: [] for m in methods}
for t in lengths:
    w = linear_scan_workload(t)
    for m in methods:
        row = measure_jax(lambda *args, m=m: w.run(m, *args), w.args, reps=reps, backward=False)
        times[m].append(row["fwd_ms"])
    print(f"T = {t:>5}: " + ", ".join(f"{m} {times[m][-1]:.2f} ms" for m in methods))

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for m in methods:
    ax.loglog(lengths, times[m], "o-", label=m)
ax.loglog(lengths, np.array(lengths) * times["sequential"][0] / lengths[0], "k:", label=r"$\propto T$")
ax.set_xlabel("sequence length T")
ax.set_ylabel("forward time (ms, median)")
ax.set_title(f"linear_scan forward on {jax.default_backend().upper()}, batch 2, d = 256, float32")
ax.legend()
fig.tight_layout()

# %% [markdown]
# On a CPU the loop is usually the fastest: it does the least work and reads the
# sequence once. The parallel forms pay for their extra work and memory traffic (the
# associative scan makes $O(\log T)$ passes over the data). Once the arrays outgrow the
# caches (at $T = 4096$ each is 8 MB) all three are bound by memory bandwidth and the
# gaps narrow. That is why `method="auto"` picks `"sequential"` on CPU (the library's
# measurements are in `experiments/speed.py`). These numbers are live, on a machine that
# may be shared: a single point can jump.
#
# ## Where the Pallas kernel fits
#
# `method="pallas"` runs the kernel of `pallas_kernels/linear_scan.py`: a grid of
# programs over (batch, feature blocks), each looping over time with its carry in
# registers (on TPU it is also tiled over time). The loop stays sequential in time, but
# the features give the accelerator all the parallelism it needs, and $h$ is written
# once. It compiles with Triton on GPUs and Mosaic on TPUs; on CPU it runs under the
# Pallas interpreter (`interpret=True`, chosen automatically): correct, slow, for tests.
# Real float32 or bfloat16 inputs only (Mosaic has no float64; complex inputs take
# `"chunked"` on accelerators), so the check below runs in float32 against the float64 loop.
#
# What `method="auto"` picks is one table, `ssmjax/scan/_dispatch.py`: for
# `linear_scan`, the Pallas kernel on CUDA and TPU (the cases the target-compile tests
# prove, forward and backward), `"sequential"` on CPU, `"chunked"` elsewhere. The
# choice is made when the program is lowered for a platform, so a program exported for
# a GPU from this CPU host takes the GPU's branch.

# %%
a_small, b_small = rng.uniform(0.8, 1.0, (2, 16, 8)), rng.normal(size=(2, 16, 8))
h_pallas, _ = scan(a_small.astype(np.float32), b_small.astype(np.float32), method="pallas")  # interpreted on CPU
error = np.max(np.abs(h_pallas - numpy_oracle(a_small, b_small)))
np.testing.assert_allclose(h_pallas, numpy_oracle(a_small, b_small), rtol=1e-5, atol=1e-5)
print(f"pallas on {jax.default_backend()}, float32: agrees with the float64 loop, max error {error:.1e}")
