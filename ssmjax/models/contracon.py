"""ConTraCon: task-specific convolutions that re-weight a frozen transformer's attention
weights, for exemplar-free continual learning (Roy, Verma, Voonna, Ghosh, Ghosh & Das,
2023, "Exemplar-Free Continual Transformer with Convolutions", ICCV 2023,
arXiv:2308.11357).

A transformer (here the :class:`~ssmjax.models.SequenceModel` backbone with bidirectional
``attention`` mixers and a classification head) is trained on the first task; its
weights ``W`` are then frozen and shared (task 1 uses them as they are). Task ``t > 1``
owns, for every re-weighted projection matrix ``W in {W_q, W_k, W_v}`` of every attention
layer and every head ``h``, a ``k x k`` kernel ``F_t^h``, a bias ``beta_t^h`` and a
skip-gate logit ``alpha_t^h``, and uses the projection

    W_t^h = F_t^h * W^h + beta_t^h + sigmoid(alpha_t^h) W^h                       (1)

    (F * W)[i, j] = sum_{a, b = 0}^{k - 1} F[a, b] W[i + a - r, j + b - r],   r = (k - 1) / 2

a 2-D cross-correlation over the head's weight matrix ``W^h`` with zero "same" padding
(``W = 0`` outside the matrix; ``k`` odd), i.e. a one-channel ``Conv2d`` per head. In the
backbone's layout ``W_q, W_k, W_v`` are ``[d_model, heads, d_head]`` and ``W^h`` is the
``[d_model, d_head]`` slice (the transpose of the reference code's ``[d_head, d_model]``;
a kernel convolved with the transpose is the transposed kernel convolved with the matrix,
so the family of maps (1) is the same). ``out_proj`` (``[heads, d_head, d_model]``) can be
re-weighted as well (:data:`PROJECTIONS`); the paper re-weights Q, K and V only
(:data:`PAPER_PROJECTIONS`). Besides the kernels each task owns its normalisation layers
and its classifier head (:data:`TASK_SPECIFIC`: the paper's per-task LayerNorms and
sequence-pooling + linear classifier; our backbone mean-pools, which has no parameters).
Everything else (input projection, attention matrices, MLPs) is the frozen task-1 model.
Task-specific pieces are an :class:`Adapter`; :func:`task_params` assembles task ``t``'s
parameters from the shared tree and its adapter, so training task ``t`` (a gradient on
its adapter only) cannot change any earlier task's parameters or predictions.

Initialisation of a new task (the reference code): kernel and bias
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = k^2`` (PyTorch's ``Conv2d``
default), gate logit ``alpha = 1``, fresh normalisation and head parameters.

Task prediction without task identity (class-incremental inference): each test image ``x``
is scored by every task's model ``z_t(.)`` on ``c`` copies of ``x`` and ``n`` augmented
views ``x_1..x_n``; the averaged logits give an entropy per task,

    zbar_t = (c z_t(x) + sum_a z_t(x_a)) / (c + n),  p_t = softmax(zbar_t),  H_t = -sum_k p_tk log p_tk
    t_hat = argmin_t H_t,   class = offset(t_hat) + argmax_k z_t_hat(x)_k               (2)

(the task whose model is most confident; the reference code uses ``c = 6`` copies and
``n = 10`` AutoAugment views). With task identity (task-incremental) ``t_hat`` is the true
task.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import Array
from jaxtyping import Float, Int

from ssmjax.checks import check_choice, check_positive_int
from ssmjax.models.backbone import SequenceModel

#: Attention projections that can be re-weighted, with the axis of their heads.
HEAD_AXIS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "out_proj": 0}
PROJECTIONS = tuple(HEAD_AXIS)
#: What the paper re-weights: the query, key and value weights.
PAPER_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
#: Parameter-path components owned by each ConTraCon task: its norms and its classifier.
TASK_SPECIFIC = ("mixer_norm", "mlp_norm", "final_norm", "class_head")
#: The initial skip-gate logit (the reference code sets it to 1).
GATE_INIT = 1.0

Params = dict[str, Any]


class Adapter(NamedTuple):
    """What one task owns. ``convs``: per re-weighted projection (its ``/``-joined parameter
    path) ``kernel [heads, k, k]``, ``bias [heads]`` and ``gate [heads]`` (the logit
    ``alpha``) of equation (1); ``own``: the task's own leaves (path -> array), which replace
    the shared ones."""

    convs: dict[str, dict[str, Array]]
    own: dict[str, Array]


def backbone(d_model: int, n_layers: int, num_heads: int, classes_per_task: int, *, mlp: str = "gelu",
             mlp_ratio: float = 2.0, norm: str = "layer") -> SequenceModel:
    """The shared transformer: ``n_layers`` pre-norm blocks of bidirectional multi-head
    attention (RoPE) and an MLP over linearly embedded tokens, mean pooling and a
    ``classes_per_task``-way head (the head and the norms are task-specific)."""
    return SequenceModel(d_model=d_model, n_layers=n_layers, mixers="attention",
                         mixer_fields={"attention": {"num_heads": num_heads}}, mlp=mlp, mlp_ratio=mlp_ratio, norm=norm,
                         head="classify", num_classes=classes_per_task, bidirectional=True)


def check_kernel_size(kernel_size: int) -> int:
    """``kernel_size`` if it is an odd positive int (a centred "same" convolution)."""
    check_positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd size (the kernel is centred on each weight), got {kernel_size}")
    return kernel_size


def conv2d_same(matrices: Float[Array, "h m n"], kernels: Float[Array, "hk k1 k2"]) -> Float[Array, "h m n"]:
    """``(F_h * W_h)`` of equation (1) for every ``h``: 2-D cross-correlation of matrix
    ``matrices[h]`` with ``kernels[h]``, zero padding, output the matrix's shape."""
    if matrices.ndim != 3 or kernels.ndim != 3 or kernels.shape[0] != matrices.shape[0] \
            or kernels.shape[1] != kernels.shape[2]:
        raise ValueError(f"matrices, kernels: expected [h, m, n] and [h, k, k], got {matrices.shape} and "
                         f"{kernels.shape}")
    r = check_kernel_size(kernels.shape[1]) // 2
    out = jax.lax.conv_general_dilated(matrices[None], kernels[:, None].astype(matrices.dtype), window_strides=(1, 1),
                                       padding=[(r, r), (r, r)], dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                       feature_group_count=matrices.shape[0], precision=jax.lax.Precision.HIGHEST)
    return out[0]


