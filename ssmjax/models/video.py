"""Video prediction models: ``frames [b, t, H, W, C]`` in ``[0, 1]`` -> predicted frames
``[b, t_out, H, W, C]`` (values; the caller computes the MSE). Moving MNIST: 10 frames in,
10 out.

**PredFormer** (Tang, Qi, Xie, Li, Ma and Yang, 2024, "PredFormer: Transformers Are Effective
Spatial-Temporal Predictive Learners", arXiv:2410.04733; layout of the official code,
github.com/yyyujintang/PredFormer). Every input frame is cut into ``p x p`` patches
(:func:`patchify`), each patch ``(p1 p2 c)``-flattened and embedded by one linear map, plus a
fixed sinusoidal absolute position over the ``t * n`` flattened (frame, patch) positions
(:func:`sinusoidal_embedding`; not trained). Gated Transformer blocks (pre-LayerNorm
attention, pre-LayerNorm SwiGLU, Shazeer 2020)::

    x <- x + W_o MHA(LN(x))                                  (non-causal; q, k, v bias-free)
    x <- x + W_2 (silu(W_g LN(x) + b_g) * (W_x LN(x) + b_x)) + b_2     (hidden 4 d)

are grouped into *stages*: ``depth`` blocks along one axis, then a LayerNorm. The axis is
``"time"`` (each patch position is a sequence over the ``t`` frames), ``"space"`` (each
frame is a sequence over its ``n`` patches) or ``"full"`` (one sequence of ``t * n``
tokens). The ``attention`` variants (:func:`predformer_stages`):

* ``"full"``: one stage of ``depth`` full spatio-temporal blocks;
* ``"factorised"``: two stages of ``depth`` blocks; ``pattern="TS"`` (FacTS: the temporal
  encoder first, the variant of the official WeatherBench script) or ``"ST"`` (FacST);
* ``"interleaved"``: ``depth`` repetitions of ``pattern``, one single-block stage per
  letter; ``"TSST"`` (the quadruplet, the variant of the official Moving MNIST and
  Human3.6m scripts) is the default; ``"TS"`` / ``"ST"`` (binary), ``"TST"`` / ``"STS"``
  (triplet, ``"STS"`` in the TaxiBJ script) and ``"STTS"`` are the other interleavings of
  the code. Its configs give every variant 24 blocks: full 24, factorised / binary 12,
  triplet 8, quadruplet 6.

A linear head (LayerNorm, ``d -> p * p * C``) maps each input frame's patch tokens back to a
frame (:func:`unpatchify`): ``t_out == t_in``, frame ``k`` of the output is the prediction of
future frame ``k``. ``spatial_mixer`` replaces the attention of the spatial blocks by a
registered ssmjax mixer over the ``(H / p) x (W / p)`` patch grid of one frame (e.g.
``"plstm2d"``, or ``"lightnet"``, whose grids need ``bidirectional=True``): it gets
``grid_shape`` when it has that field and ``bidirectional=True`` when it has that field and
``spatial_mixer_fields`` does not set it (PredFormer's spatial attention is non-causal).

Differences from the official code: Flax's default initialisers for the patch embedding and
the head (PyTorch defaults there), ``N(0, 0.02^2)`` weights in the blocks (timm's
``trunc_normal_(std=.02)`` truncates at +-2 absolute, i.e. nowhere that matters), no
dropout / drop-path (the Moving MNIST config sets them to 0).

**ConvLSTM** (Shi, Chen, Wang, Yeung, Wong and Woo, 2015, "Convolutional LSTM Network: A
Machine Learning Approach for Precipitation Nowcasting"; as OpenSTL's ``ConvLSTM_Model``,
Tan et al. 2023). Frames are space-to-depth reshaped by ``patch_size`` (:func:`patchify`,
64x64x1 -> 16x16x16 for ``p = 4``); each layer ``l`` is the cell (``*`` a ``k x k``
"same" convolution, gates split in OpenSTL's order ``(i, f, g, o)``)::

    [i~, f~, g~, o~] = W_l * [x_t, h_{t-1}] (+ b_l if use_bias)
    c_t = sigma(f~) c_{t-1} + sigma(i~) tanh(g~),   h_t = sigma(o~) tanh(c_t)

with ``x_t`` the layer below's ``h_t`` (the frame for the first layer). Shi et al.'s peephole
terms ``W_c o c`` are omitted, as in OpenSTL (whose convolutions are also bias-free, the
default here). The prediction is a bias-free 1x1 convolution of the top ``h_t``. The stack
reads the ``t_in`` input frames, then runs ``output_frames - 1`` more steps on its own
previous prediction; the predictions made after input frames ``t_in - 1 ..`` are the output.
Always fed back, at training too: OpenSTL's scheduled sampling (ground truth fed with a
decaying probability) is not implemented. The time loop is ``flax.linen.scan``: a
convolutional recurrence is not among the per-channel / dense scans of :mod:`ssmjax.scan`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import Float

import ssmjax.layers
from ssmjax.checks import check_choice, check_ndim, check_positive_int, check_real_floating

ATTENTION_VARIANTS = ("full", "factorised", "interleaved")
STAGE_AXES = ("time", "space", "full")
DEFAULT_PATTERNS = {"factorised": "TS", "interleaved": "TSST"}
_AXIS_OF_LETTER = {"T": "time", "S": "space"}
_BLOCK_INIT = nn.initializers.normal(0.02)
_LN_EPS = 1e-5  # PyTorch's LayerNorm default, as in the official code


# ----------------------------------------------------------------------------- patches
def check_frames(frames: Array, patch_size: int) -> tuple[int, int, int, int, int]:
    """``frames [b, t, H, W, C]`` real floating with ``H`` and ``W`` multiples of
    ``patch_size``; returns the shape."""
    check_positive_int("patch_size", patch_size)
    check_ndim("frames", frames, 5, "[batch, time, height, width, channels]")
    check_real_floating("frames", frames)
    b, t, h, w, c = frames.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size: {patch_size} does not divide the frame size {h}x{w} "
                         f"(frames shape {tuple(frames.shape)})")
    return b, t, h, w, c


def patchify(frames: Float[Array, "b t h w c"], patch_size: int) -> Float[Array, "b t hp wp patch"]:
    """Space-to-depth: ``[b, t, H, W, C] -> [b, t, H/p, W/p, p*p*C]``; patch ``(i, j)`` is
    ``frames[:, :, i p:(i+1) p, j p:(j+1) p, :]`` flattened in ``(p1, p2, c)`` order."""
    b, t, h, w, c = check_frames(frames, patch_size)
    p = patch_size
    x = frames.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h // p, w // p, p * p * c)


def unpatchify(patches: Float[Array, "b t hp wp patch"], patch_size: int) -> Float[Array, "b t h w c"]:
    """Inverse of :func:`patchify`: ``[b, t, H/p, W/p, p*p*C] -> [b, t, H, W, C]``."""
    check_positive_int("patch_size", patch_size)
    check_ndim("patches", patches, 5, "[batch, time, grid_h, grid_w, p*p*channels]")
    b, t, hp, wp, features = patches.shape
    p = patch_size
    if features % (p * p):
        raise ValueError(f"patches: last axis {features} is not a multiple of patch_size**2 = {p * p}")
    c = features // (p * p)
    x = patches.reshape(b, t, hp, wp, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, hp * p, wp * p, c)


def sinusoidal_embedding(length: int, dim: int, dtype=jnp.float32) -> Float[Array, "length dim"]:
    """``pe[s, i] = sin(s / 10000^(2 floor(i/2) / dim))`` for even ``i``, ``cos`` for odd
    ``i`` (Vaswani et al., 2017, interleaved as in PredFormer's code)."""
    positions = np.arange(length, dtype=np.float64)[:, None]
    angles = positions / 10000.0 ** (2 * (np.arange(dim) // 2) / dim)
    pe = np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles))
    return jnp.asarray(pe, dtype)


# ----------------------------------------------------------------------------- PredFormer
def predformer_stages(attention: str, depth: int, pattern: str | None = None) -> tuple[tuple[str, int], ...]:
    """The stages ``((axis, blocks), ...)`` of a variant (module docstring), e.g.
    ``("interleaved", 2, "TS")`` -> ``(("time", 1), ("space", 1), ("time", 1), ("space", 1))``."""
    check_choice("attention", attention, ATTENTION_VARIANTS)
    check_positive_int("depth", depth)
    if attention == "full":
        if pattern is not None:
            raise ValueError(f"pattern: 'full' attention has no pattern, got {pattern!r}")
        return (("full", depth),)
    pattern = DEFAULT_PATTERNS[attention] if pattern is None else pattern
    if attention == "factorised":
        check_choice("pattern", pattern, ("TS", "ST"))
        return tuple((_AXIS_OF_LETTER[letter], depth) for letter in pattern)
    if not isinstance(pattern, str) or not pattern or set(pattern) - set(_AXIS_OF_LETTER):
        raise ValueError(f"pattern: expected a string of 'T' (temporal) and 'S' (spatial) blocks, e.g. 'TSST', "
                         f"got {pattern!r}")
    return tuple((_AXIS_OF_LETTER[letter], 1) for letter in pattern) * depth


def _fold(x: Float[Array, "b t n d"], axis: str) -> Float[Array, "sequences length d"]:
    b, t, n, d = x.shape
    if axis == "time":
        return x.transpose(0, 2, 1, 3).reshape(b * n, t, d)
    if axis == "space":
        return x.reshape(b * t, n, d)
    return x.reshape(b, t * n, d)


def _unfold(y: Float[Array, "sequences length d"], axis: str, shape: tuple[int, ...]) -> Float[Array, "b t n d"]:
    b, t, n, d = shape
    if axis == "time":
        return y.reshape(b, n, t, d).transpose(0, 2, 1, 3)
    return y.reshape(b, t, n, d)


class SelfAttention(nn.Module):
    """Non-causal multi-head attention ``W_o softmax(q k^T / sqrt(dh)) v`` (bias-free
    ``q, k, v``, biased output), via ``jax.nn.dot_product_attention``."""

    d_model: int
    num_heads: int

    @nn.compact
    def __call__(self, x: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        dh = self.d_model // self.num_heads
        qkv = nn.DenseGeneral((3, self.num_heads, dh), use_bias=False, kernel_init=_BLOCK_INIT, name="qkv_proj")(x)
        o = jax.nn.dot_product_attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :])
        return nn.DenseGeneral(self.d_model, axis=(-2, -1), kernel_init=_BLOCK_INIT, name="out_proj")(o)


