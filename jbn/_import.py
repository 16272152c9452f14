"""Loading a whole PyTorch model's ``state_dict`` into an equivalent Flax model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jbn._checks import to_numpy
from jbn._frozen import FrozenBatchNorm2d
from jbn._torch import from_torch_state_dict

# A module path: names, or integers where Flax NNX keys a list's children by index.
Path = tuple[str | int, ...]


def _as_path(path: str | Sequence[str | int]) -> Path:
    return tuple(p for p in path.split("/") if p) if isinstance(path, str) else tuple(path)


def path_text(path: Path) -> str:
    """A module path as the messages show it: ``a/b/0``, or ``the root``."""
    return "/".join(map(str, path)) or "the root"


def torch_key(prefix: str, name: str) -> str:
    """The ``state_dict`` key of tensor ``name`` in the torch layer ``prefix``."""
    return f"{prefix}.{name}" if prefix else name


def _resolve(tree: Any, path: Path) -> Path | None:
    """``path`` with each name as ``tree`` keys it (``"0"`` is the integer key 0 of an
    NNX list's children where there is no key ``"0"``, and 0 the key ``"0"`` of such a
    list's pure dict restored from a file), or None where it leads nowhere."""
    keys = []
    for name in path:
        if not isinstance(tree, Mapping):
            return None
        if name not in tree and isinstance(name, str) and name.isdigit() and int(name) in tree:
            name = int(name)
        if name not in tree and isinstance(name, int) and str(name) in tree:
            name = str(name)
        if name not in tree:
            return None
        keys.append(name)
        tree = tree[name]
    return tuple(keys)


def _subtree(tree: Any, path: Path | None) -> Mapping[str, Any] | None:
    if path is None:
        return None
    for name in path:
        tree = tree[name]
    return tree if isinstance(tree, Mapping) else None


def _leaves(tree: Mapping[str, Any] | None) -> dict[str, Any]:
    """The array leaves directly in ``tree`` (not in its submodules)."""
    return {} if tree is None else {k: v for k, v in tree.items() if not isinstance(v, Mapping)}


def _conv_or_dense_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch ``(out, in[, *spatial])`` to Flax ``(in, out)`` / ``(*spatial, in, out)``."""
    if weight.ndim == 2:
        return weight.T
    return weight.transpose(*range(2, weight.ndim), 1, 0)


class _IncompleteLayer(KeyError):
    """A torch layer without all the tensors its Flax layer needs; listed with the
    other mismatches of the whole load rather than raised alone."""


def _layer_error(where: str, error: Exception) -> Exception:
    """``error`` of one layer's conversion, prefixed with the layer (its message as
    given, not as ``str`` of a KeyError quotes it)."""
    message = f"{where}: {error.args[0] if error.args else error}"
    return _IncompleteLayer(message) if isinstance(error, KeyError) else type(error)(message)


def _convert_layer(
    prefix: str, path: Path, tensors: dict[str, np.ndarray], template: dict[str, dict[str, Any]]
) -> dict[tuple[str, str], Any]:
    """One layer's torch tensors as ``{(collection, name): array}`` for the Flax layer."""
    params, stats = template.get("params", {}), template.get("batch_stats", {})
    where = f"torch '{prefix}' -> flax '{path_text(path)}'"
    if "kernel" in params:
        out = {}
        if "weight" in tensors and tensors["weight"].ndim < 2:
            raise ValueError(
                f"{where}: the Flax layer is a Conv or Dense ('kernel'), but the torch "
                f"layer's weight has shape {tensors['weight'].shape}, not (out, in, ...): "
                "check name_map"
            )
        if "weight" in tensors:
            out[("params", "kernel")] = _conv_or_dense_kernel(tensors.pop("weight"))
        if "bias" in tensors and "bias" in params:
            out[("params", "bias")] = tensors.pop("bias")
        return out
    if "weight" in stats and "running_mean" in stats:  # FrozenBatchNorm2d
        taken = {k: tensors.pop(k) for k in list(tensors)}
        try:
            variables = FrozenBatchNorm2d.from_torch_state_dict(taken)
        except (KeyError, ValueError) as e:
            raise _layer_error(where, e) from e
        return {("batch_stats", k): v for k, v in variables["batch_stats"].items()}
    if "scale" in params or "mean" in stats:  # flax.linen.BatchNorm
        renames = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                   "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
        out = {renames[k]: tensors.pop(k) for k in list(tensors) if k in renames}
        tensors.pop("num_batches_tracked", None)
        return out
    if "weight" in params or "running_mean" in stats:  # jbn BatchNorm*d / SyncBatchNorm
        bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        taken = {k: tensors.pop(k) for k in bn_keys if k in tensors}
        try:
            variables = from_torch_state_dict(taken)
        except (KeyError, ValueError) as e:
            raise _layer_error(where, e) from e
        return {(c, k): v for c, tree in variables.items() for k, v in tree.items()}
    raise ValueError(
        f"{where}: don't know how to load into a Flax layer with variables "
        f"{ {c: sorted(t) for c, t in template.items()} }; expected a Conv/Dense ('kernel'), "
        "a jbn batch norm ('weight'/'running_mean'), FrozenBatchNorm2d or flax BatchNorm"
    )


