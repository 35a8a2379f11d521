"""Bag-of-words audio classification: k-means codebooks of spectrogram patches and slices,
histogram embeddings and an MLP head, against an SSM trained end to end on the same clips.

    python -m experiments bow_audio [--model s4d] [--set key=value ...]

After Verma, 2021, "Attention is All You Need? Good Embeddings with Statistics are enough:
Large Scale Audio Understanding without Transformers/Convolutions/BERTs/Mixers/Attention/
RNNs or ...." (arXiv:2110.03183). The protocol:

1. Data: the generated seven-class set of :func:`ssmjax.data.audio.make_clips` (tones,
   chirps up and down, band-limited noise bursts, three formant vowels; ``sample_rate``
   Hz, ``clip_seconds`` s, SNR uniform in ``snr_db``), with separate seeds for train, val
   and test; or, with ``data_dir``, a folder ``<label>/*.wav`` of 16-bit mono PCM
   (:func:`ssmjax.data.audio.load_wav_folder`, cut or padded to ``clip_seconds``) split
   70/10/20 at random (``data_seed``). Each size in ``train_clips`` trains on the first that
   many training clips (every class within one clip of balanced for the generated set); val
   and test are the same for every size.
2. Features: the log-mel spectrogram (``frame_ms`` Hann frames every ``hop_ms``,
   ``n_mels`` bands; :func:`ssmjax.data.audio.log_mel_spectrogram`), minus the clip's maximum
   and floored ``dynamic_range`` nats below it (loudness invariance).
3. Bag of words (:mod:`ssmjax.models.bag_of_words`): a "micro" codebook of ``micro_codes``
   codewords over ``patch`` tiles (frames x mel bands) every ``patch_stride``, a "macro"
   codebook of ``macro_codes`` over full-frequency slices of ``slice_frames`` frames; k-means++
   then ``kmeans_iterations`` Lloyd steps on at most ``kmeans_points`` tiles of the training
   clips; the embedding of a clip is the concatenation of its two normalised codeword
   histograms, z-scored with the training clips' mean and std; an MLP head (one hidden layer
   of ``mlp_hidden`` ReLU units) is trained by cross-entropy. Three heads: on the micro
   histogram, on the macro one, on both (``bow_micro``, ``bow_macro``, ``bow``).
4. Baseline: the backbone ``SequenceModel`` with ``--model`` mixers (default ``s4d``;
   ``n_layers`` x ``d_model``, mean pooling, a linear classifier) trained on the same clips
   from each entry of ``ssm_inputs``: ``"frames"``, the raw waveform (peak-normalised per
   clip) cut into non-overlapping frames of ``hop_ms`` ([T / hop, hop] per clip), or
   ``"logmel"``, the log-mel frames of step 2 z-scored per band.
5. Every model: Adam, ``lr`` with a per-epoch cosine, about ``steps`` updates of
   ``batch_size`` clips (:func:`experiments.regression.epoch_plan`; a small training set
   is repeated within an epoch so that an epoch has at least :data:`MIN_EPOCH_UPDATES`
   updates, i.e. validation is not run every few updates), gradient clipping 1, the
   parameters of the best validation accuracy kept; metric: test accuracy.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import regression
from ssmjax.checks import check_choice, check_positive_int
from ssmjax.data import audio
from ssmjax.models import SequenceModel, parse_mixers
from ssmjax.models import bag_of_words as bow
from ssmjax.train.fit import FitConfig, fit, predict_in_batches

EXPERIMENT = "bow_audio"
DESCRIPTION = ("bag-of-words audio: k-means codebooks of log-mel patches and slices, codeword histograms + MLP, "
               "against an SSM on the raw audio, on generated sounds or a WAV folder (Verma 2021)")
PAPER_FINDING = (
    "Verma (2021, arXiv:2110.03183): with no convolution, recurrence or attention, histograms of k-means codewords "
    "of (autoencoded) spectrogram patches, slices, envelopes and multi-resolution spectra, classified by an MLP head, "
    "surpass convolutional networks on FSD50K (200 sound classes) and come close to Transformers.")
DEFAULT_MODEL = "s4d"
SSM_INPUTS = ("frames", "logmel")
BOW_HEADS = ("bow_micro", "bow_macro", "bow")
EVAL_BATCH = 256
#: Small training sets are repeated within an epoch so that an epoch (one validation) has at least this many updates.
MIN_EPOCH_UPDATES = 25


@dataclasses.dataclass(frozen=True)
class BowAudioConfig:
    """One run: for each training size, the three bag-of-words heads and one SSM per
    entry of ``ssm_inputs`` (module docstring)."""

    model: str = DEFAULT_MODEL
    data_dir: str = ""  # "" : the generated set; else <data_dir>/<label>/*.wav
    train_clips: tuple = (140, 700, 2100)
    val_clips: int = 350
    test_clips: int = 700
    sample_rate: int = 8000  # the generated set's (a WAV folder has its own)
    clip_seconds: float = 0.5
    snr_db: tuple = (0.0, 20.0)  # the generated set's
    frame_ms: float = 32.0
    hop_ms: float = 10.0
    n_mels: int = 32
    dynamic_range: float = 12.0
    patch: tuple = (8, 8)
    patch_stride: tuple = (4, 4)
    slice_frames: int = 1
    micro_codes: int = 128
    macro_codes: int = 64
    kmeans_iterations: int = 30
    kmeans_points: int = 50_000
    mlp_hidden: int = 256
    ssm_inputs: tuple = SSM_INPUTS
    d_model: int = 32
    n_layers: int = 2
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    data_seed: int = 0


SIZES = {
    # 3 training sizes x (3 MLP heads + 2 SSMs) on 2,100 / 350 / 700 generated clips of 0.5 s at 8 kHz.
    "cpu": BowAudioConfig(),
    # approx. (the paper's FSD50K set-up is not reproduced): 1 s clips at 16 kHz, more clips, bigger
    # codebooks and models.
    "paper": BowAudioConfig(train_clips=(700, 7000, 21000), val_clips=1400, test_clips=2800, sample_rate=16000,
                            clip_seconds=1.0, n_mels=64, micro_codes=512, macro_codes=256, kmeans_points=200_000,
                            mlp_hidden=1024, d_model=128, n_layers=4, steps=20_000),
}


def check_config(config: BowAudioConfig) -> None:
    for name in config.ssm_inputs:
        check_choice("ssm_inputs", name, SSM_INPUTS)
    parse_mixers(config.model, config.n_layers)
    if not config.train_clips or sorted(config.train_clips) != list(config.train_clips):
        raise ValueError(f"train_clips: expected a non-empty increasing tuple, got {config.train_clips}")
    for name in ("val_clips", "test_clips", "sample_rate", "n_mels", "slice_frames", "micro_codes", "macro_codes",
                 "kmeans_iterations", "kmeans_points", "mlp_hidden", "d_model", "n_layers", "steps", "batch_size"):
        check_positive_int(name, getattr(config, name))
    for size in config.train_clips:
        check_positive_int("train_clips", size)
    if config.dynamic_range <= 0:
        raise ValueError(f"dynamic_range: expected > 0 nats, got {config.dynamic_range}")


# ----------------------------------------------------------------------------- data

def split_folder(clips: audio.LabelledAudio, seed: int) -> dict[str, audio.LabelledAudio]:
    """A random 70/10/20 train/val/test split of a WAV folder's clips."""
    order = np.random.default_rng(seed).permutation(len(clips.labels))
    n_test, n_val = int(0.2 * len(order)), int(0.1 * len(order))
    parts = dict(train=order[n_test + n_val:], val=order[n_test:n_test + n_val], test=order[:n_test])
    return {name: clips._replace(audio=clips.audio[idx], labels=clips.labels[idx]) for name, idx in parts.items()}


