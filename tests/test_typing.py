"""jbn ships ``py.typed``: its users' type checker (mypy) accepts what jbn accepts and
flags what it rejects."""

from __future__ import annotations

import os
import textwrap

import pytest

import jbn

mypy_api = pytest.importorskip("mypy.api")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mypy_cache")


@pytest.fixture
def mypy_errors(tmp_path, cache_dir, monkeypatch):
    """mypy's errors in a user's script (not in jbn or its dependencies), 'LINE: message'."""
    root = os.path.dirname(os.path.dirname(jbn.__file__))
    if os.path.basename(root) != "site-packages":  # an editable install: the checkout
        monkeypatch.setenv("MYPYPATH", root)

    def run(source: str) -> list[str]:
        script = tmp_path / "user_code.py"
        script.write_text(textwrap.dedent(source).lstrip())
        out, err, _ = mypy_api.run([str(script), "--follow-imports=silent", "--cache-dir",
                                    str(cache_dir), "--no-error-summary"])
        assert not err, err
        prefix = f"{script}:"
        return [line[len(prefix):] for line in out.splitlines()
                if line.startswith(prefix) and ": error:" in line]

    return run


def test_type_checker_accepts_the_inputs_jbn_takes(mypy_errors):
    assert mypy_errors("""
        import flax.linen as nn
        import jax
        import jax.numpy as jnp
        import numpy as np
        import torch
        from flax import nnx

        import jbn

        params, state = jbn.init(3)
        x = np.ones((4, 3, 5), np.float32)
        y, state = jbn.batch_norm(params, state, x, True, mask=np.ones((4, 5), bool))
        y, _ = jbn.batch_norm(params, state, torch.ones(4, 3), True, momentum=None)
        y, _ = jbn.batch_norm({"weight": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)},
                              state, jnp.ones((2, 3)), False, dtype=jnp.bfloat16)
        layer = torch.nn.BatchNorm2d(3)
        y, _ = jbn.batch_norm({"weight": layer.weight, "bias": layer.bias}, None,
                              torch.ones(2, 3, 4, 4), True)

        model = jbn.BatchNorm2d(3, axis=-1)
        variables = model.init(jax.random.key(0), np.ones((2, 4, 4, 3), np.float32), train=False)
        out, updates = model.apply(variables, torch.ones(2, 4, 4, 3), train=True,
                                   mutable=["batch_stats"], mask=np.ones((2, 4, 4), bool))
        bn = jbn.nnx.BatchNorm2d(3, rngs=nnx.Rngs(0))
        z = bn(np.ones((2, 3, 4, 4), np.float32), train=True, mask=np.ones((2, 4, 4), bool))
        sync = jbn.nnx.SyncBatchNorm(3, momentum=None, axis_name="batch")
        frozen = jbn.FrozenBatchNorm2d(3)

        conv = torch.nn.Conv2d(3, 3, 3)
        kernel, bias = jbn.fold_conv_bn(conv.weight, conv.bias,
                                        jbn.from_torch_state_dict(layer.state_dict()),
                                        layout="OIHW")
        sd = jbn.to_torch_state_dict(variables)
        loaded = jbn.load_torch_state_dict(variables, sd, {"features.0": ("features", 0)})
        """) == []


def test_type_checker_flags_what_jbn_rejects(mypy_errors):
    errors = mypy_errors("""
        import jax
        import jax.numpy as jnp

        import jbn

        params, state = jbn.init(3)
        jbn.batch_norm(params, state, 1.0, True)
        jbn.batch_norm(params, state, jnp.ones((2, 3)), True, mask=True)
        bn = jbn.nnx.BatchNorm2d(3)
        bn(jnp.ones((2, 3, 4, 4)), trian=True)
        jbn.nnx.SyncBatchNorm(3, axis_nmae="batch")
        jbn.batch_norm(params, state, jax.ShapeDtypeStruct((2, 3), jnp.float32), True)
        """)
    assert [e.split(":")[0] for e in errors] == ["7", "8", "10", "11", "12"], errors
    assert '"trian"' in errors[2] and '"axis_nmae"' in errors[3]
