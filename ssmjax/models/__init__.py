"""Backbones and heads assembled from registered mixers."""

from ssmjax.models.backbone import SequenceModel, generate, hybrid_pattern, parse_mixers

__all__ = ["SequenceModel", "generate", "hybrid_pattern", "parse_mixers"]
