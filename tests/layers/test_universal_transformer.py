"""universal_transformer: ACT halting written from Graves (2016) and from the Universal
Transformer's reference loop, a float64 oracle of the whole depth recurrence (shared
block, coordinate embeddings, causal / duo-causal attention, ACT weighting, think-at-hard
gating), the sampled-depth and think-at-hard modes against the fixed-depth layer, the
layer contract (parallel == step with per-step KV caches) in every mode, and counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax.layers
import ssmjax.layers.universal_transformer  # noqa: F401  (registers "universal_transformer")
from ssmjax.layers.universal_transformer import act_weights
from tests.layers.reference import dense, param_count, sigmoid, to_f64

D, H = 16, 2
TOL = dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- ACT oracles
def graves_act(h, eps):
    """Graves (2016) eqs. 7-12 for one position: N(t) = min{n : sum_{m<=n} h_m >= 1 - eps}
    (the last step if never), R = 1 - sum_{m<N} h_m, p_n = h_n (n < N), R (n = N), 0 after."""
    steps, total = len(h), 0.0
    for n in range(steps):
        if total + h[n] >= 1 - eps or n == steps - 1:
            weights = np.concatenate([h[:n], [1 - total], np.zeros(steps - n - 1)])
            return weights, n + 1, 1 - total
        total += h[n]


def universal_transformer_act_loop(h, eps):
    """The Universal Transformer reference ACT loop (still_running / new_halted masks), with
    every position still running at the last step forced to halt."""
    threshold, steps = 1 - eps, h.shape[-1]
    halting, remainders, n_updates = np.zeros(h.shape[:-1]), np.zeros(h.shape[:-1]), np.zeros(h.shape[:-1])
    weights = []
    for n in range(steps):
        p = h[..., n]
        still_running = (halting < 1.0).astype(float)
        new_halted = ((halting + p * still_running > threshold) | (n == steps - 1)) * still_running
        still_running = (halting + p * still_running <= threshold) * still_running * (n < steps - 1)
        halting += p * still_running
        remainders += new_halted * (1 - halting)
        halting += new_halted * remainders
        n_updates += still_running + new_halted
        weights.append(p * still_running + new_halted * remainders)
    return np.stack(weights, -1), n_updates, remainders


def test_act_weights_match_both_formulations():
    rng = np.random.default_rng(0)
    h = np.concatenate([rng.uniform(size=(40, 5)), rng.uniform(0.0, 0.05, size=(5, 5)),  # never halts
                        rng.uniform(0.99, 1.0, size=(5, 5))])  # halts at once
    weights, n, r = act_weights(jnp.asarray(h), 0.99)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-14)
    for i in range(h.shape[0]):
        w_ref, n_ref, r_ref = graves_act(h[i], 0.01)
        np.testing.assert_allclose(weights[i], w_ref, rtol=1e-14, atol=1e-15)
        assert float(n[i]) == n_ref and abs(float(r[i]) - r_ref) < 1e-14
    w_loop, n_loop, r_loop = universal_transformer_act_loop(h, 0.01)
    np.testing.assert_allclose(weights, w_loop, rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(n, n_loop)
    np.testing.assert_allclose(r, r_loop, rtol=1e-14)
    assert (n[40:45] == 5).all() and (n[45:] == 1).all()
    # the ponder cost N + R: only R carries a gradient (dR/dh_m = -1 for m < N)
    grad = jax.grad(lambda h: jnp.sum(sum(act_weights(h, 0.99)[1:])))(jnp.asarray(h))
    expected = -(np.arange(5)[None] < np.asarray(n)[:, None] - 1).astype(float)
    np.testing.assert_array_equal(grad, expected)


# ----------------------------------------------------------------------------- layer oracle
def rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def timing(position, channels):
    half = channels // 2
    angles = np.asarray(position, float)[..., None] * 10000.0 ** (-np.arange(half) / (half - 1))
    return np.concatenate([np.sin(angles), np.cos(angles)], -1)


def attend(q, keys, values, valid):
    """Causal softmax attention over a list of per-step key/value sets [b, t, h, dh]."""
    t, dh = q.shape[1], q.shape[-1]
    causal = np.tril(np.ones((t, t), bool))
    scores = np.concatenate([np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(dh) for k in keys], -1)
    mask = np.concatenate([causal[None, None] & a[:, None, None, :] for a in valid], -1)
    scores = np.where(mask, scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", w, np.concatenate(values, 1))


def ut_oracle(p, x, max_steps=4, halting="act", eps=0.01, think=False, threshold=0.5):
    b, t, d = x.shape
    s, states, keys, values, valid = x, [], [], [], []
    active, gate = np.ones((b, t), bool), None
    for n in range(max_steps):
        if think and n > 0:
            prob = sigmoid(dense(np.maximum(dense(s, p["decider_in"]["kernel"], p["decider_in"]["bias"]), 0),
                                 p["decider_out"]["kernel"], p["decider_out"]["bias"]))[..., 0]
            active = active & (prob >= threshold)
            gate = active.astype(float)
        z = s + timing(np.arange(t), d) + timing(n, d)
        hn = rms(z, p["attn_norm"]["scale"])
        q, k, v = (dense(hn, p[m]["kernel"]) for m in ("q_proj", "k_proj", "v_proj"))
        keys.append(k), values.append(v), valid.append(active)
        steps = range(n + 1) if think else [n]
        z = z + dense(attend(q, [keys[m] for m in steps], [values[m] for m in steps], [valid[m] for m in steps]),
                      p["out_proj"]["kernel"], axes=2)
        z = z + dense(gelu(dense(rms(z, p["mlp_norm"]["scale"]), p["mlp_in"]["kernel"], p["mlp_in"]["bias"])),
                      p["mlp_out"]["kernel"], p["mlp_out"]["bias"])
        s = z if gate is None else s + gate[..., None] * (z - s)
        states.append(s)
    if halting != "act":
        return s, None
    h = sigmoid(np.stack([dense(st, p["halt"]["kernel"], p["halt"]["bias"])[..., 0] for st in states], -1))
    weights = np.zeros_like(h)
    for i in np.ndindex(h.shape[:-1]):
        weights[i] = graves_act(h[i], eps)[0]
    return np.einsum("bts,sbtd->btd", weights, np.stack(states)), weights


@pytest.mark.parametrize("fields", [{}, {"halting": "fixed"}, {"halting": "fixed", "think_at_hard_tokens": True}])
def test_layer_equals_oracle(fields):
    layer = ssmjax.layers.get("universal_transformer", d_model=D, num_heads=H, max_len=16, **fields)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, D), jnp.float64)
    params = to_f64(jax.jit(layer.init)(jax.random.PRNGKey(1), x.astype(jnp.float32)))
    y, aux = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(params, x)
    aux = aux.get("intermediates", {})
    think = fields.get("think_at_hard_tokens", False)
    y_ref, weights = ut_oracle(params["params"], np.asarray(x), halting=fields.get("halting", "act"), think=think)
    np.testing.assert_allclose(y, y_ref, **TOL)
    if weights is not None:  # ACT: weights sum to one, ponder time N + R, mean = ponder cost
        (w,), (h,), (ponder,), (cost,) = (aux[k] for k in ("halting_weights", "halting_probability",
                                                          "ponder_time", "ponder_cost"))
        np.testing.assert_allclose(w, weights, **TOL)
        np.testing.assert_allclose(np.sum(w, -1), 1.0, rtol=1e-13)
        n_ref = np.zeros(h.shape[:-1])
        r_ref = np.zeros(h.shape[:-1])
        for i in np.ndindex(h.shape[:-1]):
            _, n_ref[i], r_ref[i] = graves_act(np.asarray(h[i]), 0.01)
        np.testing.assert_allclose(ponder, n_ref + r_ref, **TOL)
        np.testing.assert_allclose(cost, np.mean(n_ref + r_ref), **TOL)
    if think:  # the decider selected some tokens and not others
        (iterations,) = aux["iterations"]
        assert 1 <= int(iterations.min()) < int(iterations.max()) <= 4


# The default-config contract (float32 and float64) is tests/layers/test_contract.py.


@pytest.mark.parametrize("fields", [pytest.param({"halting": "fixed"}, marks=pytest.mark.slow),
                                    {"halting": "fixed", "think_at_hard_tokens": True}])
def test_parallel_equals_steps_in_every_mode(fields):
    """check_contract's properties, with the token loop compiled (lax.scan over ``step``); the
    deterministic ``"sampled"`` mode is the fixed one (test_sampled_depth_equals_the_fixed_depth_model)."""
    layer = ssmjax.layers.get("universal_transformer", d_model=D, num_heads=H, max_len=16, max_steps=3, **fields)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, D), jnp.float32)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)

    @jax.jit
    def run(params, x):
        y, state = layer.apply(params, x, return_state=True)

        def token(state, x_t):
            y_t, state = layer.apply(params, x_t, state, method="step")
            return state, y_t

        state0 = layer.apply(params, x.shape[0], x.dtype, method="init_state")
        state_steps, y_steps = jax.lax.scan(token, state0, jnp.swapaxes(x, 0, 1))
        y1, mid = layer.apply(params, x[:, :5], return_state=True)
        y2, last = layer.apply(params, x[:, 5:], state=mid, return_state=True)
        return y, state, jnp.swapaxes(y_steps, 0, 1), state_steps, jnp.concatenate([y1, y2], 1), last

    y, state, y_steps, state_steps, y_split, last = run(params, x)
    for a, b in [(y_steps, y), (y_split, y)] + list(zip(jax.tree.leaves(state_steps), jax.tree.leaves(state))) + \
            list(zip(jax.tree.leaves(last), jax.tree.leaves(state))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    if fields.get("think_at_hard_tokens"):  # the straight-through gate passes the task gradient to the decider
        assert float(jnp.abs(grads["params"]["decider_out"]["kernel"]).sum()) > 0


def test_sampled_depth_equals_the_fixed_depth_model():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, D))
    sampled = ssmjax.layers.get("universal_transformer", d_model=D, halting="sampled", max_steps=4, mean_steps=2.0,
                                deterministic=False)
    params = jax.jit(sampled.init)(jax.random.PRNGKey(1), x)
    apply = jax.jit(lambda p, x, key: sampled.apply(p, x, rngs={"dropout": key}, mutable=["intermediates"]))
    seen = set()
    for seed in range(3):
        y, aux = apply(params, x, jax.random.PRNGKey(seed))
        (steps,) = aux["intermediates"]["num_steps"]
        steps = int(steps)
        seen.add(steps)
        fixed = ssmjax.layers.get("universal_transformer", d_model=D, halting="fixed", max_steps=steps)
        np.testing.assert_allclose(y, jax.jit(fixed.apply)(params, x), rtol=1e-12, atol=1e-12)
    assert len(seen) > 1 and min(seen) >= 1 and max(seen) <= 4
    # test time (deterministic): all max_steps iterations
    test_time = ssmjax.layers.get("universal_transformer", d_model=D, halting="sampled", max_steps=4)
    full = ssmjax.layers.get("universal_transformer", d_model=D, halting="fixed", max_steps=4)
    np.testing.assert_allclose(jax.jit(test_time.apply)(params, x), jax.jit(full.apply)(params, x), rtol=1e-12,
                               atol=1e-12)


def test_think_at_hard_tokens_decider_extremes():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, D))
    layer = ssmjax.layers.get("universal_transformer", d_model=D, halting="fixed", think_at_hard_tokens=True)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    apply = jax.jit(lambda p: layer.apply(p, x, mutable=["intermediates"]))

    def with_decider_bias(bias):
        p = jax.tree.map(lambda a: a, params)
        p["params"]["decider_out"]["bias"] = jnp.full((1,), bias)
        return p

    never, aux = apply(with_decider_bias(-50.0))
    assert int(aux["intermediates"]["iterations"][0].max()) == 1
    one_step = ssmjax.layers.get("universal_transformer", d_model=D, halting="fixed", max_steps=1)
    np.testing.assert_allclose(never, jax.jit(one_step.apply)(params, x), rtol=1e-12, atol=1e-12)
    _, aux = apply(with_decider_bias(50.0))
    assert int(aux["intermediates"]["iterations"][0].min()) == 4


def test_ponder_cost_gradient_reaches_the_halting_unit():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, D))
    layer = ssmjax.layers.get("universal_transformer", d_model=D)
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)

    def ponder(p):
        return layer.apply(p, x, mutable=["intermediates"])[1]["intermediates"]["ponder_cost"][0]

    grads = jax.jit(jax.grad(ponder))(params)
    assert float(jnp.abs(grads["params"]["halt"]["kernel"]).sum()) > 0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_parameter_counts_and_errors():
    def count(**fields):
        layer = ssmjax.layers.get("universal_transformer", d_model=D, **fields)
        return param_count(jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, 3, D))))

    f = 4 * D
    base = 4 * D * D + 2 * D * f + f + D + 2 * D
    assert count(halting="fixed") == base
    assert count() == base + D + 1
    assert count(halting="fixed", think_at_hard_tokens=True) == base + D * D // 2 + D // 2 + D // 2 + 1
    x = jnp.ones((1, 3, D))
    for fields, message in [(dict(halting="nope"), "halting"), (dict(think_at_hard_tokens=True), "think_at_hard"),
                            (dict(num_heads=3), "num_heads"), (dict(max_steps=0), "max_steps")]:
        with pytest.raises(ValueError, match=message):
            ssmjax.layers.get("universal_transformer", d_model=D, **fields).init(jax.random.PRNGKey(0), x)