def load_data(config: BowAudioConfig) -> dict[str, audio.LabelledAudio]:
    """``train`` / ``val`` / ``test`` clips (module docstring, step 1)."""
    if config.data_dir:
        data = split_folder(audio.load_wav_folder(config.data_dir, config.clip_seconds), config.data_seed)
    else:
        sizes = dict(train=config.train_clips[-1], val=config.val_clips, test=config.test_clips)
        data = {split: audio.make_clips(n, seed=(config.data_seed, i), sample_rate=config.sample_rate,
                                        duration=config.clip_seconds, snr_db=tuple(config.snr_db))
                for i, (split, n) in enumerate(sizes.items())}
    available = len(data["train"].labels)
    if config.train_clips[-1] > available:
        raise ValueError(f"train_clips: {config.train_clips[-1]} is more than the {available} training clips")
    if min(len(d.labels) for d in data.values()) == 0:
        raise ValueError(f"data_dir: {config.data_dir} has too few clips for a train/val/test split")
    return data


def frame_lengths(config: BowAudioConfig, sample_rate: int) -> tuple[int, int]:
    """``(frame length, hop)`` in samples."""
    return round(config.frame_ms * sample_rate / 1000), round(config.hop_ms * sample_rate / 1000)


_log_mel = jax.jit(audio.log_mel_spectrogram, static_argnames=("sample_rate", "frame_length", "hop", "n_mels"))


