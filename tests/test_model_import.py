"""Whole-model import: a PyTorch ResNet-18 into an equivalent Flax linen ResNet-18."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

import jbn

# ---- PyTorch ResNet-18 from torch.nn modules (torchvision's layout and names) ----


class TorchBasicBlock(tnn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                             tnn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet18(tnn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", tnn.Sequential(TorchBasicBlock(cin, w, stride),
                                                      TorchBasicBlock(w, w, 1)))
            cin = w
        self.fc = tnn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(x.mean(dim=(2, 3)))


# ---- The same network in Flax linen, NHWC, with jbn.BatchNorm2d(axis=-1) ----


class BasicBlock(nn.Module):
    width: int
    stride: int
    project: bool

    @nn.compact
    def __call__(self, x, train):
        def bn(name):
            return jbn.BatchNorm2d(self.width, axis=-1, name=name)

        out = nn.Conv(self.width, (3, 3), self.stride, padding=1, use_bias=False, name="conv1")(x)
        out = nn.relu(bn("bn1")(out, train))
        out = nn.Conv(self.width, (3, 3), 1, padding=1, use_bias=False, name="conv2")(out)
        out = bn("bn2")(out, train)
        if self.project:
            x = nn.Conv(self.width, (1, 1), self.stride, padding=0, use_bias=False,
                        name="down_conv")(x)
            x = bn("down_bn")(x, train)
        return nn.relu(out + x)


class ResNet18(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(64, (7, 7), 2, padding=3, use_bias=False, name="conv1")(x)
        x = nn.relu(jbn.BatchNorm2d(64, axis=-1, name="bn1")(x, train))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        cin = 64
        for i, w in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if i == 1 else 2
            x = BasicBlock(w, stride, stride != 1 or cin != w, name=f"layer{i}_0")(x, train)
            x = BasicBlock(w, 1, False, name=f"layer{i}_1")(x, train)
            cin = w
        return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def resnet_name_map(state_dict):
    """torch 'layer2.0.downsample.1.weight' -> flax 'layer2_0/down_bn', and so on."""
    name_map = {}
    for key in state_dict:
        prefix = key.rpartition(".")[0]
        path = re.sub(r"^layer(\d)\.(\d)\.", r"layer\1_\2/", prefix)
        path = path.replace("downsample.0", "down_conv").replace("downsample.1", "down_bn")
        name_map[prefix] = path
    return name_map


@pytest.fixture(scope="module")
def trained_torch_resnet():
    torch.manual_seed(0)
    model = TorchResNet18()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(3):  # meaningful, non-trivial running statistics
            model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    return model.eval()


def test_resnet18_logits_equal_torch_in_evaluation(trained_torch_resnet):
    tmodel = trained_torch_resnet
    state_dict = tmodel.state_dict()
    model = ResNet18()
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)),
                                                 train=False))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    variables = jbn.load_torch_state_dict(template, state_dict, resnet_name_map(state_dict))

    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32) * 2 + 0.5
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x)).numpy()
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    # float32 convolutions accumulate in different orders in XLA and PyTorch: compare
    # against the logits' scale.
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * scale)
    bn = variables["batch_stats"]["layer3_0"]["down_bn"]
    np.testing.assert_array_equal(bn["running_var"],
                                  state_dict["layer3.0.downsample.1.running_var"].numpy())
    assert int(bn["num_batches_tracked"]) == 3


# ---- error cases on a small model ----


class _Small(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
        x = jbn.BatchNorm2d(4, axis=-1, name="bn")(x, train)
        return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


def _small_pair():
    torch.manual_seed(0)
    tmodel = tnn.Sequential()
    tmodel.add_module("conv", tnn.Conv2d(3, 4, 3, padding=1))
    tmodel.add_module("bn", tnn.BatchNorm2d(4))
    tmodel.add_module("head", tnn.Linear(4, 2))
    variables = _Small().init(jax.random.key(0), jnp.ones((1, 6, 6, 3)), train=False)
    return tmodel.state_dict(), variables


def test_default_name_map_and_conv_bias_dense_kernel_layouts():
    state_dict, template = _small_pair()
    variables = jbn.load_torch_state_dict(template, state_dict)
    np.testing.assert_array_equal(variables["params"]["conv"]["kernel"],
                                  state_dict["conv.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["conv"]["bias"], state_dict["conv.bias"])
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"],
                                  state_dict["head.weight"].numpy().T)


def test_checkpoint_without_num_batches_tracked_loads_with_a_fresh_count():
    state_dict, template = _small_pair()
    del state_dict["bn.num_batches_tracked"]
    tmodel = tnn.Sequential()
    tmodel.add_module("conv", tnn.Conv2d(3, 4, 3, padding=1))
    tmodel.add_module("bn", tnn.BatchNorm2d(4))
    tmodel.add_module("head", tnn.Linear(4, 2))
    tmodel.load_state_dict(dict(state_dict))
    variables = jbn.load_torch_state_dict(template, state_dict)
    bn = variables["batch_stats"]["bn"]
    assert int(bn["num_batches_tracked"]) == int(tmodel.bn.num_batches_tracked)
    np.testing.assert_array_equal(bn["running_var"], tmodel.bn.running_var.numpy())


def test_unused_torch_key_is_named():
    state_dict, template = _small_pair()
    state_dict["extra.weight"] = torch.ones(3)
    with pytest.raises(KeyError, match=r"unused torch keys: extra.weight \(no Flax module at "
                                       r"extra\); Flax variables not filled: none"):
        jbn.load_torch_state_dict(template, state_dict)


def test_prefix_missing_from_name_map_is_unused():
    state_dict, template = _small_pair()
    with pytest.raises(KeyError, match=r"unused torch keys: head.bias, head.weight;"):
        jbn.load_torch_state_dict(template, state_dict, {"conv": "conv", "bn": "bn"})


def test_missing_flax_variable_is_named():
    state_dict, template = _small_pair()
    del state_dict["head.bias"]
    with pytest.raises(KeyError, match=r"keys: none; Flax variables not filled: params/head/bias"):
        jbn.load_torch_state_dict(template, state_dict)


def test_shape_mismatch_names_both_shapes():
    state_dict, template = _small_pair()
    state_dict["head.weight"] = torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"head.*\(5, 2\).*\(4, 2\)"):
        jbn.load_torch_state_dict(template, state_dict)


def test_partitioned_variables_load_inside_their_boxes():
    # Models with sharded initializers (nn.with_partitioning) give boxed variables.
    import flax.linen as nn

    state_dict, template = _small_pair()
    boxed = jax.tree.map(lambda v: nn.Partitioned(v, names=(None,) * v.ndim), template)
    variables = jbn.load_torch_state_dict(boxed, state_dict)
    kernel = variables["params"]["head"]["kernel"]
    assert isinstance(kernel, nn.Partitioned)
    np.testing.assert_array_equal(kernel.value, state_dict["head.weight"].numpy().T)
    plain = jbn.load_torch_state_dict(template, state_dict)
    jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(variables), plain)
    # ... and a batch norm's boxed variables export as plain arrays.
    exported = jbn.to_torch_state_dict({c: variables[c]["bn"] for c in variables if c != "params"}
                                       | {"params": variables["params"]["bn"]})
    np.testing.assert_array_equal(exported["running_var"], state_dict["bn.running_var"].numpy())
    assert exported["weight"].dtype == np.float32


def test_two_torch_layers_mapped_to_one_flax_layer_raise():
    state_dict, template = _small_pair()
    for k in [k for k in state_dict if k.startswith("bn.")]:
        state_dict["bn2." + k[3:]] = state_dict[k] + 1
    name_map = {"conv": "conv", "bn": "bn", "bn2": "bn", "head": "head"}
    with pytest.raises(KeyError, match="'bn' and 'bn2' both map to flax 'bn'"):
        jbn.load_torch_state_dict(template, state_dict, name_map)


def test_batch_norm_mapped_onto_a_dense_layer_names_both():
    state_dict, template = _small_pair()
    with pytest.raises(ValueError, match=r"torch 'bn' -> flax 'head'.*Conv or Dense.*\(4,\)"):
        jbn.load_torch_state_dict(template, state_dict, {"conv": "conv", "bn": "head"})


def _two_bn_pair():
    """A torch model with two BatchNorm1d layers, and the linen model's variables."""

    class TwoBatchNorms(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return jbn.BatchNorm1d(3, name="b")(jbn.BatchNorm1d(3, name="a")(x, train), train)

    torch.manual_seed(1)
    tmodel = tnn.Sequential()
    tmodel.add_module("a", tnn.BatchNorm1d(3))
    tmodel.add_module("b", tnn.BatchNorm1d(3))
    tmodel.train()
    tmodel(torch.randn(8, 3) * 2 + 1)
    variables = TwoBatchNorms().init(jax.random.key(0), jnp.ones((2, 3)), train=False)
    return tmodel.state_dict(), variables


def test_layers_missing_some_tensors_are_all_listed_with_unquoted_messages():
    state_dict, template = _two_bn_pair()
    del state_dict["a.running_var"], state_dict["b.running_var"]
    with pytest.raises(KeyError) as info:
        jbn.load_torch_state_dict(template, state_dict)
    message = info.value.args[0]
    for layer in ("a", "b"):
        assert (f"torch '{layer}' -> flax '{layer}': state_dict has ['running_mean', "
                f"'num_batches_tracked'] but is missing ['running_var']") in message
        assert f"batch_stats/{layer}/running_var" in message
    assert "\\'" not in message


def nnx_net_pair():
    """An NNX model with an ``nnx.List`` (conv, batch norm) and a head, and the same
    torch model (``features.0``, ``features.1``, ``head``)."""
    from flax import nnx

    from jbn import nnx as jnnx

    class Net(nnx.Module):
        def __init__(self):
            self.features = nnx.List([nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)),
                                      jnnx.BatchNorm2d(4, axis=-1)])
            self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(1))

        def __call__(self, x):
            x = nnx.relu(self.features[1](self.features[0](x)))
            return self.head(x.mean(axis=(1, 2)))

    tmodel = tnn.Module()
    tmodel.features = tnn.Sequential(tnn.Conv2d(3, 4, 3, padding=1), tnn.BatchNorm2d(4))
    tmodel.head = tnn.Linear(4, 2)
    return Net(), tmodel


def test_nnx_model_loads_through_its_pure_dict_with_list_indices_as_torch_names():
    from flax import nnx

    torch.manual_seed(2)
    model, tmodel = nnx_net_pair()
    x = torch.randn(4, 3, 6, 6) * 3 + 2
    tmodel.train()
    tmodel.features(x)  # running statistics away from their initial values
    graph, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    pure = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
    for name_map in (None, {"features.0": ("features", 0), "features.1": "features/1",
                            "head": "head"}):
        loaded = jbn.load_torch_state_dict(pure, tmodel.state_dict(), name_map)
        nnx.replace_by_pure_dict(params, loaded["params"])
        nnx.replace_by_pure_dict(stats, loaded["batch_stats"])
        model = nnx.merge(graph, params, stats)
        model.eval()
        tmodel.eval()
        with torch.no_grad():
            expected = tmodel.head(torch.relu(tmodel.features(x)).mean(dim=(2, 3)))
        got = model(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
        bn = model.features[1]
        np.testing.assert_array_equal(bn.running_var[...], tmodel.features[1].running_var)
        assert int(bn.num_batches_tracked[...]) == 1
