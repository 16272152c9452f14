"""Masked statistics: padded sequences normalize exactly like the unpadded valid positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn

RTOL, ATOL = 1e-5, 1e-5
C, L = 3, 7


def _padded(lengths, seed=0):
    """(N, C, L) sequences of the given lengths, padding filled with large junk, and the mask."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    x = (rng.normal(size=(n, C, L)) * [[2.0], [0.5], [3.0]] + [[1.0], [-4.0], [10.0]])
    mask = np.arange(L)[None, :] < np.asarray(lengths)[:, None]  # (N, L)
    x = np.where(mask[:, None, :], x, 1e3)
    return x.astype(np.float32), mask


def _valid(x, mask):
    """The valid positions of (N, C, L) as torch's (M, C) batch."""
    return np.moveaxis(x, 1, -1)[mask]


def _torch_bn():
    bn = torch.nn.BatchNorm1d(C)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, 0.3]))
    return bn


def _params(tbn):
    return {"weight": jnp.asarray(tbn.weight.detach().numpy()),
            "bias": jnp.asarray(tbn.bias.detach().numpy())}


def _assert_state(state, tbn):
    np.testing.assert_allclose(state["running_mean"], tbn.running_mean.numpy(), RTOL, ATOL)
    np.testing.assert_allclose(state["running_var"], tbn.running_var.numpy(), RTOL, ATOL)
    assert int(state["num_batches_tracked"]) == int(tbn.num_batches_tracked)


def test_training_steps_use_only_valid_positions_like_torch_on_unpadded_data():
    tbn = _torch_bn()
    params, state = _params(tbn), jbn.init(C)[1]
    step = jax.jit(lambda s, x, m: jbn.batch_norm(params, s, x, True, mask=m))
    # An all-padding batch is torch's empty batch: counted, the statistics kept.
    for seed, lengths in enumerate([(5, 3, 7, 1), (0, 0, 0, 0), (2, 7, 4, 6), (7, 1, 1, 3)]):
        x, mask = _padded(lengths, seed)
        y, state = step(state, jnp.asarray(x), jnp.asarray(mask))
        expected = tbn(torch.from_numpy(_valid(x, mask))).detach().numpy()
        np.testing.assert_allclose(_valid(np.asarray(y), mask), expected, RTOL, ATOL)
        _assert_state(state, tbn)
    tbn.eval()
    x, mask = _padded((4, 4, 4, 4), seed=9)
    y, _ = jbn.batch_norm(params, state, jnp.asarray(x), False)
    expected = tbn(torch.from_numpy(_valid(x, mask))).detach().numpy()
    np.testing.assert_allclose(_valid(np.asarray(y), mask), expected, RTOL, ATOL)


def test_input_gradient_at_valid_positions_matches_torch():
    x, mask = _padded((5, 3, 7, 2))
    tbn = _torch_bn()
    tx = torch.from_numpy(_valid(x, mask)).requires_grad_()
    w = np.random.default_rng(1).normal(size=tx.shape).astype(np.float32)
    (tbn(tx) * torch.from_numpy(w)).sum().backward()
    params = _params(tbn)
    w_padded = np.zeros((x.shape[0], L, C), np.float32)
    w_padded[mask] = w  # loss on valid outputs only

    def loss(x):
        y, _ = jbn.batch_norm(params, jbn.init(C)[1], x, True, mask=jnp.asarray(mask))
        return jnp.sum(jnp.moveaxis(y, 1, -1) * w_padded)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(x)))
    np.testing.assert_allclose(_valid(grad, mask), tx.grad.numpy(), 1e-4, 1e-5)
    np.testing.assert_array_equal(np.moveaxis(grad, 1, -1)[~mask], 0)


def test_linen_module_mask_argument_and_channels_last():
    x, mask = _padded((6, 2, 7, 4))
    tbn = _torch_bn()
    expected = tbn(torch.from_numpy(_valid(x, mask))).detach().numpy()
    variables = {"params": _params(tbn), "batch_stats": jbn.init(C)[1]}
    for axis, xs in ((1, x), (-1, np.moveaxis(x, 1, -1))):
        y, updates = jbn.BatchNorm1d(C, axis=axis).apply(
            variables, jnp.asarray(xs), train=True, mask=jnp.asarray(mask),
            mutable=["batch_stats"])
        y = np.asarray(y) if axis == 1 else np.moveaxis(np.asarray(y), -1, 1)
        np.testing.assert_allclose(_valid(y, mask), expected, RTOL, ATOL)
        _assert_state(updates["batch_stats"], tbn)


