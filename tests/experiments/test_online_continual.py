"""The online continual protocol (`python -m experiments.online_continual`): prequential
bookkeeping against a float64 online-SGD oracle, replay rows that enter the update but not
the record, the Transformer-XL memory (shapes, contents, stop-gradient, no label leak),
the summaries by hand, a tiny end-to-end run with its report, and argument errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import online_continual as oc
from ssmjax.data import streams

# One tiny setting shared by the tests, so every compiled init, update and memory read is reused.
TINY = dict(streams=("piecewise_regression",), learners=("xl+replay", "linear"), steps=4, segment=4, memory=6,
            switch_every=8, dim_x=3, dim_y=1, d_model=8, n_layers=1, replay_streams=2, curve_points=5,
            optimizer="sgd", lrs=(0.3,), grad_clip=0.0)
OPTIMIZER, LR = ("sgd", 0.0), 0.3
CONFIG = oc.OnlineContinualConfig(**TINY)
STREAM = streams.piecewise_regression_stream(16, 8, seed=0, dim_x=3, dim_y=1)


def _args(tmp_path, **overrides):
    items = [f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in {**TINY, **overrides}.items()]
    return ["--model", "attention", "--out", str(tmp_path), "--quiet"] + [a for s in items for a in ("--set", s)]


def test_losses_are_recorded_before_each_update_float64_oracle():
    """Linear learner, plain SGD: the recorded loss of segment s is that of the weights after
    s updates (an online-SGD loop in numpy), not after s + 1."""
    learner = oc.parse_learner("linear")
    model, params = oc.init_learner(CONFIG, learner, STREAM, jax.random.key(0))
    losses, errors, _ = oc.prequential(CONFIG, learner, model, params, STREAM, LR, np.random.default_rng(0))
    assert errors is None and losses.shape == (16,)
    kernel = np.asarray(params["params"]["Dense_0"]["kernel"], np.float64)
    bias = np.asarray(params["params"]["Dense_0"]["bias"], np.float64)
    before, after = [], []
    for s in range(4):
        x, y = STREAM.x[4 * s:4 * s + 4].astype(np.float64), STREAM.y[4 * s:4 * s + 4].astype(np.float64)
        residual = x @ kernel + bias - y  # [C, d_y]
        before.append((residual ** 2).mean(1))
        gradient = 2 * residual / residual.size  # d mean_{c, k} residual^2 / d prediction
        kernel, bias = kernel - LR * x.T @ gradient, bias - LR * gradient.sum(0)
        after.append(((x @ kernel + bias - y) ** 2).mean(1))
    np.testing.assert_allclose(losses, np.concatenate(before), rtol=1e-5, atol=1e-7)
    assert np.abs(np.concatenate(after) - np.concatenate(before)).max() > 1e-2  # the check can tell them apart


def test_replay_rows_train_but_are_not_recorded():
    """Before there is a past the replay rows have weight 0: with and without replay the first
    update and so the first two segments' losses agree; from the third on replay has changed
    the weights."""
    runs = []
    for name in ("linear", "linear+replay"):
        learner = oc.parse_learner(name)
        model, params = oc.init_learner(CONFIG, learner, STREAM, jax.random.key(0))
        runs.append(oc.prequential(CONFIG, learner, model, params, STREAM, LR, np.random.default_rng(0))[0])
    np.testing.assert_array_equal(runs[0][:8], runs[1][:8])
    assert np.abs(runs[0][8:] - runs[1][8:]).min() > 0


def test_memory_caches_block_inputs_with_stop_gradient_and_no_label_leak():
    learner = oc.parse_learner("xl+replay")
    model, params = oc.init_learner(CONFIG, learner, STREAM, jax.random.key(1))
    tokens = jnp.asarray(streams.context_tokens(STREAM))  # [16, 4]
    windows = jnp.stack([tokens[0:6], tokens[2:8], tokens[4:10]])  # [b = 3, M = 6, F = 4]
    memory = oc.read_memory(params, windows, model=model)
    assert [leaf.shape for leaf in jax.tree.leaves(memory)] == [(3, 6, 8)]  # one block: [b, M, d_model]
    segment = jnp.stack([tokens[6:10], tokens[8:12], tokens[10:14]])  # [3, C = 4, 4]
    targets = jnp.asarray(np.stack([STREAM.y[6:10], STREAM.y[8:12], STREAM.y[10:14]]))
    weights, state = jnp.ones(3), oc.make_optimizer(*OPTIMIZER).init(params)
    _, _, new, _, outputs = oc.online_update(params, state, LR, segment, targets, weights, memory, model=model,
                                             num_classes=None, optimizer=OPTIMIZER)
    # the new memory is the last M block inputs of [memory, segment]: 2 old rows, then the segment's embedding
    proj = params["params"]["input_proj"]
    (old,), (cached,) = jax.tree.leaves(memory), jax.tree.leaves(new)
    np.testing.assert_allclose(cached[:, :2], old[:, 4:], rtol=1e-6)
    np.testing.assert_allclose(cached[:, 2:], segment @ proj["kernel"] + proj["bias"], rtol=1e-5, atol=1e-6)

    loss = jax.jit(lambda p, m: oc.segment_loss(p, segment, targets, weights, m, model=model, num_classes=None)[0])
    grad_params, grad_memory = jax.grad(loss, argnums=(0, 1))(params, memory)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad_memory))  # stop-gradient
    assert float(jnp.abs(grad_params["params"]["input_proj"]["kernel"]).max()) > 0

    # y_t enters only token t + 1: changing the label of the segment's position 1 changes no output before 2
    leaked = segment.at[0, 2, 3].add(5.0)
    _, _, _, _, changed = oc.online_update(params, state, LR, leaked, targets, weights, memory, model=model,
                                           num_classes=None, optimizer=OPTIMIZER)
    np.testing.assert_array_equal(changed[:2], outputs[:2])
    assert np.abs(changed[2:] - outputs[2:]).max() > 0


def test_summaries_by_hand():
    out = oc.summarize(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 0.0, 0.0, 1.0]), np.array([0, 0, 1, 1]), 2)
    assert out == dict(cumulative_loss=2.5, curve_t=[1, 4], curve_loss=[1.0, 2.5], piece_loss=[1.5, 3.5],
                       cumulative_error=0.5, curve_error=[1.0, 0.5])


def test_end_to_end_and_report(tmp_path):
    assert oc.main(_args(tmp_path, lrs=(0.3, 0.01))) == 0
    run_dir = tmp_path / "online_continual" / "attention"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["examples"] == 16 and [r["learner"] for r in result["rows"]] == ["xl+replay", "linear"]
    for row in result["rows"]:
        assert row["stream"] == "piecewise_regression" and row["curve_t"][-1] == 16 and len(row["piece_loss"]) == 2
        assert np.isclose(row["curve_loss"][-1], row["cumulative_loss"]) and np.isfinite(row["cumulative_loss"])
        assert set(row["lr_losses"]) == {"0.3", "0.01"}  # reported at the rate of lowest cumulative loss
        assert row["cumulative_loss"] == min(row["lr_losses"].values()) == row["lr_losses"][str(row["lr"])]
    section = oc.report_section([run_dir, tmp_path], tmp_path / "figures")
    assert "| learner | piecewise_regression |" in section and "| xl+replay |" in section and "Bornschein" in section
    assert (tmp_path / "figures" / "online_continual-attention.png").exists()
    with pytest.raises(SystemExit):  # the run exists: --overwrite or --name
        oc.main(_args(tmp_path))


@pytest.mark.parametrize("bad, message", [
    (dict(learners=("xl+replays",)), "learners: expected one of"), (dict(streams=("cifar",)), "streams"),
    (dict(replay_reset=1.5), "replay_reset"), (dict(optimizer="rmsprop"), "optimizer"),
    (dict(replay_streams=0), "replay_streams"), (dict(lrs=(0.0,)), "lrs")])
def test_bad_settings_name_the_argument(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit):
        oc.main(_args(tmp_path, **bad))
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_every_learner_on_every_stream(tmp_path):
    """The default learners on the three streams (real MNIST) at a few updates."""
    default = oc.OnlineContinualConfig()
    args = _args(tmp_path, streams=streams.STREAMS, learners=default.learners, steps=3, optimizer=default.optimizer,
                 lrs=default.lrs, grad_clip=default.grad_clip)
    assert oc.main(args) == 0
    rows = json.loads((tmp_path / "online_continual" / "attention" / "result.json").read_text())["rows"]
    assert len(rows) == 15 and all(np.isfinite(r["cumulative_loss"]) for r in rows)
    assert all(0 <= r["cumulative_error"] <= 1 for r in rows if r["stream"] != "piecewise_regression")
