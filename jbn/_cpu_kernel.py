"""jbn's CPU kernel for the shifted per-channel sums, where it was built.

The kernel (``csrc/shifted_sums.cc``, compiled into ``jbn._shifted_sums`` when jbn is
installed) takes a per-channel shift and ``S1 = sum(x - shift)`` and
``S2 = sum((x - shift)^2)`` in one pass over float32 or bfloat16 input, adding in
float64 across blocks. XLA's CPU reductions take one pass per sum, at half speed once
the subtraction is fused in, and a few more small programs for the shift. Where the
kernel was not built, :func:`available` is False and jbn computes the same sums with
XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_TARGET = "jbn_shifted_sums"
# Input dtypes the kernel reads.
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@functools.cache
def available() -> bool:
    """Whether the kernel was built; registers it with XLA on the first call."""
    try:
        from jbn import _shifted_sums
    except ImportError:
        return False
    jax.ffi.register_ffi_target(_TARGET, _shifted_sums.shifted_sums, platform="cpu")
    return True


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
    if not available():
        raise RuntimeError("jbn's CPU kernel was not built (no C++ compiler at install time)")
    # The outputs' type: (C,) float32, and under shard_map varying over x's mesh axes
    # (the probe is traced for its type only, and is dead code to XLA).
    out = jax.typeof(jnp.sum(x, axis=(0, 2), dtype=jnp.float32))
    return jax.ffi.ffi_call(_TARGET, (out, out, out), vmap_method="broadcast_all")(x)
