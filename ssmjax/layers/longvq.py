"""LongVQ (``"longvq"``): a gated SSM + attention block whose attention keys are vector
quantised, so attention over the whole past costs ``O(K)`` per token.

LongVQ (Liu, Wang, Li, Wang, Lin and Li, 2024, "LongVQ: Long Sequence Modeling with Vector
Quantization on Structured Memory", IJCAI) puts Transformer-VQ's quantised-key attention
(Lingle, 2023, "Transformer-VQ: Linear-Time Transformers via Vector Quantization") inside
Mega's gated SSM-attention block (Ma et al., 2023, "Mega: Moving Average Equipped Gated
Attention"). With ``x [b, t, d]``::

    x'    = silu(EMA(x) + omega * x)                the SSM: Mega's damped EMA (below)
    z     = silu(x' W_z + b_z)                      shared representation [z_dim]
    q     = kappa_q * z + mu_q,  k = kappa_k * z + mu_k
    v     = silu(x W_v + b_v)                       [v_dim]
    k_hat, codes = VQ(k; C)                         quantised keys, codebook C [K, z_dim]
    o     = codebook_attention(q / sqrt(z_dim), k_hat, v)      (causal softmax, linear time)
    gamma = silu(x' W_g + b_g)                      reset gate [v_dim]
    phi   = sigmoid(x' W_f + b_f)                   update gate [d]
    h     = silu(x' W_h + (gamma * o) U_h + b_h)
    y     = phi * h + (1 - phi) * x

Damped EMA (Mega eq. 2-3; expansion ``h = ema_dim`` per channel ``j``)::

    s_t[j] = alpha_j * beta_j x_t[j] + (1 - alpha_j delta_j) s_{t-1}[j],     s in R^h
    EMA(x)_t[j] = h^{-1/2} eta_j . s_t[j]

with ``alpha, delta = sigmoid(logits)``, run by :class:`ssmjax.layers.common.DampedEMA` (a linear scan).

Vector quantisation and the attention are :mod:`ssmjax.scan.vq`: the nearest code,
the straight-through estimator ``k_hat = k + sg(C_z - k)``, the losses, the EMA codebook
statistics, and the causal attention over quantised keys, whose state is a value sum and
a count per code (``[b, K, v_dim]`` and ``[b, K]``). ``method="chunked"`` (default) is
Transformer-VQ's block form (quadratic inside ``chunk_size`` tokens, the code summaries
across chunks); a single token (``step``) runs the recurrence.

Codebook training (``codebook_update``):

* ``"loss"`` (default): ``C`` is a parameter. The layer sows
  ``('intermediates', 'commitment_loss')`` = ``mean ||k - sg(C_z)||^2`` and
  ``('intermediates', 'vq_loss')`` = ``codebook_loss + commitment_cost * commitment_loss``
  (like the universal transformer's ponder cost: a training loop that wants them applies
  the model with ``mutable=["intermediates"]`` and adds the sown ``vq_loss`` values to its
  loss). ``ssmjax.train`` does not collect intermediates, so there ``C`` and the keys
  learn from the task loss alone (the attention's gradient: the straight-through path
  inside a chunk, the codebook across chunks).
* ``"ema"``: ``C = M / Ntilde`` from the collection ``'vq_stats'`` (``cluster_size``
  ``[K]``, ``embed_sum`` ``[K, z_dim]``), with no gradient; the statistics move by
  :func:`ssmjax.scan.vq.ema_codebook_update` (decay ``ema_decay``) on every call with
  ``deterministic=False`` whose ``'vq_stats'`` are mutable::

      y, updates = layer.apply(variables, x, mutable=["vq_stats", "intermediates"])
      variables = {**variables, "vq_stats": updates["vq_stats"]}

  ``ssmjax.train``'s loop neither applies with ``mutable`` nor keeps a non-parameter
  collection out of its optimizer (AdamW would decay ``embed_sum``), so the EMA option
  needs such a loop; the default works there.

Left out (not in the contract's causal token mixer): LongVQ's local window with a
relative-position bias, Mega's chunked attention, multi-head codebooks, the
bidirectional EMA, normalisation (the backbone's) and the codebook's dead-code restarts.

State: ``ema [b, d, ema_dim]``, ``value_sums [b, K, v_dim]``, ``counts [b, K]``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssmjax.checks import check_choice, check_chunk_size
from ssmjax.layers.common import DampedEMA, StepByCall, check_layer_input, output_dropout, state_float
from ssmjax.layers.registry import register
from ssmjax.scan.vq import (
    CODEBOOK_ATTENTION_METHODS,
    CodebookAttentionState,
    codebook_attention,
    codebook_from_ema,
    ema_codebook_update,
    vector_quantize,
)

CODEBOOK_UPDATES = ("loss", "ema")


@register("longvq")
class LongVQ(StepByCall):
    """LongVQ's gated EMA + vector-quantised attention block (module docstring)."""

    d_model: int
    ema_dim: int = 16
    z_dim: int | None = None  # default d_model // 2 (Mega's zdim / d ratio), at least 1
    v_dim: int | None = None  # default d_model
    codebook_size: int = 64
    chunk_size: int = 64
    method: str = "chunked"
    codebook_update: str = "loss"
    commitment_cost: float = 0.25
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def dz(self) -> int:
        return self.z_dim or max(1, self.d_model // 2)

    @property
    def dv(self) -> int:
        return self.v_dim or self.d_model

    def setup(self):
        check_choice("method", self.method, CODEBOOK_ATTENTION_METHODS)
        check_choice("codebook_update", self.codebook_update, CODEBOOK_UPDATES)
        check_chunk_size(self.chunk_size)
        d, h, dz, K = self.d_model, self.ema_dim, self.dz, self.codebook_size
        p = self.param
        self.ema = DampedEMA(d, h, self.param_dtype)
        self.omega = p("omega", nn.initializers.normal(1.0), (d,), self.param_dtype)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        self.W_z, self.W_v = dense(dz, name="W_z"), dense(self.dv, name="W_v")
        self.W_gates = dense(self.dv + d, name="W_gates")  # reset gate gamma [dv], update gate phi [d]
        self.W_h = dense(d, name="W_h")
        self.U_h = dense(d, use_bias=False, name="U_h")
        self.qk_scale = p("qk_scale", lambda k, s, dt: (1.0 + 0.02 * jax.random.normal(k, s)).astype(dt),
                          (2, dz), self.param_dtype)
        self.qk_bias = p("qk_bias", nn.initializers.zeros, (2, dz), self.param_dtype)
        code_init = nn.initializers.normal(0.5)
        if self.codebook_update == "loss":
            self.codebook = p("codebook", code_init, (K, dz), self.param_dtype)
        else:
            self.cluster_size = self.variable("vq_stats", "cluster_size", jnp.ones, (K,), jnp.float32)
            self.embed_sum = self.variable(
                "vq_stats", "embed_sum", lambda: code_init(self.make_rng("params"), (K, dz), jnp.float32))

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        sd = state_float(dtype)
        return dict(
            ema=jnp.zeros((batch_size, self.d_model, self.ema_dim), sd),
            value_sums=jnp.zeros((batch_size, self.codebook_size, self.dv), sd),
            counts=jnp.zeros((batch_size, self.codebook_size), sd),
        )

    def current_codebook(self, dtype):
        if self.codebook_update == "loss":
            return self.codebook.astype(dtype)
        stats = dict(cluster_size=self.cluster_size.value, embed_sum=self.embed_sum.value)
        return jax.lax.stop_gradient(codebook_from_ema(stats, self.ema_eps)).astype(dtype)

    def __call__(self, x, *, state=None, return_state=False):
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        dtype = self.dtype or x.dtype
        batch, time, _ = x.shape
        if state is None:
            state = self.init_state(batch, dtype)
        sd = state_float(dtype)
        xs = x.astype(dtype)
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        ema, ema_last = self.ema(xs.astype(sd), state["ema"].astype(sd), False, None, None, "scan")
        xp = jax.nn.silu(ema.astype(dtype) + cast(self.omega) * xs)  # x'
        z = jax.nn.silu(self.W_z(xp))
        q = cast(self.qk_scale[0]) * z + cast(self.qk_bias[0])
        k = cast(self.qk_scale[1]) * z + cast(self.qk_bias[1])
        v = jax.nn.silu(self.W_v(xs))
        C = self.current_codebook(dtype)
        vq = vector_quantize(k, C)
        self.sow("intermediates", "commitment_loss", vq.commitment_loss)
        if self.codebook_update == "loss":
            self.sow("intermediates", "vq_loss", vq.codebook_loss + self.commitment_cost * vq.commitment_loss)
        else:
            self.sow("intermediates", "vq_loss", self.commitment_cost * vq.commitment_loss)
            if not self.deterministic and self.is_mutable_collection("vq_stats") and not self.is_initializing():
                stats = dict(cluster_size=self.cluster_size.value, embed_sum=self.embed_sum.value)
                new = ema_codebook_update(stats, jax.lax.stop_gradient(k), vq.codes, self.ema_decay)
                self.cluster_size.value, self.embed_sum.value = new["cluster_size"], new["embed_sum"]
        method = "sequential" if time == 1 else self.method
        o, att_state = codebook_attention(
            q * (1.0 / math.sqrt(self.dz)), vq.quantized, v, vq.codes, C,
            initial_state=CodebookAttentionState(state["value_sums"], state["counts"]),
            method=method, chunk_size=self.chunk_size,
        )
        gates = self.W_gates(xp)
        gamma, phi = jax.nn.silu(gates[..., : self.dv]), jax.nn.sigmoid(gates[..., self.dv:])
        hidden = jax.nn.silu(self.W_h(xp) + self.U_h(gamma * o))
        y = (phi * hidden + (1 - phi) * xs).astype(x.dtype if self.dtype is None else self.dtype)
        y = output_dropout(self, y)
        new_state = dict(ema=ema_last, value_sums=att_state.value_sums, counts=att_state.counts)
        return (y, new_state) if return_state else y
