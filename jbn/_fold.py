"""Folding an evaluation-mode batch norm into the convolution before it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jbn._batch_norm import at_least_float32
from jbn._checks import to_jax
from jbn._typing import Array


def fold_conv_bn(
    kernel: Array,
    conv_bias: Array | None,
    bn_variables: Mapping[str, Any],
    *,
    eps: float = 1e-5,
    layout: Literal["HWIO", "OIHW"] = "HWIO",
) -> tuple[jax.Array, jax.Array]:
    """Folds a batch norm's running statistics and affine into the preceding convolution.

    Mirrors ``torch.nn.utils.fusion.fuse_conv_bn_weights``: with
    ``scale = weight / sqrt(running_var + eps)``, the folded kernel is the kernel with
    every output channel multiplied by ``scale`` and the folded bias is
    ``(conv_bias - running_mean) * scale + bias``. The folded convolution equals
    convolution followed by the batch norm in evaluation mode.

    Args:
      kernel: the convolution's kernel. ``layout="HWIO"`` (Flax's ``nn.Conv``, also
        ``nn.Dense``'s ``(in, out)``): output features on the last axis, any number
        of spatial axes (``(W, I, O)``, ``(H, W, I, O)``, ``(D, H, W, I, O)``).
        ``layout="OIHW"`` (PyTorch's ``Conv*d.weight``): output features on the
        first axis.
      conv_bias: the convolution's bias ``(O,)``, or None for a convolution without
        bias (treated as zeros).
      bn_variables: the batch norm's variables as ``init``/``from_torch_state_dict``
        give them: ``{"params": {"weight", "bias"}, "batch_stats": {"running_mean",
        "running_var", ...}}`` (``params`` may be absent for ``affine=False``), or a
        ``FrozenBatchNorm2d``'s, whose ``weight`` and ``bias`` are in ``batch_stats``.
      eps: the batch norm's ``eps``.
      layout: where the kernel keeps its output features, see ``kernel``.

    Returns:
      ``(kernel, bias)``: the folded kernel, of ``kernel``'s shape and layout, and
      the folded bias ``(O,)``, both in the wider of the kernel's and the running
      variance's dtypes, at least float32 (``conv_bias`` is cast to it).

    Raises:
      ValueError: an unknown layout, no running statistics, or a channel count that
        differs between the kernel and the batch norm.
    """
    if layout not in ("HWIO", "OIHW"):
        raise ValueError(f"layout must be 'HWIO' (output features last) or 'OIHW' (first), "
                         f"got {layout!r}")
    stats = bn_variables.get("batch_stats") or {}
    if "running_mean" not in stats or "running_var" not in stats:
        raise ValueError(
            "bn_variables['batch_stats'] must hold 'running_mean' and 'running_var': a batch "
            "norm with track_running_stats=False uses batch statistics and cannot be folded"
        )
    params = bn_variables.get("params") or {}
    # torch tensors (a Conv2d's weight, which requires grad) read as jbn reads inputs.
    kernel = to_jax(kernel)
    dtype = at_least_float32(kernel.dtype, to_jax(stats["running_var"]).dtype)
    out_axis = kernel.ndim - 1 if layout == "HWIO" else 0
    out = kernel.shape[out_axis]
    mean = to_jax(stats["running_mean"]).astype(dtype)
    var = to_jax(stats["running_var"]).astype(dtype)
    # FrozenBatchNorm2d keeps its affine in batch_stats, with the statistics.
    weight = to_jax(params.get("weight", stats.get("weight", jnp.ones_like(var)))).astype(dtype)
    bias = to_jax(params.get("bias", stats.get("bias", jnp.zeros_like(var)))).astype(dtype)
    if mean.shape != (out,):
        raise ValueError(
            f"the kernel has {out} output features (axis {out_axis} of shape {kernel.shape}, "
            f"layout {layout}) but the batch norm has {mean.shape} channels"
        )
    conv_bias = jnp.zeros((out,), dtype) if conv_bias is None else to_jax(conv_bias).astype(dtype)
    scale = weight * jax.lax.rsqrt(var + eps)
    cshape = tuple(-1 if i == out_axis else 1 for i in range(kernel.ndim))
    folded_kernel = kernel.astype(dtype) * scale.reshape(cshape)
    folded_bias = (conv_bias - mean) * scale + bias
    return folded_kernel, folded_bias