def _set(tree: dict[Any, Any], path: Path, value: Any) -> None:
    """Sets the leaf at ``path``; a boxed leaf (``nn.Partitioned`` and other axis
    metadata) keeps its box around the new value."""
    for name in path[:-1]:
        tree = tree[name]
    old = tree[path[-1]]
    tree[path[-1]] = old.replace_boxed(value) if isinstance(old, meta.AxisMetadata) else value


def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _from_nnx(value: Any) -> bool:
    return type(value).__module__.startswith("flax.nnx")


def check_pure(variables: Mapping[str, Any]) -> None:
    """Raises a TypeError for an NNX state (``nnx.State``, ``nnx.Variable`` leaves) in
    place of its pure dict, whose leaves would not match as arrays."""
    if any(_from_nnx(v) for v in jax.tree.leaves(variables, is_leaf=_from_nnx)):
        raise TypeError(
            "variables hold NNX state (nnx.State or nnx.Variable); pass its pure dict: "
            '{"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)} '
            "with params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)[1:]"
        )


def group_by_layer(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"<prefix>.<tensor>": value}`` as ``{prefix: {tensor: value}}``, in key order."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = value
    return groups


def flax_path(prefix: str, name_map: Mapping[str, str | Sequence[str | int]] | None
              ) -> Path | None:
    """The Flax module path of the torch layer ``prefix``; None where ``name_map``
    (given) lacks it. Without a map, the prefix itself with ``.`` read as ``/``."""
    if name_map is None:
        return tuple(prefix.split(".")) if prefix else ()
    return _as_path(name_map[prefix]) if prefix in name_map else None


def layer_variables(variables: Mapping[str, Any], path: Path
                    ) -> tuple[dict[str, Path | None], dict[str, dict[str, Any]]]:
    """The keys of ``path`` in each collection, and the layer's array leaves there
    (collections where it has none left out)."""
    keys = {c: _resolve(variables[c], path) for c in variables}
    leaves = {c: _leaves(_subtree(variables[c], keys[c])) for c in variables}
    return keys, {c: t for c, t in leaves.items() if t}


def leaves_not_in(variables: Mapping[str, Any], done: set[tuple[str, str]]) -> list[str]:
    """``collection/path`` of every leaf of ``variables`` (a box counts as one) not in
    ``done``, a set of ``(collection, path)``."""
    return [
        f"{c}/{leaf_text}"
        for c in variables
        for kp, _ in jax.tree_util.tree_flatten_with_path(
            variables[c], is_leaf=lambda v: isinstance(v, meta.AxisMetadata))[0]
        if (c, leaf_text := path_text(tuple(getattr(k, "key", k) for k in kp))) not in done
    ]


