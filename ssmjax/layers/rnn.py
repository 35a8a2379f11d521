"""Non-linear recurrent mixers: ``lstm``, ``gru``, ``elman``, ``slstm`` and ``rhn``, with the
hybrid options of "Deconstructing Recurrence, Attention, and Gating" (Heidenreich, Vlachas
and Koumoutsakos 2024): attention over the recent hidden states and neural gating of the
output.

Every layer computes the input pre-activations of all time steps in parallel, runs a
head-wise recurrence of :mod:`ssmjax.scan.rnn` (``method="sequential"``, ``"newton"`` or
``"pallas"``; the recurrent matrix is block-diagonal with ``num_heads`` blocks of ``dh =
hidden / num_heads``, ``num_heads = 1`` being the classic dense cell) and projects back
(``d = d_model``, ``n = hidden_size``, ``H = num_heads``, ``G`` gates; no projection bias
unless stated)::

    gx  = W_in x                                      [b, t, G, H, dh]
    h   = RNN_cell(gx; R, b)                          R [Gr, H, dh, dh], b [Gr, H, dh]
    h~  = h + W_a MHA(h_t; h_{t-W+1} .. h_t)          (attention_window = W > 0, else h~ = h)
    y   = W_out h~                                     [b, t, d]
    y   = gate(x, y)                                   (output_gating, default "none")

``lstm`` (Hochreiter & Schmidhuber 1997; forget-gate bias ``forget_bias``, Jozefowicz,
Zaremba and Sutskever 2015), ``gru`` (Cho et al. 2014, PyTorch/cuDNN form; ``W_in`` has a
bias, ``b`` is cuDNN's ``b_h``), ``elman`` (Elman 1990, tanh): the cells of
:mod:`ssmjax.scan.rnn`. Parameters ``G d n + G n^2 / H + G n + n d`` (+ ``G n`` input bias
for ``gru``).

``rhn`` (Zilly, Srivastava, Koutník and Schmidhuber 2017, "Recurrent Highway Networks"):
``depth`` stacked highway micro-layers per step with coupled carry gate, input into the
first; transform-gate bias ``transform_bias`` (negative: carry by default, as in highway
networks). Parameters ``2 d n + 2 depth (n^2 / H + n) + n d``.

``slstm`` (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", the
post-up-projection sLSTM block without its gated MLP, which the backbone provides): exponential input
gate, sigmoid (``forget_gate="sigmoid"``) or exponential forget gate, stabiliser and
normaliser state, ``num_heads = 4`` block-diagonal heads, the input and forget gates fed by
``swish(conv_k(x))`` (``conv_size = 0``: by ``x``), then a per-head LayerNorm (xLSTM's
GroupNorm)::

    x_c = swish(conv_k(x));   [i~, f~] = W_if x_c;   [z~, o~] = W_zo x
    h   = sLSTM([i~, f~, z~, o~]; R, b);   y = W_out GroupNorm_H(h)

with the forget bias ``linspace(3, 6)`` over the units (slow forgetting at
initialisation). Dense ``W_if``, ``W_zo`` (xLSTM uses head-wise block-diagonal input maps:
a simplification). Parameters ``4 d n + (k + 1) d + 4 n^2 / H + 4 n + n + n d``.

Hybrid options (default off). The paper reports that attention and neural gating improve
every RNN it tested and that RHN with both is its best forecaster of high-dimensional
chaotic systems; its text is not reproduced here, the forms below are this library's:

* ``attention_window = W``: multi-head (``attention_heads``) softmax attention of every
  hidden state over the last ``W`` hidden states including itself, with a learned
  relative-position bias per head and distance; its output, projected back to ``n``, is
  added to ``h``. The state carries the last ``W - 1`` hidden states, so ``step`` and
  split calls are exact.
* ``output_gating`` (neural gating of the output with the layer input, a generalised
  residual connection): ``"additive"`` ``y + x``; ``"learned_rate"`` ``(1 - a) x + a y``
  with ``a = sigmoid(rho)``, ``rho [d]`` learned (``a = 1/2`` at init); ``"input"``
  ``(1 - g) x + g y`` with ``g = sigmoid(W_g x + b_g)``.

Packed sequences: ``__call__(x, segment_ids=...)`` or ``reset=...`` restart the recurrent
state, the convolution taps and the attention window at every document start.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Bool, Float, Int

from ssmjax.checks import carry_cut_mask
from ssmjax.layers.common import (
    StepByCall,
    check_heads,
    check_layer_input,
    compiled,
    dense,
    layer_norm,
    output_dropout,
    scan_method,
    short_conv,
    short_conv_params,
    state_float,
    uniform_init,
)
from ssmjax.layers.registry import register
from ssmjax.scan.rnn import CELLS, init_state, nonlinear_rnn

GATINGS = ("none", "additive", "learned_rate", "input")

#: :func:`ssmjax.scan.rnn.nonlinear_rnn` compiled per shape (see ``common.compiled``).
rnn_op = compiled(nonlinear_rnn, "cell", "method", "jacobian", "max_iters", "tol", "return_info")


# ----------------------------------------------------------------------------- attention
def recent_state_attention(
    q: Float[Array, "batch time heads dim"],
    k: Float[Array, "batch span heads dim"],
    v: Float[Array, "batch span heads dim"],
    valid: Bool[Array, "batch span"],
    document: Int[Array, "batch span"],
    position_bias: Float[Array, "heads window"],
) -> Float[Array, "batch time heads dim"]:
    """Softmax attention of query ``i`` over the ``W`` keys ending at it.

    ``k``, ``v``, ``valid`` and ``document`` cover ``span = W - 1 + time`` positions: the
    ``W - 1`` carried ones, then the ``time`` new ones; query ``i`` sits at ``W - 1 + i``
    and sees key ``i + w`` (``w = 0 .. W-1``, distance ``W - 1 - w``) if it is ``valid``
    and of the same ``document``. Logits ``q . k / sqrt(dim) + position_bias[head,
    w]``; the query's own position is always visible.
    """
    window = position_bias.shape[1]
    time = q.shape[1]
    idx = jnp.arange(time)[:, None] + jnp.arange(window)[None, :]  # [time, W]
    keys, values = k[:, idx], v[:, idx]  # [b, t, W, heads, dim]
    logits = jnp.einsum("bthe,btwhe->bthw", q, keys) * q.shape[-1] ** -0.5 + position_bias
    visible = valid[:, idx] & (document[:, idx] == document[:, window - 1 + jnp.arange(time)][..., None])
    logits = jnp.where(visible[:, :, None, :], logits, -jnp.inf)
    return jnp.einsum("bthw,btwhe->bthe", jax.nn.softmax(logits, axis=-1), values)


# ----------------------------------------------------------------------------- base layer
class _HeadwiseRNN(StepByCall):
    """The shared layer (module docstring); subclasses set the cell and the gate
    pre-activations. Fields common to every RNN layer:

    Attributes:
      d_model: input and output width.
      num_heads: blocks of the block-diagonal recurrent matrix.
      hidden_size: recurrent width ``n`` (``None``: ``d_model``).
      method: ``"sequential"``, ``"newton"`` or ``"pallas"`` (a single token always runs
        the sequential step).
      jacobian, max_iters, tol: Newton options (:func:`ssmjax.scan.rnn.nonlinear_rnn`);
        with ``method="newton"`` the iteration count and convergence flag are sown into the
        ``"intermediates"`` collection (``newton_iterations``, ``newton_converged``).
      attention_window, attention_heads: attention over the last ``W`` hidden states
        (``0``: off).
      output_gating: ``"none"``, ``"additive"``, ``"learned_rate"`` or ``"input"``.
    """

    d_model: int
    num_heads: int = 1
    hidden_size: int | None = None
    method: str = "sequential"
    jacobian: str = "block"
    max_iters: int = 100
    tol: float | None = None
    attention_window: int = 0
    attention_heads: int = 1
    output_gating: str = "none"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    # -- what a subclass defines
    cell_name = "elman"
    rgates_per_gate = 1
    input_bias = False

    def gate_preactivations(self, x, state, segment_ids, reset):
        """``(gx [b, t, G, H, dh], new_state_entries)``."""
        return self.in_proj(x), {}

    def bias_init(self, key, shape, dtype=jnp.float32):
        return jnp.zeros(shape, dtype)

    def extra_setup(self):
        self.in_proj = dense((self.gates, self.num_heads, self.head_dim), self, "in_proj", use_bias=self.input_bias)

    def extra_state(self, batch_size: int, dtype) -> dict:
        return {}

    def read_out(self, h):
        return h

    # -- shared
    @property
    def hidden(self) -> int:
        return self.hidden_size or self.d_model

    @property
    def head_dim(self) -> int:
        return check_heads("num_heads", self.hidden, self.num_heads)

    @property
    def gates(self) -> int:
        return CELLS[self.cell_name].gates

    def setup(self):
        if self.output_gating not in GATINGS:
            raise ValueError(f"output_gating: expected one of {GATINGS}, got {self.output_gating!r}")
        if not isinstance(self.attention_window, int) or self.attention_window < 0:
            raise ValueError(f"attention_window: expected an int >= 0, got {self.attention_window!r}")
        H, dh, n = self.num_heads, self.head_dim, self.hidden
        rgates = self.gates * self.rgates_per_gate
        self.R = self.param("R", uniform_init(1.0 / math.sqrt(dh)), (rgates, H, dh, dh), self.param_dtype)
        self.bias = self.param("bias", self.bias_init, (rgates, H, dh), self.param_dtype)
        self.out_proj = dense(self.d_model, self, "out_proj", axis=(-2, -1))
        if self.attention_window:
            heads = self.attention_heads
            e = check_heads("attention_heads", n, heads)
            self.q_proj, self.k_proj, self.v_proj = (
                dense((heads, e), self, name, axis=(-2, -1)) for name in ("q_proj", "k_proj", "v_proj"))
            self.attn_out = dense((H, dh), self, "attn_out", axis=(-2, -1))
            self.position_bias = self.param("position_bias", nn.initializers.zeros,
                                            (heads, self.attention_window), self.param_dtype)
        if self.output_gating == "learned_rate":
            self.rate = self.param("rate", nn.initializers.zeros, (self.d_model,), self.param_dtype)
        elif self.output_gating == "input":
            self.gate_proj = dense(self.d_model, self, "gate_proj", use_bias=True)
        self.extra_setup()

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        """``cell``: the recurrent state (tuple of ``[batch, heads, dh]``, at least
        float32); ``window``, ``window_valid``: the last ``W - 1`` hidden states (attention);
        plus the subclass's entries (``conv``)."""
        state = dict(cell=init_state(self.cell_name, batch_size, self.num_heads, self.head_dim, dtype))
        if self.attention_window:
            W1 = self.attention_window - 1
            state["window"] = jnp.zeros((batch_size, W1, self.num_heads, self.head_dim), state_float(dtype))
            state["window_valid"] = jnp.zeros((batch_size, W1), bool)
        return state | self.extra_state(batch_size, dtype)

    def __call__(self, x, *, state=None, return_state: bool = False, segment_ids=None, reset=None):
        """``x [batch, time, d_model]`` -> ``y`` (and the new state); ``segment_ids`` /
        ``reset`` ``[batch, time]`` mark packed documents."""
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        if state is None:
            state = self.init_state(x.shape[0], x.dtype)
        gx, new_state = self.gate_preactivations(x, state, segment_ids, reset)
        method = scan_method(self.method, x.shape[1])
        h, cell_state, info = rnn_op(
            self.cell_name, gx, self.R, self.bias, state["cell"], method=method, jacobian=self.jacobian,
            max_iters=self.max_iters, tol=self.tol, segment_ids=segment_ids, reset=reset, return_info=True,
        )
        if method == "newton":
            self.sow("intermediates", "newton_iterations", info.iterations)
            self.sow("intermediates", "newton_converged", info.converged)
        new_state["cell"] = cell_state
        h = self.read_out(h.astype(x.dtype))
        if self.attention_window:
            h, window = self._attend(h, state, segment_ids, reset)
            new_state.update(window)
        y = self._gate(x, self.out_proj(h))
        y = output_dropout(self, y)
        return (y, new_state) if return_state else y

    def _attend(self, h, state, segment_ids, reset):
        """``h + W_a MHA(h_t; last W hidden states)`` and the new window state."""
        batch, time = h.shape[:2]
        W1 = self.attention_window - 1
        span = jnp.concatenate([state["window"].astype(h.dtype), h], axis=1)  # [b, W-1+t, H, dh]
        valid = jnp.concatenate([state["window_valid"], jnp.ones((batch, time), bool)], axis=1)
        cut = carry_cut_mask(segment_ids, reset, batch, time, reverse=False)
        starts = jnp.zeros((batch, time), jnp.int32) if cut is None else cut.astype(jnp.int32)
        document = jnp.cumsum(jnp.concatenate([jnp.zeros((batch, W1), jnp.int32), starts], axis=1), axis=1)
        o = recent_state_attention(self.q_proj(h), self.k_proj(span), self.v_proj(span), valid, document,
                                   self.position_bias.astype(h.dtype))
        h = h + self.attn_out(o)
        # the carried window: the last W - 1 positions, dropped if before the last document start
        last_doc = document[:, -1:]
        keep = valid & (document == last_doc)
        window = dict(window=span[:, span.shape[1] - W1 :].astype(state["window"].dtype),
                      window_valid=keep[:, keep.shape[1] - W1 :])
        return h, window

    def _gate(self, x, y):
        if self.output_gating == "none":
            return y
        if self.output_gating == "additive":
            return x + y
        if self.output_gating == "learned_rate":
            a = jax.nn.sigmoid(self.rate.astype(y.dtype))
        else:
            a = jax.nn.sigmoid(self.gate_proj(x))
        return (1 - a) * x + a * y


