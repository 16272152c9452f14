"""Conversion between a PyTorch batch-norm layer's ``state_dict`` and Flax variables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jbn._batch_norm import at_least_float32
from jbn._checks import PARAM_KEYS, STATE_KEYS, to_numpy

_INT32_MAX = np.iinfo(np.int32).max


# Flax variables that jax.pmap or flax.jax_utils.replicate gave a leading device axis.
_REPLICATED = ("; variables replicated across devices (jax.pmap, flax.jax_utils.replicate) "
               "carry a leading device axis: take one copy first, e.g. "
               "jax.tree.map(lambda a: a[0], variables)")


def _check_shapes(arrays: Mapping[str, np.ndarray], hint: str = "") -> None:
    """Raises unless the per-channel entries are ``(C,)`` for one C and the count a scalar;
    ``hint`` ends the message for an array with one axis too many."""
    sizes = set()
    for k in (*PARAM_KEYS, *STATE_KEYS[:2]):
        if k in arrays:
            shape = arrays[k].shape
            if len(shape) != 1:
                raise ValueError(f"'{k}' must have shape (C,), got {shape}"
                                 f"{hint if len(shape) == 2 else ''}")
            sizes.add(shape[0])
    count = arrays.get("num_batches_tracked")
    if count is not None and count.shape != ():
        raise ValueError(f"'num_batches_tracked' must be a scalar, got shape {count.shape}"
                         f"{hint if count.ndim == 1 else ''}")
    if len(sizes) > 1:
        raise ValueError(f"entries disagree on the number of channels: {sorted(sizes)}")


def from_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
    """Converts one ``torch.nn.BatchNorm*d`` layer's ``state_dict`` to Flax variables.

    Args:
      state_dict: ``{"weight", "bias"}`` (if ``affine``) and ``{"running_mean",
        "running_var", "num_batches_tracked"}`` (if ``track_running_stats``), each
        ``(C,)`` except the scalar count; torch tensors, numpy or jax arrays.

    Returns:
      ``{"params": {"weight", "bias"}, "batch_stats": {"running_mean", "running_var",
      "num_batches_tracked"}}`` as jax arrays, ready for ``module.apply``; a collection
      is left out when the layer has none of its keys. ``num_batches_tracked`` becomes
      int32, the running statistics float32 (float64 ones stay float64 with
      ``jax_enable_x64``); where it is missing (a checkpoint from
      PyTorch before 0.4.1), it is 0, as PyTorch loads it into a fresh layer.

    Raises:
      KeyError: unknown keys, or a group of keys only partly present.
      ValueError: shapes that are not ``(C,)`` for one C, or a non-scalar count.
    """
    unknown = sorted(set(state_dict) - set(PARAM_KEYS) - set(STATE_KEYS))
    if unknown:
        raise KeyError(
            f"unexpected keys {unknown} in a batch-norm state_dict; expected {list(PARAM_KEYS)} "
            f"and/or {list(STATE_KEYS)} (strip a layer's prefix, e.g. 'bn1.', first)"
        )
    arrays = {k: to_numpy(v) for k, v in state_dict.items()}
    _check_shapes(arrays)
    variables: dict[str, dict[str, jax.Array]] = {}
    for collection, keys in (("params", PARAM_KEYS), ("batch_stats", STATE_KEYS)):
        present = [k for k in keys if k in arrays]
        if not present:
            continue
        if collection == "batch_stats" and "num_batches_tracked" not in arrays:
            # Checkpoints from PyTorch before 0.4.1 (older torchvision weights among
            # them) have no count; PyTorch loads them with a fresh layer's, 0.
            arrays["num_batches_tracked"] = np.zeros((), np.int64)
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise KeyError(f"state_dict has {present} but is missing {missing}")
        out = {k: jnp.asarray(arrays[k]) for k in keys[:2]}
        if collection == "batch_stats":
            out = {k: v.astype(at_least_float32(v.dtype)) for k, v in out.items()}
            count = arrays["num_batches_tracked"]
            if not 0 <= int(count) <= _INT32_MAX:
                raise ValueError(f"'num_batches_tracked' = {int(count)} does not fit in int32")
            out["num_batches_tracked"] = jnp.asarray(int(count), jnp.int32)
        variables[collection] = out
    return variables


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Converts one layer's Flax variables to a ``state_dict`` that PyTorch loads.

    Args:
      variables: ``{"params": {"weight", "bias"}, "batch_stats": {...}}``, as
        returned by ``module.init`` or ``from_torch_state_dict``; either collection
        may be absent.

    Returns:
      Numpy arrays keyed like ``torch.nn.BatchNorm*d.state_dict()``:
      ``weight``, ``bias``, ``running_mean``, ``running_var`` (``(C,)``) and
      ``num_batches_tracked`` (``()`` int64). Load with
      ``bn.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.
      bfloat16 parameters come as float32 arrays holding the same values (numpy has
      no bfloat16 that torch reads); ``load_state_dict`` converts them back exactly.

    Raises:
      KeyError: unexpected collections, or missing or unexpected keys in one.
      ValueError: shapes that are not ``(C,)`` for one C, or a non-scalar count (as
        in variables replicated across devices, which the message says how to undo).
    """
    unknown = sorted(set(variables) - {"params", "batch_stats"})
    if unknown:
        raise KeyError(f"unexpected collections {unknown}; expected 'params' and/or 'batch_stats'")
    state_dict: dict[str, np.ndarray] = {}
    for collection, keys in (("params", PARAM_KEYS), ("batch_stats", STATE_KEYS)):
        tree = variables.get(collection)
        if not tree:
            continue
        missing = [k for k in keys if k not in tree]
        extra = sorted(set(tree) - set(keys))
        if missing or extra:
            raise KeyError(
                f"variables['{collection}'] must hold exactly {list(keys)}; "
                f"missing {missing}, unexpected {extra}"
            )
        for k in keys:
            value = np.array(meta.unbox(tree[k]))  # nn.Partitioned and other boxes: the value
            state_dict[k] = value.astype(np.float32) if value.dtype == jnp.bfloat16 else value
    _check_shapes(state_dict, _REPLICATED)
    if "num_batches_tracked" in state_dict:
        state_dict["num_batches_tracked"] = state_dict["num_batches_tracked"].astype(np.int64)
    return state_dict