def load_torch_state_dict(
    variables: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    name_map: Mapping[str, str | Sequence[str | int]] | None = None,
) -> dict[str, Any]:
    """Loads a PyTorch model's ``state_dict`` into an equivalent Flax model's variables.

    Like ``torch.nn.Module.load_state_dict(strict=True)``: every torch tensor must be
    used and every Flax variable must be filled, with equal shapes. Per layer:

    - ``Conv1d/2d/3d`` (``weight`` ``(O, I, *spatial)``) into ``nn.Conv``'s
      ``kernel`` ``(*spatial, I, O)``; ``Linear`` (``(out, in)``) into ``nn.Dense``'s
      ``kernel`` ``(in, out)``; ``bias`` as is;
    - ``BatchNorm*d``/``SyncBatchNorm`` into jbn's batch-norm modules through
      :func:`jbn.from_torch_state_dict`; into :class:`jbn.FrozenBatchNorm2d` (without
      ``num_batches_tracked``); into ``flax.linen.BatchNorm`` (``scale``, ``bias``,
      ``mean``, ``var``; ``num_batches_tracked`` dropped).

    The kind of layer is read from the Flax variables at the mapped path, which do not
    tell a ``nn.ConvTranspose`` from a ``nn.Conv``: transposed convolutions (torch's
    weight ``(I, O, *spatial)``, and a flipped kernel) are not supported, and one whose
    shapes happen to fit would load as a convolution; map them yourself.

    A Flax NNX model loads through its pure-dict state: with ``graph, params, stats =
    nnx.split(model, nnx.Param, nnx.BatchStat)``, pass ``{"params":
    nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}``, then put the
    result back with ``nnx.replace_by_pure_dict`` and ``nnx.merge``. The integer keys
    of an ``nnx.List``'s children match torch's indices (``features.0``).

    Args:
      variables: the Flax model's variables as ``model.init`` gives them (a template:
        its structure, shapes and dtypes are kept), e.g. ``{"params": ...,
        "batch_stats": ...}``.
      state_dict: ``torch_model.state_dict()``: keys ``"<layer prefix>.<tensor>"``,
        torch tensors or arrays.
      name_map: torch layer prefix -> Flax module path (``"layer1_0/conv1"`` or a
        tuple of names, integers for an NNX list's children), e.g.
        ``{"layer1.0.conv1": "layer1_0/conv1", "fc": "fc"}``.
        None maps every prefix to itself with ``.`` read as ``/``.

    Returns:
      New variables of ``variables``' structure, each leaf in the template's dtype.

    Raises:
      KeyError: torch keys that no Flax variable takes (a prefix absent from
        ``name_map``, a path with no Flax module, a tensor the layer has no variable
        for), Flax variables that no torch key fills, or torch layers without every
        tensor their Flax layer needs; every offending name is listed.
      ValueError: a converted tensor whose shape differs from the Flax variable's.
    """
    check_pure(variables)
    groups = group_by_layer({k: to_numpy(v) for k, v in state_dict.items()})
    out = _copy(variables)
    filled: set[tuple[str, str]] = set()
    unused: list[str] = []
    incomplete: list[str] = []
    loaded_from: dict[str, str] = {}
    for prefix, tensors in groups.items():
        path = flax_path(prefix, name_map)
        if path is None:
            unused += [torch_key(prefix, k) for k in tensors]
            continue
        text = path_text(path)
        if text in loaded_from:
            raise KeyError(f"torch layers '{loaded_from[text]}' and '{prefix}' both map "
                           f"to flax '{text}': one would overwrite the other")
        loaded_from[text] = prefix
        keys, template = layer_variables(variables, path)
        if not template:
            unused += [f"{torch_key(prefix, k)} (no Flax module at {text})" for k in tensors]
            continue
        remaining = dict(tensors)
        try:
            converted = _convert_layer(prefix, path, remaining, template)
        except _IncompleteLayer as e:
            incomplete.append(e.args[0])
            continue
        unused += [torch_key(prefix, k) for k in remaining]
        for (collection, name), value in converted.items():
            target = meta.unbox(template.get(collection, {}).get(name))
            where = f"{collection}/{text}/{name}"
            if target is None:
                unused.append(f"{prefix} -> {where}")
                continue
            value = np.asarray(value)
            if value.shape != tuple(target.shape):
                raise ValueError(
                    f"shape mismatch: torch '{prefix}' gives {where} shape {value.shape} "
                    f"(after conversion), the Flax variable has shape {tuple(target.shape)}"
                )
            leaf = (*(keys[collection] or ()), name)
            _set(out[collection], leaf, jnp.asarray(value, dtype=target.dtype))
            filled.add((collection, path_text(leaf)))
    missing = leaves_not_in(variables, filled)
    if unused or missing or incomplete:
        raise KeyError(
            "torch state_dict and Flax variables do not match: unused torch keys: "
            f"{', '.join(sorted(unused)) or 'none'}; Flax variables not filled: "
            f"{', '.join(sorted(missing)) or 'none'}"
            + "".join(f"; {problem}" for problem in incomplete)
        )
    return out
