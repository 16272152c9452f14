"""Counts the kernels XLA compiles for each batch norm and mode: how many passes over the data.

Run from the repository root::

    python benchmarks/kernels.py [--shape 256 256 56 56] [--out FILE] [--hlo-dir DIR]

Batch norm is memory-bound, so its time is set by how many times it reads and writes
the batch: a training forward needs one statistics pass and one normalizing pass, a
backward pass one pass of sums over ``dy`` and ``x`` and one writing ``dx``. This
script compiles the programs that ``bench.py`` times (jbn, flax.linen.BatchNorm with
fast and with stable variance; both layouts, float32 and bfloat16) and lists, per
program, its kernels as XLA scheduled them: the fusions (by kind: ``kLoop``
elementwise, ``kInput`` with a reduction, ...), custom calls, and unfused reductions
or copies of the entry computation. Compare the counts across implementations; read
the HLO (``--hlo-dir``) to see what each kernel reads. ``--out`` appends the table
to that file.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import bench  # noqa: E402

_FUSION = re.compile(r"\sfusion\(.*kind=(k\w+)")
_OTHER = re.compile(r"\s(custom-call|reduce|copy|transpose|sort)\(")


def kernels(hlo: str) -> collections.Counter:
    """The kernels of a compiled HLO module, by kind.

    Fusions are counted wherever they are called from (the entry computation, or a
    command buffer); other kernels only outside fused computations.
    """
    counts: collections.Counter = collections.Counter()
    for comp, fused in _common.hlo_computations(hlo):
        for line in comp.splitlines():
            if m := _FUSION.search(line):
                counts[f"fusion {m.group(1)}"] += 1
            elif not fused and (m := _OTHER.search(line)):
                counts[m.group(1)] += 1
    return counts


def report(shape: tuple[int, ...], hlo_dir: str | None) -> str:
    """Markdown table of the kernels of every implementation, mode, layout and dtype."""
    rows = []
    for dtype_name in bench.DTYPES:
        for layout in ("NCHW", "NHWC"):
            modes = bench.all_modes(shape, dtype_name, layout, jax_only=True)
            for impl, calls in modes.items():
                for mode, call in calls.items():
                    hlo = call.func.lower(*call.args).compile().as_text()
                    if hlo_dir:
                        name = f"{impl}-{mode}-{layout}-{dtype_name}.hlo".replace("+", "_")
                        with open(os.path.join(hlo_dir, name), "w") as f:
                            f.write(hlo)
                    counts = kernels(hlo)
                    listed = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                    rows.append([layout, dtype_name, mode, impl, sum(counts.values()), listed])
    lines = [f"## Kernels per program, batch {'x'.join(map(str, shape))} (NCHW)", "",
             *_common.machine_lines(), "",
             _common.markdown_table(["layout", "dtype", "mode", "implementation", "kernels",
                                     "which"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=_common.positive_int, nargs=4, default=None,
                        help="NCHW shape (default: 256x256x56x56 on a GPU, 2x256x56x56 on a CPU)")
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    parser.add_argument("--hlo-dir", default=None, help="write each compiled program here")
    args = parser.parse_args(argv)
    shape = tuple(args.shape or ((256 if _common.on_gpu() else 2), 256, 56, 56))
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
    text = report(shape, args.hlo_dir)
    _common.print_and_append(text, args.out)


if __name__ == "__main__":
    main()
