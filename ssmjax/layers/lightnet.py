"""LightNet: the additive linear recurrence and its single-scan multi-dimensional use
(Qin, Mao, Shen, Li, Zhang, Dai and Zhong, 2024, "You Only Scan Once: Efficient
Multi-dimension Sequential Modeling with LightNet"), with the MD-TPE and MD-LRPE
positional encodings for grids.

The additive recurrence (per head and key channel ``c``; ``k~`` are key logits)::

    M_t = M_{t-1} + exp(k~_t) v_t^T,   Z_t = Z_{t-1} + exp(k~_t)
    o_t = dk^-1/2 (M_t / Z_t)^T q_t

needs no decay: the normalised state ``S_t = M_t / Z_t`` forgets through the growth of
``Z``. Written multiplicatively it is a gated linear attention with per-channel decay::

    z_t = logaddexp(z_{t-1}, k~_t)                    (log Z_t, a cumulative logsumexp)
    S_t = diag(exp(z_{t-1} - z_t)) S_{t-1} + exp(k~_t - z_t) v_t^T

(all exponents ``<= 0``), which is how ``__call__`` / ``step`` evaluate it
(:func:`ssmjax.scan.lightnet.additive_gates` into
:func:`ssmjax.scan.gla.gated_linear_attention`; the state is ``(S, z)``). Because ``M`` and
``Z`` are plain sums, the final state does not depend on the order in which tokens are
scanned: one scan over a flattened image (any order) gives every token the same global
context. That is ``bidirectional=True``: ``S = sum_t softmax_t(k~) v_t^T`` over all tokens
(the final state of the scan, computed as that sum), read by every query
(``o_t = dk^-1/2 S^T q_t``).

The layer (flash-linear-attention's ``LightNetAttention``)::

    q = swish(W_q x),  k~ = W_k x,  v = W_v x             (H heads of d / H)
    y = W_o (RMSNorm(o) * swish(x W_1 W_2))                 (low-rank output gate)

Positional encodings (off by default):

* ``lrpe=True``, MD-LRPE (multi-dimensional linearised relative positional encoding):
  :func:`md_lrpe` rotates the query and (normalised) key channels, one slice of channels
  per grid axis, by angles proportional to the token's coordinate along that axis, so
  ``q_s . k_t`` depends on the coordinate differences only (RoPE per axis). In the causal
  form the rotated keys enter the recurrence above (decays act on rotated channels).
* ``tpe=True``, MD-TPE (multi-dimensional Toeplitz positional encoding, :class:`MDTPE`):
  ``x <- x + sum_axes W_a GroupRMSNorm(T_a x)`` with ``T_a`` the per-head exponential
  Toeplitz operator ``lambda_h^|i - j|`` along axis ``a`` (causal: ``j <= i``), evaluated
  as a linear recurrence along the axis (:func:`ssmjax.scan.linear_scan`, forward plus
  reverse when bidirectional). The positive factor ``q_h . k_h`` of the Toeplitz encoding
  is dropped: the group norm removes it.

Grids: ``grid_shape=(n_1, ..., n_D)`` reads ``x [b, n_1 * ... * n_D, d]`` as a row-major
flattened grid (coordinates for MD-LRPE, axes for MD-TPE) and requires
``bidirectional=True``; without it the sequence is a 1-D grid (causal or not).

Parameters (``d = d_model``, ``r = gate_low_rank_dim``, ``D`` grid axes):
``4 d^2 + 2 d r + d``, plus ``D (H + d + d^2)`` with ``tpe``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float

from ssmjax.layers.common import (
    RecurrentMixer,
    check_heads,
    check_layer_input,
    dense,
    gated_rms_norm,
    gla_op,
    linear_scan_op,
    merge_heads,
    no_state_when_bidirectional,
    ones_param,
    output_dropout,
    rms_norm,
    rotary_embedding,
    scan_method,
    split_heads,
    state_float,
)
from ssmjax.layers.registry import register
from ssmjax.scan.lightnet import additive_gates


# ----------------------------------------------------------------------------- MD-LRPE
def grid_coordinates(grid_shape: tuple[int, ...], start: Array | int = 0, length: int | None = None) -> Array:
    """Coordinates ``[length, D]`` of row-major flattened positions ``start ..`` of a grid."""
    length = math.prod(grid_shape) if length is None else length
    flat = start + jnp.arange(length)
    return jnp.stack(jnp.unravel_index(flat, grid_shape), axis=-1) if len(grid_shape) > 1 else flat[:, None]


def md_lrpe(x: Float[Array, "b t h d"], coords: Array, base: float = 10000.0) -> Float[Array, "b t h d"]:
    """MD-LRPE: split the channels into ``D = coords.shape[-1]`` equal slices and rotate
    slice ``a`` (RoPE, :func:`~ssmjax.layers.common.rotary_embedding`) by the
    coordinate along axis ``a``; ``coords [t, D]``. Then ``md_lrpe(q, p) . md_lrpe(k, p')``
    depends on ``p' - p`` only."""
    axes = coords.shape[-1]
    dim = x.shape[-1]
    if dim % (2 * axes):
        raise ValueError(f"x: the head size {dim} must be a multiple of 2 * (number of grid axes) = {2 * axes}")
    parts = jnp.split(x, axes, axis=-1)
    return jnp.concatenate([rotary_embedding(p, coords[:, a], base) for a, p in enumerate(parts)], axis=-1)


# ----------------------------------------------------------------------------- MD-TPE
class MDTPE(nn.Module):
    """MD-TPE (module docstring): ``sum_a W_a GroupRMSNorm(T_a x)`` over the grid axes of
    ``x [b, n_1, ..., n_D, d]``, ``T_a`` the per-head Toeplitz operator
    ``lambda_{a,h}^|i - j|`` (``j <= i`` unless bidirectional), ``lambda = sigmoid(.)``.
    Parameters ``D (H + d + d^2)``. ``state`` (causal 1-D only): the running
    ``[b, d]`` sum ``sum_{j <= i} lambda^(i - j) x_j``."""

    d_model: int
    num_heads: int
    ndim: int = 1
    bidirectional: bool = False
    norm_eps: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        check_heads("num_heads", self.d_model, self.num_heads)
        if not self.bidirectional and self.ndim != 1:
            raise ValueError("ndim: a causal MD-TPE runs along one axis (ndim=1); use bidirectional=True for grids")
        self.decay_logit = self.param("decay_logit", nn.initializers.normal(1.0), (self.ndim, self.num_heads),
                                      self.param_dtype)
        self.norm_weight = self.param("norm_weight", nn.initializers.ones_init(), (self.ndim, self.d_model),
                                      self.param_dtype)
        self.out_proj = [dense(self.d_model, self, f"out_proj_{a}") for a in range(self.ndim)]

    def __call__(self, x: Array, state: Array | None = None) -> tuple[Array, Array | None]:
        real = state_float(x.dtype)
        dh = self.d_model // self.num_heads
        out = jnp.zeros_like(x)
        for a in range(self.ndim):
            decay = jnp.repeat(jax.nn.sigmoid(self.decay_logit[a].astype(real)), dh)  # [d]
            u = jnp.moveaxis(x, a + 1, 1).astype(real)
            h, final = linear_scan_op(decay, u, initial_state=state, method=scan_method("auto", u.shape[1]))
            if self.bidirectional:
                h = h + linear_scan_op(decay, u, reverse=True)[0] - u
            h = rms_norm(split_heads(jnp.moveaxis(h, 1, a + 1), self.num_heads),
                         split_heads(self.norm_weight[a].astype(real), self.num_heads), self.norm_eps)
            out = out + self.out_proj[a](merge_heads(h).astype(x.dtype))
        return out, (None if self.bidirectional else final)


# ----------------------------------------------------------------------------- layer
@register("lightnet")
class LightNet(RecurrentMixer):
    """LightNet attention (module docstring); parameters ``4 d^2 + 2 d r + d`` plus
    ``D (H + d + d^2)`` with ``tpe``."""

    d_model: int
    num_heads: int = 4
    gate_low_rank_dim: int = 16
    bidirectional: bool = False
    grid_shape: tuple[int, ...] | None = None
    lrpe: bool = False
    tpe: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    chunk_size: int = 64
    method: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def grid(self) -> tuple[int, ...] | None:
        return None if self.grid_shape is None else tuple(self.grid_shape)

    def setup(self):
        dh = check_heads("num_heads", self.d_model, self.num_heads)
        if self.grid is not None and not self.bidirectional:
            raise ValueError("grid_shape: grids are non-causal; set bidirectional=True")
        self.q_proj, self.k_proj, self.v_proj = (
            dense((self.num_heads, dh), self, n) for n in ("q_proj", "k_proj", "v_proj"))
        self.g_down = dense(self.gate_low_rank_dim, self, "g_down")
        self.g_up = dense(self.d_model, self, "g_up")
        self.norm_weight = ones_param(self, "norm_weight", self.d_model)
        self.out_proj = dense(self.d_model, self, "out_proj")
        if self.tpe:
            self.md_tpe = MDTPE(self.d_model, self.num_heads, len(self.grid or (0,)), self.bidirectional,
                                self.norm_eps, self.dtype, self.param_dtype)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        if self.bidirectional:
            raise ValueError("state: lightnet with bidirectional=True is non-causal and has no recurrent state")
        dh = self.d_model // self.num_heads
        real = state_float(dtype)
        state = dict(S=jnp.zeros((batch_size, self.num_heads, dh, dh), real),
                     z=jnp.full((batch_size, self.num_heads, dh), -jnp.inf, real),
                     pos=jnp.zeros((), jnp.int32))
        if self.tpe:
            state["tpe"] = jnp.zeros((batch_size, self.d_model), real)
        return state

    def __call__(self, x, *, state=None, return_state: bool = False):
        no_state_when_bidirectional("lightnet", self.bidirectional, state, return_state)
        if not self.bidirectional:
            return super().__call__(x, state=state, return_state=return_state)
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        if self.grid is not None and math.prod(self.grid) != x.shape[1]:
            raise ValueError(f"x: expected {math.prod(self.grid)} tokens for grid_shape={self.grid}, got {x.shape[1]}")
        return output_dropout(self, self.mix_global(x))

    def step(self, x_t, state):
        """:class:`StepByCall`'s step; with ``bidirectional=True`` the error names ``step``
        (``__call__`` would reject the state instead)."""
        if self.bidirectional:
            raise ValueError("step: lightnet with bidirectional=True is non-causal and has no step form")
        return super().step(x_t, state)

    def _output(self, x, o):
        real = state_float(x.dtype)
        y = gated_rms_norm(merge_heads(o).astype(real), self.g_up(self.g_down(x)).astype(real),
                           self.norm_weight.astype(real), self.norm_eps)
        return self.out_proj(y.astype(x.dtype))

    def mix(self, x, state):
        if self.tpe:
            shift, tpe_state = self.md_tpe(x, state["tpe"])
            x = x + shift
        real = state_float(x.dtype)
        q, key_logits, v = jax.nn.silu(self.q_proj(x)), self.k_proj(x).astype(real), self.v_proj(x)
        k, log_decay, z = additive_gates(key_logits, state["z"])
        if self.lrpe:
            positions = (state["pos"] + jnp.arange(x.shape[1]))[:, None]
            q, k = md_lrpe(q, positions, self.rope_base), md_lrpe(k, positions, self.rope_base)
        o, S = gla_op(q, k, v, log_decay=log_decay, initial_state=state["S"],
                                      chunk_size=self.chunk_size, method=scan_method(self.method, x.shape[1]))
        new_state = dict(S=S, z=z, pos=state["pos"] + x.shape[1])
        if self.tpe:
            new_state["tpe"] = tpe_state
        return self._output(x, o), new_state

    def mix_global(self, x):
        """Non-causal: every token reads the final state of one additive scan."""
        if self.tpe:
            grid = self.grid or (x.shape[1],)
            x = x + self.md_tpe(x.reshape((x.shape[0],) + grid + (x.shape[-1],)))[0].reshape(x.shape)
        real = state_float(x.dtype)
        q, key_logits, v = jax.nn.silu(self.q_proj(x)), self.k_proj(x).astype(real), self.v_proj(x)
        k = jax.nn.softmax(key_logits, axis=1)
        if self.lrpe:
            coords = grid_coordinates(self.grid or (x.shape[1],))
            q, k = md_lrpe(q, coords, self.rope_base), md_lrpe(k, coords, self.rope_base)
        S = jnp.einsum("bthk,bthv->bhkv", k, v.astype(real))
        o = jnp.einsum("bthk,bhkv->bthv", q.astype(real), S) * (q.shape[-1] ** -0.5)
        return self._output(x, o)