def test_per_sample_mask_broadcasts_and_drops_whole_samples():
    x, _ = _padded((7, 7, 7, 7, 7))
    keep = np.array([True, False, True, True, False])
    tbn = _torch_bn()
    expected = tbn(torch.from_numpy(x[keep])).detach().numpy()
    y, state = jbn.batch_norm(_params(tbn), jbn.init(C)[1], jnp.asarray(x), True,
                              mask=jnp.asarray(keep[:, None]))
    np.testing.assert_allclose(np.asarray(y)[keep], expected, RTOL, ATOL)
    _assert_state(state, tbn)


@pytest.mark.parametrize("lengths", [
    [(5, 3), (7, 1), (2, 6), (4, 4)],
    [(5, 3), (0, 0), (2, 6), (1, 0)],  # a device without any valid position
    [(0, 0), (0, 0), (0, 0), (0, 0)],  # no valid position anywhere: torch's empty batch
], ids=["all-devices-valid", "one-device-empty", "all-devices-empty"])
def test_masked_sync_under_vmap_equals_unpadded_global_batch(lengths):
    parts = [_padded(ls, seed) for seed, ls in enumerate(lengths)]
    xs = np.stack([p[0] for p in parts])  # (D, N, C, L)
    masks = np.stack([p[1] for p in parts])  # (D, N, L)
    tbn = _torch_bn()
    global_valid = np.concatenate([_valid(x, m) for x, m in parts])
    expected = tbn(torch.from_numpy(global_valid)).detach().numpy()
    params = _params(tbn)

    def step(x, m):
        return jbn.batch_norm(params, jbn.init(C)[1], x, True, mask=m, axis_name="d")

    ys, states = jax.vmap(step, axis_name="d")(jnp.asarray(xs), jnp.asarray(masks))
    got = np.concatenate([_valid(np.asarray(y), m) for y, m in zip(ys, masks)])
    np.testing.assert_allclose(got, expected, RTOL, ATOL)
    for d in range(len(lengths)):
        _assert_state(jax.tree.map(lambda a: a[d], states), tbn)


def test_masked_sync_under_pmap_equals_unpadded_global_batch():
    devices = 4
    parts = [_padded(ls, seed) for seed, ls in enumerate([(5, 3), (7, 1), (2, 6), (4, 0)])]
    xs = np.stack([p[0] for p in parts])
    masks = np.stack([p[1] for p in parts])
    tbn = _torch_bn()
    expected = tbn(torch.from_numpy(np.concatenate([_valid(x, m) for x, m in parts])))
    params = _params(tbn)
    step = jax.pmap(lambda x, m: jbn.batch_norm(params, jbn.init(C)[1], x, True, mask=m,
                                                axis_name="d"),
                    axis_name="d", devices=jax.devices()[:devices])
    ys, states = step(jnp.asarray(xs), jnp.asarray(masks))
    got = np.concatenate([_valid(np.asarray(y), m) for y, m in zip(ys, masks)])
    np.testing.assert_allclose(got, expected.detach().numpy(), RTOL, ATOL)
    _assert_state(jax.tree.map(lambda a: a[0], states), tbn)


@pytest.mark.parametrize("padding", [1e20, np.nan], ids=["huge", "nan"])
def test_device_without_valid_values_contributes_nothing_whatever_its_padding(padding):
    parts = [_padded(ls, seed) for seed, ls in enumerate([(0, 0), (5, 3), (7, 2)])]
    xs = np.stack([p[0] for p in parts])
    xs[0] = padding  # the empty device's whole batch
    masks = np.stack([p[1] for p in parts])
    tbn = _torch_bn()
    expected = tbn(torch.from_numpy(np.concatenate([_valid(x, m) for x, m in zip(xs, masks)])))
    params = _params(tbn)

    def step(x, m):
        return jbn.batch_norm(params, jbn.init(C)[1], x, True, mask=m, axis_name="d")

    ys, states = jax.vmap(step, axis_name="d")(jnp.asarray(xs), jnp.asarray(masks))
    got = np.concatenate([_valid(np.asarray(y), m) for y, m in zip(ys, masks)])
    np.testing.assert_allclose(got, expected.detach().numpy(), RTOL, ATOL)
    for d in range(3):
        _assert_state(jax.tree.map(lambda a: a[d], states), tbn)
