"""Sampling a looped (recurrent-depth) transformer LM with a per-token number of iterations.

The model is a :class:`~ssmjax.models.SequenceModel` with ``head="lm"`` and one
``universal_transformer`` layer (``--model universal_transformer --set n_layers=1``), whose
shared block is applied to the latent state of every token ``n`` times (module docstring of
:mod:`ssmjax.layers.universal_transformer`; the position ``i`` and the step ``n`` are
embedded before every application)::

    x_i = embed(t_i),  s_i^0 = RMSNorm(x_i)
    s_i^{n+1} = block_n(s_i^n; keys / values of step n of the positions j <= i)
    y_i = s_i^r   (ACT models: y_i = sum_n p_i^n s_i^n, the layer's halting weights)
    logits_i = head(x_i + y_i)                     (the backbone's MLP, final norm, lm head)
    t_{i+1} ~ sample(logits_i, key_{i+1}),  key_{i+1} = fold_in(key, i + 1)

The key / value cache holds one row per step, ``K, V [max_steps, len, heads, dh]``: token
``i``'s step-``n`` query attends to the step-``n`` keys of positions ``<= i`` (``"think"``: of
every step ``<= n``, flagged computed). The prompt is
always run to the full depth ``r`` (one parallel prefill); the generated tokens follow one of
four schemes (``mode``):

* ``"fixed"``: every token gets ``r = iterations_per_token`` iterations (default the layer's
  ``max_steps``; ``r = max_steps`` is the model's own test-time forward, the reference). A
  model run with ``r < max_steps`` is the same layer cut to ``r`` steps (nothing reads a
  deeper step).
* ``"adaptive"``: per-token exit (Geiping et al., 2025, "Scaling up Test-Time Compute with
  Latent Reasoning: A Recurrent Depth Approach", sec. 6, zero-shot adaptive compute): token
  ``i`` stops after iteration ``n >= 2`` once ``KL(p^n || p^{n-1}) < threshold``, where
  ``p^n = softmax(logits(s_i^n))`` (at most ``r`` iterations). This plays ACT's role for a
  model trained without a halting unit (``halting="sampled"`` / ``"fixed"``). A later token
  that needs step ``m`` of an exited token (``m >= `` its depth ``d``) reads the keys / values
  of its last step ``d - 1`` (the paper's KV-cache fallback: the deepest entry available), so
  ``threshold=0`` (never exits early) is exactly ``"fixed"``. With ``criterion="act"`` (a
  model trained with ``halting="act"``) a token exits at its ACT halting step ``N``
  (Graves, 2016: the first ``n`` with ``h^1 + .. + h^n >= 1 - act_epsilon``): its own
  output is then exactly the layer's (the ACT weights after ``N`` are zero); only later
  tokens differ, as they read the fallback keys where the dense layer computed every step.
* ``"parallel"``: the diffusion-forcing sampler of Geiping, Yang and Su, 2025, "Efficient
  Parallel Samplers for Recurrent-Depth Models and Their Connection to Diffusion Language
  Models": a window of in-flight positions ``c <= i < f`` (``c``: the first uncommitted
  position; at most ``window`` of them, default ``r``) and one forward pass per sampler
  step, which

  1. advances every in-flight, unfinished position ``i`` by one iteration at its own depth
     ``d_i`` (a fresh or restarted position starts from ``s^0`` of its current token); the
     new keys / values are written at ``(d_i, i)`` before the queries read row ``d_i``;
  2. marks ``i`` finished at depth ``r`` (or, with ``threshold > 0`` / ``criterion="act"``,
     at the adaptive exit above, filling its deeper cache rows as the fallback);
  3. re-drafts every successor token ``t_{i+1} ~ sample(logits(s_i^{d_i}), key_{i+1})``,
     the newest of them a new position appended at depth 0 (a new token at every pass);
  4. restarts (depth 0) every in-flight position ``>= i + 1`` for the first ``i`` whose
     draft changed (their inputs or the keys they read were computed from the old token);
  5. commits the finished prefix of the window (its successor tokens are final).

  Invariant: each in-flight position's cached steps were computed from the current drafts
  of itself and of every earlier position, and an unfinished position is never deeper than
  an earlier unfinished one (so the step-``d_i`` keys it reads exist, computed in an earlier
  pass or in this one). The front position's token is final, so it never restarts and the
  sampler ends after at most ``r`` passes per token (the sequential cost); when drafts stop
  changing it commits one token per pass. A committed position has therefore run its last
  ``d_i`` iterations on final tokens and final keys: with ``threshold=0`` the output is
  **exactly** that of ``"fixed"`` with the same ``iterations_per_token`` (``r = max_steps``:
  the reference), greedy or sampled (the same per-position keys), whatever the window; "enough
  iterations per token" means a commit budget ``iterations_per_token = r`` counted since the
  token's last restart, nothing more. With a threshold it returns exactly ``"adaptive"``'s
  output. Departures from the paper: its model re-injects the (re-drafted) token embedding
  into a latent that keeps iterating and freezes tokens on convergence alone, which is
  approximate; here a changed draft restarts the positions behind it (exact, more passes),
  since this block has no input injection to carry a changed token into a running latent.
* ``"think"``: the model's own Think-at-Hard recurrence (Fu et al., 2025, "Think-at-Hard:
  Selective Latent Iterations to Improve Reasoning Language Models"), the only mode of a layer
  with ``think_at_hard_tokens=True`` (which the other three refuse). Token ``i`` always runs
  step 0; before step ``n`` (``1 <= n < max_steps``) the layer's decider on its state,
  ``p_i^n = sigmoid(MLP_d(s_i^n))``, lets it run step ``n`` only if ``p_i^n >= think_threshold``
  (it stops for good at the first ``no``), so its depth is ``d_i = 1 + #{extra steps}``.
  Attention is duo-causal: the step-``n`` query of ``i`` reads the keys / values of every step
  ``m <= n`` of the positions ``j <= i`` that ``j`` actually computed (``m < d_j``; the cache
  keeps an ``active [max_steps, len]`` flag per entry, and an exited token's deeper rows stay
  unread, no fallback). The prompt's prefill follows the same decisions, so the generation is
  **exactly** the model's teacher-forced forward (greedy or sampled with the same keys), at
  ``sum_i d_i`` block applications instead of the dense layer's ``max_steps`` per token.

Counts for throughput / compute (:class:`DepthSample`): ``passes`` (jitted model calls after
the prefill), ``iterations`` (block applications spent on generated positions, restarted work
included) and ``depths`` (the iterations of the position that predicted each generated
token). One sequence at a time (``prompt [t]``): the latency-bound regime the samplers are for.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ssmjax.layers
from ssmjax.layers.universal_transformer import masked_attention, timing_signal
from ssmjax.models.backbone import SequenceModel, model_depth, pattern_group, sample_logits

MODES = ("fixed", "adaptive", "parallel", "think")
CRITERIA = ("kl", "act")


@dataclasses.dataclass(frozen=True)
class DepthSample:
    """What :func:`depth_generate` returns (module docstring): the ``tokens [G]`` generated,
    ``depths [G]`` (iterations of the position that predicted each), ``passes`` (model calls
    after the prefill), ``iterations`` (block applications on generated positions, restarts
    included), ``restarts`` (passes in which a changed draft restarted positions) and
    ``seconds`` (wall time of the whole call, prefill included, compiled functions cached)."""

    tokens: np.ndarray
    depths: np.ndarray
    passes: int
    iterations: int
    restarts: int
    seconds: float


def depth_layer(model: SequenceModel) -> nn.Module:
    """The (unbound) ``universal_transformer`` layer of ``model``; ``ValueError`` unless the
    model is a token LM with exactly that one layer (module docstring). A
    ``think_at_hard_tokens`` layer is returned too: only ``mode="think"`` samples it."""
    if not isinstance(model, SequenceModel):
        raise ValueError(f"model: expected a SequenceModel, got {type(model).__name__}")
    if model.head != "lm" or model.vocab_size is None:
        raise ValueError(f"model: depth sampling needs a token LM (head='lm', vocab_size set), got head={model.head!r}")
    try:
        group = pattern_group(model.mixers)
        layers = group * (model_depth(model.mixers, model.n_layers) // len(group))
    except ValueError as error:
        raise ValueError(f"model: {error}") from None
    if layers != ("universal_transformer",):
        raise ValueError(f"model: depth sampling needs exactly one universal_transformer layer "
                         f"(--model universal_transformer --set n_layers=1), got the layers {layers}")
    if model.layer_scan or model.bidirectional or model.memory_len:
        raise ValueError("model: depth sampling needs layer_scan=False, bidirectional=False and memory_len=0")
    fields = dict((model.mixer_fields or {}).get("universal_transformer", {}))
    return ssmjax.layers.get("universal_transformer", d_model=model.d_model, **fields)


def _check(layer, mode, iterations_per_token, threshold, criterion, window, temperature, top_k, num_tokens):
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if layer.think_at_hard_tokens and mode != "think":
        raise ValueError(f"model: a think_at_hard_tokens layer chooses its iterations with its decider and attends "
                         f"duo-causally over every step; sample it with mode='think' (got mode={mode!r})")
    if mode == "think" and not layer.think_at_hard_tokens:
        raise ValueError("mode: 'think' runs the decider of a think_at_hard_tokens=True layer (Think-at-Hard); "
                         "this layer has think_at_hard_tokens=False")
    if mode == "think" and iterations_per_token not in (None, layer.max_steps):
        raise ValueError(f"iterations_per_token: mode 'think' iterates as the layer's decider chooses "
                         f"(at most max_steps={layer.max_steps}), got {iterations_per_token!r}")
    r = layer.max_steps if iterations_per_token is None else iterations_per_token
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= layer.max_steps:
        raise ValueError(f"iterations_per_token: expected an int in [1, max_steps={layer.max_steps}], "
                         f"got {iterations_per_token!r}")
    if not threshold >= 0:
        raise ValueError(f"threshold: expected a KL divergence >= 0, got {threshold}")
    if mode == "fixed" and threshold > 0:
        raise ValueError(f"threshold: mode 'fixed' never exits early; use mode='adaptive' (got {threshold})")
    if mode == "think" and threshold > 0:
        raise ValueError(f"threshold: mode 'think' exits where the layer's decider says (think_threshold), "
                         f"got {threshold}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {CRITERIA}, got {criterion!r}")
    if criterion == "act" and layer.halting != "act":
        raise ValueError(f"criterion: 'act' needs a layer trained with halting='act', got halting={layer.halting!r}")
    if criterion == "act" and mode == "fixed":
        raise ValueError("criterion: 'act' is an early exit; use it with mode='adaptive' or 'parallel'")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1):
        raise ValueError(f"window: expected an int >= 1 (in-flight positions of the parallel sampler), got {window!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
        raise ValueError(f"num_tokens: expected an int >= 1, got {num_tokens!r}")
    return int(r)


# ---------------------------------------------------------------------- model pieces (bound)
def _embed(m, tokens):
    """``x = embed(t)`` and the layer input ``s^0 = RMSNorm(x)``, ``[w, d]``."""
    x = m._inputs(tokens)
    return x, m.groups[0].blocks[0].mixer_norm(x)


def _logits(m, x, y):
    """The backbone after the layer: ``head(x + y)`` (MLP, final norm, lm head)."""
    return m._outputs(m.groups[0].blocks[0]._mlp(x + y))


def _latent(ut, s0):
    """A fresh latent: the state ``s`` and, for ACT, the running halting sums."""
    lat = dict(s=s0)
    if ut.halting == "act":
        lat.update(acc=jnp.zeros_like(s0), cum=jnp.zeros(s0.shape[:1], jnp.promote_types(s0.dtype, jnp.float32)),
                   halted=jnp.zeros(s0.shape[:1], bool))
    return lat


def _readout(ut, lat):
    """The layer output at the current depth ``d``: ``s^d``, or for ACT the Graves weights of
    ``h^1 .. h^d`` with the remainder on ``s^d`` if not halted yet (the layer's ``y`` at ``d = max_steps``)."""
    if ut.halting != "act":
        return lat["s"]
    s = lat["s"]
    open_ = (1.0 - lat["cum"]).astype(s.dtype)[:, None] * s
    return jnp.where(lat["halted"][:, None], lat["acc"], lat["acc"] + open_)


def _cache(layer, length, dtype):
    """The per-step cache: keys / values ``k, v [max_steps, length, heads, dh]`` and ``active
    [max_steps, length]`` (the entries computed, read by the duo-causal attention)."""
    heads = layer.num_heads
    k = jnp.zeros((layer.max_steps, length, heads, layer.d_model // heads), dtype)
    return dict(k=k, v=k, active=jnp.zeros(k.shape[:2], bool))


def _attend(ut, q, kv, positions, steps):
    """Token ``i``'s step-``n`` query over the step-``n`` keys of the positions ``j <= i``, or
    (``think_at_hard_tokens``, duo-causal) over every step ``m <= n`` that ``j`` computed."""
    S, L = kv["active"].shape
    causal = jnp.arange(L)[None, :] <= positions[:, None]  # [w, len]
    if not ut.think_at_hard_tokens:
        k, v, mask = kv["k"][steps], kv["v"][steps], causal[:, None]
    else:  # the keys of steps 0 .. S-1 side by side, as the layer's _attend concatenates them
        w = q.shape[0]
        k, v = (jnp.broadcast_to(a.reshape((1, S * L) + a.shape[2:]), (w, S * L) + a.shape[2:])
                for a in (kv["k"], kv["v"]))
        mask = kv["active"][None] & (jnp.arange(S)[None, :, None] <= steps[:, None, None]) & causal[:, None]
        mask = mask.reshape(w, 1, S * L)
    return masked_attention(q[:, None], k.astype(q.dtype), v.astype(q.dtype), mask)[:, 0]


def _thinks(ut, s):
    """The Think-at-Hard decider: does each state ``s [w, d]`` iterate again?"""
    return ut._decide(s) >= ut.think_threshold


def _iterate(ut, lat, positions, steps, live, kv):
    """One application of the shared block to the positions ``[w]``, each at its own step;
    only ``live`` positions change (and write their keys / values at ``(step, position)``)."""
    s = lat["s"]
    d = s.shape[-1]
    z = s + timing_signal(positions, d, s.dtype) + timing_signal(steps, d, s.dtype)
    h = ut.attn_norm(z)
    q, k, v = ut.q_proj(h), ut.k_proj(h), ut.v_proj(h)  # [w, heads, dh]
    rows = jnp.where(live, steps, kv["active"].shape[0])  # out of range: dropped
    kv = dict(k=kv["k"].at[rows, positions].set(k.astype(kv["k"].dtype), mode="drop"),
              v=kv["v"].at[rows, positions].set(v.astype(kv["v"].dtype), mode="drop"),
              active=kv["active"].at[rows, positions].set(True, mode="drop"))
    z = z + ut.out_proj(_attend(ut, q, kv, positions, steps))
    new = z + ut.mlp_out(jax.nn.gelu(ut.mlp_in(ut.mlp_norm(z))))
    out = dict(lat, s=jnp.where(live[:, None], new, s))
    if ut.halting == "act":  # Graves' accumulation one step at a time (the layer's act_weights)
        h_n = jax.nn.sigmoid(ut.halt(new)[..., 0].astype(lat["cum"].dtype))
        stop = ~lat["halted"] & (lat["cum"] + h_n >= 1.0 - ut.act_epsilon)
        weight = jnp.where(lat["halted"], 0.0, jnp.where(stop, 1.0 - lat["cum"], h_n))
        out["acc"] = jnp.where(live[:, None], lat["acc"] + weight.astype(s.dtype)[:, None] * new, lat["acc"])
        out["cum"] = jnp.where(live & ~lat["halted"] & ~stop, lat["cum"] + h_n, lat["cum"])
        out["halted"] = jnp.where(live, lat["halted"] | stop, lat["halted"])
    return out, kv


def _fill(kv, positions, depth, exited):
    """The fallback of an early exit: rows ``>= depth`` of ``positions`` get row ``depth - 1``."""
    deeper = (jnp.arange(kv["active"].shape[0])[:, None] >= depth[None, :]) & exited[None, :]

    def fill(K):
        column = K[:, positions]  # [steps, w, heads, dh]
        last = K[jnp.maximum(depth - 1, 0), positions]
        return K.at[:, positions].set(jnp.where(deeper[..., None, None], last[None], column))

    return dict(kv, k=fill(kv["k"]), v=fill(kv["v"]))


def _kl(logp_new, logp_old):
    """``KL(p_new || p_old)`` per row, clipped at 0 (rounding), so ``threshold=0`` never exits."""
    return jnp.maximum(jnp.sum(jnp.exp(logp_new) * (logp_new - logp_old), -1), 0.0)


def _log_softmax(logits):
    return jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)


# ---------------------------------------------------------------------- jitted samplers
_COMPILED: dict[tuple, Any] = {}


def _functions(model, layer, r, threshold, criterion, window, temperature, top_k):
    """The jitted prefill, one-token pass (fixed / adaptive / think) and parallel pass, each
    cached per model and the options it depends on (so repeated calls compile once; a
    ``think_at_hard_tokens`` layer, part of the model, selects the think mode)."""
    base = (repr(model), r, float(temperature), top_k)
    keys = dict(prefill=base, token=base + (float(threshold), criterion),
                parallel=base + (float(threshold), criterion, window))
    if all(("fn",) + (name,) + k in _COMPILED for name, k in keys.items()):
        return {name: _COMPILED[("fn", name) + k] for name, k in keys.items()}
    R = layer.max_steps
    think = layer.think_at_hard_tokens
    exits = criterion == "act" or threshold > 0 or think

    def draw(logits, key, position):
        return sample_logits(logits, jax.random.fold_in(key, position), temperature, top_k)

    def exited(ut, lat, depth, logp_new, logp_old):
        """Stop after ``depth`` iterations (Think-at-Hard: the decider says no more)."""
        if think:
            return ~_thinks(ut, lat["s"])
        if criterion == "act":
            return lat["halted"]
        return (depth >= 2) & (_kl(logp_new, logp_old) < threshold)

    def prefill(m, tokens, length, key, kv):
        """The prompt, ``r`` steps in parallel (think: the decider's chain picks the live
        positions of each step); drafts the first token; returns its predictor's depth."""
        ut = m.groups[0].blocks[0].mixer_layer
        positions = jnp.arange(length)
        x, s0 = _embed(m, tokens[:length])

        def body(n, carry):
            lat, live, depth, kv = carry
            if think:
                live = live & ((n == 0) | _thinks(ut, lat["s"]))
            lat, kv = _iterate(ut, lat, positions, jnp.full(length, n), live, kv)
            return lat, live, depth + live, kv

        init = (_latent(ut, s0), jnp.ones(length, bool), jnp.zeros(length, jnp.int32), kv)
        lat, _, depth, kv = jax.lax.fori_loop(0, r, body, init)
        logits = _logits(m, x[-1:], _readout(ut, lat)[-1:])[0]
        return tokens.at[length].set(draw(logits, key, length).astype(tokens.dtype)), depth[-1], kv

    def token_pass(m, tokens, p, key, kv):
        """Position ``p``: up to ``r`` iterations (adaptive exit / the think decider), then
        draft ``t_{p+1}``."""
        ut = m.groups[0].blocks[0].mixer_layer
        x, s0 = _embed(m, tokens[p][None])
        position = p[None]
        vocab = m.vocab_size
        dtype = jnp.promote_types(s0.dtype, jnp.float32)

        def cond(c):
            return (c[0] < r) & ~c[3]

        def body(c):
            n, lat, logp, _, logits, kv = c
            lat, kv = _iterate(ut, lat, position, n[None], jnp.ones(1, bool), kv)
            logits = _logits(m, x, _readout(ut, lat))[0]
            new = _log_softmax(logits)
            stop = exited(ut, lat, n + 1, new[None], logp[None])[0] if exits else jnp.zeros((), bool)
            return n + 1, lat, new, stop, logits.astype(dtype), kv

        init = (jnp.zeros((), jnp.int32), _latent(ut, s0), jnp.zeros(vocab, dtype), jnp.zeros((), bool),
                jnp.zeros(vocab, dtype), kv)
        n, _, _, _, logits, kv = jax.lax.while_loop(cond, body, init)
        if not think:  # think: the deeper rows stay inactive (unread), no fallback
            kv = _fill(kv, position, n[None], (n < R)[None])
        return tokens.at[p + 1].set(draw(logits, key, p + 1).astype(tokens.dtype)), n, kv

    def parallel_pass(m, st, key, end):
        """One sampler step of the diffusion-forcing sampler (module docstring, 1-5)."""
        ut = m.groups[0].blocks[0].mixer_layer
        c, f = st["c"], st["f"]
        win = c + jnp.arange(window)
        inflight = win < f
        x, s0 = _embed(m, st["tokens"][win])
        depth, done = st["depth"][win], st["done"][win]
        fresh = depth == 0
        lat = jax.tree.map(lambda a, b: jnp.where(fresh.reshape(fresh.shape + (1,) * (a.ndim - 1)), a, b),
                           _latent(ut, s0), jax.tree.map(lambda a: a[win], st["lat"]))
        live = inflight & ~done
        lat, kv = _iterate(ut, lat, win, depth, live, st["kv"])  # 1.
        depth = depth + live
        logits = _logits(m, x, _readout(ut, lat))
        logp = _log_softmax(logits)
        finished = live & (depth >= r)  # 2.
        if exits:
            finished = finished | (live & exited(ut, lat, depth, logp, st["logp"][win]))
            kv = _fill(kv, win, depth, finished & (depth < R))
        done = done | finished
        logp = jnp.where(live[:, None], logp, st["logp"][win])
        drafts = jax.vmap(lambda lg, i: draw(lg, key, i))(logits, win + 1)  # 3.
        successor = win + 1
        changed = inflight & (successor < f) & (drafts != st["tokens"][successor])
        behind = jnp.concatenate([jnp.zeros(1, bool), jnp.cumsum(changed)[:-1] > 0])
        restart = inflight & behind  # 4.
        depth, done = jnp.where(restart, 0, depth), done & ~restart
        tokens = st["tokens"].at[jnp.where(inflight & (successor <= end), successor, st["tokens"].shape[0])].set(
            drafts.astype(st["tokens"].dtype), mode="drop")
        committed = jnp.sum(jnp.cumprod(done & inflight))  # 5.
        c_new = c + committed
        f_new = f + ((f < end) & (f - c_new < window))
        return dict(tokens=tokens, depth=st["depth"].at[win].set(depth), done=st["done"].at[win].set(done),
                    lat=jax.tree.map(lambda a, b: a.at[win].set(b), st["lat"], lat),
                    logp=st["logp"].at[win].set(logp), kv=kv, c=c_new, f=f_new,
                    passes=st["passes"] + 1, iterations=st["iterations"] + jnp.sum(live),
                    restarts=st["restarts"] + jnp.any(changed))

    bodies = dict(prefill=(prefill, (2,)), token=(token_pass, ()), parallel=(parallel_pass, ()))
    for name, k in keys.items():  # one cache entry per function and the options it depends on
        body, static = bodies[name]
        _COMPILED.setdefault(("fn", name) + k, jax.jit(
            lambda params, *a, body=body: nn.apply(body, model)(params, *a), static_argnums=static))
    return {name: _COMPILED[("fn", name) + k] for name, k in keys.items()}


def depth_generate(model: SequenceModel, params, prompt, num_tokens: int, key: jax.Array, *, mode: str = "fixed",
                   iterations_per_token: int | None = None, threshold: float = 0.0, criterion: str = "kl",
                   window: int | None = None, temperature: float = 0.0, top_k: int | None = None) -> DepthSample:
    """Generate ``num_tokens`` tokens after ``prompt [t]`` (int ids) with ``mode`` in
    ``"fixed"``, ``"adaptive"``, ``"parallel"`` or, for a ``think_at_hard_tokens`` layer (and
    only for it), ``"think"`` (module docstring).

    ``iterations_per_token``: ``r``, the iterations of a token (the most of an adaptive one,
    the commit budget of the parallel sampler; default the layer's ``max_steps``);
    ``threshold``: the KL exit of ``"adaptive"`` (0: never) and the optional early commit of
    ``"parallel"``; ``criterion="act"`` exits at the ACT halting step instead (a model
    trained with ``halting="act"``); ``window``: in-flight positions of ``"parallel"``
    (default ``r``); ``"think"`` takes neither ``threshold`` nor ``r < max_steps`` (its
    decider chooses); ``temperature`` / ``top_k``: :func:`ssmjax.models.backbone.sample_logits`
    (greedy at 0) with the key ``fold_in(key, i)`` for the token at position ``i``.
    """
    layer = depth_layer(model)
    r = _check(layer, mode, iterations_per_token, threshold, criterion, window, temperature, top_k, num_tokens)
    prompt = np.asarray(prompt)
    if prompt.ndim != 1 or prompt.size < 1 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt: expected a 1-D array of at least one token id, got shape {prompt.shape} "
                         f"and dtype {prompt.dtype}")
    window = int(window or r) if mode == "parallel" else None
    top_k = None if top_k is None or top_k >= model.vocab_size else int(top_k)
    fns = _functions(model, layer, r, threshold if mode != "fixed" else 0.0, criterion if mode != "fixed" else "kl",
                     window, temperature, top_k)
    t0, end = prompt.size, prompt.size + num_tokens - 1  # end: the last token's position
    length = end + 1 + (window or 0)  # room for a full window past the end
    dtype = jax.tree.leaves(params)[0].dtype
    kv = _cache(layer, length, dtype)
    tokens = jnp.zeros(length, jnp.int32).at[:t0].set(jnp.asarray(prompt, jnp.int32))

    start = time.perf_counter()
    tokens, first, kv = fns["prefill"](params, tokens, t0, key, kv)  # first: the prompt's last depth
    depths = np.full(num_tokens, r)
    restarts = 0
    if mode != "parallel":
        counts = [first]
        for p in range(t0, end):
            tokens, n, kv = fns["token"](params, tokens, jnp.int32(p), key, kv)
            counts.append(n)
        depths[:] = np.asarray(jax.device_get(counts))
        passes, iterations = num_tokens - 1, int(depths[1:].sum())
        tokens = np.asarray(tokens)
    else:
        vocab, d = model.vocab_size, model.d_model
        st = dict(tokens=tokens, depth=jnp.zeros(length, jnp.int32), done=jnp.zeros(length, bool),
                  lat=jax.tree.map(lambda a: jnp.zeros((length,) + a.shape[1:], a.dtype),
                                   _latent(layer, jnp.zeros((1, d), dtype))),
                  logp=jnp.zeros((length, vocab), jnp.promote_types(dtype, jnp.float32)), kv=kv,
                  c=jnp.int32(t0), f=jnp.int32(t0 + 1), passes=jnp.int32(0), iterations=jnp.int32(0),
                  restarts=jnp.int32(0))
        c = t0
        while c < end:
            st = fns["parallel"](params, st, key, jnp.int32(end))
            c = int(st["c"])
        tokens = np.asarray(st["tokens"])
        depths[0], depths[1:] = int(first), np.asarray(st["depth"])[t0:end]
        passes, iterations, restarts = int(st["passes"]), int(st["iterations"]), int(st["restarts"])
    seconds = time.perf_counter() - start
    return DepthSample(tokens=tokens[t0:end + 1], depths=depths, passes=passes, iterations=iterations,
                       restarts=restarts, seconds=seconds)
