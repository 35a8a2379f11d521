"""Data for experiments: seeded in-process synthetic tasks (:mod:`ssmjax.data.synthetic`),
character-level language modelling on a text file (:mod:`ssmjax.data.text`), forecasting
files and chaotic systems (:mod:`~ssmjax.data.forecasting`, :mod:`~ssmjax.data.dynamics`),
MNIST as pixel sequences (:mod:`~ssmjax.data.images`), the Long Range Arena's generators and
file readers (:mod:`~ssmjax.data.lra`) and the generated image and video tasks: Pathfinder,
arrow pointing, Moving MNIST (:mod:`~ssmjax.data.vision`). Nothing is downloaded."""

from ssmjax.data.synthetic import (
    ALGORITHMIC_TASKS,
    ALGORITHMIC_VOCAB_SIZE,
    BOOLEAN_FUNCTIONS,
    BOOLEAN_VOCAB_SIZE,
    Batch,
    algorithmic,
    algorithmic_seq_len,
    batch_rng,
    boolean_icl,
    boolean_optimal_predictions,
    boolean_prompt_examples,
    induction_heads,
    mqar,
    selective_copying,
)
from ssmjax.data.text import CharTokenizer, TextTask, random_windows, sequential_windows, split_text, windows

__all__ = [
    "ALGORITHMIC_TASKS", "ALGORITHMIC_VOCAB_SIZE", "BOOLEAN_FUNCTIONS", "BOOLEAN_VOCAB_SIZE", "Batch",
    "algorithmic", "algorithmic_seq_len", "batch_rng", "boolean_icl", "boolean_optimal_predictions",
    "boolean_prompt_examples", "induction_heads", "mqar", "selective_copying",
    "CharTokenizer", "TextTask", "random_windows", "sequential_windows", "split_text", "windows",
]
