"""Combiner: the layer equals the dense ``T x T`` attention matrix its factorisation defines
(written plainly in float64: the partition of each query's support into a direct part and
regions, the max-pooled abstractions, the local softmax), whose rows sum to one, which is
causal and has full support; the contract in every variant."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.combiner  # noqa: F401  (registers "combiner")
from tests.layers.contract import check_contract

D, H = 16, 2


def partition(i, t, span, variant, bidirectional):
    """``(direct, regions)`` of query ``i``: lists of key positions (Ren et al., 2021, Sec. 4).

    fixed: direct = the query's block (``j <= i`` causal); regions = every other block
    (earlier ones causal). axial (rows of ``span``): direct = the query's row (columns
    ``<= c`` causal) and its column in the other rows (earlier rows causal); regions =
    each other column over the other rows (earlier rows causal)."""
    block, row, col = i // span, i // span, i % span
    support = range(t) if bidirectional else range(i + 1)
    if variant == "fixed":
        direct = [j for j in support if j // span == block]
        regions = [[j for j in support if j // span == r] for r in range(-(-t // span)) if r != block]
    else:
        direct = [j for j in support if j // span == row]
        direct += [j for j in support if j % span == col and j // span != row]
        regions = [[j for j in support if j % span == c and j // span != row] for c in range(span) if c != col]
    regions = [r for r in regions if r]
    covered = sorted(direct + [j for r in regions for j in r])
    assert covered == list(support), "the direct part and the regions partition the support"
    return direct, regions


def dense_attention(q, k, span, variant, bidirectional):
    """The ``T x T`` probability matrix of the factorisation for one head (``q, k [T, d]``):
    ``P[i, j] = exp(q_i.k_j)/Z_i`` for direct ``j``; ``exp(q_i.k_Ω)/Z_i * q(j|Ω)`` for ``j`` in a
    region ``Ω``, with ``k_Ω = max_Ω k``, ``q(j|Ω) = softmax_Ω(max_Ω q . k_j)``; all dot
    products over ``sqrt(d)``."""
    t, d = q.shape
    scale = 1.0 / np.sqrt(d)
    probs = np.zeros((t, t))
    for i in range(t):
        direct, regions = partition(i, t, span, variant, bidirectional)
        scores = [np.exp(scale * q[i] @ k[j]) for j in direct]
        region_scores, local = [], []
        for members in regions:
            q_region, k_region = q[members].max(0), k[members].max(0)
            region_scores.append(np.exp(scale * q[i] @ k_region))
            w = np.exp(scale * k[members] @ q_region)
            local.append(w / w.sum())
        z = sum(scores) + sum(region_scores)
        for j, s in zip(direct, scores):
            probs[i, j] = s / z
        for members, s, w in zip(regions, region_scores, local):
            probs[i, members] = s / z * w
    return probs


def reference(params, x, span, variant, bidirectional):
    p = {k: np.asarray(v["kernel"], np.float64) for k, v in params["params"].items()}
    x = np.asarray(x, np.float64)
    q = np.einsum("btd,dhe->bhte", x, p["q_proj"])
    k = np.einsum("btd,dhe->bhte", x, p["k_proj"])
    v = np.einsum("btd,dhe->bhte", x, p["v_proj"])
    b, h, t, _ = q.shape
    probs = np.stack([np.stack([dense_attention(q[i, j], k[i, j], span, variant, bidirectional) for j in range(h)])
                      for i in range(b)])  # [b, h, t, t]
    out = np.einsum("bhij,bhje->bihe", probs, v)
    return np.einsum("bthe,hed->btd", out, p["out_proj"]), probs


def _setup(variant, bidirectional, t, span, dtype=jnp.float64, max_len=24):
    layer = ssmjax.layers.get("combiner", d_model=D, num_heads=H, variant=variant, span=span,
                              bidirectional=bidirectional, max_len=max_len)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, t, D), jnp.float32).astype(dtype)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    return layer, jax.tree.map(lambda a: a.astype(dtype), params), x


@pytest.mark.parametrize("variant,bidirectional,t", [
    ("fixed", False, 11), ("fixed", True, 11), ("axial", False, 11), ("axial", True, 11), ("axial", False, 12)])
def test_matches_dense_factorised_matrix_float64(variant, bidirectional, t):
    span = 3
    layer, params, x = _setup(variant, bidirectional, t, span)
    y_ref, probs = reference(params, x, span, variant, bidirectional)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-12)  # rows are distributions
    support = np.ones((t, t), bool) if bidirectional else np.tril(np.ones((t, t), bool))
    assert np.all(probs[..., ~support] == 0)  # causal: nothing above the diagonal
    assert np.all(probs[..., support] > 0)  # full attention: every visible key has weight
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), y_ref, rtol=1e-11, atol=1e-11)
    if not bidirectional:  # the cache form (max_len slots) is the same function
        y, _ = jax.jit(lambda p, x: layer.apply(p, x, return_state=True))(params, x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("variant", ["fixed", "axial"])
def test_contract_small_span(variant):
    """Spans of 4 over 12 tokens: the step and split forms cross several blocks / rows."""
    check_contract("combiner", variant=variant, span=4, max_len=24)
    check_contract("combiner", dtype=jnp.float64, variant=variant, span=4, max_len=24, split=5)


def test_partial_block_split_continues_float64():
    """Splits that start inside a block / row and a chunk longer than a span."""
    for variant, split in itertools.product(["fixed", "axial"], [1, 7]):
        layer, params, x = _setup(variant, False, 12, 3)
        call = jax.jit(lambda p, x, s: layer.apply(p, x, state=s, return_state=True))
        y, state = call(params, x, None)
        y1, mid = call(params, x[:, :split], None)
        y2, last = call(params, x[:, split:], mid)
        np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(last["k"], state["k"], rtol=1e-12, atol=1e-12)


def test_grads_are_finite_with_empty_regions():
    layer, params, x = _setup("axial", False, 5, 4, dtype=jnp.float32)  # row 0 has no regions
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_errors_name_the_argument():
    x = jnp.zeros((1, 4, D))
    for fields, match in [(dict(variant="logsparse"), "variant"), (dict(span=0), "span"),
                          (dict(span=5, max_len=24), "max_len"), (dict(num_heads=3), "num_heads")]:
        with pytest.raises(ValueError, match=match):
            ssmjax.layers.get("combiner", d_model=D, **fields).init(jax.random.PRNGKey(0), x)
    layer = ssmjax.layers.get("combiner", d_model=D, span=2, max_len=4)
    params = layer.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="x: expected at most max_len"):
        layer.apply(params, jnp.zeros((1, 6, D)), return_state=True)
    bidirectional = ssmjax.layers.get("combiner", d_model=D, span=2, bidirectional=True)
    with pytest.raises(ValueError, match="state"):
        bidirectional.apply(bidirectional.init(jax.random.PRNGKey(0), x), x, return_state=True)