class SwiGLUMLP(nn.Module):
    """``W_2 (silu(W_g x + b_g) * (W_x x + b_x)) + b_2`` (PredFormer's SwiGLU, with biases)."""

    d_model: int
    hidden: int

    @nn.compact
    def __call__(self, x: Float[Array, "*lead d"]) -> Float[Array, "*lead d"]:
        gate = nn.Dense(self.hidden, kernel_init=_BLOCK_INIT, name="gate_proj")(x)
        up = nn.Dense(self.hidden, kernel_init=_BLOCK_INIT, name="up_proj")(x)
        return nn.Dense(self.d_model, kernel_init=_BLOCK_INIT, name="down_proj")(nn.silu(gate) * up)


def _spatial_mixer(name: str, d_model: int, fields: Mapping[str, Any] | None, grid_shape: tuple[int, int],
                   module_name: str) -> nn.Module:
    """The registered mixer ``name`` over a patch grid (module docstring)."""
    fields = dict(fields or {})
    layer = ssmjax.layers.layer_class(name)  # ssmjax.layers.get(name, ...) with a module name
    declared = layer.__dataclass_fields__
    if "grid_shape" in declared:
        fields.setdefault("grid_shape", tuple(grid_shape))
    if "bidirectional" in declared:
        fields.setdefault("bidirectional", True)
    return layer(d_model=d_model, **fields, name=module_name)


