"""The residual backbone every experiment uses: embeddings or an input projection, a stack
of pre-norm blocks whose mixers come from a pattern of registry names, and a head.

    block(x) = x + mixer(norm(x));  x = x + mlp(norm(x))       (mlp optional)

* ``mixers``: ``"gated_deltanet*3,attention"`` (registry names, ``*n`` repeats). The
  pattern sets the depth when ``n_layers`` is not given (``None``): it is repeated the
  fewest times that give at least ``DEFAULT_MIN_LAYERS`` (2) layers, so
  ``"gated_deltanet*3,attention"`` is 4 layers and ``"mamba"`` 2; a given ``n_layers`` must
  be a multiple of the pattern length and tiles it (:func:`model_depth`).
  :func:`hybrid_pattern` builds the "linear : full" ratio patterns of "A Systematic
  Analysis of Hybrid Linear Attention" (e.g. ``hybrid_pattern("gla", linear_to_full=3)``
  == ``"gla*3,attention"``).
* ``mlp``: ``"gated"`` (SwiGLU, Shazeer 2020), ``"none"``, or ``"moe"`` (top-k routed
  SwiGLU experts as in Jamba, Lieber et al. 2024; experts are evaluated densely and
  mixed with the renormalised top-k router weights, which is exact and fine at CPU
  sizes; load-balancing loss exposed via ``sow('intermediates', 'moe_balance')``), or an
  activation ``"relu"``, ``"gelu"``, ``"silu"``, ``"dra"``: the plain FFN
  ``W_2 act(W_1 x + b_1) + b_2`` (:mod:`ssmjax.models.activations`; ``"dra"``: the Dynamic
  Range Activator of Hashemi et al., 2025).
* ``head``: ``"lm"`` (next-token logits, ``tie_embeddings`` optional), ``"classify"``
  (pooled ``mean``/``last`` -> ``num_classes``), ``"pool"`` (the pooled features
  ``[b, d_model]``, for a two-tower model), ``"regress"`` (per-step ``output_dim``). With
  ``pad_id`` set (token inputs), pooling skips padding: the mean is over the tokens that are
  not ``pad_id`` and ``last`` takes the last such token (LRA's padded sequences).
* ``bidirectional``: every mixer sees the whole sequence, for non-causal tasks (LRA,
  images). A layer with its own ``bidirectional`` option (S4, S4D, S5, LRU, attention, ...)
  uses it; any other (causal) mixer gets a second copy run over the reversed sequence, and
  the two outputs are summed, ``y = f(x) + flip(g(flip(x)))`` (the bidirectional Mamba of
  Zhu et al., 2024, "Vision Mamba", without its gate). No recurrent state or ``step``.
* ``dropout``: residual dropout on each mixer's and MLP's output (Srivastava et al., 2014),
  active only when the call is given a ``"dropout"`` rng (the training step passes one;
  evaluation and decoding do not), so one module serves training and evaluation.
* :meth:`SequenceModel.ssm_parameter_mask`: which parameters are the mixers' SSM
  parameters (:func:`ssmjax.layers.ssm_parameter_names`), for the S4/S5/LRU optimizer
  recipe (own learning rate, no weight decay).
* ``layer_scan``: the pattern group is one ``nn.scan`` body applied ``n_layers / len(group)``
  times, so compile time stays flat in depth.

The recurrent state of the model is the list of the mixers' states (stacked along a
leading axis per pattern position when ``layer_scan``); ``step`` decodes one token.

Transformer-XL segment recurrence (Dai et al., 2019, "Transformer-XL: Attentive Language
Models Beyond a Fixed-Length Context"), off unless ``memory_len > 0``:
``SequenceModel.segment_forward(inputs, memory)`` runs one segment; every block's mixer
sees the cached inputs of that block from the previous segment(s) (at most
``memory_len`` positions, no gradient) in front of the segment, and the call returns the
new memory (the last ``memory_len`` block inputs). Works with any mixer (the memory is
context, not a mixer state; attention's RoPE keeps relative positions).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

import ssmjax.layers
from ssmjax.models.activations import ACTIVATIONS, FeedForward

_PATTERN_ITEM = re.compile(r"^([a-z0-9_]+)(?:\*([1-9][0-9]*))?$")


#: Depth of a model whose ``n_layers`` is not given and whose pattern is shorter.
DEFAULT_MIN_LAYERS = 2


def pattern_group(pattern: str) -> tuple[str, ...]:
    """One repetition of a pattern: ``"gla*3,attention"`` -> ``("gla", "gla", "gla", "attention")``."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"mixers: expected a pattern like 'gla*3,attention', got {pattern!r}")
    group = []
    for item in pattern.replace(" ", "").split(","):
        match = _PATTERN_ITEM.match(item)
        if not match:
            raise ValueError(f"mixers: malformed item {item!r} in {pattern!r}; expected 'name' or 'name*count'")
        name, count = match.group(1), int(match.group(2) or 1)
        if name not in ssmjax.layers.names():
            raise ValueError(f"mixers: unknown layer {name!r} in {pattern!r}; registered: {ssmjax.layers.names()}")
        group += [name] * count
    return tuple(group)


