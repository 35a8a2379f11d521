"""ConTraCon's re-weighting (Roy et al. 2023, equation (1) of ssmjax.models.contracon)
against a loop written from the equation in float64, the delta kernel that gives back
the shared weights bit for bit, adapter shapes and sizes, the entropy task prediction
(equation (2)) by hand, and argument errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ssmjax.models import contracon


def conv_loop(matrix, kernel):
    """``(F * W)[i, j] = sum_{a, b} F[a, b] W[i + a - r, j + b - r]``, zero outside ``W``."""
    m, n = matrix.shape
    k = kernel.shape[0]
    r = k // 2
    out = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            for a in range(k):
                for b in range(k):
                    if 0 <= i + a - r < m and 0 <= j + b - r < n:
                        out[i, j] += kernel[a, b] * matrix[i + a - r, j + b - r]
    return out


def reweight_loop(weight, kernels, biases, gates, head_axis):
    per_head = np.moveaxis(weight, head_axis, 0)
    out = np.stack([conv_loop(w, f) + b + w / (1 + np.exp(-g)) for w, f, b, g in zip(per_head, kernels, biases, gates)])
    return np.moveaxis(out, 0, head_axis)


@pytest.fixture(scope="module")
def tiny():
    """A 1-layer d 8, 2-head backbone and two initialisations of its parameters (float32)."""
    model = contracon.backbone(d_model=8, n_layers=1, num_heads=2, classes_per_task=2, mlp_ratio=1.0)
    init = jax.jit(model.init)
    x = jnp.ones((1, 4, 5), jnp.float32)
    return model, init(jax.random.key(0), x)["params"], init(jax.random.key(5), x)["params"]


@pytest.mark.parametrize("head_axis, shape", [(1, (6, 2, 5)), (0, (2, 5, 6))])
def test_reweight_matches_the_equation_in_float64(head_axis, shape):
    rng = np.random.default_rng(0)
    weight, kernels = rng.standard_normal(shape), rng.standard_normal((2, 3, 3))
    biases, gates = rng.standard_normal(2), rng.standard_normal(2)
    got = contracon.reweight(*(jnp.asarray(a) for a in (weight, kernels, biases, gates)), head_axis=head_axis)
    assert got.dtype == jnp.float64 and got.shape == shape  # x64: conftest enables it
    np.testing.assert_allclose(got, reweight_loop(weight, kernels, biases, gates, head_axis), rtol=1e-12, atol=1e-12)
    # a 5 x 5 kernel wider than the 5-column matrix: padding on both sides
    matrices, wide = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 5, 5))
    np.testing.assert_allclose(contracon.conv2d_same(jnp.asarray(matrices), jnp.asarray(wide)),
                               [conv_loop(m, f) for m, f in zip(matrices, wide)], rtol=1e-12, atol=1e-12)


def delta_adapter(shared, gate_logit, k=3):
    """Centred delta kernels and zero biases on every projection, gate logits ``gate_logit``,
    the shared norms and head as the task's own."""
    delta = np.zeros((2, k, k), np.float32)
    delta[:, k // 2, k // 2] = 1.0
    conv = dict(kernel=delta, bias=np.zeros(2, np.float32), gate=np.full(2, gate_logit, np.float32))
    return contracon.Adapter({p: conv for p in contracon.projection_paths(shared, contracon.PROJECTIONS)},
                             contracon.parent_adapter(shared).own)


def test_delta_kernel_gives_back_the_shared_weights_bit_for_bit(tiny):
    _, shared, _ = tiny
    w = shared["group_0"]["block_0"]["mixer_layer"]["q_proj"]["kernel"]  # [8, 2, 4] float32
    delta = jnp.zeros((2, 5, 5), jnp.float32).at[:, 2, 2].set(1.0)
    np.testing.assert_array_equal(contracon.conv2d_same(jnp.moveaxis(w, 1, 0), delta), jnp.moveaxis(w, 1, 0))
    task_params = jax.jit(contracon.task_params)
    flat_shared = traverse_util.flatten_dict(shared, sep="/")
    # a closed gate (sigmoid(-inf) = 0): every weight, Q, K, V and out included, is the shared one
    for path, leaf in traverse_util.flatten_dict(task_params(shared, delta_adapter(shared, -np.inf)), sep="/").items():
        assert leaf.dtype == flat_shared[path].dtype
        np.testing.assert_array_equal(leaf, flat_shared[path], err_msg=path)
    # an open gate adds sigmoid(alpha) W to the delta's W: (1 + sigmoid(0)) W = 1.5 W exactly
    half = task_params(shared, delta_adapter(shared, 0.0))["group_0"]["block_0"]["mixer_layer"]
    np.testing.assert_array_equal(half["q_proj"]["kernel"], 1.5 * w)
    out = flat_shared["group_0/block_0/mixer_layer/out_proj/kernel"]  # [2, 4, 8]: heads on axis 0
    np.testing.assert_array_equal(half["out_proj"]["kernel"], 1.5 * out)


def test_adapter_shapes_sizes_and_what_it_replaces(tiny):
    _, shared, fresh = tiny
    adapter = jax.jit(partial(contracon.init_adapter, kernel_size=3))(jax.random.key(3), shared, fresh)
    flat_shared = traverse_util.flatten_dict(shared, sep="/")
    assert sorted(adapter.convs) == [f"group_0/block_0/mixer_layer/{p}/kernel" for p in ("k_proj", "q_proj", "v_proj")]
    for conv in adapter.convs.values():
        assert conv["kernel"].shape == (2, 3, 3) and conv["bias"].shape == conv["gate"].shape == (2,)
        assert np.all(np.abs(conv["kernel"]) <= 1 / 3) and np.all(conv["gate"] == contracon.GATE_INIT)
    assert sorted(adapter.own) == sorted(p for p in flat_shared if p.split("/")[-2] in contracon.TASK_SPECIFIC)
    for path, leaf in adapter.own.items():  # the task's own leaves come from the fresh tree
        np.testing.assert_array_equal(leaf, traverse_util.flatten_dict(fresh, sep="/")[path])
    norms_and_head = 3 * 2 * 8 + 8 * 2 + 2  # 3 LayerNorms (scale, bias) and an 8 -> 2 head
    assert contracon.count_params(adapter) == 3 * 2 * (3 * 3 + 2) + norms_and_head
    assert contracon.shared_count(shared, adapter) == contracon.count_params(shared) - norms_and_head
    params = traverse_util.flatten_dict(jax.jit(contracon.task_params)(shared, adapter), sep="/")
    for path, leaf in params.items():
        if path in adapter.own:
            np.testing.assert_array_equal(leaf, adapter.own[path], err_msg=path)
        elif path not in adapter.convs:  # the rest is the shared weights
            np.testing.assert_array_equal(leaf, flat_shared[path], err_msg=path)
        else:
            assert not np.array_equal(leaf, flat_shared[path]), path
    # out_proj too: heads on axis 0 of its [heads, d_head, d_model] kernel
    wide = jax.eval_shape(partial(contracon.init_adapter, kernel_size=3, projections=contracon.PROJECTIONS),
                          jax.random.key(3), shared, fresh)
    assert wide.convs["group_0/block_0/mixer_layer/out_proj/kernel"]["kernel"].shape == (2, 3, 3)
    first = contracon.parent_adapter(shared)
    assert first.convs == {} and sorted(first.own) == sorted(adapter.own)


def entropy_of(logits):
    p = np.exp(logits - np.max(logits))
    p /= p.sum()
    return -np.sum(p * np.log(p))


def test_entropy_task_prediction_by_hand():
    # 2 tasks x 1 view x 2 images x 2 classes. Image 0: task 0's model is confident -> task 0, digit 1 of it.
    # Image 1: task 0's model is sure on the original (4, 0) but not on the view (0, 0), task 1's is fairly
    # sure (0, 2.5) on both: with 1 copy task 0 averages to (2, 0) and loses, with 3 copies (3, 0) and wins.
    original = jnp.array([[[0.0, 4.0], [4.0, 0.0]],
                          [[1.0, 0.0], [0.0, 2.5]]])
    augmented = jnp.array([[[[0.0, 4.0], [0.0, 0.0]]],
                           [[[1.0, 0.0], [0.0, 2.5]]]])
    predict = jax.jit(contracon.class_incremental_prediction, static_argnames="copies")
    entropy = jax.jit(contracon.view_entropy, static_argnames="copies")
    expected = [[entropy_of([0.0, 4.0]), entropy_of([2.0, 0.0])], [entropy_of([1.0, 0.0]), entropy_of([0.0, 2.5])]]
    np.testing.assert_allclose(entropy(original, augmented, copies=1), expected, rtol=1e-12)
    task, cls = predict(original, augmented, copies=1)
    np.testing.assert_array_equal(task, [0, 1])
    np.testing.assert_array_equal(cls, [1, 3])  # class = 2 * task + argmax of that task's logits
    task, cls = predict(original, augmented, copies=3)
    np.testing.assert_array_equal(task, [0, 0])
    np.testing.assert_array_equal(cls, [1, 0])
    np.testing.assert_allclose(entropy(original, augmented, copies=3)[0, 1], entropy_of([3.0, 0.0]), rtol=1e-12)


def test_errors_name_the_argument(tiny):
    _, shared, _ = tiny
    with pytest.raises(ValueError, match="kernel_size: expected an odd"):
        contracon.init_adapter(jax.random.key(0), shared, shared, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size: expected a positive int"):
        contracon.check_kernel_size(0)
    with pytest.raises(ValueError, match="projections"):
        contracon.projection_paths(shared, ("w_proj",))
    with pytest.raises(ValueError, match="no attention projection"):
        contracon.projection_paths({"dense": {"kernel": jnp.ones((2, 2))}})
    with pytest.raises(ValueError, match="components"):
        contracon.parent_adapter(shared, ("nothing",))
    with pytest.raises(ValueError, match="weight: expected a 3-D projection with 3 heads"):
        contracon.reweight(jnp.ones((8, 2, 4)), jnp.ones((3, 3, 3)), jnp.ones(3), jnp.ones(3), head_axis=1)
    with pytest.raises(ValueError, match="matrices, kernels"):
        contracon.conv2d_same(jnp.ones((2, 4, 4)), jnp.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="adapter: 'head/w'"):
        contracon.task_params(shared, contracon.Adapter({}, {"head/w": jnp.ones(2)}))
    with pytest.raises(ValueError, match="copies"):
        contracon.view_entropy(jnp.ones((2, 3, 2)), jnp.ones((2, 1, 3, 2)), copies=0)
