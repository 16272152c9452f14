"""Whole-model export: Flax variables back into an equivalent PyTorch model's state_dict."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch import nn as tnn

import jbn
from test_model_import import ResNet18, TorchResNet18, _small_pair, nnx_net_pair, resnet_name_map


def _flax_resnet_from(tmodel):
    state_dict = tmodel.state_dict()
    model = ResNet18()
    template = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False)
    name_map = resnet_name_map(state_dict)
    return model, jbn.load_torch_state_dict(template, state_dict, name_map), name_map


def test_resnet18_trained_in_jax_runs_in_torch_with_the_same_outputs_and_statistics():
    torch.manual_seed(0)
    model, variables, name_map = _flax_resnet_from(TorchResNet18())
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(8, 32, 32, 3)).astype(np.float32) * 2 + 0.5 for _ in range(3)]
    labels = rng.integers(0, 10, size=8)
    tx = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def step(params, stats, opt_state, x):
        def loss(p):
            logits, updates = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                          mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        grads, updates = jax.grad(loss, has_aux=True)(params)
        change, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, change), updates["batch_stats"], opt_state

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    for x in images:
        params, stats, opt_state = step(params, stats, opt_state, x)
    trained = {"params": params, "batch_stats": stats}

    fresh = TorchResNet18()
    fresh.load_state_dict(jbn.export_torch_state_dict(trained, fresh.state_dict(), name_map))
    assert int(fresh.layer2[0].downsample[1].num_batches_tracked) == 3
    np.testing.assert_array_equal(fresh.layer2[0].downsample[1].running_var.numpy(),
                                  stats["layer2_0"]["down_bn"]["running_var"])
    np.testing.assert_array_equal(fresh.conv1.weight.detach().numpy(),
                                  np.asarray(params["conv1"]["kernel"]).transpose(3, 2, 0, 1))

    x = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    fresh.eval()
    with torch.no_grad():
        expected = fresh(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(trained, x)
    # float32 convolutions accumulate in different orders in XLA and PyTorch.
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_export_after_load_gives_the_state_dict_back_in_its_kinds_dtypes_and_order(kind):
    state_dict, template = _small_pair()
    with torch.no_grad():
        for value in state_dict.values():
            value.add_(torch.rand(value.shape) if value.is_floating_point() else 7)
    if kind == "numpy":
        state_dict = {k: v.numpy() for k, v in state_dict.items()}
    variables = jbn.load_torch_state_dict(template, state_dict)
    exported = jbn.export_torch_state_dict(variables, state_dict)
    assert list(exported) == list(state_dict)
    for key, value in state_dict.items():
        got = exported[key]
        assert type(got) is type(value) and got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(value))
    assert int(exported["bn.num_batches_tracked"]) == 7


def test_bfloat16_variables_fill_float32_and_bfloat16_torch_tensors_exactly():
    state_dict, template = _small_pair()
    variables = jax.tree.map(lambda v: v.astype(jnp.bfloat16) if v.dtype == jnp.float32 else v,
                             jbn.load_torch_state_dict(template, state_dict))
    exported = jbn.export_torch_state_dict(variables, state_dict)
    kernel = np.asarray(variables["params"]["conv"]["kernel"].astype(jnp.float32))
    np.testing.assert_array_equal(exported["conv.weight"].numpy(), kernel.transpose(3, 2, 0, 1))
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state_dict.items()}
    exported = jbn.export_torch_state_dict(variables, half)
    assert exported["bn.running_var"].dtype == torch.bfloat16
    np.testing.assert_array_equal(exported["conv.weight"].float().numpy(),
                                  kernel.transpose(3, 2, 0, 1))


def test_flax_and_frozen_batch_norms_export_into_torch_batch_norms_keeping_torchs_count():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=True, axis=1, name="a")(x)
            return jbn.FrozenBatchNorm2d(3, name="b")(x)

    x = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype(np.float32)
    variables = Net().init(jax.random.key(0), x)
    rng = np.random.default_rng(2)
    variables = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype),
                             variables)
    tmodel = tnn.Sequential()
    tmodel.add_module("a", tnn.BatchNorm2d(3))  # flax's default epsilon is torch's, 1e-5
    tmodel.add_module("b", tnn.BatchNorm2d(3))
    tmodel.a.num_batches_tracked.fill_(4)
    tmodel.load_state_dict(jbn.export_torch_state_dict(variables, tmodel.state_dict()))
    assert int(tmodel.a.num_batches_tracked) == 4 and int(tmodel.b.num_batches_tracked) == 0
    np.testing.assert_array_equal(tmodel.a.weight.detach().numpy(),
                                  variables["params"]["a"]["scale"])
    np.testing.assert_array_equal(tmodel.a.running_var.numpy(),
                                  variables["batch_stats"]["a"]["var"])
    tmodel.eval()
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(Net().apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_nnx_model_exports_from_its_pure_dict_with_list_indices():
    from flax import nnx

    model, tmodel = nnx_net_pair()
    x = np.random.default_rng(3).normal(size=(4, 6, 6, 3)).astype(np.float32) * 3 + 2
    model(x)  # training: running statistics away from their initial values
    model.eval()
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    pure = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
    tmodel.load_state_dict(jbn.export_torch_state_dict(pure, tmodel.state_dict()))
    tmodel.eval()
    assert int(tmodel.features[1].num_batches_tracked) == 1
    with torch.no_grad():
        t_x = torch.from_numpy(x.transpose(0, 3, 1, 2))
        expected = tmodel.head(torch.relu(tmodel.features(t_x)).mean(dim=(2, 3))).numpy()
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_partitioned_variables_export_their_values():
    state_dict, template = _small_pair()
    boxed = jax.tree.map(lambda v: nn.Partitioned(v, names=(None,) * v.ndim),
                         jbn.load_torch_state_dict(template, state_dict))
    exported = jbn.export_torch_state_dict(boxed, state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key].numpy(), value.numpy())


def test_every_mismatch_is_listed_in_one_key_error():
    state_dict, template = _small_pair()
    variables = jbn.load_torch_state_dict(template, state_dict)
    state_dict["extra.weight"] = torch.ones(3)
    del state_dict["conv.bias"]  # torch's conv without bias: the Flax bias has nowhere to go
    with pytest.raises(KeyError) as info:
        jbn.export_torch_state_dict(variables, state_dict)
    message = info.value.args[0]
    assert "torch keys not filled: extra.weight (no Flax module at extra)" in message
    assert "Flax variables not exported: params/conv/bias" in message
    with pytest.raises(KeyError, match=r"head.bias \(not in name_map\), head.weight \(not in"):
        jbn.export_torch_state_dict(variables, _small_pair()[0], {"conv": "conv", "bn": "bn"})


def test_shape_mismatch_names_the_layer_and_both_shapes():
    state_dict, template = _small_pair()
    variables = jbn.load_torch_state_dict(template, state_dict)
    state_dict["head.weight"] = torch.ones(5, 4)
    with pytest.raises(ValueError, match=r"flax 'head' -> torch 'head'.*\(2, 4\).*\(5, 4\)"):
        jbn.export_torch_state_dict(variables, state_dict)


def test_a_batch_norms_own_errors_name_the_layer():
    state_dict, template = _small_pair()
    variables = jbn.load_torch_state_dict(template, state_dict)
    del variables["batch_stats"]["bn"]["running_var"]
    with pytest.raises(KeyError, match=r"flax 'bn' -> torch 'bn': .*missing \['running_var'\]"):
        jbn.export_torch_state_dict(variables, state_dict)


def test_a_torch_model_built_on_the_meta_device_gets_cpu_tensors_with_values():
    # Large torch models are often built on "meta" (shapes only) and loaded with assign=True.
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
            x = nn.BatchNorm(use_running_average=True, name="flax_bn")(x)
            return jbn.BatchNorm2d(4, axis=-1, name="bn")(x, False)

    variables = Net().init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))
    rng = np.random.default_rng(4)
    variables = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype)
                             if v.dtype == jnp.float32 else v + 3, variables)
    with torch.device("meta"):
        tmodel = tnn.Sequential()
        tmodel.add_module("conv", tnn.Conv2d(3, 4, 3, padding=1))
        tmodel.add_module("flax_bn", tnn.BatchNorm2d(4))
        tmodel.add_module("bn", tnn.BatchNorm2d(4))
    exported = jbn.export_torch_state_dict(variables, tmodel.state_dict())
    assert {t.device.type for t in exported.values()} == {"cpu"}
    tmodel.load_state_dict(exported, assign=True)
    assert int(tmodel.bn.num_batches_tracked) == 3 and int(tmodel.flax_bn.num_batches_tracked) == 0
    x = np.random.default_rng(5).normal(size=(2, 6, 6, 3)).astype(np.float32)
    with torch.no_grad():
        expected = tmodel.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    # Convolutions accumulate in different orders in XLA and PyTorch: against the scale.
    np.testing.assert_allclose(Net().apply(variables, x).transpose(0, 3, 1, 2), expected,
                               rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


class _TorchvisionFrozenBatchNorm2d(tnn.Module):
    """torchvision.ops.FrozenBatchNorm2d's state: four buffers, no count."""

    def __init__(self, n):
        super().__init__()
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                           ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), fill))


