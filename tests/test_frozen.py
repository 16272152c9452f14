"""FrozenBatchNorm2d against its formula and against torch BatchNorm2d in evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn


def _trained_torch_bn(seed=0):
    torch.manual_seed(seed)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(4))
        bn.bias.copy_(torch.randn(4))
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.1)
        bn.num_batches_tracked.fill_(12)
    return bn.eval()


def _x(shape=(2, 4, 5, 6), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 3 + 1


def test_default_eps_and_initial_tensors_are_torchvisions():
    layer = jbn.FrozenBatchNorm2d(4)
    assert layer.eps == 1e-5
    stats = layer.init(jax.random.key(0), jnp.ones((2, 4, 3, 3)))["batch_stats"]
    assert set(stats) == {"weight", "bias", "running_mean", "running_var"}
    np.testing.assert_array_equal(stats["weight"], np.ones(4))
    np.testing.assert_array_equal(stats["bias"], np.zeros(4))
    np.testing.assert_array_equal(stats["running_mean"], np.zeros(4))
    np.testing.assert_array_equal(stats["running_var"], np.ones(4))


@pytest.mark.parametrize("train", [False, True])
def test_output_equals_torchvision_formula(train):
    tbn = _trained_torch_bn()
    variables = jbn.FrozenBatchNorm2d.from_torch_state_dict(tbn.state_dict())
    s = {k: np.asarray(v, np.float64) for k, v in variables["batch_stats"].items()}
    x = _x()
    # torchvision: scale = w * rsqrt(rv + eps); shift = b - rm * scale; y = x * scale + shift
    scale = s["weight"] * (s["running_var"] + 1e-5) ** -0.5
    shift = s["bias"] - s["running_mean"] * scale
    expected = x * scale[:, None, None] + shift[:, None, None]
    y = jbn.FrozenBatchNorm2d(4).apply(variables, jnp.asarray(x), train=train)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_equals_torch_batch_norm_2d_in_eval_and_channels_last_too():
    tbn = _trained_torch_bn()
    x = _x()
    expected = tbn(torch.from_numpy(x)).detach().numpy()
    variables = jbn.FrozenBatchNorm2d.from_torch_state_dict(tbn.state_dict())
    y = jbn.FrozenBatchNorm2d(4).apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    y_last = jbn.FrozenBatchNorm2d(4, axis=-1).apply(variables,
                                                     jnp.asarray(x).transpose(0, 2, 3, 1))
    np.testing.assert_allclose(y_last.transpose(0, 3, 1, 2), expected, rtol=1e-6, atol=1e-6)


def test_training_does_not_change_the_tensors():
    tbn = _trained_torch_bn()
    variables = jbn.FrozenBatchNorm2d.from_torch_state_dict(tbn.state_dict())
    _, updates = jbn.FrozenBatchNorm2d(4).apply(variables, jnp.asarray(_x()), train=True,
                                                mutable=["batch_stats"])
    for k, v in variables["batch_stats"].items():
        np.testing.assert_array_equal(updates["batch_stats"][k], v)


def test_no_gradient_reaches_the_tensors_and_input_gradient_is_the_scale():
    tbn = _trained_torch_bn()
    variables = jbn.FrozenBatchNorm2d.from_torch_state_dict(tbn.state_dict())
    layer = jbn.FrozenBatchNorm2d(4)
    x = jnp.asarray(_x())
    grads_v, grads_x = jax.grad(lambda v, x: jnp.sum(layer.apply(v, x)),
                                argnums=(0, 1))(variables, x)
    for g in jax.tree.leaves(grads_v):
        np.testing.assert_array_equal(g, np.zeros(4))
    s = variables["batch_stats"]
    scale = s["weight"] / np.sqrt(s["running_var"] + 1e-5)
    np.testing.assert_allclose(grads_x, np.broadcast_to(scale[:, None, None], x.shape), rtol=1e-6)
    assert not layer.init(jax.random.key(0), x).get("params")


def test_loads_a_four_tensor_frozen_state_dict_and_rejects_missing_keys():
    sd = {k: v for k, v in _trained_torch_bn().state_dict().items() if k != "num_batches_tracked"}
    variables = jbn.FrozenBatchNorm2d.from_torch_state_dict(sd)
    np.testing.assert_array_equal(variables["batch_stats"]["running_var"],
                                  sd["running_var"].numpy())
    del sd["running_var"]
    with pytest.raises(KeyError, match="running_var"):
        jbn.FrozenBatchNorm2d.from_torch_state_dict(sd)


def test_unbatched_sample_and_rank_check():
    variables = jbn.FrozenBatchNorm2d.from_torch_state_dict(_trained_torch_bn().state_dict())
    layer = jbn.FrozenBatchNorm2d(4)
    x = jnp.asarray(_x())
    np.testing.assert_array_equal(layer.apply(variables, x[0]), layer.apply(variables, x)[0])
    with pytest.raises(ValueError, match=r"expected 3D or 4D input \(got 2D input\)"):
        layer.apply(variables, x[0, :, 0])


def test_exports_a_state_dict_that_torch_loads_back_to_the_same_output():
    tbn = _trained_torch_bn()
    variables = jbn.FrozenBatchNorm2d.from_torch_state_dict(tbn.state_dict())
    state_dict = jbn.FrozenBatchNorm2d.to_torch_state_dict(variables)
    assert set(state_dict) == {"weight", "bias", "running_mean", "running_var"}
    fresh = torch.nn.BatchNorm2d(4).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    x = _x(seed=3)
    y = jbn.FrozenBatchNorm2d(4).apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(fresh(torch.from_numpy(x)).detach().numpy(), y,
                               rtol=1e-6, atol=1e-6)
    for key in state_dict:
        np.testing.assert_array_equal(state_dict[key], tbn.state_dict()[key].numpy())
    with pytest.raises(KeyError, match="running_var"):
        jbn.FrozenBatchNorm2d.to_torch_state_dict(
            {"batch_stats": {k: variables["batch_stats"][k] for k in state_dict
                             if k != "running_var"}})
    replicated = jax.tree.map(lambda v: jnp.stack([v, v]), variables)
    with pytest.raises(ValueError, match=r"\(C,\).*device axis"):
        jbn.FrozenBatchNorm2d.to_torch_state_dict(replicated)


@pytest.mark.parametrize("axis", [1, -1])
def test_nnx_layer_loads_from_torch_equals_it_and_exports_back(axis):
    from flax import nnx

    tbn = _trained_torch_bn()
    x = _x()
    expected = tbn(torch.from_numpy(x)).detach().numpy()

    class Net(nnx.Module):
        def __init__(self):
            self.bn = jbn.nnx.FrozenBatchNorm2d(4, axis=axis)

        def __call__(self, x):
            return self.bn(x, train=True)  # the mode changes nothing

    model = Net()
    _, stats = nnx.split(model, nnx.BatchStat)
    loaded = jbn.load_torch_state_dict({"batch_stats": nnx.to_pure_dict(stats)}, tbn.state_dict(),
                                       {"": "bn"})
    nnx.update(model, loaded["batch_stats"])
    x_in = x if axis == 1 else x.transpose(0, 2, 3, 1)
    y = np.asarray(nnx.jit(lambda m, x: m(x))(model, x_in))
    np.testing.assert_allclose(y if axis == 1 else y.transpose(0, 3, 1, 2), expected,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.bn(x_in[0]), y[0], rtol=1e-6, atol=1e-6)  # unbatched
    fresh = torch.nn.BatchNorm2d(4)
    fresh.load_state_dict(jbn.export_torch_state_dict(
        {"batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}, fresh.state_dict(),
        {"": "bn"}))
    for key in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(fresh, key).detach().numpy(),
                                      getattr(tbn, key).detach().numpy())


def test_nnx_layer_has_no_parameters_and_passes_the_input_gradient_only():
    from flax import nnx

    layer = jbn.nnx.FrozenBatchNorm2d(4)
    for key, value in (("running_var", np.full(4, 4.0, np.float32)),
                       ("weight", np.full(4, 3.0, np.float32))):
        getattr(layer, key).set_value(jnp.asarray(value))
    assert nnx.state(layer, nnx.Param) == nnx.State({})
    grad = jax.grad(lambda x: layer(x).sum())(jnp.asarray(_x()))
    # d y / d x = weight / sqrt(running_var + eps), per channel
    np.testing.assert_allclose(grad, np.full(_x().shape, 3.0 / np.sqrt(4.0 + 1e-5)), rtol=1e-6)
    tensors = jax.grad(lambda s: nnx.merge(*nnx.split(layer)[:1], s)(jnp.asarray(_x())).sum())(
        nnx.state(layer))
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(tensors))
    with pytest.raises(ValueError, match=r"expected 3D or 4D input \(got 2D input\)"):
        layer(jnp.ones((2, 4)))


def test_nnx_model_of_frozen_layers_takes_the_mode_switches_of_batch_norm_models():
    # Fine-tuning detection backbones swaps every BatchNorm2d for the frozen layer; the
    # training loop's nnx.view and eval()/train() must keep working, and change nothing.
    from flax import nnx

    model = nnx.Sequential(jbn.nnx.FrozenBatchNorm2d(4), jbn.nnx.FrozenBatchNorm2d(4))
    model.layers[0].running_var.set_value(jnp.full(4, 4.0))
    x = jnp.asarray(_x())
    y = model(x)
    for switched in (nnx.view(model, use_running_average=True),
                     nnx.view(model, use_running_average=False)):
        np.testing.assert_array_equal(switched(x), y)
    model.eval()
    np.testing.assert_array_equal(model(x), y)
    np.testing.assert_allclose(y, x / np.sqrt(4.0 + 1e-5) / np.sqrt(1.0 + 1e-5), rtol=1e-6)