def reweight(weight: Float[Array, "..."], kernels: Float[Array, "h k k"], biases: Float[Array, "h"],
             gate_logits: Float[Array, "h"], head_axis: int) -> Float[Array, "..."]:
    """Equation (1) on a 3-D projection ``weight`` whose heads lie on ``head_axis``:
    ``[d, h, d_head]`` (Q, K, V: ``head_axis=1``) or ``[h, d_head, d]`` (out: ``0``)."""
    if weight.ndim != 3 or weight.shape[head_axis] != kernels.shape[0]:
        raise ValueError(f"weight: expected a 3-D projection with {kernels.shape[0]} heads on axis {head_axis}, got "
                         f"shape {weight.shape}")
    per_head = jnp.moveaxis(weight, head_axis, 0)  # [h, m, n]
    gate = jax.nn.sigmoid(gate_logits)[:, None, None]
    return jnp.moveaxis(conv2d_same(per_head, kernels) + biases[:, None, None] + gate * per_head, 0, head_axis)


def _flat(params: Params) -> dict[str, Array]:
    return traverse_util.flatten_dict(params, sep="/")


def projection_paths(params: Params, projections: tuple[str, ...] = PAPER_PROJECTIONS) -> list[str]:
    """The paths of the attention layers' ``projections`` kernels in a backbone's ``params``."""
    for name in projections:
        check_choice("projections", name, PROJECTIONS)
    paths = [p for p in _flat(params) if any(p.endswith(f"mixer_layer/{name}/kernel") for name in projections)]
    if not paths:
        raise ValueError(f"params: no attention projection {projections} found (ConTraCon re-weights attention layers)")
    return paths


def own_paths(params: Params, components: tuple[str, ...] = TASK_SPECIFIC) -> list[str]:
    """The paths of ``params`` that pass through a module named in ``components``."""
    paths = [p for p in _flat(params) if set(p.split("/")) & set(components)]
    if not paths:
        raise ValueError(f"components: none of {components} is a module of these parameters")
    return paths