# ----------------------------------------------------------------------------- cells
def _gate_bias_init(values: dict):
    """Bias ``[rgates, heads, dh]`` with the given per-gate init (``gate -> float`` or
    ``"linspace(a,b)"`` as a ``(a, b)`` pair over the ``heads * dh`` units); zeros elsewhere."""

    def init(key, shape, dtype=jnp.float32):
        bias = jnp.zeros(shape, dtype)
        for gate, value in values.items():
            if isinstance(value, tuple):
                value = jnp.linspace(*value, shape[1] * shape[2], dtype=dtype).reshape(shape[1:])
            bias = bias.at[gate].set(value)
        return bias

    return init


@register("elman")
class Elman(_HeadwiseRNN):
    """Elman RNN ``h_t = tanh(W_in x_t + h_{t-1} R + b)`` (module docstring)."""

    cell_name = "elman"


@register("lstm")
class LSTM(_HeadwiseRNN):
    """LSTM, gates ``(i, f, z, o)`` (module docstring)."""

    forget_bias: float = 1.0
    cell_name = "lstm"

    def bias_init(self, key, shape, dtype=jnp.float32):
        return _gate_bias_init({1: self.forget_bias})(key, shape, dtype)


@register("gru")
class GRU(_HeadwiseRNN):
    """GRU in the PyTorch/cuDNN form, gates ``(r, z, n)`` (module docstring)."""

    cell_name = "gru"
    input_bias = True


