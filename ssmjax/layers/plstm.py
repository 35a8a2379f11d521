"""pLSTM mixers: ``plstm`` (1-D sequences, causal, step form) and ``plstm2d`` (2-D grids
flattened to ``[batch, H * W, d]``).

Pöppel, Freinschlag, Schmied, Lin and Hochreiter, 2025, "pLSTM: parallelizable Linear
Source Transition Mark networks". The recurrence (source ``S``, transition ``T``, mark
``M``, direct ``D`` on the line graph of a DAG) lives in :mod:`ssmjax.scan.plstm`; these
modules compute the gates from the input. Per head (``H`` heads, ``dh = d / H``, ``J`` =
``transition_dim``; projections bias-free unless stated)::

    q = dh^-1/2 W_q x,  k = W_k x,  v = W_v x
    source = sigmoid(W_s x + b_s) [J],  mark = sigmoid(W_m x + b_m) [J],
    direct = sigmoid(W_D x + b_D),       decay = sigmoid(W_a x + b_a)
    o = pLSTM(q, k, v; S, T, M, D)       (:func:`ssmjax.scan.plstm.plstm_1d` / ``plstm_2d``)
    y = W_o (RMSNorm_head(o) * silu(W_g x))

Transitions, by stability mode (the paper's section on long-range stability):

* **P-mode** (propagation): for every incoming edge (and state component) the absolute
  transitions to all outgoing edges sum to at most one, so a path sum can neither
  explode nor grow with the number of paths. With ``J > 1`` the ``J x J`` block is
  ``N(R) = R / max(1, column L1 norms of R)`` for ``R = I + W_R x`` (so ``||N(R)||_1 <= 1``),
  times the scalar decay; with ``J = 1`` it is the decay. On a 2-D grid a per-node
  orientation ``o = sigmoid(W_o x + b_o)`` splits the flow::

      T[right, left] = T[right, up] = o * decay * N(R),    S[right] = o * source
      T[down,  left] = T[down,  up] = (1 - o) * decay * N(R), S[down] = (1 - o) * source
      M[left] = M[up] = mark

* **D-mode** (diffusion / directed): the line graph is reduced to a multitree and every
  remaining transition is bounded by one. The ``J`` components become independent
  chains (``T = diag(sigmoid(a))``); on a 2-D grid the up -> right turn is removed, so
  between two nodes there is at most one path (right along the row, then down)::

      T[right, left] = diag(sigmoid(a_r)),  T[down, up] = diag(sigmoid(a_d)),
      T[down, left] = diag(sigmoid(a_t)),   T[right, up] = 0
      separate sources S[right], S[down] and marks M[left], M[up]

Decay biases start in ``sigmoid^-1([0.9, 0.999])`` (spread over heads / components), the
other gate biases at ``0``.

``plstm2d`` reads ``x [b, t, d]`` as a row-major ``H x W`` grid (``grid_shape``; if
``None``, the most square factorisation of ``t``). Node ``(i, j)`` sees the nodes
``(i', j')`` with ``i' <= i, j' <= j`` (a subset of its raster-order past), so the causal
layer carries a state: the edge states leaving the bottom row, which continue the grid below (``x`` split
at a row boundary with the state carried == one call). It has no token-by-token step.
``bidirectional=True`` averages the four grid orientations (flips of rows and / or
columns, each with its own gates): non-causal, no state.

Parameter counts (``d = d_model``, ``H`` heads, ``J``; ``r = 1`` if ``J > 1`` and P-mode
else ``0``; ``n`` orientations = 4 if bidirectional else 1)::

    plstm:   5 d^2 + (d + 1)(H (2 J + 1) + H J_a + r H J^2) + d,  J_a = 1 (P) or J (D)
    plstm2d: 5 d^2 + n (d + 1) G + d,  G = H (2 J + 1 + 1 + 1 + r J^2)      (P-mode)
                                       G = H (4 J + 1 + 3 J)                 (D-mode)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import Float

from ssmjax.layers.common import (
    RecurrentMixer,
    check_heads,
    check_layer_input,
    compiled,
    dense,
    no_state_when_bidirectional,
    ones_param,
    output_dropout,
    rms_norm,
    scan_method,
    split_heads,
    state_float,
)
from ssmjax.layers.registry import register
from ssmjax.scan.plstm import plstm_1d, plstm_2d

MODES = ("P", "D")
ZEROS = nn.initializers.zeros_init()
plstm_1d_op = compiled(plstm_1d, "chunk_size", "method")
plstm_2d_op = compiled(plstm_2d, "tile_size", "method")


# ----------------------------------------------------------------------------- gates
def column_normalise(raw: Float[Array, "*lead J J"]) -> Float[Array, "*lead J J"]:
    """``R / max(1, sum_i |R_ij|)`` per column ``j``: every column has L1 norm ``<= 1``."""
    return raw / jnp.maximum(1.0, jnp.sum(jnp.abs(raw), axis=-2, keepdims=True))


def p_mode_block(decay: Float[Array, "*lead"], raw: Float[Array, "*lead J J"] | None, j: int) -> Array:
    """``decay * N(raw)`` (``J x J``), or ``decay`` as a ``1 x 1`` block when ``raw`` is ``None``."""
    if raw is None:
        return jnp.broadcast_to(decay[..., None, None], decay.shape + (j, j))
    return decay[..., None, None] * column_normalise(raw)


def diagonal_block(decay: Float[Array, "*lead J"]) -> Float[Array, "*lead J J"]:
    """``diag(decay)``: the D-mode block, each component its own chain."""
    return decay[..., :, None] * jnp.eye(decay.shape[-1], dtype=decay.dtype)


def p_mode_grid(
    orientation: Float[Array, "*lead"], block: Float[Array, "*lead J J"], source: Float[Array, "*lead J"],
    mark: Float[Array, "*lead J"],
) -> tuple[Array, Array, Array]:
    """P-mode gates of a grid node: ``(source [.., 2, J], transition [.., 2, 2, J, J],
    mark [.., 2, J])`` with the flow split by ``orientation`` between right and down."""
    split = jnp.stack([orientation, 1.0 - orientation], axis=-1)  # out edges (right, down)
    transition = split[..., :, None, None, None] * block[..., None, None, :, :]
    transition = jnp.broadcast_to(transition, split.shape + (2,) + block.shape[-2:])
    return split[..., None] * source[..., None, :], transition, jnp.stack([mark, mark], axis=-2)


def d_mode_grid(
    decays: Float[Array, "*lead 3 J"], sources: Float[Array, "*lead 2 J"], marks: Float[Array, "*lead 2 J"]
) -> tuple[Array, Array, Array]:
    """D-mode gates of a grid node from the decays ``(right <- left, down <- up,
    down <- left)``: the up -> right turn is zero (a multitree)."""
    right_left, down_up, down_left = (diagonal_block(decays[..., i, :]) for i in range(3))
    zero = jnp.zeros_like(right_left)
    transition = jnp.stack([jnp.stack([right_left, zero], -3), jnp.stack([down_left, down_up], -3)], -4)
    return sources, transition, marks


def decay_bias_init(lo: float = 0.9, hi: float = 0.999):
    """``logit`` of decays spread evenly over ``[lo, hi]`` across the bias entries."""

    def init(key, shape, dtype=jnp.float32):
        size = math.prod(shape)
        decays = np.linspace(lo, hi, size) if size > 1 else np.array([hi])
        return jnp.asarray(np.log(decays / (1 - decays)).reshape(shape), dtype)

    return init


def identity_bias_init(j: int):
    """Bias of the raw ``J x J`` transition blocks: the identity (in every head; Flax
    hands the initialiser the flattened bias shape)."""

    def init(key, shape, dtype=jnp.float32):
        size = math.prod(shape)
        return jnp.tile(jnp.eye(j, dtype=dtype).reshape(-1), size // (j * j)).reshape(shape)

    return init


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


class _PLSTMBase(nn.Module):
    """Projections and output shared by the 1-D and 2-D layers."""

    def _qkv(self, x):
        dh = check_heads("num_heads", self.d_model, self.num_heads)
        q, k, v = (dense((self.num_heads, dh), self, n)(x) for n in ("q_proj", "k_proj", "v_proj"))
        return q * dh**-0.5, k, v

    def _gate(self, x, shape, name, bias_init=ZEROS, kernel_init=None):
        """``sigmoid``-free pre-activations ``W x + b`` shaped ``[..., *shape]``."""
        layer = nn.DenseGeneral(shape, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                                bias_init=bias_init, name=name,
                                **({} if kernel_init is None else dict(kernel_init=kernel_init)))
        return layer(x)

    def _raw_block(self, x, lead: tuple[int, ...], name: str = "raw_proj"):
        """``I + W_R x`` per head (and orientation), or ``None`` for ``J = 1``."""
        j = self.transition_dim
        if j == 1:
            return None
        return self._gate(x, lead + (j, j), name, identity_bias_init(j), ZEROS)

    def _finish(self, o, x):
        """``W_o (RMSNorm_head(o) * silu(W_g x))`` and output dropout."""
        weight = split_heads(ones_param(self, "norm_weight", self.d_model), self.num_heads)
        o = rms_norm(o, weight, self.norm_eps) * jax.nn.silu(dense((self.num_heads, o.shape[-1]), self, "g_proj")(x))
        return output_dropout(self, dense(self.d_model, self, "out_proj", axis=(-2, -1))(o.astype(x.dtype)))


# ----------------------------------------------------------------------------- 1-D
@register("plstm")
class PLSTM(_PLSTMBase, RecurrentMixer):
    """pLSTM on a sequence (module docstring); state ``[b, H, J, dh, dh]``."""

    d_model: int
    num_heads: int = 4
    transition_dim: int = 1
    mode: str = "P"
    chunk_size: int = 64
    method: str = "auto"
    norm_eps: float = 1e-6
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def init_state(self, batch_size: int, dtype=jnp.float32) -> Array:
        dh = check_heads("num_heads", self.d_model, self.num_heads)
        return jnp.zeros((batch_size, self.num_heads, self.transition_dim, dh, dh), state_float(dtype))

    @nn.compact
    def mix(self, x, state):
        _check_mode(self.mode)
        h, j = self.num_heads, self.transition_dim
        q, k, v = self._qkv(x)
        source = jax.nn.sigmoid(self._gate(x, (h, j), "source_proj"))
        mark = jax.nn.sigmoid(self._gate(x, (h, j), "mark_proj"))
        direct = jax.nn.sigmoid(self._gate(x, (h,), "direct_proj"))
        if self.mode == "P":
            decay = jax.nn.sigmoid(self._gate(x, (h,), "decay_proj", decay_bias_init()))
            transition = p_mode_block(decay, self._raw_block(x, (h,)), j)
        else:
            transition = diagonal_block(jax.nn.sigmoid(self._gate(x, (h, j), "decay_proj", decay_bias_init())))
        o, state = plstm_1d_op(q, k, v, source, transition, mark, direct, initial_state=state,
                               chunk_size=self.chunk_size, method=scan_method(self.method, x.shape[1]))
        return self._finish(o, x), state


# ----------------------------------------------------------------------------- 2-D
def square_grid(time: int) -> tuple[int, int]:
    """The most square ``(H, W)`` with ``H * W = time`` and ``H <= W``."""
    height = max(h for h in range(1, math.isqrt(max(time, 1)) + 1) if time % h == 0)
    return height, max(time, 1) // height


@register("plstm2d")
class PLSTM2D(_PLSTMBase):
    """pLSTM on a row-major grid (module docstring); state: the bottom boundary edge
    states ``[b, W, H, J, dh, dh]`` (causal only)."""

    d_model: int
    grid_shape: tuple[int, int] | None = None
    num_heads: int = 4
    transition_dim: int = 1
    mode: str = "P"
    bidirectional: bool = False
    tile_size: int = 8
    method: str = "auto"
    norm_eps: float = 1e-6
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _grid(self, time: int) -> tuple[int, int]:
        if self.grid_shape is None:
            return square_grid(time)
        width = self.grid_shape[1]
        if time % width:
            raise ValueError(f"x: time {time} is not a whole number of grid rows of width {width} (grid_shape)")
        return time // width, width

    def init_state(self, batch_size: int, dtype=jnp.float32) -> Array:
        if self.grid_shape is None:
            raise ValueError("grid_shape: plstm2d needs a fixed grid width to carry a state")
        dh = check_heads("num_heads", self.d_model, self.num_heads)
        shape = (batch_size, self.grid_shape[1], self.num_heads, self.transition_dim, dh, dh)
        return jnp.zeros(shape, state_float(dtype))

    def step(self, x_t, state):
        """Always raises: a 2-D grid has no one-token form."""
        raise ValueError("plstm2d: a grid has no token-by-token step form; call it on whole rows with state=")

    @nn.compact
    def __call__(self, x, *, state=None, return_state: bool = False):
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        _check_mode(self.mode)
        no_state_when_bidirectional("plstm2d", self.bidirectional, state, return_state)
        batch, time, _ = x.shape
        height, width = self._grid(time)
        if state is None and return_state:
            state = self.init_state(batch, x.dtype)
        grid = x.reshape(batch, height, width, self.d_model)
        q, k, v = self._qkv(grid)
        n, h = 4 if self.bidirectional else 1, self.num_heads
        gates = self._grid_gates(grid, (n, h))
        outputs = []
        for i in range(n):  # orientation i flips the rows if i & 1 and the columns if i & 2
            axes = [a for a, bit in ((1, 1), (2, 2)) if i & bit]

            def flip(a, axes=axes):
                return jnp.flip(a, axes) if axes else a

            source, transition, mark, direct = (flip(g[:, :, :, i]) for g in gates)
            top = None if state is None else (jnp.zeros((batch, height) + state.shape[2:], state.dtype), state)
            o, (_, bottom) = plstm_2d_op(flip(q), flip(k), flip(v), source, transition, mark, direct,
                                         initial_state=top, tile_size=self.tile_size, method=self.method)
            outputs.append(flip(o))
        o = sum(outputs) / n if n > 1 else outputs[0]
        y = self._finish(o, grid).reshape(batch, time, self.d_model)
        return (y, bottom.astype(state.dtype)) if return_state else y

    def _grid_gates(self, x, lead: tuple[int, int]):
        """``(source, transition, mark, direct)`` ``[b, H, W, n, heads, ...]`` for the mode."""
        j = self.transition_dim
        direct = jax.nn.sigmoid(self._gate(x, lead, "direct_proj"))
        if self.mode == "P":
            orientation = jax.nn.sigmoid(self._gate(x, lead, "orientation_proj"))
            decay = jax.nn.sigmoid(self._gate(x, lead, "decay_proj", decay_bias_init()))
            block = p_mode_block(decay, self._raw_block(x, lead), j)
            source = jax.nn.sigmoid(self._gate(x, lead + (j,), "source_proj"))
            mark = jax.nn.sigmoid(self._gate(x, lead + (j,), "mark_proj"))
            source, transition, mark = p_mode_grid(orientation, block, source, mark)
        else:
            decays = jax.nn.sigmoid(self._gate(x, lead + (3, j), "decay_proj", decay_bias_init()))
            sources = jax.nn.sigmoid(self._gate(x, lead + (2, j), "source_proj"))
            marks = jax.nn.sigmoid(self._gate(x, lead + (2, j), "mark_proj"))
            source, transition, mark = d_mode_grid(decays, sources, marks)
        return source, transition, mark, direct

