"""Numerical stability at large means, and low-precision input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn import _cpu_kernel
from reference import ninther_shift


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


@pytest.mark.parametrize("shape, axis", [((8, 4, 16, 16), 1), ((8, 16, 16, 4), 3),
                                         ((3, 4, 5, 6), 1), ((100, 4), 1), ((2, 3, 2, 2), 1),
                                         ((4, 3, 2), 0)])
def test_shift_is_the_ninther_of_nine_values_spread_over_the_batch(shape, axis):
    from jbn._stats import _shift

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3 + 1e4
    shift = np.asarray(jax.jit(lambda x: _shift(x, axis, None))(jnp.asarray(x)))
    np.testing.assert_array_equal(shift, ninther_shift(x, axis))


def test_masked_shift_takes_the_last_valid_value_at_or_before_each_sampled_position():
    from jbn._stats import _shift

    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 10)).astype(np.float32) + 100
    mask = rng.random((6, 10)) < 0.5
    # Nothing valid up to the first sampled run (positions 17, 18, 19): it wraps
    # around to the batch's last valid value.
    mask[:2] = False
    mask[-1, -1] = True
    shift = np.asarray(jax.jit(lambda x, m: _shift(x, 1, m))(jnp.asarray(x), jnp.asarray(mask)))
    values = np.moveaxis(x, 1, -1).reshape(-1, 3)  # (N * L, C) in row-major order
    flat = mask.reshape(-1)
    valid_at = np.flatnonzero(flat)
    replaced = np.empty_like(values)
    for t in range(flat.size):
        before = valid_at[valid_at <= t]
        replaced[t] = values[before[-1] if before.size else valid_at[-1]]
    expected = ninther_shift(np.moveaxis(replaced.reshape(6, 10, 3), -1, 1), 1)
    np.testing.assert_array_equal(shift, expected)


def _atypical_start(shape, axis, mean):
    """Data of std 1 around ``mean`` whose first values per channel lie far below it."""
    x = np.random.default_rng(2).standard_normal(shape) + mean
    moved = np.moveaxis(x, axis, -1).copy()  # the channel's values in row-major order
    moved.reshape(-1, shape[axis])[:64] = 0.0
    return np.moveaxis(moved, -1, axis).astype(np.float32)


def _atypical_ends(shape, axis, mean):
    """Data of std 1 around ``mean`` whose first two and last values in each example
    (an image's corners, a sequence's ends) lie far below it."""
    x = np.random.default_rng(2).standard_normal(shape) + mean
    moved = np.moveaxis(x, axis, -1).copy()
    moved.reshape(shape[0], -1, shape[axis])[:, [0, 1, -1]] = 0.0
    return np.moveaxis(moved, -1, axis).astype(np.float32)


@pytest.mark.parametrize("path", ["kernel", "xla", "mask", "export"])
@pytest.mark.parametrize("data", [_atypical_start, _atypical_ends])
@pytest.mark.parametrize("shape, axis", [((64, 2, 4096), 1), ((16, 4, 32, 32), 1),
                                         ((16, 32, 32, 4), -1), ((6, 2, 4096), 1),
                                         ((6, 4, 32, 32), 1), ((6, 32, 32, 4), -1),
                                         ((9, 4, 32, 32), 1)])
def test_statistics_stay_exact_when_values_at_the_batch_start_or_borders_are_far_off(
        monkeypatch, path, data, shape, axis):
    # Padding or outliers at the start of the batch, or at every example's borders
    # (an image's corners, a sequence's ends): a shift sampled there would leave the
    # shifted sums to cancel as the naive formula's do.
    x = data(shape, axis, 1e4)
    c = shape[axis]
    reduced = tuple(i for i in range(len(shape)) if i != axis % len(shape))

    def step(x):
        mask = jnp.ones([shape[i] for i in reduced], bool) if path == "mask" else None
        return jbn.batch_norm(*jbn.init(c), x, True, axis=axis, mask=mask)

    if path == "xla":
        monkeypatch.setattr(_cpu_kernel, "available", lambda: False)
    if path == "export":
        # Exported for any size along every axis but the channels': the shift's
        # sample positions are then computed when the program runs.
        from jax import export

        names = iter("abcdefg")
        spec = ", ".join(str(c) if i == axis % len(shape) else next(names)
                         for i in range(len(shape)))
        arg = jax.ShapeDtypeStruct(export.symbolic_shape(spec), jnp.float32)
        y, state = export.export(jax.jit(step))(arg).call(x)
    else:
        y, state = jax.jit(step)(x)
    # The zeros lie many standard deviations out: float32 resolution there is
    # relative to the output's size, as in the parity tests.
    expected = _float64_normalize(x, axis)
    error = np.abs(np.asarray(y, np.float64) - expected).max()
    assert error <= 2e-6 * np.abs(expected).max(), f"max error {error:.3g}"
    n = x.size // c
    unbiased = x.astype(np.float64).var(reduced) * n / (n - 1)
    np.testing.assert_allclose(state["running_var"], 0.9 + 0.1 * unbiased, rtol=1e-6)


def test_masked_statistics_stay_exact_with_an_outlier_at_the_first_valid_position():
    rng = np.random.default_rng(3)
    lengths = np.array([3, 50, 17, 64, 1, 40, 64, 9])
    x = (rng.standard_normal((8, 2, 64)) + 1000).astype(np.float32)
    mask = np.arange(64)[None, :] < lengths[:, None]
    x[0, :, 0] = 0.0  # the first valid value: an outlier 1000 std away
    x = np.where(mask[:, None, :], x, 5e3).astype(np.float32)  # junk in the padding
    y, state = jax.jit(lambda x, m: jbn.batch_norm(*jbn.init(2), x, True, mask=m))(
        jnp.asarray(x), jnp.asarray(mask))
    valid = np.moveaxis(x, 1, -1)[mask].astype(np.float64)  # (M, C)
    expected = (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5)
    error = np.abs(np.moveaxis(np.asarray(y, np.float64), 1, -1)[mask] - expected).max()
    assert error <= 2e-6, f"max error {error:.3g}"
    unbiased = valid.var(0, ddof=1)
    np.testing.assert_allclose(state["running_var"], 0.9 + 0.1 * unbiased, rtol=1e-6)


def _float64_masked(x, mask, axis=1):
    """Batch norm of the valid values of ``x`` (``mask`` without the channel axis) in float64."""
    valid = np.moveaxis(x, axis, -1)[mask].astype(np.float64)  # (M, C)
    return (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5), valid.var(0, ddof=1)


@pytest.mark.parametrize("layout", ["left-padded", "one-image"])
def test_masked_statistics_stay_exact_when_the_sample_falls_in_padding(layout):
    # Where a sampled position is padding, the value used in its place must not be the
    # batch's first valid one: here that is an outlier 30 std out (a first token, a
    # corner pixel), and the samples fall in padding.
    rng = np.random.default_rng(5)
    if layout == "left-padded":  # (N, C, L), each sequence's valid tokens at its end
        x = rng.standard_normal((6, 2, 100)) + 1e3
        lengths = np.array([60, 45, 90, 30, 75, 50])
        mask = np.arange(100)[None, :] >= 100 - lengths[:, None]
        x[0, :, 100 - lengths[0]] = 1e3 + 30.0  # the batch's first valid token
    else:  # (N, C, H, W), one valid image of eight
        x = rng.standard_normal((8, 2, 32, 32)) + 1e3
        mask = np.zeros((8, 32, 32), bool)
        mask[0] = True
        x[0, :, 0, 0] = 1e3 + 30.0  # its corner pixel
    x = np.where(np.expand_dims(mask, 1), x, 0.0).astype(np.float32)
    y, state = jax.jit(lambda x, m: jbn.batch_norm(*jbn.init(2), x, True, mask=m))(
        jnp.asarray(x), jnp.asarray(mask))
    expected, unbiased = _float64_masked(x, mask)
    got = np.moveaxis(np.asarray(y, np.float64), 1, -1)[mask]
    error = np.abs(got - expected).max()
    assert error <= 2e-6 * np.abs(expected).max(), f"max error {error:.3g}"
    np.testing.assert_allclose(state["running_var"], 0.9 + 0.1 * unbiased, rtol=1e-6)
