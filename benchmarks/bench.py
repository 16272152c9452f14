"""Times jbn's batch norm against flax.linen.BatchNorm and torch on ResNet-50's batch-norm shapes.

Run from the repository root::

    python benchmarks/bench.py [--quick] [--processes N] [--cores N ...] [--out benchmarks/RESULTS.md]

Implementations (one interleaved run: each repeat calls every implementation once, in a
shuffled order; the median of the repeats is reported; warm-up and compilation are excluded; JAX
results are waited for with ``block_until_ready``):

- ``jbn``: ``jbn.batch_norm`` with ``axis=1`` (NCHW) or ``axis=-1`` (NHWC);
- ``flax-fast``: ``flax.linen.BatchNorm(use_fast_variance=True)`` (``E[x^2] - E[x]^2``);
- ``flax-stable``: ``flax.linen.BatchNorm(use_fast_variance=False)`` (two passes);
- ``torch``: ``torch.nn.BatchNorm2d``, contiguous (NCHW) or ``channels_last`` (NHWC);
  on the CPU here, cuDNN on a GPU;
- ``jbn-copy``: jbn again, compiled separately on its own copy of the inputs: the
  ratio ``jbn / jbn-copy`` of two identical programs is the run's noise floor (buffer
  placement and the machine's other load), against which the other ratios are read.

Modes: ``train`` (training forward: ``y`` and the new running statistics), ``eval``
(evaluation forward), ``bwd`` (the backward alone: the vjp of a training forward,
already computed, applied to ``dy``; gradients for ``x``, weight and bias) and
``fwd+bwd`` (both in one call). Ratios are jbn's time over the peer's: below 1 means
jbn is faster.

On a CPU with more than one core the suite is run twice: on every core, and pinned to one
core (``--cores``). The second run gives XLA and torch one thread each, which separates the
libraries' loops from their runtimes' threading: XLA splits an elementwise loop over the
cores of its thread pool, which on a small machine can cost more than it gains.

Batch norm is memory-bound; the floor of each mode is the bytes it must move over the
device's copy bandwidth (measured first, in XLA and in torch: the faster of the two is
the floor's, since it is what the device can be made to do; on a GPU the tables give
jbn's time over the floor): training forward reads ``x`` twice and writes
``y`` (3 bytes-of-x), evaluation 2, backward 5 (reduce over ``dy`` and ``x``, read them
again, write ``dx``), forward+backward 6 (the statistics pass, then the backward).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import jbn  # noqa: E402

MODES = ("train", "eval", "bwd", "fwd+bwd")
BYTES_OF_X = {"train": 3, "eval": 2, "bwd": 5, "fwd+bwd": 6}
PEERS = ("flax-fast", "flax-stable", "torch", "jbn-copy")
IMPLS = ("jbn",) + PEERS
DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}
# (C, H, W) of the batch norms in ResNet-50 (stem, then the output of each stage).
RESNET50_SHAPES = ((64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))

Modes = dict[str, Callable[[], Any]]


def jax_modes(apply_train: Callable, apply_eval: Callable, params: Any, stats: Any,
              x: jax.Array, dy: jax.Array) -> Modes:
    """The four timed calls of a JAX implementation.

    Args:
      apply_train: ``(params, stats, x) -> (y, new_stats)``, a training forward.
      apply_eval: ``(params, stats, x) -> y``, an evaluation forward.
      params: the differentiable parameters (weight and bias).
      stats: the running statistics, an argument of every program as in a training
        step (closed over, they would be constants that XLA folds: a counter's update
        would compile to a copy of a constant, a kernel of its own on a GPU).
      x, dy: input and output cotangent, of the same shape and dtype.

    Each call is a ``functools.partial`` of a jitted function and its arguments, so that
    its compiled program is ``call.func.lower(*call.args).compile()``.
    """

    def vjp(p, s, x):
        return jax.vjp(lambda p, x: apply_train(p, s, x)[0], p, x)[1]

    train = jax.jit(apply_train)
    evaluate = jax.jit(apply_eval)
    vjp_fn = jax.jit(vjp)(params, stats, x)
    backward = jax.jit(lambda f, dy: f(dy))
    fwd_bwd = jax.jit(lambda p, s, x, dy: vjp(p, s, x)(dy))
    return {
        "train": functools.partial(train, params, stats, x),
        "eval": functools.partial(evaluate, params, stats, x),
        "bwd": functools.partial(backward, vjp_fn, dy),
        "fwd+bwd": functools.partial(fwd_bwd, params, stats, x, dy),
    }


def jbn_modes(x: jax.Array, dy: jax.Array, axis: int) -> Modes:
    """jbn.batch_norm with PyTorch's defaults."""
    params, state = jbn.init(x.shape[axis])
    return jax_modes(
        lambda p, s, x: jbn.batch_norm(p, s, x, True, axis=axis),
        lambda p, s, x: jbn.batch_norm(p, s, x, False, axis=axis)[0],
        params, state, x, dy,
    )


