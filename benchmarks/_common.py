"""Shared plumbing of the benchmarks: interleaved timing, machine description, markdown tables."""

from __future__ import annotations

import datetime
import math
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 2,
    min_sample_ms: float | None = None,
) -> dict[str, float]:
    """Median wall time in milliseconds of one call of each zero-argument function.

    Every function is first called ``warmup`` times (compilation excluded from the
    timing), then the functions are called round-robin, one sample each per repeat, so a
    drift of the machine's speed (other load, clock changes) hits all of them alike.
    The order within a repeat is shuffled (seeded), and each timed sample comes right
    after an untimed call of the same function: what ran before (another runtime's
    spinning thread pool, an input evicted from the cache) then weighs on no function
    more than on another.

    A sample is ``k`` calls issued back to back and waited for once, divided by ``k``:
    ``k`` is 1 unless a call takes less than ``min_sample_ms`` (default: 2 ms on a GPU,
    0 elsewhere), when it is raised (up to 64) to make the sample that long. On a GPU
    the calls then queue on the device while the host issues the next, and the sample
    measures the device's time rather than one launch's latency.
    """
    if min_sample_ms is None:
        min_sample_ms = 2.0 if on_gpu() else 0.0
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            sync(fn())
        calls[name] = 1
        if min_sample_ms > 0:
            start = time.perf_counter()
            sync(fn())
            once = (time.perf_counter() - start) * 1e3
            calls[name] = max(1, min(64, math.ceil(min_sample_ms / max(once, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            fn, k = fns[name], calls[name]
            sync(fn())
            start = time.perf_counter()
            for _ in range(k - 1):
                fn()
            sync(fn())
            times[name].append((time.perf_counter() - start) * 1e3 / k)
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


def hlo_computations(hlo: str) -> list[tuple[str, bool]]:
    """The computations of a compiled HLO module's text, each with whether it is fused.

    A fused computation (a fusion's body, a reduction's region) runs inside the kernel
    that calls it; the others (the entry computation, on a GPU its command buffers)
    launch kernels of their own.
    """
    return [(comp, comp.lstrip("%").startswith(("fused", "region", "horizontally_fused")))
            for comp in re.split(r"\n(?=\S)", hlo)]


def print_and_append(text: str, path: str | None) -> None:
    """Prints a script's markdown, and appends it to the file at ``path`` where one is given."""
    print(text)
    if path:
        with open(path, "a") as f:
            f.write("\n" + text)


def progress():
    """A rich progress bar with elapsed time, shared by the scripts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
