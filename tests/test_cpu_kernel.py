"""jbn's CPU kernels for the per-channel sums: their values, and batch norm with them and without."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn import _cpu_kernel
from reference import ninther_shift


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


def test_the_kernel_records_the_ffi_version_of_the_jaxlib_it_was_built_against(kernel):
    from jbn import _shifted_sums

    version = _cpu_kernel.runtime_ffi_api_version()
    assert version is not None, "the installed jaxlib's XLA FFI headers give no version"
    built = _shifted_sums.ffi_api_version
    assert len(built) == 2 and all(isinstance(v, int) for v in built)
    # Built against these headers or older ones (a jaxlib upgraded since).
    assert built[0] == version[0] and built[1] <= version[1]
    assert _cpu_kernel.ffi_incompatibility(built, version) is None


@pytest.mark.parametrize(("built", "runtime", "takes"), [
    ((0, 1), (0, 1), True), ((0, 1), (0, 3), True), ((0, 3), (0, 1), False),
    ((1, 0), (0, 9), False), ((0, 9), (1, 0), False), ((0, 3), None, True), ((), (0, 1), True),
])
def test_xla_takes_kernels_of_its_ffi_major_version_and_no_newer_minor(built, runtime, takes):
    problem = _cpu_kernel.ffi_incompatibility(built, runtime)
    assert (problem is None) == takes
    if not takes:
        assert f"{built[0]}.{built[1]}" in problem and f"{runtime[0]}.{runtime[1]}" in problem


def test_a_kernel_built_for_a_newer_jaxlib_warns_and_leaves_the_cpu_backend_working(kernel,
                                                                                   tmp_path):
    # Registering such a kernel would make XLA refuse to start the CPU backend at all;
    # jbn must warn and compute the same sums with XLA. A fresh process, as the
    # registration is once per process.
    code = """
import warnings
import numpy as np, jax, jax.numpy as jnp
from jbn import _cpu_kernel, _shifted_sums
import jbn
major, minor = _shifted_sums.ffi_api_version  # a runtime older than the build:
_cpu_kernel.runtime_ffi_api_version = lambda: (major, minor - 1) if minor else (major - 1, 99)
x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32) + 1e3
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y, _ = jbn.batch_norm(*jbn.init(3), jnp.asarray(x), True)
assert not _cpu_kernel.available()
assert any("--no-build-isolation" in str(w.message) for w in caught), caught
x64 = x.astype(np.float64)
m, v = x64.mean(axis=(0, 2, 3), keepdims=True), x64.var(axis=(0, 2, 3), keepdims=True)
np.testing.assert_allclose(np.asarray(y), (x64 - m) / np.sqrt(v + 1e-5), atol=2e-6)
"""
    # Run outside the checkout, so that it imports the jbn this process does (an
    # installed one, with the kernels) rather than the source folder.
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr


# (P, C, Q): rows (NCHW as (N, C, H * W)), channels last ((N * H * W, C, 1)), and
# lengths that leave tails after the kernel's blocks of 256 values and 32 rows, or
# rows shorter than 8 (the shift then takes values from several).
SHAPES = [(2, 5, 3136), (3, 4, 1000), (4, 2, 7), (6272, 64, 1), (33, 3, 1), (70, 5, 1),
          (1, 2, 1), (3, 7, 49), (5, 3, 3)]
# Channels last with more channels than one chunk of 512 and a tail after them, and
# parts of more than one block of 32 rows.
CHUNKED = (2100, 523, 1)


def _assert_shift(shift: jax.Array, x64: np.ndarray) -> None:
    """The shift the kernel documents: the ninther of nine of the channel's values."""
    np.testing.assert_array_equal(shift, ninther_shift(x64, 1).astype(np.float32))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_sums_match_float64_at_a_large_mean(kernel, shape, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1e4, dtype)
    shift, s1, s2 = jax.jit(kernel.shifted_sums)(x)
    x64 = np.asarray(x, np.float64)
    _assert_shift(shift, x64)
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