def flax_modes(x: jax.Array, dy: jax.Array, axis: int, fast: bool) -> Modes:
    """flax.linen.BatchNorm with PyTorch's eps and momentum, output in the input's dtype."""
    module = nn.BatchNorm(axis=axis, momentum=0.9, epsilon=1e-5, use_fast_variance=fast,
                          dtype=x.dtype)
    variables = module.init(jax.random.key(0), x, use_running_average=True)
    return jax_modes(
        lambda p, s, x: module.apply({"params": p, "batch_stats": s}, x,
                                     use_running_average=False, mutable=["batch_stats"]),
        lambda p, s, x: module.apply({"params": p, "batch_stats": s}, x,
                                     use_running_average=True),
        variables["params"], variables["batch_stats"], x, dy,
    )


def torch_modes(x_nchw: np.ndarray, dy_nchw: np.ndarray, dtype: torch.dtype,
                channels_last: bool) -> Modes:
    """torch.nn.BatchNorm2d (float32 parameters, as with autocast) on the torch device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.from_numpy(x_nchw).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.from_numpy(dy_nchw).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    bn = torch.nn.BatchNorm2d(x.shape[1]).to(device)
    xg = x.detach().requires_grad_(True)
    inputs = [xg, bn.weight, bn.bias]
    bn.train()
    kept = bn(xg)  # the graph that ``bwd`` differentiates again and again

    def train():
        bn.train()
        with torch.no_grad():
            return bn(x)

    def evaluate():
        bn.eval()
        with torch.no_grad():
            return bn(x)

    def backward():
        return torch.autograd.grad(kept, inputs, dy, retain_graph=True)

    def fwd_bwd():
        bn.train()
        return torch.autograd.grad(bn(xg), inputs, dy)

    return {"train": train, "eval": evaluate, "bwd": backward, "fwd+bwd": fwd_bwd}


def all_modes(shape_nchw: tuple[int, ...], dtype_name: str, layout: str, seed: int = 0,
              jax_only: bool = False) -> dict[str, Modes]:
    """Every implementation's timed calls for one shape (given as NCHW), dtype and layout.

    ``jax_only``: jbn and flax only (no torch, no second copy of jbn).
    """
    jdtype, tdtype = DTYPES[dtype_name]
    rng = np.random.default_rng(seed)
    x_nchw = rng.standard_normal(shape_nchw, dtype=np.float32)
    dy_nchw = rng.standard_normal(shape_nchw, dtype=np.float32)
    nhwc = layout == "NHWC"
    axis = -1 if nhwc else 1
    to_jax = (lambda a: jnp.asarray(np.moveaxis(a, 1, -1), jdtype)) if nhwc else (
        lambda a: jnp.asarray(a, jdtype))
    x, dy = to_jax(x_nchw), to_jax(dy_nchw)
    out: dict[str, Modes] = {
        "jbn": jbn_modes(x, dy, axis),
        "flax-fast": flax_modes(x, dy, axis, fast=True),
        "flax-stable": flax_modes(x, dy, axis, fast=False),
    }
    if jax_only:
        return out
    out["jbn-copy"] = jbn_modes(jnp.array(x, copy=True), jnp.array(dy, copy=True), axis)
    try:
        out["torch"] = torch_modes(x_nchw, dy_nchw, tdtype, channels_last=nhwc)
        _common.sync(out["torch"]["fwd+bwd"]())
    except RuntimeError as e:  # a dtype/layout torch does not support on this device
        print(f"torch skipped for {shape_nchw} {dtype_name} {layout}: {e}")
    return out


def copy_bandwidth(nbytes: int) -> dict[str, float]:
    """Copy bandwidth in bytes/s of XLA and of torch: ``y = x + 1`` over a float32 array.

    The faster of the two is the floor's; their ratio shows how much of a gap in
    elementwise work is XLA's loop against torch's (on a CPU, which uses every core).
    """
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
    ms = _common.interleaved_medians({"xla": lambda: f(x), "torch": lambda: t + 1}, repeats=20)
    return {k: 2 * nbytes / (v * 1e-3) for k, v in ms.items()}


Results = dict[tuple, dict[str, dict[str, float]]]  # config -> mode -> implementation -> ms


def measure(configs: list[tuple], repeats: int, warmup: int) -> Results:
    """Median time of every implementation and mode for each ``(shape, dtype, layout)``."""
    results: Results = {}
    with _common.progress() as bar:
        task = bar.add_task("batch norm", total=len(configs))
        for config in configs:
            if config in results:
                bar.advance(task)
                continue
            shape, dtype_name, layout = config
            bar.update(task, description=f"{layout} {dtype_name} {shape}")
            modes = all_modes(shape, dtype_name, layout)
            flat = {(impl, m): fn for impl, ms in modes.items() for m, fn in ms.items()}
            med = _common.interleaved_medians(flat, repeats=repeats, warmup=warmup)
            results[config] = {
                m: {impl: med.get((impl, m), float("nan")) for impl in IMPLS} for m in MODES
            }
            bar.console.print(_progress_line(config, results[config]), soft_wrap=True)
            bar.advance(task)
    return results


def _progress_line(config: tuple, result: dict[str, dict[str, float]]) -> str:
    """One configuration's jbn times and ratios, printed as soon as it is measured."""
    shape, dtype_name, layout = config
    cells = [f"{m} {t['jbn']:.3g} ms (/flax-fast {t['jbn'] / t['flax-fast']:.2f}, "
             f"/torch {t['jbn'] / t['torch']:.2f})" for m, t in result.items()]
    return f"{layout} {dtype_name} {'x'.join(map(str, shape))}: " + "; ".join(cells)


