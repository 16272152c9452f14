"""Writes the notebooks from their cells; execute them afterwards to store the outputs:

    python notebooks/build_notebooks.py
    jupyter nbconvert --to notebook --execute --inplace notebooks/0*.ipynb
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent


def cells(*sources: str) -> list:
    """Markdown cells for sources starting with ``md:``, code cells otherwise."""
    out = []
    for source in sources:
        source = source.strip("\n")
        if source.startswith("md:"):
            out.append(new_markdown_cell(source[3:].strip("\n")))
        else:
            out.append(new_code_cell(source))
    return out


QUICKSTART = cells(
    """md:
# jbn quick start: PyTorch's batch norm in JAX

`jbn.batch_norm` is a pure function with PyTorch's semantics; `jbn.BatchNorm1d/2d/3d` are Flax
modules around it. This notebook shows training versus evaluation, the running statistics, the
`affine` and `track_running_stats` switches, and reproduces two classic PyTorch examples side by
side with `torch`.""",
    """
import jax
import jax.numpy as jnp
import numpy as np
import torch

import jbn

np.set_printoptions(precision=5, suppress=True)""",
    """md:
## Training versus evaluation

In training, `batch_norm` normalizes with the batch mean and the *biased* batch variance and
returns updated running statistics, which use the *unbiased* variance with
`running = 0.9 * running + 0.1 * batch`. In evaluation it uses the running statistics.""",
    """
params, state = jbn.init(4)
x = jnp.array([[1.0, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8]])
y_train, new_state = jbn.batch_norm(params, state, x, train=True)
print("train output:\\n", np.asarray(y_train))
print({k: np.asarray(v) for k, v in new_state.items()})
y_eval, _ = jbn.batch_norm(params, new_state, x, train=False)
print("eval output (running statistics):\\n", np.asarray(y_eval))""",
    """md:
The running mean moved 10% of the way from 0 to the batch mean `[3, 4, 5, 6]`; the running
variance moved 10% of the way from 1 to the *unbiased* batch variance 4, to 1.3 (with the biased
8/3, which normalizes the output, it would be 1.1667).""",
    """md:
## Classic example 1: `BatchNorm1d(4)` on a 3x4 batch""",
    """
x_np = np.array([[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]], dtype=np.float32)

bn = torch.nn.BatchNorm1d(4)
bn.train()
y_torch = bn(torch.from_numpy(x_np)).detach().numpy()

model = jbn.BatchNorm1d(4)
variables = model.init(jax.random.key(0), jnp.asarray(x_np), train=False)
y_jbn, updates = model.apply(variables, jnp.asarray(x_np), train=True, mutable=["batch_stats"])

print("torch:\\n", y_torch)
print("jbn:\\n", np.asarray(y_jbn))
print("max |output difference|:", np.abs(y_torch - np.asarray(y_jbn)).max())
for key in ("running_mean", "running_var"):
    diff = np.abs(getattr(bn, key).numpy() - np.asarray(updates["batch_stats"][key])).max()
    print(f"max |{key} difference|:", diff)
print("num_batches_tracked:", int(bn.num_batches_tracked), int(updates["batch_stats"]["num_batches_tracked"]))""",
    """md:
## Classic example 2: `BatchNorm2d(3)` on a `(2, 3, 4, 4)` batch of `randn * 10 + 5`

Then evaluation with the running statistics, in both libraries.""",
    """
torch.manual_seed(0)
x_t = torch.randn(2, 3, 4, 4) * 10 + 5
x_j = jnp.asarray(x_t.numpy())

bn2 = torch.nn.BatchNorm2d(3)
model2 = jbn.BatchNorm2d(3)
variables2 = model2.init(jax.random.key(0), x_j, train=False)

bn2.train()
y_t = bn2(x_t).detach().numpy()
y_j, updates2 = model2.apply(variables2, x_j, train=True, mutable=["batch_stats"])
variables2 = {**variables2, **updates2}
print("training: max |output difference|:", np.abs(y_t - np.asarray(y_j)).max())
print("per-channel mean / std of the output:", y_t.mean(axis=(0, 2, 3)), y_t.std(axis=(0, 2, 3)))

bn2.eval()
y_t_eval = bn2(x_t).detach().numpy()
y_j_eval = model2.apply(variables2, x_j, train=False)
print("evaluation: max |output difference|:", np.abs(y_t_eval - np.asarray(y_j_eval)).max())
for key in ("running_mean", "running_var"):
    diff = np.abs(getattr(bn2, key).numpy() - np.asarray(variables2["batch_stats"][key])).max()
    print(f"max |{key} difference|:", diff)""",
    """md:
Channels-last data (Flax's NHWC) gives the same numbers with `axis=-1`:""",
    """
model_nhwc = jbn.BatchNorm2d(3, axis=-1)
y_nhwc, _ = model_nhwc.apply(variables2 | {"batch_stats": jbn.init(3)[1]}, x_j.transpose(0, 2, 3, 1),
                              train=True, mutable=["batch_stats"])
print("max |NHWC - torch|:", np.abs(np.asarray(y_nhwc).transpose(0, 3, 1, 2) - y_t).max())""",
    """md:
## `affine` and `track_running_stats`

`affine=False` drops `weight` and `bias`; `track_running_stats=False` drops the running
statistics, and evaluation then uses the batch statistics, as in PyTorch.""",
    """
for affine, track in [(True, True), (False, True), (True, False), (False, False)]:
    m = jbn.BatchNorm2d(3, affine=affine, track_running_stats=track)
    v = m.init(jax.random.key(0), x_j, train=False)
    t = torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track).eval()
    diff = np.abs(t(x_t).detach().numpy() - np.asarray(m.apply(v, x_j, train=False))).max()
    print(f"affine={affine!s:5} track_running_stats={track!s:5} "
          f"collections={sorted(v)}  eval max |diff| vs torch: {diff:.2e}")""",
    """md:
## `momentum=None`: the cumulative average

With `momentum=None` the running statistics are the plain average over all batches seen so far.""",
    """
t = torch.nn.BatchNorm1d(4, momentum=None)
m = jbn.BatchNorm1d(4, momentum=None)
v = m.init(jax.random.key(0), jnp.zeros((8, 4)), train=False)
rng = np.random.default_rng(0)
for step in range(5):
    batch = rng.normal(size=(8, 4)).astype(np.float32) * (step + 1)
    t(torch.from_numpy(batch))
    _, upd = m.apply(v, jnp.asarray(batch), train=True, mutable=["batch_stats"])
    v = {**v, **upd}
print("running_var torch:", t.running_var.numpy())
print("running_var jbn:  ", np.asarray(v["batch_stats"]["running_var"]))
print("max |difference|:", np.abs(t.running_var.numpy() - np.asarray(v["batch_stats"]["running_var"])).max())""",
)

