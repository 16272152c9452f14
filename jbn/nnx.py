"""PyTorch-exact batch normalization as Flax NNX modules.

``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d`` and ``SyncBatchNorm`` take the linen
modules' fields but ``train`` (see :mod:`jbn`) as constructor arguments and hold
``weight``/``bias`` as ``nnx.Param`` and ``running_mean``/``running_var``/
``num_batches_tracked`` as ``nnx.BatchStat``; ``model.train()``/``model.eval()`` switch
the mode. ``FrozenBatchNorm2d`` is torchvision's, as :class:`jbn.FrozenBatchNorm2d`.
"""

from jbn._nnx import BatchNorm1d as BatchNorm1d
from jbn._nnx import BatchNorm2d as BatchNorm2d
from jbn._nnx import BatchNorm3d as BatchNorm3d
from jbn._nnx import FrozenBatchNorm2d as FrozenBatchNorm2d
from jbn._nnx import SyncBatchNorm as SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm2d",
    "SyncBatchNorm",
]