class GatedStage(nn.Module):
    """``blocks`` Gated Transformer blocks along ``axis`` of ``x [b, t, n, d]``, then a
    LayerNorm (the official ``GatedTransformer``). ``mixer`` (a registry name, spatial
    stages only) replaces the attention."""

    d_model: int
    num_heads: int
    axis: str
    blocks: int = 1
    mlp_ratio: float = 4.0
    mixer: str | None = None
    mixer_fields: Mapping[str, Any] | None = None
    grid_shape: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b t n d"]) -> Float[Array, "b t n d"]:
        check_choice("axis", self.axis, STAGE_AXES)
        if self.mixer is not None and self.axis != "space":
            raise ValueError(f"mixer: only spatial stages take a mixer, got axis={self.axis!r}")
        if self.mixer is not None and (self.grid_shape is None or math.prod(self.grid_shape) != x.shape[2]):
            raise ValueError(f"grid_shape: a spatial mixer needs the patch grid of the {x.shape[2]} tokens of a frame, "
                             f"got {self.grid_shape}")
        shape = x.shape
        h = _fold(x, self.axis)
        for i in range(self.blocks):
            if self.mixer is None:
                mixer = SelfAttention(self.d_model, self.num_heads, name=f"attention_{i}")
            else:
                mixer = _spatial_mixer(self.mixer, self.d_model, self.mixer_fields, self.grid_shape, f"mixer_{i}")
            h = h + mixer(nn.LayerNorm(_LN_EPS, name=f"mixer_norm_{i}")(h))
            mlp = SwiGLUMLP(self.d_model, int(self.mlp_ratio * self.d_model), name=f"mlp_{i}")
            h = h + mlp(nn.LayerNorm(_LN_EPS, name=f"mlp_norm_{i}")(h))
        return _unfold(nn.LayerNorm(_LN_EPS, name="norm")(h), self.axis, shape)


