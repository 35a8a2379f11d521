"""LMUFormer (``"lmuformer"``) and spiking LMUFormer (``"lmuformer_spiking"``): the
Legendre Memory Unit with a convolutional patch embedding and a convolutional channel
mixer, optionally with leaky integrate-and-fire neurons.

LMUFormer (Liu, Datta, Li and Beerel, 2024, "LMUFormer: Low Complexity Yet Powerful
Spiking Model With Legendre Memory Units", ICLR) keeps the LMU's sequential processing
(parallel training through the LTI memory, constant-cost streaming inference) and adds a
patch embedding of small 1-D convolutions and a channel mixer of 1x1 convolutions. As one
causal mixer, with ``x [b, t, d]`` and ``f`` the activation (ReLU, or LIF spikes)::

    e_t   = f(W_p dwconv_K(x)_t + b_p)              patch embedding: causal depthwise conv of
                                                    K taps (kernel 3 in the paper) + pointwise
    u_t   = f(W_u e_t + b_u)                        LMU input [d_u]
    m_t   = Abar m_{t-1} + Bbar u_t                 LegT memory, order q, window theta
    o_t   = f(W_h [m_t; e_t] + b_h)
    h_t   = e_t + W_o o_t + b_o                     token mixer with its residual
    y_t   = h_t + W_2 f(W_1 h_t + b_1) + b_2        channel mixer (1x1 convs, width r d)

The LegT memory is the LMU's (:mod:`ssmjax.layers.hippo`: ``Abar, Bbar``, the impulse
response and :func:`~ssmjax.layers.hippo.legendre_memory_sequence`, FFT convolution or
:func:`ssmjax.scan.matrix_scan`), the conv :func:`ssmjax.scan.conv.causal_conv1d`.

Spiking (``spiking=True``): every ``f`` is a layer of LIF neurons along the token axis
(:func:`ssmjax.scan.lif.lif_neuron`: ``u_t = beta v_{t-1} + I_t``, ``s_t = H(u_t -
threshold)``, hard reset, arctan surrogate gradient), each with its membrane in the state,
so the patch embedding and the channel mixer also carry state, as in the paper's spiking
model. The paper's BatchNorm after every convolution (folded into the weights at
inference) is left out: the backbone normalises between layers, and a batch statistic has
no causal step form. The paper's stack of several patch-embedding convolutions is one here
(a mixer is applied per layer).

:func:`operation_count` counts the work per sequence: multiply-accumulates (MACs) of a real
input, and synaptic accumulates (ACs = spikes x fan-out) of a spiking one, for this layer
and (:func:`transformer_operation_count`) for a transformer layer of equal width.

State: ``conv [b, K - 1, d]`` (the last inputs), ``m [b, d_u, q]``, and with spiking the
membranes ``v_embed [b, d]``, ``v_u [b, d_u]``, ``v_o [b, d]``, ``v_mlp [b, r d]``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssmjax.checks import check_choice, check_positive_int
from ssmjax.layers.common import StepByCall, check_layer_input, output_dropout, short_conv_params, state_float
from ssmjax.layers.hippo import LEGENDRE_METHODS, legendre_memory_sequence
from ssmjax.layers.registry import register
from ssmjax.scan.conv import causal_conv1d
from ssmjax.scan.lif import SURROGATES, lif_neuron

#: Energy per operation at 45 nm, 32-bit float (Horowitz, 2014, "Computing's energy
#: problem"), the constants spiking-network papers, LMUFormer's included, use.
ENERGY_PJ = dict(mac=4.6, ac=0.9)


def linear_operations(tokens: int, fan_in: int, fan_out: int, spike_rate: float | None = None) -> dict:
    """Operations of a dense map over ``tokens`` inputs: ``tokens fan_in fan_out`` MACs for
    a real input; ``spike_rate tokens fan_in fan_out`` ACs (each spike is added to its
    ``fan_out`` targets) for a spiking input firing at ``spike_rate``."""
    ops = tokens * fan_in * fan_out
    if spike_rate is None:
        return dict(mac=ops, ac=0)
    return dict(mac=0, ac=spike_rate * ops)


def _total(parts: dict) -> dict:
    mac = sum(p["mac"] for p in parts.values())
    ac = sum(p["ac"] for p in parts.values())
    return dict(mac=mac, ac=ac, energy_pj=ENERGY_PJ["mac"] * mac + ENERGY_PJ["ac"] * ac, parts=parts)


def operation_count(
    d_model: int,
    seq_len: int,
    *,
    order: int | None = None,
    memory_dim: int = 1,
    mlp_ratio: int = 4,
    conv_width: int = 3,
    spike_rates: dict | None = None,
) -> dict:
    """Operations of one LMUFormer mixer over ``seq_len`` tokens (biases, activations and
    the residual additions not counted), by the equations of the module docstring::

        embed_conv  T K d                 (depthwise conv of the real input: MACs)
        embed_proj  T d d                 (W_p, input: the conv output, real)
        W_u         T d d_u               (input e: spikes when spiking)
        memory      T d_u (q q + q)       (Abar m (real) + Bbar u (u: spikes when spiking))
        W_h         T (d_u q + d) d       (m real; e spikes when spiking)
        W_o         T d d                 (input o: spikes when spiking)
        mlp_in      T d r d               (input h = e + W_o o: real)
        mlp_out     T r d d               (input: spikes when spiking)

    ``spike_rates=None``: the non-spiking model, all MACs. Otherwise a dict of firing
    rates (spikes per neuron per token) ``{"embed", "u", "o", "mlp"}`` (the spiking layer
    sows them as ``('intermediates', 'spike_rate_<name>')``): the maps whose
    input is that layer's spikes count ``rate x fan_in x fan_out`` ACs per token.
    Returns ``{"mac", "ac", "energy_pj", "parts"}`` (:data:`ENERGY_PJ`).
    """
    d, T, q, du, K = d_model, seq_len, order or d_model, memory_dim, conv_width
    r = (spike_rates or {}).get
    spiking = spike_rates is not None
    parts = dict(
        embed_conv=dict(mac=T * K * d, ac=0),
        embed_proj=linear_operations(T, d, d),
        W_u=linear_operations(T, d, du, r("embed") if spiking else None),
        memory_state=linear_operations(T * du, q, q),
        memory_input=linear_operations(T * du, 1, q, r("u") if spiking else None),
        W_h_memory=linear_operations(T, du * q, d),
        W_h_embed=linear_operations(T, d, d, r("embed") if spiking else None),
        W_o=linear_operations(T, d, d, r("o") if spiking else None),
        mlp_in=linear_operations(T, d, mlp_ratio * d),
        mlp_out=linear_operations(T, mlp_ratio * d, d, r("mlp") if spiking else None),
    )
    return _total(parts)


def transformer_operation_count(d_model: int, seq_len: int, *, mlp_ratio: int = 4, causal: bool = True) -> dict:
    """MACs of one transformer layer of width ``d`` over ``T`` tokens (softmax, norms and
    biases not counted)::

        qkv        3 T d d
        scores     P d          P = T (T + 1) / 2 query-key pairs if causal, else T T
        mix        P d          (attention weights x values)
        out_proj   T d d
        mlp        2 T r d d
    """
    d, T = d_model, seq_len
    pairs = T * (T + 1) // 2 if causal else T * T
    parts = dict(
        qkv=linear_operations(T, d, 3 * d),
        scores=dict(mac=pairs * d, ac=0),
        mix=dict(mac=pairs * d, ac=0),
        out_proj=linear_operations(T, d, d),
        mlp=linear_operations(T, d, 2 * mlp_ratio * d),
    )
    return _total(parts)


@register("lmuformer")
class LMUFormer(StepByCall):
    """One LMUFormer block as a causal mixer (module docstring)."""

    d_model: int
    order: int | None = None  # q; default d_model (LMUFormer's memory_size = dim)
    theta: float = 128.0
    memory_dim: int = 1
    conv_width: int = 3
    mlp_ratio: int = 4
    spiking: bool = False
    beta: float = 0.5  # LIF leak (tau = 2)
    threshold: float = 1.0
    surrogate: str = "arctan"
    surrogate_alpha: float = 2.0
    method: str = "fft"
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def q(self) -> int:
        return self.order or self.d_model

    def setup(self):
        check_choice("method", self.method, LEGENDRE_METHODS)
        check_choice("surrogate", self.surrogate, SURROGATES)
        check_positive_int("conv_width", self.conv_width)
        check_positive_int("mlp_ratio", self.mlp_ratio)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        self.conv_w, self.conv_b = short_conv_params(self, self.conv_width, self.d_model, bias=True)
        self.W_p = dense(self.d_model, name="W_p")
        self.W_u = dense(self.memory_dim, name="W_u")
        self.W_h = dense(self.d_model, name="W_h")
        self.W_o = dense(self.d_model, name="W_o")
        self.W_1 = dense(self.mlp_ratio * self.d_model, name="W_1")
        self.W_2 = dense(self.d_model, name="W_2")

    def neuron_sizes(self) -> dict:
        """The LIF layers of the spiking model and their widths."""
        d = self.d_model
        return dict(v_embed=d, v_u=self.memory_dim, v_o=d, v_mlp=self.mlp_ratio * d)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        sd = state_float(dtype)
        state = dict(
            conv=jnp.zeros((batch_size, self.conv_width - 1, self.d_model), sd),
            m=jnp.zeros((batch_size, self.memory_dim, self.q), sd),
        )
        if self.spiking:
            state.update({k: jnp.zeros((batch_size, n), sd) for k, n in self.neuron_sizes().items()})
        return state

    def __call__(self, x, *, state=None, return_state=False):
        x = jnp.asarray(x)
        check_layer_input(x, self.d_model)
        batch, time, _ = x.shape
        dtype = self.dtype or x.dtype
        fresh = state is None
        if fresh:
            state = self.init_state(batch, dtype)
        new_state = {}

        def act(name, pre):
            if not self.spiking:
                return jax.nn.relu(pre)
            s, new_state[name] = lif_neuron(
                pre, beta=self.beta, threshold=self.threshold, initial_state=state[name],
                surrogate=self.surrogate, alpha=self.surrogate_alpha,
            )
            self.sow("intermediates", "spike_rate_" + name[2:], jnp.mean(s))
            return s

        xs = x.astype(dtype)
        conv, new_state["conv"] = causal_conv1d(
            xs, jnp.asarray(self.conv_w, dtype), jnp.asarray(self.conv_b, dtype),
            initial_state=state["conv"].astype(dtype),
        )
        new_state["conv"] = new_state["conv"].astype(state["conv"].dtype)
        e = act("v_embed", self.W_p(conv))
        u = act("v_u", self.W_u(e))
        m, new_state["m"] = legendre_memory_sequence(
            u.astype(state_float(u.dtype)), self.q, float(self.theta),
            initial_state=None if fresh else state["m"], method=self.method,
        )
        features = jnp.concatenate([m.reshape(batch, time, -1).astype(e.dtype), e], axis=-1)
        o = act("v_o", self.W_h(features))
        h = e + self.W_o(o)
        y = h + self.W_2(act("v_mlp", self.W_1(h)))
        y = output_dropout(self, y.astype(x.dtype if self.dtype is None else self.dtype))
        return (y, new_state) if return_state else y


@register("lmuformer_spiking")
class SpikingLMUFormer(LMUFormer):
    """Spiking LMUFormer: :class:`LMUFormer` with ``spiking=True`` (LIF neurons)."""

    spiking: bool = True
