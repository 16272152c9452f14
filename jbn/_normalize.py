"""The batch-sized step of batch norm, ``y = (x - centre) * scale + bias`` per channel.

Its reverse-mode derivative takes two per-channel sums over the batch: ``sum(dy)``
for the bias and ``sum(dy * (x - centre))`` for the scale. XLA's CPU reductions take
one pass over the batch for each, the second at about half speed (the subtraction
fused in), and bfloat16 input no faster than float32. On the CPU,
where jbn's kernel was built (:mod:`jbn._cpu_kernel`), both sums come from the
kernel instead, in one threaded pass over ``dy`` and ``x`` in their own dtypes.
Everything else stays in XLA, so the normalization still fuses with its neighbours
(a ReLU, a residual add) in the forward and the backward pass, and the values are
those of the plain XLA computation up to the order of the additions.

How: the normalization is a ``custom_jvp`` function whose tangent is
``(t_x - t_centre) * scale + (x - centre) * t_scale + t_bias``, in which the part in
``(t_scale, t_bias)`` is a primitive of jbn's own, ``jbn_scale_tangent``. It is
linear in its tangent inputs, and its transpose (the backward pass's rule) is the
kernel. Its value is lowered as the plain XLA expression, so it fuses like one;
its JVP (for second-order derivatives) and its ``vmap`` are those of that
expression, and the kernel's sums have a derivative rule of their own, so every
derivative of any order works as without the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jbn import _cpu_kernel, _vma
from jbn._layout import RowView

_F32 = jnp.dtype(jnp.float32)


def normalize(
    x: jax.Array, centre: jax.Array, scale: jax.Array, bias: jax.Array | None, axis: int,
    compute: jnp.dtype, out_dtype: jnp.dtype, source: jax.Array | None = None,
) -> jax.Array:
    """``(x - centre) * scale + bias`` per channel, computed in ``compute``.

    Args:
      x: the input, any shape, channels on (non-negative) ``axis``.
      centre, scale: ``(C,)`` in ``compute`` (``scale``: the inverse standard
        deviation times the weight).
      bias: ``(C,)`` or None.
      compute: the dtype of the arithmetic; out_dtype: ``y``'s.
      source: ``x`` before a conversion to ``compute``, where it was converted; the
        CPU kernel then reads it in its own dtype in the backward pass.

    Returns:
      ``y``, ``x``'s shape, in ``out_dtype``.

    With the ``(C,)`` factors folded by the caller, the batch-sized loop does one
    subtraction, one multiplication and one addition per element, in the view of
    :class:`~jbn._layout.RowView` (whose transpose, in the backward pass, is the
    fast row-wise channel sum). Both dtype conversions happen in the view too, so
    that the backward pass converts ``dy`` once for all its uses.
    """
    view = RowView.of(x.shape, axis)
    rows = view.rows(x).astype(compute)
    source = x if source is None else source
    if (view.on_cpu and compute == _F32 and source.dtype in _cpu_kernel.DTYPES
            and jnp.dtype(out_dtype) in _cpu_kernel.DTYPES and _cpu_kernel.available()):
        bias = jnp.zeros_like(scale) if bias is None else bias.astype(compute)
        y = _affine(view, jnp.dtype(out_dtype), rows, jax.lax.stop_gradient(source),
                    centre, scale, bias)
    elif bias is None:
        y = ((rows - view.broadcast(centre)) * view.broadcast(scale)).astype(out_dtype)
    else:
        y = _affine_value(view, out_dtype, rows, centre, scale, bias.astype(compute))
    return view.unrows(y)


def _affine_f32(view: RowView, rows: jax.Array, centre: jax.Array, scale: jax.Array,
                bias: jax.Array) -> jax.Array:
    """``(rows - centre) * scale + bias`` in the view, in float32."""
    return (rows - view.broadcast(centre)) * view.broadcast(scale) + view.broadcast(bias)


def _affine_value(view: RowView, out_dtype: jnp.dtype, rows: jax.Array, centre: jax.Array,
                  scale: jax.Array, bias: jax.Array) -> jax.Array:
    return _affine_f32(view, rows, centre, scale, bias).astype(out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _affine(view: RowView, out_dtype: jnp.dtype, rows: jax.Array, source: jax.Array,
            centre: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """``((rows - centre) * scale + bias)`` in ``out_dtype``, rows in the view, float32.

    ``source``: the same values as ``rows`` in the input's own shape and dtype
    (without gradient), which the kernel reads in the backward pass.
    """
    return _affine_value(view, out_dtype, rows, centre, scale, bias)


@_affine.defjvp
def _affine_jvp(view, out_dtype, primals, tangents):
    rows, source, centre, scale, bias = primals
    t_rows, _, t_centre, t_scale, t_bias = tangents
    # Primal values from the function again, so a second derivative comes here too.
    y = _affine(view, out_dtype, *primals)
    elementwise = (t_rows - view.broadcast(t_centre)) * view.broadcast(scale)
    # The kernel's sums vary over the mapped axes of shard_map as the batch does;
    # where the scale's or bias's tangent varies over fewer (a replicated weight, or
    # statistics synchronized under shard_map's replication check), it is typed as
    # varying too, so that the transpose sums its cotangent over those axes. Where
    # the types still differ, the plain expression is used.
    t_scale, t_bias = (_vma.vary_like(t, elementwise) for t in (t_scale, t_bias))
    per_channel = jax.typeof(view.channel_sum(elementwise))
    if jax.typeof(t_scale) == per_channel and jax.typeof(t_bias) == per_channel:
        t_y = _scale_tangent_p().bind(rows, source, centre, t_scale, t_bias, elementwise,
                                      view=view, out_dtype=out_dtype)
    else:
        t_y = _scale_tangent_value(rows, source, centre, t_scale, t_bias, elementwise,
                                   view=view, out_dtype=out_dtype)
    return y, t_y


def _scale_tangent_value(rows, source, centre, t_scale, t_bias, elementwise, *,
                         view: RowView, out_dtype: jnp.dtype) -> jax.Array:
    """``((rows - centre) * t_scale + t_bias + elementwise)`` in ``out_dtype``.

    Linear in ``(t_scale, t_bias, elementwise)``; ``source`` is read by the
    transpose only.
    """
    del source
    return (_affine_f32(view, rows, centre, t_scale, t_bias) + elementwise).astype(out_dtype)


def _scale_tangent_jvp(primals, tangents, *, view, out_dtype):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    value = functools.partial(_scale_tangent_value, view=view, out_dtype=out_dtype)
    return jax.jvp(value, tuple(primals), tuple(tangents))


def _scale_tangent_batch(args, dims, *, view, out_dtype):
    value = functools.partial(_scale_tangent_value, view=view, out_dtype=out_dtype)
    return jax.vmap(value, in_axes=tuple(dims))(*args), 0


def _scale_tangent_transpose(ct, rows, source, centre, t_scale, t_bias, elementwise, *,
                             view, out_dtype):
    del out_dtype
    if any(ad.is_undefined_primal(v) for v in (rows, source, centre)):
        raise NotImplementedError("jbn_scale_tangent is linear in its last three inputs only")
    linear = (t_scale, t_bias, elementwise)
    if type(ct) is ad.Zero:
        return [None] * 3 + [ad.Zero(v.aval) if ad.is_undefined_primal(v) else None
                             for v in linear]
    s_ct, s_ct_d = _dot_sums(view, ct, rows, centre, source)
    cts = (s_ct_d, s_ct, ct.astype(_F32))
    return [None] * 3 + [c if ad.is_undefined_primal(v) else None for c, v in zip(cts, linear)]


@functools.cache
def _scale_tangent_p() -> Primitive:
    """The primitive, registered with JAX on first use (only where the kernel runs)."""
    p = Primitive("jbn_scale_tangent")
    p.def_impl(_scale_tangent_value)
    p.def_abstract_eval(
        lambda rows, source, centre, t_scale, t_bias, elementwise, *, view, out_dtype:
        elementwise.update(dtype=out_dtype, weak_type=False))
    mlir.register_lowering(p, mlir.lower_fun(_scale_tangent_value, multiple_results=False))
    ad.primitive_jvps[p] = _scale_tangent_jvp
    ad.primitive_transposes[p] = _scale_tangent_transpose
    batching.primitive_batchers[p] = _scale_tangent_batch
    return p


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _dot_sums(view: RowView, g: jax.Array, rows: jax.Array, centre: jax.Array,
              source: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum(g), sum(g * (rows - centre)))`` per channel, each ``(C,)`` float32, by the kernel.

    ``g``: a gradient in the view; the kernel reads it and ``source`` (the values of
    ``rows``) in their own dtypes. The derivative rule is XLA's, with the primal
    values from this function again.
    """
    shape = (view.before, view.channels, view.after)
    return _cpu_kernel.dot_sums(g.reshape(shape), source.reshape(shape), centre)


@_dot_sums.defjvp
def _dot_sums_jvp(view, primals, tangents):
    g, rows, centre, _ = primals
    t_g, t_rows, t_centre, _ = tangents
    sums = _dot_sums(view, *primals)
    t_g = t_g.astype(_F32)
    t_d = t_rows - view.broadcast(t_centre)
    d = rows - view.broadcast(centre)
    return sums, (view.channel_sum(t_g), view.channel_sum(t_g * d + g.astype(_F32) * t_d))
