"""The demo: a small ResNet-style CNN on scikit-learn's handwritten digits, with and without BN.

Everything here needs the ``demo`` extra (optax, scikit-learn, matplotlib, rich), which
is imported by this module only; ``import jbn`` never loads it. ``python -m jbn demo``
calls :func:`run_demo`; the notebooks call :func:`load_digits_split` and :func:`train`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import PartitionSpec as P

import jbn

AXIS_NAME = "batch"
CHECKPOINT_NAME = "checkpoint.msgpack"
METRICS_NAME = "metrics.json"
PLOT_NAME = "curves.png"
RUN_NAMES = ("bn", "plain")
# The layer whose running statistics the history records (per training step).
TRACKED_LAYER = "bn_stem"


class DemoError(ValueError):
    """Settings the demo cannot run with (reported as a one-line error by the CLI)."""


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run; the defaults are ``python -m jbn demo``'s.

    Attributes:
      epochs: total number of training epochs (a resumed run continues up to it).
      seed: seeds the train/test split, the initialization and the shuffling.
      lr: learning rate of SGD with momentum 0.9, the same for both networks.
      batch_size: global batch size; the last incomplete batch of an epoch is dropped.
      devices: number of local devices for data parallelism (SyncBatchNorm when > 1).
      width: channels of the first stage (the second has twice as many).
      test_fraction: share of the 1,797 images held out for testing.
    """

    epochs: int = 15
    seed: int = 0
    lr: float = 0.5
    batch_size: int = 64
    devices: int = 1
    width: int = 16
    test_fraction: float = 0.2


# --------------------------------------------------------------------------- data