TRAINING = cells(
    """md:
# Training a CNN with and without batch norm

The digits CNN of `python -m jbn demo`: a small ResNet with `jbn.BatchNorm2d(..., axis=-1)` after
every bias-free convolution, trained with SGD (momentum 0.9) at a high learning rate on
scikit-learn's 8x8 handwritten digits, next to the same network without batch norm at the same
learning rate. The code is the demo's own (`jbn._demo`).""",
    """
import time

import matplotlib.pyplot as plt
import numpy as np

from jbn import _demo

data = _demo.load_digits_split(seed=0)
print({k: v.shape for k, v in data.items()})
config = _demo.DemoConfig()
print(config)""",
    """
histories = {}
for name, use_bn in [("with BatchNorm2d", True), ("without batch norm", False)]:
    start = time.perf_counter()
    state, history = _demo.train(config, use_bn, data)
    histories[name] = history
    if use_bn:
        bn_state = state
    print(f"{name:20} test accuracy {history['test_accuracy'][-1]:.2%} "
          f"(train loss {history['train_loss'][-1]:.4f}) in {time.perf_counter() - start:.1f} s")""",
    """
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
for name, h in histories.items():
    epochs = np.arange(1, len(h["train_loss"]) + 1)
    ax_loss.plot(epochs, h["train_loss"], marker="o", label=name)
    ax_acc.plot(epochs, 100 * np.asarray(h["test_accuracy"]), marker="o", label=name)
ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title=f"Training loss, lr={config.lr}")
ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(0, 100),
           title="Test accuracy (running statistics)")
for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
plt.show()""",
    """md:
Without batch norm the same learning rate blows the network up: its loss stays at the chance
level log(10) ≈ 2.30 and the accuracy at 10%. With batch norm it trains to near-perfect test
accuracy.

## The running statistics of one layer over training

`train` records the running mean and variance of the stem's batch norm (`bn_stem`, 16 channels)
after every step. They follow the batch statistics with `momentum=0.1` and are what evaluation
(`train=False`) uses.""",
    """
h = histories["with BatchNorm2d"]
means, variances = np.asarray(h["running_mean"]), np.asarray(h["running_var"])
steps = np.arange(1, len(means) + 1)
fig, (ax_m, ax_v) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
for c in range(0, means.shape[1], 3):
    ax_m.plot(steps, means[:, c], label=f"channel {c}")
    ax_v.plot(steps, variances[:, c], label=f"channel {c}")
ax_m.set(xlabel="training step", ylabel="running_mean", title="bn_stem running mean")
ax_v.set(xlabel="training step", ylabel="running_var", yscale="log", title="bn_stem running variance")
for ax in (ax_m, ax_v):
    ax.grid(alpha=0.3)
ax_m.legend(fontsize=8)
plt.show()
final = bn_state.batch_stats["bn_stem"]
print("num_batches_tracked:", int(final["num_batches_tracked"]), "=", len(steps), "steps")""",
)