def clip_log_mel(clips: audio.LabelledAudio, config: BowAudioConfig) -> np.ndarray:
    """``[n, frames, n_mels]``: the log-mel spectrogram minus each clip's maximum, floored at
    ``-dynamic_range`` (module docstring, step 2)."""
    frame, hop = frame_lengths(config, clips.sample_rate)
    spec_fn = partial(_log_mel, sample_rate=clips.sample_rate, frame_length=frame, hop=hop, n_mels=config.n_mels)
    spec = predict_in_batches(spec_fn, (clips.audio,), EVAL_BATCH)
    return np.maximum(spec - spec.max(axis=(1, 2), keepdims=True), -config.dynamic_range)


def waveform_frames(clips: audio.LabelledAudio, hop: int) -> np.ndarray:
    """``[n, samples // hop, hop]``: each clip over its peak, cut into frames of ``hop``."""
    x = clips.audio / np.maximum(np.abs(clips.audio).max(axis=1, keepdims=True), 1e-8)
    steps = x.shape[1] // hop
    return x[:, :steps * hop].reshape(len(x), steps, hop)


def zscore(train: np.ndarray, *others: np.ndarray, axis: tuple[int, ...] = (0,)) -> list[np.ndarray]:
    """``(a - mean) / std`` with the mean and std of ``train`` over ``axis`` (std 0 -> 1)."""
    mean, std = train.mean(axis, keepdims=True), train.std(axis, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


# ----------------------------------------------------------------------------- training

class Classifier(NamedTuple):
    """A module's compiled initialiser, training loss and argmax prediction."""

    init: Callable
    loss: Callable
    classify: Callable


@cache
def classifier(module: Any) -> Classifier:
    """:class:`Classifier` of ``module``, built once per module (flax modules compare by their
    fields), so the fits of every training size reuse the same compiled programs."""
    def loss(p, batch, key):
        xb, yb = batch
        return optax.softmax_cross_entropy_with_integer_labels(module.apply(p, xb), yb).mean()

    return Classifier(jax.jit(module.init), loss, jax.jit(lambda p, inputs: jnp.argmax(module.apply(p, inputs), -1)))


def fit_classifier(model: Classifier, params: Any, train: tuple[np.ndarray, np.ndarray],
                   val: tuple[np.ndarray, np.ndarray], config: BowAudioConfig) -> tuple[Any, int, Callable, float]:
    """Minimise ``model``'s cross-entropy from ``params`` on ``train = (x, y)`` with
    :func:`ssmjax.train.fit.fit` (module docstring, step 5); returns ``(best params,
    updates, predict, seconds)`` where ``predict(params, x)`` gives the argmax classes."""
    repeats = -(-MIN_EPOCH_UPDATES * config.batch_size // len(train[0]))  # ceil
    x, y = (np.concatenate([a] * repeats) for a in train)
    epochs, used = regression.epoch_plan(config.steps, len(x), config.batch_size)

    def predict(p, inputs):
        return predict_in_batches(partial(model.classify, p), (inputs,), EVAL_BATCH)

    fit_config = FitConfig(epochs=epochs, batch_size=config.batch_size, lr=config.lr, lr_schedule="cosine",
                           patience=0, seed=config.seed, grad_clip=1.0, weight_decay=config.weight_decay,
                           optimizer="adamw" if config.weight_decay else "adam")
    result = fit(model.loss, params, (x[:used], y[:used]), lambda p: 1.0 - float(np.mean(predict(p, val[0]) == val[1])),
                 fit_config, verbose=False)
    return result.params, epochs * (used // config.batch_size), predict, result.elapsed_s


def score(predict: Callable, params: Any, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy and per-class accuracy of ``predict(params, x)`` against ``y``."""
    pred = predict(params, x)
    per_class = [float(np.mean(pred[y == c] == c)) if np.any(y == c) else None for c in range(num_classes)]
    return dict(accuracy=float(np.mean(pred == y)), per_class_accuracy=per_class)


def train_model(module: Any, inputs: dict[str, np.ndarray], labels: dict[str, np.ndarray], config: BowAudioConfig,
                num_classes: int) -> dict[str, Any]:
    """Initialise ``module`` with ``seed``, train it on ``inputs["train"]`` and score val and test."""
    model = classifier(module)
    params = model.init(jax.random.key(config.seed), jnp.asarray(inputs["train"][:1]))
    params, updates, predict, seconds = fit_classifier(model, params, (inputs["train"], labels["train"]),
                                                       (inputs["val"], labels["val"]), config)
    test = score(predict, params, inputs["test"], labels["test"], num_classes)
    return dict(test_accuracy=test["accuracy"], per_class_accuracy=test["per_class_accuracy"],
                val_accuracy=score(predict, params, inputs["val"], labels["val"], num_classes)["accuracy"],
                params=regression.count_params(params), updates=updates, train_s=seconds)


def fit_codebooks(spec: np.ndarray, config: BowAudioConfig) -> tuple[list[bow.Codebook], dict]:
    """The micro (patch) and macro (slice) codebooks on training spectrograms ``[n, T, F]``
    (seeded by ``seed`` and ``n``) and the k-means inertia per iteration of each (module
    docstring, step 3)."""
    slice_tile, slice_stride = bow.slice_shape(spec.shape[-1], config.slice_frames)
    books, inertia = [], {}
    for name, k, tile, stride in (("micro", config.micro_codes, config.patch, config.patch_stride),
                                  ("macro", config.macro_codes, slice_tile, slice_stride)):
        rng = np.random.default_rng([config.seed, len(spec), len(books)])
        book, history = bow.fit_codebook(rng, spec, k, tile, stride, iterations=config.kmeans_iterations,
                                         max_points=config.kmeans_points)
        books.append(book)
        inertia[name] = history.tolist()
    return books, inertia


def embed_clips(spec: np.ndarray, books: list[bow.Codebook]) -> np.ndarray:
    """:func:`ssmjax.models.bag_of_words.embed` of ``spec [n, T, F]``, ``EVAL_BATCH`` clips at a time."""
    return np.concatenate([bow.embed(spec[i:i + EVAL_BATCH], books) for i in range(0, len(spec), EVAL_BATCH)])


def train_prefix(arrays: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
    """``[train[:n], val, test]``."""
    return [arrays["train"][:n], arrays["val"], arrays["test"]]


def run(config: BowAudioConfig, run_dir: Path, verbose: bool = True) -> Path:
    """Every training size: codebooks, the three MLP heads, the SSMs; writes ``result.json``."""
    check_config(config)
    start = time.perf_counter()
    data = load_data(config)
    classes, rate = data["train"].classes, data["train"].sample_rate
    labels = {split: d.labels for split, d in data.items()}
    hop = frame_lengths(config, rate)[1]
    spec = {split: clip_log_mel(d, config) for split, d in data.items()}
    frames = {split: waveform_frames(d, hop) for split, d in data.items()}
    if verbose:
        sizes = ", ".join(f"{s} {len(v)}" for s, v in labels.items())
        print(f"[{run_dir.name}] {len(classes)} classes, clips: {sizes}; log-mel {spec['train'].shape[1:]}, "
              f"waveform frames {frames['train'].shape[1:]} ({time.perf_counter() - start:.0f}s)", flush=True)
    columns = dict(bow_micro=slice(0, config.micro_codes), bow_macro=slice(config.micro_codes, None), bow=slice(None))
    models, inertia = [], {}
    for n in config.train_clips:
        train_labels = dict(labels, train=labels["train"][:n])
        books, inertia[str(n)] = fit_codebooks(spec["train"][:n], config)
        embedded = zscore(*(embed_clips(s, books) for s in train_prefix(spec, n)))
        ssm_features = dict(frames=train_prefix(frames, n), logmel=zscore(*train_prefix(spec, n), axis=(0, 1)))
        for head in BOW_HEADS:
            inputs = dict(zip(("train", "val", "test"), (e[:, columns[head]] for e in embedded)))
            out = train_model(bow.MLPHead(config.mlp_hidden, len(classes)), inputs, train_labels, config,
                              len(classes))
            models.append(dict(method=head, train_clips=n, **out))
            if verbose:
                print(f"[{run_dir.name}] {n} clips, {head}: test accuracy {out['test_accuracy']:.3f} "
                      f"({out['train_s']:.0f}s)", flush=True)
        for name in config.ssm_inputs:
            inputs = dict(zip(("train", "val", "test"), ssm_features[name]))
            model = SequenceModel(d_model=config.d_model, n_layers=config.n_layers, mixers=config.model,
                                  vocab_size=None, head="classify", num_classes=len(classes))
            out = train_model(model, inputs, train_labels, config, len(classes))
            models.append(dict(method=f"{config.model}_{name}", train_clips=n, **out))
            if verbose:
                print(f"[{run_dir.name}] {n} clips, {config.model} on {name}: test accuracy "
                      f"{out['test_accuracy']:.3f} ({out['params']:,} params, {out['train_s']:.0f}s)", flush=True)
    regression.write_json(run_dir / "result.json", dict(
        experiment=EXPERIMENT, model=config.model, status="done", classes=list(classes), sample_rate=rate,
        clips={s: len(v) for s, v in labels.items()}, models=models, kmeans_inertia=inertia,
        wall_s=time.perf_counter() - start, reduced_size=True))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    return regression.main(EXPERIMENT, DESCRIPTION, SIZES, run, argv, default_model=DEFAULT_MODEL, check=check_config)


# ----------------------------------------------------------------------------- report

def accuracy_table(models: list[dict[str, Any]]) -> str:
    """Markdown: one row per method, one column per training size, test accuracy."""
    sizes = sorted({m["train_clips"] for m in models})
    methods = list(dict.fromkeys(m["method"] for m in models))
    value = {(m["method"], m["train_clips"]): m["test_accuracy"] for m in models}
    params = {m["method"]: m["params"] for m in models}
    lines = ["| method | params | " + " | ".join(f"{n} clips" for n in sizes) + " |",
             "|---|---:|" + "---:|" * len(sizes)]
    for method in methods:
        cells = [f"{value[(method, n)]:.3f}" if (method, n) in value else "-" for n in sizes]
        lines.append(f"| {method} | {params[method]:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_section(run_dirs: list[Path], figures_dir: Path) -> str:
    """Per run, the test-accuracy table (methods x training sizes)."""
    runs = regression.read_runs(run_dirs, EXPERIMENT)
    if not runs:
        return ""
    lines = ["## Bag-of-words audio: k-means codeword histograms + MLP vs an SSM (Verma 2021)", "",
             f"**Paper finding.** {PAPER_FINDING}", "",
             "Test accuracy against the number of training clips, CPU size (generated 7-class sounds, 0.5 s at "
             "8 kHz, not FSD50K); `bow_micro` / `bow_macro` / `bow`: the MLP head on the patch, slice or both "
             "histograms; `<model>_frames` / `<model>_logmel`: the SSM on raw waveform frames or log-mel frames. "
             "See `experiments/notes/bow_audio.md`.", ""]
    for d, config, result in runs:
        c = config.get("config", {})
        lines.append(f"`{d.name}` (SSM `{config.get('model')}`, codebooks {c.get('micro_codes')} + "
                     f"{c.get('macro_codes')}, {c.get('steps')} updates per model"
                     + (f", data `{c.get('data_dir')}`" if c.get("data_dir") else "") + "):")
        lines += ["", accuracy_table(result["models"]) if result else "incomplete", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
