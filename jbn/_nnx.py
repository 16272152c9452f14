"""Flax NNX modules: thin wrappers that hold the variables and call ``batch_norm``."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from jbn import _checks
from jbn._batch_norm import at_least_float32, batch_norm
from jbn._frozen import (
    FROZEN_BATCHED_RANKS,
    FROZEN_INITS,
    FROZEN_KEYS,
    FROZEN_UNBATCHED_RANK,
    frozen_batch_norm,
)
from jbn._recalibrate import MOMENTUM_OVERRIDE
from jbn._typing import Array


# The mode and variables of every batch-norm module, appended to each public class's
# docstring (below) so that ``help()`` shows them there.
_SHARED = """
    Like a PyTorch module, a new module is in training mode. ``model.train()`` and
    ``model.eval()`` (NNX's, which set ``use_running_average`` on every submodule)
    switch the mode, as do ``nnx.view(model, use_running_average=...)`` and the
    PyTorch-style ``training`` attribute; ``__call__(x, train=...)`` overrides it for
    one call.

    Attributes:
      weight: ``nnx.Param`` ``(C,)``, ones (only if ``affine``).
      bias: ``nnx.Param`` ``(C,)``, zeros (only if ``affine``).
      running_mean: ``nnx.BatchStat`` ``(C,)``, zeros (only if
        ``track_running_stats``); float32, or ``param_dtype`` where that is wider.
      running_var: ``nnx.BatchStat`` ``(C,)``, ones (idem).
      num_batches_tracked: ``nnx.BatchStat`` ``()`` int32, 0 (idem).
      use_running_average: True in evaluation mode (NNX's convention, the inverse of
        ``training``).

    ``reset_running_stats()`` and ``reset_parameters()`` restore the initial values,
    as torch's methods of those names do.
    """


class _BatchNorm(nnx.Module):
    """Shared fields and call of the NNX batch-norm modules."""

    # Accepted input ranks: batched, and the unbatched rank treated as a batch of one.
    _batched_ranks: ClassVar[tuple[int, ...] | None] = None
    _unbatched_rank: ClassVar[int | None] = None
    _requires_axis_name: ClassVar[bool] = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        *,
        use_running_average: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        """Creates the variables as ``torch.nn.BatchNorm*d`` does.

        Args:
          num_features: C, the number of channels.
          eps: added to the variance for numerical stability.
          momentum: weight of the batch in the running statistics; None for the
            cumulative average (PyTorch's ``momentum=None``).
          affine: whether to learn ``weight`` and ``bias``.
          track_running_stats: whether to keep running statistics; without them
            evaluation uses the batch statistics.
          axis: the channel axis: 1 for PyTorch's channels-first layout, -1 for
            channels-last.
          axis_name: mapped axis over which training statistics are synchronized.
          axis_index_groups: groups of devices along ``axis_name`` that share statistics.
          dtype: dtype of the output; None keeps the input's dtype.
          param_dtype: dtype of ``weight`` and ``bias``; the running statistics are
            float32, or this dtype where wider (float64).
          use_running_average: start in evaluation mode (default: training, as PyTorch).
          rngs: accepted for signature compatibility with ``nnx.BatchNorm``; unused,
            the initial values are deterministic.
        """
        del rngs
        if self._requires_axis_name and axis_name is None:
            raise ValueError(
                f"{type(self).__name__} needs axis_name, the mapped axis to synchronize over "
                "(e.g. axis_name='batch' with jax.vmap(..., axis_name='batch'))"
            )
        self.num_features = _checks.check_num_features(num_features)
        self.eps = _checks.check_eps(eps)
        self.momentum = _checks.check_momentum(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        # Whether the layer was built synchronized; convert_sync_batchnorm sets the
        # axis of the others, and sets it again on a later conversion.
        self._built_synced = axis_name is not None
        self.dtype = _checks.check_dtype(dtype, "dtype")
        self.param_dtype = _checks.check_dtype(param_dtype, "param_dtype")
        self.use_running_average = bool(use_running_average)
        c = self.num_features
        if affine:
            self.weight = nnx.Param(jnp.ones((c,), param_dtype))
            self.bias = nnx.Param(jnp.zeros((c,), param_dtype))
        if track_running_stats:
            self.running_mean = nnx.BatchStat(jnp.zeros((c,), at_least_float32(param_dtype)))
            self.running_var = nnx.BatchStat(jnp.ones((c,), at_least_float32(param_dtype)))
            self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    @property
    def training(self) -> bool:
        """PyTorch's mode flag: ``not use_running_average``; assignable."""
        return not self.use_running_average

    @training.setter
    def training(self, value: bool) -> None:
        self.use_running_average = not value

    def reset_running_stats(self) -> None:
        """Running mean to zeros, variance to ones and count to 0, as torch's method does.

        Keeps each variable's shape and dtype; without ``track_running_stats`` there
        is nothing to reset.
        """
        if self.track_running_stats:
            for name, fill in (("running_mean", 0), ("running_var", 1),
                               ("num_batches_tracked", 0)):
                variable = getattr(self, name)
                variable.set_value(jnp.full(variable.shape, fill, variable.dtype))

    def reset_parameters(self) -> None:
        """Resets as torch's method does: all variables to their initial values.

        The running statistics as :meth:`reset_running_stats`, ``weight`` to ones and
        ``bias`` to zeros.
        """
        self.reset_running_stats()
        if self.affine:
            self.weight.set_value(jnp.ones_like(self.weight[...]))
            self.bias.set_value(jnp.zeros_like(self.bias[...]))

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Sets the mode for ``nnx.view(model, use_running_average=...)``.

        Args:
          use_running_average: if True, evaluation (the running statistics); if
            False, training (batch statistics, updated running statistics); None
            leaves the mode as it is.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(
        self, x: Array, *, train: bool | None = None, mask: Array | None = None
    ) -> jax.Array:
        """Normalizes ``x``; in training also updates the running statistics in place.

        Args:
          x: floating input with ``num_features`` channels on ``axis`` (a jax or
            numpy array or a torch tensor); bfloat16 and float16 are computed in
            float32.
          train: overrides the module's mode for this call: True for batch statistics
            (and updated running statistics), False for the running statistics; None
            uses ``self.training``.
          mask: optional boolean array of ``x``'s shape without the channel axis;
            only True positions enter the statistics.

        Returns:
          ``y``, of ``x``'s shape, in ``dtype`` (by default ``x``'s dtype).
        """
        train = _checks.check_train(self.training if train is None else train)
        x, mask, unbatched = _checks.module_batch(
            x, mask, self._batched_ranks, self._unbatched_rank, self.axis, self.num_features,
            one_value_raises=train and self.axis_name is None)
        params = {"weight": self.weight[...], "bias": self.bias[...]} if self.affine else {}
        keys = _checks.STATE_KEYS if self.track_running_stats else ()
        state = {k: getattr(self, k)[...] for k in keys}
        y, new_state = batch_norm(
            params,
            state,
            x,
            train,
            axis=self.axis,
            eps=self.eps,
            momentum=MOMENTUM_OVERRIDE.get(self.momentum),
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            dtype=self.dtype,
        )
        if train:
            for k in keys:
                # A whole new value, of the variable's shape and dtype: set_value skips
                # the indexed write (an eager array op per variable, and a write into
                # the caller's arrays where the state holds numpy ones).
                getattr(self, k).set_value(new_state[k])
        return y[0] if unbatched else y


class BatchNorm1d(_BatchNorm):
    """``torch.nn.BatchNorm1d`` for NNX: input ``(N, C)`` or ``(N, C, L)``.

    With ``axis=-1`` the input is ``(N, C)`` or ``(N, L, C)``.
    """

    _batched_ranks: ClassVar[tuple[int, ...] | None] = (2, 3)


class BatchNorm2d(_BatchNorm):
    """``torch.nn.BatchNorm2d`` for NNX: input ``(N, C, H, W)`` (``axis=-1``: ``(N, H, W, C)``).

    An unbatched ``(C, H, W)`` sample is normalized as a batch of one.
    """

    _batched_ranks: ClassVar[tuple[int, ...] | None] = (4,)
    _unbatched_rank: ClassVar[int | None] = 3


class BatchNorm3d(_BatchNorm):
    """``torch.nn.BatchNorm3d`` for NNX: input ``(N, C, D, H, W)``.

    With ``axis=-1`` the input is ``(N, D, H, W, C)``. An unbatched ``(C, D, H, W)``
    sample is normalized as a batch of one.
    """

    _batched_ranks: ClassVar[tuple[int, ...] | None] = (5,)
    _unbatched_rank: ClassVar[int | None] = 4


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.SyncBatchNorm`` for NNX: any input ``(N, C, ...)``, statistics over ``axis_name``.

    ``axis_name`` is required: call the module inside a map that binds it (e.g.
    ``nnx.vmap``/``nnx.pmap``/``nnx.shard_map`` with that ``axis_name``, or
    ``jax.vmap`` over ``nnx.split`` state). Evaluation does not communicate. Under
    ``nnx.shard_map`` the running statistics, the same on every device, may stay
    replicated (``in_specs`` ``P()`` for the module) with the replication check on.
    """

    _requires_axis_name: ClassVar[bool] = True


def convert_sync_batchnorm(model: nnx.Module, axis_name: Any,
                           axis_index_groups: Any = None) -> nnx.Module:
    """Synchronizes an NNX model's jbn batch-norm layers over ``axis_name``, in place.

    The NNX form of :func:`jbn.convert_sync_batchnorm` (which calls it for NNX
    models): every ``jbn.nnx`` batch-norm layer in ``model`` built without an
    ``axis_name`` takes ``axis_name`` and ``axis_index_groups``; a later conversion
    sets them again, and layers built with an ``axis_name`` keep theirs.

    Returns:
      ``model`` itself, its layers converted.
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, _BatchNorm) and not module._built_synced:
            module.axis_name = axis_name
            module.axis_index_groups = axis_index_groups
    return model


class FrozenBatchNorm2d(nnx.Module):
    """``torchvision.ops.FrozenBatchNorm2d`` for NNX: batch norm whose four tensors never change.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` in training
    and evaluation alike, as :class:`jbn.FrozenBatchNorm2d`: no batch statistics, no
    update, no gradient to the tensors. As torchvision keeps them as buffers, they are
    ``nnx.BatchStat`` variables, which an ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
    never sees. Input ``(N, C, H, W)`` (``axis=-1``: ``(N, H, W, C)``); an unbatched
    ``(C, H, W)`` sample is accepted as a batch of one.

    Attributes:
      weight, bias, running_mean, running_var: ``nnx.BatchStat`` ``(C,)`` float32, ones,
        zeros, zeros and ones; their pure dict loads from and exports to a torch
        ``state_dict`` with :func:`jbn.load_torch_state_dict` and
        :func:`jbn.export_torch_state_dict`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, axis: int = 1, *,
                 rngs: nnx.Rngs | None = None) -> None:
        """Creates the four tensors as torchvision does.

        Args:
          num_features: C, the number of channels.
          eps: added to the variance (torchvision's default ``1e-5``).
          axis: the channel axis: 1 for PyTorch's NCHW, -1 for NHWC.
          rngs: accepted for signature compatibility with NNX layers; unused.
        """
        del rngs
        self.num_features = _checks.check_num_features(num_features)
        self.eps = _checks.check_eps(eps)
        self.axis = axis
        for k in FROZEN_KEYS:
            setattr(self, k, nnx.BatchStat(FROZEN_INITS[k]((self.num_features,), jnp.float32)))

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Accepts ``nnx.view(model, use_running_average=...)`` and changes nothing.

        So that a model whose batch norms are all frozen takes the same mode switch
        as one with :class:`BatchNorm2d` layers.
        """
        del use_running_average

    def __call__(self, x: Array, *, train: bool | None = None) -> jax.Array:
        """Normalizes ``x`` with the fixed tensors; ``train`` is accepted and ignored.

        Args:
          x: ``(N, C, H, W)`` or ``(C, H, W)`` (channels on ``axis``), floating.
          train: ignored (the layer behaves the same in both modes).

        Returns:
          ``y``, of ``x``'s shape and dtype.
        """
        del train
        x, _, unbatched = _checks.module_batch(
            x, None, FROZEN_BATCHED_RANKS, FROZEN_UNBATCHED_RANK, self.axis, self.num_features,
            one_value_raises=False)
        y = frozen_batch_norm({k: getattr(self, k)[...] for k in FROZEN_KEYS}, x,
                              axis=self.axis, eps=self.eps)
        return y[0] if unbatched else y


for _cls in (_BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm):
    _cls.__doc__ = (_cls.__doc__ or "").rstrip() + "\n" + _SHARED
del _cls
