"""Depth recurrence: the Universal Transformer with Adaptive Computation Time, the looped
(recurrent-depth) transformer with a fixed or sampled number of iterations, and
"think at hard tokens".

One causal pre-norm block with shared parameters is applied ``max_steps`` times (Dehghani,
Gouws, Vinyals, Uszkoreit and Kaiser, 2019, "Universal Transformers"). Before every
application the coordinate embedding (sinusoidal timing signals of the position ``i`` and
of the step ``n``, as in the paper) is added::

    z   = s^n + P(i) + P(n)
    z   = z + W_o Attention(RMSNorm(z))      causal softmax attention over the keys / values
                                             of step n (:func:`masked_attention`)
    s^{n+1} = z + MLP(RMSNorm(z))            MLP = W_2 gelu(W_1 . + b_1) + b_2
    s^0 = x

``halting`` chooses how the steps are combined:

* ``"act"``: Adaptive Computation Time (Graves, 2016, "Adaptive Computation Time for
  Recurrent Neural Networks", eqs. 7-12) per position, as used by the Universal
  Transformer: the halting probability after step ``n`` is ``h^n = sigmoid(w . s^n + b)``
  (``b`` starts at ``halting_bias_init``); with ``N = min{n' : sum_{n <= n'} h^n >= 1 - eps}``
  (``N = max_steps`` if never reached) and the remainder ``R = 1 - sum_{n < N} h^n``, the
  weights ``p^n = h^n`` (``n < N``), ``p^N = R``, ``0`` after, sum to one and the output is
  ``y = sum_n p^n s^n``. The ponder cost ``rho = N + R`` (only ``R`` has a gradient) is sown
  as ``('intermediates', 'ponder_cost')`` (its mean; add ``tau * rho`` to the loss; a
  collection of its own would leak into ``init``'s variables) and per position as
  ``('intermediates', 'ponder_time')``, with ``h`` and ``p`` as ``('intermediates',
  'halting_probability' / 'halting_weights') [b, t, max_steps]``.
* ``"fixed"``: ``y = s^{max_steps}`` (the looped transformer).
* ``"sampled"``: the recurrent-depth recipe of Geiping et al., 2025, "Scaling up Test-Time
  Compute with Latent Reasoning: A Recurrent Depth Approach": in training
  (``deterministic=False``) the number of iterations is drawn once per call,
  ``r ~ Poisson(lambda)``, ``lambda ~ LogNormal(log(mean_steps) - 1/8, 1/2)``, clipped to
  ``[1, max_steps]`` (rng stream ``'dropout'``), and ``y = s^r``; at test time all
  ``max_steps`` iterations run (more compute than the training mean).

Every position is transformed at every step whatever its halting (as in the reference
ACT implementation), so the keys and values of step ``n`` exist for all tokens and the
layer is causal: the state carries one key/value cache per step (``[max_steps, b,
max_len, heads, dh]``) and ``step`` / a continued ``__call__`` equal one parallel call.

``think_at_hard_tokens=True`` (with ``halting="fixed"``; Fu et al., 2025, "Think-at-Hard:
Selective Latent Iterations to Improve Reasoning Language Models"): step ``0`` runs for
every token; before each further step a decider ``p^n = sigmoid(MLP_d(s^n))`` chooses the
tokens that iterate again (``p^n >= think_threshold``, and only tokens that iterated at
every earlier step)::

    s^{n+1} = s^n + g^n (f(s^n) - s^n),   g^n = a^{n-1} (1[p^n >= thr] + p^n - stop_grad(p^n))

(straight-through: the forward value is the hard decision ``a^n``, the decider gets the
gradient of ``p^n``). Attention is duo-causal as in the paper: at step ``n`` a token
attends to the keys of positions ``j <= i`` at every step ``k <= n`` that token ``j``
actually computed. The decider probabilities are sown as ``('intermediates',
'think_probability') [b, t, max_steps - 1]`` (for an imitation loss) and the number of
steps per token as ``('intermediates', 'iterations')``. Departures from the paper: one
shared block instead of a pretrained LLM with depth-wise LoRA, the decider reads the
block's state, and the dense form computes every token at every step (only the result is
selective).

Parameters (``d = d_model``, ``F = mlp_ratio d``): ``4 d^2`` attention, ``2 d F + F + d``
MLP, ``2 d`` norms; ``+ d + 1`` ACT halting unit; ``+ d^2/2 + d/2 + d/2 + 1`` decider
(hidden ``d / 2``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Bool, Float

from ssmjax.layers.common import StepByCall, check_heads, check_layer_input, output_dropout
from ssmjax.layers.registry import register

HALTING = ("act", "fixed", "sampled")


def timing_signal(positions: ArrayLike, channels: int, dtype) -> Array:
    """Sinusoidal embedding ``[sin(p w_i), cos(p w_i)]``, ``w_i = 10000^(-i / (channels/2 - 1))``
    (Vaswani et al., 2017; tensor2tensor's ``get_timing_signal_1d``), ``[..., channels]``;
    an odd last channel is zero."""
    half = channels // 2
    rates = 10000.0 ** (-jnp.arange(half, dtype=dtype) / max(half - 1, 1))
    angles = jnp.asarray(positions, dtype)[..., None] * rates
    signal = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(signal, [(0, 0)] * (signal.ndim - 1) + [(0, channels % 2)])


def masked_attention(
    q: Float[Array, "batch tq heads dk"],
    k: Float[Array, "batch tk heads dk"],
    v: Float[Array, "batch tk heads dv"],
    mask: Bool[Array, "#batch tq tk"],
) -> Float[Array, "batch tq heads dv"]:
    """``softmax(dk^-1/2 q k^T, masked) v`` in the input precision (at least float32).

    ``jax.nn.dot_product_attention`` always takes its softmax in float32, which would make
    the float64 oracle comparisons measure float32 rounding. Every query row must keep one
    visible key.
    """
    logits = jnp.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    weights = jax.nn.softmax(jnp.where(mask[:, None], logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhij,bjhe->bihe", weights, v)


def act_weights(
    halting: Float[Array, "*lead steps"], threshold: float
) -> tuple[Float[Array, "*lead steps"], Float[Array, "*lead"], Float[Array, "*lead"]]:
    """Adaptive Computation Time weights (Graves, 2016) from the halting probabilities
    ``h^1 .. h^S`` of each position.

    ``N = min{n : h^1 + .. + h^n >= threshold}`` (``S`` if never reached), ``R = 1 -
    (h^1 + .. + h^{N-1})``; returns ``(p, N, R)`` with ``p^n = h^n`` for ``n < N``, ``p^N = R``
    and ``0`` after (so ``sum_n p^n = 1``); ``N`` is a float count (no gradient).
    """
    steps = halting.shape[-1]
    total = jnp.cumsum(halting, axis=-1)
    reached = (total >= threshold) | (jnp.arange(steps) == steps - 1)
    last = jnp.argmax(reached, axis=-1)  # 0-based index of step N
    before = jnp.take_along_axis(total - halting, last[..., None], axis=-1)[..., 0]
    remainder = 1.0 - before
    index = jnp.arange(steps)
    weights = jnp.where(index < last[..., None], halting, 0.0) + jnp.where(index == last[..., None],
                                                                         remainder[..., None], 0.0)
    return weights, (last + 1).astype(halting.dtype), remainder


def sample_steps(key: Array, mean_steps: float, max_steps: int) -> Array:
    """``r ~ Poisson(lambda)``, ``lambda ~ LogNormal(log(mean) - sigma^2 / 2, sigma)``, ``sigma = 1/2``,
    clipped to ``[1, max_steps]`` (recurrent-depth training)."""
    sigma = 0.5
    k_rate, k_count = jax.random.split(key)
    rate = jnp.exp(math.log(mean_steps) - sigma**2 / 2 + sigma * jax.random.normal(k_rate, ()))
    return jnp.clip(jax.random.poisson(k_count, rate), 1, max_steps)


@register("universal_transformer")
class UniversalTransformer(StepByCall):
    """Shared causal block applied recurrently over depth (module docstring); state: one
    key/value cache per step ``dict(k, v [max_steps, b, max_len, heads, dh], active
    [max_steps, b, max_len], pos)``."""

    d_model: int
    num_heads: int = 4
    mlp_ratio: float = 4.0
    max_steps: int = 4
    halting: str = "act"
    act_epsilon: float = 0.01
    halting_bias_init: float = 1.0
    mean_steps: float = 2.0
    think_at_hard_tokens: bool = False
    think_threshold: float = 0.5
    max_len: int = 2048
    norm_eps: float = 1e-6
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.halting not in HALTING:
            raise ValueError(f"halting: expected one of {HALTING}, got {self.halting!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps: expected >= 1, got {self.max_steps}")
        if self.think_at_hard_tokens and self.halting != "fixed":
            raise ValueError("think_at_hard_tokens: selects the steps itself; use it with halting='fixed'")
        dh = check_heads("num_heads", self.d_model, self.num_heads)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj, self.k_proj, self.v_proj = (
            nn.DenseGeneral((self.num_heads, dh), use_bias=False, name=n, **kw) for n in ("q_proj", "k_proj", "v_proj"))
        self.out_proj = nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False, **kw)
        self.attn_norm = nn.RMSNorm(epsilon=self.norm_eps, **kw)
        self.mlp_norm = nn.RMSNorm(epsilon=self.norm_eps, **kw)
        self.mlp_in = nn.Dense(int(self.mlp_ratio * self.d_model), **kw)
        self.mlp_out = nn.Dense(self.d_model, **kw)
        if self.halting == "act":
            self.halt = nn.Dense(1, bias_init=nn.initializers.constant(self.halting_bias_init), **kw)
        if self.think_at_hard_tokens:
            self.decider_in = nn.Dense(max(1, self.d_model // 2), **kw)
            self.decider_out = nn.Dense(1, **kw)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        dh = self.d_model // self.num_heads
        shape = (self.max_steps, batch_size, self.max_len, self.num_heads, dh)
        return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                    active=jnp.zeros(shape[:3], bool), pos=jnp.zeros((), jnp.int32))

    # ------------------------------------------------------------------ the shared block
    def _attend(self, q, keys, n: int, positions):
        """Causal attention of the step-``n`` queries over the step-``n`` keys (or every
        step ``<= n``, duo-causal, with ``think_at_hard_tokens``)."""
        depths = range(n + 1) if self.think_at_hard_tokens else (n,)
        k = jnp.concatenate([keys["k"][m] for m in depths], axis=1)
        v = jnp.concatenate([keys["v"][m] for m in depths], axis=1)
        valid = jnp.concatenate([keys["active"][m] for m in depths], axis=1)
        key_pos = jnp.tile(keys["positions"], len(depths))
        mask = (key_pos[None, None, :] <= positions[None, :, None]) & valid[:, None, :]
        return masked_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)

    def _block(self, s, n: int, positions, keys, active, start):
        """One application ``s^n -> s^{n+1}``; writes the step's keys / values into ``keys``."""
        z = s + timing_signal(positions, self.d_model, s.dtype) + timing_signal(n, self.d_model, s.dtype)
        h = self.attn_norm(z)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if keys["cached"]:
            keys["k"][n] = jax.lax.dynamic_update_slice_in_dim(keys["k"][n], k.astype(keys["k"][n].dtype), start, 1)
            keys["v"][n] = jax.lax.dynamic_update_slice_in_dim(keys["v"][n], v.astype(keys["v"][n].dtype), start, 1)
            keys["active"][n] = jax.lax.dynamic_update_slice_in_dim(keys["active"][n], active, start, 1)
        else:
            keys["k"][n], keys["v"][n], keys["active"][n] = k, v, active
        z = z + self.out_proj(self._attend(q, keys, n, positions))
        return z + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(z))))

    def _decide(self, s):
        return jax.nn.sigmoid(self.decider_out(jax.nn.relu(self.decider_in(s)))[..., 0])

    # ------------------------------------------------------------------ depth recurrence
    def __call__(self, x, *, state=None, return_state: bool = False):
        """``x [batch, time, d_model]`` -> ``y`` (and the per-step key/value caches)."""
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        batch, time, _ = x.shape
        cached = state is not None or return_state
        if cached and state is None:
            state = self.init_state(batch, x.dtype)
        start = state["pos"] if cached else jnp.zeros((), jnp.int32)
        positions = start + jnp.arange(time)
        if cached:
            keys = dict(cached=True, k=list(state["k"]), v=list(state["v"]), active=list(state["active"]),
                        positions=jnp.arange(state["k"].shape[2]))
        else:
            keys = dict(cached=False, k=[None] * self.max_steps, v=[None] * self.max_steps,
                        active=[None] * self.max_steps, positions=positions)

        steps = self.max_steps
        if self.halting == "sampled" and not self.deterministic:
            steps = sample_steps(self.make_rng("dropout"), self.mean_steps, self.max_steps)
            self.sow("intermediates", "num_steps", steps)
        s = x
        everyone = jnp.ones((batch, time), bool)
        active, gate, outputs, think = everyone, None, [], []
        iterations = jnp.ones((batch, time), jnp.int32)
        for n in range(self.max_steps):
            if self.think_at_hard_tokens and n > 0:
                p = self._decide(s)
                think.append(p)
                hard = (p >= self.think_threshold) & active
                gate = active * (hard + p - jax.lax.stop_gradient(p))
                active = hard
                iterations = iterations + active
            new = self._block(s, n, positions, keys, active, start)
            if gate is not None:
                new = s + gate[..., None].astype(s.dtype) * (new - s)
            elif self.halting == "sampled":
                new = jnp.where(n < steps, new, s)
            s = new
            outputs.append(s)

        if self.halting == "act":
            y = self._act(jnp.stack(outputs, axis=-2))
        else:
            y = s
        if self.think_at_hard_tokens:
            self.sow("intermediates", "think_probability",
                     jnp.stack(think, -1) if think else jnp.zeros((batch, time, 0), x.dtype))
            self.sow("intermediates", "iterations", iterations)
        y = output_dropout(self, y)
        if not cached:
            return y
        new_state = dict(k=jnp.stack(keys["k"]), v=jnp.stack(keys["v"]), active=jnp.stack(keys["active"]),
                         pos=start + time)
        return (y, new_state) if return_state else y

    def _act(self, states):
        """ACT-weighted sum of the step states ``[b, t, S, d]`` (module docstring)."""
        halting = jax.nn.sigmoid(self.halt(states)[..., 0].astype(jnp.promote_types(states.dtype, jnp.float32)))
        weights, n_updates, remainder = act_weights(halting, 1.0 - self.act_epsilon)
        ponder = n_updates + remainder
        self.sow("intermediates", "halting_probability", halting)
        self.sow("intermediates", "halting_weights", weights)
        self.sow("intermediates", "ponder_time", ponder)
        self.sow("intermediates", "ponder_cost", jnp.mean(ponder))
        return jnp.einsum("bts,btsd->btd", weights.astype(states.dtype), states)
