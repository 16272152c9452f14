"""Recomputing running statistics over a stream of batches (PreciseBN, ``swa_utils.update_bn``)."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jbn._checks import STATE_KEYS, is_count_dtype

# While set (by ``recalibrate_batch_stats``), the momentum every jbn module (linen and
# nnx) uses in place of its own, None: the cumulative average. Read when a module is traced.
MOMENTUM_OVERRIDE: contextvars.ContextVar[Any] = contextvars.ContextVar("jbn_momentum_override")


def _reset(tree: Any) -> tuple[Any, int]:
    """``tree`` with every batch-norm state reset as PyTorch's ``reset_running_stats``."""
    if not isinstance(tree, Mapping):
        return tree, 0
    if set(STATE_KEYS) <= set(tree):
        reset = dict(tree)
        reset["running_mean"] = jnp.zeros_like(tree["running_mean"])
        reset["running_var"] = jnp.ones_like(tree["running_var"])
        # An integer count, also where averaging the variables (SWA) made it a float.
        count = tree["num_batches_tracked"]
        safe = is_count_dtype(jnp.result_type(count))
        reset["num_batches_tracked"] = jnp.zeros_like(count, None if safe else jnp.int32)
        return reset, 1
    out, layers = {}, 0
    for key, sub in tree.items():
        out[key], n = _reset(sub)
        layers += n
    return out, layers


def _untracked(tree: Any, path: str = "") -> list[str]:
    """Paths of the batch-norm states in ``tree`` whose ``num_batches_tracked`` is 0."""
    if not isinstance(tree, Mapping):
        return []
    if set(STATE_KEYS) <= set(tree):
        # Any shape: a model mapped over devices returns one count per device.
        return [] if np.any(np.asarray(tree["num_batches_tracked"])) else [path or "batch_stats"]
    return [p for key, sub in tree.items() for p in _untracked(sub, f"{path}/{key}".lstrip("/"))]


def recalibrate_batch_stats(
    apply_fn: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    jit: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Recomputes every jbn layer's running statistics as an equal-weight average over batches.

    Mirrors ``torch.optim.swa_utils.update_bn`` (and PreciseBN): every batch-norm state
    in ``variables["batch_stats"]`` (a dict holding ``running_mean``, ``running_var``
    and ``num_batches_tracked``) is reset to zeros, ones and 0 (an integer, also where
    averaging the variables made the count a float), then each batch is run
    in training mode with every jbn module (linen or nnx) using ``momentum=None``,
    the cumulative average. After K batches each layer holds

    - ``running_mean`` = the average over the K batches of that layer's batch mean,
    - ``running_var`` = the average over the K batches of its *unbiased* batch
      variance (``n / (n - 1)`` times the biased one, n values per channel),
    - ``num_batches_tracked`` = K.

    For equal-size batches the first is the mean of all the data (at the layer's
    input); the second is not the variance of all the data: it leaves out the spread
    of the batch means. Each layer sees its input as produced by training-mode
    layers before it. ``params`` and every other collection are returned unchanged.

    Args:
      apply_fn: ``apply_fn(variables, batch) -> (outputs, mutated)``, running the model
        in training mode with ``batch_stats`` mutable, e.g.
        ``lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])``; for
        an nnx model, one that merges ``nnx.split(model, nnx.Param, nnx.BatchStat)``'s
        graph with ``v["params"]`` and ``v["batch_stats"]`` (as ``nnx.to_pure_dict``
        gives them), calls it in training mode and returns its new ``nnx.BatchStat``
        state as ``{"batch_stats": ...}`` (``nnx.update`` then sets it). It is
        traced here with every ``jax.jit`` inside it inlined, so functions jitted
        elsewhere (``apply_fn`` itself too) neither keep their own momentum here nor
        take the cumulative average into their later calls.
      variables: the model's variables, with a ``batch_stats`` collection.
      batches: an iterable of batches, each passed to ``apply_fn`` as is.
      jit: compile ``apply_fn`` once (batches of one shape) instead of running eagerly.
      progress: show a progress bar (needs ``rich``, in the ``demo`` extra).

    Returns:
      ``variables`` with the recomputed ``batch_stats``.

    Raises:
      ValueError: no jbn batch-norm state in ``variables["batch_stats"]``, no batch,
        or a layer whose statistics no batch updated (``apply_fn`` ran it in
        evaluation mode, or not at all): its reset statistics would pass for
        recomputed ones.
    """
    stats, layers = _reset(variables.get("batch_stats", {}))
    if not layers:
        raise ValueError(
            "variables['batch_stats'] holds no batch-norm state (running_mean, running_var, "
            "num_batches_tracked) to recalibrate"
        )

    def step(stats: Any, batch: Any) -> Any:
        _, mutated = apply_fn({**variables, "batch_stats": stats}, batch)
        return mutated["batch_stats"]

    run = _traced_with_cumulative_average(step, jit)
    if progress:
        try:
            from rich.progress import track
        except ImportError as e:
            raise ImportError(
                "progress=True shows its bar with rich: pip install rich (or jbn[demo])"
            ) from e

        batches = track(batches, description="Recalibrating batch statistics")
    seen = 0
    for batch in batches:
        stats = run(stats, batch)
        seen += 1
    if not seen:
        raise ValueError("batches is empty: no batch to compute the statistics from")
    untracked = _untracked(stats)
    if untracked:
        raise ValueError(
            f"no batch updated the statistics of {', '.join(untracked)}: apply_fn must run "
            "every batch-norm layer in training mode (train=True, also where a layer sets "
            "its mode as a field) with batch_stats mutable"
        )
    return {**variables, "batch_stats": stats}


def _traced_with_cumulative_average(step: Callable, jit: bool) -> Callable:
    """``step``, run with every jbn module's momentum None (PyTorch's cumulative average).

    The override acts when the modules are traced, so ``step`` is traced with every
    ``jax.jit`` inside it inlined (``jax.disable_jit``): a function that ``apply_fn``
    calls, jitted elsewhere, would otherwise reuse a trace made with the modules' own
    momentum, or keep one made with the override for its later calls. With ``jit``,
    the traced step is compiled once per signature of its arguments.
    """
    compiled: dict[Any, Any] = {}

    def run(stats: Any, batch: Any) -> Any:
        leaves, tree = jax.tree.flatten((stats, batch))
        key = (tree, tuple((np.shape(a), getattr(a, "dtype", type(a))) for a in leaves))
        token = MOMENTUM_OVERRIDE.set(None)
        try:
            with jax.disable_jit():
                if not jit:
                    return step(stats, batch)
                if key not in compiled:
                    compiled[key] = jax.jit(step).lower(stats, batch).compile()
        finally:
            MOMENTUM_OVERRIDE.reset(token)
        return compiled[key](stats, batch)

    return run