def measure_in_processes(configs: list[tuple], repeats: int, warmup: int,
                         processes: int, cores: int | None = None) -> Results:
    """:func:`measure` in ``processes`` fresh processes, one after the other; the median of theirs.

    Within one process, where each program's buffers happen to lie moves its time by
    up to a fifth on some CPUs, the same way for every repeat; the median over
    processes is what a user sees on a typical run. ``cores``: pin the processes to
    that many of this one's CPUs (XLA sizes its thread pool to them, and torch is
    given as many threads); None, all of them.
    """
    if processes == 1 and cores is None:
        return measure(configs, repeats, warmup)
    cpus = None if cores is None else sorted(os.sched_getaffinity(0))[:cores]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(processes):
            path = os.path.join(tmp, f"{i}.json")
            print(f"process {i + 1} of {processes}"
                  + (f", pinned to {cores} core(s)" if cores else ""), flush=True)
            args = ["--measure-to", path, "--configs", json.dumps(configs),
                    "--repeats", str(repeats), "--warmup", str(warmup)]
            subprocess.run(_command(args, cpus), check=True)
            with open(path) as f:
                runs.append({_config(c): r for c, r in json.load(f)})
    return {
        config: {m: {impl: float(np.median([r[config][m][impl] for r in runs]))
                     for impl in IMPLS} for m in MODES}
        for config in runs[0]
    }


