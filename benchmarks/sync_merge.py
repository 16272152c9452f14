"""Which cross-device merge of batch statistics is cheaper, and which is exact?

Compares, on 8 host CPU devices under ``jax.pmap``, two ways to get the global batch
statistics with ONE collective:

- ``all_gather``: jbn's merge. Each device computes ``(count, shift, offset, M2)``
  relative to its own shift (a value near its mean) and all devices gather them and
  merge with Chan's parallel formula. Exact whatever the data's mean.
- ``pmean``: every device computes ``(count, S1, S2)`` of ``x - r`` for a common shift
  ``r`` that every device knows (the running mean) and takes one ``pmean`` of the
  stacked moments; ``var = S2 / n - (S1 / n)^2``. On the first step the running mean
  is still 0, so at a data mean of 1e4 this is the naive ``E[x^2] - E[x]^2``.

Reports the median time of the training forward pass and of forward plus backward
(timings interleaved across the variants, so drifts in machine load hit all alike),
and the error of each against float64 at a data mean of 1e4 on the first step. Both
variants take their local sums with XLA's operations (jbn's CPU kernel is switched
off here), so that the times differ by the merge alone.

Run: ``python benchmarks/sync_merge.py [--repeats 50] [--quick]``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the 8 host devices, also beside a GPU

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jbn import _cpu_kernel  # noqa: E402
from jbn._layout import channel_shape  # noqa: E402
from jbn._stats import batch_moments  # noqa: E402

# The local sums as XLA operations in both variants (see the module's docstring).
_cpu_kernel.available = lambda: False

AXIS = "batch"
EPS = 1e-5


def normalize_all_gather(x: jax.Array, running_mean: jax.Array) -> tuple[jax.Array, jax.Array]:
    """jbn's path: local shifted moments, one all_gather, Chan's merge. Returns ``(y, var)``."""
    del running_mean  # each device shifts by its own estimate of the mean
    m = batch_moments(x, 1, None, AXIS)
    cshape = channel_shape(x.ndim, 1)
    var = m.m2 / m.count
    y = ((x - m.shift.reshape(cshape)) - m.offset.reshape(cshape)) * jax.lax.rsqrt(
        var + EPS
    ).reshape(cshape)
    return y, var


def normalize_pmean(x: jax.Array, running_mean: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The alternative: moments of ``x - running_mean``, one ``pmean`` of the stacked moments."""
    cshape = channel_shape(x.ndim, 1)
    reduced = tuple(i for i in range(x.ndim) if i != 1)
    d = x - running_mean.reshape(cshape)
    n = jnp.full(running_mean.shape, x.size // x.shape[1], x.dtype)
    moments = jnp.stack([n, jnp.sum(d, axis=reduced), jnp.sum(d * d, axis=reduced)])
    n, s1, s2 = jax.lax.pmean(moments, AXIS)  # global sums / devices: ratios are unchanged
    offset = s1 / n
    var = jnp.maximum(s2 / n - offset * offset, 0)
    y = (d - offset.reshape(cshape)) * jax.lax.rsqrt(var + EPS).reshape(cshape)
    return y, var


VARIANTS = {"all_gather + Chan": normalize_all_gather, "pmean of shifted sums": normalize_pmean}


def build(fn, backward: bool):
    """A pmapped training forward (or forward plus backward) for ``fn``."""
    if not backward:
        return jax.pmap(lambda x, r: fn(x, r)[0], axis_name=AXIS, in_axes=(0, None))

    def loss(x, r, dy):
        return jnp.sum(fn(x, r)[0] * dy)

    return jax.pmap(jax.grad(loss), axis_name=AXIS, in_axes=(0, None, 0))


def time_variants(per_device_shape, repeats: int, backward: bool) -> dict[str, float]:
    """Median seconds per call of each variant, timed interleaved."""
    rng = np.random.default_rng(0)
    shape = (8, *per_device_shape)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
    r = jnp.zeros((per_device_shape[1],), jnp.float32)
    args = (x, r, dy) if backward else (x, r)
    fns = {name: build(fn, backward) for name, fn in VARIANTS.items()}
    for f in fns.values():  # compile and warm up
        for _ in range(3):
            jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def accuracy(mean: float = 1e4) -> dict[str, tuple[float, float]]:
    """Max |y - y64| and relative variance error at data mean ``mean``, running mean 0."""
    rng = np.random.default_rng(1)
    x = (mean + rng.normal(size=(8, 8, 16, 8, 8))).astype(np.float32)
    x64 = x.astype(np.float64).reshape(64, 16, 8, 8)
    mean64 = x64.mean(axis=(0, 2, 3), keepdims=True)
    var64 = x64.var(axis=(0, 2, 3))
    y64 = ((x64 - mean64) / np.sqrt(var64.reshape(1, -1, 1, 1) + EPS)).reshape(x.shape)
    r = jnp.zeros((16,), jnp.float32)  # first step: the running mean is still 0
    out = {}
    for name, fn in VARIANTS.items():
        y, var = jax.pmap(fn, axis_name=AXIS, in_axes=(0, None))(jnp.asarray(x), r)
        y_err = float(np.max(np.abs(np.asarray(y, np.float64) - y64)))
        var_err = float(np.max(np.abs(np.asarray(var[0], np.float64) - var64) / var64))
        out[name] = (y_err, var_err)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.quick:
        args.repeats = 3
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices")
    shapes = [(16, 64, 16, 16), (32, 256, 4, 4), (64, 1024)]
    for backward in (False, True):
        kind = "forward + backward" if backward else "forward"
        for shape in shapes:
            t = time_variants(shape, args.repeats, backward)
            line = ", ".join(f"{name}: {s * 1e3:.3f} ms" for name, s in t.items())
            print(f"{kind:18s} per device {shape}: {line}")
    print("accuracy at data mean 1e4, first step (running mean 0), against float64:")
    for name, (y_err, var_err) in accuracy().items():
        print(f"  {name:22s} max |y - y64| = {y_err:.3g}, max rel. error of var = {var_err:.3g}")


if __name__ == "__main__":
    main()
