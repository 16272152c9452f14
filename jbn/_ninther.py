"""The shift: a robust estimate of a channel's centre, from nine values spread over the batch.

jbn's one-pass statistics sum ``x - shift`` and its square. Their float32 sums keep
the variance exact to a few ulps while the shift lies within a few standard
deviations of the channel's mean, and lose about ``2 log2(distance / std)`` bits
beyond that. The shift is therefore the ninther (Tukey's median of three medians of
three) of three runs of three consecutive values: a value of the data, a median of
samples from the whole batch rather than its first values. The runs' centres lie in
a Latin square over the reduced axes: along each axis (the batch, each spatial
axis) the three centres sit at the middles of its three thirds, 1/6, 1/2 and 5/6 of
its length, each at a different one. So the three runs come from different
examples (three from three on), at different places in them, and never at the
first or last value of an axis of 7 or more (13 for the last axis, along which the
runs lie): padding there, a frame, a batch sorted by label, or an outlier or an
atypical run in the sample leave the shift near the bulk of the data; one
atypical run is outvoted by the other two. Runs keep the read short:
nine rows of channels with channels last, three short runs per channel with
channels first. Channels with fewer than nine values take their middle value.

jbn's CPU kernel (``csrc/shifted_sums.cc``) reads the same nine values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.export import is_symbolic_dim

# Values per channel whose ninther is the shift.
SAMPLES = 9


def positions(dims: Sequence[Any]) -> list[Any]:
    """Where the sample lies among a channel's values: flat indices, row-major over ``dims``.

    ``dims``: the lengths of the reduced axes, in order. Run ``i``'s centre has index
    ``(2k + 1) * L // 6`` with ``k = (i + d) % 3`` along axis ``d`` of length ``L``
    (kept one value from either end of the channel's values); the run is the centre
    and the values just before and after it. Fewer than ``SAMPLES`` values: nine times
    the middle one, whose ninther it is. Python ints; where a length is symbolic (a
    program exported for any batch size), int32 scalars computed when it runs.
    """
    static = not any(is_symbolic_dim(d) for d in dims)
    xp, int_type = (np, np.int64) if static else (jnp, jnp.int32)
    lengths = [xp.asarray(d, int_type) for d in dims]
    strides = [math.prod(lengths[d + 1:], start=xp.asarray(1, int_type))
               for d in range(len(dims))]
    count = math.prod(lengths, start=xp.asarray(1, int_type))
    out = []
    for i in range(3):
        t = sum(((2 * ((i + d) % 3) + 1) * length // 6 * stride
                 for d, (length, stride) in enumerate(zip(lengths, strides))),
                start=xp.asarray(0, int_type))
        t = xp.clip(t, 1, count - 2)
        out += [xp.where(count < SAMPLES, count // 2, t + j) for j in (-1, 0, 1)]
    return [int(t) for t in out] if static else out


def sample_indices(dims: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The sampled values' indices along axes of lengths ``dims`` (the reduced axes, in
    order), from :func:`positions`: Python ints, or int32 scalars where a length is
    symbolic."""
    flat = positions(dims)
    if all(isinstance(t, int) for t in flat):
        return [tuple(int(j) for j in np.unravel_index(t, [int(d) for d in dims]))
                for t in flat]
    lengths = [jnp.asarray(d, jnp.int32) for d in dims]
    strides = [math.prod(lengths[d + 1:], start=jnp.int32(1)) for d in range(len(dims))]
    return [tuple(t // stride % length for length, stride in zip(lengths, strides))
            for t in flat]


def median3(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """The median of three arrays, elementwise (NaN if any is NaN)."""
    return jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c))


def ninther(values: list[jax.Array], computed_once: bool = False) -> jax.Array:
    """The shift from the values at :func:`positions`, one ``(C,)`` array each, in order.

    ``computed_once``: make the shift an array of its own in the compiled program.
    XLA's CPU fusion otherwise copies the nine reads and the comparisons into every
    batch-sized loop that subtracts the shift (the sums, the normalization, the
    backward pass's ``dx``), to run at each element. XLA never fuses a sort, so the
    last step's larger of two values is taken by sorting them: the same value.

    A shift that is not finite (a channel sampled at infinities or NaN) is 0, so that
    such a channel's statistics are PyTorch's: a mean of inf where its values sum to
    inf, rather than the NaN of ``inf - inf``.
    """
    a, b, c = (median3(*values[i:i + 3]) for i in range(0, SAMPLES, 3))
    low, high = jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c)
    finite = jnp.isfinite(jnp.maximum(low, high))
    low, high = jnp.where(finite, low, 0), jnp.where(finite, high, 0)
    if computed_once:
        return jax.lax.sort(jnp.stack([low, high]), dimension=0)[1]
    return jnp.maximum(low, high)
