"""Exporting a Flax model's variables as an equivalent PyTorch model's ``state_dict``.

The inverse of :func:`jbn.load_torch_state_dict`: the torch model's own
``state_dict`` is the template (its keys, shapes, dtypes and devices), the Flax
variables give the values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jbn._checks import to_numpy
from jbn._frozen import FrozenBatchNorm2d
from jbn._import import (
    check_pure,
    flax_path,
    group_by_layer,
    layer_variables,
    leaves_not_in,
    path_text,
    torch_key,
)
from jbn._torch import to_torch_state_dict


def _torch_weight(where: str, kernel: np.ndarray) -> np.ndarray:
    """Flax ``(in, out)`` / ``(*spatial, in, out)`` to PyTorch ``(out, in[, *spatial])``."""
    if kernel.ndim < 2:
        raise ValueError(f"{where}: a kernel of shape {kernel.shape} is not (..., in, out)")
    if kernel.ndim == 2:
        return kernel.T
    return kernel.transpose(kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2))


def _float32(value: Any) -> np.ndarray:
    """An array's values as numpy; bfloat16 as float32 (numpy has no bfloat16 torch reads)."""
    value = np.asarray(meta.unbox(value))
    return value.astype(np.float32) if value.dtype == jnp.bfloat16 else value


def _named(where: str, error: Exception) -> Exception:
    """``error`` of one layer's conversion, its message prefixed with the layer."""
    return type(error)(f"{where}: {error.args[0] if error.args else error}")


Source = tuple[str, str]  # (collection, variable name) in the Flax layer