def test_a_torch_layer_without_a_count_round_trips_through_a_jbn_batch_norm():
    # Detection backbones keep torchvision's frozen batch norm; fine-tuned in JAX with
    # jbn.BatchNorm2d, the count has no place to go back to, as it had none to come from.
    tmodel = tnn.Sequential(_TorchvisionFrozenBatchNorm2d(3))
    with torch.no_grad():
        for buffer in tmodel[0].buffers():
            buffer.add_(torch.rand(3))
    template = jbn.BatchNorm2d(3).init(jax.random.key(0), jnp.ones((2, 3, 4, 4)), train=False)
    variables = jbn.load_torch_state_dict(template, tmodel.state_dict(), {"0": ""})
    trained = {**variables, "batch_stats": {**variables["batch_stats"],
                                            "num_batches_tracked": jnp.asarray(5, jnp.int32)}}
    exported = jbn.export_torch_state_dict(trained, tmodel.state_dict(), {"0": ""})
    assert list(exported) == ["0.weight", "0.bias", "0.running_mean", "0.running_var"]
    for key, value in tmodel.state_dict().items():
        np.testing.assert_array_equal(exported[key].numpy(), value.numpy())


def test_a_kept_torch_count_is_a_copy_not_the_live_buffer():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=True, axis=1, name="a")(x)

    variables = Net().init(jax.random.key(0), jnp.ones((2, 3, 4, 4)))
    tmodel = tnn.Sequential()
    tmodel.add_module("a", tnn.BatchNorm2d(3))
    exported = jbn.export_torch_state_dict(variables, tmodel.state_dict())
    tmodel.train()(torch.randn(4, 3, 4, 4))
    assert int(tmodel.a.num_batches_tracked) == 1 and int(exported["a.num_batches_tracked"]) == 0


