"""jbn's CPU kernel for the shifted sums: its values, and batch norm with it and without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn import _cpu_kernel


@pytest.fixture
def kernel():
    """Skips on backends other than the CPU (the kernel is CPU-only)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the kernel runs on the CPU only")
    return _cpu_kernel


@pytest.fixture
def without_kernel(monkeypatch):
    """Makes jbn take its pure-XLA path, as where the kernel was not built."""
    monkeypatch.setattr(_cpu_kernel, "available", lambda: False)


def test_the_kernel_is_built_on_a_machine_with_a_compiler(kernel):
    # Installation goes on without it (an optional extension), so only a test says
    # that it was lost: jbn would then be slower on the CPU, with the same values.
    assert kernel.available(), "jbn._shifted_sums was not built: is a C++ compiler installed?"


# (P, C, Q): rows (NCHW as (N, C, H * W)), channels last ((N * H * W, C, 1)), and
# lengths that leave tails after the kernel's blocks of 256 values and 32 rows, or
# rows shorter than 8 (the shift then takes values from several).
SHAPES = [(2, 5, 3136), (3, 4, 1000), (4, 2, 7), (6272, 64, 1), (33, 3, 1), (70, 5, 1),
          (1, 2, 1), (3, 7, 49), (5, 3, 3)]


def _corner_mean(x: np.ndarray) -> np.ndarray:
    """The shift the kernel documents: the mean of a power-of-two corner block."""
    p, _, q = x.shape
    q0 = 1 << (min(q, 8).bit_length() - 1)
    p0 = 1 << (min(p, max(1, 8 // q0)).bit_length() - 1)
    return x[:p0, :, :q0].mean(axis=(0, 2))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_sums_match_float64_at_a_large_mean(kernel, shape, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1e4, dtype)
    shift, s1, s2 = jax.jit(kernel.shifted_sums)(x)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(shift, _corner_mean(x64), rtol=2**-24)
    d = x64 - np.asarray(shift, np.float64)[None, :, None]
    e1, e2 = d.sum((0, 2)), (d * d).sum((0, 2))
    # The exact sums of the float32 d, rounded once to float32 (two ulps), up to an
    # error far below the spread that the normalization divides by.
    ulp = 2.0**-23
    np.testing.assert_array_less(np.abs(np.asarray(s1) - e1),
                                 2 * ulp * np.abs(e1) + ulp * np.sqrt(e2) + 1e-30)
    np.testing.assert_allclose(np.asarray(s2), e2, rtol=2 * ulp)


@pytest.mark.parametrize("shape", [(0, 3, 5), (0, 3, 1), (2, 3, 0)], ids=str)
def test_kernel_gives_zero_sums_for_a_channel_without_values(kernel, shape):
    outputs = jax.jit(kernel.shifted_sums)(jnp.full(shape, 7.0, jnp.float32))
    for out in outputs:
        np.testing.assert_array_equal(out, np.zeros(3, np.float32))


def test_kernel_maps_over_leading_axes_under_vmap(kernel):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 2, 4, 300)), jnp.float32)
    mapped = jax.vmap(kernel.shifted_sums)(x)
    looped = [kernel.shifted_sums(x[i]) for i in range(3)]
    for k in range(3):
        np.testing.assert_array_equal(mapped[k], np.stack([r[k] for r in looped]))


CASES = [((2, 64, 28, 28), 1), ((2, 28, 28, 64), -1), ((6, 5, 7), 1), ((9, 4), 1),
         ((2, 3, 4, 5, 6), 1), ((5, 3, 1, 1), 1)]


def _float64_normalize(x: np.ndarray, axis: int, eps: float = 1e-5) -> np.ndarray:
    x = np.asarray(x, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)


def _train(x: jax.Array, axis: int):
    params, state = jbn.init(x.shape[axis])
    fn = jax.jit(lambda x: jbn.batch_norm(params, state, x, True, axis=axis))
    return fn(x), fn.lower(x).as_text()


