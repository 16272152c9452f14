"""A two-dimensional view of a batch in which per-channel work is row-wise.

Batch norm broadcasts ``(C,)`` vectors along every axis but the channel axis, and
sums over all of them. With the channel axis followed by others (NCHW, NCL, NCDHW),
XLA's CPU backend runs both markedly faster on the matrix ``(before * C, after)``,
each row a contiguous run of one channel, than on the original shape: a reduction
over the non-adjacent axes ``(0, 2, 3)`` of an NCHW array is about 1.5x slower than a
row-wise one followed by a small sum over ``before``. There a ``(C,)`` vector
broadcasts as a column tiled ``before`` times, and the derivative of that broadcast
is the same row-wise sum, so the backward pass gets the fast form too.

Everywhere else the view is the array itself: with channels last (where the matrix
gains nothing on the CPU, and a bfloat16 backward pass would convert ``dy`` twice)
and on other backends (where XLA's reductions need no help and a two-level sum would
only cost a second kernel launch). The arithmetic, and so every value, is the same
either way up to the order of the additions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.export import is_symbolic_dim


def channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a ``(C,)`` vector along ``axis`` of an ``ndim``-array: ``(1, C, 1, 1)``."""
    return tuple(-1 if i == axis else 1 for i in range(ndim))


def default_on_cpu() -> bool:
    """Whether computations are placed on the CPU by default."""
    return jax.default_backend() == "cpu"


class RowView(NamedTuple):
    """The view of an array of ``shape`` with channels on ``axis``.

    ``matrix``: whether the view is ``(before * C, after)`` rather than ``shape``.
    """

    shape: tuple[int, ...]
    axis: int
    before: int  # product of the axes before the channel axis
    channels: int
    after: int  # product of the axes after it
    on_cpu: bool  # whether XLA's CPU backend will compile the computation

    @classmethod
    def of(cls, shape: tuple[int, ...], axis: int) -> RowView:
        """The view for an array of ``shape`` with channels on (non-negative) ``axis``."""
        shape = tuple(shape)
        return cls(shape, axis, math.prod(shape[:axis]), shape[axis],
                   math.prod(shape[axis + 1:]), default_on_cpu())

    @property
    def matrix(self) -> bool:
        """Whether the view is ``(before * C, after)``; else it is ``shape`` itself, as
        for symbolic lengths (a program exported for any batch size)."""
        static = not any(is_symbolic_dim(d) for d in self.shape)
        return self.on_cpu and static and self.after > 1

    def rows(self, x: jax.Array) -> jax.Array:
        """``x`` (of ``shape``) in the view."""
        return x.reshape(self.before * self.channels, self.after) if self.matrix else x

    def unrows(self, r: jax.Array) -> jax.Array:
        """An array in the view back in ``shape``."""
        return r.reshape(self.shape)

    def broadcast(self, v: jax.Array) -> jax.Array:
        """A ``(C,)`` vector shaped to broadcast against the view."""
        if self.matrix:
            return jnp.tile(v, self.before)[:, None]
        return v.reshape(channel_shape(len(self.shape), self.axis))

    def channel_sum(self, r: jax.Array) -> jax.Array:
        """Sum of an array in the view per channel: ``(C,)``."""
        if self.matrix:
            return jnp.sum(jnp.sum(r, axis=1).reshape(self.before, self.channels), axis=0)
        return jnp.sum(r, axis=tuple(i for i in range(r.ndim) if i != self.axis))
