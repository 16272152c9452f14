"""A two-dimensional view of a batch in which per-channel work is row- or column-wise.

Batch norm broadcasts ``(C,)`` vectors along every axis but the channel axis, and
sums over all of them. XLA's CPU backend runs both markedly faster on a matrix than
on the original shape with the channel axis in the middle (a reduction over the
non-adjacent axes ``(0, 2, 3)`` of an NCHW array is about 1.5x slower than a row-wise
one), so the computations go through this view:

- channel axis not last: ``(before * C, after)``, each row a contiguous run of one
  channel, a ``(C,)`` vector broadcast as a column tiled ``before`` times;
- channel axis last (or followed only by size-1 axes): ``(before, C)``, a ``(C,)``
  vector broadcast as a row.

Reshaping to and from the view is free (a bitcast), and the derivative of the
broadcast is the view's channel sum, so the backward pass gets the same fast form.
Other backends keep the original shape (``matrix=False``): the arithmetic, and so
every value, is the same either way up to the order of the additions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a ``(C,)`` vector along ``axis`` of an ``ndim``-array: ``(1, C, 1, 1)``."""
    return tuple(-1 if i == axis else 1 for i in range(ndim))


def _on_cpu() -> bool:
    """Whether computations are placed on the CPU by default."""
    return jax.default_backend() == "cpu"


class RowView(NamedTuple):
    """The view of an array of ``shape`` with channels on ``axis``.

    With ``matrix=False`` (the default off the CPU, where XLA's reductions need no
    help and a two-level sum would cost a second kernel launch) the view is the
    array itself and vectors broadcast along ``axis``.
    """

    shape: tuple[int, ...]
    axis: int
    before: int  # product of the axes before the channel axis
    channels: int
    after: int  # product of the axes after it
    matrix: bool

    @classmethod
    def of(cls, shape: tuple[int, ...], axis: int, matrix: bool | None = None) -> RowView:
        """The view for an array of ``shape`` with channels on (non-negative) ``axis``.

        ``matrix``: use the two-dimensional view; by default, on the CPU only.
        """
        shape = tuple(shape)
        return cls(shape, axis, math.prod(shape[:axis]), shape[axis],
                   math.prod(shape[axis + 1:]), _on_cpu() if matrix is None else matrix)

    @property
    def channels_last(self) -> bool:
        """Whether the matrix view is ``(before, C)`` (else ``(before * C, after)``)."""
        return self.after == 1

    def rows(self, x: jax.Array) -> jax.Array:
        """``x`` (of ``shape``) in the view."""
        if not self.matrix:
            return x
        if self.channels_last:
            return x.reshape(self.before, self.channels)
        return x.reshape(self.before * self.channels, self.after)

    def unrows(self, r: jax.Array) -> jax.Array:
        """An array in the view back in ``shape``."""
        return r.reshape(self.shape)

    def broadcast(self, v: jax.Array) -> jax.Array:
        """A ``(C,)`` vector shaped to broadcast against the view."""
        if not self.matrix:
            return v.reshape(channel_shape(len(self.shape), self.axis))
        if self.channels_last:
            return v[None, :]
        return jnp.tile(v, self.before)[:, None]

    def channel_sum(self, r: jax.Array) -> jax.Array:
        """Sum of an array in the view per channel: ``(C,)``."""
        if not self.matrix:
            return jnp.sum(r, axis=tuple(i for i in range(r.ndim) if i != self.axis))
        if self.channels_last:
            return jnp.sum(r, axis=0)
        return jnp.sum(jnp.sum(r, axis=1).reshape(self.before, self.channels), axis=0)
