"""Every row of API.md's error table, raised at trace time with a message that names both sides."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_training_with_one_value_per_channel_raises_like_torch(shape):
    message = re.escape(f"Expected more than 1 value per channel when training, got input of shape {shape}")
    with pytest.raises(ValueError, match=message):
        jbn.batch_norm(*jbn.init(3), jnp.ones(shape), True)
    with pytest.raises(ValueError, match=message):  # at trace time, under jit too
        jax.jit(lambda x: jbn.batch_norm(*jbn.init(3), x, True))(jnp.ones(shape))


def test_one_value_per_channel_is_fine_in_evaluation_with_running_statistics():
    y, _ = jbn.batch_norm(*jbn.init(3), jnp.ones((1, 3)), False)
    assert y.shape == (1, 3)


def test_one_value_per_channel_raises_in_evaluation_without_running_statistics():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        jbn.batch_norm(*jbn.init(3, track_running_stats=False), jnp.ones((1, 3)), False)


@pytest.mark.parametrize("affine, track", [(True, True), (True, False), (False, True)])
def test_channel_count_mismatch_names_both_counts(affine, track):
    params, state = jbn.init(4, affine=affine, track_running_stats=track)
    with pytest.raises(ValueError, match=r"3 channels.*num_features=4"):
        jbn.batch_norm(params, state, jnp.ones((2, 3, 5)), True)


def test_module_channel_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match=r"3 channels.*num_features=4"):
        jbn.BatchNorm1d(4).init(jax.random.key(0), jnp.ones((2, 3)), train=False)
    # Variables that fit the input but not the module are refused too.
    variables = jbn.BatchNorm1d(3).init(jax.random.key(0), jnp.ones((2, 3)), train=False)
    for affine in (True, False):
        with pytest.raises(ValueError, match=r"3 channels.*num_features=4"):
            jbn.BatchNorm1d(4, affine=affine).apply(variables, jnp.ones((2, 3)), train=False)


def test_module_errors_for_an_unbatched_sample_name_the_shape_given():
    from jbn import nnx as jnnx

    message = re.escape("Expected more than 1 value per channel when training, got input of "
                        "shape (3, 1, 1)")
    x = jnp.ones((3, 1, 1))
    variables = jbn.BatchNorm2d(3).init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match=message):
        jbn.BatchNorm2d(3).apply(variables, x, train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match=message):
        jnnx.BatchNorm2d(3)(x)
    with pytest.raises(ValueError, match=re.escape("4 channels (shape (4, 5, 5), a sample")):
        jbn.BatchNorm2d(3).init(jax.random.key(0), jnp.ones((4, 5, 5)), train=False)
    # Frozen and nnx layers name the module's channel count, not a variable's.
    for call in (lambda x: jnnx.BatchNorm2d(3)(x),
                 lambda x: jbn.FrozenBatchNorm2d(3).init(jax.random.key(0), x)):
        with pytest.raises(ValueError, match=r"4 channels \(shape \(2, 4, 5, 5\)\).*num_features=3"):
            call(jnp.ones((2, 4, 5, 5)))


@pytest.mark.parametrize(
    "module, ndim, message",
    [
        (jbn.BatchNorm1d, 4, "expected 2D or 3D input (got 4D input)"),
        (jbn.BatchNorm1d, 1, "expected 2D or 3D input (got 1D input)"),
        (jbn.BatchNorm2d, 2, "expected 3D or 4D input (got 2D input)"),
        (jbn.BatchNorm2d, 5, "expected 3D or 4D input (got 5D input)"),
        (jbn.BatchNorm3d, 3, "expected 4D or 5D input (got 3D input)"),
        (jbn.BatchNorm3d, 6, "expected 4D or 5D input (got 6D input)"),
    ],
)
def test_wrong_rank_for_the_module_raises(module, ndim, message):
    x = jnp.ones((2,) * (ndim - 1) + (3,)) if ndim > 1 else jnp.ones((3,))
    x = jnp.moveaxis(x, -1, 1) if ndim > 1 else x
    with pytest.raises(ValueError, match=re.escape(message)):
        module(3).init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_, jnp.complex64])
def test_non_floating_input_raises_type_error_naming_the_dtype(dtype):
    x = jnp.zeros((4, 3), dtype)
    with pytest.raises(TypeError, match=str(jnp.dtype(dtype))):
        jbn.batch_norm(*jbn.init(3), x, True)
    with pytest.raises(TypeError, match="floating"):
        jbn.BatchNorm1d(3).init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_floating_output_or_parameter_dtype_raises_type_error(dtype):
    from jbn import nnx as jnnx

    message = f"must be a floating-point dtype.*got {jnp.dtype(dtype)}"
    with pytest.raises(TypeError, match="dtype " + message):
        jbn.batch_norm(*jbn.init(3), jnp.ones((4, 3)), True, dtype=dtype)
    with pytest.raises(TypeError, match="dtype " + message):
        jbn.init(3, dtype=dtype)
    for module in (jbn.BatchNorm1d, jnnx.BatchNorm1d):
        with pytest.raises(TypeError, match="^dtype " + message):
            module(3, dtype=dtype)
        with pytest.raises(TypeError, match="^param_dtype " + message):
            module(3, param_dtype=dtype)


def test_unbound_axis_name_raises_name_error_naming_the_axis():
    with pytest.raises(NameError, match="'batch'"):
        jbn.batch_norm(*jbn.init(3), jnp.ones((4, 3)), True, axis_name="batch")
    model = jbn.SyncBatchNorm(3, axis_name="batch")
    variables = model.init(jax.random.key(0), jnp.ones((4, 3)), train=False)
    with pytest.raises(NameError, match="'batch'"):
        model.apply(variables, jnp.ones((4, 3)), train=True, mutable=["batch_stats"])


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_momentum_outside_unit_interval_raises_at_construction(momentum):
    with pytest.raises(ValueError, match="momentum"):
        jbn.BatchNorm2d(3, momentum=momentum)
    with pytest.raises(ValueError, match="momentum"):
        jbn.batch_norm(*jbn.init(3), jnp.ones((4, 3)), True, momentum=momentum)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("inf")])
def test_non_positive_eps_raises_at_construction(eps):
    with pytest.raises(ValueError, match="eps"):
        jbn.BatchNorm2d(3, eps=eps)
    with pytest.raises(ValueError, match="eps"):
        jbn.batch_norm(*jbn.init(3), jnp.ones((4, 3)), True, eps=eps)


@pytest.mark.parametrize("num_features", [0, -2])
def test_num_features_below_one_raises_at_construction(num_features):
    with pytest.raises(ValueError, match="num_features"):
        jbn.BatchNorm1d(num_features)
    with pytest.raises(ValueError, match="num_features"):
        jbn.init(num_features)


def test_sync_batch_norm_without_axis_name_raises_at_construction():
    with pytest.raises(ValueError, match="axis_name"):
        jbn.SyncBatchNorm(3)


def test_traced_train_flag_raises_type_error_with_a_hint():
    from jbn import nnx as jnnx

    x = jnp.ones((4, 3))
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda x, t: jbn.batch_norm(*jbn.init(3), x, t))(x, True)
    variables = jbn.BatchNorm1d(3).init(jax.random.key(0), x, train=False)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda x, t: jbn.BatchNorm1d(3).apply(variables, x, t, mutable=True))(x, True)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda x, t: jnnx.BatchNorm1d(3)(x, train=t))(x, True)
    # Rematerialization traces its arguments too; its own way to mark them static.
    with pytest.raises(TypeError, match="static_argnums for jax.checkpoint, nn.remat"):
        jax.checkpoint(lambda x, t: jbn.batch_norm(*jbn.init(3), x, t))(x, True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.int16, jnp.uint8])
def test_training_with_a_float_or_narrow_count_raises_and_evaluation_ignores_it(dtype):
    # A bfloat16 count stops at 256 (256 + 1 rounds back to 256), a uint8 one wraps to
    # 0, and momentum=None divides by it: refused in training, where the count is used.
    params, state = jbn.init(3)
    state = dict(state, num_batches_tracked=jnp.asarray(100, dtype))
    x = jnp.arange(12.0).reshape(4, 3)
    with pytest.raises(TypeError, match=f"must be an integer array of 32 or 64 bits.*"
                                        f"got {jnp.dtype(dtype)}"):
        jbn.batch_norm(params, state, x, True, momentum=None)
    y, same = jbn.batch_norm(params, state, x, False)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)
    assert same["num_batches_tracked"].dtype == dtype


def test_a_shape_and_dtype_without_values_raises_type_error_naming_it():
    spec = jax.ShapeDtypeStruct((4, 3), jnp.float32)
    with pytest.raises(TypeError, match=r"with values, got ShapeDtypeStruct \(a shape \(4, 3\)"):
        jbn.batch_norm(*jbn.init(3), spec, True)
    y, _ = jax.eval_shape(lambda x: jbn.batch_norm(*jbn.init(3), x, True), spec)
    assert (y.shape, y.dtype) == (spec.shape, spec.dtype)


def test_axis_out_of_range_raises():
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        jbn.batch_norm(*jbn.init(3), jnp.ones((4, 3)), True, axis=2)


def test_misshapen_mask_raises_naming_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        jbn.batch_norm(*jbn.init(3), jnp.ones((4, 3, 5)), True, mask=jnp.ones((4, 3), bool))
    with pytest.raises(TypeError, match="boolean"):
        jbn.batch_norm(*jbn.init(3), jnp.ones((4, 3, 5)), True, mask=jnp.ones((4, 5)))


def test_state_with_missing_keys_raises():
    params, state = jbn.init(3)
    del state["num_batches_tracked"]
    with pytest.raises(ValueError, match="num_batches_tracked"):
        jbn.batch_norm(params, state, np.ones((4, 3), np.float32), True)


def test_flax_batch_norm_variable_names_raise_with_the_torch_names():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"flax.linen.BatchNorm's names.*mean -> running_mean, "
                                         r"var -> running_var, and num_batches_tracked"):
        jbn.batch_norm({}, {"mean": jnp.zeros(3), "var": jnp.ones(3)}, x, True)
    with pytest.raises(ValueError, match=r"scale -> weight\b"):
        jbn.batch_norm({"scale": jnp.ones(3), "bias": jnp.zeros(3)}, {}, x, True)


def test_module_mode_given_twice_or_never_raises_naming_the_layer():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"^BatchNorm1d: train was given both as the field "
                                         r"\(train=True\) and at call time \(train=False\)"):
        jbn.BatchNorm1d(3, train=True).init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="^BatchNorm1d: train was given neither at call time "
                                         "nor as the field.*inside nn.Sequential"):
        jbn.BatchNorm1d(3).init(jax.random.key(0), x)
    # Inside nn.Sequential only the first layer receives train: the second is named.
    model = nn.Sequential([jbn.BatchNorm1d(3), jbn.BatchNorm1d(3)])
    with pytest.raises(ValueError, match="^BatchNorm1d 'layers_1': train was given neither"):
        model.init(jax.random.key(0), x, train=True)
    with pytest.raises(TypeError, match="the train field must be a Python bool or None, got"):
        jbn.BatchNorm1d(3, train=jnp.asarray(True))
