"""recalibrate_batch_stats against the data's statistics and against torch's update_bn."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

import jbn


class _Net(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear -> BatchNorm1d(momentum=0.3)."""

    @nn.compact
    def __call__(self, x, train):
        x = jbn.BatchNorm1d(5, name="bn0")(x, train)
        x = nn.relu(jbn.BatchNorm1d(8, name="bn1")(nn.Dense(8, name="fc1")(x), train))
        return jbn.BatchNorm1d(4, momentum=0.3, name="bn2")(nn.Dense(4, name="fc2")(x), train)


def _torch_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.BatchNorm1d(5),
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
        torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4, momentum=0.3),
    )


def _flax_variables(tnet):
    params = {
        "fc1": {"kernel": tnet[1].weight.detach().numpy().T, "bias": tnet[1].bias.detach().numpy()},
        "fc2": {"kernel": tnet[4].weight.detach().numpy().T, "bias": tnet[4].bias.detach().numpy()},
    }
    variables = _Net().init(jax.random.key(0), jnp.ones((2, 5)), train=False)
    return {"params": {**variables["params"], **jax.tree.map(jnp.asarray, params)},
            "batch_stats": variables["batch_stats"]}


def _apply(v, x):
    return _Net().apply(v, x, train=True, mutable=["batch_stats"])


def _batches(k=6, n=16, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, 5)) * [1, 2, 3, 4, 5] + [5, -3, 0, 1, 10]).astype(np.float32)
            for _ in range(k)]