def load_digits_split(seed: int, test_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, split into train and test sets (stratified).

    Args:
      seed: ``random_state`` of the split.
      test_fraction: share of the images in the test set.

    Returns:
      ``{"x_train", "y_train", "x_test", "y_test"}``: images ``(N, 8, 8, 1)`` float32
      in [0, 1] (NHWC, Flax's layout) and labels ``(N,)`` int32.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


# -------------------------------------------------------------------------- model


def _norm(features: int, name: str, use_bn: bool, axis_name: str | None) -> Callable[..., Any]:
    """The normalization after a convolution: BatchNorm2d, SyncBatchNorm, or nothing."""
    if not use_bn:
        return lambda x, train: x
    if axis_name is None:
        return jbn.BatchNorm2d(features, axis=-1, name=name)
    return jbn.SyncBatchNorm(features, axis=-1, axis_name=axis_name, name=name)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with normalization and a shortcut (1x1 when the shape changes).

    Attributes:
      features: output channels.
      strides: stride of the first convolution (2 halves height and width).
      use_bn: normalize after every convolution (bias-free then); without it the
        convolutions carry a bias.
      axis_name: mapped axis for SyncBatchNorm; None for BatchNorm2d.
    """

    features: int
    strides: int = 1
    use_bn: bool = True
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``(N, H, W, C_in) -> (N, H / strides, W / strides, features)``."""
        conv = lambda f, k, s, name: nn.Conv(  # noqa: E731
            f, (k, k), strides=(s, s), use_bias=not self.use_bn, name=name
        )
        y = conv(self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(_norm(self.features, "bn1", self.use_bn, self.axis_name)(y, train))
        y = conv(self.features, 3, 1, "conv2")(y)
        y = _norm(self.features, "bn2", self.use_bn, self.axis_name)(y, train)
        if x.shape[-1] != self.features or self.strides != 1:
            x = conv(self.features, 1, self.strides, "conv_proj")(x)
            x = _norm(self.features, "bn_proj", self.use_bn, self.axis_name)(x, train)
        return nn.relu(x + y)


class DigitsResNet(nn.Module):
    """A small ResNet for 8x8 digits: stem, two residual stages, global pooling, classifier.

    Input ``(N, 8, 8, 1)`` float32 (NHWC), output logits ``(N, 10)``. With ``use_bn``
    every convolution is bias-free and followed by ``jbn.BatchNorm2d(..., axis=-1)``
    (``jbn.SyncBatchNorm`` when ``axis_name`` is set); without it the same network
    has biases and no normalization. Both versions name their layers alike, so
    ``BatchNorm2d`` and ``SyncBatchNorm`` variables are interchangeable.

    Attributes:
      width: channels of the first stage; the second stage has ``2 * width``.
      use_bn: with or without batch normalization.
      axis_name: mapped axis for SyncBatchNorm (data parallelism); None otherwise.
    """

    width: int = 16
    use_bn: bool = True
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``(N, 8, 8, 1) -> (N, 10)`` logits."""
        x = nn.Conv(self.width, (3, 3), use_bias=not self.use_bn, name="conv_stem")(x)
        x = nn.relu(_norm(self.width, "bn_stem", self.use_bn, self.axis_name)(x, train))
        x = ResidualBlock(self.width, 1, self.use_bn, self.axis_name, name="block1")(x, train)
        x = ResidualBlock(2 * self.width, 2, self.use_bn, self.axis_name, name="block2")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(10, name="head")(x)


class TrainState(train_state.TrainState):
    """Flax's ``TrainState`` (params, optimizer state, step) plus the running statistics."""

    batch_stats: Any = None


# ----------------------------------------------------------------------- training


def create_state(config: DemoConfig, use_bn: bool, sample: np.ndarray) -> TrainState:
    """Initializes the network (``init`` does not touch the statistics) and SGD with momentum."""
    model = DigitsResNet(config.width, use_bn)
    variables = model.init(jax.random.key(config.seed), jnp.asarray(sample), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=optax.sgd(config.lr, momentum=0.9),
    )


def _loss_and_updates(
    model: DigitsResNet, params: Any, batch_stats: Any, x: jax.Array, y: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    variables = {"params": params}
    if model.use_bn:
        variables["batch_stats"] = batch_stats
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        new_stats = updates["batch_stats"]
    else:
        logits, new_stats = model.apply(variables, x, train=True), batch_stats
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    return loss, (accuracy, new_stats)


def make_train_step(config: DemoConfig, use_bn: bool) -> Callable[..., Any]:
    """A jit-compiled step ``(state, x, y) -> (state, loss, accuracy)`` on the global batch.

    With ``config.devices > 1`` the batch is split across that many local devices
    (``shard_map``), the network uses ``jbn.SyncBatchNorm`` so that every device
    normalizes with the global batch's statistics, and the gradients are averaged
    with ``lax.pmean``: the same computation as on one device.
    """
    if config.devices == 1:
        model = DigitsResNet(config.width, use_bn)

        @jax.jit
        def step(state: TrainState, x: jax.Array, y: jax.Array):
            grad_fn = jax.value_and_grad(
                lambda p: _loss_and_updates(model, p, state.batch_stats, x, y), has_aux=True
            )
            (loss, (accuracy, new_stats)), grads = grad_fn(state.params)
            state = state.apply_gradients(grads=grads, batch_stats=new_stats)
            return state, loss, accuracy

        return step

    model = DigitsResNet(config.width, use_bn, axis_name=AXIS_NAME)
    mesh = jax.make_mesh(
        (config.devices,), (AXIS_NAME,), axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.local_devices()[: config.devices],
    )

    def local_step(state: TrainState, x: jax.Array, y: jax.Array):
        grad_fn = jax.value_and_grad(
            lambda p: _loss_and_updates(model, p, state.batch_stats, x, y), has_aux=True
        )
        (loss, (accuracy, new_stats)), grads = grad_fn(state.params)
        # Equal shards: the mean of the per-device means is the global mean.
        grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), AXIS_NAME)
        state = state.apply_gradients(grads=grads, batch_stats=new_stats)
        return state, loss, accuracy

    specs = {"mesh": mesh, "in_specs": (P(), P(AXIS_NAME), P(AXIS_NAME)), "out_specs": (P(), P(), P())}
    return jax.jit(jax.shard_map(local_step, check_vma=False, **specs))


def make_eval_fn(config: DemoConfig, use_bn: bool) -> Callable[..., Any]:
    """A jit-compiled ``(state, x, y) -> (loss, accuracy)`` in evaluation mode (running statistics)."""
    model = DigitsResNet(config.width, use_bn)

    @jax.jit
    def evaluate(state: TrainState, x: jax.Array, y: jax.Array):
        variables = {"params": state.params}
        if use_bn:
            variables["batch_stats"] = state.batch_stats
        logits = model.apply(variables, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    return evaluate


def empty_history() -> dict[str, list[Any]]:
    """Per-epoch metrics and the tracked layer's running statistics per step."""
    return {
        "train_loss": [],
        "train_accuracy": [],
        "test_loss": [],
        "test_accuracy": [],
        "seconds": [],
        "running_mean": [],  # one (C,) list per training step, TRACKED_LAYER
        "running_var": [],
    }


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffling of epoch ``epoch`` (0-based): a function of the seed and epoch only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class Trainer:
    """One network's compiled training step and evaluation, epoch by epoch.

    Args:
      config: the run's settings.
      use_bn: the network with batch normalization or the plain one.
      data: the split from :func:`load_digits_split`.
    """

    def __init__(self, config: DemoConfig, use_bn: bool, data: dict[str, np.ndarray]) -> None:
        self.config, self.use_bn, self.data = config, use_bn, data
        self.step_fn = make_train_step(config, use_bn)
        self.eval_fn = make_eval_fn(config, use_bn)
        self.steps = len(data["x_train"]) // config.batch_size

    def init(self) -> TrainState:
        """A freshly initialized state (seeded by ``config.seed``)."""
        return create_state(self.config, self.use_bn, self.data["x_train"][:1])

    def run_epoch(
        self,
        state: TrainState,
        epoch: int,
        history: dict[str, list[Any]],
        on_step: Callable[[int, float, float], None] | None = None,
    ) -> TrainState:
        """Trains epoch ``epoch`` (0-based), evaluates, and appends to ``history``.

        The history gets the train loss and accuracy averaged over the epoch's
        batches, the test loss and accuracy with the running statistics, and the
        running mean and variance of ``TRACKED_LAYER`` after every step (BN only).
        ``on_step(step, loss, accuracy)`` is called after every step.
        """
        x_train, y_train = self.data["x_train"], self.data["y_train"]
        batch = self.config.batch_size
        start = time.perf_counter()
        order = epoch_permutation(self.config.seed, epoch, len(x_train))
        losses, accuracies, means, variances = [], [], [], []
        for i in range(self.steps):
            idx = order[i * batch : (i + 1) * batch]
            state, loss, accuracy = self.step_fn(state, x_train[idx], y_train[idx])
            losses.append(loss)
            accuracies.append(accuracy)
            if self.use_bn:
                means.append(state.batch_stats[TRACKED_LAYER]["running_mean"])
                variances.append(state.batch_stats[TRACKED_LAYER]["running_var"])
            if on_step is not None:
                on_step(i, float(loss), float(accuracy))
        test_loss, test_accuracy = self.eval_fn(state, self.data["x_test"], self.data["y_test"])
        history["train_loss"].append(float(np.mean(jax.device_get(losses))))
        history["train_accuracy"].append(float(np.mean(jax.device_get(accuracies))))
        history["test_loss"].append(float(test_loss))
        history["test_accuracy"].append(float(test_accuracy))
        history["running_mean"].extend(np.asarray(m).tolist() for m in jax.device_get(means))
        history["running_var"].extend(np.asarray(v).tolist() for v in jax.device_get(variances))
        history["seconds"].append(time.perf_counter() - start)
        return state


def train(
    config: DemoConfig, use_bn: bool, data: dict[str, np.ndarray]
) -> tuple[TrainState, dict[str, list[Any]]]:
    """Trains one network for ``config.epochs`` epochs from a fresh initialization.

    Args:
      config: the run's settings.
      use_bn: the network with batch normalization or the plain one.
      data: the split from :func:`load_digits_split`.

    Returns:
      ``(state, history)``: the final state (``params``, ``batch_stats``, ``opt_state``)
      and the history of :meth:`Trainer.run_epoch` (lists, one entry per epoch; the
      running statistics one ``(C,)`` entry per step).
    """
    trainer = Trainer(config, use_bn, data)
    state, history = trainer.init(), empty_history()
    for epoch in range(config.epochs):
        state = trainer.run_epoch(state, epoch, history)
    return state, history


# --------------------------------------------------------------------- checkpoint


def save_checkpoint(
    path: Path, config: DemoConfig, epoch: int, states: dict[str, TrainState],
    histories: dict[str, dict[str, list[Any]]],
) -> None:
    """Writes params, batch_stats, optimizer state, step and epoch of both runs (msgpack)."""
    payload = {
        "epoch": epoch,
        "config": json.dumps(dataclasses.asdict(config)),
        "runs": {
            name: {
                "state": flax.serialization.to_state_dict(
                    {"params": s.params, "batch_stats": s.batch_stats,
                     "opt_state": s.opt_state, "step": s.step}
                ),
                "history": json.dumps(histories[name]),
            }
            for name, s in states.items()
        },
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(payload)))
    tmp.replace(path)


def load_checkpoint(
    path: Path, config: DemoConfig, data: dict[str, np.ndarray]
) -> tuple[int, dict[str, Any], dict[str, TrainState], dict[str, dict[str, list[Any]]]]:
    """Restores :func:`save_checkpoint`'s file into fresh states of ``config``'s networks.

    Returns:
      ``(epoch, saved_config, states, histories)``; the arrays are bit for bit the
      saved ones, running statistics and ``num_batches_tracked`` included.
    """
    raw = flax.serialization.msgpack_restore(path.read_bytes())
    states, histories = {}, {}
    for name in RUN_NAMES:
        fresh = create_state(config, name == "bn", data["x_train"][:1])
        target = {"params": fresh.params, "batch_stats": fresh.batch_stats,
                  "opt_state": fresh.opt_state, "step": fresh.step}
        restored = flax.serialization.from_state_dict(target, raw["runs"][name]["state"])
        restored = jax.tree.map(jnp.asarray, restored)
        states[name] = fresh.replace(**restored)
        histories[name] = json.loads(raw["runs"][name]["history"])
    return int(raw["epoch"]), json.loads(raw["config"]), states, histories


# -------------------------------------------------------------------- the demo


def plot_curves(histories: dict[str, dict[str, list[Any]]], lr: float, path: Path) -> None:
    """Writes the train loss and test accuracy of both runs per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"bn": "with jbn.BatchNorm2d", "plain": "without batch norm"}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name, h in histories.items():
        epochs = np.arange(1, len(h["train_loss"]) + 1)
        ax_loss.plot(epochs, h["train_loss"], marker="o", label=labels[name])
        ax_acc.plot(epochs, np.asarray(h["test_accuracy"]) * 100, marker="o", label=labels[name])
    ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title=f"Training loss (lr={lr:g})")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(0, 100), title="Test accuracy")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="center right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare_out_dir(out_dir: Path) -> None:
    """Creates ``out_dir`` and writes a file there, so that a path that cannot take
    the outputs fails before any training; raises :class:`DemoError` otherwise."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise DemoError(f"--out {out_dir}: not a directory that files can be written to "
                        f"({err.strerror or err})") from err


def plural(n: int, noun: str) -> str:
    """``"1 epoch"``, ``"2 epochs"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_demo(config: DemoConfig, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Trains both networks with a progress bar, prints a summary, writes plot and checkpoint.

    Args:
      config: the settings; ``config.devices`` must already be available.
      out_dir: directory for ``curves.png``, ``checkpoint.msgpack`` and ``metrics.json``.
      resume: continue from ``out_dir``'s checkpoint up to ``config.epochs``.

    Returns:
      The metrics written to ``metrics.json``.

    Raises:
      DemoError: an ``out_dir`` that files cannot be written to, a batch larger than
        the training set; on resume, a missing checkpoint,
        one made with other settings, or
        one that already has ``config.epochs`` epochs.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    console = Console()
    wall_start = time.perf_counter()
    prepare_out_dir(out_dir)
    data = load_digits_split(config.seed, config.test_fraction)
    if config.batch_size > len(data["x_train"]):
        raise DemoError(
            f"--batch-size {config.batch_size} exceeds the {len(data['x_train'])} training images"
        )
    ckpt_path = out_dir / CHECKPOINT_NAME
    start_epoch = 0
    histories = {name: empty_history() for name in RUN_NAMES}
    trainers = {name: Trainer(config, name == "bn", data) for name in RUN_NAMES}
    if resume:
        if not ckpt_path.exists():
            raise DemoError(f"--resume: no checkpoint at {ckpt_path}")
        try:
            start_epoch, saved, states, histories = load_checkpoint(ckpt_path, config, data)
        except (ValueError, KeyError, TypeError, OSError) as err:  # msgpack's: ValueErrors
            raise DemoError(f"--resume: {ckpt_path} is not a readable checkpoint of this "
                            f"demo ({type(err).__name__}: {err})") from err
        for key in ("seed", "lr", "batch_size", "width", "test_fraction"):
            if saved[key] != getattr(config, key):
                raise DemoError(
                    f"--resume: the checkpoint was made with {key}={saved[key]}, "
                    f"not {getattr(config, key)}"
                )
        if start_epoch >= config.epochs:
            raise DemoError(
                f"--resume: the checkpoint already has {plural(start_epoch, 'epoch')}; "
                f"pass --epochs greater than {start_epoch}"
            )
        console.print(f"Resumed from {ckpt_path} after epoch {start_epoch}.")
    else:
        states = {name: trainer.init() for name, trainer in trainers.items()}

    steps = trainers["bn"].steps
    console.print(
        f"Digits: {len(data['x_train'])} train / {len(data['x_test'])} test images (8x8), "
        f"batch {config.batch_size} on {config.devices} device(s), "
        f"SGD with momentum 0.9, lr={config.lr:g} for both networks"
    )
    titles = {"bn": "BN     ", "plain": "no norm"}
    with Progress(
        TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>7.4f} acc {task.fields[acc]:7.2%}"),
        TextColumn("{task.fields[test]}"), console=console,
    ) as progress:
        for epoch in range(start_epoch, config.epochs):
            for name in RUN_NAMES:
                task = progress.add_task(
                    f"{titles[name]} epoch {epoch + 1:>2}/{config.epochs}",
                    total=steps, loss=math.nan, acc=0.0, test="",
                )
                h = histories[name]
                states[name] = trainers[name].run_epoch(
                    states[name], epoch, h,
                    on_step=lambda i, loss, acc, task=task: progress.update(
                        task, advance=1, loss=loss, acc=acc),
                )
                progress.update(task, loss=h["train_loss"][-1], acc=h["train_accuracy"][-1],
                                test=f"test {h['test_accuracy'][-1]:7.2%}")
            save_checkpoint(ckpt_path, config, epoch + 1, states, histories)
    plot_path = out_dir / PLOT_NAME
    plot_curves(histories, config.lr, plot_path)
    wall = time.perf_counter() - wall_start

    table = Table(title=f"Digits, {plural(config.epochs, 'epoch')}, lr={config.lr:g} "
                        "(same for both)")
    for column in ("network", "train loss", "train acc", "test loss", "test acc", "time"):
        table.add_column(column, justify="left" if column == "network" else "right", no_wrap=True)
    metrics: dict[str, Any] = {"config": dataclasses.asdict(config), "runs": {}}
    for name in RUN_NAMES:
        h = histories[name]
        row = {
            "train_loss": h["train_loss"][-1],
            "train_accuracy": h["train_accuracy"][-1],
            "test_loss": h["test_loss"][-1],
            "test_accuracy": h["test_accuracy"][-1],
            "best_test_accuracy": max(h["test_accuracy"]),
            "history": {k: h[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")},
        }
        metrics["runs"][name] = row
        table.add_row(
            "BatchNorm2d" if name == "bn" else "no norm",
            f"{row['train_loss']:.4f}", f"{row['train_accuracy']:.2%}", f"{row['test_loss']:.4f}",
            f"{row['test_accuracy']:.2%}", f"{sum(h['seconds']):.1f} s",
        )
    console.print(table)
    console.print(f"Wall time {wall:.1f} s. Plot: {plot_path}, checkpoint: {ckpt_path}")
    (out_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=1))
    return metrics