class PredFormer(nn.Module):
    """PredFormer (module docstring): ``frames [b, t, H, W, C] -> [b, t, H, W, C]``.

    The paper's Moving MNIST model: ``patch_size=8, d_model=256, num_heads=8,
    attention="interleaved", pattern="TSST", depth=6`` (24 blocks). Parameters with
    attention (``mlp_ratio=4``): ``16 d^2 + 14 d`` per block, ``2 d`` per stage norm, and
    ``(p^2 C + 1) d + 2 d + (d + 1) p^2 C`` for embedding and head: 25,297,728 for that model,
    as the official code.
    """

    patch_size: int = 8
    d_model: int = 128
    num_heads: int = 4
    depth: int = 6  # blocks per stage (full, factorised) or pattern repetitions (interleaved)
    attention: str = "interleaved"
    pattern: str | None = None  # factorised: "TS" | "ST"; interleaved: 'T'/'S' string; None: DEFAULT_PATTERNS
    mlp_ratio: float = 4.0
    spatial_mixer: str | None = None
    spatial_mixer_fields: Mapping[str, Any] | None = None

    def stages(self) -> tuple[tuple[str, int], ...]:
        """``((axis, blocks), ...)``, validated (:func:`predformer_stages`)."""
        stages = predformer_stages(self.attention, self.depth, self.pattern)
        check_positive_int("num_heads", self.num_heads)
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads: d_model={self.d_model} is not a multiple of num_heads={self.num_heads}")
        if self.spatial_mixer is not None and self.attention == "full":
            raise ValueError("spatial_mixer: 'full' attention has no spatial blocks; use 'factorised' or 'interleaved'")
        return stages

    @nn.compact
    def __call__(self, frames: Float[Array, "b t h w c"]) -> Float[Array, "b t h w c"]:
        stages = self.stages()
        b, t, h, w, c = check_frames(frames, self.patch_size)
        p = self.patch_size
        grid = (h // p, w // p)
        n = grid[0] * grid[1]
        x = nn.Dense(self.d_model, name="patch_embed")(patchify(frames, p).reshape(b, t, n, p * p * c))
        x = x + sinusoidal_embedding(t * n, self.d_model, x.dtype).reshape(t, n, self.d_model)
        for i, (axis, blocks) in enumerate(stages):
            mixer = self.spatial_mixer if axis == "space" else None
            x = GatedStage(self.d_model, self.num_heads, axis, blocks, self.mlp_ratio, mixer,
                           self.spatial_mixer_fields, grid, name=f"stage_{i}")(x)
        y = nn.Dense(p * p * c, name="head")(nn.LayerNorm(_LN_EPS, name="head_norm")(x))
        return unpatchify(y.reshape(b, t, grid[0], grid[1], p * p * c), p)


# ----------------------------------------------------------------------------- ConvLSTM
def same_conv_im2col(x: Float[Array, "b y x cin"], kernel: Float[Array, "k k cin cout"]) -> Float[Array, "b y x cout"]:
    """A stride-1 "same" convolution (odd ``k``) as one matmul: the ``k * k`` shifted copies of
    the zero-padded input side by side on the feature axis (``(kh, kw, c)`` order) times the
    kernel reshaped to ``[k k cin, cout]``. The same numbers as ``lax.conv_general_dilated``."""
    k = kernel.shape[0]
    _, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    columns = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], axis=-1)
    return columns @ kernel.reshape(k * k * c, -1)


