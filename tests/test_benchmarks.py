"""The benchmark suite runs end to end and writes its tables (tiny shapes, no timing checks)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The scripts import each other as modules of benchmarks/, as they do when run.
sys.path.insert(0, str(ROOT / "benchmarks"))


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

    import resnet_step

    stages, batch, size = (1, 1), 4, 32
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, resnet_step.NUM_CLASSES, batch), jnp.int32)
    smallest = resnet_step.smallest_activation(stages, False, batch, size)
    report = {}
    for kind in ("jbn", "flax"):
        model = resnet_step.ResNet(stages, False, kind)
        step, state = resnet_step.flax_step(model, images, labels)
        report[kind], _ = resnet_step.fusion_report(step, state, smallest)
    jbn, flax = report["jbn"], report["flax"]
    assert jbn["relu"] == flax["relu"] > 0
    assert jbn["relu fused with normalize"] >= flax["relu fused with normalize"]
    assert jbn["relu fused with normalize"] >= jbn["relu"] - 1  # all but the stem's pooled one
    assert jbn[resnet_step.WRITTEN] <= flax[resnet_step.WRITTEN]


def test_kernels_counts_fusions_by_kind_and_other_kernels_outside_fused_computations():
    import kernels

    hlo = "\n".join([
        "%fused_reduce (p: f32[4,8]) -> f32[8] {",
        "  %r = f32[8]{0} reduce(%p, %c), dimensions={0}, to_apply=%region_0",
        "}",
        "ENTRY %main (x: f32[4,8]) -> (f32[8], f32[4,8]) {",
        "  %a = f32[8]{0} fusion(%x), kind=kInput, calls=%fused_reduce",
        "  %b = f32[4,8]{1,0} fusion(%x, %a), kind=kLoop, calls=%fused_add",
        "  %c = f32[4,8]{1,0} fusion(%b), kind=kLoop, calls=%fused_exp",
        "  %d = s32[] copy(%e)",
        "  %f = f32[8]{0} custom-call(%x), custom_call_target=\"k\"",
        "}",
    ])
    assert kernels.kernels(hlo) == {"fusion kInput": 1, "fusion kLoop": 2, "copy": 1,
                                    "custom-call": 1}


def test_kernels_report_lists_every_implementation_mode_layout_and_dtype(tmp_path):
    import kernels

    text = kernels.report((2, 8, 4, 4), str(tmp_path))
    rows = [line for line in text.splitlines() if line.startswith("| N")]
    assert len(rows) == 3 * 4 * 2 * 2  # implementations, modes, layouts, dtypes
    assert all(int(row.split("|")[5]) >= 1 for row in rows)
    assert len(list(tmp_path.glob("*.hlo"))) == len(rows)


def test_a_short_call_is_timed_over_many_calls_per_sample():
    # On a GPU a sample is several calls, so that the device's time is measured rather
    # than one launch's latency; the median is still per call.
    import _common

    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        time.sleep(0.001)

    ms = _common.interleaved_medians({"f": fn}, repeats=3, warmup=1, min_sample_ms=50.0)
    per_sample = (calls["n"] - 2) / 3 - 1  # minus warm-up and probe; minus the untimed call
    assert per_sample >= 5
    assert 1.0 <= ms["f"] < 25.0  # per call: a whole sample lasts 50 ms or more


def test_resnet_step_network_convolves_in_its_compute_dtype():
    # Flax's convolutions promote bfloat16 input to their float32 kernels unless told the
    # dtype: a "bfloat16" step would then compute in float32.
    import jax
    import jax.numpy as jnp

    import resnet_step

    for kind in ("jbn", "flax"):
        model = resnet_step.ResNet((1, 1), True, kind, width=8, dtype=jnp.bfloat16)
        x = jnp.zeros((2, 32, 32, 3), jnp.bfloat16)
        variables = model.init(jax.random.key(0), x, train=False)
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats"]))(variables, x)
        convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
        assert convs
        assert all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars), kind


def test_gpu_rows_give_the_floor_and_jbn_time_over_it():
    # The floor is the bytes a mode must move over the bandwidth: training forward moves
    # three times x's bytes.
    import bench

    config = ((2, 4, 8, 8), "float32", "NCHW")
    times = {m: {impl: 1.0 for impl in bench.IMPLS} for m in bench.MODES}
    times["train"]["jbn"] = 0.5
    bandwidth = 1e9  # bytes per second
    row = next(bench._rows({config: times}, [config], True, bandwidth, ("train",)))
    floor_ms = 3 * 2 * 4 * 8 * 8 * 4 / bandwidth * 1e3
    assert row[-2] == floor_ms and row[-1] == 0.5 / floor_ms
    assert bench._header(True)[-2:] == ["floor ms", "jbn / floor"]


def test_timed_programs_take_the_running_statistics_as_arguments():
    # As in a training step: closed over, the statistics would be constants that XLA
    # folds, and jbn's new num_batches_tracked would compile to a copy of a constant.
    import bench
    import jax.numpy as jnp

    x = jnp.ones((2, 4, 3, 3), jnp.float32)
    for impl, modes, n_stats in [("jbn", bench.jbn_modes(x, x, 1), 3),
                                 ("flax", bench.flax_modes(x, x, 1, fast=True), 2)]:
        # Training reads and updates every statistic; evaluation reads the mean and the
        # variance (jit drops the unused counter).
        for mode, inputs in (("train", 2 + n_stats + 1), ("eval", 2 + 2 + 1)):
            call = modes[mode]
            hlo = call.func.lower(*call.args).compile().as_text()
            entry = hlo[hlo.index("ENTRY"):].split("\n}")[0]
            assert len(re.findall(r" parameter\(\d+\)", entry)) == inputs, (impl, mode, entry)
            assert not re.search(r"copy\(%constant", entry), (impl, mode, entry)


def test_resnet_step_affine_network_normalizes_no_sample_by_the_others():
    # The affine-only network, the step's floor without batch norm, must take no batch
    # statistics: a sample's training output does not depend on the rest of the batch,
    # as it does with a batch norm.
    import jax
    import jax.numpy as jnp
    import numpy as np

    import resnet_step

    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 16, 16, 3)), jnp.float32)
    alone = {}
    for kind in ("affine", "jbn"):
        model = resnet_step.ResNet((1,), False, kind, width=4)
        variables = model.init(jax.random.key(0), x, train=False)

        def train(x, model=model, variables=variables):
            return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
        alone[kind] = np.allclose(train(x)[:1], train(x[:1]), rtol=1e-5, atol=1e-6)
    assert alone == {"affine": True, "jbn": False}


def test_eager_benchmark_times_every_implementation_in_both_modes(tmp_path):
    out = tmp_path / "RESULTS.md"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eager.py"), "--quick",
                    "--out", str(out)], check=True, env=env, cwd=ROOT, timeout=300,
                   capture_output=True)
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
            if re.match(r"\| \d+x", line)]
    impls = {"jbn.batch_norm", "jbn.BatchNorm2d", "flax BatchNorm", "torch"}
    assert {(r[1].strip(), r[2].strip()) for r in rows} == {
        (m, i) for m in ("train", "eval") for i in impls}
    assert all(float(r[4]) > 0 for r in rows)
    # The core's own row is the ratio's denominator.
    assert all(float(r[5]) == 1 for r in rows if r[2].strip() == "jbn.batch_norm")


def test_bench_refuses_more_cores_than_the_process_may_use():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick",
                             "--cores", str(cores + 1)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert f"--cores {cores + 1}: this process may run on {cores} core(s) only" in result.stderr
