"""CORnet-S (Kubilius et al. 2019), laid out like the public checkpoint.

The network follows dicarlolab/CORnet's ``cornet_s.py``, the code that produced the
published weights (``cornet_s-1d3f7974.pth``):

* four areas ``V1``, ``V2``, ``V4``, ``IT`` and a ``decoder``, held in an
  ``nn.Sequential`` that is the model's only child, named ``module``. The checkpoint's
  keys carry the ``module.`` prefix left by ``DataParallel``; with this naming they load
  unchanged (``module.V1.conv1.weight``, ..., ``module.decoder.linear.bias``);
* ``V2``, ``V4`` and ``IT`` are recurrent :class:`CORblockS` blocks run for 2, 4 and 2
  time steps. Their convolutions are shared across time steps, each step has its own
  batch norms, and only the first step downsamples (stride 2 in ``conv2`` and in the
  ``skip`` path);
* all convolutions are bias-free; only ``decoder.linear`` has a bias.

Differences from the original that do not change any value: ReLUs are not in place
(so that activations captured by hooks are not overwritten later in the pass), and
``conv2``'s stride is passed per call instead of by mutating ``conv2.stride``, so the
model can be run repeatedly and from several threads. ``conv2`` is still called as a
module, so a forward hook on e.g. ``module.V4.conv2`` fires once per time step.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CORblockS", "CORnetS", "build_cornet_s"]


class _StepConv2d(nn.Conv2d):
    """A Conv2d whose stride can be chosen per call (``conv(x, stride=2)``).

    The parameters are an ordinary ``nn.Conv2d``'s; without ``stride`` it uses its own.
    """

    def forward(self, x: torch.Tensor, stride: int | None = None) -> torch.Tensor:
        if stride is None:
            return super().forward(x)
        return F.conv2d(x, self.weight, self.bias, stride, self.padding, self.dilation, self.groups)


class CORblockS(nn.Module):
    """One recurrent CORnet-S area.

    Computes ``x = conv_input(inp)`` once, then for each time step ``t``::

        skip = norm_skip(skip(x)) if t == 0 else x
        x = relu(norm1_t(conv1(x)))
        x = relu(norm2_t(conv2(x, stride 2 if t == 0 else 1)))
        x = relu(norm3_t(conv3(x)) + skip)

    and returns ``x`` after the last step. ``conv1``/``conv2``/``conv3`` are shared by all
    steps; the batch norms ``norm{1,2,3}_{t}`` belong to one step each.
    """

    scale = 4

    def __init__(self, in_channels: int, out_channels: int, times: int = 1):
        super().__init__()
        wide = out_channels * self.scale
        self.times = times
        # registration order follows the original, so state_dict() lists keys as the file does
        self.conv_input = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.skip = nn.Conv2d(out_channels, out_channels, kernel_size=1, stride=2, bias=False)
        self.norm_skip = nn.BatchNorm2d(out_channels)
        self.conv1 = nn.Conv2d(out_channels, wide, kernel_size=1, bias=False)
        self.nonlin1 = nn.ReLU()
        self.conv2 = _StepConv2d(wide, wide, kernel_size=3, stride=1, padding=1, bias=False)
        self.nonlin2 = nn.ReLU()
        self.conv3 = nn.Conv2d(wide, out_channels, kernel_size=1, bias=False)
        self.nonlin3 = nn.ReLU()
        self.output = nn.Identity()
        for t in range(times):
            self.add_module(f"norm1_{t}", nn.BatchNorm2d(wide))
            self.add_module(f"norm2_{t}", nn.BatchNorm2d(wide))
            self.add_module(f"norm3_{t}", nn.BatchNorm2d(out_channels))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.conv_input(inp)
        for t in range(self.times):
            if t == 0:
                skip = self.norm_skip(self.skip(x))
                stride = 2
            else:
                skip = x
                stride = 1
            x = self.nonlin1(self.get_submodule(f"norm1_{t}")(self.conv1(x)))
            x = self.nonlin2(self.get_submodule(f"norm2_{t}")(self.conv2(x, stride=stride)))
            x = self.get_submodule(f"norm3_{t}")(self.conv3(x))
            x = self.output(self.nonlin3(x + skip))
        return x


class CORnetS(nn.Module):
    """CORnet-S: maps a normalised image batch ``[B, 3, H, W]`` to 1000 ImageNet logits.

    The areas live in ``self.module`` (``module.V1`` ... ``module.IT``,
    ``module.decoder``), matching the keys of the published checkpoint.
    """

    #: keys the 2018 checkpoint may lack; load_state() keeps the model's own values
    featx_optional_keys = ("*.num_batches_tracked",)

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        v1 = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm1", nn.BatchNorm2d(64)),
            ("nonlin1", nn.ReLU()),
            ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ("conv2", nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1, bias=False)),
            ("norm2", nn.BatchNorm2d(64)),
            ("nonlin2", nn.ReLU()),
            ("output", nn.Identity()),
        ]))
        decoder = nn.Sequential(OrderedDict([
            ("avgpool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("linear", nn.Linear(512, num_classes)),
            ("output", nn.Identity()),
        ]))
        self.module = nn.Sequential(OrderedDict([
            ("V1", v1),
            ("V2", CORblockS(64, 128, times=2)),
            ("V4", CORblockS(128, 256, times=4)),
            ("IT", CORblockS(256, 512, times=2)),
            ("decoder", decoder),
        ]))
        self._init_weights()

    def _init_weights(self) -> None:
        """The original's initialisation: He-normal convs (fan-out), BN scale 1, shift 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def build_cornet_s(num_classes: int = 1000) -> CORnetS:
    """Build CORnet-S with random weights (drawn from torch's global RNG)."""
    return CORnetS(num_classes=num_classes)