@pytest.mark.parametrize("shape, axis", CASES, ids=str)
def test_batch_norm_uses_the_kernel_and_stays_within_2e_6_of_float64(kernel, shape, axis):
    x = (np.random.default_rng(2).standard_normal(shape) * 3 + 1e4).astype(np.float32)
    (y, new), hlo = _train(jnp.asarray(x), axis)
    assert "jbn_shifted_sums" in hlo
    assert np.abs(np.asarray(y, np.float64) - _float64_normalize(x, axis)).max() <= 2e-6
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    np.testing.assert_allclose(new["running_mean"], 0.1 * x.astype(np.float64).mean(axes),
                               rtol=1e-6)
    n = x.size // x.shape[axis]
    unbiased = x.astype(np.float64).var(axes) * n / (n - 1)
    np.testing.assert_allclose(new["running_var"], 0.9 + 0.1 * unbiased, rtol=1e-6)


@pytest.mark.parametrize("shape, axis", CASES, ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_batch_norm_gives_the_same_values_without_the_kernel(kernel, monkeypatch, shape,
                                                             axis, dtype):
    x = jnp.asarray(np.random.default_rng(3).standard_normal(shape) * 2 + 5, dtype)
    with_kernel, hlo = _train(x, axis)
    assert "jbn_shifted_sums" in hlo
    monkeypatch.setattr(_cpu_kernel, "available", lambda: False)
    without, hlo = _train(x, axis)
    assert "jbn_shifted_sums" not in hlo
    # float32 statistics, summed in another order: a few ulps (bfloat16 outputs may
    # round the other way, one bfloat16 ulp).
    rtol = 1e-5 if dtype == jnp.float32 else 2**-7
    for a, b in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(without)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=rtol, atol=rtol)


def _loss(x, params, state, axis):
    y, _ = jbn.batch_norm(params, state, x, True, axis=axis)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size)


@pytest.mark.parametrize("shape, axis", [((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)], ids=str)
def test_derivatives_of_every_kind_are_unchanged_by_the_kernel(kernel, monkeypatch, shape,
                                                               axis):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(shape) + 3, jnp.float32)
    t = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    params, state = jbn.init(shape[axis])
    params = {"weight": params["weight"] + 0.5, "bias": params["bias"] - 0.25}

    def derivatives():
        loss = jax.jit(lambda x, p: _loss(x, p, state, axis))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)
        fwd = jax.jit(lambda x, t: jax.jvp(lambda x: loss(x, params), (x,), (t,)))(x, t)
        hvp = jax.jit(lambda x, t: jax.jvp(jax.grad(lambda x: loss(x, params)), (x,), (t,)))(
            x, t)
        return grad, fwd, hvp, jax.jit(jax.grad(loss)).lower(x, params).as_text()

    *with_kernel, hlo = derivatives()
    assert "jbn_shifted_sums" in hlo  # the differentiated forward pass uses it too
    monkeypatch.setattr(_cpu_kernel, "available", lambda: False)
    *without, hlo = derivatives()
    assert "jbn_shifted_sums" not in hlo
    for a, b in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(without)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_masked_and_float16_input_take_the_xla_path(kernel):
    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 3, 6)), jnp.float32)
    params, state = jbn.init(3)
    mask = jnp.arange(24).reshape(4, 6) % 5 != 0
    masked = jax.jit(lambda x: jbn.batch_norm(params, state, x, True, mask=mask))
    assert "jbn_shifted_sums" not in masked.lower(x).as_text()
    half = jax.jit(lambda x: jbn.batch_norm(params, state, x, True))
    assert "jbn_shifted_sums" not in half.lower(x.astype(jnp.float16)).as_text()
    assert "jbn_shifted_sums" in half.lower(x).as_text()


def test_pure_xla_path_is_within_2e_6_of_float64(without_kernel):
    x = (np.random.default_rng(6).standard_normal((2, 28, 28, 64)) * 3 + 1e4).astype(
        np.float32)
    (y, _), hlo = _train(jnp.asarray(x), -1)
    assert "jbn_shifted_sums" not in hlo
    assert np.abs(np.asarray(y, np.float64) - _float64_normalize(x, -1)).max() <= 2e-6