def _export_layer(where: str, layer: dict[str, dict[str, Any]]
                  ) -> dict[str, tuple[np.ndarray, Source]]:
    """One Flax layer's variables as torch tensors: ``{torch name: (array, source)}``."""
    params, stats = layer.get("params", {}), layer.get("batch_stats", {})
    if "kernel" in params:  # nn.Conv, nn.Dense
        out = {"weight": (_torch_weight(where, _float32(params["kernel"])), ("params", "kernel"))}
        if "bias" in params:
            out["bias"] = (_float32(params["bias"]), ("params", "bias"))
        return out
    if "weight" in stats and "running_mean" in stats:  # FrozenBatchNorm2d
        try:
            converted = FrozenBatchNorm2d.to_torch_state_dict({"batch_stats": stats})
        except (KeyError, ValueError) as e:
            raise _named(where, e) from e
        return {k: (v, ("batch_stats", k)) for k, v in converted.items()}
    if "scale" in params or "mean" in stats:  # flax.linen.BatchNorm
        renames = {("params", "scale"): "weight", ("params", "bias"): "bias",
                   ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
        return {name: (_float32(layer[c][k]), (c, k)) for (c, k), name in renames.items()
                if k in layer.get(c, {})}
    if "weight" in params or "running_mean" in stats:  # jbn BatchNorm*d / SyncBatchNorm
        try:
            converted = to_torch_state_dict(layer)
        except (KeyError, ValueError) as e:
            raise _named(where, e) from e
        return {k: (v, ("params" if k in params else "batch_stats", k))
                for k, v in converted.items()}
    raise ValueError(
        f"{where}: don't know how to export a Flax layer with variables "
        f"{ {c: sorted(t) for c, t in layer.items()} }; expected a Conv/Dense ('kernel'), "
        "a jbn batch norm ('weight'/'running_mean'), FrozenBatchNorm2d or flax BatchNorm"
    )


def _on_meta(template: Any) -> bool:
    """Whether ``template`` is a torch tensor on the ``meta`` device (a shape, no values)."""
    return getattr(getattr(template, "device", None), "type", None) == "meta"


def _like(value: np.ndarray, template: Any) -> Any:
    """``value`` as the template's kind: a torch tensor of its dtype and device (the
    CPU for a template on the ``meta`` device, which holds no values), or a numpy
    array of its dtype."""
    if hasattr(template, "detach"):  # torch.Tensor, without importing torch
        import torch

        tensor = torch.from_numpy(np.array(value, order="C"))  # a writable copy
        device = "cpu" if _on_meta(template) else template.device
        return tensor.to(dtype=template.dtype, device=device)
    return np.asarray(value).astype(np.asarray(template).dtype)


def export_torch_state_dict(
    variables: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    name_map: Mapping[str, str | Sequence[str | int]] | None = None,
) -> dict[str, Any]:
    """Exports a Flax model's variables as its PyTorch equivalent's ``state_dict``.

    The inverse of :func:`jbn.load_torch_state_dict`, with the same ``name_map``: the
    torch model's own ``state_dict`` is the template, and every tensor in it is
    replaced by the Flax value, so that
    ``torch_model.load_state_dict(export_torch_state_dict(variables,
    torch_model.state_dict(), name_map))`` carries a model trained in JAX back to
    PyTorch. Per layer:

    - ``nn.Conv``'s ``kernel`` ``(*spatial, I, O)`` into ``Conv1d/2d/3d``'s
      ``weight`` ``(O, I, *spatial)``; ``nn.Dense``'s ``(in, out)`` into
      ``Linear``'s ``(out, in)``; ``bias`` as is;
    - jbn's batch-norm modules through :func:`jbn.to_torch_state_dict`,
      :class:`jbn.FrozenBatchNorm2d` and ``flax.linen.BatchNorm`` (``scale``, ``bias``,
      ``mean``, ``var``) into ``BatchNorm*d``; where the Flax layer keeps no count (the
      latter two), a ``num_batches_tracked`` in the template keeps its value (a copy;
      0 from a ``meta`` template), and where the torch layer keeps none
      (torchvision's ``FrozenBatchNorm2d``, checkpoints before PyTorch 0.4.1), the
      Flax count is left out, as loading such a layer starts it at 0.

    As for loading, a Flax ``nn.ConvTranspose`` is not told from a ``nn.Conv`` by its
    variables: transposed convolutions (torch's weight ``(I, O, *spatial)``, a flipped
    kernel) are not supported, and one whose shapes happen to fit would be exported
    as a convolution; map them yourself. A Flax NNX model exports from the same pure
    dict that it loads through (see :func:`jbn.load_torch_state_dict`).

    Args:
      variables: the Flax model's variables, e.g. ``{"params": ..., "batch_stats":
        ...}`` (boxed variables such as ``nn.Partitioned`` are unboxed).
      state_dict: ``torch_model.state_dict()``: its keys, shapes and dtypes (and,
        for torch tensors, devices; the CPU for ``meta`` tensors) are those of the
        result.
      name_map: torch layer prefix -> Flax module path, as for
        :func:`jbn.load_torch_state_dict`; None maps every prefix to itself with
        ``.`` read as ``/``.

    Returns:
      A new ``state_dict`` with ``state_dict``'s keys in its order: torch tensors
      where the template holds torch tensors, numpy arrays where it holds arrays.

    Raises:
      KeyError: template keys that no Flax variable fills, or Flax variables that
        no template key takes (a Conv's bias where the torch layer has none, a
        layer absent from ``name_map``); every offending name is listed.
      ValueError: a converted value whose shape differs from the template's, or a
        Flax layer of a kind that does not convert.
    """
    check_pure(variables)
    out: dict[str, Any] = {}
    used: set[tuple[str, str]] = set()
    unfilled: list[str] = []
    for prefix, tensors in group_by_layer(state_dict).items():
        path = flax_path(prefix, name_map)
        if path is None:
            unfilled += [f"{torch_key(prefix, k)} (not in name_map)" for k in tensors]
            continue
        keys, layer = layer_variables(variables, path)
        if not layer:
            unfilled += [f"{torch_key(prefix, k)} (no Flax module at {path_text(path)})"
                         for k in tensors]
            continue
        where = f"flax '{path_text(path)}' -> torch '{prefix or 'the root'}'"
        values = _export_layer(where, layer)

        def use(source: Source) -> None:
            collection, variable = source
            used.add((collection, path_text((*(keys[collection] or ()), variable))))

        for name, template in tensors.items():
            key = torch_key(prefix, name)
            if name not in values:
                if name == "num_batches_tracked":  # a layer without a count keeps torch's
                    count = np.zeros((), np.int64) if _on_meta(template) else to_numpy(template)
                    out[key] = _like(count, template)
                else:
                    unfilled.append(key)
                continue
            value, source = values.pop(name)
            shape = tuple(np.shape(template))
            if value.shape != shape:
                replicated = (" (a leading device axis, as pmap's? take one copy: "
                              "jax.tree.map(lambda a: a[0], variables))"
                              if value.ndim == len(shape) + 1 else "")
                raise ValueError(
                    f"shape mismatch: {where} gives '{key}' shape {value.shape} (after "
                    f"conversion), the torch tensor has shape {shape}{replicated}"
                )
            out[key] = _like(value, template)
            use(source)
        if "num_batches_tracked" in values and "num_batches_tracked" not in tensors:
            use(values["num_batches_tracked"][1])  # a torch layer without a count
    not_taken = leaves_not_in(variables, used)
    if unfilled or not_taken:
        raise KeyError(
            "Flax variables and torch state_dict do not match: torch keys not filled: "
            f"{', '.join(sorted(unfilled)) or 'none'}; Flax variables not exported: "
            f"{', '.join(sorted(not_taken)) or 'none'}"
        )
    return {k: out[k] for k in state_dict}
