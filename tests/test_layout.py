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
from jbn import _layout

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
    monkeypatch.setattr(_layout, "_on_cpu", lambda: request.param)
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
        monkeypatch.setattr(_layout, "_on_cpu", lambda: on_cpu)

        def f(p, x):
            return jbn.batch_norm(p, state, x, train, axis=axis,
                                  mask=mask if use_mask else None)

        (y, new), vjp = jax.vjp(f, params, x)
        return y, new, vjp((dy, jax.tree.map(jnp.zeros_like, new)))

    for train, use_mask in [(True, False), (True, True), (False, False)]:
        ours, theirs = run(True, train, use_mask), run(False, train, use_mask)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