def test_input_layer_gets_population_mean_and_average_unbiased_batch_variance():
    batches = _batches()
    out = jbn.recalibrate_batch_stats(_apply, _flax_variables(_torch_net()), batches)
    stats = out["batch_stats"]["bn0"]
    data = np.stack(batches).astype(np.float64)  # (K, n, 5)
    np.testing.assert_allclose(stats["running_mean"], data.reshape(-1, 5).mean(0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(stats["running_var"], data.var(axis=1, ddof=1).mean(0), rtol=1e-5)
    assert int(stats["num_batches_tracked"]) == len(batches)


def test_hidden_layer_gets_the_average_of_its_training_mode_batch_statistics():
    tnet = _torch_net()
    batches = _batches()
    variables = _flax_variables(tnet)
    out = jbn.recalibrate_batch_stats(_apply, variables, batches)
    w = tnet[1].weight.detach().numpy().astype(np.float64)
    b = tnet[1].bias.detach().numpy().astype(np.float64)
    means, variances = [], []
    for x in batches:
        x = x.astype(np.float64)
        h = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) @ w.T + b  # bn0 in training, then fc1
        means.append(h.mean(0))
        variances.append(h.var(0, ddof=1))
    stats = out["batch_stats"]["bn1"]
    np.testing.assert_allclose(stats["running_mean"], np.mean(means, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["running_var"], np.mean(variances, 0), rtol=1e-5)


def test_matches_torch_update_bn_and_keeps_params():
    tnet = _torch_net()
    batches = _batches()
    variables = _flax_variables(tnet)
    # Running statistics before recalibration must not matter: start from other values.
    variables["batch_stats"] = jax.tree.map(lambda a: a + 3, variables["batch_stats"])
    out = jbn.recalibrate_batch_stats(_apply, variables, batches)
    update_bn([torch.from_numpy(x) for x in batches], tnet)
    for name, layer in (("bn0", tnet[0]), ("bn1", tnet[2]), ("bn2", tnet[5])):
        stats = out["batch_stats"][name]
        np.testing.assert_allclose(stats["running_mean"], layer.running_mean.numpy(), 1e-5, 1e-5)
        np.testing.assert_allclose(stats["running_var"], layer.running_var.numpy(), 1e-5, 1e-5)
        assert int(stats["num_batches_tracked"]) == int(layer.num_batches_tracked)
    jax.tree.map(np.testing.assert_array_equal, out["params"], variables["params"])


def test_averaged_variables_with_a_float_count_recalibrate_with_an_integer_count():
    # Averaging all of a model's variables (SWA, an EMA) makes the count a float, which
    # training refuses; recalibration resets it to an integer, as update_bn does.
    tnet = _torch_net()
    batches = _batches()
    variables = _flax_variables(tnet)
    averaged = jax.tree.map(lambda a, b: (a + b) / 2, variables, variables)
    assert averaged["batch_stats"]["bn0"]["num_batches_tracked"].dtype == jnp.float32
    with pytest.raises(TypeError, match="num_batches_tracked'] must be an integer array"):
        _apply(averaged, batches[0])
    out = jbn.recalibrate_batch_stats(_apply, averaged, batches)
    update_bn([torch.from_numpy(x) for x in batches], tnet)
    for name, layer in (("bn0", tnet[0]), ("bn1", tnet[2]), ("bn2", tnet[5])):
        stats = out["batch_stats"][name]
        assert stats["num_batches_tracked"].dtype == jnp.int32
        assert int(stats["num_batches_tracked"]) == int(layer.num_batches_tracked)
        np.testing.assert_allclose(stats["running_var"], layer.running_var.numpy(), 1e-5, 1e-5)


def test_modules_keep_their_momentum_after_recalibration():
    batches = _batches(k=2)
    out = jbn.recalibrate_batch_stats(_apply, _flax_variables(_torch_net()), batches, jit=False)
    x = jnp.asarray(batches[0])
    _, updates = _apply(out, x)
    before, after = out["batch_stats"]["bn0"], updates["batch_stats"]["bn0"]
    mean = np.asarray(x, np.float64).mean(0)
    np.testing.assert_allclose(after["running_mean"], 0.9 * before["running_mean"] + 0.1 * mean,
                               rtol=1e-5, atol=1e-5)


def test_progress_bar_runs_and_result_is_the_same(capsys):
    batches = _batches(k=3)
    variables = _flax_variables(_torch_net())
    quiet = jbn.recalibrate_batch_stats(_apply, variables, batches)
    shown = jbn.recalibrate_batch_stats(_apply, variables, batches, progress=True)
    jax.tree.map(np.testing.assert_array_equal, quiet, shown)


def test_progress_bar_without_rich_names_the_install(monkeypatch):
    # rich comes with the demo extra only; a core install gets a clear ImportError.
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    with pytest.raises(ImportError, match=r"pip install rich"):
        jbn.recalibrate_batch_stats(_apply, _flax_variables(_torch_net()), _batches(k=1),
                                    progress=True)


def _assert_update_bn(out, tnet):
    for name, layer in (("bn0", tnet[0]), ("bn1", tnet[2]), ("bn2", tnet[5])):
        stats = out["batch_stats"][name]
        np.testing.assert_allclose(stats["running_mean"], layer.running_mean.numpy(), 1e-5, 1e-5)
        np.testing.assert_allclose(stats["running_var"], layer.running_var.numpy(), 1e-5, 1e-5)


@pytest.mark.parametrize("jit", [True, False])
def test_jitted_functions_inside_apply_fn_take_the_cumulative_average_and_keep_their_own(jit):
    # The momentum override acts at trace time: a function jitted elsewhere would reuse
    # its earlier trace (momentum 0.1) here, or keep the override for later calls.
    tnet = _torch_net()
    batches = _batches()
    variables = _flax_variables(tnet)
    traced_before = jax.jit(_apply)
    traced_before(variables, batches[0])
    traced_first_here = jax.jit(_apply)
    update_bn([torch.from_numpy(x) for x in batches], tnet)
    for fn in (traced_before, traced_first_here):
        out = jbn.recalibrate_batch_stats(lambda v, x, fn=fn: fn(v, x), variables, batches,
                                          jit=jit)
        _assert_update_bn(out, tnet)
        _assert_update_bn(jbn.recalibrate_batch_stats(fn, variables, batches, jit=jit), tnet)
        # ... and afterwards each keeps the layers' own momentum.
        x = batches[1]
        _, updates = fn(variables, x)
        np.testing.assert_allclose(updates["batch_stats"]["bn0"]["running_mean"],
                                   0.1 * np.asarray(x, np.float64).mean(0), rtol=1e-5, atol=1e-6)


def test_layers_under_nn_jit_take_the_cumulative_average():
    class JittedBlock(nn.Module):
        @nn.jit
        @nn.compact
        def __call__(self, x):
            return jbn.BatchNorm1d(5, name="bn")(x, True)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return JittedBlock(name="block")(x)

    batches = _batches()
    variables = Net().init(jax.random.key(0), jnp.ones((2, 5)))
    apply = lambda v, x: Net().apply(v, x, mutable=["batch_stats"])  # noqa: E731
    apply(variables, batches[0])  # traced before, with momentum 0.1
    out = jbn.recalibrate_batch_stats(apply, variables, batches)
    data = np.stack(batches).astype(np.float64)
    stats = out["batch_stats"]["block"]["bn"]
    np.testing.assert_allclose(stats["running_mean"], data.reshape(-1, 5).mean(0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(stats["running_var"], data.var(axis=1, ddof=1).mean(0), rtol=1e-5)


def test_batches_of_two_shapes_each_enter_with_their_own_statistics():
    tnet = _torch_net()
    batches = _batches(k=3) + _batches(k=2, n=5, seed=1)
    out = jbn.recalibrate_batch_stats(_apply, _flax_variables(tnet), batches)
    update_bn([torch.from_numpy(x) for x in batches], tnet)
    _assert_update_bn(out, tnet)


def test_rejects_missing_state_and_no_batches():
    variables = _flax_variables(_torch_net())
    with pytest.raises(ValueError, match="no batch-norm state"):
        jbn.recalibrate_batch_stats(_apply, {"params": variables["params"]}, _batches(k=1))
    with pytest.raises(ValueError, match="empty"):
        jbn.recalibrate_batch_stats(_apply, variables, [])


def test_nnx_model_through_split_and_merge_matches_torch_update_bn():
    from flax import nnx

    from jbn import nnx as jnnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.bn0 = jnnx.BatchNorm1d(5)
            self.fc = nnx.Linear(5, 4, rngs=rngs)
            self.bn1 = jnnx.BatchNorm1d(4, momentum=0.3)

        def __call__(self, x):
            return self.bn1(self.fc(self.bn0(x)))

    model = Net(nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    variables = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}

    def apply_fn(v, x):
        m = nnx.merge(graphdef, v["params"], v["batch_stats"])
        m.train()
        return m(x), {"batch_stats": nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))}

    batches = _batches(k=4)
    out = jbn.recalibrate_batch_stats(apply_fn, variables, batches)
    tnet = torch.nn.Sequential(torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 4),
                               torch.nn.BatchNorm1d(4, momentum=0.3))
    with torch.no_grad():
        tnet[1].weight.copy_(torch.tensor(np.asarray(model.fc.kernel[...]).T))
        tnet[1].bias.copy_(torch.tensor(np.asarray(model.fc.bias[...])) + 1.0)
    out["params"]["fc"]["bias"] = out["params"]["fc"]["bias"] + 1.0  # a non-zero mean for bn1
    out = jbn.recalibrate_batch_stats(apply_fn, out, batches)
    update_bn([torch.from_numpy(x) for x in batches], tnet)
    nnx.update(model, out["batch_stats"])
    for bn, layer in ((model.bn0, tnet[0]), (model.bn1, tnet[2])):
        np.testing.assert_allclose(bn.running_mean[...], layer.running_mean.numpy(), 1e-5, 1e-5)
        np.testing.assert_allclose(bn.running_var[...], layer.running_var.numpy(), 1e-5, 1e-5)
        assert int(bn.num_batches_tracked[...]) == int(layer.num_batches_tracked)


def test_layers_left_in_evaluation_mode_raise_instead_of_returning_reset_statistics():
    class Frozen(nn.Module):
        """bn1 fixed to evaluation mode by its field: no batch reaches its statistics."""

        @nn.compact
        def __call__(self, x):
            x = jbn.BatchNorm1d(5, train=True, name="bn0")(x)
            return jbn.BatchNorm1d(5, train=False, name="bn1")(x)

    variables = Frozen().init(jax.random.key(0), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="no batch updated the statistics of bn1:"):
        jbn.recalibrate_batch_stats(
            lambda v, x: Frozen().apply(v, x, mutable=["batch_stats"]), variables, _batches(k=2))
    with pytest.raises(ValueError, match="bn0, bn1, bn2: apply_fn must run"):
        jbn.recalibrate_batch_stats(
            lambda v, x: _Net().apply(v, x, train=False, mutable=["batch_stats"]),
            _flax_variables(_torch_net()), _batches(k=2))


def test_variables_with_a_device_axis_recalibrate_each_copy():
    # apply_fn mapped over devices returns one num_batches_tracked per device.
    model = jbn.BatchNorm1d(5)
    variables = model.init(jax.random.key(0), jnp.ones((2, 5)), train=False)
    variables = jax.tree.map(lambda a: jnp.stack([a, a]), variables)
    apply_fn = jax.vmap(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    batches = [np.stack([b, 2 * b]) for b in _batches(k=3)]  # (2 devices, 16, 5) each
    stats = jbn.recalibrate_batch_stats(apply_fn, variables, batches)["batch_stats"]
    np.testing.assert_array_equal(stats["num_batches_tracked"], [3, 3])
    data = np.stack(batches).astype(np.float64)  # (K, devices, n, 5)
    np.testing.assert_allclose(stats["running_mean"], data.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(stats["running_var"], data.var(axis=2, ddof=1).mean(0), rtol=1e-5)
