"""Flax linen modules: thin wrappers that create the variables and call ``batch_norm``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jbn import _checks
from jbn._batch_norm import at_least_float32, batch_norm
from jbn._recalibrate import MOMENTUM_OVERRIDE
from jbn._typing import Array


# The fields of every batch-norm module, appended to each public class's docstring
# (below) so that ``help()`` shows them there.
_ATTRIBUTES = """
    Attributes:
      num_features: C, the number of channels.
      eps: added to the variance for numerical stability.
      momentum: weight of the batch in the running statistics; None for the
        cumulative average (PyTorch's ``momentum=None``).
      affine: whether to learn ``weight`` (ones) and ``bias`` (zeros) in ``params``.
      track_running_stats: whether to keep ``running_mean``, ``running_var`` and
        ``num_batches_tracked`` in ``batch_stats``; without them evaluation uses the
        batch statistics.
      axis: the channel axis: 1 for PyTorch's channels-first layout, -1 for
        channels-last (Flax's NHWC).
      axis_name: mapped axis over which training statistics are synchronized.
      axis_index_groups: groups of devices along ``axis_name`` that share statistics.
      dtype: dtype of the output; None keeps the input's dtype.
      param_dtype: dtype of ``weight`` and ``bias``; the running statistics are float32,
        or this dtype where wider (float64).
      train: the mode, for a layer that is called without it (inside
        ``nn.Sequential``, which passes call arguments to its first layer only):
        give it here or at each call, not both (Flax's ``use_running_average``
        convention); a ValueError naming the layer otherwise.

    Variables:
      params: ``weight`` (ones) and ``bias`` (zeros), ``(C,)`` in ``param_dtype``
        (only if ``affine``).
      batch_stats: ``running_mean`` (zeros) and ``running_var`` (ones), ``(C,)``
        float32 (``param_dtype`` where wider), and ``num_batches_tracked``, ``()``
        int32 (only if ``track_running_stats``).
    """


class _BatchNorm(nn.Module):
    """Shared fields and call of the batch-norm modules.

    ``init`` updates no statistics: it needs no bound ``axis_name``, and takes a batch
    of one value per channel in training mode too (PyTorch's error for it is raised
    by ``apply``).
    """

    num_features: int
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    axis: int = 1
    axis_name: Any = None
    axis_index_groups: Any = None
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = jnp.float32
    train: bool | None = None

    # Accepted input ranks: batched, and the unbatched rank treated as a batch of one.
    _batched_ranks: ClassVar[tuple[int, ...] | None] = None
    _unbatched_rank: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        _checks.check_num_features(self.num_features)
        _checks.check_eps(self.eps)
        _checks.check_momentum(self.momentum)
        _checks.check_dtype(self.dtype, "dtype")
        _checks.check_dtype(self.param_dtype, "param_dtype")
        if self.train is not None and not isinstance(self.train, (bool, np.bool_)):
            raise TypeError(f"{self._label()}: the train field must be a Python bool or None, "
                            f"got {type(self.train).__name__}")
        super().__post_init__()

    def _label(self) -> str:
        """The layer as errors name it: its class, and its name where it has one."""
        return type(self).__name__ + (f" {self.name!r}" if self.name else "")

    def _mode(self, train: bool | None) -> bool:
        """The mode: the ``train`` field or the call argument, exactly one of them."""
        if self.train is not None and train is not None:
            raise ValueError(
                f"{self._label()}: train was given both as the field (train={self.train}) and "
                f"at call time (train={train}); give it once"
            )
        if self.train is None and train is None:
            raise ValueError(
                f"{self._label()}: train was given neither at call time nor as the field; pass "
                f"train=True or False to each call, or set the field ({type(self).__name__}"
                "(..., train=True)) on a layer called without it, as inside nn.Sequential, "
                "which passes call arguments to its first layer only"
            )
        return _checks.check_train(self.train if train is None else train)

    @nn.compact
    def __call__(self, x: Array, train: bool | None = None, *,
                 mask: Array | None = None) -> jax.Array:
        """Normalizes ``x``; in training also updates ``batch_stats`` (make it mutable).

        Args:
          x: floating input with ``num_features`` channels on ``axis`` (a jax or
            numpy array or a torch tensor); bfloat16 and float16 are computed in
            float32.
          train: True for batch statistics (and updated running statistics), False
            for the running statistics; required here unless the module's ``train``
            field is set (a ValueError where both or neither are).
          mask: optional boolean array of ``x``'s shape without the channel axis;
            only True positions enter the statistics.

        Returns:
          ``y``, of ``x``'s shape, in ``dtype`` (by default ``x``'s dtype).
        """
        train = self._mode(train)
        initializing = self.is_initializing()
        x, mask, unbatched = _checks.module_batch(
            x, mask, self._batched_ranks, self._unbatched_rank, self.axis, self.num_features,
            one_value_raises=train and self.axis_name is None and not initializing)
        from_batch = train or not self.track_running_stats
        if (initializing and from_batch and mask is None
                and _checks.one_value_per_channel(x, self.num_features)):
            # init keeps no statistics, so a batch of one value per channel (say, a
            # per-device batch of one for a synchronized layer) does not raise: an
            # all-True mask lifts batch_norm's check, and y is what training gives.
            mask = jnp.ones((1,) * (x.ndim - 1), jnp.bool_)
        params = {}
        if self.affine:
            params = {"weight": self._param("weight", nn.initializers.ones),
                      "bias": self._param("bias", nn.initializers.zeros)}
        c = self.num_features
        variables = {}
        if self.track_running_stats:
            stats_dtype = at_least_float32(self.param_dtype)
            variables = {
                "running_mean": self.variable(
                    "batch_stats", "running_mean", jnp.zeros, (c,), stats_dtype),
                "running_var": self.variable(
                    "batch_stats", "running_var", jnp.ones, (c,), stats_dtype),
                "num_batches_tracked": self.variable(
                    "batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32),
            }
        y, new_state = batch_norm(
            params,
            {k: v.value for k, v in variables.items()},
            x,
            train,
            axis=self.axis,
            eps=self.eps,
            momentum=MOMENTUM_OVERRIDE.get(self.momentum),
            # init neither synchronizes nor needs a bound axis name.
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            mask=mask,
            dtype=self.dtype,
        )
        if train and not initializing:
            for key, var in variables.items():
                var.value = new_state[key]
        return y[0] if unbatched else y

    def _param(self, name: str, init: Callable) -> jax.Array:
        """The parameter ``name``, created with ``init`` as ``(num_features,)`` if missing.

        An existing value is read as it is: Flax's ``param`` would trace ``init``
        on every call to check its shape (about half of an eager call's time), and
        ``batch_norm`` checks it against the input's channels anyway.
        """
        if self.has_variable("params", name):
            return nn.meta.unbox(self.get_variable("params", name))
        return self.param(name, init, (self.num_features,), self.param_dtype)


class BatchNorm1d(_BatchNorm):
    """``torch.nn.BatchNorm1d``: input ``(N, C)`` or ``(N, C, L)`` (``axis=-1``: ``(N, L, C)``)."""

    _batched_ranks: ClassVar[tuple[int, ...] | None] = (2, 3)


class BatchNorm2d(_BatchNorm):
    """``torch.nn.BatchNorm2d``: input ``(N, C, H, W)`` (``axis=-1``: ``(N, H, W, C)``).

    An unbatched ``(C, H, W)`` sample is normalized as a batch of one.
    """

    _batched_ranks: ClassVar[tuple[int, ...] | None] = (4,)
    _unbatched_rank: ClassVar[int | None] = 3


class BatchNorm3d(_BatchNorm):
    """``torch.nn.BatchNorm3d``: input ``(N, C, D, H, W)`` (``axis=-1``: ``(N, D, H, W, C)``).

    An unbatched ``(C, D, H, W)`` sample is normalized as a batch of one.
    """

    _batched_ranks: ClassVar[tuple[int, ...] | None] = (5,)
    _unbatched_rank: ClassVar[int | None] = 4


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.SyncBatchNorm``: any input ``(N, C, ...)`` with statistics over ``axis_name``.

    ``axis_name`` is required: apply the module inside ``jax.pmap``, ``shard_map`` or
    ``jax.vmap`` that binds it. Training statistics are those of the global batch
    across that axis; evaluation uses the running statistics and does not communicate.
    Under ``shard_map`` the updated ``batch_stats``, the same on every device, may leave
    as one replicated value (``out_specs`` ``P()``) with the replication check on.
    """

    def __post_init__(self) -> None:
        if self.axis_name is None:
            raise ValueError(
                "SyncBatchNorm needs axis_name, the mapped axis to synchronize over "
                "(e.g. axis_name='batch' with jax.pmap(..., axis_name='batch'))"
            )
        super().__post_init__()


for _cls in (_BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm):
    _cls.__doc__ = (_cls.__doc__ or "").rstrip() + "\n" + _ATTRIBUTES
del _cls
