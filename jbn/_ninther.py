"""The shift: a robust estimate of a channel's centre, from nine values spread over the batch.

jbn's one-pass statistics sum ``x - shift`` and its square. Their float32 sums keep
the variance exact to a few ulps while the shift lies within a few standard
deviations of the channel's mean, and lose about ``2 log2(distance / std)`` bits
beyond that. The shift is therefore the ninther (Tukey's median of three medians of
three) of three runs of three consecutive values, one run at the centre of each third
of the channel's values in row-major order (across the batch and the other reduced
axes): a value of the data, a median of samples from the whole batch rather than its
first values, so padding at the start of a sequence, an image's border, a batch
sorted by label, or an outlier or an atypical run in the sample leave it near the
bulk of the data. Runs keep the read short: nine rows of channels with channels
last, three short runs per channel with channels first. Channels with fewer than
nine values take their middle value.

jbn's CPU kernel (``csrc/shifted_sums.cc``) takes the same nine values.
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


def positions(count: int) -> list[int]:
    """Where, among a channel's ``count`` values in row-major order, the sample lies.

    Three runs of three consecutive values, centred on the centres of three equal
    parts, ``(2i + 1) * count // 6``; for fewer than ``SAMPLES`` values, the middle one.
    """
    if count < SAMPLES:
        return [count // 2]
    return [(2 * i + 1) * count // 6 + j for i in range(3) for j in (-1, 0, 1)]


def sample_indices(dims: Sequence[Any]) -> list[tuple[int, ...]]:
    """The sampled values' indices along axes of lengths ``dims`` (the reduced axes, in order).

    A symbolic length (a program exported for any batch size) is sampled at index 0.
    """
    static = [1 if is_symbolic_dim(d) else int(d) for d in dims]
    return [tuple(int(j) for j in np.unravel_index(t, static))
            for t in positions(math.prod(static))]


def median3(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """The median of three arrays, elementwise (NaN if any is NaN)."""
    return jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c))


def ninther(values: list[jax.Array]) -> jax.Array:
    """The shift from the values at :func:`positions`, one ``(C,)`` array each, in order."""
    if len(values) == 1:
        return values[0]
    return median3(*(median3(*values[i:i + 3]) for i in range(0, SAMPLES, 3)))
