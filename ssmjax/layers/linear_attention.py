"""Linear attention, RetNet, GLA, HGRN2 and mLSTM: mixers whose recurrence is a gated
linear attention, ``S_t = diag(exp g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``,
evaluated by :func:`ssmjax.scan.gla.gated_linear_attention` (chunked in ``__call__``,
one token in ``step``). Per head (``H`` heads, head sizes ``dk``, ``dv``; ``d = d_model``;
projections have no bias unless stated):

``linear_attention`` (Katharopoulos, Vyas, Pappas and Fleuret, 2020, "Transformers are
RNNs: Fast Autoregressive Transformers with Linear Attention")::

    q, k = phi(W_q x), phi(W_k x);  v = W_v x;  phi = elu + 1 (or identity)
    S_t = S_{t-1} + k_t v_t^T,  z_t = z_{t-1} + k_t
    o_t = S_t^T q_t / (z_t . q_t + eps)     (normalize=True; else dk^-1/2 S_t^T q_t)
    y = W_o o                                 params 4 d^2

The normaliser ``z`` rides in the scan as an extra value column of ones
(:func:`~ssmjax.layers.common.with_ones_column`).

``retnet``, multi-scale retention (Sun, Dong, Huang, Ma, Xia, Xue, Wang and Wei, 2023,
"Retentive Network: A Successor to Transformer for Large Language Models")::

    q, k = RoPE(W_q x, t), RoPE(W_k x, t);  v = W_v x    (dv = expand_v dk)
    S_t = gamma_h S_{t-1} + k_t v_t^T,  gamma_h = 1 - 2^(-5-h),  h = 0 .. H-1 (fixed)
    o_t = dk^-1/2 S_t^T q_t
    y = W_o (swish(W_G x) * GroupNorm_H(o))               params d^2 (2 + 3 expand_v)

RetNet's xPos is RoPE times a decay; the decay is ``gamma``, the rotation is RoPE (the
``rotary_embedding`` of the attention mixer; ``rope=False`` drops it). GroupNorm (one
group per head, no affine) makes the output invariant to a per-head rescaling, so the
paper's extra retention-score normalisations are omitted.

``gla`` (Yang, Wang, Shen, Panda and Kim, 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training"; gates and norms as in flash-linear-attention)::

    q, k, v = W_q x, W_k x, W_v x                    (dk = expand_k d / H, dv = expand_v d / H)
    alpha_t = sigmoid(x W_1 W_2 + b)^(1/16)           low rank r, per key channel
    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,  o_t = dk^-1/2 S_t^T q_t
    y = W_o (RMSNorm_head(o) * swish(W_r x))
    params d (2 H dk + 2 H dv) + d r + r H dk + H dk + dv + H dv d

``hgrn2`` (Qin, Yang, Sun, Shen, Li, Sun and Zhong, 2024, "HGRN2: Gated Linear RNNs with
State Expansion")::

    f_t = lb + (1 - lb) sigmoid(W_f x)     forget gate with the layer's lower bound lb
    q = swish(W_q x),  k = 1 - f_t,  v = W_i x      (dk = expand_ratio, dv = d / H)
    S_t = diag(f_t) S_{t-1} + k_t v_t^T,  o_t = dk^-1/2 S_t^T q_t
    y = W_o RMSNorm(o)                              params 2 d H dk + 2 d^2 + d

``mlstm``, the mLSTM block of xLSTM (Beck, Poeppel, Spanring, Auer, Prudnikova, Kopp,
Klambauer, Brandstetter and Hochreiter, 2024, "xLSTM: Extended Long Short-Term Memory",
section 2.3 and the pre-up-projection block of Fig. 11), ``E = expand d``::

    [x_m, z] = W_up x;  x_c = swish(conv_4(x_m))
    q, k = B_q x_c, B_k x_c;  v = B_v x_m      (block-diagonal, blocks of qkv_blocksize)
    i~, f~ = W_i [q, k, v] + b_i, W_f [q, k, v] + b_f        (one scalar per head)
    C_t = f_t C_{t-1} + i_t v_t k_t^T,   n_t = f_t n_{t-1} + i_t k_t
    i_t = exp(i~_t),  f_t = sigmoid(f~_t),  keys scaled by dk^-1/2
    h~_t = C_t q_t / max(|n_t^T q_t|, 1)
    y = W_down ((MHLayerNorm(h~) + s * x_c) * swish(z))     (swish(z) is the output gate)
    params 3 d E + (conv_size + 1) E + 3 E qkv_blocksize + 2 E + 2 H (3 E + 1)

Stabilised as in the paper: ``m_t = max(log f_t + m_{t-1}, i~_t)``, ``C~_t = exp(-m_t)
C_t``, ``n~_t = exp(-m_t) n_t`` and ``h~_t = C~_t q_t / max(|n~_t^T q_t|, exp(-m_t))``,
which equals the unstabilised ``h~_t`` exactly (the factor ``exp(-m_t)`` cancels).
``C~`` and ``n~`` are one gated linear attention with the value augmented by a ones column,
the keys ``exp(i~_t - m_t) k_t`` and the log-decays ``log f_t + m_{t-1} - m_t``: every
exponent is ``<= 0`` however large ``i~`` grows (see :func:`ssmjax.scan.mlstm.mlstm`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ssmjax.layers.common import (
    RecurrentMixer,
    check_heads,
    compiled,
    dense,
    gated_rms_norm,
    gla_op,
    layer_norm,
    lower_bounded_log_forget,
    merge_heads,
    ones_param,
    rms_norm,
    rotary_embedding,
    scan_method,
    short_conv,
    short_conv_params,
    split_heads,
    split_normaliser,
    state_float,
    with_ones_column,
)
from ssmjax.layers.registry import register
from ssmjax.scan.mlstm import init_mlstm_state, mlstm

#: :func:`ssmjax.scan.mlstm.mlstm` compiled per shape (see ``common.compiled``).
mlstm_op = compiled(mlstm, "chunk_size", "method")

FEATURE_MAPS = {"identity": lambda x: x, "elu+1": lambda x: jax.nn.elu(x) + 1.0}


def _heads_projection(module: nn.Module, heads: int, dim: int, name: str) -> nn.Module:
    """``x [..., d_model] -> [..., heads, dim]`` (no bias)."""
    return dense((heads, dim), module, name)


def _output_projection(module: nn.Module, name: str = "out_proj") -> nn.Module:
    """``[..., heads, dim] -> [..., d_model]`` (no bias)."""
    return dense(module.d_model, module, name, axis=(-2, -1))


# ----------------------------------------------------------------------------- linear attention
@register("linear_attention")
class LinearAttention(RecurrentMixer):
    """Causal linear attention (module docstring); parameters ``4 d^2``."""

    d_model: int
    num_heads: int = 4
    feature_map: str = "elu+1"
    normalize: bool = True
    eps: float = 1e-6
    chunk_size: int = 64
    method: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: expected one of {tuple(FEATURE_MAPS)}, got {self.feature_map!r}")
        dh = check_heads("num_heads", self.d_model, self.num_heads)
        self.q_proj, self.k_proj, self.v_proj = (
            _heads_projection(self, self.num_heads, dh, n) for n in ("q_proj", "k_proj", "v_proj"))
        self.out_proj = _output_projection(self)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> Array:
        dh = self.d_model // self.num_heads
        return jnp.zeros((batch_size, self.num_heads, dh, dh + int(self.normalize)), state_float(dtype))

    def mix(self, x, state):
        phi = FEATURE_MAPS[self.feature_map]
        q, k, v = phi(self.q_proj(x)), phi(self.k_proj(x)), self.v_proj(x)
        method = scan_method(self.method, x.shape[1])
        if not self.normalize:
            o, state = gla_op(q, k, v, initial_state=state, chunk_size=self.chunk_size,
                                              method=method)
        else:
            o, state = gla_op(q, k, with_ones_column(v), scale=1.0, initial_state=state,
                                              chunk_size=self.chunk_size, method=method)
            numerator, denominator = split_normaliser(o)
            o = numerator / (denominator + self.eps)
        return self.out_proj(o.astype(x.dtype)), state


# ----------------------------------------------------------------------------- RetNet
def retention_log_decays(num_heads: int) -> np.ndarray:
    """``log(gamma_h)``, ``gamma_h = 1 - 2^(-5-h)`` for ``h = 0 .. H-1`` (RetNet's fixed
    multi-scale decays; float64 constants, cast to the state dtype where used)."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads))))


