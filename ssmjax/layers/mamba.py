"""Mamba (``"mamba"``) and Mamba-2 (``"mamba2"``) blocks.

Mamba (Gu and Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", section 3 and Algorithm 2), with ``E = d_inner = expand * d_model``::

    [x, z]   = W_in u                                   (no bias)
    x        = silu(conv1d_k(x))                        (depthwise, causal, with bias)
    [dt, B, C] = W_x x                                  dt in R^R, B, C in R^N
    delta    = softplus(W_dt dt + b_dt)                 in R^E
    h_t[e,n] = exp(delta_t[e] A[e,n]) h_{t-1}[e,n] + delta_t[e] B_t[n] x_t[e]
    y_t[e]   = (C_t . h_t[e] + D[e] x_t[e]) * silu(z_t[e])
    out      = W_out y                                  (no bias)

``A = -exp(A_log)`` with ``A_log[e, n] = log(n + 1)`` (S4D-Real), ``D = 1``; ``b_dt`` is the
inverse softplus of ``dt ~ exp(U(log dt_min, log dt_max))`` (floored at
``dt_init_floor``) and ``W_dt ~ U(-R^-1/2, R^-1/2)`` (times ``dt_scale``); ``R = dt_rank``
(``ceil(d_model / 16)`` by default). The scan is :func:`ssmjax.scan.selective_scan` with
``delta_softplus=True``; the step state is the conv window and the SSM state.

Mamba-2 (Dao and Gu, 2024, "Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality"), ``H = E / P`` heads of size
``P = headdim``, ``G = ngroups`` groups of ``B, C``::

    [z, xBC, dt] = W_in u                                (no bias)
    [x, B, C]    = silu(conv1d_k(xBC))                   x in R^{H x P}, B, C in R^{G x N}
    delta        = softplus(dt + b_dt)                   in R^H
    S_t[h]       = exp(delta_t[h] A[h]) S_{t-1}[h] + B_t[g(h)] (delta_t[h] x_t[h])^T   S in R^{N x P}
    y_t[h]       = S_t[h]^T C_t[g(h)] + D[h] x_t[h]
    out          = W_out RMSNorm_G(y * silu(z))          (norm per group of E / G channels)

i.e. gated linear attention with ``(q, k, v) = (C, B, delta x)``, per-head
``log_decay = delta A`` and ``scale = 1``, evaluated by
:func:`ssmjax.scan.gla.gated_linear_attention` (SSD chunked form, ``chunk_size``).
``A = -exp(A_log)``, ``A ~ U(A_init_range)``, ``D = 1``, ``b_dt`` as Mamba. The SSM state
is ``[b, H, N, P]`` (mamba_ssm stores the transpose ``[b, H, P, N]``).

Parameter counts (``d = d_model``, ``k = d_conv``, no in/out biases)::

    mamba:  3 d E + (k + 1) E + E (R + 2 N) + R E + E + E N + E
    mamba2: d (2 E + 2 G N + H) + (k + 1)(E + 2 G N) + 3 H + E + E d
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssmjax.layers.common import (
    StepByCall,
    check_layer_input,
    dt_bias_init,
    log_uniform_init,
    short_conv,
    short_conv_params,
    uniform_init,
)
from ssmjax.layers.registry import register
from ssmjax.scan.gla import gated_linear_attention
from ssmjax.scan.selective import selective_scan


def s4d_real_log_init(key, shape, dtype=jnp.float32):
    """``A_log[e, n] = log(n + 1)``: ``A = -exp(A_log)`` is S4D-Real's ``-(n + 1)``."""
    return jnp.log(jnp.broadcast_to(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32), shape)).astype(dtype)


def gated_rms_norm(y, z, weight, groups: int, eps: float):
    """``RMSNorm(y * silu(z)) * weight``, normalising each of ``groups`` channel groups."""
    g = y * jax.nn.silu(z)
    g = g.reshape(g.shape[:-1] + (groups, -1))
    g = g * jax.lax.rsqrt(jnp.mean(jnp.square(g), axis=-1, keepdims=True) + eps)
    return g.reshape(y.shape) * weight


class _MambaBase(StepByCall):
    """Shared ``__call__`` plumbing (``step`` is :class:`StepByCall`'s): subclasses define
    ``init_state`` and ``mix(x, state, segment_ids, reset) -> (y, new_state)``."""

    def __call__(self, x, *, state=None, return_state=False, segment_ids=None, reset=None):
        """``x [b, t, d_model]``; ``segment_ids`` / ``reset`` ``[b, t]`` mark packed
        documents (the conv taps and the SSM state never cross a document start)."""
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        if state is None:
            state = self.init_state(x.shape[0], x.dtype)
        y, new_state = self.mix(x, state, segment_ids, reset)
        y = self.drop(y, deterministic=self.deterministic)
        return (y, new_state) if return_state else y


