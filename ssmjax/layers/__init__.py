"""Flax (Linen) mixer layers; the math lives in :mod:`ssmjax.scan`.

Importing this package registers every mixer: ``ssmjax.layers.get(name, d_model=...)``
builds one, ``ssmjax.layers.names()`` lists them, ``ssmjax.layers.run_steps`` feeds a
sequence through a layer's ``step`` token by token.
"""

from ssmjax.layers import (  # noqa: F401  (imported for their @register side effect)
    aaren,
    attention,
    combiner,
    deltanet,
    fsmn,
    h3,
    hgrn,
    lightnet,
    linear_attention,
    lmu,
    lmuformer,
    longvq,
    lru,
    mamba,
    mega_ema,
    plstm,
    rat,
    rnn,
    s4,
    s5,
    tcnca,
    titans,
    universal_transformer,
    urpe_attention,
)
from ssmjax.layers.registry import get, layer_class, names, register, run_steps, ssm_parameter_names

__all__ = ["get", "layer_class", "names", "register", "run_steps", "ssm_parameter_names"]
