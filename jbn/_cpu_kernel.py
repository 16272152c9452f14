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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_SHIFTED_SUMS = "jbn_shifted_sums"
_DOT_SUMS = "jbn_dot_sums"
# Input dtypes the kernel reads.
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@functools.cache
def available() -> bool:
    """Whether the kernels were built; registers them with XLA on the first call."""
    try:
        from jbn import _shifted_sums
    except ImportError:
        return False
    jax.ffi.register_ffi_target(_SHIFTED_SUMS, _shifted_sums.shifted_sums, platform="cpu")
    jax.ffi.register_ffi_target(_DOT_SUMS, _shifted_sums.dot_sums, platform="cpu")
    return True


def _check_available() -> None:
    if not available():
        raise RuntimeError("jbn's CPU kernels were not built (no C++ compiler at install time)")


def shifted_sums(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A shift near the mean, and the sums of ``d = x - shift`` and of ``d * d``, per channel.

    Args:
      x: ``(P, C, Q)``, float32 or bfloat16, with channels on the middle axis: an
        NCHW batch as ``(N, C, H * W)``, an NHWC one as ``(N * H * W, C, 1)``.

    Returns:
      ``(shift, s1, s2)``, each ``(C,)`` float32: the mean of up to 8 of the
      channel's first values (a power of two of them), ``sum(x - shift)`` and
      ``sum((x - shift)^2)`` over ``P`` and ``Q``. Under ``vmap`` the mapped axes
      lead ``x`` and every output.
    """
    _check_available()
    # The outputs' type: (C,) float32, and under shard_map varying over x's mesh axes
    # (the probe is traced for its type only, and is dead code to XLA unless x is
    # empty, when it is the answer).
    zeros = jnp.sum(x, axis=(0, 2), dtype=jnp.float32)
    if x.size == 0:
        return zeros, zeros, zeros
    out = jax.typeof(zeros)
    call = jax.ffi.ffi_call(_SHIFTED_SUMS, (out, out, out), vmap_method="broadcast_all")
    return call(_flat(x), q=np.int64(x.shape[2]))


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
    zeros = jnp.sum(g.astype(jnp.float32) * (x - shift[:, None]), axis=(0, 2))
    if x.size == 0:
        return zeros, zeros
    out = jax.typeof(zeros)
    call = jax.ffi.ffi_call(_DOT_SUMS, (out, out), vmap_method="broadcast_all")
    return call(_flat(g), _flat(x), shift, q=np.int64(x.shape[2]))


def _flat(x: jax.Array) -> jax.Array:
    """``(P, C, Q)`` as the kernels take it, ``(P, C * Q)``: a trailing axis of length 1
    would make XLA copy the input to lay it out for the call."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2])
