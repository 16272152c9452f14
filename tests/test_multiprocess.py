"""SyncBatchNorm beyond one process: 2 processes of 4 CPU devices each, one global batch.

Starts ``multiprocess_worker.py`` twice on this machine; they join through
``jax.distributed.initialize`` on a free localhost port and normalize the global batch
over all 8 devices. Their results must equal the single-process computation here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn

WORKER = Path(__file__).with_name("multiprocess_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(tmp_path: Path, data: Path) -> list[dict[str, np.ndarray]]:
    """Runs the workers to completion (or kills them); returns each one's results."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    outs = [tmp_path / f"out{i}.npz" for i in range(NUM_PROCESSES)]
    logs = [open(tmp_path / f"log{i}.txt", "w+") for i in range(NUM_PROCESSES)]
    procs = []
    try:
        for i in range(NUM_PROCESSES):
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(port), str(i), str(NUM_PROCESSES),
                 str(data), str(outs[i])],
                env=env, stdout=logs[i], stderr=subprocess.STDOUT,
            ))
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        text = []
        for i, log in enumerate(logs):
            log.seek(0)
            text.append(f"--- process {i} ---\n{log.read()[-4000:]}")
            log.close()
    assert codes is not None, f"workers did not finish in {TIMEOUT_S} s\n" + "\n".join(text)
    assert codes == [0] * NUM_PROCESSES, f"worker exit codes {codes}\n" + "\n".join(text)
    return [dict(np.load(out)) for out in outs]


@pytest.fixture(scope="module")
def global_batch_and_results(tmp_path_factory):
    rng = np.random.default_rng(0)
    arrays = {
        "x": (rng.normal(size=(16, 3, 4, 5)) * 2 + 5).astype(np.float32),
        "dy": rng.normal(size=(16, 3, 4, 5)).astype(np.float32),
        "weight": rng.uniform(0.5, 1.5, 3).astype(np.float32),
        "bias": rng.normal(size=3).astype(np.float32),
        "running_mean": rng.normal(size=3).astype(np.float32),
        "running_var": rng.uniform(0.5, 2.0, 3).astype(np.float32),
    }
    tmp_path = tmp_path_factory.mktemp("multiprocess")
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    return arrays, _run_workers(tmp_path, data)


def _single_process_reference(arrays):
    """``jbn.batch_norm`` on the whole batch on one device, with the gradients of sum(y * dy)."""
    params = {"weight": jnp.asarray(arrays["weight"]), "bias": jnp.asarray(arrays["bias"])}
    state = {
        "running_mean": jnp.asarray(arrays["running_mean"]),
        "running_var": jnp.asarray(arrays["running_var"]),
        "num_batches_tracked": jnp.asarray(0, jnp.int32),
    }

    def loss(params, x):
        y, new_state = jbn.batch_norm(params, state, x, True)
        return jnp.sum(y * arrays["dy"]), (y, new_state)

    (gp, gx), (y, new_state) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, arrays["x"])
    return {"y": y, "dx": gx, "dweight": gp["weight"], "dbias": gp["bias"], **new_state}


def _gather(results, key):
    """The processes' rows of a batch-sharded result, in process order."""
    return np.concatenate([r[key] for r in results])


@pytest.mark.parametrize("prefix", ["sync", "jit"], ids=["shard_map_axis_name", "jit_mesh"])
def test_two_processes_normalize_the_global_batch(global_batch_and_results, prefix):
    arrays, results = global_batch_and_results
    ref = _single_process_reference(arrays)
    for key in ("y", "dx"):
        np.testing.assert_allclose(
            _gather(results, f"{prefix}_{key}"), ref[key], rtol=1e-5, atol=1e-6, err_msg=key
        )
    for r in results:
        for key in ("dweight", "dbias"):
            np.testing.assert_allclose(r[f"{prefix}_{key}"], ref[key], rtol=1e-5, atol=1e-5,
                                       err_msg=key)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            got = np.asarray(r[f"{prefix}_{key}"])
            # shard_map returns one copy per local device; each must be the global one.
            for copy in (got if prefix == "sync" else got[None]):
                np.testing.assert_allclose(copy, ref[key], rtol=1e-6, atol=1e-7, err_msg=key)