def parent_adapter(params: Params, components: tuple[str, ...] = TASK_SPECIFIC) -> Adapter:
    """The first task's adapter: no convolutions, its own leaves taken from ``params``."""
    flat = _flat(params)
    return Adapter(convs={}, own={p: flat[p] for p in own_paths(params, components)})


def init_adapter(key: Array, shared: Params, fresh: Params, *, kernel_size: int,
                 projections: tuple[str, ...] = PAPER_PROJECTIONS,
                 components: tuple[str, ...] = TASK_SPECIFIC) -> Adapter:
    """A new task's adapter (module docstring): for each of ``shared``'s ``projections``,
    kernels and biases ``U(-1/k, 1/k)`` (``k = kernel_size``) and gate logits
    :data:`GATE_INIT`; its own leaves (``components``) from ``fresh``, a newly initialised
    parameter tree of the same model. The new arrays take the dtype of the weights."""
    bound = 1.0 / check_kernel_size(kernel_size)
    flat = _flat(shared)
    paths = projection_paths(shared, projections)
    convs = {}
    for path, sub in zip(paths, jax.random.split(key, len(paths))):
        weight = flat[path]
        heads = weight.shape[HEAD_AXIS[path.split("/")[-2]]]
        k_key, b_key = jax.random.split(sub)
        uniform = partial(jax.random.uniform, dtype=weight.dtype, minval=-bound, maxval=bound)
        convs[path] = dict(kernel=uniform(k_key, (heads, kernel_size, kernel_size)), bias=uniform(b_key, (heads,)),
                           gate=jnp.full((heads,), GATE_INIT, weight.dtype))
    return Adapter(convs=convs, own=parent_adapter(fresh, components).own)


def task_params(shared: Params, adapter: Adapter) -> Params:
    """Task parameters: ``shared`` with the adapter's projections re-weighted by
    equation (1) and its own leaves in place of the shared ones."""
    flat = dict(_flat(shared))
    for path, conv in adapter.convs.items():
        flat[path] = reweight(flat[path], conv["kernel"], conv["bias"], conv["gate"], HEAD_AXIS[path.split("/")[-2]])
    for path, leaf in adapter.own.items():
        if path not in flat:
            raise ValueError(f"adapter: {path!r} is not a parameter of the shared model")
        flat[path] = leaf
    return traverse_util.unflatten_dict(flat, sep="/")


def task_logits(model: SequenceModel, shared: Params, adapter: Adapter, inputs: Float[Array, "b t f"]
                ) -> Float[Array, "b c"]:
    """Task ``adapter``'s logits on ``inputs``."""
    return model.apply({"params": task_params(shared, adapter)}, inputs)


def count_params(tree: Any) -> int:
    return int(sum(leaf.size for leaf in jax.tree.leaves(tree)))


def shared_count(shared: Params, adapter: Adapter) -> int:
    """The number of ``shared`` parameters a task reads (those its own leaves do not replace)."""
    flat = _flat(shared)
    return count_params(shared) - sum(flat[p].size for p in adapter.own)


def view_entropy(original: Float[Array, "tasks b c"], augmented: Float[Array, "tasks views b c"], copies: int
                 ) -> Float[Array, "tasks b"]:
    """``H_t`` of equation (2): the entropy of ``softmax`` of each task's logits averaged
    over ``copies`` copies of the original and the augmented views."""
    check_positive_int("copies", copies)
    mean = (copies * original + augmented.sum(1)) / (copies + augmented.shape[1])
    log_p = jax.nn.log_softmax(mean, -1)
    return -jnp.sum(jnp.exp(log_p) * log_p, -1)


def class_incremental_prediction(original: Float[Array, "tasks b c"], augmented: Float[Array, "tasks views b c"],
                                 copies: int) -> tuple[Int[Array, "b"], Int[Array, "b"]]:
    """Equation (2): ``(predicted task, predicted global class)`` of every image, the task
    of least view-averaged entropy and, with ``c`` classes per task, ``c t_hat + argmax``
    of that task's logits on the original image."""
    task = jnp.argmin(view_entropy(original, augmented, copies), 0)
    local = jnp.argmax(jnp.take_along_axis(original, task[None, :, None], 0)[0], -1)
    return task, task * original.shape[-1] + local