def _assert_float32_blocked_sum(got: jax.Array, terms: np.ndarray) -> None:
    """``got`` is the per-channel sum of ``terms`` ``(P, C, Q)`` as the kernels take it.

    Float32 sums of at most 32 terms per lane and block, then float64, then one
    rounding to float32: off by at most (32 + 2) ulps of the sum of the magnitudes.
    """
    exact = terms.sum((0, 2))
    bound = 34 * 2.0**-24 * np.abs(terms).sum((0, 2)) + 2.0**-24 * np.abs(exact)
    np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - exact), bound + 1e-30)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_sums_over_several_chunks_of_channels(kernel, dtype):
    x = jnp.asarray(np.random.default_rng(10).standard_normal(CHUNKED) * 3 + 1e4, dtype)
    shift, s1, s2 = jax.jit(kernel.shifted_sums)(x)
    x64 = np.asarray(x, np.float64)
    _assert_shift(shift, x64)
    d = x64 - np.asarray(shift, np.float64)[None, :, None]  # exact in float32
    _assert_float32_blocked_sum(s1, d)
    _assert_float32_blocked_sum(s2, d * d)


DTYPE_PAIRS = [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
               (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)]


@pytest.mark.parametrize("shape", SHAPES + [CHUNKED], ids=str)
@pytest.mark.parametrize("g_dtype, x_dtype", DTYPE_PAIRS, ids=["f32", "bf16", "g32-x16", "g16-x32"])
def test_kernel_dot_sums_match_float64(kernel, shape, g_dtype, x_dtype):
    rng = np.random.default_rng(7)
    g = jnp.asarray(rng.standard_normal(shape), g_dtype)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1e4, x_dtype)
    shift = jnp.asarray(rng.standard_normal(shape[1]) + 1e4, jnp.float32)
    s_g, s_gd = jax.jit(kernel.dot_sums)(g, x, shift)
    g64 = np.asarray(g, np.float64)
    # x - shift in float32, as documented; the rest exact.
    d = np.asarray(np.asarray(x, np.float32) - np.asarray(shift)[None, :, None], np.float64)
    _assert_float32_blocked_sum(s_g, g64)
    _assert_float32_blocked_sum(s_gd, g64 * d)


@pytest.mark.parametrize("shape", [(0, 3, 5), (0, 3, 1), (2, 3, 0)], ids=str)
def test_kernel_dot_sums_are_zero_for_a_channel_without_values(kernel, shape):
    x = jnp.full(shape, 7.0, jnp.float32)
    for out in jax.jit(kernel.dot_sums)(x, x, jnp.ones(3, jnp.float32)):
        np.testing.assert_array_equal(out, np.zeros(3, np.float32))


def test_kernel_dot_sums_map_over_leading_axes_under_vmap(kernel):
    rng = np.random.default_rng(8)
    g = jnp.asarray(rng.standard_normal((3, 2, 4, 300)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 2, 4, 300)), jnp.bfloat16)
    shift = jnp.asarray(rng.standard_normal(4), jnp.float32)  # not mapped
    mapped = jax.vmap(kernel.dot_sums, in_axes=(0, 0, None))(g, x, shift)
    looped = [kernel.dot_sums(g[i], x[i], shift) for i in range(3)]
    for k in range(2):
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
    for a, b in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(without), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=rtol, atol=rtol)


def _loss(x, params, state, axis, train=True):
    y, _ = jbn.batch_norm(params, state, x, train, axis=axis)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size)


