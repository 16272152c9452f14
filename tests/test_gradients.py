"""Gradients: equal to torch autograd's, correct to second order, in both modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

import jbn
from reference import to_channels_last, torch_layer

CASES = [
    # (shape NCHW-style, channels_last, train, track_running_stats)
    ((6, 4), False, True, True),
    ((3, 4, 5), False, True, True),
    ((3, 4, 5, 6), False, True, True),
    ((3, 4, 5, 6), True, True, True),
    ((2, 3, 3, 4, 5), True, True, True),
    ((3, 4, 5, 6), False, False, True),  # evaluation with running statistics
    ((3, 4, 5, 6), True, False, False),  # evaluation with batch statistics
]


@pytest.mark.parametrize("shape, channels_last, train, track", CASES)
def test_gradients_of_x_weight_and_bias_equal_torch_autograd(shape, channels_last, train, track):
    rng = np.random.default_rng(0)
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, c).astype(np.float32)
    bias = rng.uniform(-1.0, 1.0, c).astype(np.float32)
    running_mean = rng.standard_normal(c).astype(np.float32)
    running_var = rng.uniform(0.5, 2.0, c).astype(np.float32)

    layer = torch_layer(len(shape) - 2, c, weight=weight, bias=bias, track_running_stats=track)
    if track:
        layer.running_mean.copy_(torch.from_numpy(running_mean))
        layer.running_var.copy_(torch.from_numpy(running_var))
    layer.train(train)
    xt = torch.from_numpy(x).requires_grad_()
    layer(xt).backward(torch.from_numpy(dy))

    state = {}
    if track:
        state = {"running_mean": jnp.asarray(running_mean), "running_var": jnp.asarray(running_var),
                 "num_batches_tracked": jnp.zeros((), jnp.int32)}
    layout = to_channels_last if channels_last else (lambda a: a)
    axis = -1 if channels_last else 1

    def loss(x, weight, bias):
        y, _ = jbn.batch_norm({"weight": weight, "bias": bias}, state, x, train, axis=axis)
        return jnp.sum(y * layout(dy))

    dx, dw, db = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(layout(x), weight, bias)
    np.testing.assert_allclose(dx, layout(xt.grad.numpy()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, layer.weight.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(db, layer.bias.grad.numpy(), rtol=1e-5, atol=1e-4)


@pytest.fixture
def float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("masked", [False, True])
def test_second_order_derivatives_pass_check_grads(float64, axis, masked):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 3, 2, 2)) * 3 + 2)
    if axis == -1:
        x = jnp.moveaxis(x, 1, -1)
    weight = jnp.asarray(rng.uniform(0.5, 2.0, 3))
    bias = jnp.asarray(rng.standard_normal(3))
    mask = jnp.asarray(rng.random((4, 2, 2)) > 0.3) if masked else None

    def f(x, weight, bias):
        return jbn.batch_norm({"weight": weight, "bias": bias}, {}, x, True, axis=axis, mask=mask)[0]

    assert f(x, weight, bias).dtype == jnp.float64
    check_grads(f, (x, weight, bias), order=2, modes=["fwd", "rev"])


def test_forward_mode_equals_reverse_mode_jacobian(float64):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 2, 4)))
    params, _ = jbn.init(2, dtype=jnp.float64)

    def f(x):
        return jbn.batch_norm(params, {}, x, True)[0]

    np.testing.assert_allclose(jax.jacfwd(f)(x), jax.jacrev(f)(x), rtol=1e-12, atol=1e-12)


def test_gradient_of_normalized_output_sums_to_zero_per_channel():
    # Closed form: y does not change when a constant is added to a channel, so the
    # gradient of any loss with respect to x sums to zero over each channel.
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, 3, 4, 4)), jnp.float32) + 100.0
    params, _ = jbn.init(3)

    def loss(x):
        y, _ = jbn.batch_norm(params, {}, x, True)
        return jnp.sum(jnp.sin(y))

    dx = jax.grad(loss)(x)
    np.testing.assert_allclose(dx.sum(axis=(0, 2, 3)), 0.0, atol=1e-4)
