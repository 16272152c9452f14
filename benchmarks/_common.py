"""Shared plumbing of the benchmarks: interleaved timing, machine description, markdown tables."""

from __future__ import annotations

import datetime
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


def sync(out: Any) -> Any:
    """Waits for every array in ``out``: jax arrays with ``block_until_ready``, torch on the device."""
    leaves = jax.tree_util.tree_leaves(out)
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            leaf.block_until_ready()
    if any(type(leaf).__module__.startswith("torch") for leaf in leaves):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return out


def interleaved_medians(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median wall time in milliseconds of each zero-argument function.

    Every function is first called ``warmup`` times (compilation excluded from the
    timing), then the functions are called round-robin, one call each per repeat, so a
    drift of the machine's speed (other load, clock changes) hits all of them alike.
    The order within a repeat is shuffled (seeded), and each timed call comes right
    after an untimed call of the same function: what ran before (another runtime's
    spinning thread pool, an input evicted from the cache) then weighs on no function
    more than on another.
    """
    for fn in fns.values():
        for _ in range(warmup):
            sync(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            fn = fns[name]
            sync(fn())
            start = time.perf_counter()
            sync(fn())
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines() -> list[str]:
    """A markdown bullet list describing the machine and the library versions."""
    import flax
    import torch

    device = jax.devices()[0]
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores (torch threads: {torch.get_num_threads()})",
        f"- JAX device: {device.platform} ({device.device_kind})",
        f"- jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, "
        f"python {platform.python_version()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"- torch device: {torch.cuda.get_device_name()} (cuDNN {torch.backends.cudnn.version()})")
    return lines


def on_gpu() -> bool:
    """Whether JAX's default device is a GPU."""
    return jax.devices()[0].platform == "gpu"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if np.isnan(v) else f"{v:.3g}"
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of the finite values (nan if none)."""
    vals = [v for v in values if np.isfinite(v) and v > 0]
    return float(np.exp(np.mean(np.log(vals)))) if vals else float("nan")


def progress():
    """A rich progress bar with elapsed time, shared by the scripts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