@register("rhn")
class RHN(_HeadwiseRNN):
    """Recurrent Highway Network of recurrence depth ``depth`` (module docstring)."""

    depth: int = 3
    transform_bias: float = -2.0
    cell_name = "rhn"

    @property
    def rgates_per_gate(self) -> int:
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth: expected a positive int, got {self.depth!r}")
        return self.depth

    def bias_init(self, key, shape, dtype=jnp.float32):
        return _gate_bias_init({2 * layer + 1: self.transform_bias for layer in range(self.depth)})(key, shape, dtype)


@register("slstm")
class SLSTM(_HeadwiseRNN):
    """sLSTM block of xLSTM (module docstring): exponential gating, stabiliser, normaliser,
    ``num_heads`` block-diagonal heads, conv + swish before the input and forget gates,
    per-head LayerNorm."""

    num_heads: int = 4
    forget_gate: str = "sigmoid"
    conv_size: int = 4
    norm_eps: float = 1e-6

    @property
    def cell_name(self) -> str:
        if self.forget_gate not in ("sigmoid", "exp"):
            raise ValueError(f"forget_gate: expected 'sigmoid' or 'exp', got {self.forget_gate!r}")
        return "slstm" if self.forget_gate == "sigmoid" else "slstm_exp"

    def bias_init(self, key, shape, dtype=jnp.float32):
        return _gate_bias_init({1: (3.0, 6.0)})(key, shape, dtype)

    def extra_setup(self):
        H, dh = self.num_heads, self.head_dim
        self.if_proj = dense((2, H, dh), self, "if_proj")
        self.zo_proj = dense((2, H, dh), self, "zo_proj")
        if self.conv_size:
            self.conv_w, self.conv_b = short_conv_params(self, self.conv_size, self.d_model, bias=True)
        self.norm_weight = self.param("norm_weight", nn.initializers.ones, (H, dh), self.param_dtype)

    def extra_state(self, batch_size: int, dtype) -> dict:
        if not self.conv_size:
            return {}
        return dict(conv=jnp.zeros((batch_size, self.conv_size - 1, self.d_model), dtype))

    def gate_preactivations(self, x, state, segment_ids, reset):
        new = {}
        x_c = x
        if self.conv_size:
            x_c, new["conv"] = short_conv(x, self.conv_w, self.conv_b, state["conv"], segment_ids, reset)
        return jnp.concatenate([self.if_proj(x_c), self.zo_proj(x)], axis=2), new

    def read_out(self, h):
        real = state_float(h.dtype)
        return layer_norm(h.astype(real), self.norm_weight.astype(real), self.norm_eps).astype(h.dtype)
