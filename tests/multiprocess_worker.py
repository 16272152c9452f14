"""One process of the two-process SyncBatchNorm test (run by ``test_multiprocess.py``).

Usage: ``python multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES DATA OUT``.

Joins the distributed runtime at ``127.0.0.1:PORT`` with 4 CPU devices of its own, so
that all processes together form one global mesh. Reads the global batch from the
``.npz`` file ``DATA`` (keys ``x``, ``dy``, ``weight``, ``bias``, ``running_mean``,
``running_var``), feeds this process's slice of it, and writes to the ``.npz`` file
``OUT`` its part of two computations over the global batch:

- ``shard_map`` over the global mesh with ``axis_name``: ``y``, the new state and the
  gradients of ``sum(y * dy)`` (keys prefixed ``sync_``);
- plain ``jax.jit`` of the unsynced ``batch_norm`` over the batch sharded on the global
  mesh, where XLA computes the global statistics itself (keys prefixed ``jit_``).
"""

from __future__ import annotations

import os
import sys

LOCAL_DEVICES = 4


def main(port: int, process_id: int, num_processes: int, data: str, out: str) -> None:
    # This process's own device count, whatever the parent's XLA_FLAGS said.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags)

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )

    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jbn

    from jax import shard_map

    assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
    assert jax.device_count() == LOCAL_DEVICES * num_processes, jax.devices()

    arrays = dict(np.load(data))
    params = {"weight": jnp.asarray(arrays["weight"]), "bias": jnp.asarray(arrays["bias"])}
    state = {
        "running_mean": jnp.asarray(arrays["running_mean"]),
        "running_var": jnp.asarray(arrays["running_var"]),
        "num_batches_tracked": jnp.asarray(0, jnp.int32),
    }
    per_process = arrays["x"].shape[0] // num_processes
    rows = slice(process_id * per_process, (process_id + 1) * per_process)

    # Devices ordered by process: this process's slice lands on its own devices.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices), ("batch",))
    batch = NamedSharding(mesh, P("batch"))
    x = jax.make_array_from_process_local_data(batch, arrays["x"][rows])
    dy = jax.make_array_from_process_local_data(batch, arrays["dy"][rows])

    def local(a: jax.Array) -> np.ndarray:
        """This process's rows of a batch-sharded array, in order."""
        shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])

    def replicated(a: jax.Array) -> np.ndarray:
        return np.asarray(a.addressable_shards[0].data)

    results: dict[str, np.ndarray] = {}

    def record(prefix: str, y, gx, gp, new_state, state_view) -> None:
        """Stores this process's part of one style's outputs under ``prefix``."""
        results[f"{prefix}_y"] = local(y)
        results[f"{prefix}_dx"] = local(gx)
        results[f"{prefix}_dweight"] = replicated(gp["weight"])
        results[f"{prefix}_dbias"] = replicated(gp["bias"])
        for key, value in new_state.items():
            results[f"{prefix}_{key}"] = state_view(value)

    # 1. shard_map with axis_name: statistics synchronized over all 8 global devices.
    def body(params, x, dy):
        y, new_state = jbn.batch_norm(params, state, x, True, axis_name="batch")
        return jnp.sum(y * dy)[None], y, jax.tree.map(lambda v: v[None], new_state)

    mapped = shard_map(body, mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                       out_specs=(P("batch"), P("batch"), P("batch")))

    def total(params, x, dy):
        losses, y, new_state = mapped(params, x, dy)
        return jnp.sum(losses), (y, new_state)

    (gp, gx), (y, new_state) = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))(
        params, x, dy)
    record("sync", y, gx, gp, new_state, local)  # the state: one copy per local device

    # 2. Plain jit over the globally sharded batch, no axis_name.
    def loss(params, x, dy):
        y, new_state = jbn.batch_norm(params, state, x, True)
        return jnp.sum(y * dy), (y, new_state)

    (gp, gx), (y, new_state) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
        params, x, dy)
    record("jit", y, gx, gp, new_state, replicated)

    np.savez(out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    port, process_id, num_processes = (int(a) for a in sys.argv[1:4])
    main(port, process_id, num_processes, sys.argv[4], sys.argv[5])