class SameConv(nn.Module):
    """``nn.Conv(features, (k, k), padding="SAME")`` (same parameters: ``kernel [k, k, cin,
    features]``, ``bias``) whose CPU lowering is :func:`same_conv_im2col`: XLA:CPU runs the
    backward of a convolution inside a loop (the ConvLSTM's scan over time) about 40x slower
    than the same convolution outside one (19 steps of a 5x5, 48 -> 128 convolution, batch 16,
    16 x 16: 37 s against 0.9 s), and the im2col matmul in the loop takes 1.5 s. Other
    platforms keep XLA's convolution (chosen when the program is lowered)."""

    features: int
    kernel_size: int
    use_bias: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b y x cin"]) -> Float[Array, "b y x cout"]:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: a 'same' convolution here needs an odd size, got {self.kernel_size}")
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        dtype = jnp.promote_types(x.dtype, kernel.dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)

        def xla(x, kernel):
            return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

        y = jax.lax.platform_dependent(x, kernel, cpu=same_conv_im2col, default=xla)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)
        return y


class ConvLSTMCell(nn.Module):
    """One ConvLSTM cell (module docstring): ``((h, c), x_t) -> (h_t, c_t)``, all
    ``[b, H', W', .]`` channels-last."""

    hidden: int
    kernel_size: int = 5
    use_bias: bool = False

    @nn.compact
    def __call__(
        self, state: tuple[Float[Array, "b y x hidden"], Float[Array, "b y x hidden"]], x: Float[Array, "b y x cin"]
    ) -> tuple[Float[Array, "b y x hidden"], Float[Array, "b y x hidden"]]:
        h, c = state
        k = self.kernel_size
        gates = SameConv(4 * self.hidden, k, self.use_bias, name="gates")(jnp.concatenate([x, h], axis=-1))
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c


class ConvLSTMStack(nn.Module):
    """One time step of the stacked cells and the 1x1 prediction head:
    ``(states, x_t) -> (states, prediction_t)``."""

    hidden: tuple[int, ...]
    kernel_size: int
    use_bias: bool
    out_channels: int

    def setup(self):
        self.cells = [ConvLSTMCell(size, self.kernel_size, self.use_bias, name=f"cell_{i}")
                      for i, size in enumerate(self.hidden)]
        self.head = nn.Conv(self.out_channels, (1, 1), use_bias=False, name="head")

    def __call__(self, states, x):
        new = []
        for cell, state in zip(self.cells, states):
            state = cell(state, x)
            new.append(state)
            x = state[0]
        return new, self.head(x)