@register("retnet")
class RetNet(RecurrentMixer):
    """Multi-scale retention (module docstring); parameters ``d^2 (2 + 3 expand_v)``."""

    d_model: int
    num_heads: int = 4
    expand_v: int = 2
    rope: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    chunk_size: int = 64
    method: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        dk = check_heads("num_heads", self.d_model, self.num_heads)
        dv = self.expand_v * dk
        self.q_proj = _heads_projection(self, self.num_heads, dk, "q_proj")
        self.k_proj = _heads_projection(self, self.num_heads, dk, "k_proj")
        self.v_proj = _heads_projection(self, self.num_heads, dv, "v_proj")
        self.g_proj = _heads_projection(self, self.num_heads, dv, "g_proj")
        self.out_proj = _output_projection(self)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        dk = self.d_model // self.num_heads
        return dict(S=jnp.zeros((batch_size, self.num_heads, dk, self.expand_v * dk), state_float(dtype)),
                    pos=jnp.zeros((), jnp.int32))

    def mix(self, x, state):
        positions = state["pos"] + jnp.arange(x.shape[1])
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.rope:
            q, k = rotary_embedding(q, positions, self.rope_base), rotary_embedding(k, positions, self.rope_base)
        log_gamma = jnp.asarray(retention_log_decays(self.num_heads), state_float(x.dtype))
        o, S = gla_op(q, k, v, log_decay=log_gamma[None, None], initial_state=state["S"],
                                      chunk_size=self.chunk_size, method=scan_method(self.method, x.shape[1]))
        o = jax.nn.silu(self.g_proj(x)) * layer_norm(o, None, self.norm_eps).astype(x.dtype)
        return self.out_proj(o), dict(S=S, pos=state["pos"] + x.shape[1])


