"""The benchmark suite runs end to end and writes its tables (tiny shapes, no timing checks)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_mode_writes_a_table_with_every_implementation_and_mode(tmp_path):
    # Two measuring processes, whose medians are merged: the path of a full run.
    out = tmp_path / "RESULTS.md"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick",
                    "--processes", "2", "--out", str(out)], check=True, env=env, cwd=ROOT,
                   timeout=600, capture_output=True)
    text = out.read_text()
    for word in ("jbn ms", "flax-fast ms", "flax-stable ms", "torch ms", "jbn / flax-fast",
                 "jbn / jbn-copy", "median over 2 processes",
                 "| train |", "| eval |", "| bwd |", "| fwd+bwd |", "NHWC", "NCHW",
                 "bfloat16", "float32", "Linear cost", "jax ", "CPU:"):
        assert word in text, word
