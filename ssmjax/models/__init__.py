"""Backbones and heads assembled from registered mixers, and forecasters
(:mod:`ssmjax.models.forecasters`: LTSF-Linear, iTransformer and our backbones over time or
over variates)."""

from ssmjax.models.backbone import (
    DEFAULT_MIN_LAYERS,
    SequenceModel,
    generate,
    hybrid_pattern,
    model_depth,
    parse_mixers,
    pattern_group,
)
from ssmjax.models import forecasters
from ssmjax.models import video  # noqa: F401  (video predictors: video.PredFormer, video.ConvLSTM)
from ssmjax.models.matching import DualEncoderClassifier

__all__ = ["DEFAULT_MIN_LAYERS", "DualEncoderClassifier", "SequenceModel", "generate", "hybrid_pattern", "model_depth", "parse_mixers",
           "pattern_group", "forecasters"]
