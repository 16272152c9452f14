"""SyncBatchNorm: statistics synchronized across devices equal those of the global batch.

Every multi-device result is compared with ``jbn.batch_norm`` on the concatenated batch
on one device and with ``torch.nn.BatchNorm`` (PyTorch's autograd for the gradients),
under ``jax.pmap``, ``shard_map`` and ``jax.vmap`` with ``axis_name``, and under plain
``jax.jit`` over a sharded ``Mesh``. The 8 CPU devices come from ``conftest.py``.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jbn

from jax import shard_map as _shard_map

D = 8  # devices
AXIS = "batch"
C = 3
EPS = 1e-5
MOMENTUM = 0.1
LAYOUTS = {"NCHW": 1, "NHWC": -1}


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    assert jax.device_count() == D, "tests/conftest.py must force 8 host CPU devices"


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), (AXIS,))


def _variables(seed: int = 1):
    """Non-trivial weight, bias and running statistics, so that every term is exercised."""
    rng = np.random.default_rng(seed)
    params = {
        "weight": jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=C), jnp.float32),
    }
    state = {
        "running_mean": jnp.asarray(rng.normal(size=C), jnp.float32),
        "running_var": jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32),
        "num_batches_tracked": jnp.asarray(3, jnp.int32),
    }
    return params, state


def _batch(layout: str, per_device: int = 2, seed: int = 0, mean: float = 0.0):
    """A global batch ``x`` and an upstream gradient ``dy``, float32, ``(8 * per_device, ...)``."""
    rng = np.random.default_rng(seed)
    shape = (D * per_device, C, 4, 5)
    # Channels with different means and scales.
    x = rng.normal(size=shape) * np.array([1.0, 2.0, 0.5])[:, None, None] + np.array(
        [0.5, -1.0, 3.0]
    )[:, None, None] + mean
    dy = rng.normal(size=shape)
    if layout == "NHWC":
        x, dy = x.transpose(0, 2, 3, 1), dy.transpose(0, 2, 3, 1)
    return x.astype(np.float32), dy.astype(np.float32)


def _split(a):
    """``(8 * n, ...)`` to ``(8, n, ...)``."""
    a = np.asarray(a)
    return a.reshape(D, a.shape[0] // D, *a.shape[1:])


def _concat(a):
    """``(8, n, ...)`` to ``(8 * n, ...)``."""
    a = np.asarray(a)
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _torch_reference(params, state, x, dy, axis):
    """``torch.nn.BatchNorm2d`` (``1d`` for ``(N, C)``) in training on ``x``: ``(y, state, dx,
    dweight, dbias)``, numpy.

    The loss is ``sum(y * dy)``, differentiated by PyTorch's autograd.
    """
    to_nchw = (lambda a: a) if axis == 1 else (lambda a: np.moveaxis(a, -1, 1))
    from_nchw = (lambda a: a) if axis == 1 else (lambda a: np.moveaxis(a, 1, -1))
    layer = torch.nn.BatchNorm2d if x.ndim == 4 else torch.nn.BatchNorm1d
    bn = layer(C, eps=EPS, momentum=MOMENTUM)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(np.asarray(params["weight"])))
        bn.bias.copy_(torch.tensor(np.asarray(params["bias"])))
        bn.running_mean.copy_(torch.tensor(np.asarray(state["running_mean"])))
        bn.running_var.copy_(torch.tensor(np.asarray(state["running_var"])))
        bn.num_batches_tracked.fill_(int(state["num_batches_tracked"]))
    bn.train()
    xt = torch.from_numpy(np.ascontiguousarray(to_nchw(x))).requires_grad_(True)
    y = bn(xt)
    (y * torch.from_numpy(np.ascontiguousarray(to_nchw(dy)))).sum().backward()
    new_state = {
        "running_mean": bn.running_mean.numpy(),
        "running_var": bn.running_var.numpy(),
        "num_batches_tracked": bn.num_batches_tracked.numpy(),
    }
    return (
        from_nchw(y.detach().numpy()),
        new_state,
        from_nchw(xt.grad.numpy()),
        bn.weight.grad.numpy(),
        bn.bias.grad.numpy(),
    )


def _loss(params, state, x, dy, axis, axis_name=None, mask=None, axis_index_groups=None):
    y, new_state = jbn.batch_norm(
        params, state, x, True, axis=axis, eps=EPS, momentum=MOMENTUM,
        axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask,
    )
    return jnp.sum(y * dy), (y, new_state)


_grad_loss = jax.grad(_loss, argnums=(0, 2), has_aux=True)


def _single_device(params, state, x, dy, axis):
    """``jbn.batch_norm`` on the whole batch on one device: ``(y, state, dx, dweight, dbias)``."""
    (gp, gx), (y, new_state) = jax.jit(_grad_loss, static_argnums=4)(params, state, x, dy, axis)
    return y, new_state, gx, gp["weight"], gp["bias"]


def _assert_same_on_every_device(tree):
    for leaf in jax.tree.leaves(tree):
        leaf = np.asarray(leaf)
        for d in range(1, leaf.shape[0]):
            np.testing.assert_array_equal(leaf[d], leaf[0])


def _run_pmap(params, state, x, dy, axis, mask=None, axis_index_groups=None):
    """Per-device values under ``jax.pmap``; the gradient of the parameters is the LOCAL one.

    Inside ``pmap`` each device differentiates its own ``sum(y * dy)``. The transpose
    of the ``all_gather`` sums the cotangents of every device, so ``dx`` is the global
    gradient, while ``weight`` and ``bias`` (replicated inputs) get this device's
    contribution only: their sum over the devices is the global gradient.
    """

    def step(params, x, dy, mask):
        return _grad_loss(params, state, x, dy, axis, AXIS, mask, axis_index_groups)

    if mask is None:
        step = jax.tree_util.Partial(lambda f, params, x, dy: f(params, x, dy, None), step)
        args = (params, _split(x), _split(dy))
    else:
        args = (params, _split(x), _split(dy), _split(mask))
    in_axes = (None,) + (0,) * (len(args) - 1)
    (gp, gx), (y, new_state) = jax.pmap(step, axis_name=AXIS, in_axes=in_axes)(*args)
    return y, new_state, gx, gp


def _run_shard_map(params, state, x, dy, axis, mask=None):
    """``shard_map`` over a mesh of 8 devices, differentiated from outside: global gradients."""

    def body(params, x, dy, mask):
        loss, (y, new_state) = _loss(params, state, x, dy, axis, AXIS, mask)
        # One copy of the new state per device, to check that they agree.
        return loss[None], y, jax.tree.map(lambda v: v[None], new_state)

    mapped = _shard_map(
        body, mesh=_mesh(), in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
        out_specs=(P(AXIS), P(AXIS), P(AXIS)),
    )

    def total(params, x, dy, mask):
        losses, y, new_state = mapped(params, x, dy, mask)
        return jnp.sum(losses), (y, new_state)

    if mask is None:
        mask = np.ones(x.shape[:1] + (1,) * (x.ndim - 2), bool)
    grad = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))
    (gp, gx), (y, new_state) = grad(params, x, dy, mask)
    return y, new_state, gx, gp


def _run_vmap(params, state, x, dy, axis, mask=None):
    """``jax.vmap`` with ``axis_name`` over 8 groups of examples, differentiated from outside."""

    def total(params, x, dy, mask):
        losses, (y, new_state) = jax.vmap(
            lambda x, dy, mask: _loss(params, state, x, dy, axis, AXIS, mask),
            axis_name=AXIS, in_axes=(0, 0, None if mask is None else 0),
        )(x, dy, mask)
        return jnp.sum(losses), (y, new_state)

    grad = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))
    (gp, gx), (y, new_state) = grad(
        params, _split(x), _split(dy), None if mask is None else _split(mask)
    )
    return _concat(y), new_state, _concat(gx), gp


def _assert_state_close(got, want, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(got["running_mean"], want["running_mean"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(got["running_var"], want["running_var"], rtol=rtol, atol=atol)
    assert int(got["num_batches_tracked"]) == int(want["num_batches_tracked"])


def _assert_matches(got, want, *, rtol=1e-5, atol=1e-5):
    """``(y, state, dx, dweight, dbias)`` against a reference, in that order."""
    y, state, gx, gw, gb = got
    ry, rstate, rgx, rgw, rgb = want
    np.testing.assert_allclose(y, ry, rtol=rtol, atol=atol)
    _assert_state_close(state, rstate)
    np.testing.assert_allclose(gx, rgx, rtol=rtol, atol=atol)
    np.testing.assert_allclose(gw, rgw, rtol=rtol, atol=10 * atol)  # sums of 160 terms
    np.testing.assert_allclose(gb, rgb, rtol=rtol, atol=10 * atol)


def _assert_global_batch(got, params, state, x, dy, axis):
    """``got`` is batch norm of the whole (global) batch: jbn's on one device and torch's."""
    _assert_matches(got, _single_device(params, state, x, dy, axis), rtol=1e-5, atol=1e-6)
    _assert_matches(got, _torch_reference(params, state, x, dy, axis))


# --- pmap, shard_map, vmap: the global batch --------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pmap_equals_global_batch_and_torch(layout):
    axis = LAYOUTS[layout]
    params, state = _variables()
    x, dy = _batch(layout)
    y, new_state, gx, gp = _run_pmap(params, state, x, dy, axis)
    _assert_same_on_every_device(new_state)
    state0 = jax.tree.map(lambda v: v[0], new_state)
    # Summed over devices, the parameter gradients are the global ones.
    got = (_concat(y), state0, _concat(gx), gp["weight"].sum(0), gp["bias"].sum(0))
    _assert_global_batch(got, params, state, x, dy, axis)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pmap_parameter_gradient_is_each_devices_contribution(layout):
    axis = LAYOUTS[layout]
    params, state = _variables()
    x, dy = _batch(layout)
    y, _, _, gp = _run_pmap(params, state, x, dy, axis)
    cshape = [1] * x.ndim
    cshape[axis] = C
    weight = np.asarray(params["weight"]).reshape(cshape)
    bias = np.asarray(params["bias"]).reshape(cshape)
    # x normalized with the GLOBAL statistics, from torch's output on the global batch.
    ty = _torch_reference(params, state, x, dy, axis)[0]
    x_hat = _split((ty - bias) / weight)
    reduced = tuple(i + 1 for i in range(x.ndim) if i != axis % x.ndim)
    dy_local = _split(dy)
    np.testing.assert_allclose(gp["weight"], (dy_local * x_hat).sum(reduced), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gp["bias"], dy_local.sum(reduced), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("style", ["shard_map", "vmap"])
def test_shard_map_and_vmap_with_axis_name_equal_global_batch_and_torch(style, layout):
    axis = LAYOUTS[layout]
    params, state = _variables()
    x, dy = _batch(layout)
    run = {"shard_map": _run_shard_map, "vmap": _run_vmap}[style]
    y, new_state, gx, gp = run(params, state, x, dy, axis)
    _assert_same_on_every_device(new_state)
    state0 = jax.tree.map(lambda v: v[0], new_state)
    got = (y, state0, gx, gp["weight"], gp["bias"])
    _assert_global_batch(got, params, state, x, dy, axis)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_map_with_its_replication_check_returns_the_state_replicated(layout):
    # shard_map's default check_vma: the new state leaves as one value (P()), as flax's
    # pmean-synced batch norm's does, with the global batch's values and gradients.
    axis = LAYOUTS[layout]
    params, state = _variables()
    x, dy = _batch(layout)

    def body(params, x, dy):
        loss, (y, new_state) = _loss(params, state, x, dy, axis, AXIS)
        return loss[None], y, new_state

    mapped = _shard_map(body, mesh=_mesh(), in_specs=(P(), P(AXIS), P(AXIS)),
                        out_specs=(P(AXIS), P(AXIS), P()))

    def total(params, x, dy):
        losses, y, new_state = mapped(params, x, dy)
        return jnp.sum(losses), (y, new_state)

    grad = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))
    (gp, gx), (y, new_state) = grad(params, x, dy)
    _assert_global_batch((y, new_state, gx, gp["weight"], gp["bias"]), params, state, x, dy, axis)
    forward = jax.jit(mapped).lower(params, x, dy).compile().as_text()
    assert _collectives(forward) == ["all-gather"]


def test_sync_modules_under_shard_map_return_replicated_state_with_the_replication_check():
    from flax import nnx

    from jbn import nnx as jnnx

    x = np.moveaxis(_batch("NCHW", mean=50.0)[0], 1, -1)
    model = jbn.SyncBatchNorm(C, axis=-1, axis_name=AXIS)
    variables = model.init(jax.random.key(0), x, train=False)
    step = _shard_map(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                      mesh=_mesh(), in_specs=(P(), P(AXIS)), out_specs=(P(AXIS), P()))
    y, updates = jax.jit(step)(variables, x)
    ref_y, ref_updates = jbn.BatchNorm2d(C, axis=-1).apply(
        variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    _assert_trees_close(updates, ref_updates)

    layer = jnnx.SyncBatchNorm(C, axis=-1, axis_name=AXIS)
    nnx.jit(lambda m, x: nnx.shard_map(lambda m, x: m(x), mesh=_mesh(), in_specs=(P(), P(AXIS)),
                                       out_specs=P(AXIS))(m, x))(layer, x)
    reference = jnnx.BatchNorm2d(C, axis=-1)
    reference(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_allclose(getattr(layer, name)[...], getattr(reference, name)[...],
                                   rtol=1e-5, atol=1e-6)


def _run_two_level(outer, params, state, x, dy, axis):
    """A tuple ``axis_name=("outer", "inner")`` over 2 x 4 devices, ``n`` examples each.

    ``outer`` is ``pmap``, ``vmap`` or a 2 x 4 ``shard_map`` mesh; the inner map is ``vmap``
    (a mesh axis for ``shard_map``). Returns ``(y, per-device states, dx, dweight, dbias)``
    with the global batch's gradients, the devices in row-major order.
    """
    names = ("outer", "inner")
    if outer == "shard_map":
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), names)

        def body(params, x, dy):
            loss, (y, new_state) = _loss(params, state, x, dy, axis, names)
            return loss[None], y, jax.tree.map(lambda v: v[None], new_state)

        mapped = _shard_map(
            body, mesh=mesh, in_specs=(P(), P(names), P(names)),
            out_specs=(P(names), P(names), P(names)),
        )

        def total(params, x, dy):
            losses, y, new_state = mapped(params, x, dy)
            return jnp.sum(losses), (y, new_state)

        (gp, gx), (y, new_state) = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))(
            params, x, dy
        )
        return y, new_state, gx, gp["weight"], gp["bias"]

    def step(params, x, dy):
        def total(params, x, dy):
            losses, aux = jax.vmap(
                lambda x, dy: _loss(params, state, x, dy, axis, names), axis_name="inner"
            )(x, dy)
            return jnp.sum(losses), aux

        return jax.grad(total, argnums=(0, 1), has_aux=True)(params, x, dy)

    if outer == "pmap":
        mapped = jax.pmap(step, axis_name="outer", in_axes=(None, 0, 0))
    else:
        mapped = jax.jit(jax.vmap(step, axis_name="outer", in_axes=(None, 0, 0)))
    nest = lambda a: a.reshape(2, 4, a.shape[0] // D, *a.shape[1:])  # noqa: E731
    (gp, gx), (y, new_state) = mapped(params, nest(x), nest(dy))
    flat = lambda a: np.asarray(a).reshape(-1, *np.asarray(a).shape[2:])  # noqa: E731
    # Each outer index differentiated its own part: the sum is the global gradient.
    return (
        _concat(flat(y)), jax.tree.map(flat, new_state), _concat(flat(gx)),
        gp["weight"].sum(0), gp["bias"].sum(0),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("outer", ["pmap", "vmap", "shard_map"])
def test_tuple_axis_name_over_two_map_levels_equals_global_batch_and_torch(outer, layout):
    # jax.lax.all_gather over a tuple that holds a vmap axis fails inside pmap or vmap.
    axis = LAYOUTS[layout]
    params, state = _variables()
    x, dy = _batch(layout)
    y, new_state, gx, gw, gb = _run_two_level(outer, params, state, x, dy, axis)
    _assert_same_on_every_device(new_state)
    state0 = jax.tree.map(lambda v: v[0], new_state)
    _assert_global_batch((y, state0, gx, gw, gb), params, state, x, dy, axis)


def test_axis_name_given_as_a_list_equals_the_tuple():
    params, state = _variables()
    x = _batch("NHWC")[0].reshape(2, 4, 2, 4, 5, C)

    def run(names):
        f = lambda x: jbn.batch_norm(params, state, x, True, axis=-1, axis_name=names)  # noqa: E731
        return jax.vmap(jax.vmap(f, axis_name="inner"), axis_name="outer")(x)

    got, want = run(["outer", "inner"]), run(("outer", "inner"))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)
    # ... and both are the global batch's statistics.
    _, global_state = jbn.batch_norm(params, state, x.reshape(-1, 4, 5, C), True, axis=-1)
    np.testing.assert_allclose(got[1]["running_var"][1, 3], global_state["running_var"], rtol=1e-6)


@pytest.mark.parametrize("style", ["pmap", "vmap"])
def test_one_feature_vector_per_device_equals_the_global_batch_and_torch(style):
    # A model written for one example, (C,), mapped over the batch with axis_name.
    params, state = _variables()
    x = np.random.default_rng(5).normal(size=(D, C)).astype(np.float32) * 2 + 3
    dy = np.random.default_rng(6).normal(size=(D, C)).astype(np.float32)

    def step(params, x, dy):
        (gp, gx), (y, new_state) = _grad_loss(params, state, x, dy, 0, AXIS)
        return y, new_state, gx, gp

    if style == "pmap":
        y, new_state, gx, gp = jax.pmap(step, axis_name=AXIS, in_axes=(None, 0, 0))(params, x, dy)
    else:
        y, new_state, gx, gp = jax.jit(jax.vmap(step, axis_name=AXIS, in_axes=(None, 0, 0)))(
            params, x, dy)
    _assert_same_on_every_device(new_state)
    state0 = jax.tree.map(lambda v: v[0], new_state)
    got = (y, state0, gx, gp["weight"].sum(0), gp["bias"].sum(0))
    _assert_matches(got, _torch_reference(params, state, x, dy, 1))


def test_evaluation_under_pmap_uses_running_statistics_without_communicating():
    params, state = _variables()
    x, _ = _batch("NCHW")
    y = jax.pmap(
        lambda x: jbn.batch_norm(params, state, x, False, axis_name=AXIS)[0], axis_name=AXIS
    )(_split(x))
    bn = torch.nn.BatchNorm2d(C).eval()
    bn.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in
                        jbn.to_torch_state_dict({"params": params, "batch_stats": state}).items()})
    with torch.no_grad():
        np.testing.assert_allclose(
            _concat(y), bn(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6
        )


# --- unequal per-device batches ----------------------------------------------------------

# Valid examples per device out of 4; device 4 holds none.
VALID = (4, 3, 2, 1, 0, 4, 2, 3)


def _masked_batch():
    x, dy = _batch("NCHW", per_device=4, seed=3)
    mask = np.zeros((D, 4), bool)
    for d, n in enumerate(VALID):
        mask[d, :n] = True
    mask = mask.reshape(-1)
    # Padding garbage that must not enter the statistics.
    x[~mask] = 1e6
    dy[~mask] = 0.0  # the loss counts valid examples only
    return x, dy, mask


@pytest.mark.parametrize("style", ["pmap", "shard_map", "vmap"])
def test_unequal_batches_with_mask_equal_the_valid_global_batch(style):
    params, state = _variables()
    x, dy, valid = _masked_batch()
    mask = valid[:, None, None]  # (N, 1, 1) for NCHW
    if style == "pmap":
        y, new_state, gx, gp = _run_pmap(params, state, x, dy, 1, mask=mask)
        y, gx = _concat(y), _concat(gx)
        gp = jax.tree.map(lambda g: g.sum(0), gp)
    else:
        run = _run_shard_map if style == "shard_map" else _run_vmap
        y, new_state, gx, gp = run(params, state, x, dy, 1, mask=mask)
    _assert_same_on_every_device(new_state)
    state0 = jax.tree.map(lambda v: v[0], new_state)
    for leaf in jax.tree.leaves((y, new_state, gx, gp)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
    ry, rstate, rgx, rgw, rgb = _torch_reference(params, state, x[valid], dy[valid], 1)
    got = (np.asarray(y)[valid], state0, np.asarray(gx)[valid], gp["weight"], gp["bias"])
    _assert_matches(got, (ry, rstate, rgx, rgw, rgb))
    # Padding examples neither enter the statistics nor receive a gradient.
    np.testing.assert_array_equal(np.asarray(gx)[~valid], 0.0)


def test_device_without_valid_values_gets_finite_outputs_and_global_state():
    params, state = _variables()
    x, _, valid = _masked_batch()
    mask = _split(valid[:, None, None])

    def fwd(x, mask):
        return jbn.batch_norm(params, state, x, True, axis_name=AXIS, mask=mask)

    y, new_state = jax.pmap(fwd, axis_name=AXIS)(_split(x), mask)
    assert VALID[4] == 0
    _, rstate, _, _, _ = _torch_reference(params, state, x[valid], x[valid], 1)
    _assert_state_close(jax.tree.map(lambda v: v[4], new_state), rstate)
    assert np.all(np.isfinite(np.asarray(y[4])))


# --- numerical stability -----------------------------------------------------------------


def test_synced_statistics_are_stable_at_mean_1e4():
    rng = np.random.default_rng(7)
    x = (1e4 + rng.normal(size=(D * 4, C, 6, 6))).astype(np.float32)
    params, state = jbn.init(C)

    def fwd(x):
        return jbn.batch_norm(params, state, x, True, axis_name=AXIS)

    y, new_state = jax.pmap(fwd, axis_name=AXIS)(_split(x))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3))
    var = x64.var(axis=(0, 2, 3))
    ref = (x64 - mean[:, None, None]) / np.sqrt(var[:, None, None] + EPS)
    assert np.max(np.abs(_concat(y) - ref)) <= 2e-6
    n = x.size // C
    np.testing.assert_allclose(new_state["running_mean"][0], 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(
        new_state["running_var"][0], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-6
    )


# --- axis_index_groups --------------------------------------------------------------------


@pytest.mark.parametrize(
    "groups",
    [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1], [2, 3], [4, 5], [6, 7]]],
    ids=["2x4", "4x2"],
)
def test_axis_index_groups_normalize_each_group_alone(groups):
    params, state = _variables()
    x, dy = _batch("NCHW", seed=5)
    y, new_state, gx, gp = _run_pmap(params, state, x, dy, 1, axis_index_groups=groups)
    xs, dys = _split(x), _split(dy)
    for group in groups:
        gx_ = _concat(xs[group])
        gdy = _concat(dys[group])
        want = _torch_reference(params, state, gx_, gdy, 1)
        single = _single_device(params, state, gx_, gdy, 1)
        got = (
            _concat(y[np.array(group)]),
            jax.tree.map(lambda v: v[group[0]], new_state),
            _concat(gx[np.array(group)]),
            gp["weight"][np.array(group)].sum(0),
            gp["bias"][np.array(group)].sum(0),
        )
        _assert_same_on_every_device(jax.tree.map(lambda v: v[np.array(group)], new_state))
        _assert_matches(got, single, rtol=1e-5, atol=1e-6)
        _assert_matches(got, want)


def test_axis_index_groups_are_checked_against_the_devices_and_the_one_value_rule():
    params, state = _variables()
    x = np.ones((D, 1, C), np.float32)  # one value per channel on each device

    def run(groups, x=x, axis_name=AXIS):
        f = lambda x: jbn.batch_norm(params, state, x, True, axis_name=axis_name,  # noqa: E731
                                     axis_index_groups=groups)
        return jax.pmap(f, axis_name=AXIS)(x)

    # Groups of one device: one value per channel in each group, as torch's
    # SyncBatchNorm over a process group of one refuses.
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        run([[i] for i in range(D)])
    run([[0, 1, 2, 3], [4, 5, 6, 7]])  # two values per channel and group
    for bad in ([[0, 1, 2], [3, 4, 5, 6, 7]], [[0, 1], [2, 3]], [[0, 1, 2, 3], [3, 4, 5, 6]]):
        with pytest.raises(ValueError, match="axis_index_groups must divide the 8 devices"):
            run(bad)
    with pytest.raises(ValueError, match="pass axis_name too"):
        jbn.batch_norm(params, state, x[0], True, axis_index_groups=[[0]])


# --- plain jit over a sharded mesh --------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jit_over_sharded_batch_computes_global_statistics(layout):
    axis = LAYOUTS[layout]
    params, state = _variables()
    x, dy = _batch(layout)
    sharding = NamedSharding(_mesh(), P(AXIS))
    xs = jax.device_put(x, sharding)
    dys = jax.device_put(dy, sharding)
    assert len(xs.sharding.device_set) == D
    (gp, gx), (y, new_state) = jax.jit(_grad_loss, static_argnums=4)(params, state, xs, dys, axis)
    got = (y, new_state, gx, gp["weight"], gp["bias"])
    _assert_global_batch(got, params, state, x, dy, axis)


def _explicit_mesh():
    """The 8 devices as a mesh whose axis is explicit: shardings are part of array types."""
    if not hasattr(jax, "set_mesh"):
        pytest.skip("explicit sharding needs jax.set_mesh (jax >= 0.7)")
    from jax.sharding import AxisType

    return jax.make_mesh((D,), (AXIS,), axis_types=(AxisType.Explicit,))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_explicit_sharding_training_equals_global_batch_and_torch_without_gathering_it(layout):
    # With the batch split in its type, reshapes and slices across the split axis have
    # no sharding rule: batch norm must still train, keep y split as x was, and send
    # only per-channel values between devices.
    axis = LAYOUTS[layout]
    params, state = _variables()
    x, dy = _batch(layout)
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        split = NamedSharding(mesh, P(AXIS))
        xs, dys = jax.device_put(x, split), jax.device_put(dy, split)
        step = jax.jit(_grad_loss, static_argnums=4)
        (gp, gx), (y, new_state) = step(params, state, xs, dys, axis)
        hlo = step.lower(params, state, xs, dys, axis).compile().as_text()
    spec = jax.typeof(xs).sharding.spec
    assert spec[0] == AXIS
    assert jax.typeof(y).sharding.spec == jax.typeof(gx).sharding.spec == spec
    assert "all-gather" not in hlo and "all-reduce" in hlo
    got = (y, new_state, gx, gp["weight"], gp["bias"])
    _assert_global_batch(got, params, state, x, dy, axis)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_explicit_sharding_evaluation_and_module_equal_one_device(layout):
    axis = LAYOUTS[layout]
    params, state = _variables()
    x, _ = _batch(layout)
    model = jbn.BatchNorm2d(C, axis=axis)
    variables = {"params": params, "batch_stats": state}
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(AXIS)))
        evaluated = jax.jit(lambda x: jbn.batch_norm(params, state, x, False, axis=axis))(xs)
        # Without running statistics, evaluation uses the whole batch's statistics.
        untracked = jax.jit(lambda x: jbn.batch_norm(params, {}, x, False, axis=axis))(xs)
        trained = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, xs)
    single = (jax.jit(lambda x: jbn.batch_norm(params, state, x, False, axis=axis))(x),
              jax.jit(lambda x: jbn.batch_norm(params, {}, x, False, axis=axis))(x),
              jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
                  variables, x))
    got_all = jax.tree.leaves((evaluated, untracked, trained))
    for got, want in zip(got_all, jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_explicit_sharding_with_a_split_mask_equals_one_device():
    params, state = _variables()
    x, dy = _batch("NCHW")
    mask = np.random.default_rng(5).random((x.shape[0], *x.shape[2:])) > 0.3
    mesh = _explicit_mesh()
    step = jax.jit(lambda p, s, x, dy, m: _grad_loss(p, s, x, dy, 1, mask=m))
    with jax.set_mesh(mesh):
        split = NamedSharding(mesh, P(AXIS))
        got = step(params, state, *(jax.device_put(a, split) for a in (x, dy, mask)))
    want = step(params, state, x, dy, mask)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_explicit_sharding_vmap_over_split_groups_normalizes_each_group_on_its_device():
    # Ghost batch norm: vmap over groups of samples, the groups split across devices.
    # Each group is normalized on its own device, with no collective at all.
    params, state = _variables()
    x, _ = _batch("NCHW")
    groups = x.reshape(D, -1, *x.shape[1:])
    mesh = _explicit_mesh()
    fn = jax.jit(jax.vmap(lambda g: jbn.batch_norm(params, state, g, True)))
    with jax.set_mesh(mesh):
        split = jax.device_put(groups, NamedSharding(mesh, P(AXIS)))
        (y, new_state), hlo = fn(split), fn.lower(split).compile().as_text()
    assert jax.typeof(y).sharding.spec[0] == AXIS
    assert not _collectives(hlo)
    for a, b in zip(jax.tree.leaves((y, new_state)), jax.tree.leaves(fn(groups)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- collectives in the compiled program --------------------------------------------------

_COLLECTIVE = re.compile(
    r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all|collective-broadcast)"
    r"(-start)?\("
)


def _collectives(hlo_text: str) -> list[str]:
    return [m.group(1) for m in _COLLECTIVE.finditer(hlo_text)]


def _two_layers(train):
    """Two batch-norm layers in a row, as in a network."""
    params, state = _variables()

    def f(x):
        y, _ = jbn.batch_norm(params, state, x, train, axis_name=AXIS)
        y, s = jbn.batch_norm(params, state, jnp.tanh(y), train, axis_name=AXIS)
        return y, s

    return f


@pytest.mark.parametrize("train,expected", [(True, ["all-gather"] * 2), (False, [])])
def test_pmap_compiles_one_all_gather_per_layer_in_training_and_none_in_eval(train, expected):
    x = _split(_batch("NCHW")[0])
    text = jax.pmap(_two_layers(train), axis_name=AXIS).lower(x).compile().as_text()
    assert _collectives(text) == expected


@pytest.mark.parametrize("train,expected", [(True, ["all-gather"] * 2), (False, [])])
def test_shard_map_compiles_one_all_gather_per_layer_in_training_and_none_in_eval(
    train, expected
):
    def body(x):
        y, s = _two_layers(train)(x)
        return y, jax.tree.map(lambda v: v[None], s)

    mapped = _shard_map(body, mesh=_mesh(), in_specs=P(AXIS), out_specs=(P(AXIS), P(AXIS)))
    x = _batch("NCHW")[0]
    lowered = jax.jit(mapped).lower(x)
    assert lowered.as_text().count("stablehlo.all_gather") == len(expected)
    assert _collectives(lowered.compile().as_text()) == expected


# --- the SyncBatchNorm module -------------------------------------------------------------


def test_sync_batch_norm_requires_axis_name():
    with pytest.raises(ValueError, match="axis_name"):
        jbn.SyncBatchNorm(C)


def test_sync_batch_norm_outside_a_map_raises_name_error_naming_the_axis():
    model = jbn.SyncBatchNorm(C, axis_name=AXIS)
    x = jnp.ones((4, C, 2, 2))
    variables = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(NameError, match=AXIS):
        model.apply(variables, x, train=True, mutable=["batch_stats"])


@pytest.mark.parametrize("train", [False, True])
def test_sync_batch_norm_init_needs_no_bound_axis(train):
    model = jbn.SyncBatchNorm(C, axis_name=AXIS)
    variables = model.init(jax.random.key(0), jnp.ones((4, C, 2, 2)), train=train)
    np.testing.assert_array_equal(variables["params"]["weight"], np.ones(C))
    np.testing.assert_array_equal(variables["batch_stats"]["running_mean"], np.zeros(C))
    np.testing.assert_array_equal(variables["batch_stats"]["running_var"], np.ones(C))
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 0


def test_sync_batch_norm_training_under_pmap_updates_every_device_alike():
    model = jbn.SyncBatchNorm(C, axis_name=AXIS, momentum=MOMENTUM, eps=EPS)
    params, state = _variables()
    variables = {"params": params, "batch_stats": state}
    x, _ = _batch("NCHW")

    def step(x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    y, updates = jax.pmap(step, axis_name=AXIS)(_split(x))
    _assert_same_on_every_device(updates)
    ry, rstate, _, _, _ = _torch_reference(params, state, x, x, 1)
    np.testing.assert_allclose(_concat(y), ry, rtol=1e-5, atol=1e-5)
    _assert_state_close(jax.tree.map(lambda v: v[0], updates["batch_stats"]), rstate)


class _CNN(nn.Module):
    """Conv, batch norm, ReLU, twice, channels-last: SyncBatchNorm or unsynced BatchNorm2d."""

    sync: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        for i, features in enumerate((4, 6)):
            x = nn.Conv(features, (3, 3), use_bias=False, name=f"conv{i}")(x)
            if self.sync:
                bn = jbn.SyncBatchNorm(features, axis=-1, axis_name=AXIS, name=f"bn{i}")
            else:
                bn = jbn.BatchNorm2d(features, axis=-1, name=f"bn{i}")
            x = nn.relu(bn(x, train))
        return x


def _cnn_input():
    return np.random.default_rng(2).normal(size=(D * 2, 6, 6, 2)).astype(np.float32)


def _pmap_train(model, variables, x):
    def step(x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    y, updates = jax.pmap(step, axis_name=AXIS)(_split(x))
    _assert_same_on_every_device(updates)
    return _concat(y), jax.tree.map(lambda v: v[0], updates)


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def test_sync_batch_norm_in_a_model_under_pmap_equals_global_batch_batch_norm():
    x = _cnn_input()
    variables = _CNN().init(jax.random.key(0), x, train=False)
    y, updates = _pmap_train(_CNN(sync=True), variables, x)
    # The same layers unsynced, on the whole batch on one device.
    ref_y, ref_updates = _CNN().apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    _assert_trees_close(updates, ref_updates)


# --- convert_sync_batchnorm ---------------------------------------------------------------


def test_converted_model_has_the_models_variables():
    x = _cnn_input()
    want = _CNN().init(jax.random.key(0), x, train=False)
    got = jbn.convert_sync_batchnorm(_CNN(), AXIS).init(jax.random.key(0), x, train=False)
    _assert_trees_close(got, want, rtol=0, atol=0)


def test_converted_model_under_pmap_equals_sync_batch_norm_model_and_global_batch():
    x = _cnn_input()
    variables = _CNN().init(jax.random.key(0), x, train=False)
    y, updates = _pmap_train(jbn.convert_sync_batchnorm(_CNN(), AXIS), variables, x)
    sync_y, sync_updates = _pmap_train(_CNN(sync=True), variables, x)
    np.testing.assert_array_equal(y, sync_y)
    _assert_trees_close(updates, sync_updates, rtol=0, atol=0)
    ref_y, ref_updates = _CNN().apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    _assert_trees_close(updates, ref_updates)


def test_converted_model_gradients_under_vmap_equal_sync_batch_norm_and_global_batch():
    x = _cnn_input()
    model = _CNN()
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params, apply, x):
        y, _ = apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y))

    def synced_grad(apply):
        def total(params):
            losses = jax.vmap(lambda x: loss(params, apply, x), axis_name=AXIS)(_split(x))
            return jnp.sum(losses)

        return jax.jit(jax.grad(total))(variables["params"])

    got = synced_grad(jbn.convert_sync_batchnorm(model, AXIS).apply)
    _assert_trees_close(got, synced_grad(_CNN(sync=True).apply), rtol=0, atol=0)
    want = jax.jit(jax.grad(lambda p: loss(p, model.apply, x)))(variables["params"])
    # Each entry sums 576 float32 products with cancellation: compare relative to the
    # largest entry of each gradient (both sides are within 5e-6 of that from float64).
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.max(np.abs(w))))


class _Block(nn.Module):
    """Layers made in ``setup``, one of which already synchronizes over its own axis."""

    def setup(self):
        self.dense = nn.Dense(5)
        self.bn = jbn.BatchNorm1d(5)
        self.own = jbn.SyncBatchNorm(5, axis_name="inner")

    def __call__(self, x, train: bool):
        return self.own(self.bn(self.dense(x), train), train)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return _Block(name="block")(x, train)


def test_convert_reaches_setup_layers_and_keeps_an_existing_axis_name():
    # (outer, inner, N, features)
    x = np.random.default_rng(4).normal(size=(4, 2, 2, 3)).astype(np.float32)
    model = _Net()
    variables = model.init(jax.random.key(0), x[0, 0], train=False)
    converted = jbn.convert_sync_batchnorm(model, AXIS)

    def step(x):
        return converted.apply(variables, x, train=True, mutable=["batch_stats"])

    inner = jax.vmap(step, axis_name="inner")
    _, updates = jax.jit(jax.vmap(inner, axis_name=AXIS))(x)
    stats = updates["batch_stats"]["block"]
    dense = variables["params"]["block"]["dense"]
    h = x @ dense["kernel"] + dense["bias"]  # the input of bn, (outer, inner, N, 5)
    # bn (converted): statistics over the outer axis AXIS, one set per inner index.
    bn_mean = np.asarray(stats["bn"]["running_mean"])
    for i in range(2):
        want = 0.1 * h[:, i].reshape(-1, 5).mean(0)
        for o in range(4):
            np.testing.assert_allclose(bn_mean[o, i], want, rtol=1e-5, atol=1e-6)
    # own keeps its axis "inner": one set per outer index, shared by the inner pair.
    own_mean = np.asarray(stats["own"]["running_mean"])
    np.testing.assert_array_equal(own_mean[:, 0], own_mean[:, 1])
    assert not np.allclose(own_mean[0, 0], own_mean[1, 0])


def test_converting_twice_converts_the_original_to_the_last_axis():
    # torch's convert_sync_batchnorm of a converted model re-targets its layers to the
    # new process group; here, the last axis name.
    x = _cnn_input()
    variables = _CNN().init(jax.random.key(0), x, train=False)
    twice = jbn.convert_sync_batchnorm(jbn.convert_sync_batchnorm(_CNN(), "other"), AXIS)
    _assert_trees_close(twice.init(jax.random.key(0), x, train=False), variables, 0, 0)
    y, updates = _pmap_train(twice, variables, x)
    sync_y, sync_updates = _pmap_train(_CNN(sync=True), variables, x)
    np.testing.assert_array_equal(y, sync_y)
    _assert_trees_close(updates, sync_updates, rtol=0, atol=0)


def test_converted_model_in_training_outside_a_map_raises_name_error():
    x = _cnn_input()
    converted = jbn.convert_sync_batchnorm(_CNN(), AXIS)
    variables = converted.init(jax.random.key(0), x, train=False)
    with pytest.raises(NameError, match=AXIS):
        converted.apply(variables, x, train=True, mutable=["batch_stats"])
    # Evaluation does not synchronize.
    np.testing.assert_array_equal(
        converted.apply(variables, x, train=False), _CNN().apply(variables, x, train=False)
    )


def test_convert_requires_axis_name():
    with pytest.raises(ValueError, match="axis_name"):
        jbn.convert_sync_batchnorm(_CNN(), None)
