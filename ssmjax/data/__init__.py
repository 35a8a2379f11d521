"""Data for experiments: seeded in-process synthetic tasks (:mod:`ssmjax.data.synthetic`) and
character-level language modelling on a text file (:mod:`ssmjax.data.text`)."""

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
