"""One layer's state_dict between PyTorch and Flax: exact round trips and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn


def _trained_torch_layer(**kwargs):
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(4, **kwargs)
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.uniform_(-1.0, 1.0)
    for _ in range(3):
        layer(torch.randn(5, 4, 3, 3) * 3 + 1)
    return layer


@pytest.mark.parametrize("affine, track", [(True, True), (False, True), (True, False)])
def test_torch_state_dict_loads_and_gives_torch_outputs(affine, track):
    layer = _trained_torch_layer(affine=affine, track_running_stats=track)
    variables = jbn.from_torch_state_dict(layer.state_dict())
    assert set(variables) == {name for name, kept in (("params", affine), ("batch_stats", track)) if kept}
    x = torch.randn(6, 4, 3, 3)
    layer.eval()
    expected = layer(x).detach().numpy()
    model = jbn.BatchNorm2d(4, affine=affine, track_running_stats=track)
    np.testing.assert_allclose(model.apply(variables, x.numpy(), train=False), expected,
                               rtol=1e-6, atol=1e-6)


def test_round_trip_is_exact_including_num_batches_tracked():
    layer = _trained_torch_layer()
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    state_dict = jbn.to_torch_state_dict(jbn.from_torch_state_dict(original))
    assert list(state_dict) == list(original)
    assert state_dict["num_batches_tracked"].dtype == np.int64
    assert state_dict["num_batches_tracked"].shape == ()
    fresh = torch.nn.BatchNorm2d(4)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    for key, value in original.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_flax_variables_round_trip_through_torch():
    model = jbn.BatchNorm2d(4)
    x = np.random.default_rng(0).standard_normal((5, 4, 3, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    back = jbn.from_torch_state_dict(
        {k: torch.from_numpy(v) for k, v in jbn.to_torch_state_dict(variables).items()})
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_bfloat16_parameters_round_trip_through_torch_exactly():
    layer = _trained_torch_layer().to(torch.bfloat16)
    variables = jbn.from_torch_state_dict(layer.state_dict())
    assert variables["params"]["weight"].dtype == jnp.bfloat16
    module = jbn.BatchNorm2d(4, param_dtype=jnp.bfloat16)
    state_dict = jbn.to_torch_state_dict(variables)
    fresh = torch.nn.BatchNorm2d(4).to(torch.bfloat16)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    initial = module.init(jax.random.key(0), jnp.ones((2, 4, 3, 3)), train=False)
    fresh.load_state_dict({k: torch.from_numpy(v)
                           for k, v in jbn.to_torch_state_dict(initial).items()})
    assert torch.equal(fresh.weight, torch.ones(4, dtype=torch.bfloat16))


def test_numpy_arrays_are_accepted():
    state_dict = {k: v.numpy() for k, v in _trained_torch_layer().state_dict().items()}
    variables = jbn.from_torch_state_dict(state_dict)
    assert isinstance(variables["params"]["weight"], jax.Array)
    assert variables["batch_stats"]["num_batches_tracked"].dtype == jnp.int32
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 3


def test_missing_key_raises_naming_it():
    state_dict = _trained_torch_layer().state_dict()
    del state_dict["running_var"]
    with pytest.raises(KeyError, match="running_var"):
        jbn.from_torch_state_dict(state_dict)


def test_checkpoint_without_num_batches_tracked_loads_as_torch_loads_it():
    # PyTorch before 0.4.1 saved no count (older torchvision weights): torch's own
    # loader accepts such a plain dict and gives the layer a fresh count.
    state_dict = {k: v for k, v in _trained_torch_layer().state_dict().items()
                  if k != "num_batches_tracked"}
    fresh = torch.nn.BatchNorm2d(4)
    fresh.load_state_dict(state_dict)
    variables = jbn.from_torch_state_dict(state_dict)
    for key, value in jbn.to_torch_state_dict(variables).items():
        np.testing.assert_array_equal(value, fresh.state_dict()[key].numpy(), err_msg=key)
    assert variables["batch_stats"]["num_batches_tracked"].dtype == jnp.int32


def test_prefixed_or_unknown_key_raises_naming_it():
    state_dict = {"bn1." + k: v for k, v in _trained_torch_layer().state_dict().items()}
    with pytest.raises(KeyError, match="bn1.weight"):
        jbn.from_torch_state_dict(state_dict)


def test_misshapen_entries_raise():
    state_dict = _trained_torch_layer().state_dict()
    state_dict["bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"\[4, 5\]"):
        jbn.from_torch_state_dict(state_dict)
    state_dict = _trained_torch_layer().state_dict()
    state_dict["weight"] = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="weight"):
        jbn.from_torch_state_dict(state_dict)


def test_to_torch_state_dict_rejects_incomplete_variables():
    variables = jbn.BatchNorm2d(4).init(jax.random.key(0), jnp.ones((2, 4, 3, 3)), train=False)
    del variables["batch_stats"]["running_mean"]
    with pytest.raises(KeyError, match="running_mean"):
        jbn.to_torch_state_dict(variables)


def test_to_torch_state_dict_rejects_replicated_variables_with_a_hint():
    variables = jbn.BatchNorm2d(4).init(jax.random.key(0), jnp.ones((2, 4, 3, 3)), train=False)
    replicated = jax.tree.map(lambda a: jnp.stack([a, a]), variables)  # as jax.pmap keeps them
    with pytest.raises(ValueError, match=r"running_mean' must have shape \(C,\).*a\[0\]"):
        jbn.to_torch_state_dict({"batch_stats": replicated["batch_stats"]})
    with pytest.raises(ValueError, match=r"'weight' must have shape \(C,\), got \(2, 4\)"):
        jbn.to_torch_state_dict(replicated)
    torch.nn.BatchNorm2d(4).load_state_dict(
        {k: torch.from_numpy(v)
         for k, v in jbn.to_torch_state_dict(jax.tree.map(lambda a: a[0], replicated)).items()})
    state = dict(variables["batch_stats"], num_batches_tracked=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="num_batches_tracked.*scalar.*device axis"):
        jbn.to_torch_state_dict({"batch_stats": state})
    params = dict(variables["params"], bias=jnp.zeros(5))
    with pytest.raises(ValueError, match=r"\[4, 5\]"):
        jbn.to_torch_state_dict({"params": params})


def test_batch_norm_takes_a_torch_tensor_as_the_modules_do():
    layer = _trained_torch_layer()
    x = torch.randn(3, 4, 5, 5) * 2.0 + 1.0
    variables = jbn.from_torch_state_dict(layer.state_dict())
    y, state = jbn.batch_norm(variables["params"], variables["batch_stats"], x, True)
    y_module, _ = jbn.BatchNorm2d(4).apply(variables, x, train=True, mutable=["batch_stats"])
    layer.train()
    with torch.no_grad():
        expected = layer(x)
    np.testing.assert_allclose(np.asarray(y), expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_module))
    np.testing.assert_allclose(np.asarray(state["running_var"]), layer.running_var.numpy(),
                               rtol=1e-6)
    x16 = x.to(torch.bfloat16)  # which torch's own conversion to numpy refuses
    y16, _ = jbn.batch_norm(variables["params"], variables["batch_stats"], x16, True)
    y16_module, _ = jbn.BatchNorm2d(4).apply(variables, x16, train=True, mutable=["batch_stats"])
    assert y16.dtype == y16_module.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y), atol=0.05)
    np.testing.assert_array_equal(np.asarray(y16, np.float32), np.asarray(y16_module, np.float32))
    with pytest.raises(TypeError, match="expected an array input, got list"):
        jbn.batch_norm(variables["params"], variables["batch_stats"], x.tolist(), True)


def test_batch_norm_takes_a_torch_layers_own_parameters_buffers_and_mask():
    # The layer's weight and bias require grad, which torch's conversion to numpy
    # refuses; its count is int64. Training reads them as the layer does and returns
    # its new buffers.
    layer = _trained_torch_layer()
    x = torch.randn(3, 4, 5, 5) * 2.0 + 1.0
    buffers = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith(("run", "num"))}
    params = {"weight": layer.weight, "bias": layer.bias}
    assert layer.weight.requires_grad
    mask = torch.ones(3, 5, 5, dtype=torch.bool)
    y, state = jbn.batch_norm(params, buffers, x, True, mask=mask)
    layer.train()
    with torch.no_grad():
        expected = layer(x)
    np.testing.assert_allclose(np.asarray(y), expected.numpy(), rtol=1e-5, atol=1e-5)
    for k in ("running_mean", "running_var"):
        np.testing.assert_allclose(np.asarray(state[k]), getattr(layer, k).numpy(), rtol=1e-6)
    assert int(state["num_batches_tracked"]) == int(layer.num_batches_tracked)
    with pytest.raises(TypeError, match="mask must be a boolean array, got torch.float32"):
        jbn.batch_norm(params, buffers, x, True, mask=mask.float())
