"""Batch norm called op by op, without ``jax.jit``: as in a notebook or a debugging session.

    python benchmarks/eager.py [--quick] [--out benchmarks/RESULTS.md]

Times one call of a batch-norm layer in training (output and new running statistics)
and in evaluation, for jbn's functional core and Flax module, flax.linen.BatchNorm
(fast variance) and torch.nn.BatchNorm2d, each called from Python on NCHW float32
input (Flax: NHWC). A first call is timed on its own: what a user waits for at a new
shape (jbn and Flax compile there; jbn's module shares the core's program, so its
first call is not timed). Then the medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import jbn

SHAPES = [(8, 64, 56, 56), (8, 256, 28, 28), (8, 512, 7, 7)]
QUICK_SHAPES = [(2, 8, 6, 6), (3, 4, 5, 5)]


def layers(shape: tuple[int, ...], seed: int = 0) -> dict[str, dict[str, Callable[[], Any]]]:
    """Zero-argument calls of each implementation, ``{impl: {"train": fn, "eval": fn}}``."""
    c = shape[1]
    rng = np.random.default_rng(seed)
    x_nchw = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    x = jnp.asarray(x_nchw)
    x_nhwc = jnp.asarray(np.moveaxis(x_nchw, 1, -1))
    params, state = jbn.init(c)
    module = jbn.BatchNorm2d(c)
    variables = {"params": params, "batch_stats": state}
    flax_bn = nn.BatchNorm(axis=-1, momentum=0.9, epsilon=1e-5)
    flax_vars = flax_bn.init(jax.random.key(0), x_nhwc, use_running_average=True)
    # torch on the device JAX uses: its GPU where there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_bn = torch.nn.BatchNorm2d(c).to(device)
    x_torch = torch.from_numpy(x_nchw).to(device)

    def torch_call(train: bool) -> Callable[[], Any]:
        def call():
            torch_bn.train(train)
            with torch.no_grad():
                return torch_bn(x_torch)
        return call

    return {
        "jbn.batch_norm": {"train": lambda: jbn.batch_norm(params, state, x, True),
                           "eval": lambda: jbn.batch_norm(params, state, x, False)},
        "jbn.BatchNorm2d": {
            "train": lambda: module.apply(variables, x, train=True, mutable=["batch_stats"]),
            "eval": lambda: module.apply(variables, x, train=False)},
        "flax BatchNorm": {
            "train": lambda: flax_bn.apply(flax_vars, x_nhwc, use_running_average=False,
                                           mutable=["batch_stats"]),
            "eval": lambda: flax_bn.apply(flax_vars, x_nhwc, use_running_average=True)},
        "torch": {"train": torch_call(True), "eval": torch_call(False)},
    }


def first_call_ms(fn: Callable[[], Any]) -> float:
    """Wall time of one call in milliseconds, waited for."""
    start = time.perf_counter()
    _common.sync(fn())
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    parser.add_argument("--repeats", type=_common.positive_int, default=None)
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = args.repeats or (3 if args.quick else 21)
    _common.sync(jnp.ones(1) + 1)  # the runtime's own start is no implementation's first call
    rows = []
    with _common.progress() as bar:
        task = bar.add_task("op by op", total=len(shapes))
        for shape in shapes:
            impls = layers(shape)
            calls = {(impl, mode): fn for impl, modes in impls.items()
                     for mode, fn in modes.items()}
            # The module runs the functional core's compiled program: its first call
            # would time only what the core's left to do.
            first = {key: float("nan") if key[0] == "jbn.BatchNorm2d" else first_call_ms(fn)
                     for key, fn in calls.items()}
            med = _common.interleaved_medians(calls, repeats=repeats, warmup=1)
            for mode in ("train", "eval"):
                ours = med[("jbn.batch_norm", mode)]
                for impl in impls:
                    rows.append(["x".join(map(str, shape)), mode, impl, first[(impl, mode)],
                                 med[(impl, mode)], ours / med[(impl, mode)]])
            bar.advance(task)
    text = "\n".join([
        "## Batch norm op by op (no jax.jit)",
        "",
        *_common.machine_lines(),
        f"- float32; median of {repeats} interleaved repeats after the first call, which is "
        "timed alone (compilation included; the module's is the core's; flax's follows its "
        "init at that shape, which has already compiled most of its evaluation)",
        "",
        _common.markdown_table(
            ["shape (NCHW)", "mode", "implementation", "first call ms", "call ms",
             "jbn.batch_norm / this"], rows),
        "",
    ])
    _common.print_and_append(text, args.out)


if __name__ == "__main__":
    main()
