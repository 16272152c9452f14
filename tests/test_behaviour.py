"""Semantics that the parity tests do not single out: state handling, transforms, the modules."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn
from reference import Float64BatchNorm, torch_forward, torch_layer


def _x(shape=(4, 3, 5, 5), seed=0, scale=2.0, offset=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale + offset, jnp.float32)


def test_init_matches_torch_initial_state():
    params, state = jbn.init(5)
    layer = torch.nn.BatchNorm2d(5)
    for key, value in layer.state_dict().items():
        tree = params if key in params else state
        np.testing.assert_array_equal(np.asarray(tree[key]), value.numpy())
    assert state["num_batches_tracked"].shape == () and state["num_batches_tracked"].dtype == jnp.int32
    assert jbn.init(5, affine=False, track_running_stats=False) == ({}, {})


def test_evaluation_leaves_state_unchanged():
    params, state = jbn.init(3)
    _, state = jbn.batch_norm(params, state, _x(), True)
    _, after = jbn.batch_norm(params, state, _x(seed=1), False)
    for key in state:
        np.testing.assert_array_equal(after[key], state[key])


def test_imports_with_docstrings_stripped():
    # python -OO drops docstrings; the classes whose docstrings jbn extends still import.
    import subprocess
    import sys

    subprocess.run([sys.executable, "-OO", "-c", "import jbn, jbn.nnx"], check=True)


def test_new_state_keeps_the_state_key_order():
    # PyTorch's state_dict order, as init gives it; a compiled program's output dict
    # would come back sorted.
    params, state = jbn.init(3)
    x = jnp.arange(12.0).reshape(4, 3)
    for s in (state, dict(reversed(state.items()))):
        for train in (True, False):
            assert list(jbn.batch_norm(params, s, x, train)[1]) == list(s)


def test_module_init_does_not_move_statistics_even_when_training():
    x = _x()
    for train in (False, True):
        variables = jbn.BatchNorm2d(3).init(jax.random.key(0), x, train=train)
        stats = variables["batch_stats"]
        np.testing.assert_array_equal(stats["running_mean"], np.zeros(3))
        np.testing.assert_array_equal(stats["running_var"], np.ones(3))
        assert int(stats["num_batches_tracked"]) == 0


def test_module_init_takes_one_value_per_channel_that_training_rejects():
    # init updates no statistics, so a batch too small to train on (one sample
    # through a layer fixed to training, a per-device batch of one for a synchronized
    # layer) still initializes; its y is training's closed form, the bias (zeros).
    x = jnp.asarray([[0.5, -2.0, 3.0]])
    cases = [(jbn.BatchNorm1d(3, train=True), x, {}),
             (jbn.BatchNorm1d(3, track_running_stats=False), x, {"train": False}),
             (jbn.SyncBatchNorm(3, axis_name="batch"), x[..., None, None], {"train": True})]
    for model, batch, kwargs in cases:
        y, variables = model.init_with_output(jax.random.key(0), batch, **kwargs)
        np.testing.assert_array_equal(y, np.zeros(batch.shape))
        for key, value in variables.get("batch_stats", {}).items():
            np.testing.assert_array_equal(value, jbn.init(3)[1][key])
    for model, batch, kwargs in cases[:2]:
        variables = model.init(jax.random.key(0), batch, **kwargs)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            model.apply(variables, batch, mutable=["batch_stats"], **kwargs)


def test_module_evaluation_leaves_batch_stats_unchanged():
    model = jbn.BatchNorm2d(3)
    variables = model.init(jax.random.key(0), _x(), train=False)
    _, updates = model.apply(variables, _x(), train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    _, unchanged = model.apply(variables, _x(seed=2), train=False, mutable=["batch_stats"])
    for key, value in variables["batch_stats"].items():
        np.testing.assert_array_equal(unchanged["batch_stats"][key], value)


def test_momentum_none_is_the_cumulative_average_of_unbiased_batch_statistics():
    # Closed form: after k steps with momentum=None the running mean is the plain
    # average of the k batch means, the running variance that of the unbiased variances.
    params, state = jbn.init(3)
    xs = [_x(seed=s, offset=s) for s in range(4)]
    for x in xs:
        _, state = jbn.batch_norm(params, state, x, True, momentum=None)
    xs64 = [np.asarray(x, np.float64) for x in xs]
    np.testing.assert_allclose(state["running_mean"], np.mean([x.mean((0, 2, 3)) for x in xs64], 0),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state["running_var"],
                               np.mean([x.var((0, 2, 3), ddof=1) for x in xs64], 0), rtol=1e-6)
    assert int(state["num_batches_tracked"]) == 4


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_int32_count_stops_at_its_maximum_instead_of_wrapping(momentum):
    # torch counts on in int64; jbn's int32 count must not wrap to a negative value,
    # which would make momentum=None's factor 1 / count negative.
    top = np.iinfo(np.int32).max
    params, state = jbn.init(3)
    state = {**state, "running_mean": jnp.array([1.0, -2.0, 0.5]),
             "running_var": jnp.array([2.0, 0.5, 1.0]),
             "num_batches_tracked": jnp.asarray(top - 1, jnp.int32)}
    layer = torch_layer(2, 3, momentum=momentum)
    layer.load_state_dict({**{k: torch.tensor(np.asarray(v)) for k, v in state.items()},
                           "weight": torch.ones(3), "bias": torch.zeros(3)})
    for seed in range(3):
        x = _x(seed=seed, offset=5.0 * seed)
        _, state = jbn.batch_norm(params, state, x, True, momentum=momentum)
        torch_forward(layer, np.asarray(x), train=True)
    assert state["num_batches_tracked"].dtype == jnp.int32
    assert int(state["num_batches_tracked"]) == top
    assert int(layer.num_batches_tracked) == top + 2
    # Factors of 1 / (2**31 - 1) against torch's 1 / 2**31: equal to float32 precision.
    np.testing.assert_allclose(state["running_mean"], layer.running_mean.numpy(), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(state["running_var"], layer.running_var.numpy(), rtol=1e-6)


def test_without_running_statistics_evaluation_uses_the_batch():
    x = _x()
    y_train, _ = jbn.batch_norm({}, {}, x, True)
    y_eval, state = jbn.batch_norm({}, {}, x, False)
    np.testing.assert_array_equal(y_train, y_eval)
    assert state == {}


def test_channels_last_equals_channels_first():
    x = _x((4, 3, 5, 6))
    params, state = jbn.init(3)
    params = {"weight": jnp.array([0.5, 1.0, 2.0]), "bias": jnp.array([0.0, 1.0, -1.0])}
    y1, s1 = jbn.batch_norm(params, state, x, True)
    y2, s2 = jbn.batch_norm(params, state, jnp.moveaxis(x, 1, -1), True, axis=-1)
    np.testing.assert_allclose(jnp.moveaxis(y2, -1, 1), y1, rtol=1e-6, atol=1e-6)
    for key in s1:
        np.testing.assert_allclose(s2[key], s1[key], rtol=1e-6)


@pytest.mark.parametrize("axis", [0, 2, 3])
def test_any_channel_axis_normalizes_over_the_other_axes(axis):
    x = np.asarray(_x((4, 5, 6, 7)))
    c = x.shape[axis]
    y, _ = jbn.batch_norm({}, {}, x, True, axis=axis)
    expected = np.moveaxis(Float64BatchNorm(c, track=False)(np.moveaxis(x, axis, 1), True), 1, axis)
    np.testing.assert_allclose(y, expected, rtol=2e-6, atol=2e-6)


def test_unbatched_sample_is_a_batch_of_one():
    x = np.asarray(_x((3, 5, 6)))
    model = jbn.BatchNorm2d(3)
    variables = model.init(jax.random.key(0), x, train=False)
    y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    y_batched, updates_batched = model.apply(variables, x[None], train=True, mutable=["batch_stats"])
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, y_batched[0])
    for key, value in updates_batched["batch_stats"].items():
        np.testing.assert_array_equal(updates["batch_stats"][key], value)
    # and the batch of one is exactly torch's (1, C, H, W)
    layer = torch_layer(2, 3)
    np.testing.assert_allclose(y, torch_forward(layer, x[None], True)[0], rtol=2e-6, atol=2e-6)
    # the functional core takes the same sample with axis=0
    y_core, _ = jbn.batch_norm(*jbn.init(3), x, True, axis=0)
    np.testing.assert_array_equal(y_core, y)


def test_unbatched_3d_sample_and_channels_last():
    x = np.asarray(_x((6, 4, 5, 3)))  # (D, H, W, C)
    model = jbn.BatchNorm3d(3, axis=-1)
    variables = model.init(jax.random.key(0), x, train=False)
    y, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    y_batched, _ = model.apply(variables, x[None], train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, y_batched[0])


def test_affine_false_has_no_params_and_track_false_no_batch_stats():
    x = _x()
    variables = jbn.BatchNorm2d(3, affine=False, track_running_stats=False).init(
        jax.random.key(0), x, train=False)
    assert "params" not in variables and "batch_stats" not in variables
    variables = jbn.BatchNorm2d(3).init(jax.random.key(0), x, train=False)
    assert set(variables["params"]) == {"weight", "bias"}
    assert set(variables["batch_stats"]) == {"running_mean", "running_var", "num_batches_tracked"}


def test_param_dtype_and_dtype_fields():
    model = jbn.BatchNorm1d(3, param_dtype=jnp.bfloat16, dtype=jnp.float32)
    x = _x((8, 3)).astype(jnp.bfloat16)
    variables = model.init(jax.random.key(0), x, train=False)
    assert variables["params"]["weight"].dtype == jnp.bfloat16
    assert variables["batch_stats"]["running_var"].dtype == jnp.float32
    assert model.apply(variables, x, train=False).dtype == jnp.float32


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = jbn.BatchNorm2d(4, axis=-1)(x, train)
        return jnp.mean(nn.relu(x))


@pytest.mark.parametrize("transform", ["eager", "jit", "vmap", "remat"])
def test_transforms_give_the_same_results_as_eager(transform):
    x = _x((4, 3, 5, 5))
    params, state = jbn.init(3)

    def f(x):
        return jbn.batch_norm(params, state, x, True)

    y, new_state = f(x)
    if transform == "jit":
        y2, state2 = jax.jit(f)(x)
    elif transform == "vmap":  # an ensemble axis: each member normalized on its own
        y2, state2 = jax.vmap(f)(jnp.stack([x, x]))
        y2, state2 = y2[1], jax.tree_util.tree_map(lambda a: a[1], state2)
    elif transform == "remat":
        y2, state2 = jax.checkpoint(f)(x)
    else:
        y2, state2 = f(x)
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)
    for key in new_state:
        np.testing.assert_allclose(state2[key], new_state[key], rtol=1e-6)


def test_gradient_through_remat_and_jit_equals_eager():
    x = _x((4, 3, 5, 5))
    params, state = jbn.init(3)

    def loss(params, x):
        y, _ = jbn.batch_norm(params, state, x, True)
        return jnp.sum(jnp.tanh(y))

    eager = jax.grad(loss, argnums=(0, 1))(params, x)
    for wrapped in (jax.jit(jax.grad(loss, argnums=(0, 1))),
                    jax.grad(jax.checkpoint(loss), argnums=(0, 1))):
        for a, b in zip(jax.tree_util.tree_leaves(wrapped(params, x)), jax.tree_util.tree_leaves(eager), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_flax_model_trains_and_evaluates_in_a_jitted_step():
    model = _Net()
    x = jnp.moveaxis(_x((4, 3, 6, 6)), 1, -1)
    variables = model.init(jax.random.key(0), x, train=False)

    @jax.jit
    def step(variables, x):
        def loss(params):
            out, updates = model.apply({**variables, "params": params}, x, train=True,
                                       mutable=["batch_stats"])
            return out, updates
        (out, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, variables["params"], grads)
        return {"params": params, **updates}, out

    new_variables, _ = step(variables, x)
    assert int(new_variables["batch_stats"]["BatchNorm2d_0"]["num_batches_tracked"]) == 1
    assert not np.allclose(new_variables["params"]["BatchNorm2d_0"]["weight"], 1.0)
    assert np.isfinite(model.apply(new_variables, x, train=False))


def test_mode_as_a_field_runs_layers_inside_sequential_like_torch():
    # nn.Sequential passes call arguments to its first layer only: a layer inside it
    # takes its mode from the train field, as torch's layers take it from .train().
    x = _x((4, 3, 5, 5))
    torch_model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                      torch.nn.BatchNorm2d(3, momentum=None))

    def flax_model(train):
        return nn.Sequential([jbn.BatchNorm2d(3, train=train), nn.relu,
                              jbn.BatchNorm2d(3, momentum=None, train=train)])

    variables = flax_model(False).init(jax.random.key(0), x)
    for step in range(2):
        y, updates = flax_model(True).apply(variables, x + step, mutable=["batch_stats"])
        variables = {**variables, **updates}
        want = torch_forward(torch_model, np.asarray(x + step), train=True)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    for i in range(2):
        layer, stats = torch_model[2 * i], variables["batch_stats"][f"layers_{2 * i}"]
        np.testing.assert_allclose(stats["running_mean"], layer.running_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["running_var"], layer.running_var, rtol=1e-5, atol=1e-6)
        assert int(stats["num_batches_tracked"]) == int(layer.num_batches_tracked) == 2
    y = flax_model(False).apply(variables, x)
    np.testing.assert_allclose(y, torch_forward(torch_model, np.asarray(x), train=False),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 4, 4), (2, 3, 0, 4), (0, 3, 2, 2, 2)])
def test_empty_batch_is_counted_and_keeps_the_statistics_like_torch(shape, momentum):
    layer = torch_layer(len(shape) - 2, 3, momentum=momentum)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, -2.0, 3.0]))
        layer.running_var.copy_(torch.tensor([0.5, 2.0, 4.0]))
    params, state = jbn.init(3)
    state = dict(state, running_mean=jnp.asarray([1.0, -2.0, 3.0]),
                 running_var=jnp.asarray([0.5, 2.0, 4.0]))
    step = jax.jit(lambda p, s, x: jbn.batch_norm(p, s, x, True, momentum=momentum))
    for train in (True, True, False):
        expected = torch_forward(layer, np.zeros(shape, np.float32), train)
        y, state = step(params, state, jnp.zeros(shape)) if train else jbn.batch_norm(
            params, state, jnp.zeros(shape), False)
        assert y.shape == expected.shape and y.dtype == jnp.float32
        for key, value in layer.state_dict().items():
            tree = params if key in params else state
            np.testing.assert_array_equal(np.asarray(tree[key]), value.numpy(), err_msg=key)


def test_empty_batch_gradients_are_zero_and_finite():
    params, state = jbn.init(3)
    x = jnp.zeros((0, 3, 4, 4), jnp.bfloat16)

    def loss(p, x):
        return jnp.sum(jbn.batch_norm(p, state, x, True)[0].astype(jnp.float32))

    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    assert g_x.shape == x.shape and g_x.dtype == x.dtype
    for g in g_params.values():
        np.testing.assert_array_equal(g, np.zeros(3))
    y, new = jbn.BatchNorm2d(3).apply({"params": params, "batch_stats": state}, x, train=True,
                                      mutable=["batch_stats"])
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    assert int(new["batch_stats"]["num_batches_tracked"]) == 1


def test_direct_calls_trace_batch_norm_once_per_signature(monkeypatch):
    # Called op by op (a notebook, a debugging session), batch_norm runs one cached
    # program per signature instead of tracing and dispatching its pieces each time.
    from jbn import _batch_norm

    traces = []
    original = _batch_norm._normalize_with_batch_stats

    def counted(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_batch_norm, "_normalize_with_batch_stats", counted)
    params, state = jbn.init(3)
    for seed in range(3):
        _, state = jbn.batch_norm(params, state, _x(shape=(4, 3, 5, 7), seed=seed), True,
                                  eps=2e-5)
    assert len(traces) == 1
    jbn.batch_norm(params, state, _x(shape=(4, 3, 5, 7)), True, eps=3e-5)  # a new signature
    assert len(traces) == 2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_runs_under_strict_dtype_promotion_as_under_standard(dtype):
    # The float32 computation of low-precision input is chosen by width, not by JAX's
    # promotion, which refuses bfloat16 with float32 in strict mode.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 5, 5)) + 2, dtype)
    module = jbn.BatchNorm2d(3, param_dtype=dtype)

    def run():
        params, state = jbn.init(3, dtype=dtype)
        loss = lambda p, x: jnp.sum(jbn.batch_norm(p, state, x, True)[0].astype(jnp.float32))  # noqa: E731
        variables = module.init(jax.random.key(0), x, train=False)
        y, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return (jbn.batch_norm(params, state, x, True), jbn.batch_norm(params, state, x, False),
                jax.grad(loss, argnums=(0, 1))(params, x), y, updates,
                jbn.fold_conv_bn(jnp.ones((3, 3, 2, 3), dtype), None, variables))

    want = run()
    with jax.numpy_dtype_promotion("strict"):
        got = run()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("path", ["kernel", "masked", "float16"])
def test_channels_of_infinities_and_nan_give_torchs_statistics(path):
    # A channel sampled at infinities: its mean is torch's inf (or -inf), not the NaN
    # of inf - inf; its variance and outputs NaN, as torch's. Masked and float16 batches
    # take XLA's sums on the CPU, the others the kernel where it was built.
    x = np.random.default_rng(3).standard_normal((6, 4, 5)).astype(np.float32)
    x[:, 0] = np.inf
    x[:4, 1] = -np.inf
    x[0, 2, 0] = np.nan
    layer = torch.nn.BatchNorm1d(4).train()
    expected_y = layer(torch.from_numpy(x)).detach().numpy()
    dtype = jnp.float16 if path == "float16" else jnp.float32
    mask = jnp.ones((6, 5), bool) if path == "masked" else None
    y, state = jbn.batch_norm(*jbn.init(4), jnp.asarray(x, dtype), True, mask=mask)
    np.testing.assert_array_equal(state["running_mean"][:3], layer.running_mean.numpy()[:3])
    np.testing.assert_allclose(state["running_mean"][3], layer.running_mean.numpy()[3],
                               rtol=1e-5, atol=1e-3 if path == "float16" else 0)
    np.testing.assert_array_equal(np.isnan(state["running_var"]),
                                  np.isnan(layer.running_var.numpy()))
    np.testing.assert_array_equal(np.isnan(y[:, :3]), np.isnan(expected_y[:, :3]))
    np.testing.assert_allclose(np.asarray(y[:, 3], np.float32), expected_y[:, 3],
                               rtol=1e-2 if path == "float16" else 1e-5, atol=1e-2)
