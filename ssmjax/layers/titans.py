"""Titans neural long-term memory as a layer (memory-as-a-layer, MAL), with ATLAS's Omega rule.

Behrouz, Zhong and Mirrokni, 2025, "Titans: Learning to Memorize at Test Time"; the Omega
rule from Behrouz et al., 2025, "ATLAS: Learning to Optimally Memorize the Context at Test
Time". Per head ``h`` (head size ``d_h = d_model / num_heads``)::

    q_t = l2norm(silu(conv_q(x W_q)))    k_t = l2norm(silu(conv_k(x W_k)))    v_t = silu(conv_v(x W_v))
    theta_t = max_lr * sigmoid(x_t w_theta + b_theta)     (learning rate)
    eta_t   = sigmoid(x_t w_eta + b_eta)                   (momentum)
    alpha_t = sigmoid(x_t w_alpha + b_alpha)               (forgetting / weight decay)
    S_t = eta_t S_{t-1} - theta_t grad_M sum_{i=t-w+1}^{t} ||M_{t'}(k_i) - v_i||^2
    M_t = (1 - alpha_t) M_{t-1} + S_t,      y_t = M_t(q_t)
    out = W_o (RMSNorm(y) * silu(x W_g))

``M`` is an MLP of ``memory_depth`` bias-free layers (hidden width ``memory_expansion *
d_h``, SiLU between layers) whose initial weights ``M_0`` are parameters of the layer.
``conv_*`` are depthwise causal convolutions of width ``conv_size`` (Titans section 4.4:
SiLU q/k/v, l2-normalised q/k, short depthwise convolutions, output normalisation and
gating). ``w = omega_window`` (1 = Titans, > 1 = ATLAS's sliding-window Omega rule with unit
weights). ``M_{t'}`` is the memory at the start of ``t``'s chunk of ``chunk_size`` tokens
(mini-batch gradient descent, Titans section 3.2; ``chunk_size = 1`` is exact per-token
descent). The recurrence is :func:`ssmjax.scan.memory.neural_memory`; its state carries the
partial chunk, so any split of a sequence (and ``step``) continues exactly.

Parameters (``K = conv_size``, ``e = memory_expansion``, ``H = num_heads``):
``5 d^2 + 3 K d + 3 (d H + H) + d + H * sum_l d_l d_{l+1}`` with memory widths
``d_0 = d_h, d_1 .. d_{L-1} = e d_h, d_L = d_h``: for ``memory_depth = 2``
``5 d^2 + 3 K d + 3 d H + 3 H + d + 2 e d d_h`` (``memory_depth = 1``: ``... + d d_h``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float

from ssmjax.layers.common import StepByCall, l2_normalize
from ssmjax.layers.registry import register
from ssmjax.scan.conv import causal_conv1d
from ssmjax.scan.memory import init_neural_memory_state, neural_memory


@register("titans")
class Titans(StepByCall):
    """Titans / ATLAS long-term memory layer (module docstring)."""

    d_model: int
    num_heads: int = 4
    memory_depth: int = 2
    memory_expansion: int = 2
    chunk_size: int = 16
    omega_window: int = 1
    conv_size: int = 4
    max_lr: float = 0.1
    dtype: Any = None  # computation dtype; None: the input's (promoted with the params')
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads: must divide d_model = {self.d_model}, got {self.num_heads}")
        if self.memory_depth < 1:
            raise ValueError(f"memory_depth: expected >= 1, got {self.memory_depth}")
        d = self.d_model
        dense = lambda n, bias=False, **kw: nn.Dense(  # noqa: E731
            n, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, **kw)
        self.q_proj, self.k_proj, self.v_proj = dense(d), dense(d), dense(d)
        conv_init = nn.initializers.lecun_normal(in_axis=0, out_axis=1)
        self.conv_q, self.conv_k, self.conv_v = (
            self.param(f"conv_{n}", conv_init, (self.conv_size, d), self.param_dtype) for n in "qkv")
        self.lr_proj = dense(self.num_heads, True)
        self.momentum_proj = dense(self.num_heads, True)
        # Forgetting starts small: alpha = sigmoid(-4) ~ 0.018 per token.
        self.decay_proj = dense(self.num_heads, True, bias_init=nn.initializers.constant(-4.0))
        self.memory_init = tuple(
            self.param(f"memory_{i}", nn.initializers.lecun_normal(in_axis=1, out_axis=2),
                       (self.num_heads, a, b), self.param_dtype)
            for i, (a, b) in enumerate(zip(self._widths(), self._widths()[1:])))
        self.gate_proj = dense(d)
        self.norm = nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype)
        self.out_proj = dense(d)

    def _widths(self) -> list[int]:
        head = self.d_model // self.num_heads
        return [head] + [self.memory_expansion * head] * (self.memory_depth - 1) + [head]

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        widths = self._widths()
        real = jnp.promote_types(jnp.float32, dtype)  # the memory accumulates in >= float32
        shapes = tuple(jax.ShapeDtypeStruct((self.num_heads, a, b), real) for a, b in zip(widths, widths[1:]))
        conv = jnp.zeros((batch_size, self.conv_size - 1, self.d_model), dtype)
        return dict(conv_q=conv, conv_k=conv, conv_v=conv,
                    memory=init_neural_memory_state(shapes, batch_size, self.omega_window, real))

    def __call__(self, x: Float[Array, "b t d"], *, state: dict | None = None, return_state: bool = False):
        batch, time, _ = x.shape
        heads = lambda z: z.reshape(batch, time, self.num_heads, -1)  # noqa: E731
        conv_state = (lambda n: None) if state is None else (lambda n: state[f"conv_{n}"])  # noqa: E731
        q, conv_q = causal_conv1d(self.q_proj(x), self.conv_q, initial_state=conv_state("q"))
        k, conv_k = causal_conv1d(self.k_proj(x), self.conv_k, initial_state=conv_state("k"))
        v, conv_v = causal_conv1d(self.v_proj(x), self.conv_v, initial_state=conv_state("v"))
        q, k, v = heads(l2_normalize(nn.silu(q))), heads(l2_normalize(nn.silu(k))), heads(nn.silu(v))
        lr = self.max_lr * nn.sigmoid(self.lr_proj(x))
        momentum = nn.sigmoid(self.momentum_proj(x))
        decay = nn.sigmoid(self.decay_proj(x))
        y, memory = neural_memory(
            self.memory_init, q, k, v, lr, momentum, decay,
            chunk_size=self.chunk_size, omega_window=self.omega_window,
            initial_state=None if state is None else state["memory"])
        o = self.norm(y.reshape(batch, time, self.d_model)) * nn.silu(self.gate_proj(x))
        out = self.out_proj(o)
        if not return_state:
            return out
        return out, dict(conv_q=conv_q, conv_k=conv_k, conv_v=conv_v, memory=memory)