# ----------------------------------------------------------------------------- GLA
@register("gla")
class GLA(RecurrentMixer):
    """Gated linear attention layer (module docstring); parameters
    ``d (2 H dk + 2 H dv) + d r + r H dk + H dk + dv + H dv d``."""

    d_model: int
    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    norm_eps: float = 1e-5
    chunk_size: int = 64
    method: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def head_dims(self) -> tuple[int, int]:
        dk = check_heads("num_heads", int(self.expand_k * self.d_model), self.num_heads)
        dv = check_heads("num_heads", int(self.expand_v * self.d_model), self.num_heads)
        return dk, dv

    def setup(self):
        dk, dv = self.head_dims
        H = self.num_heads
        self.q_proj = _heads_projection(self, H, dk, "q_proj")
        self.k_proj = _heads_projection(self, H, dk, "k_proj")
        self.v_proj = _heads_projection(self, H, dv, "v_proj")
        self.g_proj = _heads_projection(self, H, dv, "g_proj")
        self.gk_down = dense(self.gate_low_rank_dim, self, "gk_down")
        self.gk_up = dense((H, dk), self, "gk_up", use_bias=True)
        self.norm_weight = ones_param(self, "norm_weight", dv)
        self.out_proj = _output_projection(self)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> Array:
        dk, dv = self.head_dims
        return jnp.zeros((batch_size, self.num_heads, dk, dv), state_float(dtype))

    def mix(self, x, state):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        real = state_float(x.dtype)
        log_alpha = jax.nn.log_sigmoid(self.gk_up(self.gk_down(x)).astype(real)) / self.gate_logit_normalizer
        o, state = gla_op(q, k, v, log_decay=log_alpha, initial_state=state,
                                          chunk_size=self.chunk_size, method=scan_method(self.method, x.shape[1]))
        o = gated_rms_norm(o, self.g_proj(x).astype(real), self.norm_weight.astype(real), self.norm_eps)
        return self.out_proj(o.astype(x.dtype)), state


# ----------------------------------------------------------------------------- HGRN2
@register("hgrn2")
class HGRN2(RecurrentMixer):
    """HGRN2 (module docstring); ``expand_ratio`` is the key (forget) size per head
    (``d / H`` if ``None``); parameters ``2 d H dk + 2 d^2 + d``."""

    d_model: int
    num_heads: int = 4
    expand_ratio: int | None = None
    lower_bound: float = 0.0
    norm_eps: float = 1e-5
    chunk_size: int = 64
    method: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def head_dims(self) -> tuple[int, int]:
        dv = check_heads("num_heads", self.d_model, self.num_heads)
        return (self.expand_ratio or dv), dv

    def setup(self):
        dk, dv = self.head_dims
        self.q_proj = _heads_projection(self, self.num_heads, dk, "q_proj")
        self.f_proj = _heads_projection(self, self.num_heads, dk, "f_proj")
        self.i_proj = _heads_projection(self, self.num_heads, dv, "i_proj")
        self.norm_weight = ones_param(self, "norm_weight", self.d_model)
        self.out_proj = dense(self.d_model, self, "out_proj")

    def init_state(self, batch_size: int, dtype=jnp.float32) -> Array:
        dk, dv = self.head_dims
        return jnp.zeros((batch_size, self.num_heads, dk, dv), state_float(dtype))

    def mix(self, x, state):
        real = state_float(x.dtype)
        log_f = lower_bounded_log_forget(self.f_proj(x).astype(real), self.lower_bound)
        q, k = jax.nn.silu(self.q_proj(x)), -jnp.expm1(log_f)
        o, state = gla_op(q, k, self.i_proj(x), log_decay=log_f, initial_state=state,
                                          chunk_size=self.chunk_size, method=scan_method(self.method, x.shape[1]))
        o = rms_norm(merge_heads(o), self.norm_weight.astype(real), self.norm_eps)
        return self.out_proj(o.astype(x.dtype)), state


