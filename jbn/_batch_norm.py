"""The functional core: ``init`` and ``batch_norm``, PyTorch's BatchNorm as a pure function."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.export import is_symbolic_dim
from jax.sharding import PartitionSpec
from jax.typing import DTypeLike

from jbn import _checks, _cpu_kernel, _layout
from jbn._layout import RowView
from jbn._normalize import normalize
from jbn._stats import STATS_NAME, batch_moments
from jbn._typing import Array, Params, State


def at_least_float32(*dtypes: DTypeLike) -> jnp.dtype:
    """float32, or the widest of ``dtypes`` where that is wider (float64): the dtype of
    the statistics, of the running statistics and of the computation.

    Chosen by width rather than by JAX's type promotion, which refuses bfloat16 with
    float32 under ``jax.numpy_dtype_promotion("strict")``.
    """
    wider = [jnp.dtype(d) for d in dtypes if jnp.dtype(d).itemsize > 4]
    return max(wider, key=lambda d: d.itemsize) if wider else jnp.dtype(jnp.float32)


def init(
    num_features: int,
    *,
    affine: bool = True,
    track_running_stats: bool = True,
    dtype: DTypeLike = jnp.float32,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Creates the parameters and running statistics of a batch-norm layer, as PyTorch does.

    Args:
      num_features: C, the number of channels.
      affine: whether the layer has a learnable ``weight`` and ``bias``.
      track_running_stats: whether the layer keeps running statistics for evaluation.
      dtype: dtype of ``weight`` and ``bias``. The running statistics are float32, or
        ``dtype`` where it is wider (float64, with ``jax_enable_x64``), as a PyTorch
        layer made with ``dtype=torch.float64`` keeps float64 buffers.

    Returns:
      ``(params, state)``: ``params = {"weight": ones (C,), "bias": zeros (C,)}`` (``{}``
      when ``affine=False``) and ``state = {"running_mean": zeros (C,),
      "running_var": ones (C,), "num_batches_tracked": 0 () int32}`` (``{}`` when
      ``track_running_stats=False``). The keys are those of PyTorch's ``state_dict``.
    """
    c = _checks.check_num_features(num_features)
    dtype = _checks.check_dtype(dtype, "dtype")
    params: dict[str, jax.Array] = {}
    state: dict[str, jax.Array] = {}
    if affine:
        params = {"weight": jnp.ones((c,), dtype), "bias": jnp.zeros((c,), dtype)}
    if track_running_stats:
        state = {
            "running_mean": jnp.zeros((c,), at_least_float32(dtype)),
            "running_var": jnp.ones((c,), at_least_float32(dtype)),
            "num_batches_tracked": jnp.zeros((), jnp.int32),
        }
    return params, state


