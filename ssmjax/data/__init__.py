"""Data for experiments: seeded in-process synthetic tasks (:mod:`ssmjax.data.synthetic`)."""

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

__all__ = [
    "ALGORITHMIC_TASKS", "ALGORITHMIC_VOCAB_SIZE", "BOOLEAN_FUNCTIONS", "BOOLEAN_VOCAB_SIZE", "Batch",
    "algorithmic", "algorithmic_seq_len", "batch_rng", "boolean_icl", "boolean_optimal_predictions",
    "boolean_prompt_examples", "induction_heads", "mqar", "selective_copying",
]