# ----------------------------------------------------------------------------- mLSTM
def linspace_init(start: float, stop: float):
    """Bias ``linspace(start, stop)`` (xLSTM's forget-gate bias: 3 .. 6, slow forgetting)."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.linspace(start, stop, shape[0], dtype=dtype)

    return init


@register("mlstm")
class MLSTM(RecurrentMixer):
    """xLSTM mLSTM block (module docstring); ``E = expand d``, parameters
    ``3 d E + (conv_size + 1) E + 3 E qkv_blocksize + 2 E + 2 H (3 E + 1)``."""

    d_model: int
    num_heads: int = 4
    expand: int = 2
    conv_size: int = 4
    qkv_blocksize: int = 4
    norm_eps: float = 1e-5
    chunk_size: int = 64
    method: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def inner(self) -> int:
        return self.expand * self.d_model

    def setup(self):
        E, H, bs = self.inner, self.num_heads, self.qkv_blocksize
        check_heads("num_heads", E, H)
        check_heads("qkv_blocksize", E, bs)
        self.up_proj = dense(2 * E, self, "up_proj")
        self.conv_w, self.conv_b = short_conv_params(self, self.conv_size, E, bias=True)
        # xLSTM's small_init: N(0, 2 / (5 E)).
        init = nn.initializers.normal(math.sqrt(2.0 / (5.0 * E)))
        self.q_blocks, self.k_blocks, self.v_blocks = (
            self.param(n, init, (E // bs, bs, bs), self.param_dtype) for n in ("q_blocks", "k_blocks", "v_blocks"))
        self.igate = nn.Dense(H, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.normal(0.1),
                              dtype=self.dtype, param_dtype=self.param_dtype, name="igate")
        self.fgate = nn.Dense(H, kernel_init=nn.initializers.zeros, bias_init=linspace_init(3.0, 6.0), dtype=self.dtype, param_dtype=self.param_dtype, name="fgate")
        self.norm_weight = ones_param(self, "norm_weight", E)
        self.skip = ones_param(self, "skip", E)
        self.down_proj = dense(self.d_model, self, "down_proj")

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        E, H = self.inner, self.num_heads
        dh = E // H
        real = state_float(dtype)
        return dict(conv=jnp.zeros((batch_size, self.conv_size - 1, E), dtype),
                    cell=init_mlstm_state(batch_size, H, dh, dh, real))

    def _block_diagonal(self, x: Array, blocks) -> Array:
        """``x [..., E]`` times the block-diagonal matrix with ``[bs, bs]`` blocks."""
        xb = x.reshape(x.shape[:-1] + blocks.shape[:2])
        return jnp.einsum("...nj,nji->...ni", xb, jnp.asarray(blocks, x.dtype)).reshape(x.shape)

    def mix(self, x, state):
        H = self.num_heads
        real = state_float(x.dtype)
        x_m, z = jnp.split(self.up_proj(x), 2, axis=-1)
        x_c, conv_state = short_conv(x_m, self.conv_w, self.conv_b, state["conv"])
        q, k, v = (self._block_diagonal(u, w) for u, w in ((x_c, self.q_blocks), (x_c, self.k_blocks),
                                                           (x_m, self.v_blocks)))
        gates_in = jnp.concatenate([q, k, v], axis=-1)
        log_i = self.igate(gates_in).astype(real)
        log_f = jax.nn.log_sigmoid(self.fgate(gates_in).astype(real))
        h, cell = mlstm_op(split_heads(q, H), split_heads(k, H), split_heads(v, H), log_f, log_i,
                           initial_state=state["cell"], chunk_size=self.chunk_size,
                           method=scan_method(self.method, x.shape[1]))
        h = layer_norm(h, split_heads(self.norm_weight.astype(real), H), self.norm_eps)
        h = merge_heads(h).astype(x.dtype) + self.skip.astype(x.dtype) * x_c
        return self.down_proj(h * jax.nn.silu(z)), dict(conv=conv_state, cell=cell)
