"""jbn's CPU kernels for per-channel sums, where they were built.

The kernels (``csrc/shifted_sums.cc``, compiled into ``jbn._shifted_sums`` when jbn
is installed) take two per-channel sums in one threaded pass over float32 or
bfloat16 input, adding in float64 across blocks:

- :func:`shifted_sums`, the batch statistics: a shift, ``sum(x - shift)`` and
  ``sum((x - shift)^2)``;
- :func:`dot_sums`, the backward pass's: ``sum(g)`` and ``sum(g * (x - shift))``.

XLA's CPU reductions take one pass per sum, at half speed once the subtraction is
fused in. Where the kernels were not built, :func:`available` is False and jbn
computes the same sums with XLA.

Each kernel is a primitive of jbn's own. It becomes the kernel's call only in a
program compiled for the CPU alone in which each device sums its own values, and
the same sums as XLA operations everywhere else: in a program lowered for another
platform (a GPU or TPU program lowered on a CPU host), in one for
:mod:`jax.export` (which must run where jbn is not installed), and in ``jit`` over a
batch split across devices (whose sums XLA partitions, where for a call it would
gather the whole batch onto every device).
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jbn import _ninther

_SHIFTED_SUMS = "jbn_shifted_sums"
_DOT_SUMS = "jbn_dot_sums"
# Input dtypes the kernel reads.
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@functools.cache
def available() -> bool:
    """Whether the kernels were built and this jaxlib takes them; registers them on the first call.

    A kernel built against XLA FFI headers newer than the installed jaxlib's (pip
    builds jbn against the newest jaxlib unless told not to) would make XLA refuse
    it, and with it the whole CPU backend; jbn then warns once and uses XLA's sums.
    """
    try:
        from jbn import _shifted_sums
    except ImportError:
        return False
    built = tuple(getattr(_shifted_sums, "ffi_api_version", ()))
    problem = ffi_incompatibility(built, runtime_ffi_api_version())
    if problem is not None:
        import jaxlib

        warnings.warn(
            f"jbn's CPU kernels were {problem} (jaxlib {jaxlib.__version__}); jbn "
            "computes the same sums with XLA instead, more slowly on the CPU. To use the "
            "kernels, build jbn against this jaxlib: from jbn's source, pip install -U "
            "setuptools wheel, then pip install --no-build-isolation --force-reinstall "
            "--no-deps .",
            RuntimeWarning, stacklevel=2)
        return False
    jax.ffi.register_ffi_target(_SHIFTED_SUMS, _shifted_sums.shifted_sums, platform="cpu")
    jax.ffi.register_ffi_target(_DOT_SUMS, _shifted_sums.dot_sums, platform="cpu")
    return True


def runtime_ffi_api_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the XLA FFI API of the installed jaxlib, from its headers.

    None where the headers are missing or do not say.
    """
    try:
        with open(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")) as f:
            header = f.read()
    except OSError:
        return None
    found = [re.search(rf"^#define XLA_FFI_API_{part}\s+(\d+)", header, re.MULTILINE)
             for part in ("MAJOR", "MINOR")]
    if None in found:
        return None
    return int(found[0].group(1)), int(found[1].group(1))


def ffi_incompatibility(built: tuple[int, ...], runtime: tuple[int, int] | None) -> str | None:
    """Why XLA with FFI API ``runtime`` would refuse handlers built against ``built``, or None.

    XLA takes handlers of its own major version and of its minor version or an older one.
    An unknown version on either side (headers missing) is taken as compatible.
    """
    if runtime is None or len(built) != 2:
        return None
    (b_major, b_minor), (r_major, r_minor) = built, runtime
    if b_major == r_major and b_minor <= r_minor:
        return None
    return (f"compiled against XLA FFI API {b_major}.{b_minor}, which XLA with FFI API "
            f"{r_major}.{r_minor} does not take")


def _check_available() -> None:
    if not available():
        raise RuntimeError("jbn's CPU kernels are not available: not built (no C++ compiler "
                           "at install time) or built for another jaxlib")


def shifted_sums(x: jax.Array, before: Sequence[Any] | None = None,
                 after: Sequence[Any] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A shift near the mean, and the sums of ``d = x - shift`` and of ``d * d``, per channel.

    Args:
      x: ``(P, C, Q)``, float32 or bfloat16, with channels on the middle axis: an
        NCHW batch as ``(N, C, H * W)``, an NHWC one as ``(N * H * W, C, 1)``.
      before, after: the lengths of the batch's axes before and after the channel
        axis, whose products are ``P`` and ``Q`` (``(N,)`` and ``(H, W)`` for NCHW);
        the shift's sample lies on them. Default ``(P,)`` and ``(Q,)``.

    Returns:
      ``(shift, s1, s2)``, each ``(C,)`` float32: the ninther of nine values
      sampled across those axes (:mod:`jbn._ninther`), ``sum(x - shift)`` and
      ``sum((x - shift)^2)`` over ``P`` and ``Q``. Under ``vmap`` the mapped axes
      lead ``x`` and every output.
    """
    _check_available()
    if x.size == 0:
        zeros = jnp.sum(x, axis=(0, 2), dtype=jnp.float32)
        return zeros, zeros, zeros
    before = (x.shape[0],) if before is None else tuple(before)
    after = (x.shape[2],) if after is None else tuple(after)
    return tuple(_bind(_SHIFTED_SUMS, _flat(x), q=x.shape[2], before=before, after=after))


def dot_sums(g: jax.Array, x: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``sum(g)`` and ``sum(g * (x - shift))`` per channel, in one pass over ``g`` and ``x``.

    Args:
      g, x: ``(P, C, Q)`` (as for :func:`shifted_sums`), each float32 or bfloat16.
      shift: ``(C,)`` float32.

    Returns:
      ``(C,)`` float32 each, ``x - shift`` taken in float32. Under ``vmap`` the mapped
      axes lead every input and output.
    """
    _check_available()
    if x.size == 0:
        zeros = jnp.sum(g.astype(jnp.float32) * (x - shift[:, None]), axis=(0, 2))
        return zeros, zeros
    return tuple(_bind(_DOT_SUMS, _flat(g), _flat(x), shift, q=x.shape[2]))


def _flat(x: jax.Array) -> jax.Array:
    """``(P, C, Q)`` as the kernels take it, ``(P, C * Q)``: a trailing axis of length 1
    would make XLA copy the input to lay it out for the call."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2])


def _unflat(x: jax.Array, q: int) -> jax.Array:
    """``(..., P, C * Q)`` as ``(..., P, C, Q)`` in float32."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // q, q).astype(jnp.float32)


def _xla_shifted_sums(x: jax.Array, *, q: int, before: tuple, after: tuple,
                      on_cpu: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel's ``(shift, s1, s2)`` as XLA operations, for ``x`` ``(..., P, C * Q)``.

    ``on_cpu``: lowered for the CPU, where the shift is made an array of its own
    (:func:`jbn._ninther.ninther`'s ``computed_once``).
    """
    x = _unflat(x, q)
    c = x.shape[-2]
    axes = x.reshape(*x.shape[:-3], *before, c, *after)
    k = len(before)
    shift = _ninther.ninther([axes[(..., *idx[:k], slice(None), *idx[k:])]
                              for idx in _ninther.sample_indices(before + after)],
                            computed_once=on_cpu)
    d = x - shift[..., None, :, None]
    return shift, jnp.sum(d, axis=(-3, -1)), jnp.sum(d * d, axis=(-3, -1))


def _xla_dot_sums(g: jax.Array, x: jax.Array, shift: jax.Array, *, q: int
                  ) -> tuple[jax.Array, jax.Array]:
    """The kernel's ``(sum(g), sum(g * (x - shift)))`` as XLA operations."""
    g = _unflat(g, q)
    d = _unflat(x, q) - shift[..., None, :, None]
    return jnp.sum(g, axis=(-3, -1)), jnp.sum(g * d, axis=(-3, -1))


_XLA: dict[str, Callable] = {_SHIFTED_SUMS: _xla_shifted_sums, _DOT_SUMS: _xla_dot_sums}
_OUTPUTS = {_SHIFTED_SUMS: 3, _DOT_SUMS: 2}


def _bind(target: str, *args: jax.Array, q: int, **attrs: Any) -> list[jax.Array]:
    """The kernel ``target``'s outputs for ``args`` with leading axes ``(..., P, C * Q)``.

    ``attrs``: the kernel's static arguments beyond ``q`` (the shift's axes).
    """
    # The outputs' type: (..., C) float32, and under shard_map varying over the mesh
    # axes that any input varies over. The probe adds one (..., C) slice of each input
    # (the shift is one already): traced for its type only, dead code that XLA drops,
    # and a small read where batch norm runs op by op.
    x = args[0]
    c = x.shape[-1] // q
    probe = sum((a[..., 0, :c] if a.ndim == x.ndim else a).astype(jnp.float32) for a in args)
    outs = (jax.typeof(probe),) * _OUTPUTS[target]
    return _primitive(target).bind(*args, q=q, outs=outs, **attrs)


def _kernel_runs(ctx: mlir.LoweringRuleContext) -> bool:
    """Whether the program is lowered for the CPU alone, not for export, and per device."""
    module = ctx.module_context
    for_export = getattr(getattr(module, "lowering_parameters", None), "for_export", False)
    return (tuple(module.platforms) == ("cpu",) and not for_export
            and _per_device(module.axis_context))


def _per_device(axis_context: object) -> bool:
    """Whether each device runs the program on its own part of the batch.

    True for a program on one device, and inside ``shard_map`` or ``pmap`` over all
    of the mesh's axes of more than one device. Elsewhere (``jit`` over a sharded
    batch) XLA's SPMD partitioner would gather the whole batch onto every device
    for a custom call, where it splits XLA's own sums into partial sums and
    collectives of ``(C,)`` values.
    """
    devices = getattr(axis_context, "num_devices", None)
    if devices is not None:
        return devices == 1
    mesh = getattr(axis_context, "mesh", None)
    manual = getattr(axis_context, "manual_axes", None)
    if mesh is None or manual is None:
        return False
    return all(size == 1 for name, size in dict(mesh.shape).items() if name not in manual)


def _ffi_attributes(q: int, before: tuple | None = None, after: tuple | None = None
                    ) -> dict[str, Any]:
    """The kernel call's attributes: ``q``, and for the statistics (which have the
    shift's axes, ``()`` for an input without any) the shift's sample as flat
    positions among a channel's values (static lengths: the kernel runs)."""
    attributes: dict[str, Any] = {"q": np.int64(q)}
    if before is not None and after is not None:
        dims = [int(d) for d in before + after]
        attributes["at"] = np.asarray(_ninther.positions(dims), np.int64)
    return attributes


@functools.cache
def _primitive(target: str) -> Primitive:
    """The primitive of kernel ``target``, registered with JAX on first use."""
    p = Primitive(target)
    p.multiple_results = True
    xla = _XLA[target]
    compiled = jax.jit(lambda *args, outs, params: p.bind(*args, outs=outs, **dict(params)),
                       static_argnames=("outs", "params"))

    def impl(*args, outs, **params):
        with jax.disable_jit(False):  # compiled even where jit is disabled
            return compiled(*args, outs=outs, params=tuple(sorted(params.items())))

    def lowering(ctx, *args, outs, **params):
        if _kernel_runs(ctx):
            return jax.ffi.ffi_lowering(target)(ctx, *args, **_ffi_attributes(**params))
        if target == _SHIFTED_SUMS:
            params["on_cpu"] = tuple(ctx.module_context.platforms) == ("cpu",)
        return mlir.lower_fun(functools.partial(xla, **params), multiple_results=True)(ctx, *args)

    def batch(args, dims, *, outs, **params):
        # Every input with the mapped axis first (broadcast where it is not mapped,
        # its axis None): the kernel sums each leading index on its own.
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        args = [jnp.broadcast_to(a, (size, *a.shape)) if d is None
                else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
        results = _bind(target, *args, **params)
        return results, [0] * len(results)

    p.def_impl(impl)
    p.def_abstract_eval(lambda *args, outs, **params: list(outs))
    mlir.register_lowering(p, lowering)
    batching.primitive_batchers[p] = batch
    return p
