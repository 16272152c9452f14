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
    if len(os.sched_getaffinity(0)) > 1:  # the same suite again, pinned to one core
        assert "pinned to 1 of the" in text
        assert text.count("### Summary") == 2 and text.count("Linear cost") == 1


def test_jbn_normalization_fuses_with_relu_as_often_as_flax_and_writes_no_more_arrays():
    # The requirement that jbn's rules leave XLA free to fuse the normalization
    # with its neighbours, checked on the compiled training step of a small ResNet.
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import resnet_step

    stages, batch, size = (1, 1), 4, 32
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, resnet_step.NUM_CLASSES, batch), jnp.int32)
    smallest = resnet_step.smallest_activation(stages, False, batch, size)
    report = {}
    for kind in ("jbn", "flax"):
        model = resnet_step.ResNet(stages, False, kind)
        step, state = resnet_step.flax_step(model, images, labels, jnp.float32)
        report[kind] = resnet_step.fusion_report(step, state, smallest)
    jbn, flax = report["jbn"], report["flax"]
    assert jbn["relu"] == flax["relu"] > 0
    assert jbn["relu fused with normalize"] >= flax["relu fused with normalize"]
    assert jbn["relu fused with normalize"] >= jbn["relu"] - 1  # all but the stem's pooled one
    written = "batch-sized arrays written by the entry computation"
    assert jbn[written] <= flax[written]