def _command(args: list[str], cpus: list[int] | None) -> list[str]:
    """The command that runs this script with ``args``, pinned to ``cpus`` where given.

    The pinning is the new interpreter's first statement, before JAX or torch start
    a thread, so that every thread of theirs inherits it.
    """
    script = os.path.abspath(__file__)
    if cpus is None:
        return [sys.executable, script, *args]
    boot = (f"import os, runpy, sys; os.sched_setaffinity(0, {cpus!r}); "
            f"sys.argv = {[script, *args]!r}; runpy.run_path({script!r}, run_name='__main__')")
    return [sys.executable, "-c", boot]


def _config(c: list) -> tuple:
    """A configuration read back from JSON: ``[[2, 64, 8, 8], "float32", "NCHW"]``."""
    return (tuple(c[0]), c[1], c[2])


def all_cores() -> int:
    """How many CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def default_cores() -> list[int]:
    """Every core, and on a CPU with more than one where processes can be pinned, one core too."""
    n = all_cores()
    if _common.on_gpu() or n == 1 or not hasattr(os, "sched_setaffinity"):
        return [n]
    return [n, 1]


def run(shapes: list[tuple[int, ...]], linear: list[tuple[int, ...]], repeats: int,
        warmup: int, out_path: str | None, processes: int = 1,
        cores: list[int] | None = None) -> str:
    """Runs the whole suite; prints and returns (and writes to ``out_path``) the markdown.

    ``cores``: the core counts to measure on, one section each (default:
    :func:`default_cores`); the first also times the batch sizes of ``linear``.
    """
    gpu = _common.on_gpu()
    cores = cores or default_cores()
    # The floor's bandwidth, from an array far larger than the caches; and that of
    # an array the size of the largest here, which on a CPU may lie in the cache.
    copy_mib = 1024 if gpu else 64
    copy = copy_bandwidth(copy_mib * 2**20)
    largest = max(int(np.prod(s)) for s in shapes) * 4
    copy_largest = copy_bandwidth(largest)
    bandwidth = max(copy.values())
    configs = [(s, d, lay) for s in shapes for d in DTYPES for lay in ("NCHW", "NHWC")]
    linear_configs = [(s, "float32", lay) for lay in ("NCHW", "NHWC") for s in linear]
    quick = " (quick run, tiny shapes)" if len(shapes) < 3 else ""
    repeated = (f"- median of {repeats} interleaved repeats"
                + (f", then the median over {processes} processes" if processes > 1 else "")
                + "; ratios are jbn's time over the peer's (below 1: jbn is faster)")
    sections = []
    for i, n in enumerate(cores):
        pinned = n < all_cores()
        results = measure_in_processes(configs + (linear_configs if i == 0 else []), repeats,
                                       warmup, processes, cores=n if pinned else None)
        if pinned:
            lines = [f"## Batch norm alone, pinned to {n} of the {all_cores()} cores{quick}", "",
                     f"- the same suite, measured in processes pinned to {n} core(s): XLA's "
                     f"thread pool and torch's threads, {n} each", repeated]
        else:
            lines = [f"## Batch norm alone{quick}", "", *_common.machine_lines(),
                     f"- copy bandwidth (y = x + 1, float32): {copy['xla'] / 1e9:.1f} GB/s in "
                     f"XLA and {copy['torch'] / 1e9:.1f} GB/s in torch over "
                     f"{copy_mib} MiB; {copy_largest['xla'] / 1e9:.1f} and "
                     f"{copy_largest['torch'] / 1e9:.1f} GB/s over {largest / 2**20:.3g} MiB, "
                     "the largest float32 input here", repeated]
            if gpu:
                lines.append(f"- floor: the bytes each mode must move over "
                             f"{bandwidth / 1e9:.1f} GB/s, the faster copy")
        lines += ["", *_tables(results, shapes, configs, gpu, bandwidth)]
        if i == 0 and linear:
            lines += ["### Linear cost in the batch size (float32)", "",
                      _common.markdown_table(_header(gpu), _rows(
                          results, linear_configs, gpu, bandwidth, ("train", "fwd+bwd"))), ""]
        sections.append("\n".join(lines))
    text = "\n".join(sections)
    print(text)
    if out_path:
        with open(out_path, "w") as f:
            f.write("# Benchmark results\n\n" + text)
    return text


def _header(gpu: bool) -> list[str]:
    header = ["layout", "dtype", "shape (NCHW)", "mode"] + [f"{i} ms" for i in IMPLS]
    header += [f"jbn / {p}" for p in PEERS]
    return header + (["floor ms", "jbn / floor"] if gpu else [])


def _rows(results: Results, configs: list[tuple], gpu: bool, bandwidth: float,
          modes: tuple[str, ...] = MODES):
    """One table row per configuration and mode: times, ratios, and on a GPU the floor."""
    for shape, dtype_name, layout in configs:
        itemsize = jnp.dtype(DTYPES[dtype_name][0]).itemsize
        for m in modes:
            t = results[(shape, dtype_name, layout)][m]
            row = [layout, dtype_name, "x".join(map(str, shape)), m]
            row += [t[i] for i in IMPLS]
            row += [t["jbn"] / t[p] for p in PEERS]
            if gpu:
                floor = BYTES_OF_X[m] * np.prod(shape) * itemsize / bandwidth * 1e3
                row += [floor, t["jbn"] / floor]
            yield row


def _tables(results: Results, shapes: list[tuple[int, ...]], configs: list[tuple], gpu: bool,
            bandwidth: float) -> list[str]:
    """The summary (geometric means over the shapes) and the table of every shape."""
    summary = []
    for layout in ("NCHW", "NHWC"):
        for dtype_name in DTYPES:
            for m in MODES:
                ts = [results[(s, dtype_name, layout)][m] for s in shapes]
                summary.append([layout, dtype_name, m] + [
                    _common.geomean(t["jbn"] / t[p] for t in ts) for p in PEERS])
    return [
        "### Summary: geometric mean over the shapes of jbn's time ratio", "",
        _common.markdown_table(["layout", "dtype", "mode"] + [f"jbn / {p}" for p in PEERS],
                               summary), "",
        "### Every shape", "",
        _common.markdown_table(_header(gpu), _rows(results, configs, gpu, bandwidth)), "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--batch", type=_common.positive_int, default=None,
                        help="batch size (default: 256 on a GPU, 2 on a CPU)")
    parser.add_argument("--repeats", type=_common.positive_int, default=None)
    parser.add_argument("--cores", type=_common.positive_int, nargs="+", default=None,
                        help="core counts to measure on, one section each (default: all "
                        "cores, and also 1 on a CPU with more than one)")
    parser.add_argument("--processes", type=_common.positive_int, default=None,
                        help="measure in this many fresh processes and report the median "
                        "(default: 3, or 1 with --quick)")
    # Used by --processes for each of its processes.
    parser.add_argument("--measure-to", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--configs", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cores and max(args.cores) > all_cores():
        parser.error(f"--cores {max(args.cores)}: this process may run on {all_cores()} "
                     "core(s) only")
    if args.measure_to:
        torch.set_num_threads(min(torch.get_num_threads(), all_cores()))
        configs = [_config(c) for c in json.loads(args.configs)]
        results = measure(configs, args.repeats, args.warmup)
        with open(args.measure_to, "w") as f:
            json.dump([[list(c), r] for c, r in results.items()], f)
        return
    gpu = _common.on_gpu()
    if args.quick:
        shapes = [(2, 8, 8, 8), (2, 16, 4, 4)]
        linear = [(n, 8, 8, 8) for n in (2, 4, 8)]
        repeats, warmup = args.repeats or 3, 1
    else:
        n = args.batch or (256 if gpu else 2)
        shapes = [(n,) + chw for chw in RESNET50_SHAPES]
        # On a GPU the shapes already span 50 MB to 1.6 GB.
        linear = [] if gpu else [(b,) + RESNET50_SHAPES[1] for b in (n // 2 or 1, n, 2 * n)]
        repeats, warmup = args.repeats or 21, 3
    # A GPU's timings do not move with where a process's buffers lie, as a CPU's can.
    processes = args.processes or (1 if args.quick or gpu else 3)
    run(shapes, linear, repeats, warmup, args.out, processes, args.cores)


if __name__ == "__main__":
    main()