def test_messages_name_root_keys_frozen_layers_replicas_and_nnx_state():
    from flax import nnx

    bn_variables = jbn.BatchNorm2d(4).init(jax.random.key(0), jnp.ones((2, 4, 3, 3)), train=False)
    with pytest.raises(KeyError, match=r"not filled: bias \(not in name_map\), num_batches"):
        jbn.export_torch_state_dict(bn_variables, tnn.BatchNorm2d(4).state_dict(), {})
    frozen = {"batch_stats": {"f": {"weight": jnp.ones(3), "bias": jnp.zeros(3),
                                    "running_mean": jnp.zeros(4), "running_var": jnp.ones(3)}}}
    with pytest.raises(ValueError, match=r"flax 'f' -> torch 'f': .*channels: \[3, 4\]"):
        jbn.export_torch_state_dict(frozen, {f"f.{k}": torch.zeros(3) for k in
                                             ("weight", "bias", "running_mean", "running_var")})
    state_dict, template = _small_pair()
    replicated = jax.tree.map(lambda v: v[None], jbn.load_torch_state_dict(template, state_dict))
    with pytest.raises(ValueError, match=r"'conv.weight'.*leading device axis.*a\[0\]"):
        jbn.export_torch_state_dict(replicated, state_dict)
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"nnx.to_pure_dict"):
        jbn.export_torch_state_dict({"params": nnx.state(model, nnx.Param)},
                                    {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}, {"": ""})
    with pytest.raises(TypeError, match=r"nnx.to_pure_dict"):
        jbn.load_torch_state_dict({"params": nnx.state(model, nnx.Param)},
                                  {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}, {"": ""})


def test_integer_paths_reach_the_string_keys_of_a_pure_dict_read_from_a_file():
    # A pure dict written to JSON or msgpack and read back keys an nnx.List's children "0".
    state_dict, template = _small_pair()
    variables = jbn.load_torch_state_dict(template, state_dict)
    as_read = {c: {"layers": {str(i): tree[name] for i, name in enumerate(("conv", "bn", "head"))
                              if name in tree}} for c, tree in variables.items()}
    name_map = {"conv": ("layers", 0), "bn": ("layers", 1), "head": ("layers", 2)}
    exported = jbn.export_torch_state_dict(as_read, state_dict, name_map)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key].numpy(), value.numpy())
    loaded = jbn.load_torch_state_dict(as_read, state_dict, name_map)
    jax.tree.map(np.testing.assert_array_equal, loaded, as_read)