def _feedback_step(stack: ConvLSTMStack, carry, inputs):
    """Feed the frame while it is observed, else the previous prediction."""
    states, previous = carry
    frame, observed = inputs
    states, prediction = stack(states, jnp.where(observed, frame, previous))
    prediction = prediction.astype(previous.dtype)
    return (states, prediction), prediction


class ConvLSTM(nn.Module):
    """ConvLSTM video predictor (module docstring): ``frames [b, t_in, H, W, C] ->
    [b, output_frames, H, W, C]``; ``all_steps=True`` returns all ``t_in + output_frames - 1``
    one-step predictions (those of input frames ``1 .. t_in - 1`` first), OpenSTL's training
    target ``frames[:, 1:]``.

    OpenSTL's Moving MNIST config: ``hidden=(128,) * 4, kernel_size=5, patch_size=4``.
    Parameters: ``sum_l 4 h_l (k^2 (in_l + h_l) + use_bias) + h_L p^2 C``: 11,675,648 for
    that config (OpenSTL reports 15.0M: its cells also hold two convolutions the forward never
    uses), 1,332,224 for the default ``(64, 64)`` on 64x64x1.
    """

    hidden: tuple[int, ...] = (64, 64)
    kernel_size: int = 5
    patch_size: int = 4
    output_frames: int = 10
    channels: int = 1
    use_bias: bool = False

    def setup(self):
        check_positive_int("patch_size", self.patch_size)
        check_positive_int("output_frames", self.output_frames)
        check_positive_int("channels", self.channels)
        if not self.hidden or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.hidden):
            raise ValueError(f"hidden: expected a non-empty tuple of positive ints, got {self.hidden!r}")
        if check_positive_int("kernel_size", self.kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd size (same padding), got {self.kernel_size}")
        self.stack = ConvLSTMStack(tuple(self.hidden), self.kernel_size, self.use_bias,
                                   self.patch_size**2 * self.channels)

    def init_state(self, batch_size: int, grid_shape: tuple[int, int], dtype=jnp.float32) -> list:
        """Zero ``(h, c)`` per layer, ``[batch, H/p, W/p, hidden_l]``."""
        return [(jnp.zeros((batch_size, *grid_shape, s), dtype),) * 2 for s in self.hidden]

    def step(self, states, x_t: Float[Array, "b y x patch"]):
        """One step on a patchified frame ``[b, H/p, W/p, p*p*C]``: ``(states, prediction)``."""
        return self.stack(states, x_t)

    def __call__(self, frames: Float[Array, "b t h w c"], *, all_steps: bool = False) -> Float[Array, "b s h w c"]:
        b, t, h, w, c = check_frames(frames, self.patch_size)
        if c != self.channels:
            raise ValueError(f"frames: expected {self.channels} channels (channels), got shape {tuple(frames.shape)}")
        dtype = jnp.promote_types(frames.dtype, jnp.float32)
        x = jnp.moveaxis(patchify(frames.astype(dtype), self.patch_size), 1, 0)  # [t, b, y, x, patch]
        steps = t + self.output_frames - 1
        xs = jnp.concatenate([x, jnp.zeros((steps - t,) + x.shape[1:], dtype)], axis=0)
        observed = jnp.arange(steps) < t
        states = self.init_state(b, x.shape[2:4], dtype)
        scan = nn.scan(_feedback_step, variable_broadcast="params", split_rngs={"params": False})
        _, predictions = scan(self.stack, (states, jnp.zeros_like(x[0])), (xs, observed))
        predictions = jnp.moveaxis(predictions, 0, 1)
        if not all_steps:
            predictions = predictions[:, t - 1:]
        return unpatchify(predictions, self.patch_size)
