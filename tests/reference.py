"""PyTorch reference runs shared by the tests: the layer that jbn must reproduce."""

from __future__ import annotations

import numpy as np
import torch

TORCH_LAYERS = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


def torch_layer(spatial_dims: int, num_features: int, *, weight=None, bias=None, **kwargs):
    """A ``torch.nn.BatchNorm{1,2,3}d`` in float32 with the given affine parameters."""
    layer = TORCH_LAYERS[max(spatial_dims, 1)](num_features, **kwargs)
    with torch.no_grad():
        if weight is not None:
            layer.weight.copy_(torch.from_numpy(np.asarray(weight, np.float32)))
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
    return layer


def torch_forward(layer, x_nchw: np.ndarray, train: bool) -> np.ndarray:
    """Runs ``layer`` on a channels-first numpy batch in the given mode; returns the output."""
    layer.train(train)
    with torch.no_grad():
        return layer(torch.from_numpy(np.array(x_nchw, np.float32))).numpy()


def torch_state(layer) -> dict[str, np.ndarray]:
    """The layer's running statistics as numpy arrays, keyed like jbn's state."""
    if not layer.track_running_stats:
        return {}
    return {
        "running_mean": layer.running_mean.numpy().copy(),
        "running_var": layer.running_var.numpy().copy(),
        "num_batches_tracked": layer.num_batches_tracked.numpy().copy(),
    }


def to_channels_last(x: np.ndarray) -> np.ndarray:
    """``(N, C, ...)`` to ``(N, ..., C)``."""
    return np.moveaxis(x, 1, -1)


class Float64BatchNorm:
    """The batch-norm specification computed in float64 with numpy, channels-first input.

    The strict oracle: the float32 outputs of jbn are compared with it at float32
    resolution, while PyTorch's own float32 rounding is allowed for in comparisons
    with torch (see ``torch_tolerance``).
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, weight=None, bias=None, track=True):
        self.eps, self.momentum, self.track = eps, momentum, track
        self.weight = np.ones(num_features) if weight is None else np.asarray(weight, np.float64)
        self.bias = np.zeros(num_features) if bias is None else np.asarray(bias, np.float64)
        self.running_mean = np.zeros(num_features)
        self.running_var = np.ones(num_features)
        self.num_batches_tracked = 0

    def __call__(self, x: np.ndarray, train: bool) -> np.ndarray:
        x = np.asarray(x, np.float64)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        shape = [1] * x.ndim
        shape[1] = -1
        if train or not self.track:
            mean, var = x.mean(axes), x.var(axes)
            if train and self.track:
                n = x.size // x.shape[1]
                self.num_batches_tracked += 1
                f = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
                self.running_mean = (1 - f) * self.running_mean + f * mean
                self.running_var = (1 - f) * self.running_var + f * var * n / (n - 1)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + self.eps)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)

    def state(self) -> dict[str, np.ndarray]:
        if not self.track:
            return {}
        return {
            "running_mean": self.running_mean,
            "running_var": self.running_var,
            "num_batches_tracked": np.asarray(self.num_batches_tracked),
        }


def torch_tolerance(x: np.ndarray, var, eps: float, weight) -> float:
    """Absolute error that PyTorch's float32 arithmetic can make on a channels-first batch.

    PyTorch rounds the mean (or ``x * invstd``) to float32, an error of a few ulps of
    ``|x|``, which normalization divides by ``sqrt(var + eps)``; ``var`` is the
    variance used (batch or running). For data whose mean is large against its spread
    this exceeds the output's float32 resolution, so comparisons with torch allow it
    on top of the float32 tolerance, while jbn itself is held to float64 at float32
    resolution.
    """
    x = np.asarray(x, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    cond = np.abs(x).max(axes) / np.sqrt(np.asarray(var, np.float64) + eps)
    w = np.ones_like(cond) if weight is None else np.abs(np.asarray(weight, np.float64))
    return float(np.max(4 * np.finfo(np.float32).eps * cond * w))


def batch_var(x: np.ndarray) -> np.ndarray:
    """Biased per-channel variance of a channels-first batch, in float64."""
    x = np.asarray(x, np.float64)
    return x.var(tuple(i for i in range(x.ndim) if i != 1))


def ninther_shift(x: np.ndarray, axis: int) -> np.ndarray:
    """jbn's shift per channel, as documented: Tukey's ninther of nine values.

    Over the other axes (lengths ``L_0, L_1, ...``), three centres: centre ``i`` at
    index ``(2k + 1) * L_d // 6``, ``k = (i + d) % 3``, along each axis ``d``; each
    centre's flat (row-major) position, kept within one value of either end, with
    the values just before and after it; the median of the three runs' medians.
    With fewer than nine values, the middle one. A shift that is not finite is 0.
    """
    moved = np.moveaxis(np.asarray(x), axis, -1)
    dims = moved.shape[:-1]
    values = moved.reshape(-1, x.shape[axis])
    r = values.shape[0]
    if r < 9:
        shift = values[r // 2]
        return np.where(np.isfinite(shift), shift, 0).astype(shift.dtype)
    runs = []
    for i in range(3):
        centre = tuple((2 * ((i + d) % 3) + 1) * length // 6 for d, length in enumerate(dims))
        t = int(np.clip(np.ravel_multi_index(centre, dims), 1, r - 2))
        runs.append(np.median(values[t - 1:t + 2], axis=0))
    shift = np.median(np.stack(runs), axis=0)
    return np.where(np.isfinite(shift), shift, 0).astype(shift.dtype)