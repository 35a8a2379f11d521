"""The layer contract (:mod:`tests.layers.contract`) for every registered layer, with its
default fields, in float32 and float64: a new layer is covered by registering it.

The per-layer tests check their variants (other fields) in float32 and the float64
oracles of their equations."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import ssmjax.layers
from tests.layers.contract import DTYPES, check_contract

#: Registered layers outside the token-by-token contract, and why (their own tests check
#: what they do instead).
NO_STEP = {
    "plstm2d": "a 2-D grid has no token step; test_plstm checks that row blocks continue with the state",
}


#: Fields that keep a layer small where its defaults are paper-sized (the contract is the
#: same function of the fields; only shapes shrink): a key/value cache of 2048 slots, a
#: 20-tap memory of 17-tap convolutions, 64-512 SSM states (the state size is a width, not
#: a code path: 8 states compile and run the same program several times faster; H3 at 64
#: states was the slowest contract test), a 4-deep dilated TCN (2 levels keep a dilation).
SMALL = {
    "attention": dict(max_len=32),
    "combiner": dict(span=4, max_len=24),
    "dss": dict(d_state=8),
    "fsmn": dict(inner_channels=8, memory_order=3, memory_layers=3, conv_size=5),
    "gss": dict(d_state=8),
    "h3": dict(d_state=8),
    "longvq": dict(codebook_size=8, chunk_size=4, ema_dim=4),
    "lru": dict(d_state=8),
    "mamba2": dict(d_state=16),
    "s4": dict(d_state=8),
    "s4d": dict(d_state=8),
    "s5": dict(d_state=8),
    "tcnca": dict(tcn_depth=2),
    "universal_transformer": dict(max_len=16, max_steps=3),
    "urpe_attention": dict(max_len=32),
}


def _names():
    return [pytest.param(n, marks=pytest.mark.skip(reason=NO_STEP[n])) if n in NO_STEP else n
            for n in ssmjax.layers.names()]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", _names())
def test_layer_contract(name, dtype):
    check_contract(name, dtype=dtype, **SMALL.get(name, {}))
