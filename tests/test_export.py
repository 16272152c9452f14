"""Programs serialized with ``jax.export``, for any batch size: the same values as torch's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import export

import jbn
from reference import torch_layer, torch_state

C = 3
# (symbolic shape, the channel axis); SIZES gives each symbol its concrete values.
CASES = {
    "NCHW": ("b, 3, 6, 5", 1),
    "NHWC": ("b, 6, 5, 3", -1),
    "NCL": ("b, 3, l", 1),
    "NCDHW": ("b, 3, 4, d, 3", 1),
}
SIZES = [{"b": 2, "l": 7, "d": 2}, {"b": 5, "l": 1, "d": 5}]


def _concrete(spec: str, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if d.isalpha() else int(d) for d in spec.replace(" ", "").split(","))


def _variables():
    params = {"weight": jnp.asarray([0.5, 1.5, -2.0]), "bias": jnp.asarray([0.1, -0.2, 0.3])}
    _, state = jbn.init(C)
    state = {**state, "running_mean": jnp.asarray([1.0, -1.0, 0.5]),
             "running_var": jnp.asarray([2.0, 0.5, 1.0])}
    return params, state


def _torch(params, state, x: np.ndarray, axis: int, train: bool):
    """torch's BatchNorm on the same batch: ``(y, new state)`` in jbn's layout."""
    x = np.moveaxis(x, axis, 1)
    layer = torch_layer(x.ndim - 2 if x.ndim > 2 else 1, C, weight=np.array(params["weight"]),
                        bias=np.array(params["bias"]))
    with torch.no_grad():
        layer.running_mean.copy_(torch.from_numpy(np.array(state["running_mean"])))
        layer.running_var.copy_(torch.from_numpy(np.array(state["running_var"])))
    layer.train(train)
    with torch.no_grad():
        y = layer(torch.from_numpy(np.array(x, np.float32))).numpy()
    return np.moveaxis(y, 1, axis), torch_state(layer)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_program_exported_for_any_batch_size_matches_torch_at_each_size(case, train):
    spec, axis = CASES[case]
    params, state = _variables()
    fn = jax.jit(lambda p, s, x: jbn.batch_norm(p, s, x, train, axis=axis))
    exported = export.export(fn)(params, state,
                                 jax.ShapeDtypeStruct(export.symbolic_shape(spec), jnp.float32))
    # As another process would load it: serialized, then read back.
    exported = export.deserialize(exported.serialize())
    for i, sizes in enumerate(SIZES):
        x = np.random.default_rng(i).standard_normal(_concrete(spec, sizes)) * 2 + 3
        y, new_state = exported.call(params, state, jnp.asarray(x, jnp.float32))
        want_y, want_state = _torch(params, state, x.astype(np.float32), axis, train)
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
        for key, value in want_state.items():
            np.testing.assert_allclose(new_state[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["NCHW", "NHWC"], ids=str)
def test_gradients_exported_for_any_batch_size_match_the_jitted_ones(case, dtype):
    spec, axis = CASES[case]
    params, state = _variables()

    def loss(p, x):
        y, _ = jbn.batch_norm(p, state, x.astype(dtype), True, axis=axis)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    exported = export.export(grad)(params, jax.ShapeDtypeStruct(export.symbolic_shape(spec),
                                                                jnp.float32))
    for i, sizes in enumerate(SIZES):
        x = jnp.asarray(np.random.default_rng(i).standard_normal(_concrete(spec, sizes)) + 3,
                        jnp.float32)
        # The same float32 arithmetic, summed in another order.
        for a, b in zip(jax.tree.leaves(exported.call(params, x)),
                        jax.tree.leaves(grad(params, x)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_module_exported_for_any_batch_size_updates_its_batch_stats_as_jitted():
    model = jbn.BatchNorm2d(C)
    variables = model.init(jax.random.key(0), jnp.ones((2, C, 4, 4)), train=False)

    def step(variables, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    exported = export.export(jax.jit(step))(
        variables, jax.ShapeDtypeStruct(export.symbolic_shape("b, 3, 4, 4"), jnp.float32))
    for b in (2, 6):
        x = jnp.asarray(np.random.default_rng(b).standard_normal((b, C, 4, 4)) + 1, jnp.float32)
        for got, want in zip(jax.tree.leaves(exported.call(variables, x)),
                             jax.tree.leaves(jax.jit(step)(variables, x)), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True], ids=["positions", "samples"])
def test_masked_program_exported_for_any_batch_size_matches_torch_on_the_valid_values(per_sample):
    params, state = _variables()
    b, = export.symbolic_shape("b")
    mask_shape = (b, 1) if per_sample else (b, 7)
    fn = jax.jit(lambda p, s, x, m: jbn.batch_norm(p, s, x, True, mask=m))
    exported = export.export(fn)(params, state, jax.ShapeDtypeStruct((b, C, 7), jnp.float32),
                                 jax.ShapeDtypeStruct(mask_shape, jnp.bool_))
    rng = np.random.default_rng(4)
    for n in (3, 6):
        x = (rng.standard_normal((n, C, 7)) * 2 + 1).astype(np.float32)
        mask = rng.random((n, 1 if per_sample else 7)) < 0.6
        mask[0] = True
        y, new = exported.call(params, state, x, mask)
        full = np.broadcast_to(mask, (n, 7))
        valid = np.moveaxis(x, 1, -1)[full]  # (M, C): torch's batch of the valid values
        expected, expected_state = _torch(params, state, valid, 1, True)
        np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1)[full], expected,
                                   rtol=1e-5, atol=1e-5)
        for key, value in expected_state.items():
            np.testing.assert_allclose(new[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
