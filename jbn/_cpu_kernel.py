"""jbn's CPU kernel for the shifted per-channel sums, where it was built.

The kernel (``csrc/shifted_sums.cc``, compiled into ``jbn._shifted_sums`` when jbn is
installed) takes ``S1 = sum(x - shift)`` and ``S2 = sum((x - shift)^2)`` in one pass
over float32 or bfloat16 input, adding in float64 across blocks. XLA's CPU reductions
take one pass per sum, at half speed once the subtraction is fused in. Where the
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


def shifted_sums(x: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sums over ``M`` of ``d = x - shift`` and of ``d * d``, on the CPU.

    Args:
      x: ``(B, M, K)``, float32 or bfloat16.
      shift: ``(B, K)`` float32, broadcast along ``M``.

    Returns:
      ``(s1, s2)``, each ``(B, K)`` float32. Under ``vmap`` the mapped axes are
      leading ``B`` axes of both.
    """
    if not available():
        raise RuntimeError("jbn's CPU kernel was not built (no C++ compiler at install time)")
    # The outputs' type is the shift's: float32 (B, K), and under shard_map varying
    # over the same mesh axes.
    out = jax.typeof(shift)
    return jax.ffi.ffi_call(_TARGET, (out, out), vmap_method="broadcast_all")(x, shift)
