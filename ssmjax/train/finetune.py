"""Finetuning a pretrained model: full, partial, LoRA and adapters, for any Flax model
(every registered mixer in :class:`ssmjax.models.SequenceModel`) without editing a layer.

Methods (:data:`METHODS`), after the survey of "Making the Most of your Model: Methods for
Finetuning and Applying Pretrained Transformers":

* ``"full"``: every pretrained parameter trains.
* ``"partial"``: only the pretrained parameters whose path matches one of ``trainable``
  (regular expressions over paths such as ``params/group_0/block_1/mlp_norm/scale``; e.g.
  :data:`HEAD`, :data:`NORMS`, :func:`last_blocks`) train; the rest are frozen.
* ``"lora"`` (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): every
  Dense kernel ``W`` of a module whose path matches ``lora_targets`` (default: the mixers'
  projections, the paper's choice of adapting the attention weights only) is replaced by

      W' = W + (alpha / r) A B,    A [in, r] ~ N(0, 1/r) ("gaussian") or Kaiming-uniform,
                                   B [r, out] = 0,

  ``W`` frozen, only ``A`` and ``B`` (and ``trainable`` matches) train. ``W' = W`` at
  initialisation, and the merged kernel is an ordinary kernel (:meth:`FinetunedModel.merged`),
  so inference costs nothing extra. A ``DenseGeneral`` kernel ``[*in_axes, *out_axes]`` (the
  attention projections ``[d, heads, head_dim]``, ``[heads, head_dim, d]``) is the matrix
  ``[prod(in_axes), prod(out_axes)]``: ``A [*in_axes, r]``, ``B [r, *out_axes]``.
* ``"adapters"`` (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP"):
  after every module whose path matches ``adapter_modules`` (default: each block's mixer
  and MLP, before their residual sums, as in the paper) a bottleneck MLP is added,

      h <- h + W_up gelu(W_down h + b_down) + b_up,    W_down [d, m], W_up [m, d] = 0, b_up = 0,

  so the adapted model equals the pretrained one at initialisation; only the adapters (and
  ``trainable`` matches; the paper also trains the layer norms, :data:`NORMS`) train.

How it works for any model. The finetuned model is a :class:`FinetunedModel`, a small
object with the ``init`` / ``apply`` interface of a Linen module, so
:func:`ssmjax.train.train`, the :class:`~ssmjax.train.Evaluator` and checkpoints use it
unchanged. Its variables are ``{"base": pretrained variables, "lora" | "adapters": new
parameters}``; the pretrained model's own modules are never edited:

* LoRA is a transform of the parameters: the factors sit beside the frozen kernels and are
  merged into them functionally before ``model.apply`` (:func:`merge_lora`); no module
  knows about it. Which parameters are Dense kernels, and where their input axes end, is
  read once from the model itself, by running it under :func:`flax.linen.intercept_methods`
  and recording every ``nn.Dense`` / ``nn.DenseGeneral`` call (:func:`dense_kernels`).
* Adapters are added by module interception: ``apply`` runs the model inside
  :func:`flax.linen.intercept_methods` with an interceptor that passes the output of each
  matched module through its adapter, whose parameters come from ``variables["adapters"]``
  (found by the module's path). Mixers, MLPs and the backbone stay as they are.

Freezing is an optax mask: :meth:`FinetunedModel.trainable_mask` labels every leaf and
:func:`ssmjax.train.make_optimizer` sends the frozen ones through ``optax.set_to_zero``
inside ``optax.multi_transform`` (no optimizer state, no weight decay, bit-identical after
any number of steps); ``apply`` also stops their gradients, so the backward pass skips them.
:func:`parameter_counts` reports trainable / total parameters.

Limitations: kernels stacked by ``nn.scan`` or ``nn.vmap`` (``layer_scan=True`` models, the
MoE experts) are not adapted: a ``layer_scan`` model raises ``ValueError`` (build it with
``layer_scan=False``: the same parameters, unstacked) and stacked Dense kernels elsewhere
are left out of LoRA.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

METHODS = ("full", "partial", "lora", "adapters")
LORA_INITS = ("gaussian", "kaiming")

#: Parameter-path patterns: the output heads of :class:`ssmjax.models.SequenceModel`, and
#: every normalisation (block pre-norms, final norm, a mixer's own output norm).
HEAD = r"(lm_head|class_head|regress_head)/"
NORMS = r"norm"
#: Module-path patterns: LoRA's default targets (the mixers' projections, Hu et al.'s
#: attention-only choice) and the modules followed by an adapter (Houlsby et al.).
LORA_TARGETS = (r"(mixer_layer|reverse_layer)/",)
ADAPTER_MODULES = (r"(^|/)(mixer_layer|reverse_layer|mlp_layer)$",)


def path_name(path: Sequence[Any]) -> str:
    """``(DictKey('params'), DictKey('lm_head'), ...)`` or ``('params', 'lm_head', ...)`` ->
    ``"params/lm_head/..."``."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_patterns(argument: str, patterns: Sequence[str], names: Sequence[str], what: str) -> None:
    """Every pattern compiles and matches at least one of ``names``."""
    for pattern in patterns:
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{argument}: {pattern!r} is not a regular expression ({error})") from None
        if not any(compiled.search(name) for name in names):
            shown = ", ".join(list(names)[:6])
            raise ValueError(f"{argument}: pattern {pattern!r} matches no {what}; they look like {shown}, ...")


