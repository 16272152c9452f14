"""jbn: PyTorch-exact batch normalization for JAX and Flax.

The functional core is :func:`batch_norm` with :func:`init`. Around it:

- Flax linen modules :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`
  and :class:`SyncBatchNorm` (running statistics in ``batch_stats``), and their Flax
  NNX counterparts in :mod:`jbn.nnx`;
- :class:`FrozenBatchNorm2d`, a layer with fixed statistics and no state;
- :func:`from_torch_state_dict` and :func:`to_torch_state_dict` (one layer's weights
  between PyTorch and Flax), :func:`load_torch_state_dict` (a whole PyTorch model's
  ``state_dict`` into the variables of its Flax equivalent) and
  :func:`export_torch_state_dict` (back);
- model surgery and upkeep: :func:`convert_sync_batchnorm` (synchronize a model's
  layers across devices), :func:`fold_conv_bn` (fold an evaluation-mode layer into the
  convolution before it), :func:`recalibrate_batch_stats` (recompute the running
  statistics from data).
"""

from typing import TYPE_CHECKING

from jbn._batch_norm import batch_norm as batch_norm
from jbn._batch_norm import init as init
from jbn._convert import convert_sync_batchnorm as convert_sync_batchnorm
from jbn._export import export_torch_state_dict as export_torch_state_dict
from jbn._fold import fold_conv_bn as fold_conv_bn
from jbn._frozen import FrozenBatchNorm2d as FrozenBatchNorm2d
from jbn._import import load_torch_state_dict as load_torch_state_dict
from jbn._linen import BatchNorm1d as BatchNorm1d
from jbn._linen import BatchNorm2d as BatchNorm2d
from jbn._linen import BatchNorm3d as BatchNorm3d
from jbn._linen import SyncBatchNorm as SyncBatchNorm
from jbn._recalibrate import recalibrate_batch_stats as recalibrate_batch_stats
from jbn._torch import from_torch_state_dict as from_torch_state_dict
from jbn._torch import to_torch_state_dict as to_torch_state_dict

if TYPE_CHECKING:  # imported on first use at run time, by __getattr__ below
    from jbn import nnx as nnx

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm2d",
    "SyncBatchNorm",
    "batch_norm",
    "convert_sync_batchnorm",
    "export_torch_state_dict",
    "fold_conv_bn",
    "from_torch_state_dict",
    "init",
    "load_torch_state_dict",
    "nnx",
    "recalibrate_batch_stats",
    "to_torch_state_dict",
]


def __getattr__(name: str):
    """Imports the ``jbn.nnx`` submodule on first use (``flax.nnx`` brings in optax)."""
    if name == "nnx":
        import importlib

        return importlib.import_module("jbn.nnx")
    raise AttributeError(f"module 'jbn' has no attribute {name!r}")
