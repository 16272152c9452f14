"""Property-based parity with torch.nn.BatchNorm1d/2d/3d over shapes, flags and several steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jbn
from reference import (
    Float64BatchNorm,
    batch_var,
    to_channels_last,
    torch_forward,
    torch_layer,
    torch_state,
    torch_tolerance,
)

# jbn is held to a float64 computation of the specification at float32 resolution.
# PyTorch is compared at the same resolution plus the rounding that its own float32
# arithmetic makes on badly conditioned batches (reference.torch_tolerance).
RTOL = 2e-6
ATOL = 2e-6


@st.composite
def configs(draw):
    spatial = draw(st.sampled_from([0, 1, 2, 3]))  # 0: BatchNorm1d on (N, C)
    c = draw(st.integers(1, 5))
    n = draw(st.integers(1, 4))
    dims = tuple(draw(st.lists(st.integers(1, 5), min_size=spatial, max_size=spatial)))
    if n * int(np.prod(dims, dtype=int)) < 2:
        n = 2  # PyTorch (and jbn) refuse one value per channel in training
    momentum = draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
    return dict(
        shape=(n, c, *dims),
        spatial=spatial,
        affine=draw(st.booleans()),
        track=draw(st.booleans()),
        momentum=momentum,
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        channels_last=draw(st.booleans()),
        steps=draw(st.integers(1, 3)),
        scale=draw(st.sampled_from([0.01, 1.0, 30.0])),
        offset=draw(st.sampled_from([0.0, 3.0, -50.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _assert_close(actual, expected, what, extra_atol=0.0):
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64),
        rtol=RTOL, atol=ATOL * scale + extra_atol, err_msg=what,
    )


@given(configs())
def test_functional_core_matches_torch_over_training_steps_then_evaluation(cfg):
    rng = np.random.default_rng(cfg["seed"])
    c = cfg["shape"][1]
    weight = rng.uniform(0.5, 2.0, c).astype(np.float32)
    bias = rng.uniform(-1.0, 1.0, c).astype(np.float32)
    layer = torch_layer(
        cfg["spatial"], c, weight=weight if cfg["affine"] else None,
        bias=bias if cfg["affine"] else None, eps=cfg["eps"], momentum=cfg["momentum"],
        affine=cfg["affine"], track_running_stats=cfg["track"],
    )
    oracle = Float64BatchNorm(
        c, eps=cfg["eps"], momentum=cfg["momentum"], track=cfg["track"],
        weight=weight if cfg["affine"] else None, bias=bias if cfg["affine"] else None,
    )
    params, state = jbn.init(c, affine=cfg["affine"], track_running_stats=cfg["track"])
    if cfg["affine"]:
        params = {"weight": jnp.asarray(weight), "bias": jnp.asarray(bias)}
    axis = -1 if cfg["channels_last"] else 1
    layout = to_channels_last if cfg["channels_last"] else (lambda a: a)

    for step in range(cfg["steps"] + 1):
        train = step < cfg["steps"]
        x = (rng.standard_normal(cfg["shape"]) * cfg["scale"] + cfg["offset"]).astype(np.float32)
        used_var = batch_var(x) if train or not cfg["track"] else np.asarray(state["running_var"])
        if not train and cfg["track"]:  # evaluate from the float32 state jbn holds
            oracle.running_mean = np.asarray(state["running_mean"], np.float64)
            oracle.running_var = np.asarray(state["running_var"], np.float64)
        expected = oracle(x, train)
        from_torch = torch_forward(layer, x, train)
        y, state = jbn.batch_norm(
            params, state, layout(x), train, axis=axis, eps=cfg["eps"], momentum=cfg["momentum"]
        )
        what = f"output at step {step} (train={train})"
        _assert_close(y, layout(expected), what + " vs float64")
        _assert_close(y, layout(from_torch), what + " vs torch",
                      torch_tolerance(x, used_var, cfg["eps"], weight if cfg["affine"] else None))
        ref_state, torch_ref_state = oracle.state(), torch_state(layer)
        assert set(state) == set(ref_state) == set(torch_ref_state)
        for key in ref_state:
            if key == "num_batches_tracked":
                assert int(state[key]) == int(ref_state[key]) == int(torch_ref_state[key])
                continue
            _assert_close(state[key], ref_state[key], f"{key} after step {step} vs float64")
            # torch's float32 mean carries an error of a few ulps of |x|, which enters
            # the variance times the spread; momentum carries it to later steps.
            ulps = 8 * np.finfo(np.float32).eps * float(np.abs(x).max())
            slack = ulps if key == "running_mean" else ulps * float(np.sqrt(batch_var(x).max()))
            _assert_close(state[key], torch_ref_state[key], f"{key} after step {step} vs torch",
                          slack)


@pytest.mark.parametrize("spatial", [0, 1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_linen_modules_match_torch_over_training_steps_then_evaluation(spatial, momentum):
    rng = np.random.default_rng(spatial)
    module = {0: jbn.BatchNorm1d, 1: jbn.BatchNorm1d, 2: jbn.BatchNorm2d, 3: jbn.BatchNorm3d}[spatial]
    c = 3
    shape = (4, c) + (3,) * spatial
    layer = torch_layer(spatial, c, momentum=momentum)
    model = module(c, momentum=momentum)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    for step in range(4):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        expected = torch_forward(layer, x, True)
        y, updates = apply(variables, x, train=True, mutable=("batch_stats",))
        variables = {**variables, **updates}
        _assert_close(y, expected, f"train output at step {step}")
    for key, value in torch_state(layer).items():
        np.testing.assert_allclose(variables["batch_stats"][key], value, rtol=RTOL, atol=ATOL)
    x = rng.standard_normal(shape).astype(np.float32)
    _assert_close(apply(variables, x, train=False), torch_forward(layer, x, False), "eval output")


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_float64_layers_match_torch_double_over_training_steps_then_evaluation(momentum):
    # With jax_enable_x64, float64 parameters keep float64 running statistics, updated
    # in float64 (a float32 momentum factor would round them at 1e-8).
    import torch

    rng = np.random.default_rng(7)
    batches = [rng.normal(size=(4, 3, 5, 5)) * 2 + 3 for _ in range(4)]
    tbn = torch.nn.BatchNorm2d(3, momentum=momentum).double()
    with jax.enable_x64(True):
        params, state = jbn.init(3, dtype=jnp.float64)
        module = jbn.BatchNorm2d(3, momentum=momentum, param_dtype=jnp.float64)
        variables = module.init(jax.random.key(0), jnp.asarray(batches[0]), train=False)
        step = jax.jit(lambda s, x: jbn.batch_norm(params, s, x, True, momentum=momentum))
        for x in batches:
            y, state = step(state, jnp.asarray(x))
            ym, updates = module.apply(variables, jnp.asarray(x), train=True,
                                       mutable=["batch_stats"])
            variables = {**variables, **updates}
            ty = tbn(torch.from_numpy(x)).detach().numpy()
            for got, stats in ((y, state), (ym, variables["batch_stats"])):
                assert got.dtype == jnp.float64 and stats["running_var"].dtype == jnp.float64
                np.testing.assert_allclose(got, ty, rtol=1e-12, atol=1e-12)
                np.testing.assert_allclose(stats["running_mean"], tbn.running_mean.numpy(),
                                           rtol=1e-13, atol=1e-14)
                np.testing.assert_allclose(stats["running_var"], tbn.running_var.numpy(),
                                           rtol=1e-13)
        # A double torch layer's state dict keeps float64 statistics; evaluation agrees.
        loaded = jbn.from_torch_state_dict(tbn.state_dict())
        assert loaded["batch_stats"]["running_mean"].dtype == jnp.float64
        tbn.eval()
        x = rng.normal(size=(2, 3, 5, 5)) * 2 + 3
        np.testing.assert_allclose(module.apply(loaded, jnp.asarray(x), train=False),
                                   tbn(torch.from_numpy(x)).detach().numpy(), rtol=1e-12,
                                   atol=1e-12)