FROM_PYTORCH = cells(
    """md:
# From PyTorch to Flax: a Conv-BN network with identical outputs

A small network is built and trained for a few steps in PyTorch (so that the running statistics
are not the defaults), then its weights go into the equivalent Flax model: convolution kernels
transposed from PyTorch's `(O, I, H, W)` to Flax's `(H, W, I, O)`, batch-norm layers through
`jbn.from_torch_state_dict`. Evaluation outputs agree.""",
    """
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import jbn

torch.manual_seed(0)


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):                                  # x: (N, 3, H, W)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):                    # x: (N, H, W, 3)
        x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name="conv1")(x)
        x = nn.relu(jbn.BatchNorm2d(8, axis=-1, name="bn1")(x, train))
        x = nn.Conv(16, (3, 3), strides=2, padding=1, use_bias=False, name="conv2")(x)
        x = nn.relu(jbn.BatchNorm2d(16, axis=-1, name="bn2")(x, train))
        return nn.Dense(5, name="fc")(x.mean(axis=(1, 2)))""",
    """md:
Train the PyTorch network for a few steps so the running statistics and weights move:""",
    """
net = TorchNet()
opt = torch.optim.SGD(net.parameters(), lr=0.1)
for _ in range(20):
    xb = torch.randn(16, 3, 12, 12) * 3 + 1
    loss = net(xb).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
net.eval()
print({k: tuple(v.shape) for k, v in net.state_dict().items()})""",
    """
sd = net.state_dict()


def layer(prefix):
    return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}


bn1, bn2 = jbn.from_torch_state_dict(layer("bn1")), jbn.from_torch_state_dict(layer("bn2"))
variables = {
    "params": {
        "conv1": {"kernel": jnp.asarray(sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))},
        "conv2": {"kernel": jnp.asarray(sd["conv2.weight"].numpy().transpose(2, 3, 1, 0))},
        "bn1": bn1["params"],
        "bn2": bn2["params"],
        "fc": {"kernel": jnp.asarray(sd["fc.weight"].numpy().T), "bias": jnp.asarray(sd["fc.bias"].numpy())},
    },
    "batch_stats": {"bn1": bn1["batch_stats"], "bn2": bn2["batch_stats"]},
}
# Same tree as the Flax model's own initialization:
reference = FlaxNet().init(jax.random.key(0), jnp.ones((1, 12, 12, 3)), train=False)
print(jax.tree.structure(reference) == jax.tree.structure(variables))
print("bn2 num_batches_tracked:", int(variables["batch_stats"]["bn2"]["num_batches_tracked"]))""",
    """
x = torch.randn(8, 3, 12, 12) * 3 + 1
with torch.no_grad():
    out_torch = net(x).numpy()
out_flax = FlaxNet().apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), train=False)
print("evaluation: max |torch - flax|:", np.abs(out_torch - np.asarray(out_flax)).max())""",
    """md:
Training mode agrees too, running statistics included, and `jbn.to_torch_state_dict` takes
them back to PyTorch:""",
    """
net.train()
out_torch = net(x).detach().numpy()
out_flax, updates = FlaxNet().apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                                    train=True, mutable=["batch_stats"])
print("training: max |torch - flax|:", np.abs(out_torch - np.asarray(out_flax)).max())
back = jbn.to_torch_state_dict({"params": variables["params"]["bn2"], "batch_stats": updates["batch_stats"]["bn2"]})
for key in ("running_mean", "running_var", "num_batches_tracked"):
    print(key, "max |diff|:", np.abs(net.bn2.state_dict()[key].numpy() - back[key]).max())""",
    """md:
## The whole model at once, both ways

`jbn.load_torch_state_dict` does all of the above in one call (here the layers have the same
names in both models; a `name_map` maps them otherwise), and `jbn.export_torch_state_dict`
goes back: train in JAX, then load the result into the PyTorch model.""",
    """
import optax

template = FlaxNet().init(jax.random.key(0), jnp.ones((1, 12, 12, 3)), train=False)
# The torch network as it is now, after its training-mode call above, against the
# variables built by hand with the Flax model's own update from that call:
loaded = jbn.load_torch_state_dict(template, net.state_dict())
after_step = {**variables, **updates}
print("max |loaded - by hand|:", max(
    float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(after_step), strict=True)))

tx = optax.sgd(0.1)


@jax.jit
def train_step(params, stats, opt_state, xb):
    def loss(p):
        out, updates = FlaxNet().apply({"params": p, "batch_stats": stats}, xb, train=True,
                                       mutable=["batch_stats"])
        return jnp.square(out).mean(), updates["batch_stats"]

    grads, stats = jax.grad(loss, has_aux=True)(params)
    change, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, change), stats, opt_state


params, stats = loaded["params"], loaded["batch_stats"]
opt_state = tx.init(params)
for i in range(10):
    xb = jax.random.normal(jax.random.key(i), (16, 12, 12, 3)) * 3 + 1
    params, stats, opt_state = train_step(params, stats, opt_state, xb)
trained = {"params": params, "batch_stats": stats}

net_back = TorchNet()
net_back.load_state_dict(jbn.export_torch_state_dict(trained, net_back.state_dict()))
net_back.eval()
with torch.no_grad():
    out_torch = net_back(x).numpy()
out_flax = FlaxNet().apply(trained, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), train=False)
print("trained in JAX, run in PyTorch: max |torch - flax|:", np.abs(out_torch - np.asarray(out_flax)).max())
print("bn2 num_batches_tracked:", int(net_back.bn2.num_batches_tracked))""",
)

