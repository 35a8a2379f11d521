"""The epoch trainer (ssmjax.train.fit): schedules, early stopping, best parameters,
exact resume, batched prediction without dropped rows."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssmjax.train.fit import FitConfig, _train_step, epoch_batches, fit, predict_in_batches


def _regression(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3)[:, None]
    return x, y


def _loss(params, batch, key):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _params():
    return dict(w=jnp.zeros((3, 1), jnp.float32), b=jnp.zeros((1,), jnp.float32))


def test_epoch_lr_schedules():
    assert [FitConfig(lr=0.01).epoch_lr(e) for e in range(3)] == [0.01, 0.005, 0.0025]
    assert FitConfig(lr=0.01, lr_schedule="constant").epoch_lr(5) == 0.01
    cosine = FitConfig(lr=0.01, lr_schedule="cosine", epochs=4)
    np.testing.assert_allclose([cosine.epoch_lr(e) for e in (0, 2)], [0.01, 0.005])


def test_epoch_batches_visit_every_example_once():
    batches = epoch_batches(10, 4, seed=0, epoch=1, drop_last=False)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert [len(b) for b in epoch_batches(10, 4, seed=0, epoch=1, drop_last=True)] == [4, 4]
    assert not np.array_equal(np.concatenate(batches), np.concatenate(epoch_batches(10, 4, 0, 2, False)))


def test_fit_learns_a_linear_map():
    x, y = _regression()
    val = lambda p: float(_loss(p, (x, y), None))  # noqa: E731
    result = fit(_loss, _params(), (x, y), val, FitConfig(epochs=30, batch_size=8, lr=0.1, lr_schedule="constant",
                                                         patience=0), verbose=False)
    np.testing.assert_allclose(np.asarray(result.params["w"])[:, 0], [1.0, -2.0, 0.5], atol=1e-3)
    assert len(result.history) == 30 and not result.stopped_early
    assert result.best_val == min(r["val_loss"] for r in result.history)


def test_early_stopping_returns_the_best_epoch():
    x, y = _regression()
    scores = iter([1.0, 0.5, 0.7, 0.6, 0.9, 0.1])
    seen = []

    def validate(params):
        seen.append(np.asarray(params["w"]).copy())
        return next(scores)

    result = fit(_loss, _params(), (x, y), validate, FitConfig(epochs=6, batch_size=8, lr=0.01, patience=3),
                 verbose=False)
    assert result.stopped_early and len(result.history) == 5  # epochs 2, 3, 4 do not beat epoch 1
    assert result.best_epoch == 1 and result.best_val == 0.5
    np.testing.assert_array_equal(np.asarray(result.params["w"]), seen[1])


def test_resume_continues_exactly(tmp_path):
    x, y = _regression()
    val = lambda p: float(_loss(p, (x, y), None))  # noqa: E731
    config = FitConfig(epochs=4, batch_size=8, lr=0.05, patience=0)
    whole = fit(_loss, _params(), (x, y), val, config, verbose=False)
    fit(_loss, _params(), (x, y), val, FitConfig(epochs=2, batch_size=8, lr=0.05, patience=0),
        run_dir=tmp_path, verbose=False)
    resumed = fit(_loss, _params(), (x, y), val, config, run_dir=tmp_path, resume=True, verbose=False)
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(whole.params["w"]))
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]


def _offset_loss(params, batch, key, offset):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] + offset - y) ** 2)


def test_loss_args_reach_the_loss_and_the_step_compiles_once():
    """A learning-rate grid over the same loss function, with a frozen offset passed in
    ``loss_args``, compiles one update step; each fit equals one with the offset closed over."""
    x, y = _regression()
    before = _train_step._cache_size()
    for lr, offset in ((0.05, 0.0), (0.02, 1.5), (0.01, -0.5)):
        config = FitConfig(epochs=3, batch_size=8, lr=lr, patience=0, seed=int(lr * 100))
        shifted = fit(_offset_loss, _params(), (x, y), lambda p: 0.0, config,
                      loss_args=(jnp.float32(offset),), verbose=False)
        closed = fit(lambda p, b, k: _offset_loss(p, b, k, jnp.float32(offset)), _params(), (x, y), lambda p: 0.0,
                     config, verbose=False)
        np.testing.assert_array_equal(np.asarray(shifted.params["w"]), np.asarray(closed.params["w"]))
    assert _train_step._cache_size() - before == 1 + 3  # one for _offset_loss, one per fresh closure


def test_predict_in_batches_keeps_every_row():
    x = np.arange(10, dtype=np.float32)[:, None]
    out = predict_in_batches(lambda a: a * 2, (x,), batch_size=4)
    np.testing.assert_array_equal(out, x * 2)


@pytest.mark.parametrize("field, value, match", [("lr_schedule", "step", "lr_schedule"), ("batch_size", 0, "batch_size"),
                                                 ("patience", -1, "patience"), ("weight_decay", 0.1, "weight_decay")])
def test_config_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        FitConfig(**{field: value})


def test_too_few_examples_is_an_error():
    x, y = _regression(n=4)
    with pytest.raises(ValueError, match="train_data"):
        fit(_loss, _params(), (x, y), lambda p: 0.0, FitConfig(batch_size=8), verbose=False)
