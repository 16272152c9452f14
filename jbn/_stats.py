"""Per-channel batch statistics: one shifted pass over the data, merged exactly across devices.

The naive one-pass variance ``E[x^2] - E[x]^2`` loses every digit when the data's
mean is large against its spread. Here every value is first shifted by a per-channel
estimate of the centre (a median of nine values sampled across the batch, see
:mod:`jbn._ninther`), so the sums ``S1 = sum(x - shift)`` and ``S2 = sum((x - shift)^2)``
are of numbers near zero, and both are taken in the same pass. The normalization
then starts from the exact ``x - shift`` and takes away the small ``offset = S1 / n``
(folded into the bias), which keeps the output within a few float32 ulps of a
float64 computation whatever the data's mean. On the CPU, where it was built, jbn's kernel
(:mod:`jbn._cpu_kernel`) takes the shift and both sums in one pass.

Across devices each device contributes ``(count, shift, offset, M2)`` to ONE
``all_gather``; every device then merges them with Chan's parallel formula relative to
a reference shift that all devices share, so the result is the exact statistics of the
global batch, for unequal per-device counts too (a device with no valid value has
count 0 and weight 0).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jbn import _cpu_kernel, _ninther, _vma
from jbn._layout import RowView, default_on_cpu

# Name given to every O(C) statistic, so that a rematerialized backward pass keeps
# them and recomputes only elementwise values from the input.
STATS_NAME = "jbn_batch_stats"


class Moments(NamedTuple):
    """Per-channel statistics of a batch, each of shape ``(C,)`` float32 (``count`` is ``()``).

    ``shift + offset`` is the mean; ``offset`` is small, so ``(x - shift) - offset`` is
    the precise centred input.
    """

    count: jax.Array  # () values per channel, summed over devices
    shift: jax.Array  # (C,) this device's shift
    offset: jax.Array  # (C,) mean - shift, precise
    mean: jax.Array  # (C,) the batch mean
    m2: jax.Array  # (C,) sum of squared deviations from the mean


def _shift(x: jax.Array, axis: int, mask: jax.Array | None) -> jax.Array:
    """A per-channel value near the mean: ``(C,)``, without gradient (see :mod:`jbn._ninther`).

    With a mask, a sampled position that is not valid takes the value at the last
    valid position before it. A symbolic length (a program exported for any batch
    size) is sampled at the same relative positions, computed when the program runs.
    """
    reduced = [i for i in range(x.ndim) if i != axis]
    if not reduced:  # one value per channel: the shift, finite as the ninther's
        return jax.lax.stop_gradient(jnp.where(jnp.isfinite(x), x, 0))
    dims = [x.shape[i] for i in reduced]

    def at(idx: tuple) -> jax.Array:
        index: list[Any] = list(idx)
        index.insert(axis, slice(None))
        return x[tuple(index)]

    if mask is None:
        values = [at(idx) for idx in _ninther.sample_indices(dims)]
    else:
        values = _valid_values_at_or_before(x, axis, mask, _ninther.positions(dims))
    # Computed once where XLA's CPU fusion would recompute it at every element.
    return jax.lax.stop_gradient(_ninther.ninther(values, computed_once=default_on_cpu()))


def _valid_values_at_or_before(x: jax.Array, axis: int, mask: jax.Array,
                               where: list[Any]) -> list[jax.Array]:
    """For each flat position in ``where``: ``x`` at the last valid position at or before it.

    Positions in the row-major order of ``mask``'s axes, wrapping around to the last
    valid one; position 0 if none is valid. Each a ``(C,)`` array. Within a padded
    run this is the value that ends the valid run before it (a sequence's last
    token, not its first), so that sampled padding takes values as spread over the
    batch as the samples themselves.
    """
    flat = mask.reshape(-1)
    positions = jnp.arange(flat.shape[0])
    before = jax.lax.cummax(jnp.where(flat, positions, -1), axis=0)
    wrapped = jnp.maximum(before[-1], 0)
    moved = jnp.moveaxis(x, axis, -1)
    values = []
    for t in where:
        found = before[t]
        position = jnp.where(found >= 0, found, wrapped)
        values.append(moved[jnp.unravel_index(position, mask.shape)])
    return values


def _centred(view: RowView, rows: jax.Array, shift: jax.Array,
             valid: jax.Array | None) -> jax.Array:
    """``rows - shift``, zero where ``valid`` is False."""
    d = rows - view.broadcast(shift)
    return d if valid is None else jnp.where(valid, d, 0)


def _fused_sums(view: RowView, rows: jax.Array, shift: jax.Array,
                valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``S1 = sum(d)`` and ``S2 = sum(d * d)`` per channel, ``d = rows - shift`` fused into each."""
    # Each sum gets its own copy of the shift: if both shared one broadcast, XLA would
    # write rows - shift to memory and read it twice instead of fusing the subtraction
    # into each reduction.
    shift1, shift2 = jax.lax.optimization_barrier((shift, shift))
    d1 = _centred(view, rows, shift1, valid)
    d2 = _centred(view, rows, shift2, valid)
    return view.channel_sum(d1), view.channel_sum(d2 * d2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kernel_moments(view: RowView, rows: jax.Array, source: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(shift, S1, S2)`` per channel by jbn's CPU kernel, in one pass over ``source``.

    ``rows``: the input in the compute dtype, in the view; ``source``: the same input
    before its conversion (or itself), in its own shape. The shift is the kernel's
    own (a constant, without gradient); the derivative rule takes the sums'
    tangents as :func:`_fused_sums` would, and its primal values from this function
    again, so that a derivative of the rule (a second-order derivative) goes
    through the rule too.
    """
    shape, axis = view.shape, view.axis
    return _cpu_kernel.shifted_sums(source.reshape(view.before, view.channels, view.after),
                                    shape[:axis], shape[axis + 1:])


@_kernel_moments.defjvp
def _kernel_moments_jvp(view, primals, tangents):
    rows, source = primals
    shift, s1, s2 = _kernel_moments(view, rows, source)
    # Named here too: the tangent reads the shift, and a rematerialized backward pass
    # would otherwise call the kernel again (a pass over x) to recompute it.
    shift = checkpoint_name(shift, STATS_NAME)
    t = tangents[0]
    d = _centred(view, rows, shift, None)
    return (shift, s1, s2), (jnp.zeros_like(shift), view.channel_sum(t),
                             2 * view.channel_sum(d * t))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _written_sums(view: RowView, rows: jax.Array, shift: jax.Array,
                  valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``S1 = sum(d)`` and ``S2 = sum(d * d)`` per channel, ``d = rows - shift`` written once.

    Without the kernel, for input converted from a lower precision on the CPU:
    XLA's CPU reductions read float32 only, so the converted input is written to
    memory anyway. Subtracting the shift in that same pass (the barrier keeps ``d``
    written) leaves two plain sums, which run about twice as fast as sums with a
    subtraction fused in.

    Only a forward pass that is not differentiated takes this path: the derivative
    rule computes the sums as :func:`_fused_sums` does, because a backward pass
    writes the converted input once for its own reductions, and the forward pass of
    a training step then shares that copy instead of writing a second, shifted one.
    ``shift`` is treated as a constant (it carries no gradient).
    """
    d = jax.lax.optimization_barrier(_centred(view, rows, shift, valid))
    return view.channel_sum(d), view.channel_sum(d * d)


@_written_sums.defjvp
def _written_sums_jvp(view, primals, tangents):
    rows, shift, valid = primals
    d = _centred(view, rows, shift, valid)
    t = tangents[0] if valid is None else jnp.where(valid, tangents[0], 0)
    return (_fused_sums(view, rows, shift, valid),
            (view.channel_sum(t), 2 * view.channel_sum(d * t)))


def local_moments(x: jax.Array, axis: int, mask: jax.Array | None,
                  source: jax.Array | None = None) -> Moments:
    """Statistics of this device's values of ``x`` (float32 or wider) over all axes but ``axis``.

    Args:
      x: the input, any shape, in the compute dtype.
      axis: the channel axis (non-negative).
      mask: None, or a boolean array of ``x``'s shape without the channel axis; only
        positions where it is True count.
      source: ``x`` before its conversion to the compute dtype, where it was
        converted (bfloat16, float16): on the CPU the sums are then taken from it
        directly, or in one pass with the conversion. It changes how the sums are
        scheduled, not their values (up to the order of additions).
    """
    c = x.shape[axis]
    # Both sums run over the view, in which XLA's CPU reductions are faster.
    view = RowView.of(x.shape, axis)
    rows = view.rows(x)
    source = x if source is None else source
    if mask is None:
        count = jnp.asarray(x.size // c, x.dtype)
    else:
        count = checkpoint_name(jnp.sum(mask, dtype=x.dtype), STATS_NAME)
    if (view.on_cpu and mask is None and x.dtype == jnp.float32
            and source.dtype in _cpu_kernel.DTYPES and _cpu_kernel.available()):
        shift, s1, s2 = _kernel_moments(view, rows, jax.lax.stop_gradient(source))
        shift = checkpoint_name(shift, STATS_NAME)
    else:
        # Named as soon as computed, so that a rematerialized backward pass reads
        # them instead of recomputing the shift and both sums from x.
        shift = checkpoint_name(_shift(x, axis, mask), STATS_NAME)
        valid = None
        if mask is not None:
            valid = view.rows(jnp.broadcast_to(jnp.expand_dims(mask, axis), x.shape))
        sums = _written_sums if view.on_cpu and source is not x else _fused_sums
        s1, s2 = sums(view, rows, shift, valid)
    s1 = checkpoint_name(s1, STATS_NAME)
    s2 = checkpoint_name(s2, STATS_NAME)
    offset = s1 / jnp.maximum(count, 1)
    m2 = jnp.maximum(s2 - s1 * offset, 0)
    return Moments(count, shift, offset, shift + offset, m2)


def _all_gather(x: jax.Array, axis_name: Any, axis_index_groups: Any) -> jax.Array:
    """``all_gather`` over ``axis_name``, a name or a tuple of names: ``(devices, *x.shape)``.

    A tuple is gathered one name at a time, the last first, so the devices come in the
    tuple's row-major order: ``jax.lax.all_gather`` over a tuple that holds a ``vmap``
    axis fails inside ``pmap`` or another ``vmap``.

    Where JAX tracks which values vary across the devices (``shard_map``'s default
    ``check_vma=True``) and ``x`` varies along every name, the gather is typed as the
    same on every device, as a ``pmean`` would be: the merged statistics, and a
    running state made from them, then leave ``shard_map`` replicated (``P()``). Its
    transpose slices the cotangent, which that tracking has already summed across the
    devices; elsewhere (``check_vma=False``, ``vmap``, groups) the plain gather, whose
    transpose sums them, is used.
    """
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if axis_index_groups is not None:
        return jax.lax.all_gather(x, axis_name, axis_index_groups=axis_index_groups)
    gather = jax.lax.all_gather
    if set(names) <= _vma.varying_axes(x):
        gather = _vma.all_gather_invariant or gather
    if len(names) == 1:
        return gather(x, axis_name)
    for name in reversed(names):
        x = gather(x, name)
    return x.reshape((-1,) + x.shape[len(names):])


def global_moments(
    local: Moments, axis_name: Any, axis_index_groups: Any = None
) -> Moments:
    """Exact statistics of the union of every device's values, with one ``all_gather``.

    Works under ``pmap``, ``shard_map`` and ``vmap`` with ``axis_name``. The merged
    ``count``, ``mean`` and ``m2`` are bitwise identical on every device of a group.
    """
    c = local.shift.shape[0]
    stacked = jnp.stack(
        [jnp.broadcast_to(local.count, (c,)), local.shift, local.offset, local.m2]
    )
    stacked = checkpoint_name(stacked, STATS_NAME)
    gathered = _all_gather(stacked, axis_name, axis_index_groups)
    counts, shifts, offsets, m2s = (gathered[:, k] for k in range(4))  # each (D, C)
    # Reference: the shift of the first device that holds any value.
    ref = shifts[jnp.argmax(counts[:, 0] > 0)]
    # Each device's mean relative to ref; 0 for a device without a valid value, whose
    # shift is padding (1e20 or NaN there would make 0 * inf a NaN below).
    deltas = jnp.where(counts > 0, (shifts - ref) + offsets, 0)
    total = jnp.sum(counts, axis=0)
    ref_offset = jnp.sum(counts * deltas, axis=0) / jnp.maximum(total, 1)
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * jnp.square(deltas - ref_offset), axis=0)
    return Moments(
        total[0],
        local.shift,
        (ref - local.shift) + ref_offset,
        ref + ref_offset,
        m2,
    )


def batch_moments(
    x: jax.Array,
    axis: int,
    mask: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    source: jax.Array | None = None,
) -> Moments:
    """Statistics of the batch: local, or global across ``axis_name`` when it is given.

    ``x`` and ``source`` as for :func:`local_moments`.
    """
    moments = local_moments(x, axis, mask, source)
    if axis_name is not None:
        moments = global_moments(moments, axis_name, axis_index_groups)
    return Moments(*(checkpoint_name(m, STATS_NAME) for m in moments))
