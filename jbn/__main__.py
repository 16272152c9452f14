"""Command line: ``python -m jbn demo`` (or ``jbn demo``) trains a CNN with and without BN."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_OUT = "jbn-demo-out"


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str):
    """An argparse type: ``convert(text)``, accepted when ``ok`` holds, else one clear line."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_seed = _number(int, lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1")


def build_parser() -> argparse.ArgumentParser:
    """The ``jbn`` parser with its ``demo`` subcommand."""
    parser = _Parser(prog="jbn", description="jbn: PyTorch-exact batch normalization for JAX and Flax.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    demo = commands.add_parser(
        "demo",
        help="train a small ResNet on the digits data set with and without batch norm",
        description=(
            "Trains a small ResNet-style CNN with jbn.BatchNorm2d on scikit-learn's 8x8 handwritten "
            "digits, and the same network without batch norm at the same learning rate; prints "
            "a summary, writes a plot of the curves, a checkpoint and metrics.json to --out. "
            "Needs the demo extra: pip install 'jbn[demo]'."
        ),
    )
    demo.add_argument("--epochs", type=_positive_int, default=15, help="total epochs (default 15)")
    demo.add_argument("--seed", type=_seed, default=0, help="split, init and shuffling seed (default 0)")
    demo.add_argument("--lr", type=_positive_float, default=0.5,
                      help="learning rate of SGD with momentum 0.9, both networks (default 0.5)")
    demo.add_argument("--batch-size", type=_positive_int, default=64, help="global batch size (default 64)")
    demo.add_argument("--devices", type=_positive_int, default=1,
                      help="data parallel over N local devices with jbn.SyncBatchNorm; on CPU, "
                           "N host devices are created (default 1)")
    demo.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                      help=f"output directory (default {DEFAULT_OUT})")
    demo.add_argument("--resume", action="store_true",
                      help="continue from the checkpoint in --out up to --epochs")
    return parser


def _set_device_count(n: int) -> None:
    """Asks for ``n`` host CPU devices; only possible before jax initializes a backend.

    ``import jbn`` imports jax but runs nothing on a device, so the backend is still
    uninitialized here. On GPU or TPU machines the setting does not apply and the
    available accelerators are used.
    """
    import jax

    if n > 1:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # backend already up (e.g. called from a live process)
            pass


def _resume_command(args: argparse.Namespace, demo_parser: argparse.ArgumentParser) -> str:
    """The command that continues this run: ``--resume`` with its non-default settings."""
    words = ["jbn", "demo", "--resume"]
    for name in ("epochs", "seed", "lr", "batch_size", "devices"):
        value = getattr(args, name)
        if value != demo_parser.get_default(name):
            words += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join([*words, "--out", str(args.out)])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jbn`` and the ``jbn`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    demo_parser = parser._subparsers._group_actions[0].choices["demo"]  # noqa: SLF001
    if args.batch_size % args.devices:
        demo_parser.error(
            f"--devices {args.devices} must divide --batch-size {args.batch_size}"
        )
    if args.batch_size // args.devices < 2:
        demo_parser.error(
            f"--batch-size {args.batch_size} leaves fewer than 2 images per device; "
            "batch norm needs more than 1 value per channel"
        )
    _set_device_count(args.devices)
    try:
        from jbn import _demo
    except ImportError as err:
        demo_parser.error(f"the demo needs the demo extra ({err.name} is missing): pip install 'jbn[demo]'")

    import jax

    available = jax.local_device_count()
    if args.devices > available:
        demo_parser.error(f"--devices {args.devices}: only {available} local device(s) available")
    config = _demo.DemoConfig(
        epochs=args.epochs, seed=args.seed, lr=args.lr, batch_size=args.batch_size, devices=args.devices
    )
    try:
        _demo.run_demo(config, args.out, resume=args.resume)
    except _demo.DemoError as err:
        demo_parser.error(str(err))
    except KeyboardInterrupt:
        # A checkpoint is written after each epoch: none before the first ends.
        saved = (args.out / _demo.CHECKPOINT_NAME).exists()
        hint = f"; continue with {_resume_command(args, demo_parser)}" if saved else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
