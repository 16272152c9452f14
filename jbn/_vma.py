"""Which mapped axes a value varies along, as ``shard_map``'s replication check types it.

Under ``shard_map`` with ``check_vma=True`` (its default) JAX types every value as
varying along some of the mesh's manual axes, or as the same on every device along
the others. jbn reads that type to choose collectives whose result keeps the check
satisfied, and to make a replicated value varying where a kernel's transpose needs
it so. Outside ``shard_map``, or with the check off, no axis is tracked.
"""

from __future__ import annotations

import functools
import inspect

import jax

# ``all_gather`` typed as the same on every device: ``jax.lax.all_gather(..., to=
# "invarying")`` in jax 0.10, ``all_gather_invariant`` where JAX exports it by that name;
# None where neither exists.
if hasattr(jax.lax, "all_gather_invariant"):
    all_gather_invariant = jax.lax.all_gather_invariant
elif "to" in inspect.signature(jax.lax.all_gather).parameters:
    all_gather_invariant = functools.partial(jax.lax.all_gather, to="invarying")
else:
    all_gather_invariant = None


def varying_axes(x: jax.Array) -> frozenset:
    """The mapped axes along which JAX types ``x`` as varying (empty where it tracks
    none); jax 0.10 names that type ``manual_axis_type``, earlier releases ``vma``."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(aval, "vma", ()) if mat is None else mat.varying)


def vary_like(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` typed as varying along every axis that ``like`` varies along (its values
    unchanged; the transpose sums the cotangent over the added axes)."""
    missing = varying_axes(like) - varying_axes(x)
    if not missing:
        return x
    axes = tuple(sorted(missing, key=str))
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)
