"""Argument validation shared by the functional core and the modules.

Every check runs at trace time on static information (shapes, dtypes, Python
values) and raises with a message that names what was expected and what came.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PARAM_KEYS = ("weight", "bias")
STATE_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def check_num_features(num_features: Any) -> int:
    """Returns ``num_features`` as an int, or raises if it is not a positive integer."""
    if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
        raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
    if num_features < 1:
        raise ValueError(f"num_features must be at least 1, got {num_features}")
    return int(num_features)


def check_eps(eps: Any) -> float:
    """Returns ``eps`` as a float, or raises unless it is a finite number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    return float(eps)


def check_momentum(momentum: Any) -> float | None:
    """Returns ``momentum`` (None or a float in [0, 1]), or raises."""
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(
        momentum, (int, float, np.floating, np.integer)
    ):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    return float(momentum)


def check_dtype(dtype: Any, name: str) -> jnp.dtype | None:
    """Returns ``dtype`` (None kept) as a dtype, or raises unless it is a floating one."""
    if dtype is None:
        return None
    resolved = jnp.dtype(dtype)
    if not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(f"{name} must be a floating-point dtype (float32, bfloat16, float16, "
                        f"float64), got {resolved}")
    return resolved


def check_train(train: Any) -> bool:
    """Returns ``train`` as a Python bool, or raises for traced or non-boolean values."""
    if isinstance(train, (bool, np.bool_)):
        return bool(train)
    raise TypeError(
        "train must be a Python bool (it selects the computation at trace time), got "
        f"{type(train).__name__}; mark it static in the transform that traced it: "
        "static_argnames='train' for jax.jit, static_argnums for jax.checkpoint, nn.remat "
        "or nn.jit"
    )


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor, numpy array or jax array as a numpy array (bfloat16 kept, which
    torch's own conversion to numpy refuses)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return np.asarray(value.float().numpy()).astype(jnp.bfloat16)
        return value.numpy()
    return np.asarray(value)


def to_jax(x: Any) -> jax.Array:
    """``x`` as a jax array: a jax array as it is, a torch tensor through
    :func:`to_numpy`, anything else as ``jnp.asarray`` converts it."""
    if isinstance(x, jax.Array):
        return x
    return jnp.asarray(to_numpy(x) if hasattr(x, "detach") else x)


def as_array(x: Any) -> jax.Array:
    """``x`` as a jax array, as the modules take it: a jax or numpy array, or another
    array with a shape and dtype (a torch tensor, bfloat16 included); raises TypeError
    for values without them (a list, a number)."""
    if getattr(x, "dtype", None) is None or getattr(x, "shape", None) is None:
        raise TypeError(f"expected an array input, got {type(x).__name__}")
    if not (hasattr(x, "__array__") or hasattr(x, "__dlpack__")):  # jax.ShapeDtypeStruct
        raise TypeError(f"expected an array input with values, got {type(x).__name__} "
                        f"(a shape {tuple(x.shape)} and dtype {x.dtype} alone)")
    return to_jax(x)


def check_input(x: Any, axis: int) -> int:
    """Checks that ``x`` is a floating array with a valid channel ``axis``.

    Returns:
      The channel axis as a non-negative int.
    """
    dtype = getattr(x, "dtype", None)
    shape = getattr(x, "shape", None)
    if dtype is None or shape is None:
        raise TypeError(f"expected an array input, got {type(x).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"batch norm expects a floating-point input (float32, bfloat16, float16, float64), "
            f"got dtype {dtype}"
        )
    ndim = len(shape)
    if ndim < 1:
        raise ValueError(f"expected an input with a channel axis, got a scalar of shape {shape}")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for input of shape {tuple(shape)}")
    return int(axis) % ndim


# flax.linen.BatchNorm's variable names and PyTorch's (jbn's) for the same values.
_FLAX_NAMES = {"scale": "weight", "mean": "running_mean", "var": "running_var"}


def check_variables(params: Any, state: Any, num_channels: int, shape: tuple) -> None:
    """Checks that ``params`` and ``state`` hold PyTorch's keys with ``num_channels`` entries."""
    for name, tree, keys in (("params", params, PARAM_KEYS), ("state", state, STATE_KEYS)):
        if not isinstance(tree, Mapping):
            raise TypeError(f"{name} must be a mapping, got {type(tree).__name__}")
        present = set(tree)
        if present and present != set(keys):
            hint = ""
            if present & set(_FLAX_NAMES):
                renames = ", ".join(f"{k} -> {v}" for k, v in _FLAX_NAMES.items() if k in present)
                count = ", and num_batches_tracked" if name == "state" else ""
                hint = (f" (flax.linen.BatchNorm's names; jbn keeps PyTorch's: "
                        f"{renames}{count})")
            raise ValueError(
                f"{name} must be empty or hold exactly the keys {list(keys)}, got "
                f"{sorted(present)}{hint}"
            )
        for key in keys[:2] if present else ():
            got = tuple(getattr(tree[key], "shape", ()))
            if got != (num_channels,):
                raise ValueError(
                    f"the input has {num_channels} channels (shape {tuple(shape)}), but "
                    f"{name}['{key}'] has shape {got}, i.e. num_features="
                    f"{got[0] if len(got) == 1 else got}"
                )
    if state and tuple(getattr(state["num_batches_tracked"], "shape", ())) != ():
        raise ValueError(
            "state['num_batches_tracked'] must be a scalar, got shape "
            f"{tuple(state['num_batches_tracked'].shape)}"
        )


def is_count_dtype(dtype: Any) -> bool:
    """Whether ``num_batches_tracked`` of ``dtype`` counts safely: an integer of 32 or
    64 bits, as PyTorch's int64 and jbn's int32."""
    return jnp.issubdtype(dtype, jnp.integer) and jnp.iinfo(dtype).bits >= 32


def check_count(count: jax.Array) -> None:
    """Raises unless ``num_batches_tracked`` (as a jax array) counts in integers of 32
    bits or more: a bfloat16 count stops at 256, an int8 one wraps at 127, and
    ``momentum=None`` divides by it."""
    if not is_count_dtype(count.dtype):
        raise TypeError(
            f"state['num_batches_tracked'] must be an integer array of 32 or 64 bits (int32, "
            f"as init makes it), got {count.dtype}: casting or averaging all of a model's "
            "variables casts the count too; cast it back, e.g. with .astype(jnp.int32)"
        )


def _same_or_one(length: Any, target: Any) -> bool:
    """Whether an axis of ``length`` broadcasts to ``target`` (either may be symbolic)."""
    try:
        return bool(length == target) or bool(length == 1)
    except jax.errors.InconclusiveDimensionOperation:
        return False


def check_mask(mask: Any, shape: tuple, channel_axis: int) -> tuple:
    """Checks a validity mask against the input's shape without its channel axis.

    Returns:
      The shape the mask broadcasts to: ``shape`` with the channel axis removed.
    """
    target = tuple(s for i, s in enumerate(shape) if i != channel_axis)
    mshape = tuple(getattr(mask, "shape", ()))
    dtype = getattr(mask, "dtype", None)
    if dtype is None or (str(dtype) != "torch.bool" and dtype != jnp.bool_):
        raise TypeError(f"mask must be a boolean array, got {dtype or type(mask).__name__}")
    # Each axis equal to the input's or 1; compared one by one, as symbolic lengths (a
    # program exported for any batch size) compare with each other but not in numpy.
    ok = len(mshape) == len(target) and all(_same_or_one(m, t) for m, t in zip(mshape, target))
    if not ok:
        raise ValueError(
            f"mask must have the input's shape without its channel axis, {target} (or broadcast "
            f"to it with the same rank), got {mshape} for input of shape {tuple(shape)}"
        )
    return target


def check_rank(
    ndim: int, batched_ranks: tuple[int, ...] | None, unbatched_rank: int | None
) -> None:
    """Raises PyTorch's rank error unless ``ndim`` is a batched or the unbatched rank.

    ``batched_ranks=None`` accepts any rank from 2 (SyncBatchNorm); the message lists
    every accepted rank, e.g. "expected 3D or 4D input (got 2D input)".
    """
    if batched_ranks is None:
        if ndim < 2:
            raise ValueError(f"expected at least 2D input (got {ndim}D input)")
        return
    accepted = sorted({*batched_ranks, *(() if unbatched_rank is None else (unbatched_rank,))})
    if ndim not in accepted:
        expected = " or ".join(f"{r}D" for r in accepted)
        raise ValueError(f"expected {expected} input (got {ndim}D input)")


def module_batch(
    x: Any, mask: Any, batched_ranks: tuple[int, ...] | None, unbatched_rank: int | None,
    axis: int, num_features: int, *, one_value_raises: bool,
) -> tuple[jax.Array, Any, bool]:
    """A module's input as a batch: ``(x, mask, unbatched)``.

    An unbatched sample (rank ``unbatched_rank``) gains a leading batch axis of 1, as
    does its mask. Errors name the shape as the module was given it. With
    ``one_value_raises`` (training without synchronization or mask), a sample with
    one value per channel raises PyTorch's error.
    """
    x = to_jax(x)
    check_rank(x.ndim, batched_ranks, unbatched_rank)
    given = tuple(x.shape)
    unbatched = unbatched_rank is not None and x.ndim == unbatched_rank
    if unbatched:
        x = x[None]
        mask = None if mask is None else jnp.asarray(mask)[None]
    channels = x.shape[check_input(x, axis)]
    if channels != num_features:
        note = f", a sample that axis={axis} reads as batched {tuple(x.shape)}" if unbatched else ""
        raise ValueError(f"the input has {channels} channels (shape {given}{note}), but the "
                         f"module has num_features={num_features}")
    if unbatched and one_value_raises and mask is None and one_value_per_channel(x, channels):
        raise too_few_values(given)
    return x, mask, unbatched


def one_value_per_channel(x: jax.Array, channels: int) -> bool:
    """Whether ``x``, with ``channels`` channels, holds one value per channel; False for
    symbolic lengths (a program exported for any batch and length) that cannot tell."""
    try:
        return bool(x.size == channels)
    except jax.errors.InconclusiveDimensionOperation:
        return False


def check_groups(groups: tuple[tuple[Any, ...], ...], devices: int, axis_name: Any) -> int:
    """The size of each group of ``axis_index_groups``; raises unless the groups, of one
    size, hold each of the ``devices`` indices along ``axis_name`` once."""
    indices = [i for group in groups for i in group]
    if (not groups or len({len(group) for group in groups}) != 1
            or sorted(indices) != list(range(devices))):
        raise ValueError(
            f"axis_index_groups must divide the {devices} devices along {axis_name!r} into "
            f"groups of one size, each index 0..{devices - 1} in exactly one group; got "
            f"{[list(group) for group in groups]}"
        )
    return len(groups[0])


def too_few_values(shape: tuple) -> ValueError:
    """PyTorch's error for a batch with a single value per channel."""
    return ValueError(
        f"Expected more than 1 value per channel when training, got input of shape {tuple(shape)}"
    )