@register("mamba")
class Mamba(_MambaBase):
    """Mamba selective-SSM block (module docstring); parameters
    ``3 d E + (k + 1) E + E (R + 2 N) + R E + E + E N + E``."""

    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    method: str = "auto"
    chunk_size: int | None = None
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    def setup(self):
        E, N, R = self.d_inner, self.d_state, self.rank
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        self.in_proj = dense(2 * E, name="in_proj")
        self.conv_w, self.conv_b = short_conv_params(self, self.d_conv, E, bias=True)
        self.x_proj = dense(R + 2 * N, name="x_proj")
        dt_init = dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor)
        self.dt_proj_kernel = self.param(
            "dt_proj_kernel", uniform_init(self.dt_scale / math.sqrt(R)), (R, E), self.param_dtype
        )
        self.dt_proj_bias = self.param("dt_proj_bias", dt_init, (E,), self.param_dtype)
        self.A_log = self.param("A_log", s4d_real_log_init, (E, N), self.param_dtype)
        self.D = self.param("D", nn.initializers.ones_init(), (E,), self.param_dtype)
        self.out_proj = dense(self.d_model, name="out_proj")
        self.drop = nn.Dropout(self.dropout)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        return dict(
            conv=jnp.zeros((batch_size, self.d_conv - 1, self.d_inner), dtype),
            ssm=jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.result_type(dtype, jnp.float32)),
        )

    def mix(self, x, state, segment_ids, reset):
        N, R = self.d_state, self.rank
        real = jnp.result_type(x.dtype, jnp.float32)
        xs, z = jnp.split(self.in_proj(x), 2, axis=-1)
        xs, conv_state = short_conv(xs, self.conv_w, self.conv_b, state["conv"], segment_ids, reset)
        dt, B, C = jnp.split(self.x_proj(xs), [R, R + N], axis=-1)
        y, ssm_state = selective_scan(
            xs, dt @ self.dt_proj_kernel.astype(dt.dtype), -jnp.exp(self.A_log.astype(real)), B, C,
            D=self.D, z=z, delta_bias=self.dt_proj_bias, delta_softplus=True,
            initial_state=state["ssm"], segment_ids=segment_ids, reset=reset,
            method=self.method, chunk_size=self.chunk_size,
        )
        return self.out_proj(y), dict(conv=conv_state, ssm=ssm_state)


@register("mamba2")
class Mamba2(_MambaBase):
    """Mamba-2 (SSD) block (module docstring); ``headdim`` defaults to ``min(64, E)``;
    parameters ``d (2 E + 2 G N + H) + (k + 1)(E + 2 G N) + 3 H + E + E d``."""

    d_model: int
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int | None = None
    ngroups: int = 1
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    norm_eps: float = 1e-5
    chunk_size: int = 64
    method: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def head_size(self) -> int:
        return self.headdim or min(64, self.d_inner)

    @property
    def num_heads(self) -> int:
        return self.d_inner // self.head_size

    def setup(self):
        E, N, G, H = self.d_inner, self.d_state, self.ngroups, self.num_heads
        if E % self.head_size:
            raise ValueError(f"headdim: must divide d_inner = {E}, got {self.head_size}")
        if H % G:
            raise ValueError(f"ngroups: must divide the number of heads {H}, got {G}")
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        self.in_proj = dense(2 * E + 2 * G * N + H, name="in_proj")
        self.conv_w, self.conv_b = short_conv_params(self, self.d_conv, E + 2 * G * N, bias=True)
        self.dt_bias = self.param("dt_bias", dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), (H,),
                                  self.param_dtype)
        lo, hi = self.A_init_range
        self.A_log = self.param("A_log", log_uniform_init(lo, hi), (H,), self.param_dtype)
        self.D = self.param("D", nn.initializers.ones_init(), (H,), self.param_dtype)
        self.norm_weight = self.param("norm_weight", nn.initializers.ones_init(), (E,), self.param_dtype)
        self.out_proj = dense(self.d_model, name="out_proj")
        self.drop = nn.Dropout(self.dropout)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        E, N, G = self.d_inner, self.d_state, self.ngroups
        return dict(
            conv=jnp.zeros((batch_size, self.d_conv - 1, E + 2 * G * N), dtype),
            ssm=jnp.zeros(
                (batch_size, self.num_heads, N, self.head_size), jnp.result_type(dtype, jnp.float32)
            ),
        )

    def mix(self, x, state, segment_ids, reset):
        E, N, G, H, P = self.d_inner, self.d_state, self.ngroups, self.num_heads, self.head_size
        batch, time, _ = x.shape
        z, xBC, dt = jnp.split(self.in_proj(x), [E, 2 * E + 2 * G * N], axis=-1)
        xBC, conv_state = short_conv(xBC, self.conv_w, self.conv_b, state["conv"], segment_ids, reset)
        xs, B, C = jnp.split(xBC, [E, E + G * N], axis=-1)
        real = jnp.result_type(x.dtype, jnp.float32)
        delta = jax.nn.softplus(dt.astype(real) + self.dt_bias.astype(real))  # [b, t, H]
        A = -jnp.exp(self.A_log.astype(real))
        heads = xs.reshape(batch, time, H, P)
        per_head = lambda m: jnp.repeat(m.reshape(batch, time, G, N), H // G, axis=2)  # noqa: E731
        o, ssm_state = gated_linear_attention(
            per_head(C), per_head(B), heads.astype(real) * delta[..., None],
            log_decay=delta * A, scale=1.0, initial_state=state["ssm"],
            segment_ids=segment_ids, reset=reset, chunk_size=self.chunk_size, method=self.method,
        )
        y = (o + self.D.astype(real)[:, None] * heads.astype(real)).reshape(batch, time, E)
        y = gated_rms_norm(y, z.astype(real), self.norm_weight.astype(real), G, self.norm_eps)
        y = self.out_proj(y.astype(x.dtype if self.dtype is None else self.dtype))
        return y, dict(conv=conv_state, ssm=ssm_state)
