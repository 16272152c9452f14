"""``FrozenBatchNorm2d``: a batch norm with fixed statistics and affine, as torchvision's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbn import _checks
from jbn._batch_norm import batch_norm
from jbn._torch import from_torch_state_dict, to_torch_state_dict

FROZEN_KEYS = ("weight", "bias", "running_mean", "running_var")
# Accepted input ranks: (N, C, H, W), and the unbatched (C, H, W) as a batch of one.
FROZEN_BATCHED_RANKS, FROZEN_UNBATCHED_RANK = (4,), 3
# torchvision's initial values of the four tensors.
FROZEN_INITS = {"weight": jnp.ones, "bias": jnp.zeros, "running_mean": jnp.zeros,
                "running_var": jnp.ones}


def frozen_batch_norm(tensors: Mapping[str, jax.Array], x: jax.Array, *, axis: int,
                      eps: float) -> jax.Array:
    """``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel.

    Args:
      tensors: the four ``(C,)`` tensors of :data:`FROZEN_KEYS`; no gradient reaches them.
      x: batched input with C channels on ``axis``.

    Returns:
      ``y``, of ``x``'s shape and dtype.
    """
    fixed = {k: jax.lax.stop_gradient(tensors[k]) for k in FROZEN_KEYS}
    state = {"running_mean": fixed["running_mean"], "running_var": fixed["running_var"],
             "num_batches_tracked": jnp.zeros((), jnp.int32)}
    params = {"weight": fixed["weight"], "bias": fixed["bias"]}
    y, _ = batch_norm(params, state, x, False, axis=axis, eps=eps)
    return y


class FrozenBatchNorm2d(nn.Module):
    """``torchvision.ops.FrozenBatchNorm2d``: batch norm whose four tensors never change.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` in training
    and evaluation alike: no batch statistics, no state update, no gradient to any of
    the four tensors. As torchvision keeps them as buffers (not parameters), they live
    in the ``batch_stats`` collection, so optimizers (weight decay included) never see
    them: ``{"batch_stats": {"weight", "bias", "running_mean", "running_var"}}``, each
    ``(C,)`` float32, initialized to ones, zeros, zeros and ones. Load a trained
    ``BatchNorm2d`` with :meth:`from_torch_state_dict`; export with
    :meth:`to_torch_state_dict`.

    Input ``(N, C, H, W)`` (``axis=-1``: ``(N, H, W, C)``); an unbatched ``(C, H, W)``
    sample is accepted as a batch of one.

    Attributes:
      num_features: C, the number of channels.
      eps: added to the variance (torchvision's default ``1e-5``).
      axis: the channel axis: 1 for PyTorch's NCHW, -1 for NHWC.
    """

    num_features: int
    eps: float = 1e-5
    axis: int = 1

    _batched_ranks: ClassVar[tuple[int, ...]] = FROZEN_BATCHED_RANKS
    _unbatched_rank: ClassVar[int] = FROZEN_UNBATCHED_RANK

    def __post_init__(self) -> None:
        _checks.check_num_features(self.num_features)
        _checks.check_eps(self.eps)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> jax.Array:
        """Normalizes ``x`` with the fixed statistics; ``train`` is accepted and ignored.

        Args:
          x: ``(N, C, H, W)`` or ``(C, H, W)`` (channels on ``axis``), floating.
          train: ignored (the layer behaves the same in both modes), accepted so the
            layer can replace ``BatchNorm2d`` in a model that passes it.

        Returns:
          ``y``, of ``x``'s shape and dtype.
        """
        del train
        x, _, unbatched = _checks.module_batch(
            x, None, self._batched_ranks, self._unbatched_rank, self.axis, self.num_features,
            one_value_raises=False)
        tensors = {k: self.variable("batch_stats", k, FROZEN_INITS[k], (self.num_features,),
                                    jnp.float32).value for k in FROZEN_KEYS}
        y = frozen_batch_norm(tensors, x, axis=self.axis, eps=self.eps)
        return y[0] if unbatched else y

    @staticmethod
    def from_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
        """Variables for this layer from a ``BatchNorm2d`` or ``FrozenBatchNorm2d`` state dict.

        Args:
          state_dict: ``torch.nn.BatchNorm2d(C).state_dict()`` (``num_batches_tracked``
            is dropped, as torchvision does) or
            ``torchvision.ops.FrozenBatchNorm2d(C).state_dict()``; tensors or arrays.

        Returns:
          ``{"batch_stats": {"weight", "bias", "running_mean", "running_var"}}``, each
          ``(C,)`` float32.

        Raises:
          KeyError: a missing or unknown key.
          ValueError: shapes that are not ``(C,)`` for one C.
        """
        full = dict(state_dict)
        missing = [k for k in FROZEN_KEYS if k not in full]
        if missing:
            raise KeyError(f"a frozen batch norm needs {list(FROZEN_KEYS)}; missing {missing}")
        if "num_batches_tracked" not in full:
            full["num_batches_tracked"] = 0
        variables = from_torch_state_dict(full)
        merged = {**variables["params"], **variables["batch_stats"]}
        return {"batch_stats": {k: merged[k].astype(jnp.float32) for k in FROZEN_KEYS}}

    @staticmethod
    def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """This layer's variables as ``torchvision.ops.FrozenBatchNorm2d(C).state_dict()``.

        Args:
          variables: ``{"batch_stats": {"weight", "bias", "running_mean",
            "running_var"}}``, as ``init`` or :meth:`from_torch_state_dict` give them.

        Returns:
          Numpy arrays ``weight``, ``bias``, ``running_mean``, ``running_var``, each
          ``(C,)``; they load into torchvision's ``FrozenBatchNorm2d``, and into a
          ``torch.nn.BatchNorm2d`` (whose ``num_batches_tracked``, not among them,
          keeps its value).

        Raises:
          KeyError: a collection other than ``batch_stats``, or other keys in it.
          ValueError: shapes that are not ``(C,)`` for one C.
        """
        unknown = sorted(set(variables) - {"batch_stats"})
        stats = variables.get("batch_stats", {})
        if unknown or set(stats) != set(FROZEN_KEYS):
            raise KeyError(
                f"a frozen batch norm's variables are {{'batch_stats': {list(FROZEN_KEYS)}}}; "
                f"got {({c: sorted(t) for c, t in variables.items()})}"
            )
        state_dict = to_torch_state_dict({
            "params": {k: stats[k] for k in FROZEN_KEYS[:2]},
            "batch_stats": {**{k: stats[k] for k in FROZEN_KEYS[2:]},
                            "num_batches_tracked": np.zeros((), np.int64)},
        })
        return {k: state_dict[k] for k in FROZEN_KEYS}
