"""Numerical stability at large means, and low-precision input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn


def _float64_normalize(x: np.ndarray, axis: int, eps: float = 1e-5) -> np.ndarray:
    x = np.asarray(x, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e3, 1e4, 1e5])
@pytest.mark.parametrize("shape, axis", [((64, 8, 16, 16), 1), ((64, 16, 16, 8), -1), ((4096, 8), 1)])
def test_float32_output_within_2e_6_of_float64_at_any_data_mean(offset, shape, axis):
    x = (np.random.default_rng(0).standard_normal(shape) + offset).astype(np.float32)
    y, state = jax.jit(lambda x: jbn.batch_norm(*jbn.init(8), x, True, axis=axis))(x)
    error = np.abs(np.asarray(y, np.float64) - _float64_normalize(x, axis)).max()
    assert error <= 2e-6, f"max error {error:.3g} at data mean {offset:g}"
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    np.testing.assert_allclose(state["running_mean"], 0.1 * x.astype(np.float64).mean(axes),
                               rtol=1e-6, atol=1e-7)  # std 1: absolute accuracy of a mean near 0
    n = x.size // 8
    unbiased = x.astype(np.float64).var(axes) * n / (n - 1)
    np.testing.assert_allclose(state["running_var"], 0.9 + 0.1 * unbiased, rtol=1e-6)


def test_one_pass_mean_of_squares_would_fail_where_jbn_does_not():
    # The test above can fail: the naive E[x^2] - E[x]^2 misses the target by far.
    x = (np.random.default_rng(0).standard_normal((64, 8, 16, 16)) + 1e4).astype(np.float32)
    xj = jnp.asarray(x)
    mean = xj.mean((0, 2, 3), keepdims=True)
    var = jnp.maximum((xj * xj).mean((0, 2, 3), keepdims=True) - mean**2, 0)
    naive = (xj - mean) * jax.lax.rsqrt(var + 1e-5)
    assert np.abs(np.asarray(naive, np.float64) - _float64_normalize(x, 1)).max() > 1e-2


def test_shift_recomputed_inside_a_fusion_keeps_outputs_within_2e_6():
    # At this shape XLA recomputes the shift inside the normalization's fusion,
    # where a multiply-add can leave its product unrounded; a shift whose mean is
    # not exact there (a block of 112 values, as jbn once took) differs from the one
    # the sums were taken around, and every output of a channel moved by 4.6e-4.
    shape, axis = (2, 56, 56, 256), -1
    x = (np.random.default_rng(0).standard_normal(shape) + 1e4).astype(np.float32)
    params, state = jbn.init(shape[axis])
    y, _ = jax.jit(lambda x: jbn.batch_norm(params, state, x, True, axis=axis))(x)
    assert np.abs(np.asarray(y, np.float64) - _float64_normalize(x, axis)).max() <= 2e-6


def test_constant_channel_gives_zero_output_not_nan():
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    x[:, 1] = 7.5
    y, state = jbn.batch_norm(*jbn.init(3), x, True)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(np.asarray(y)[:, 1], 0.0)
    assert float(state["running_var"][1]) == pytest.approx(0.9)


def test_float16_near_its_maximum_stays_finite():
    rng = np.random.default_rng(0)
    x = np.clip(6e4 + rng.standard_normal((8, 4, 6, 6)) * 2000, -65000, 65000).astype(np.float16)
    x[:, 3] = 6.4e4  # and one constant channel
    y, state = jbn.batch_norm(*jbn.init(4), x, True)
    assert y.dtype == jnp.float16
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    for value in state.values():
        assert np.all(np.isfinite(np.asarray(value)))
    expected = _float64_normalize(x, 1)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=4e-3)  # fp16 resolution


def test_bfloat16_with_large_mean_is_computed_in_float32():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 4, 8, 8)) * 50 + 3e4).astype(jnp.bfloat16)
    x[:, 0] = 1e4  # a constant channel: variance 0
    params, state = jbn.init(4)
    y, state = jbn.batch_norm(params, state, x, True)
    assert y.dtype == jnp.bfloat16
    assert state["running_mean"].dtype == state["running_var"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    np.testing.assert_array_equal(np.asarray(y, np.float32)[:, 0], 0.0)
    expected = _float64_normalize(np.asarray(x, np.float32), 1)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=2e-2)  # bf16 resolution
    y_eval, _ = jbn.batch_norm(params, state, x, False)
    assert y_eval.dtype == jnp.bfloat16


def test_low_precision_statistics_equal_those_of_the_float32_input():
    x32 = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32) * 4 + 10
    x16 = x32.astype(jnp.bfloat16)
    _, s16 = jbn.batch_norm(*jbn.init(3), x16, True)
    _, s32 = jbn.batch_norm(*jbn.init(3), np.asarray(x16, np.float32), True)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(s16[key], s32[key], rtol=1e-6)


def test_output_dtype_argument_overrides_the_input_dtype():
    x = jnp.ones((4, 3), jnp.bfloat16) * jnp.arange(4, dtype=jnp.bfloat16)[:, None]
    y, _ = jbn.batch_norm({}, {}, x, True, dtype=jnp.float32)
    assert y.dtype == jnp.float32


@pytest.mark.parametrize("shape, axis, block", [
    ((8, 4, 16, 16), 1, (slice(0, 1), slice(None), slice(0, 4), slice(0, 16))),
    ((8, 16, 16, 4), 3, (slice(0, 1), slice(0, 4), slice(0, 16), slice(None))),
    ((3, 4, 5, 6), 1, (slice(0, 2), slice(None), slice(0, 4), slice(0, 4))),
    ((100, 4), 1, (slice(0, 64), slice(None))),
])
def test_shift_is_the_mean_of_a_power_of_two_corner_block(shape, axis, block):
    # Integer values sum exactly in float32, so the shift must equal the float64 mean of
    # the block (the trailing reduced axes first, up to 64 values, a power of two of them).
    from jbn._stats import _shift

    x = np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.float32) + 1e4
    shift = np.asarray(jax.jit(lambda x: _shift(x, axis, None))(jnp.asarray(x)))
    reduced = tuple(i for i in range(len(shape)) if i != axis)
    expected = x[block].astype(np.float64).mean(reduced)
    np.testing.assert_array_equal(shift, expected.astype(np.float32))
