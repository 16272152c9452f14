"""One ResNet training step with jbn's BatchNorm2d, with flax.linen.BatchNorm, and in torch.

Run from the repository root::

    python benchmarks/resnet_step.py [--quick] [--out benchmarks/RESULTS.md]

A training step is forward, backward and an optax SGD-with-momentum update (torch:
``torch.optim.SGD``) of a ResNet (BasicBlock ResNet-18 on a CPU, Bottleneck ResNet-50
on a GPU) on random images and labels. The three steps run interleaved (one call of
each per repeat, median of the repeats, compilation excluded). The Flax networks are
NHWC; torch runs NCHW on a CPU and ``channels_last`` with bfloat16 autocast on a GPU.

On a CPU the same network with a per-channel scale and bias in place of batch norm
(no batch statistics) is timed too: the step less that one is batch norm's part of
it.

The script also reads the compiled HLO of jbn's step to check that the normalization
still fuses with the ReLU and the residual add (no batch-sized intermediate between
them), compared with the same count for flax.linen.BatchNorm. ``--out`` appends the
tables to that file.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import jbn  # noqa: E402

NUM_CLASSES = 10
WRITTEN = "batch-sized arrays written"
# The Flax networks, by their Norm's kind.
NETWORKS = {"jbn": "flax + jbn.BatchNorm2d", "flax": "flax + flax.linen.BatchNorm",
            "affine": "flax + affine only (no batch statistics)"}


# ----------------------------------------------------------------------------- Flax


class Norm(nn.Module):
    """A batch norm over the last (channel) axis: jbn's or flax.linen's, PyTorch's eps/momentum.

    Both take their statistics in float32 and return the input's dtype. ``"affine"`` is
    no batch norm: a per-channel scale and bias, without batch statistics, the cost of
    the step without batch norm's reductions (a floor for any batch norm).
    """

    kind: str  # "jbn", "flax" or "affine"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.kind == "jbn":
            return jbn.BatchNorm2d(x.shape[-1], axis=-1)(x, train)
        if self.kind == "affine":
            scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
            bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
            # A running statistic, so that the step has the same collections.
            self.variable("batch_stats", "unused", jnp.zeros, ())
            return (x * scale + bias).astype(x.dtype)
        return nn.BatchNorm(use_running_average=not train, axis=-1, momentum=0.9,
                            epsilon=1e-5, dtype=x.dtype)(x)


class Block(nn.Module):
    """ResNet block (BasicBlock, or Bottleneck with ``bottleneck``), NHWC."""

    features: int
    stride: int
    norm: str
    bottleneck: bool
    dtype: Any = jnp.float32  # of the convolutions' arithmetic and outputs

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        out_features = self.features * (4 if self.bottleneck else 1)
        if self.bottleneck:
            y = nn.relu(Norm(self.norm)(conv(self.features, (1, 1))(x), train))
            y = nn.relu(Norm(self.norm)(conv(self.features, (3, 3), self.stride)(y), train))
            y = Norm(self.norm)(conv(out_features, (1, 1))(y), train)
        else:
            y = nn.relu(Norm(self.norm)(conv(self.features, (3, 3), self.stride)(x), train))
            y = Norm(self.norm)(conv(out_features, (3, 3))(y), train)
        if x.shape[-1] != out_features or self.stride != 1:
            x = Norm(self.norm)(conv(out_features, (1, 1), self.stride)(x), train)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """ResNet-18 (``(2, 2, 2, 2)``, BasicBlock) or ResNet-50 (``(3, 4, 6, 3)``, Bottleneck).

    ``dtype``: the compute dtype of every layer (float32 parameters, as with torch's
    autocast); the logits are float32.
    """

    stages: Sequence[int]
    bottleneck: bool
    norm: str
    width: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(self.width, (7, 7), 2, padding=3, use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(Norm(self.norm)(x, train))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, blocks in enumerate(self.stages):
            for j in range(blocks):
                x = Block(self.width * 2**i, 2 if (i > 0 and j == 0) else 1, self.norm,
                          self.bottleneck, self.dtype)(x, train)
        return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=(1, 2), dtype=jnp.float32))


def flax_step(model: ResNet, images: jax.Array, labels: jax.Array) -> tuple[Callable, Any]:
    """A jitted training step ``(variables, opt_state, images, labels) -> (variables,
    opt_state, loss)`` and its arguments: the batch is one (not a constant of the
    program, which XLA could fold or hold with the program)."""
    variables = model.init(jax.random.key(0), images[:2], train=False)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(variables["params"])

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                      images.astype(model.dtype), train=True,
                                      mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels).mean()
        return loss, updates["batch_stats"]

    @jax.jit
    def step(variables, opt_state, images, labels):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"], variables["batch_stats"], images, labels)
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, "batch_stats": batch_stats}, opt_state, loss

    return step, (variables, opt_state, images, labels)


# ----------------------------------------------------------------------------- torch


class TorchBlock(torch.nn.Module):
    """The same block in torch (NCHW modules)."""

    def __init__(self, cin: int, features: int, stride: int, bottleneck: bool):
        super().__init__()
        out = features * (4 if bottleneck else 1)
        nn_ = torch.nn
        if bottleneck:
            self.body = nn_.Sequential(
                nn_.Conv2d(cin, features, 1, bias=False), nn_.BatchNorm2d(features), nn_.ReLU(),
                nn_.Conv2d(features, features, 3, stride, 1, bias=False), nn_.BatchNorm2d(features),
                nn_.ReLU(), nn_.Conv2d(features, out, 1, bias=False), nn_.BatchNorm2d(out))
        else:
            self.body = nn_.Sequential(
                nn_.Conv2d(cin, features, 3, stride, 1, bias=False), nn_.BatchNorm2d(features),
                nn_.ReLU(), nn_.Conv2d(features, out, 3, 1, 1, bias=False), nn_.BatchNorm2d(out))
        self.skip = nn_.Identity()
        if cin != out or stride != 1:
            self.skip = nn_.Sequential(nn_.Conv2d(cin, out, 1, stride, bias=False),
                                       nn_.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def torch_resnet(stages: Sequence[int], bottleneck: bool, width: int = 64) -> torch.nn.Module:
    """ResNet-18/50-like network built from torch.nn modules."""
    layers: list[torch.nn.Module] = [
        torch.nn.Conv2d(3, width, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(width),
        torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1)]
    cin = width
    for i, blocks in enumerate(stages):
        for j in range(blocks):
            block = TorchBlock(cin, width * 2**i, 2 if (i > 0 and j == 0) else 1, bottleneck)
            layers.append(block)
            cin = width * 2**i * (4 if bottleneck else 1)
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(cin, NUM_CLASSES)]
    return torch.nn.Sequential(*layers)


def torch_step(stages, bottleneck, images: np.ndarray, labels: np.ndarray) -> Callable:
    """A training step of the torch network (channels_last + bf16 autocast on a GPU)."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = torch_resnet(stages, bottleneck).to(device).to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.from_numpy(np.moveaxis(images, -1, 1).copy()).to(device).contiguous(memory_format=fmt)
    y = torch.from_numpy(labels).long().to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


