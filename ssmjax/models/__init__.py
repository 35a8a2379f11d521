"""Backbones and heads assembled from registered mixers, forecasters
(:mod:`ssmjax.models.forecasters`: LTSF-Linear, iTransformer and our backbones over time or
over variates) and the recurrent-depth samplers of a looped-transformer LM
(:mod:`ssmjax.models.depth_sampling`: fixed, adaptive exit, diffusion-forcing parallel,
Think-at-Hard)."""

from ssmjax.models.backbone import (
    DEFAULT_MIN_LAYERS,
    SequenceModel,
    generate,
    hybrid_pattern,
    model_depth,
    parse_mixers,
    pattern_group,
)
from ssmjax.models import depth_sampling, forecasters
from ssmjax.models.depth_sampling import DepthSample, depth_generate
from ssmjax.models import video  # noqa: F401  (video predictors: video.PredFormer, video.ConvLSTM)
from ssmjax.models.matching import DualEncoderClassifier

__all__ = ["DEFAULT_MIN_LAYERS", "DepthSample", "DualEncoderClassifier", "SequenceModel", "generate", "hybrid_pattern", "model_depth", "parse_mixers",
           "pattern_group", "depth_generate", "depth_sampling", "forecasters"]
