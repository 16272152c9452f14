"""The types in jbn's public signatures, for its users' type checkers (jbn ships ``py.typed``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class Array(Protocol):
    """An array input: anything with a shape and a dtype.

    jax and numpy arrays, and CPU torch tensors (bfloat16 included), whose values jbn
    reads. Python scalars and lists are not: they have no channel axis.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    # Holds values: a jax.ShapeDtypeStruct (a shape and dtype alone) or a numpy
    # scalar (no channel axis) is not an input.
    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any: ...


# One layer's ``params`` (``weight``, ``bias``) and ``state`` (``running_mean``,
# ``running_var``, ``num_batches_tracked``): jax or numpy arrays, as ``init``, a
# checkpoint or ``to_torch_state_dict`` give them, or a torch layer's own tensors.
Params = Mapping[str, Array]
State = Mapping[str, Array]