@pytest.mark.parametrize("shape, axis", [((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_derivatives_of_every_kind_are_unchanged_by_the_kernel(kernel, monkeypatch, shape,
                                                               axis, train):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(shape) + 3, jnp.float32)
    t = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    params, state = jbn.init(shape[axis])
    params = {"weight": params["weight"] + 0.5, "bias": params["bias"] - 0.25}
    state = {**state, "running_mean": state["running_mean"] + 2.5,
             "running_var": state["running_var"] * 1.5}

    def derivatives():
        loss = jax.jit(lambda x, p: _loss(x, p, state, axis, train))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)
        fwd = jax.jit(lambda x, t: jax.jvp(lambda x: loss(x, params), (x,), (t,)))(x, t)
        hvp = jax.jit(lambda x, t: jax.jvp(jax.grad(lambda x: loss(x, params)), (x,), (t,)))(
            x, t)
        # Reverse over reverse: the gradient of a function of the gradient.
        rr = jax.jit(jax.grad(lambda x: jnp.sum(jnp.cos(jax.grad(loss)(x, params)))))(x)
        return grad, fwd, hvp, rr, jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
            x, params).as_text()

    *with_kernel, hlo = derivatives()
    # The backward pass's sums come from the kernel; in training the differentiated
    # forward pass's statistics too.
    assert "jbn_dot_sums" in hlo
    assert ("jbn_shifted_sums" in hlo) == train
    monkeypatch.setattr(_cpu_kernel, "available", lambda: False)
    *without, hlo = derivatives()
    assert "jbn_shifted_sums" not in hlo and "jbn_dot_sums" not in hlo
    for a, b in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(without), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradients_under_shard_map_with_replicated_parameters_match_one_device(kernel,
                                                                               train):
    # The weight's tangent is replicated while the batch is split (in training, the
    # synchronized statistics' too): typed as varying, its cotangent from the kernel's
    # sums is added over the devices.
    from jax import shard_map
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((16, 3, 5)) + 2, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((16, 3, 5)), jnp.float32)
    params = {"weight": jnp.asarray([0.5, 1.0, 2.0]), "bias": jnp.asarray([0.1, 0.2, 0.3])}
    _, state = jbn.init(3)
    state = {**state, "running_mean": jnp.asarray([1.0, 2.0, 3.0])}

    def grads(axis_name):
        def loss(p, x, dy):
            return jnp.sum(jbn.batch_norm(p, state, x, train, axis_name=axis_name)[0] * dy)
        return jax.grad(loss, argnums=(0, 1))

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sharded = jax.jit(shard_map(grads("batch"), mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                                out_specs=(P(), P("batch"))))
    single = jax.jit(grads(None))(params, x, dy)
    for a, b in zip(jax.tree.leaves(sharded(params, x, dy)), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert "jbn_dot_sums" in sharded.lower(params, x, dy).compile().as_text()


def test_gradients_of_vmapped_batch_norm_match_a_loop_over_groups(kernel):
    # vmap over groups of samples, each normalized on its own: vmap of grad (the
    # kernel's sums batched) and grad of vmap (the primitive batched) both give the
    # gradients of a Python loop over the groups.
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(2, 1, (3, 4, 5, 6)), jnp.float32)
    params, state = jbn.init(5)
    params = {"weight": jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}

    def loss(p, x):
        return _loss(x, p, state, 1)

    grad = jax.grad(loss, argnums=(0, 1))
    loop = [grad(params, x[i]) for i in range(3)]
    looped = jax.tree.map(lambda *g: jnp.stack(g), *loop)
    per_group = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(params, x)
    total = jax.jit(jax.grad(lambda p, x: jnp.sum(jax.vmap(loss, in_axes=(None, 0))(p, x)),
                             argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(per_group), jax.tree.leaves(looped), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    summed = (jax.tree.map(lambda g: g.sum(0), looped[0]), looped[1])
    for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(summed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _batch_sized_writes(hlo: str, size: int) -> list[str]:
    """The instructions of the compiled entry computation that write a batch-sized array."""
    entry = hlo[hlo.index("ENTRY"):]
    writes = []
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* (\S+?)\(", line)
        if m and m.group(3) not in ("parameter", "bitcast", "get-tuple-element"):
            if math.prod(int(d) for d in m.group(2).split(",") if d) == size:
                writes.append(m.group(1))
    return writes


@pytest.mark.parametrize("shape, axis", [((2, 8, 6, 6), 1), ((2, 6, 6, 8), -1)], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernels_read_their_inputs_in_place(kernel, shape, axis, dtype):
    # The training forward pass writes y only, and forward+backward dx only: the
    # kernels take the batch as it lies, without a copy to lay it out for the call.
    x = jnp.ones(shape, dtype)
    params, state = jbn.init(shape[axis])

    def f(x):
        return jbn.batch_norm(params, state, x, True, axis=axis)[0]

    forward = jax.jit(f).lower(x).compile().as_text()
    both = jax.jit(lambda x: jax.vjp(f, x)[1](x)).lower(x).compile().as_text()
    assert "jbn_shifted_sums" in forward and "jbn_dot_sums" in both
    assert len(_batch_sized_writes(forward, x.size)) == 1, forward
    assert len(_batch_sized_writes(both, x.size)) == 1, both


@pytest.mark.parametrize("shape, axis", [((2, 8, 6, 6), 1), ((2, 6, 6, 8), -1)], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_backward_pass_alone_takes_the_statistics_from_its_residuals(kernel, shape, axis,
                                                                     dtype):
    # A vjp function applied in a program of its own (its forward pass already run)
    # reads x and dy once for its sums: the shift the forward pass's kernel returned
    # is a residual, not recomputed by running that kernel over x again.
    x = jnp.ones(shape, dtype)
    params, state = jbn.init(shape[axis])
    vjp = jax.jit(lambda p, x: jax.vjp(
        lambda p, x: jbn.batch_norm(p, state, x, True, axis=axis)[0], p, x)[1])(params, x)
    backward = jax.jit(lambda f, dy: f(dy)).lower(vjp, x).compile().as_text()
    entry = backward[backward.index("ENTRY"):]
    assert re.findall(r'custom_call_target="(\w+)"', entry) == ["jbn_dot_sums"], entry


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


def _kernel_calls(module_text: str) -> list[str]:
    """The custom calls to jbn's kernels in a lowered (StableHLO) module."""
    return re.findall(r"custom_call @(jbn_\w+)", module_text)


@pytest.mark.parametrize("platforms", [("cpu",), ("cuda",), ("tpu",), ("cpu", "cuda")],
                         ids="+".join)
@pytest.mark.parametrize("shape, axis", [((4, 6, 5, 5), 1), ((4, 5, 5, 6), -1)], ids=str)
def test_exported_training_step_holds_no_kernel_call_and_matches_the_kernel(kernel, platforms,
                                                                            shape, axis):
    # A program serialized with jax.export runs where jbn is not installed, and one
    # lowered for a GPU or TPU on a CPU host runs there: neither may call the kernels,
    # which exist only in this installation's CPU runtime. The same program compiled
    # here for the CPU still does.
    from jax import export

    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal(shape) * 2 + 50, jnp.float32)
    params, state = jbn.init(shape[axis])
    params = {"weight": params["weight"] * 1.5, "bias": params["bias"] + 0.5}

    def step(params, state, x):
        def loss(params, x):
            y, new_state = jbn.batch_norm(params, state, x, True, axis=axis)
            return jnp.sum(jnp.sin(y)), new_state
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    compiled_here = jax.jit(step)
    assert sorted(set(_kernel_calls(compiled_here.lower(params, state, x).as_text()))) == [
        "jbn_dot_sums", "jbn_shifted_sums"]
    exported = export.export(compiled_here, platforms=platforms)(params, state, x)
    assert _kernel_calls(exported.mlir_module()) == []
    if "cpu" in platforms:
        for a, b in zip(jax.tree.leaves(exported.call(params, state, x)),
                        jax.tree.leaves(compiled_here(params, state, x)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["shifted_sums", "dot_sums"])
def test_sums_lowered_without_the_kernel_match_it_under_vmap(kernel, name):
    # Where the kernel cannot run, its primitive is lowered as the same sums in XLA,
    # for mapped (leading) axes too.
    from jax import export

    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.standard_normal((3, 6, 4, 10)) * 3 + 1e3, jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 6, 4, 10)), jnp.bfloat16)
    shift = jnp.asarray(rng.standard_normal(4) + 1e3, jnp.float32)  # not mapped
    if name == "shifted_sums":
        fn, args = jax.jit(jax.vmap(kernel.shifted_sums)), (x,)
    else:
        fn, args = jax.jit(jax.vmap(kernel.dot_sums, in_axes=(0, 0, None))), (g, x, shift)
    assert _kernel_calls(fn.lower(*args).as_text()) == [f"jbn_{name}"]
    exported = export.export(fn, platforms=["cpu"])(*args)
    assert _kernel_calls(exported.mlir_module()) == []
    xla, here = exported.call(*args), fn(*args)
    if name == "shifted_sums":
        # The same shift (a value of the data), sums added in other orders: compare
        # the mean and the sum of squared deviations.
        n = x.shape[1] * x.shape[3]
        xla, here = ([shift + s1 / n, s2 - s1 * s1 / n] for shift, s1, s2 in (xla, here))
    for a, b in zip(xla, here):
        np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sums_lowered_without_the_kernel_match_float64_at_a_large_mean(kernel, shape):
    from jax import export

    x = jnp.asarray(np.random.default_rng(14).standard_normal(shape) * 3 + 1e4, jnp.float32)
    shift, s1, s2 = export.export(jax.jit(kernel.shifted_sums), platforms=["cpu"])(x).call(x)
    x64 = np.asarray(x, np.float64)
    _assert_shift(shift, x64)
    d = x64 - np.asarray(shift, np.float64)[None, :, None]
    # Float32 sums in any order: off by at most n ulps of the sum of the magnitudes.
    n = shape[0] * shape[2]
    for got, terms in ((s1, d), (s2, d * d)):
        exact = terms.sum((0, 2))
        bound = n * 2.0**-24 * np.abs(terms).sum((0, 2))
        np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - exact), bound + 1e-30)


def test_jit_over_a_sharded_batch_partitions_the_sums_instead_of_gathering_the_batch(kernel):
    # Under jit, XLA's SPMD partitioner would gather a batch split across devices
    # whole onto every device for a custom call; XLA's own sums it splits into partial
    # sums and all-reduces of (C,) values. Inside shard_map every device calls the
    # kernels on its own part.
    from jax import shard_map
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    assert mesh.size > 1
    x = jnp.asarray(np.random.default_rng(15).standard_normal((16, 6, 5, 5)), jnp.float32)
    params, state = jbn.init(6)

    def forward_backward(axis_name):
        def f(x):
            return jbn.batch_norm(params, state, x, True, axis_name=axis_name)[0]
        return lambda x: jax.vjp(f, x)[1](x)

    split = jax.device_put(x, NamedSharding(mesh, P("batch")))
    jitted = jax.jit(forward_backward(None)).lower(split).compile().as_text()
    assert "all-gather" not in jitted and "all-reduce" in jitted
    assert not re.findall(r'custom_call_target="(jbn_\w+)"', jitted)
    mapped = jax.jit(shard_map(forward_backward("batch"), mesh=mesh, in_specs=P("batch"),
                               out_specs=P("batch"))).lower(x).compile().as_text()
    assert sorted(set(re.findall(r'custom_call_target="(jbn_\w+)"', mapped))) == [
        "jbn_dot_sums", "jbn_shifted_sums"]


@pytest.mark.parametrize("position", range(9))
def test_kernel_shift_is_zero_and_sums_nan_when_a_sampled_value_is_nan_as_in_xla(kernel,
                                                                                  position):
    # All nine values of a channel of nine are sampled; the median propagates NaN, and
    # a shift that is not finite is 0 in both.
    x = np.arange(1, 10, dtype=np.float32).reshape(9, 1, 1)
    x[position] = np.nan
    shift, s1, s2 = jax.jit(kernel.shifted_sums)(jnp.asarray(x))
    want = jax.jit(lambda x: kernel._xla_shifted_sums(kernel._flat(x), q=1, before=(9,),
                                                      after=(1,)))(jnp.asarray(x))
    assert shift[0] == want[0][0] == 0
    for got, expected in zip((s1, s2), want[1:]):
        assert np.isnan(got[0]) and np.isnan(expected[0])


def _loops_that_sample(hlo: str, size: int) -> list[str]:
    """The compiled computations that read single values of a batch-sized array (the
    shift's samples: slices, gathers) and also compute a batch-sized value: loops
    that recompute the shift at each element."""
    found = []
    for block in re.split(r"\n(?=%|ENTRY )", hlo):
        ops = {m.group(1): m.group(3) for m in re.finditer(
            r"%(\S+) = \w+\[([\d,]*)\]\S* (\S+?)\(", block)
            if math.prod(int(d) for d in m.group(2).split(",") if d) == size}
        samples = any(re.search(rf" (?:slice|dynamic-slice|gather)\(%{re.escape(name)}[,)]", block)
                      for name in ops)
        if samples and set(ops.values()) - {"parameter", "bitcast"}:
            found.append(block.split("\n", 1)[0])
    return found


@pytest.mark.parametrize("shape, axis", [((8, 8, 6, 6), 1), ((8, 6, 6, 8), -1)], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_xla_path_computes_the_shift_once_not_at_each_element(without_kernel, shape, axis,
                                                              masked):
    # Without the kernel (and with a mask, which the kernel does not take) the sums,
    # the normalization and the backward pass's dx subtract the shift in loops over
    # the batch. XLA's CPU fusion would copy the shift's nine reads and comparisons
    # into each of them, to run at every element (twice the backward pass's time).
    if jax.default_backend() != "cpu":
        pytest.skip("a choice for XLA's CPU fusion")
    x = jnp.asarray(np.random.default_rng(16).standard_normal(shape), jnp.float32)
    params, state = jbn.init(shape[axis])
    mask = None
    if masked:
        mask = jnp.asarray(np.arange(x.size // shape[axis]) % 7 != 0).reshape(
            [d for i, d in enumerate(shape) if i != axis % len(shape)])

    def f(p, x):
        return jbn.batch_norm(p, state, x, True, axis=axis, mask=mask)[0]

    for program in (jax.jit(f), jax.jit(lambda p, x: jax.vjp(f, p, x)[1](x))):
        hlo = program.lower(params, x).compile().as_text()
        assert _loops_that_sample(hlo, x.size) == [], hlo