def model_depth(pattern: str, n_layers: int | None = None) -> int:
    """The number of layers of a model built from ``pattern``.

    ``n_layers=None``: the pattern sets the depth, ``len(group) * ceil(DEFAULT_MIN_LAYERS /
    len(group))`` (one copy of a pattern of two or more layers; two layers of a single
    name). Otherwise ``n_layers`` itself, which must be a positive multiple of the
    pattern length (the pattern is tiled ``n_layers / len(group)`` times).
    """
    size = len(pattern_group(pattern))
    if n_layers is None:
        return size * -(-DEFAULT_MIN_LAYERS // size)
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1 or n_layers % size:
        raise ValueError(
            f"n_layers: {n_layers!r} is not a multiple of the pattern length {size} of {pattern!r}; give a multiple "
            f"of {size} (e.g. {size} or {2 * size}) to tile the pattern, or leave n_layers unset (None) and the "
            f"pattern sets the depth ({model_depth(pattern)} layers)")
    return n_layers


def parse_mixers(pattern: str, n_layers: int | None = None) -> tuple[str, ...]:
    """The mixer of every layer: ``pattern`` tiled to :func:`model_depth` ``(pattern, n_layers)``
    layers, e.g. ``("gla", "gla", "gla", "attention")`` for ``"gla*3,attention"``."""
    group = pattern_group(pattern)
    return group * (model_depth(pattern, n_layers) // len(group))


def hybrid_pattern(linear: str, linear_to_full: int, full: str = "attention") -> str:
    """``linear_to_full`` linear-recurrent layers per full-attention layer."""
    if linear_to_full < 0:
        raise ValueError(f"linear_to_full: expected >= 0, got {linear_to_full}")
    return f"{linear}*{linear_to_full},{full}" if linear_to_full else full


class SwiGLU(nn.Module):
    d_model: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        gate, up = jnp.split(nn.Dense(2 * self.hidden, use_bias=False, name="in_proj")(x), 2, -1)
        return nn.Dense(self.d_model, use_bias=False, name="out_proj")(nn.silu(gate) * up)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (dense evaluation; see module docstring)."""

    d_model: int
    hidden: int
    num_experts: int = 8
    top_k: int = 2

    @nn.compact
    def __call__(self, x):
        logits = nn.Dense(self.num_experts, use_bias=False, name="router")(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
        top_p, top_i = jax.lax.top_k(probs, self.top_k)
        weights = jnp.sum(jax.nn.one_hot(top_i, self.num_experts) * (top_p / top_p.sum(-1, keepdims=True))[..., None], -2)
        experts = nn.vmap(SwiGLU, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=None, out_axes=-2, axis_size=self.num_experts)(self.d_model, self.hidden, name="experts")
        y = jnp.einsum("...e,...ed->...d", weights.astype(x.dtype), experts(x))
        # Switch-Transformer balance loss: num_experts * sum_e (token fraction_e * mean prob_e).
        fraction = jnp.mean(jax.nn.one_hot(top_i[..., 0], self.num_experts), axis=tuple(range(x.ndim - 1)))
        self.sow("intermediates", "moe_balance", self.num_experts * jnp.sum(fraction * probs.mean(tuple(range(x.ndim - 1)))))
        return y


def _norm(kind: str, name: str) -> nn.Module:
    if kind == "rms":
        return nn.RMSNorm(name=name)
    if kind == "layer":
        return nn.LayerNorm(name=name)
    raise ValueError(f"norm: expected 'rms' or 'layer', got {kind!r}")


class Block(nn.Module):
    """Pre-norm residual block: mixer, then the optional MLP."""

    mixer: str
    d_model: int
    mixer_fields: Mapping[str, Mapping]
    mlp: str = "gated"
    mlp_ratio: float = 4.0
    moe_experts: int = 8
    moe_top_k: int = 2
    norm: str = "rms"
    dropout: float = 0.0  # residual dropout, active when a "dropout" rng is given
    bidirectional: bool = False  # see the module docstring
    memory_len: int = 0  # Transformer-XL segment memory (forward_with_memory)

    def setup(self):
        self.mixer_norm = _norm(self.norm, "mixer_norm")
        self.drop = nn.Dropout(self.dropout)
        fields = dict(d_model=self.d_model, **dict(self.mixer_fields.get(self.mixer, {})))
        own_option = "bidirectional" in {f.name for f in dataclasses.fields(ssmjax.layers.layer_class(self.mixer))}
        if self.bidirectional and own_option:
            fields["bidirectional"] = True
        self.mixer_layer = ssmjax.layers.get(self.mixer, **fields)
        self.reverse_layer = (ssmjax.layers.get(self.mixer, **fields) if self.bidirectional and not own_option
                              else None)
        hidden = int(self.mlp_ratio * self.d_model)
        if self.mlp == "gated":
            self.mlp_layer = SwiGLU(self.d_model, hidden)
        elif self.mlp == "moe":
            self.mlp_layer = MoE(self.d_model, hidden, self.moe_experts, self.moe_top_k)
        elif self.mlp in ACTIVATIONS:
            self.mlp_layer = FeedForward(self.d_model, hidden, self.mlp)
        elif self.mlp != "none":
            raise ValueError(f"mlp: expected 'gated', 'moe', 'none' or an activation {ACTIVATIONS}, got {self.mlp!r}")
        if self.mlp != "none":
            self.mlp_norm = _norm(self.norm, "mlp_norm")

    def _dropped(self, y):
        return self.drop(y, deterministic=self.dropout == 0 or not self.has_rng("dropout"))

    def _mlp(self, x):
        return x if self.mlp == "none" else x + self._dropped(self.mlp_layer(self.mlp_norm(x)))

    def _causal_only(self):
        if self.bidirectional:
            raise ValueError("bidirectional: a bidirectional model is non-causal and has no recurrent state")

    def __call__(self, x, state=None):
        self._causal_only()
        y, state = self.mixer_layer(self.mixer_norm(x), state=state, return_state=True)
        return self._mlp(x + self._dropped(y)), state

    def _mix(self, x):
        y = self.mixer_layer(x)
        if self.reverse_layer is not None:
            y = y + jnp.flip(self.reverse_layer(jnp.flip(x, -2)), -2)
        return y

    def forward(self, x):  # no state: lets mixers use their fastest stateless path
        return self._mlp(x + self._dropped(self._mix(self.mixer_norm(x))))

    def step(self, x_t, state):
        self._causal_only()
        y, state = self.mixer_layer.step(self.mixer_norm(x_t), state)
        return self._mlp(x_t + self._dropped(y)), state

    def forward_with_memory(self, x, memory):
        """Segment recurrence: the mixer runs over ``[stop_grad(memory), x]`` (memory: this
        block's inputs from earlier segments); returns the output on ``x`` and the new
        memory, the last ``memory_len`` block inputs."""
        self._causal_only()
        context = jnp.concatenate([jax.lax.stop_gradient(memory).astype(x.dtype), x], axis=1)
        y = self.mixer_layer(self.mixer_norm(context))[:, memory.shape[1]:]
        return self._mlp(x + y), context[:, max(0, context.shape[1] - self.memory_len):]

    def init_state(self, batch_size, dtype=jnp.float32):
        return self.mixer_layer.init_state(batch_size, dtype)


class Group(nn.Module):
    """One repetition of the mixer pattern (the ``nn.scan`` body when ``layer_scan``)."""

    mixers: tuple[str, ...]
    block_fields: Mapping

    def setup(self):
        self.blocks = [Block(m, **self.block_fields, name=f"block_{i}") for i, m in enumerate(self.mixers)]

    def __call__(self, x, states):
        if states is None:
            return self._forward(x), None
        new = []
        for block, s in zip(self.blocks, states):
            x, s = block(x, s)
            new.append(s)
        return x, new

    def _forward(self, x):
        for block in self.blocks:
            x = block.forward(x)
        return x

    def step(self, x_t, states):
        new = []
        for block, s in zip(self.blocks, states):
            x_t, s = block.step(x_t, s)
            new.append(s)
        return x_t, new

    def forward_with_memory(self, x, memories):
        new = []
        for block, m in zip(self.blocks, memories):
            x, m = block.forward_with_memory(x, m)
            new.append(m)
        return x, new

    def init_state(self, batch_size, dtype=jnp.float32):
        return [b.init_state(batch_size, dtype) for b in self.blocks]


class SequenceModel(nn.Module):
    """Backbone + head (see the module docstring). Inputs: int tokens ``[b, t]`` when
    ``vocab_size`` is set, else features ``[b, t, input_dim]``."""

    d_model: int = 64
    n_layers: int | None = None  # None: the pattern sets the depth (see model_depth)
    mixers: str = "attention"
    mixer_fields: Mapping[str, Mapping] | None = None  # per mixer name: extra layer fields
    mlp: str = "gated"
    mlp_ratio: float = 4.0
    moe_experts: int = 8
    moe_top_k: int = 2
    norm: str = "rms"
    layer_scan: bool = False
    vocab_size: int | None = None
    head: str = "lm"
    tie_embeddings: bool = False
    num_classes: int | None = None
    output_dim: int | None = None
    pooling: str = "mean"
    pad_id: int | None = None  # token inputs: pooling skips this id (module docstring)
    dropout: float = 0.0  # residual dropout (module docstring)
    bidirectional: bool = False  # non-causal mixers (module docstring)
    memory_len: int = 0  # > 0: Transformer-XL segment recurrence via segment_forward (module docstring)

    def setup(self):
        pattern = pattern_group(self.mixers)
        self.n_groups = model_depth(self.mixers, self.n_layers) // len(pattern)
        block_fields = dict(d_model=self.d_model, mixer_fields=dict(self.mixer_fields or {}), mlp=self.mlp,
                            mlp_ratio=self.mlp_ratio, moe_experts=self.moe_experts, moe_top_k=self.moe_top_k, norm=self.norm,
                            dropout=self.dropout, bidirectional=self.bidirectional)
        if self.memory_len > 0:
            block_fields["memory_len"] = self.memory_len
        if self.vocab_size is not None:
            self.embed = nn.Embed(self.vocab_size, self.d_model)
        else:
            self.input_proj = nn.Dense(self.d_model)
        if self.layer_scan:
            self.groups = nn.scan(
                Group, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                in_axes=0, out_axes=0, length=self.n_groups, methods=["__call__", "step", "forward_with_memory"],
            )(pattern, block_fields)
        else:
            self.groups = [Group(pattern, block_fields, name=f"group_{i}") for i in range(self.n_groups)]
        self.final_norm = _norm(self.norm, "final_norm")
        if self.head == "lm":
            if self.vocab_size is None:
                raise ValueError("vocab_size: required for head='lm'")
            if not self.tie_embeddings:
                self.lm_head = nn.Dense(self.vocab_size, use_bias=False)
        elif self.head in ("classify", "pool"):
            if self.pooling not in ("mean", "last"):
                raise ValueError(f"pooling: expected 'mean' or 'last', got {self.pooling!r}")
            if self.pad_id is not None and self.vocab_size is None:
                raise ValueError("pad_id: only token inputs (vocab_size set) have a padding id")
            if self.head == "classify":
                if not self.num_classes:
                    raise ValueError("num_classes: required for head='classify'")
                self.class_head = nn.Dense(self.num_classes)
        elif self.head == "regress":
            if not self.output_dim:
                raise ValueError("output_dim: required for head='regress'")
            self.regress_head = nn.Dense(self.output_dim)
        else:
            raise ValueError(f"head: expected 'lm', 'classify', 'pool' or 'regress', got {self.head!r}")

    def _inputs(self, inputs):
        return self.embed(inputs) if self.vocab_size is not None else self.input_proj(inputs)

    def _outputs(self, h, inputs=None):
        h = self.final_norm(h)
        if self.head == "lm":
            return self.embed.attend(h) if self.tie_embeddings else self.lm_head(h)
        if self.head == "regress":
            return self.regress_head(h)
        pooled = self._pool(h, inputs)
        return pooled if self.head == "pool" else self.class_head(pooled)

    def _pool(self, h: Array, inputs: Array | None) -> Array:
        """``[b, t, d] -> [b, d]``: mean or last over the tokens that are not padding."""
        if self.pad_id is None or inputs is None:
            return h.mean(-2) if self.pooling == "mean" else h[..., -1, :]
        keep = inputs != self.pad_id  # [b, t]
        if self.pooling == "mean":
            weights = keep.astype(h.dtype)[..., None]
            return jnp.sum(h * weights, -2) / jnp.maximum(jnp.sum(weights, -2), 1)
        last = jnp.maximum(jnp.max(jnp.where(keep, jnp.arange(keep.shape[-1]), -1), -1), 0)
        return jnp.take_along_axis(h, last[:, None, None], -2)[:, 0]

    def __call__(self, inputs: Array, *, state=None, return_state: bool = False):
        h = self._inputs(inputs)
        if state is None and not return_state:
            if self.layer_scan:
                h, _ = self.groups(h, None)
            else:
                for group in self.groups:
                    h, _ = group(h, None)
            return self._outputs(h, inputs)
        if state is None:
            state = self.init_state(h.shape[0], h.dtype)
        if self.layer_scan:
            h, state = self.groups(h, state)
        else:
            new = []
            for group, s in zip(self.groups, state):
                h, s = group(h, s)
                new.append(s)
            state = new
        out = self._outputs(h, inputs)
        return (out, state) if return_state else out

    def step(self, inputs_t: Array, state):
        if self.head in ("classify", "pool"):
            raise ValueError(f"head: {self.head!r} pools over the whole sequence and has no step form")
        h = self._inputs(inputs_t)
        if self.layer_scan:
            h, state = self.groups.step(h, state)
        else:
            new = []
            for group, s in zip(self.groups, state):
                h, s = group.step(h, s)
                new.append(s)
            state = new
        return self._outputs(h), state

    def segment_forward(self, inputs: Array, memory=None):
        """One segment with Transformer-XL memory (module docstring): ``(outputs, new_memory)``.

        ``memory``: what the previous call returned (``None`` for the first segment): one
        ``[b, m, d_model]`` array per block (stacked ``[n_groups, b, m, d_model]`` per
        pattern position when ``layer_scan``), ``m <= memory_len``.
        """
        if self.memory_len <= 0:
            raise ValueError(f"memory_len: segment recurrence needs memory_len > 0, got {self.memory_len}")
        h = self._inputs(inputs)
        if memory is None:  # empty memories: the first segment sees no earlier context
            pattern = pattern_group(self.mixers)
            lead = (self.n_groups,) if self.layer_scan else ()
            empty = [jnp.zeros(lead + (h.shape[0], 0, self.d_model), h.dtype) for _ in pattern]
            memory = empty if self.layer_scan else [list(empty) for _ in range(self.n_groups)]
        if self.layer_scan:
            h, memory = self.groups.forward_with_memory(h, memory)
        else:
            new = []
            for group, m in zip(self.groups, memory):
                h, m = group.forward_with_memory(h, m)
                new.append(m)
            memory = new
        return self._outputs(h), memory

    def ssm_parameter_mask(self, params):
        """``params`` -> the same tree of bools: ``True`` at the SSM parameters of every
        block's mixer (its registered class's ``SSM_PARAMETERS``, looked up by the block's
        place in the pattern). Needs no binding: ``model.ssm_parameter_mask(params)``."""
        pattern = pattern_group(self.mixers)

        def is_ssm(path, _) -> bool:
            keys = [str(getattr(k, "key", k)) for k in path]
            blocks = [i for i, k in enumerate(keys) if k.startswith("block_")]
            if not blocks or "mixer_layer" not in keys[blocks[-1]:]:
                return False
            mixer = pattern[int(keys[blocks[-1]].removeprefix("block_"))]
            return keys[-1] in ssmjax.layers.ssm_parameter_names(mixer)

        return jax.tree_util.tree_map_with_path(is_ssm, params)

    def init_state(self, batch_size: int, dtype=jnp.float32):
        pattern = pattern_group(self.mixers)
        if self.layer_scan:  # mixer states depend on fields only: build one group's unbound
            one = Group(pattern, self.groups.block_fields, parent=None).apply({}, batch_size, dtype, method="init_state")
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.n_groups,) + x.shape), one)
        return [g.init_state(batch_size, dtype) for g in self.groups]


def sample_logits(logits: Array, key: Array, temperature: float = 0.0, top_k: int | None = None) -> Array:
    """Greedy when ``temperature == 0``, else softmax sampling, optionally from the top k."""
    if temperature == 0.0:
        return jnp.argmax(logits, -1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, -1)


def generate(model: SequenceModel, params, prompt: Array, steps: int, key: Array,
             temperature: float = 0.0, top_k: int | None = None) -> tuple[Array, Array]:
    """Run ``prompt`` ``[b, t]`` in parallel form, then decode ``steps`` tokens with ``step``.

    Returns ``(tokens [b, steps], logits [b, steps, vocab])``: ``logits[:, i]`` is the
    distribution the i-th generated token was drawn from (equal to the full forward
    pass's logits at that position).
    """
    logits, state = model.apply(params, prompt, return_state=True)

    def decode(carry, key):
        last_logits, state = carry
        token = sample_logits(last_logits, key, temperature, top_k)
        next_logits, state = model.apply(params, token, state, method="step")
        return (next_logits, state), (token, last_logits)

    _, (tokens, used) = jax.lax.scan(decode, (logits[:, -1], state), jax.random.split(key, steps))
    return jnp.swapaxes(tokens, 0, 1), jnp.swapaxes(used, 0, 1)