def path_mask(tree: Any, patterns: Sequence[str]) -> Any:
    """The tree of bools: ``True`` where a leaf's path (:func:`path_name`) matches one of
    ``patterns`` (``re.search``)."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(lambda path, _: any(c.search(path_name(path)) for c in compiled), tree)


def last_blocks(params: Any, k: int) -> tuple[str, ...]:
    """Patterns selecting the last ``k`` residual blocks of a backbone whose blocks are
    ``group_<i>/block_<j>`` (:class:`ssmjax.models.SequenceModel`), in depth order."""
    names = {m.group(0) for path in traverse_util.flatten_dict(params, sep="/")
             if (m := re.search(r"group_\d+/block_\d+", path))}
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(names):
        raise ValueError(f"k: expected 1 <= k <= {len(names)} (the model's blocks), got {k!r}")
    order = sorted(names, key=lambda n: tuple(int(x) for x in re.findall(r"\d+", n)))
    return tuple(f"{name}/" for name in order[-k:])


def dense_kernels(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
    """``{kernel path: number of input axes}`` of every ``nn.Dense`` / ``nn.DenseGeneral``
    the model calls on ``args`` (found by :func:`flax.linen.intercept_methods` during an
    abstract evaluation; nothing is computed). Kernels stacked by ``nn.scan`` / ``nn.vmap``
    (whose stored shape is not the shape the module sees) are left out."""
    found: dict[str, tuple[int, tuple[int, ...]]] = {}

    def record(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
            kernel = module.variables.get("params", {}).get("kernel")
            if kernel is not None:
                axis = module.axis if isinstance(module, nn.DenseGeneral) else -1
                n_in = len(axis) if isinstance(axis, Sequence) else 1
                found["params/" + "/".join(module.path) + "/kernel"] = (n_in, tuple(kernel.shape))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), variables)
    stored = {path_name(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
    return {path: n_in for path, (n_in, shape) in found.items() if stored.get(path) == shape}


def lora_factors(key: jax.Array, kernel_shape: Sequence[int], n_in: int, rank: int, init: str = "gaussian",
                 dtype=jnp.float32) -> dict[str, jax.Array]:
    """``{"a": A [*in_axes, r], "b": B [r, *out_axes] = 0}`` for a kernel ``[*in_axes,
    *out_axes]`` with ``n_in`` input axes. ``init``: ``"gaussian"`` draws ``A ~ N(0, 1/r)``
    (Hu et al., 2021: "random Gaussian initialization for A and zero for B"); ``"kaiming"``
    draws it Kaiming-uniform over its fan-in ``prod(in_axes)`` with ``a = sqrt(5)``
    (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, the reference implementation's choice)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected an integer >= 1, got {rank!r}")
    if init not in LORA_INITS:
        raise ValueError(f"init: expected one of {LORA_INITS}, got {init!r}")
    in_shape, out_shape = tuple(kernel_shape[:n_in]), tuple(kernel_shape[n_in:])
    if init == "gaussian":
        a = jax.random.normal(key, (*in_shape, rank), dtype) / math.sqrt(rank)
    else:
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(key, (*in_shape, rank), dtype, -bound, bound)
    return dict(a=a, b=jnp.zeros((rank, *out_shape), dtype))


def merge_lora(params: Any, lora: Any, alpha: float) -> Any:
    """``params`` with every kernel that has factors in ``lora`` (the same nesting, ``{"a",
    "b"}`` in place of the kernel) replaced by ``W + (alpha / r) A B`` (``A B`` contracts the
    rank axis: ``tensordot(A, B, 1)``, the shape of ``W``), in ``W``'s dtype."""
    flat = traverse_util.flatten_dict(params)
    for path, factors in traverse_util.flatten_dict(lora, is_leaf=lambda _, v: isinstance(v, dict) and "a" in v).items():
        kernel, a, b = flat[path], factors["a"], factors["b"]
        flat[path] = kernel + ((alpha / a.shape[-1]) * jnp.tensordot(a, b, axes=1)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def adapter_params(key: jax.Array, width: int, bottleneck: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """One Houlsby adapter on ``width`` features: ``down [width, m]`` (LeCun normal),
    ``up [m, width] = 0`` and zero biases, so it starts as the identity."""
    return dict(down=nn.initializers.lecun_normal()(key, (width, bottleneck), dtype),
                down_bias=jnp.zeros((bottleneck,), dtype), up=jnp.zeros((bottleneck, width), dtype),
                up_bias=jnp.zeros((width,), dtype))


def adapter(p: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    """``h + W_up gelu(W_down h + b_down) + b_up`` over the last axis of ``h``."""
    z = jax.nn.gelu(h @ p["down"].astype(h.dtype) + p["down_bias"].astype(h.dtype))
    return h + z @ p["up"].astype(h.dtype) + p["up_bias"].astype(h.dtype)


def adapter_interceptor(adapters: dict[str, dict[str, jax.Array]]):
    """A :func:`flax.linen.intercept_methods` interceptor that passes the output of every
    module whose path (``"group_0/block_1/mixer_layer"``) is a key of ``adapters`` through
    :func:`adapter` (the first element when the output is a tuple, e.g. ``(y, state)``).
    ``__call__`` and ``step`` are adapted once per outermost call (a method that calls
    another method of the same module is not adapted twice)."""
    active: set[str] = set()

    def intercept(next_fun, args, kwargs, context):
        name = "/".join(context.module.path)
        if name not in adapters or context.method_name not in ("__call__", "step") or name in active:
            return next_fun(*args, **kwargs)
        active.add(name)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.discard(name)
        if isinstance(out, tuple):
            return (adapter(adapters[name], out[0]), *out[1:])
        return adapter(adapters[name], out)

    return intercept


def adapted_modules(model: nn.Module, variables: Any, patterns: Sequence[str], *args: Any, **kwargs: Any
                    ) -> dict[str, int]:
    """``{module path: output width}`` of every module whose path matches ``patterns``
    (found by interception during an abstract evaluation on ``args``)."""
    calls: dict[str, int] = {}

    def record(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        if context.method_name == "__call__" and context.module.path:
            first = out[0] if isinstance(out, tuple) else out
            if hasattr(first, "shape"):
                calls.setdefault("/".join(context.module.path), first.shape[-1])
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), variables)
    _check_patterns("adapter_modules", patterns, list(calls), "module path")
    compiled = [re.compile(p) for p in patterns]
    return {name: width for name, width in calls.items() if any(c.search(name) for c in compiled)}


@dataclasses.dataclass(frozen=True)
class Finetuning:
    """A finetuning method and its settings (module docstring).

    ``trainable``: parameter-path patterns of pretrained parameters that train as well
    (``"partial"``: the only ones; ``"full"`` ignores it). ``rank``, ``alpha``,
    ``lora_targets`` (module-path patterns), ``lora_init``: LoRA's. ``bottleneck``,
    ``adapter_modules`` (module-path patterns): the adapters'."""

    method: str = "lora"
    trainable: tuple[str, ...] = ()
    rank: int = 8
    alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_init: str = "gaussian"
    bottleneck: int = 16
    adapter_modules: tuple[str, ...] = ADAPTER_MODULES

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.method == "partial" and not self.trainable:
            raise ValueError("trainable: method='partial' needs at least one parameter-path pattern (e.g. HEAD)")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: expected an integer >= 1, got {self.rank!r}")
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(f"bottleneck: expected an integer >= 1, got {self.bottleneck!r}")
        if self.lora_init not in LORA_INITS:
            raise ValueError(f"lora_init: expected one of {LORA_INITS}, got {self.lora_init!r}")


class FinetunedModel:
    """``model`` finetuned from ``pretrained`` (its variables, ``{"params": ...}``) by
    ``finetuning``; the ``init`` / ``apply`` interface of a Linen module over the variables
    ``{"base": pretrained, "lora" | "adapters": ...}`` (module docstring). ``init(key,
    *args)`` makes the new parameters (the example inputs ``args`` find the kernels and
    modules); ``apply(variables, *args, **kwargs)`` is ``model.apply`` with them (``rngs``,
    ``method=`` ... pass through)."""

    def __init__(self, model: nn.Module, pretrained: Any, finetuning: Finetuning):
        if getattr(model, "layer_scan", False) and finetuning.method in ("lora", "adapters"):
            raise ValueError("model: layer_scan=True stacks the blocks' kernels (nn.scan), which LoRA and adapters "
                             "do not adapt; build the model with layer_scan=False (the same parameters, unstacked)")
        self.model, self.pretrained, self.finetuning = model, pretrained, finetuning
        names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(pretrained)[0]]
        if finetuning.method != "full":
            _check_patterns("trainable", finetuning.trainable, names, "parameter path")

    @property
    def vocab_size(self):  # what batch validation reads off a model (AttributeError if the model has none)
        return self.model.vocab_size

    def init(self, key: jax.Array, *args: Any, **kwargs: Any) -> dict[str, Any]:
        f = self.finetuning
        variables: dict[str, Any] = dict(base=self.pretrained)
        if f.method == "lora":
            kernels = dense_kernels(self.model, self.pretrained, *args, **kwargs)
            _check_patterns("lora_targets", f.lora_targets, list(kernels), "Dense kernel")
            compiled = [re.compile(p) for p in f.lora_targets]
            chosen = sorted(path for path in kernels if any(c.search(path) for c in compiled))
            flat = {path: np.shape(x) for path, x in traverse_util.flatten_dict(self.pretrained, sep="/").items()}
            lora = {tuple(path.split("/")): lora_factors(k, flat[path], kernels[path], f.rank, f.lora_init)
                    for path, k in zip(chosen, jax.random.split(key, len(chosen)))}
            variables["lora"] = traverse_util.unflatten_dict(lora)
        elif f.method == "adapters":
            widths = adapted_modules(self.model, self.pretrained, f.adapter_modules, *args, **kwargs)
            keys = jax.random.split(key, len(widths))
            variables["adapters"] = {name: adapter_params(k, width, f.bottleneck)
                                     for (name, width), k in zip(sorted(widths.items()), keys)}
        return variables

    def trainable_mask(self, variables: dict[str, Any]) -> dict[str, Any]:
        """The tree of bools over ``variables``: ``True`` where a leaf trains."""
        f = self.finetuning
        base = (jax.tree.map(lambda _: True, variables["base"]) if f.method == "full"
                else path_mask(variables["base"], f.trainable))
        return {name: base if name == "base" else jax.tree.map(lambda _: True, tree) for name, tree in variables.items()}

    def merged(self, variables: dict[str, Any]) -> Any:
        """Variables of the plain ``model`` equal to the finetuned one for LoRA (the factors
        merged into the kernels), else the pretrained tree as trained."""
        if "lora" in variables:
            return merge_lora(variables["base"], variables["lora"], self.finetuning.alpha)
        return variables["base"]

    def apply(self, variables: dict[str, Any], *args: Any, **kwargs: Any):
        mask = self.trainable_mask(variables)["base"]
        base = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), variables["base"], mask)
        if "adapters" in variables:
            with nn.intercept_methods(adapter_interceptor(variables["adapters"])):
                return self.model.apply(base, *args, **kwargs)
        return self.model.apply(self.merged(dict(variables, base=base)), *args, **kwargs)


def parameter_counts(model: FinetunedModel, variables: dict[str, Any]) -> dict[str, Any]:
    """``trainable``, ``total`` (pretrained + added), ``pretrained``, ``added`` parameters
    and the trainable fraction of the total."""
    size = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))  # noqa: E731
    mask = model.trainable_mask(variables)
    trainable = int(sum(np.size(x) for x, t in zip(jax.tree.leaves(variables), jax.tree.leaves(mask)) if t))
    total = size(variables)
    pretrained = size(variables["base"])
    return dict(method=model.finetuning.method, trainable=trainable, total=total, pretrained=pretrained,
                added=total - pretrained, fraction=trainable / total)
