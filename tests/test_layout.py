"""The two-dimensional view used on the CPU and the plain N-d form used elsewhere agree.

CI runs on the CPU, where the matrix view is the default; these tests also run the
N-d form (the default on GPU and TPU) and hold both to a float64 oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn import _cpu_kernel, _layout

CASES = [
    ((256, 4), 1),  # BatchNorm1d on (N, C)
    ((8, 4, 33), 1),  # BatchNorm1d on (N, C, L)
    ((4, 4, 9, 7), 1),  # NCHW
    ((4, 9, 7, 4), 3),  # NHWC
    ((2, 4, 3, 5, 6), 1),  # NCDHW
    ((4, 9, 7), 0),  # unbatched (C, H, W)
    ((1, 4, 4), 1),  # before == 1 and after == C
    ((6, 4, 1, 1), 1),  # channels followed by size-1 axes only
]


@pytest.fixture(params=[True, False], ids=["matrix", "nd"])
def matrix(request, monkeypatch):
    monkeypatch.setattr(_layout, "default_on_cpu", lambda: request.param)
    return request.param


def _float64_normalize(x: np.ndarray, axis: int, eps: float = 1e-5) -> np.ndarray:
    x = np.asarray(x, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis)
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)


@pytest.mark.parametrize("shape, axis", CASES)
def test_both_views_are_within_2e_6_of_float64_at_a_large_mean(matrix, shape, axis):
    x = (np.random.default_rng(1).standard_normal(shape) * 3 + 1e4).astype(np.float32)
    params, state = jbn.init(shape[axis])
    y, new = jax.jit(lambda x: jbn.batch_norm(params, state, x, True, axis=axis))(x)
    assert np.abs(np.asarray(y, np.float64) - _float64_normalize(x, axis)).max() <= 2e-6
    axes = tuple(i for i in range(x.ndim) if i != axis)
    np.testing.assert_allclose(new["running_mean"], 0.1 * x.astype(np.float64).mean(axes),
                               rtol=1e-6)
    view = _layout.RowView.of(shape, axis)
    assert view.matrix == (matrix and view.after > 1)


@pytest.mark.parametrize("shape, axis", CASES)
def test_views_compute_the_same_function_and_gradients(monkeypatch, shape, axis):
    # In float64, where the views' different orders of addition do not show: the
    # float32 accuracy of each view is the previous test's.
    with jax.enable_x64(True):
        _compare_views(monkeypatch, shape, axis)


def _compare_views(monkeypatch, shape, axis):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(shape) + 2, jnp.float64)
    dy = jnp.asarray(rng.standard_normal(shape), jnp.float64)
    mask = jnp.asarray(rng.random(shape[:axis] + shape[axis + 1:]) < 0.7)
    params, state = jbn.init(shape[axis], dtype=jnp.float64)
    params = {"weight": params["weight"] * 1.5, "bias": params["bias"] + 0.25}

    def run(on_cpu: bool, train: bool, use_mask: bool):
        monkeypatch.setattr(_layout, "default_on_cpu", lambda: on_cpu)

        def f(p, x):
            return jbn.batch_norm(p, state, x, train, axis=axis,
                                  mask=mask if use_mask else None)

        (y, new), vjp = jax.vjp(f, params, x)
        return y, new, vjp((dy, jax.tree.map(jnp.zeros_like, new)))

    for train, use_mask in [(True, False), (True, True), (False, False)]:
        ours, theirs = run(True, train, use_mask), run(False, train, use_mask)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "xla"])
@pytest.mark.parametrize("use_mask", [False, True], ids=["all", "mask"])
@pytest.mark.parametrize("shape, axis", [((4, 4, 9, 7), 1), ((4, 9, 7, 4), 3)])
def test_bfloat16_input_differentiates_as_its_float32_values(monkeypatch, matrix, shape, axis,
                                                             use_mask, kernel):
    # bfloat16 is computed in float32; on the CPU its statistics take other paths:
    # jbn's kernel reading bfloat16, or without it the shifted input written once,
    # each with its own derivative rule. Values and first- and second-order
    # derivatives must equal those of the same values given in float32.
    if not kernel:
        monkeypatch.setattr(_cpu_kernel, "available", lambda: False)
    rng = np.random.default_rng(3)
    x16 = jnp.asarray(rng.standard_normal(shape) * 2 + 5, jnp.bfloat16)
    x32 = x16.astype(jnp.float32)
    t16 = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    mask = jnp.asarray(rng.random(shape[:axis] + shape[axis + 1:]) < 0.7) if use_mask else None
    params, state = jbn.init(shape[axis])
    params = {"weight": params["weight"] * 1.5, "bias": params["bias"] + 0.25}

    def f(p, x):
        y, _ = jbn.batch_norm(p, state, x, True, axis=axis, mask=mask, dtype=jnp.float32)
        return y

    def loss(p, x):
        return jnp.sum(f(p, x) * dy)

    def check(a, b, rtol):
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32),
                                       rtol=rtol, atol=rtol)

    check(f(params, x16), f(params, x32), 1e-6)
    g16, g32 = jax.grad(loss, (0, 1))(params, x16), jax.grad(loss, (0, 1))(params, x32)
    check(g16[0], g32[0], 1e-5)
    check(g16[1], g32[1].astype(jnp.bfloat16), 2**-7)  # the input's gradient is in its dtype
    check(jax.jvp(lambda x: f(params, x), (x16,), (t16,))[1],
          jax.jvp(lambda x: f(params, x), (x32,), (t16.astype(jnp.float32),))[1], 1e-5)

    def weight_grad(x):
        return jax.grad(loss)(params, x)["weight"]

    check(jax.jvp(weight_grad, (x16,), (t16,))[1],
          jax.jvp(weight_grad, (x32,), (t16.astype(jnp.float32),))[1], 1e-4)
