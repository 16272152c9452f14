"""``convert_sync_batchnorm``: PyTorch's ``SyncBatchNorm.convert_sync_batchnorm`` for Flax."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TypeVar, overload

import flax.linen as nn

from jbn._linen import _BatchNorm

if TYPE_CHECKING:
    from flax import nnx

    NnxModule = TypeVar("NnxModule", bound=nnx.Module)
else:
    NnxModule = TypeVar("NnxModule")


class _SyncConverted(nn.Module):
    """A linen model whose unsynced jbn batch-norm layers synchronize over ``axis_name``.

    Shares the wrapped model's scope, so its variables are exactly the model's.

    Attributes:
      model: the wrapped linen model.
      axis_name: the mapped axis to synchronize over.
      axis_index_groups: groups of devices along ``axis_name`` that share statistics.
    """

    model: nn.Module
    axis_name: Any
    axis_index_groups: Any = None

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the model's ``__call__``, every jbn batch-norm layer in it synchronized."""

        def synchronize(next_fun, args, kwargs, context):
            layer = context.module
            if (
                context.method_name == "__call__"
                and isinstance(layer, _BatchNorm)
                and layer.axis_name is None
            ):
                # The same layer on the same scope (same variables), with an axis name.
                synced = layer.clone(
                    parent=layer.scope,
                    axis_name=self.axis_name,
                    axis_index_groups=self.axis_index_groups,
                )
                return synced(*args, **kwargs)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(synchronize):
            return self.model(*args, **kwargs)


@overload
def convert_sync_batchnorm(model: nn.Module, axis_name: Any,
                           axis_index_groups: Any = None) -> nn.Module: ...
@overload
def convert_sync_batchnorm(model: NnxModule, axis_name: Any,
                           axis_index_groups: Any = None) -> NnxModule: ...
def convert_sync_batchnorm(model: Any, axis_name: Any, axis_index_groups: Any = None) -> Any:
    """Returns ``model`` with every jbn batch-norm layer synchronized over ``axis_name``.

    Mirrors ``torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)``:
    every ``BatchNorm1d``/``2d``/``3d`` (and ``SyncBatchNorm``) layer inside ``model``
    whose ``axis_name`` is None computes its training statistics over the global batch
    across ``axis_name``, as ``jbn.SyncBatchNorm`` does. Layers created in ``setup`` or
    inline in ``@nn.compact`` methods, at any depth, are converted; layers that already
    have an ``axis_name`` keep it. Evaluation and ``init`` do not synchronize.
    Converting a converted model converts the original again: as in PyTorch, the
    last conversion's ``axis_name`` (and groups) is the one its layers use.

    The result is a linen module with exactly ``model``'s variables (same tree, same
    names), so the same ``variables`` work with both; only its ``__call__`` is
    converted (``apply(..., method=...)`` with another method is not). Apply it inside
    ``jax.pmap``, ``shard_map`` or ``jax.vmap`` that binds ``axis_name``; outside such a
    map, training raises a ``NameError`` naming the axis.

    A Flax NNX model (``jbn.nnx`` layers) is converted in place and returned: its
    layers built without an ``axis_name`` take this one (a later conversion sets it
    again), and ``nnx.split``/``nnx.merge`` carry it as any attribute.

    Args:
      model: a linen model (unbound) or an NNX model that uses jbn batch-norm layers.
      axis_name: the mapped axis to synchronize over, e.g. ``"batch"``.
      axis_index_groups: optional groups of device indices along ``axis_name`` that
        share statistics (``pmap`` only), like PyTorch's ``process_group``.

    Returns:
      For linen, a linen module: ``converted.init(key, *args)`` and
      ``converted.apply(variables, *args, mutable=["batch_stats"])`` take
      ``model.__call__``'s arguments. For NNX, ``model`` itself.

    Example::

      model = jbn.convert_sync_batchnorm(ResNet(), axis_name="batch")
      step = jax.pmap(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                      axis_name="batch", in_axes=(None, 0))
    """
    if axis_name is None:
        raise ValueError(
            "convert_sync_batchnorm needs axis_name, the mapped axis to synchronize over"
        )
    nnx = sys.modules.get("flax.nnx")  # an NNX model means flax.nnx was imported
    if nnx is not None and isinstance(model, nnx.Module):
        from jbn._nnx import convert_sync_batchnorm as convert_nnx

        return convert_nnx(model, axis_name, axis_index_groups)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a flax.linen or flax.nnx Module, got {type(model).__name__}")
    if isinstance(model, _SyncConverted):
        model = model.model
    return _SyncConverted(model, axis_name, axis_index_groups)