MULTI_DEVICE = cells(
    """md:
# SyncBatchNorm on 8 devices equals batch norm on the global batch

The first cell asks for 8 CPU devices; it has to run before JAX starts its backend.""",
    """
import jax

jax.config.update("jax_num_cpu_devices", 8)
print(jax.devices())""",
    """
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import jbn

n_dev = jax.device_count()
mesh = jax.make_mesh((n_dev,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(8 * n_dev, 6, 5, 5)).astype(np.float32) * 4 + 3)  # (N, C, H, W)
sync = jbn.SyncBatchNorm(6, axis_name="batch")
single = jbn.BatchNorm2d(6)
variables = single.init(jax.random.key(0), x, train=False)
print("global batch", x.shape, "->", x.shape[0] // n_dev, "images per device")""",
    """md:
Each device sees an eighth of the batch; `SyncBatchNorm` combines the per-device statistics
with one collective, so every device normalizes with the statistics of the whole batch. The
updated running statistics, the same on every device, leave `shard_map` as one replicated
value (`P()`), which its replication check accepts.""",
    """
def sync_step(variables, x_local):
    return sync.apply(variables, x_local, train=True, mutable=["batch_stats"])


sharded = jax.jit(jax.shard_map(sync_step, mesh=mesh, in_specs=(P(), P("batch")),
                                out_specs=(P("batch"), P())))
y_sync, stats_sync = sharded(variables, x)
y_single, stats_single = single.apply(variables, x, train=True, mutable=["batch_stats"])

print("max |output difference|:", float(jnp.abs(y_sync - y_single).max()))
for key in ("running_mean", "running_var"):
    diff = jnp.abs(stats_sync["batch_stats"][key] - stats_single["batch_stats"][key]).max()
    print(f"max |{key} difference|:", float(diff))""",
    """md:
Per-device batch norm (no synchronization) would normalize each shard with its own statistics,
which differ from the global ones:""",
    """
local = jax.jit(jax.shard_map(
    lambda v, xl: single.apply(v, xl, train=True, mutable=["batch_stats"])[0],
    mesh=mesh, in_specs=(P(), P("batch")), out_specs=P("batch")))
print("unsynchronized: max |output difference|:", float(jnp.abs(local(variables, x) - y_single).max()))""",
    """md:
## Unequal batches with `jax.vmap`

`axis_name` works with any map that binds it. With `vmap` and a `mask`, devices (here: vmapped
groups) may hold different numbers of valid images, and the statistics are still exact:""",
    """
groups = x.reshape(n_dev, -1, 6, 5, 5)
counts = np.arange(n_dev) % groups.shape[1] + 1              # valid images per group
mask = np.arange(groups.shape[1])[None, :] < counts[:, None]  # (groups, per group)
mask = jnp.asarray(np.broadcast_to(mask[:, :, None, None], (n_dev, groups.shape[1], 5, 5)))
y_v, st_v = jax.vmap(
    lambda xg, mg: sync.apply(variables, xg, train=True, mask=mg, mutable=["batch_stats"]),
    axis_name="batch", out_axes=(0, None))(groups, mask)
valid = jnp.concatenate([groups[i, : counts[i]] for i in range(n_dev)])
y_ref, st_ref = single.apply(variables, valid, train=True, mutable=["batch_stats"])
y_v_valid = jnp.concatenate([y_v[i, : counts[i]] for i in range(n_dev)])
print("valid images per group:", counts.tolist())
print("max |output difference| on valid images:", float(jnp.abs(y_v_valid - y_ref).max()))
print("max |running_var difference|:", float(jnp.abs(st_v["batch_stats"]["running_var"] - st_ref["batch_stats"]["running_var"]).max()))""",
)


def write(name: str, notebook_cells: list) -> None:
    nb = new_notebook(cells=notebook_cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    write("01_quickstart.ipynb", QUICKSTART)
    write("02_training.ipynb", TRAINING)
    write("03_from_pytorch.ipynb", FROM_PYTORCH)
    write("04_multi_device.ipynb", MULTI_DEVICE)
