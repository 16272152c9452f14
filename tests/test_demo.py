"""The demo (``python -m jbn demo``): outputs, determinism, exact resume, errors, data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import pytest

from jbn import _demo

EPOCHS = 2
STEPS_PER_EPOCH = 1437 // 64  # digits: 1,437 training images, batch 64


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m jbn`` in a fresh process (so the backend starts there)."""
    return subprocess.run(
        [sys.executable, "-m", "jbn", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )


def env_without_device_flags() -> dict[str, str]:
    """The environment minus the tests' forced 8 host devices."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


def read_checkpoint(path: Path) -> dict:
    return flax.serialization.msgpack_restore(path.read_bytes())


def assert_trees_bitwise_equal(a, b) -> None:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def run_histories(metrics: dict) -> dict:
    return {name: run["history"] for name, run in metrics["runs"].items()}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """An uninterrupted two-epoch run of the CLI."""
    out = tmp_path_factory.mktemp("demo") / "out"
    result = run_cli("demo", "--epochs", str(EPOCHS), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_import_jbn_does_not_import_the_demo_dependencies():
    # flax itself may import rich; jbn must add none of the demo extra's packages.
    code = (
        "import sys; import flax.linen; before = set(sys.modules); import jbn; "
        "print(sorted(m for m in set(sys.modules) - before "
        "if m.split('.')[0] in ('optax', 'sklearn', 'matplotlib', 'rich')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    code = "import sys, jbn; print('optax' in sys.modules, 'sklearn' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"


def test_short_run_writes_plot_checkpoint_and_metrics(short_run: Path):
    png = (short_run / _demo.PLOT_NAME).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    checkpoint = read_checkpoint(short_run / _demo.CHECKPOINT_NAME)
    assert int(checkpoint["epoch"]) == EPOCHS
    bn_state = checkpoint["runs"]["bn"]["state"]
    assert set(bn_state) == {"params", "batch_stats", "opt_state", "step"}
    assert int(bn_state["step"]) == EPOCHS * STEPS_PER_EPOCH
    # Every BatchNorm2d counted every training step.
    stats = flax.traverse_util.flatten_dict(bn_state["batch_stats"])
    counts = [int(v) for k, v in stats.items() if k[-1] == "num_batches_tracked"]
    assert counts == [EPOCHS * STEPS_PER_EPOCH] * 6  # stem; 2 in block1; 2 + projection in block2
    assert checkpoint["runs"]["plain"]["state"]["batch_stats"] == {}
    metrics = json.loads((short_run / _demo.METRICS_NAME).read_text())
    for name in ("bn", "plain"):
        history = metrics["runs"][name]["history"]
        assert len(history["test_accuracy"]) == EPOCHS
        assert all(0.0 <= a <= 1.0 for a in history["test_accuracy"])


def test_same_seed_gives_identical_metrics_and_checkpoint(short_run: Path, tmp_path: Path):
    result = run_cli("demo", "--epochs", str(EPOCHS), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    first = json.loads((short_run / _demo.METRICS_NAME).read_text())
    second = json.loads((tmp_path / _demo.METRICS_NAME).read_text())
    assert run_histories(first) == run_histories(second)
    assert_trees_bitwise_equal(
        {n: r["state"] for n, r in read_checkpoint(short_run / _demo.CHECKPOINT_NAME)["runs"].items()},
        {n: r["state"] for n, r in read_checkpoint(tmp_path / _demo.CHECKPOINT_NAME)["runs"].items()},
    )


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(short_run: Path, tmp_path: Path):
    result = run_cli("demo", "--epochs", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    after_one = read_checkpoint(tmp_path / _demo.CHECKPOINT_NAME)
    assert int(after_one["epoch"]) == 1
    result = run_cli("demo", "--epochs", str(EPOCHS), "--resume", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    resumed = read_checkpoint(tmp_path / _demo.CHECKPOINT_NAME)
    uninterrupted = read_checkpoint(short_run / _demo.CHECKPOINT_NAME)
    assert int(resumed["epoch"]) == EPOCHS
    # params, batch_stats (running statistics and counts), optimizer state and step.
    assert_trees_bitwise_equal(
        {n: r["state"] for n, r in resumed["runs"].items()},
        {n: r["state"] for n, r in uninterrupted["runs"].items()},
    )
    # The resumed epoch did train: the running statistics moved on from the checkpoint.
    stem = "bn_stem"
    assert not np.array_equal(
        after_one["runs"]["bn"]["state"]["batch_stats"][stem]["running_mean"],
        resumed["runs"]["bn"]["state"]["batch_stats"][stem]["running_mean"],
    )
    assert run_histories(json.loads((tmp_path / _demo.METRICS_NAME).read_text())) == run_histories(
        json.loads((short_run / _demo.METRICS_NAME).read_text())
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
        (["demo", "--devices", "3"], "--devices 3 must divide --batch-size 64"),
        (["demo", "--lr", "-1"], "--lr: expected a positive number, got '-1'"),
        (["demo", "--batch-size", "5000"], "--batch-size 5000 exceeds the 1437 training images"),
        (["demo", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["demo", "--seed", str(2**32)], "--seed: expected an integer from 0 to 2**32 - 1"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_one_line_error(args: list[str], message: str, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0] and message in lines[0]
    assert "Traceback" not in result.stderr


def test_resume_without_a_checkpoint_is_a_one_line_error(tmp_path: Path):
    result = run_cli("demo", "--epochs", "1", "--resume", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"jbn demo: error: --resume: no checkpoint at {tmp_path / _demo.CHECKPOINT_NAME}"
    ]


@pytest.mark.parametrize("kind", ["garbage", "directory"])
def test_resume_from_an_unreadable_checkpoint_is_a_one_line_error(kind: str, tmp_path: Path):
    if kind == "garbage":
        (tmp_path / _demo.CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    else:
        (tmp_path / _demo.CHECKPOINT_NAME).mkdir()
    result = run_cli("demo", "--epochs", "1", "--resume", "--out", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a readable checkpoint of this demo" in lines[0], lines


def test_no_command_prints_help_and_exits_nonzero():
    result = run_cli()
    assert result.returncode == 2
    assert "demo" in result.stderr


def test_devices_2_sets_the_host_device_count_and_trains(tmp_path: Path):
    # Without the tests' XLA_FLAGS the process has one CPU device unless the CLI
    # creates two before jax's backend starts (after `import jbn`).
    result = run_cli("demo", "--epochs", "1", "--devices", "2", "--out", str(tmp_path),
                     env=env_without_device_flags())
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / _demo.METRICS_NAME).read_text())
    assert metrics["config"]["devices"] == 2
    checkpoint = read_checkpoint(tmp_path / _demo.CHECKPOINT_NAME)
    assert int(checkpoint["runs"]["bn"]["state"]["step"]) == STEPS_PER_EPOCH


def test_data_parallel_step_with_sync_batch_norm_equals_the_single_device_step():
    if jax.local_device_count() < 4:
        pytest.skip("needs 4 host devices (tests/conftest.py forces 8)")
    data = _demo.load_digits_split(seed=0)
    x, y = data["x_train"][:64], data["y_train"][:64]
    results = {}
    for devices in (1, 4):
        config = _demo.DemoConfig(devices=devices, lr=0.1)
        state = _demo.create_state(config, True, x[:1])
        step = _demo.make_train_step(config, use_bn=True)
        for _ in range(2):
            state, loss, accuracy = step(state, x, y)
        results[devices] = (state.params, state.batch_stats, loss, accuracy)
    single, parallel = results[1], results[4]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6),
        single, parallel,
    )


def test_out_that_cannot_take_files_is_a_one_line_error_before_training(tmp_path: Path):
    existing_file = tmp_path / "afile"
    existing_file.write_text("")
    for out in (existing_file, existing_file / "sub"):
        result = run_cli("demo", "--epochs", "1", "--out", str(out))
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"jbn demo: error: --out {out}: not a directory that files can be written to "
            f"({'File exists' if out == existing_file else 'Not a directory'})"
        ]


def test_the_resume_hint_after_an_interrupt_repeats_the_runs_settings():
    import shlex

    from jbn.__main__ import _resume_command, build_parser

    parser = build_parser()
    demo_parser = parser._subparsers._group_actions[0].choices["demo"]  # noqa: SLF001
    given = ["demo", "--epochs", "30", "--lr", "0.3", "--seed", "0", "--out", "runs/a b"]
    args = parser.parse_args(given)
    command = _resume_command(args, demo_parser)
    assert command == "jbn demo --resume --epochs 30 --lr 0.3 --out 'runs/a b'"
    resumed = parser.parse_args(shlex.split(command)[1:])
    assert resumed.resume and vars(resumed) == {**vars(args), "resume": True}
