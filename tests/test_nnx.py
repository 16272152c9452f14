"""The Flax NNX modules against PyTorch: training steps, evaluation, mode switching, checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jbn
from jbn import nnx as jnnx

RTOL, ATOL = 1e-5, 1e-5

CASES = [
    (jnnx.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3)),
    (jnnx.BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5)),
    (jnnx.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 6)),
    (jnnx.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 4, 3, 5)),
]


def _batches(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=shape) * 2 + 3).astype(np.float32) for _ in range(steps)]


def _assert_state_equal(bn, tbn):
    np.testing.assert_allclose(bn.running_mean[...], tbn.running_mean.numpy(), RTOL, ATOL)
    np.testing.assert_allclose(bn.running_var[...], tbn.running_var.numpy(), RTOL, ATOL)
    assert int(bn.num_batches_tracked[...]) == int(tbn.num_batches_tracked)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx.jit"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("cls", "tcls", "shape"), CASES,
                         ids=["1d-NC", "1d-NCL", "2d", "3d"])
def test_training_steps_then_eval_match_torch(cls, tcls, shape, momentum, jit):
    bn = cls(3, momentum=momentum)
    tbn = tcls(3, momentum=momentum)
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        tbn.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
    bn.weight[...] = jnp.asarray(tbn.weight.detach().numpy())
    bn.bias[...] = jnp.asarray(tbn.bias.detach().numpy())

    def call(model, x):
        return model(x)

    step = nnx.jit(call) if jit else call
    for x in _batches(shape, 3):
        y = step(bn, jnp.asarray(x))
        ty = tbn(torch.from_numpy(x))
        np.testing.assert_allclose(y, ty.detach().numpy(), RTOL, ATOL)
        _assert_state_equal(bn, tbn)
    bn.eval()
    tbn.eval()
    x = _batches(shape, 1, seed=1)[0]
    np.testing.assert_allclose(step(bn, jnp.asarray(x)), tbn(torch.from_numpy(x)).detach().numpy(),
                               RTOL, ATOL)
    _assert_state_equal(bn, tbn)


def test_channels_last_equals_channels_first():
    x = jnp.asarray(_batches((4, 3, 5, 6), 1)[0])
    first, last = jnnx.BatchNorm2d(3), jnnx.BatchNorm2d(3, axis=-1)
    y_first = first(x)
    y_last = last(jnp.moveaxis(x, 1, -1))
    np.testing.assert_allclose(jnp.moveaxis(y_last, -1, 1), y_first, RTOL, ATOL)
    np.testing.assert_allclose(last.running_var[...], first.running_var[...], RTOL, ATOL)


def test_calls_the_functional_core():
    x = jnp.asarray(_batches((5, 3, 4), 1)[0])
    bn = jnnx.BatchNorm1d(3, momentum=0.3, eps=1e-3)
    params, state = jbn.init(3)
    y_ref, state_ref = jbn.batch_norm(params, state, x, True, momentum=0.3, eps=1e-3)
    np.testing.assert_array_equal(bn(x), y_ref)
    for k, v in state_ref.items():
        np.testing.assert_array_equal(getattr(bn, k)[...], v)


def test_variables_are_params_and_batch_stats_with_torch_names():
    bn = jnnx.BatchNorm2d(4)
    params = nnx.state(bn, nnx.Param)
    stats = nnx.state(bn, nnx.BatchStat)
    assert set(params.keys()) == {"weight", "bias"}
    assert set(stats.keys()) == {"running_mean", "running_var", "num_batches_tracked"}
    assert bn.running_mean[...].dtype == jnp.float32
    assert bn.num_batches_tracked[...].dtype == jnp.int32


class _Net(nnx.Module):
    def __init__(self):
        self.bn = jnnx.BatchNorm1d(3)
        self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(0))


def test_new_module_trains_and_eval_train_switch_nested_modules():
    net = _Net()
    assert net.bn.training and not net.bn.use_running_average
    net.eval()
    assert not net.bn.training and net.bn.use_running_average
    net.train()
    assert net.bn.training
    net.bn.training = False
    assert net.bn.use_running_average


@pytest.mark.skipif(not hasattr(nnx, "view"), reason="flax without nnx.view")
def test_nnx_view_switches_the_mode_of_a_copy_only():
    net = _Net()
    net.bn.training = False
    view = nnx.view(net, use_running_average=False)
    assert view.bn.training and not net.bn.training


def test_eval_mode_uses_running_stats_and_leaves_them_unchanged():
    bn = jnnx.BatchNorm1d(3)
    bn.running_mean[...] = jnp.array([1.0, 2.0, 3.0])
    bn.running_var[...] = jnp.array([4.0, 1.0, 0.25])
    bn.eval()
    x = jnp.asarray(_batches((4, 3), 1)[0])
    expected = (x - bn.running_mean[...]) / jnp.sqrt(bn.running_var[...] + 1e-5)
    np.testing.assert_allclose(bn(x), expected, RTOL, ATOL)
    assert int(bn.num_batches_tracked[...]) == 0
    np.testing.assert_array_equal(bn.running_mean[...], [1.0, 2.0, 3.0])


def test_state_restored_as_read_only_numpy_arrays_trains_and_stays_the_callers():
    # A checkpoint restored with msgpack gives read-only numpy arrays; training replaces
    # the module's values instead of writing into them, as in torch.
    tbn = torch.nn.BatchNorm1d(3)
    graphdef, state = nnx.split(jnnx.BatchNorm1d(3))
    restored = jax.tree.map(lambda a: np.array(a), nnx.to_pure_dict(state))
    for leaf in jax.tree.leaves(restored):
        leaf.setflags(write=False)
    nnx.replace_by_pure_dict(state, restored)
    bn = nnx.merge(graphdef, state)
    for x in _batches((4, 3), 2):
        bn(x)
        tbn(torch.from_numpy(x))
    _assert_state_equal(bn, tbn)
    np.testing.assert_array_equal(restored["running_mean"], np.zeros(3))
    assert restored["num_batches_tracked"] == 0


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx.jit"])
@pytest.mark.parametrize("method", ["reset_running_stats", "reset_parameters"])
def test_reset_methods_restart_like_torchs(method, jit):
    # torch's update_bn resets the statistics and then averages them with
    # momentum=None: the count must restart too, or the average is wrong.
    bn, tbn = jnnx.BatchNorm1d(3, momentum=None), torch.nn.BatchNorm1d(3, momentum=None)
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        tbn.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
    bn.weight[...] = jnp.asarray(tbn.weight.detach().numpy())
    bn.bias[...] = jnp.asarray(tbn.bias.detach().numpy())
    step = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
    reset = nnx.jit(lambda m: getattr(m, method)()) if jit else (lambda m: getattr(m, method)())
    for x in _batches((4, 3), 3):
        step(bn, x)
        tbn(torch.from_numpy(x))
    reset(bn)
    getattr(tbn, method)()
    _assert_state_equal(bn, tbn)
    np.testing.assert_array_equal(bn.weight[...], tbn.weight.detach().numpy())
    np.testing.assert_array_equal(bn.bias[...], tbn.bias.detach().numpy())
    assert bn.running_var[...].dtype == jnp.float32
    assert bn.num_batches_tracked[...].dtype == jnp.int32
    for x in _batches((4, 3), 2, seed=1):
        np.testing.assert_allclose(step(bn, x), tbn(torch.from_numpy(x)).detach().numpy(),
                                   RTOL, ATOL)
    _assert_state_equal(bn, tbn)


def test_reset_methods_without_state_or_parameters_do_nothing():
    bn = jnnx.BatchNorm2d(3, affine=False, track_running_stats=False)
    bn.reset_parameters()
    bn.reset_running_stats()
    assert nnx.to_pure_dict(nnx.state(bn)) == {}


def test_per_call_train_overrides_the_mode():
    x = jnp.asarray(_batches((4, 3), 1)[0])
    bn = jnnx.BatchNorm1d(3)
    bn.eval()
    bn(x, train=True)
    assert int(bn.num_batches_tracked[...]) == 1
    bn.train()
    before = bn.running_mean[...]
    bn(x, train=False)
    assert int(bn.num_batches_tracked[...]) == 1
    np.testing.assert_array_equal(bn.running_mean[...], before)


def test_without_running_stats_eval_uses_batch_stats_like_torch():
    x = _batches((4, 3, 5), 1)[0]
    bn = jnnx.BatchNorm1d(3, track_running_stats=False, affine=False)
    bn.eval()
    tbn = torch.nn.BatchNorm1d(3, track_running_stats=False, affine=False).eval()
    np.testing.assert_allclose(bn(jnp.asarray(x)), tbn(torch.from_numpy(x)).numpy(), RTOL, ATOL)
    assert not hasattr(bn, "running_mean") and not hasattr(bn, "weight")


@pytest.mark.parametrize(("cls", "bad_ndim", "message"), [
    (jnnx.BatchNorm1d, 4, "expected 2D or 3D input (got 4D input)"),
    (jnnx.BatchNorm2d, 2, "expected 3D or 4D input (got 2D input)"),
    (jnnx.BatchNorm3d, 3, "expected 4D or 5D input (got 3D input)"),
])
def test_wrong_rank_raises_like_linen(cls, bad_ndim, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls(3)(jnp.ones((2, 3) + (2,) * (bad_ndim - 2)))


@pytest.mark.parametrize(("cls", "shape"), [(jnnx.BatchNorm2d, (3, 4, 5)),
                                            (jnnx.BatchNorm3d, (3, 2, 4, 5))])
def test_unbatched_sample_is_a_batch_of_one(cls, shape):
    x = jnp.asarray(_batches(shape, 1)[0])
    single, batched = cls(3), cls(3)
    np.testing.assert_array_equal(single(x), batched(x[None])[0])
    np.testing.assert_array_equal(single.running_var[...], batched.running_var[...])


def test_invalid_arguments_raise_at_construction():
    with pytest.raises(ValueError, match="momentum"):
        jnnx.BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        jnnx.BatchNorm1d(3, eps=0.0)
    with pytest.raises(ValueError, match="num_features"):
        jnnx.BatchNorm1d(0)
    with pytest.raises(ValueError, match="axis_name"):
        jnnx.SyncBatchNorm(3)


def test_every_module_shows_the_full_constructor_signature():
    # What help() and type checkers read: SyncBatchNorm's too, so that a misspelled
    # argument is caught there as it is for the other modules.
    import inspect

    expected = inspect.signature(jnnx.BatchNorm2d.__init__)
    assert "axis_name" in expected.parameters and "use_running_average" in expected.parameters
    for cls in (jnnx.BatchNorm1d, jnnx.BatchNorm3d, jnnx.SyncBatchNorm):
        assert inspect.signature(cls.__init__) == expected
    for cls in (jnnx.BatchNorm1d, jnnx.BatchNorm2d, jnnx.BatchNorm3d, jnnx.SyncBatchNorm):
        assert "num_batches_tracked: ``nnx.BatchStat`` ``()`` int32" in cls.__doc__


def test_sync_batch_norm_under_vmap_equals_torch_on_the_global_batch():
    devices, shape = 4, (3, 3, 5)  # per device (N, C, L)
    xs = _batches((devices, *shape), 1)[0]
    bn = jnnx.SyncBatchNorm(3, axis_name="d")
    graphdef, state = nnx.split(bn)

    def step(state, x):
        model = nnx.merge(graphdef, state)
        y = model(x)
        return y, nnx.state(model)

    ys, new_states = jax.vmap(step, in_axes=(None, 0), axis_name="d")(state, jnp.asarray(xs))
    tbn = torch.nn.BatchNorm1d(3)
    ty = tbn(torch.from_numpy(xs.reshape(devices * shape[0], *shape[1:]))).detach().numpy()
    np.testing.assert_allclose(ys.reshape(ty.shape), ty, RTOL, ATOL)
    np.testing.assert_allclose(new_states["running_var"][...][0], tbn.running_var.numpy(),
                               RTOL, ATOL)
    np.testing.assert_allclose(new_states["running_mean"][...][0], tbn.running_mean.numpy(),
                               RTOL, ATOL)


def test_converted_nnx_model_under_vmap_equals_torch_on_the_global_batch():
    devices, shape = 4, (3, 3, 5)  # per device (N, C, L)
    xs = _batches((devices, *shape), 1)[0]
    model = nnx.Sequential(jnnx.BatchNorm1d(3), jnnx.BatchNorm1d(3, axis_name="own"))
    assert jbn.convert_sync_batchnorm(model, "first") is model
    converted = jbn.convert_sync_batchnorm(model, "d")  # the last conversion's axis
    assert model.layers[1].axis_name == "own"
    graphdef, state = nnx.split(converted)

    def step(state, x):
        m = nnx.merge(graphdef, state)
        return m.layers[0](x), nnx.state(m)

    ys, new_states = jax.vmap(step, in_axes=(None, 0), axis_name="d")(state, jnp.asarray(xs))
    tbn = torch.nn.BatchNorm1d(3)
    ty = tbn(torch.from_numpy(xs.reshape(devices * shape[0], *shape[1:]))).detach().numpy()
    np.testing.assert_allclose(ys.reshape(ty.shape), ty, RTOL, ATOL)
    np.testing.assert_allclose(new_states["layers"][0]["running_var"][...][0],
                               tbn.running_var.numpy(), RTOL, ATOL)
    with pytest.raises(TypeError, match="flax.linen or flax.nnx Module"):
        jbn.convert_sync_batchnorm(lambda x: x, "d")


def test_gradients_match_torch():
    x = _batches((6, 3, 4), 1)[0]
    bn = jnnx.BatchNorm1d(3)
    tx = torch.from_numpy(x).requires_grad_()
    tbn = torch.nn.BatchNorm1d(3)
    w = torch.linspace(-1, 1, 6 * 3 * 4).reshape(6, 3, 4)
    (tbn(tx) * w).sum().backward()

    def loss(model, x):
        return jnp.sum(model(x) * jnp.asarray(w.numpy()))

    grads = nnx.grad(loss, argnums=(0, 1))(bn, jnp.asarray(x))
    np.testing.assert_allclose(grads[1], tx.grad.numpy(), 1e-4, 1e-5)
    np.testing.assert_allclose(grads[0]["weight"][...], tbn.weight.grad.numpy(), 1e-4, 1e-5)


@pytest.mark.skipif(not hasattr(nnx, "view_info"), reason="flax without nnx.view_info")
def test_view_info_documents_the_mode_switch():
    # Flax reads set_view's docstring for view_info; it needs an Args section.
    model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), jnnx.BatchNorm1d(4))
    assert "use_running_average" in str(nnx.view_info(model))