# ----------------------------------------------------------------------------- HLO check


_INSTRUCTION = re.compile(r"= \w+\[([\d,]+)\]\S* (\w+)\(")


def _big_ops(comp: str, min_elements: int) -> list[str]:
    """Opcodes of the instructions in ``comp`` whose result has ``min_elements`` or more."""
    return [op for dims, op in _INSTRUCTION.findall(comp)
            if math.prod(int(d) for d in dims.split(",")) >= min_elements]


def smallest_activation(stages: Sequence[int], bottleneck: bool, batch: int, size: int) -> int:
    """Elements of the last stage's activations: the stem divides the size by 4, each later stage by 2."""
    last = size // 2 ** (len(stages) + 1)
    return batch * last * last * 64 * 2 ** (len(stages) - 1) * (4 if bottleneck else 1)


def fusion_report(step: Callable, args: Any, min_elements: int) -> dict[str, int]:
    """Counts, in the compiled HLO of ``step``, the ReLUs that share a fusion with the normalization.

    An array is batch-sized when it has ``min_elements`` or more (the smallest
    activation), whatever its rank: jbn normalizes a two-dimensional view of the
    activations on the CPU. A ReLU is a ``maximum`` on a batch-sized array; it is
    "fused with the normalization" when the computation that holds it also multiplies a
    batch-sized array (the scale of the normalization; the ReLU's own gradient mask in
    the backward pass is a ``select``, not counted). Also counts the kernels that write
    a batch-sized array (materialized arrays; the larger convolution kernels' updates
    count alike for every network): the batch-sized fusions and elementwise
    instructions of every computation that is not itself fused (the entry computation,
    and on a GPU the command buffers it calls).

    Returns the counts, and the compiled HLO text.
    """
    text = step.lower(*args).compile().as_text()
    comps = _common.hlo_computations(text)
    relu_total = relu_fused = 0
    for comp, _ in comps:
        ops = _big_ops(comp, min_elements)
        relus = ops.count("maximum")
        relu_total += relus
        if relus and "multiply" in ops:
            relu_fused += relus
    unfused = [c for c, fused in comps if not fused]
    written = sum(op in ("fusion", "add", "multiply", "subtract")
                  for c in unfused for op in _big_ops(c, min_elements))
    return {"relu": relu_total, "relu fused with normalize": relu_fused,
            WRITTEN: written}, text


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny network and images")
    parser.add_argument("--out", default=None, help="append the markdown tables to this file")
    parser.add_argument("--repeats", type=_common.positive_int, default=None)
    parser.add_argument("--hlo-dir", default=None, help="write each compiled step here")
    args = parser.parse_args(argv)
    gpu = _common.on_gpu()
    if args.quick:
        stages, bottleneck, batch, size, name = (1, 1), False, 4, 32, "ResNet-10-like (quick)"
    elif gpu:
        stages, bottleneck, batch, size, name = (3, 4, 6, 3), True, 256, 224, "ResNet-50"
    else:
        stages, bottleneck, batch, size, name = (2, 2, 2, 2), False, 8, 64, "ResNet-18"
    # On a CPU, batch norm is a few milliseconds of a 0.5 s step: enough repeats for the
    # medians to tell them apart.
    repeats = args.repeats or (3 if args.quick else 11 if gpu else 41)
    dtype = jnp.bfloat16 if gpu else jnp.float32
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)

    smallest = smallest_activation(stages, bottleneck, batch, size)
    # On a GPU the affine-only network is left out: a third compilation of ResNet-50
    # would not fit the GPU run's time.
    kinds = ("jbn", "flax") if gpu else ("jbn", "flax", "affine")
    steps: dict[str, Callable[[], Any]] = {}
    fusion: dict[str, dict[str, int]] = {}
    with _common.progress() as bar:
        task = bar.add_task(f"{name} step: compile", total=len(kinds) + 1)
        for kind in kinds:
            model = ResNet(stages, bottleneck, kind, dtype=dtype)
            step, state = flax_step(model, jnp.asarray(images), jnp.asarray(labels))
            if kind != "affine":
                fusion[kind], hlo = fusion_report(step, state, smallest)
                if args.hlo_dir:
                    os.makedirs(args.hlo_dir, exist_ok=True)
                    with open(os.path.join(args.hlo_dir, f"step-{kind}.hlo"), "w") as f:
                        f.write(hlo)
            # Each step starts from the same variables: the time is that of one update.
            steps[NETWORKS[kind]] = functools.partial(step, *state)
            bar.advance(task)
        steps["torch"] = torch_step(stages, bottleneck, images, labels)
        bar.advance(task)
        bar.update(task, description=f"{name} step: timing")
        med = _common.interleaved_medians(steps, repeats=repeats, warmup=2)

    jbn_ms = med[NETWORKS["jbn"]]
    rows = [[impl, ms, jbn_ms / ms] for impl, ms in med.items()]
    share = []
    if NETWORKS["affine"] in med:
        floor = med[NETWORKS["affine"]]
        share = ["", "Batch norm's part of the step (the step's time less the affine-only one's): "
                 + ", ".join(f"{kind} {med[NETWORKS[kind]] - floor:.1f} ms"
                             for kind in ("jbn", "flax")) + "."]
    precision = ("bfloat16 compute (float32 parameters and batch statistics), torch with "
                 "autocast, channels_last") if gpu else "float32"
    text = "\n".join([
        f"## One training step of {name}",
        "",
        *_common.machine_lines(),
        f"- batch {batch}, images {size}x{size}x3, {precision}; forward, backward, SGD with "
        f"momentum; median of {repeats} interleaved repeats",
        "",
        _common.markdown_table(["network", "step ms", "jbn step / this"], rows),
        *share,
        "",
        "### Fusion of the normalization with ReLU and the residual add (compiled HLO)",
        "",
        _common.markdown_table(["batch norm"] + list(fusion["jbn"]),
                               [[k] + list(v.values()) for k, v in fusion.items()]),
        "",
    ])
    _common.print_and_append(text, args.out)


if __name__ == "__main__":
    main()
