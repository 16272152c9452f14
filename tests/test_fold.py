"""Conv-BN folding against conv-then-BN in evaluation and against torch's fuse_conv_bn_eval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

import jbn


def _torch_conv_bn(bias=True, affine=True, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=bias).eval()
    bn = torch.nn.BatchNorm2d(5, affine=affine, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5))
        bn.running_var.copy_(torch.rand(5) + 0.5)
        if affine:
            bn.weight.copy_(torch.randn(5))
            bn.bias.copy_(torch.randn(5))
    return conv, bn


def _relative_error(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_folds_a_torch_convolutions_own_parameters():
    # conv.weight requires grad, which torch's conversion to numpy refuses.
    conv, bn = _torch_conv_bn()
    fused = fuse_conv_bn_eval(conv, bn)
    assert conv.weight.requires_grad
    kernel, folded_bias = jbn.fold_conv_bn(conv.weight, conv.bias, {
        "params": {"weight": bn.weight, "bias": bn.bias},
        "batch_stats": {"running_mean": bn.running_mean, "running_var": bn.running_var}},
        eps=bn.eps, layout="OIHW")
    np.testing.assert_allclose(kernel, fused.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(folded_bias, fused.bias.detach().numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_oihw_fold_matches_torch_fuse_conv_bn_eval(bias, affine):
    conv, bn = _torch_conv_bn(bias, affine)
    fused = fuse_conv_bn_eval(conv, bn)
    kernel, folded_bias = jbn.fold_conv_bn(
        conv.weight.detach().numpy(), None if conv.bias is None else conv.bias.detach().numpy(),
        jbn.from_torch_state_dict(bn.state_dict()), eps=bn.eps, layout="OIHW")
    np.testing.assert_allclose(kernel, fused.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(folded_bias, fused.bias.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_nchw_folded_conv_equals_conv_then_bn_in_eval():
    conv, bn = _torch_conv_bn()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = bn(conv(x)).numpy()
    kernel, bias = jbn.fold_conv_bn(conv.weight.detach().numpy(), conv.bias.detach().numpy(),
                                    jbn.from_torch_state_dict(bn.state_dict()), eps=1e-3,
                                    layout="OIHW")
    y = jax.lax.conv_general_dilated(jnp.asarray(x.numpy()), kernel, (1, 1), "SAME",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    y = y + bias[None, :, None, None]
    assert _relative_error(y, reference) <= 1e-5


@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_nhwc_folded_conv_equals_conv_then_jbn_bn_in_eval(spatial):
    rng = np.random.default_rng(spatial)
    ksize = (3,) * spatial
    kernel = rng.normal(size=(*ksize, 3, 4)).astype(np.float32)
    conv_bias = rng.normal(size=4).astype(np.float32)
    x = rng.normal(size=(2, *(6,) * spatial, 3)).astype(np.float32)
    bn = jbn.SyncBatchNorm(4, axis=-1, eps=1e-4, axis_name="unused")
    variables = {
        "params": {"weight": jnp.asarray(rng.normal(size=4), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
        "batch_stats": {"running_mean": jnp.asarray(rng.normal(size=4), jnp.float32),
                        "running_var": jnp.asarray(rng.uniform(0.2, 3, size=4), jnp.float32),
                        "num_batches_tracked": jnp.asarray(7, jnp.int32)},
    }
    spatial_spec = "DHW"[-spatial:]
    dn = ("N" + spatial_spec + "C", spatial_spec + "IO", "N" + spatial_spec + "C")

    def conv(k, b):
        return jax.lax.conv_general_dilated(jnp.asarray(x), k, (1,) * spatial, "SAME",
                                            dimension_numbers=dn) + b

    reference = bn.apply(variables, conv(jnp.asarray(kernel), jnp.asarray(conv_bias)), train=False)
    folded = conv(*jbn.fold_conv_bn(kernel, conv_bias, variables, eps=1e-4, layout="HWIO"))
    assert _relative_error(folded, reference) <= 1e-5


def test_frozen_batch_norm_folds_with_its_weight_and_bias_from_batch_stats():
    # FrozenBatchNorm2d keeps weight and bias in batch_stats, not in params.
    conv, bn = _torch_conv_bn()
    fused = fuse_conv_bn_eval(conv, bn)
    frozen = jbn.FrozenBatchNorm2d.from_torch_state_dict(bn.state_dict())
    kernel, folded_bias = jbn.fold_conv_bn(conv.weight.detach().numpy(),
                                           conv.bias.detach().numpy(), frozen, eps=1e-3,
                                           layout="OIHW")
    np.testing.assert_allclose(kernel, fused.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(folded_bias, fused.bias.detach().numpy(), rtol=1e-6, atol=1e-7)
    # ... and the folded convolution equals the convolution, then the frozen layer.
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    conv_out = conv(torch.from_numpy(x)).detach().numpy()
    reference = jbn.FrozenBatchNorm2d(5, eps=1e-3).apply(frozen, jnp.asarray(conv_out))
    y = jax.lax.conv_general_dilated(jnp.asarray(x), kernel, (1, 1), "SAME",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    assert _relative_error(y + folded_bias[None, :, None, None], reference) <= 1e-5


def test_dense_kernel_folds_with_hwio_layout():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(6, 4)).astype(np.float32)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    variables = {"batch_stats": {"running_mean": jnp.asarray(rng.normal(size=4), jnp.float32),
                                 "running_var": jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32)}}
    k, b = jbn.fold_conv_bn(kernel, None, variables)
    stats = variables["batch_stats"]
    expected = (x @ kernel - stats["running_mean"]) / np.sqrt(stats["running_var"] + 1e-5)
    np.testing.assert_allclose(x @ k + b, expected, rtol=1e-5, atol=1e-5)


def test_fold_rejects_bad_layout_missing_stats_and_channel_mismatch():
    params, state = jbn.init(4)
    with pytest.raises(ValueError, match="layout"):
        jbn.fold_conv_bn(np.ones((3, 3, 2, 4)), None, {"batch_stats": state}, layout="NHWC")
    with pytest.raises(ValueError, match="track_running_stats=False"):
        jbn.fold_conv_bn(np.ones((3, 3, 2, 4)), None, {"params": params})
    with pytest.raises(ValueError, match="5 output features"):
        jbn.fold_conv_bn(np.ones((3, 3, 2, 5)), None, {"batch_stats": state})