def batch_norm(
    params: Params | None,
    state: State | None,
    x: Array,
    train: bool,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    mask: Array | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Batch normalization with PyTorch's semantics, as a pure function.

    Mirrors ``torch.nn.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm`` with ``axis_name``):
    in training the input is normalized with the batch mean and the *biased* batch
    variance over every axis but ``axis``, and the running statistics are updated with
    the *unbiased* variance, ``running = (1 - momentum) * running + momentum * batch``
    (``momentum=None``: cumulative average with factor ``1 / num_batches_tracked``).
    In evaluation the running statistics are used; without running statistics
    (``state == {}``) the batch statistics are used in evaluation too.

    Args:
      params: ``{"weight": (C,), "bias": (C,)}`` or ``{}`` (``affine=False``).
      state: ``{"running_mean": (C,), "running_var": (C,), "num_batches_tracked": ()}``
        or ``{}`` (``track_running_stats=False``).
      x: the input, a floating array of any rank with C channels on ``axis``:
        ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)`` with
        ``axis=1``, or channels-last ``(N, ..., C)`` with ``axis=-1``. An unbatched
        sample ``(C, H, W)`` is a batch of one with ``axis=0``. bfloat16 and float16
        are computed in float32.
      train: a Python bool: training (batch statistics, state updated) or evaluation.
      axis: the channel axis.
      eps: added to the variance for numerical stability.
      momentum: weight of the batch in the running statistics, or None for the
        cumulative average.
      axis_name: a mapped axis (``pmap``, ``shard_map``, ``vmap``) over which the
        training statistics are those of the global batch (SyncBatchNorm), with one
        collective; or a tuple of such axes (nested maps, a multi-axis mesh), with
        one per axis. As in PyTorch, evaluation never synchronizes.
      axis_index_groups: groups of device indices along ``axis_name`` that share
        statistics (``pmap`` only), e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``.
      mask: optional boolean array of ``x``'s shape without the channel axis (or
        broadcastable to it with the same rank, e.g. ``(N, 1)`` for ``(N, C, L)``):
        only positions where it is True enter the batch statistics and the count.
        Outputs at masked positions are still computed with those statistics (so a
        gradient through them needs finite padding: NaN there gives NaN gradients
        for ``weight``, ``bias`` and ``x``, even where a loss ignores them). A
        batch without a valid position (or an empty ``x``) is counted in
        ``num_batches_tracked`` and leaves the running statistics as they were, as
        PyTorch does for an empty batch. One valid value (where PyTorch raises, but
        a mask's count is known only when the program runs) enters the running
        variance as an unbiased variance of 0.
      dtype: dtype of ``y``; defaults to ``x``'s dtype.

    Returns:
      ``(y, new_state)``: ``y`` of ``x``'s shape; ``new_state`` of ``state``'s
      structure (equal to ``state`` in evaluation). As PyTorch updates its buffers
      outside autograd, ``new_state`` carries no derivative in ``x`` (or the
      parameters): the batch statistics enter it as constants, the old running
      statistics with their factor ``1 - momentum``.

    Raises:
      ValueError: one value per channel in training, channel count differing from
        the parameters, bad ``axis``, ``eps`` or ``momentum``, a misshapen ``mask``,
        a 0-d ``x``, ``params`` or ``state`` with other keys than PyTorch's, or
        ``axis_index_groups`` without ``axis_name`` or not splitting the axis into
        groups of one size.
      TypeError: a non-array or non-floating input, a non-bool ``train``, ``params``
        or ``state`` that is not a mapping, a non-integer ``num_batches_tracked`` in
        training, a non-boolean ``mask``, a non-floating ``dtype``, or ``axis``,
        ``eps`` or ``momentum`` of the wrong type.
      NameError: ``axis_name`` not bound by an enclosing map.
    """
    params = {} if params is None else params
    state = {} if state is None else state
    train = _checks.check_train(train)
    eps = _checks.check_eps(eps)
    momentum = _checks.check_momentum(momentum)
    x = _checks.as_array(x)
    axis = _checks.check_input(x, axis)
    _checks.check_variables(params, state, x.shape[axis], x.shape)
    # torch tensors (a layer's own parameters and buffers) read as x is.
    params = {k: _checks.to_jax(v) for k, v in params.items()}
    state = {k: _checks.to_jax(v) for k, v in state.items()}
    if train and state:
        _checks.check_count(state["num_batches_tracked"])
    if mask is not None:
        target = _checks.check_mask(mask, x.shape, axis)
        mask = jnp.broadcast_to(_checks.to_jax(mask), target)
    out_dtype = x.dtype if dtype is None else _checks.check_dtype(dtype, "dtype")
    if axis_index_groups is not None and axis_name is None:
        raise ValueError("axis_index_groups divides the devices along axis_name; "
                         "pass axis_name too")
    # PyTorch synchronizes only in training.
    axis_name = axis_name if train else None
    if isinstance(axis_name, list):  # a static argument below: hashable
        axis_name = tuple(axis_name)
    groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    if train or not state:
        _check_count(x.shape, axis, mask, axis_name, groups)
    y, new_state = _compiled(params, state, x, mask, train=train, axis=axis, eps=eps,
                             momentum=momentum, axis_name=axis_name, axis_index_groups=groups,
                             out_dtype=out_dtype,
                             choices=(_cpu_kernel.available(), _layout.default_on_cpu()))
    # In the state's own key order (PyTorch's, from init), which jit's output sorts.
    return y, {k: new_state[k] for k in state}


@functools.partial(jax.jit, static_argnames=(
    "train", "axis", "eps", "momentum", "axis_name", "axis_index_groups", "out_dtype",
    "choices"))
def _compiled(
    params: Params, state: State, x: jax.Array, mask: jax.Array | None, *, train: bool,
    axis: int, eps: float, momentum: float | None, axis_name: Any, axis_index_groups: Any,
    out_dtype: jnp.dtype, choices: tuple[bool, bool],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``batch_norm`` on checked arguments, as one program compiled once per signature.

    Inside a user's ``jit`` it is inlined like any other function. Called directly
    (op by op, as in a notebook) it runs as one cached program instead of some
    thirty small ones: about 20x faster per call, and faster to compile on the
    first call for a shape.

    ``choices``: what the traced program depends on besides the arguments (whether
    jbn's CPU kernels were built, whether the CPU is the default backend), so that
    the cache never returns a program traced under other ones.
    """
    del choices
    compute = at_least_float32(x.dtype)
    weight, bias = params.get("weight"), params.get("bias")

    use_batch_stats = train or not state
    if not use_batch_stats:
        mean = state["running_mean"].astype(compute)
        scale = jax.lax.rsqrt(state["running_var"].astype(compute) + eps)
        if weight is not None:
            scale = scale * weight.astype(compute)
        normalize_running = functools.partial(normalize, axis=axis, compute=compute,
                                              out_dtype=out_dtype)
        y = _auto_sharded(normalize_running, x, stats=0)(x, mean, scale, bias)
        return y, dict(state)

    if _is_empty(x.shape):
        # PyTorch's empty batch: an empty output, and in training the running
        # statistics as they were, with the batch counted.
        y = jnp.zeros(x.shape, out_dtype)
        if not (train and state):
            return y, dict(state)
        zero = jnp.zeros((x.shape[axis],), compute)
        return y, _update_state(state, zero, zero, jnp.zeros((), compute), momentum)
    normalize_batch = functools.partial(
        _normalize_with_batch_stats,
        axis=axis, eps=eps, axis_name=axis_name, axis_index_groups=axis_index_groups,
        compute=compute, out_dtype=out_dtype,
    )
    y, mean, m2, count = _auto_sharded(normalize_batch, x, stats=3)(x, weight, bias, mask)
    if not (train and state):
        return y, dict(state)
    return y, _update_state(state, mean, m2, count, momentum)


def _auto_sharded(fn: Callable, x: jax.Array, stats: int) -> Callable:
    """``fn``, run in auto sharding mode under a mesh with explicit axes.

    With explicit sharding (``jax.set_mesh`` on ``AxisType.Explicit`` axes) an
    array's type says how it is split across devices, and the reshapes and slices
    that batch norm takes of a split batch have no sharding rule. In auto mode XLA
    partitions them as under a plain ``jit``: partial sums and collectives of
    ``(C,)`` values (none where ``vmap`` maps over the split axis). ``fn``'s first
    output keeps ``x``'s sharding; its ``stats`` other outputs (per-channel) are
    replicated.
    """
    mesh = getattr(jax.sharding, "get_abstract_mesh", lambda: None)()
    if not getattr(mesh, "explicit_axes", ()):
        return fn
    split, replicated = jax.typeof(x).sharding, PartitionSpec()
    out = split if stats == 0 else (split,) + (replicated,) * stats
    return jax.sharding.auto_axes(fn, out_sharding=out)


def _normalize_with_batch_stats(
    x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, mask: jax.Array | None,
    *, axis: int, eps: float, axis_name: Any, axis_index_groups: Any,
    compute: jnp.dtype, out_dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Normalizes ``x`` with its batch statistics; returns ``(y, mean, m2, count)``.

    Differentiation keeps only ``x`` and O(C) statistics for the backward pass: the
    computation is rematerialized except for the values named ``STATS_NAME``.

    No barrier (``prevent_cse=False``) except where the CPU kernels run: the
    rematerialized values are elementwise in ``x``, which XLA recomputes inside each
    kernel that reads them whether or not it merges them with the forward pass's.
    The barrier that JAX otherwise puts between the two passes would make the
    incoming gradient (``dy`` after a ReLU's mask, say) a separate array: on a GPU,
    XLA then writes it and reads it back instead of computing it inside the backward
    pass's reductions, one extra pass over the batch per batch norm.

    Where the CPU kernels run, ``dy`` is a separate array anyway (the kernel's
    operand), and the barrier stays: without it XLA merges the backward pass's
    conversion of a bfloat16 ``x`` with the forward pass's and serves both from
    the float32 array that XLA's CPU convolution wrote before rounding, which then
    stays alive until the backward pass (twice ``x``'s bytes per layer).
    """

    @functools.partial(
        jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names(STATS_NAME),
        prevent_cse=_layout.default_on_cpu() and _cpu_kernel.available(),
    )
    def forward(x, weight, bias, mask):
        # Converted once, in the view, for both the statistics and the normalization:
        # the backward pass then adds their contributions to the input's gradient in
        # float32 and rounds once.
        source = x if x.dtype != compute else None
        view = RowView.of(x.shape, axis)
        x = view.unrows(view.rows(x).astype(compute))
        m = batch_moments(x, axis, mask, axis_name, axis_index_groups, source)
        invstd = checkpoint_name(
            jax.lax.rsqrt(m.m2 / jnp.maximum(m.count, 1) + eps), STATS_NAME
        )
        # y = (x - shift) * scale + (bias - offset * scale): the offset (small: the
        # shift is near the mean) is folded into the (C,) bias, so the batch-sized
        # loop is one subtraction, one multiplication and one addition per element,
        # with the exact ``x - shift`` first. Its cotangent is then
        # ``-scale * sum(dy)``, a sum the bias needs anyway, rather than a separate
        # reduction of the batch-sized ``dy * scale``.
        scale = invstd if weight is None else invstd * weight.astype(compute)
        folded = -m.offset * scale
        bias = folded if bias is None else bias.astype(compute) + folded
        y = normalize(x, m.shift, scale, bias, axis, compute, out_dtype, source)
        return y, m.mean, m.m2, m.count

    return forward(x, weight, bias, mask)


def _check_count(shape: tuple, axis: int, mask: Any, axis_name: Any, groups: Any) -> None:
    """Raises PyTorch's error when the batch (of a group of devices) holds one value per
    channel; checks that ``axis_name`` is bound and ``groups`` divide its devices."""
    if axis_name is not None:
        try:
            devices = jax.lax.axis_size(axis_name)
        except NameError as e:
            raise NameError(
                f"axis_name {axis_name!r} is not bound: call batch_norm inside jax.pmap, "
                f"shard_map or jax.vmap with axis_name={axis_name!r}, or pass axis_name=None"
            ) from e
        if groups is not None:
            devices = _checks.check_groups(groups, devices, axis_name)
    else:
        devices = 1
    per_device = 1
    for i, s in enumerate(shape):
        if i != axis:
            per_device *= s
    try:
        too_few = mask is None and per_device * devices == 1
    except jax.errors.InconclusiveDimensionOperation:
        # Symbolic lengths that may all be 1 (a program exported for any batch and
        # length): no check at trace time, and none in the program.
        too_few = False
    if too_few:
        raise _checks.too_few_values(shape)


def _is_empty(shape: tuple) -> bool:
    """Whether an input of ``shape`` holds no value (a symbolic length is at least 1)."""
    return any(not is_symbolic_dim(d) and d == 0 for d in shape)


def _update_state(
    state: State, mean: jax.Array, m2: jax.Array, count: jax.Array, momentum: float | None
) -> dict[str, jax.Array]:
    """PyTorch's running-statistics update, with the unbiased variance ``m2 / (n - 1)``.

    A batch without a value (``count == 0``: an empty batch, or a mask that is False
    everywhere) leaves the running statistics as they were and is still counted in
    ``num_batches_tracked``, as PyTorch does for an empty batch.

    The count stops at its dtype's largest value (int32: 2**31 - 1 batches), where
    PyTorch's int64 goes on: wrapped around, a negative count would turn the
    cumulative average's factor negative.
    """
    mean, m2, count = (jax.lax.stop_gradient(v) for v in (mean, m2, count))
    tracked = state["num_batches_tracked"]
    tracked = tracked + (tracked < jnp.iinfo(tracked.dtype).max).astype(tracked.dtype)
    # In the state's precision: a float32 factor would round float64 statistics.
    dtype = at_least_float32(state["running_mean"].dtype)
    if momentum is None:
        factor = 1 / tracked.astype(dtype)
    else:
        factor = jnp.asarray(momentum, dtype)
    unbiased = m2 / jnp.maximum(count - 1, 1)
    running_mean, running_var = state["running_mean"], state["running_var"]
    seen = count > 0
    new_mean = jnp.where(seen, (1 - factor) * running_mean + factor * mean, running_mean)
    new_var = jnp.where(seen, (1 - factor) * running_var + factor * unbiased, running_var)
    return {
        "running_mean": new_mean.astype(running_mean.dtype),
        "running_var": new_var.astype(running_var.dtype),
        "num_batches_tracked": tracked.astype(state["num_batches_tracked"].dtype),
    }
