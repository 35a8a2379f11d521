"""Backbones and heads assembled from registered mixers."""

from ssmjax.models.backbone import (
    DEFAULT_MIN_LAYERS,
    SequenceModel,
    generate,
    hybrid_pattern,
    model_depth,
    parse_mixers,
    pattern_group,
)

__all__ = ["DEFAULT_MIN_LAYERS", "SequenceModel", "generate", "hybrid_pattern", "model_depth", "parse_mixers",
           "pattern_group"]
