"""The input contract as part of the model: clamp, then normalise, inside forward.

The original implementations normalise inside the network wrapper, after clamping to
the valid input range (spec section 0). featx does the same with a forward pre-hook on
the root module and non-persistent buffers, so the network's state dict and module
paths stay exactly those of the published checkpoint.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

__all__ = ["InputRangeWarning", "attach_input_normalization"]


def attach_input_normalization(
    model: nn.Module,
    value_range: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    channel_dim: int = 1,
) -> nn.Module:
    """Make ``model`` clamp its input to ``value_range`` and apply ``(x - mean) / std``.

    ``mean`` and ``std`` broadcast over dimension ``channel_dim`` of the input (the
    colour channel of an NCHW image batch; a single value for waveforms). Returns the
    same module, changed in place.
    """
    if len(mean) != len(std):
        raise ValueError(f"mean {list(mean)!r} and std {list(std)!r} differ in length")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)!r}")
    model.register_buffer("featx_input_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
    model.register_buffer("featx_input_std", torch.tensor(std, dtype=torch.float32), persistent=False)
    model.featx_value_range = (float(value_range[0]), float(value_range[1]))
    model.featx_channel_dim = channel_dim
    model.register_forward_pre_hook(_normalize_input)
    return model


class InputRangeWarning(UserWarning):
    """A model input lies well outside the range the model takes; it was clamped."""


def _normalize_input(module: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    low, high = module.featx_value_range
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"the model takes a torch.Tensor batch, got {type(x).__name__}; "
                        "convert with torch.as_tensor(...)")
    if not x.is_floating_point():
        raise TypeError(
            f"the model takes float values in [{low:g}, {high:g}], got a {x.dtype} tensor; for "
            "8-bit images use x.float() / 255"
        )
    span = high - low
    if x.numel() and bool(((x < low - 0.5 * span) | (x > high + 0.5 * span)).any()):
        warnings.warn(
            f"input values from {x.min().item():g} to {x.max().item():g} lie well outside the "
            f"model's range [{low:g}, {high:g}] and are clamped to it (images must be RGB in "
            "[0, 1], not 0-255)", InputRangeWarning, stacklevel=3)
    shape = [1] * x.dim()
    if module.featx_input_mean.numel() > 1:
        shape[module.featx_channel_dim] = -1
    mean = module.featx_input_mean.to(x.dtype).view(shape)
    std = module.featx_input_std.to(x.dtype).view(shape)
    return ((x.clamp(low, high) - mean) / std, *rest)
