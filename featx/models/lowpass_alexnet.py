"""LowpassAlexNet: AlexNet with Hann-window pooling (Feather et al. 2023).

Follows ``alexnet_reduced_aliasing`` of the ``robustness`` fork behind the paper, the
code that wrote ``alexnet_reduced_aliasing_early_checkpoint.pt``. Compared with
torchvision's AlexNet, the first convolution has stride 1 and is followed by a
stride-4 Hann pooling, and every max pooling is replaced by a stride-2 Hann pooling:

==== ============================================================ ==============
idx  module                                                       output (224)
==== ============================================================ ==============
0    Sequential(Conv2d 3->64 k11 s1 p5, ReLU, HannPool(17, s4, p5)) 64x55x55
1    ReLU  (``relu0``)                                            64x55x55
2    HannPool(9, s2, p2)                                          64x27x27
3/4  Conv2d 64->192 k5 p2, ReLU (``relu1``)                       192x27x27
5    HannPool(9, s2, p2)                                          192x13x13
6-11 three Conv2d k3 p1 + ReLU (``relu2`` .. ``relu4``)           256x13x13
12   HannPool(9, s2, p2)                                          256x6x6
==== ============================================================ ==============

then ``avgpool`` (AdaptiveAvgPool2d 6x6) and torchvision's classifier (9216 -> 4096 ->
4096 -> 1000).

Where the paper's supplement and the code differ: a Hann pooling with ``pool_size=N``
has **N - 2 taps** (the zero end points of ``numpy.hanning(N)`` are dropped), so the
windows are 15x15 and 7x7, not 17x17 and 9x9; with 9 taps the second pool would give
26x26 instead of the stated 27x27. The windows are persistent buffers
(``hann_window2d``), so they are also read from the checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import alexnet_classifier

__all__ = ["HannPooling2d", "LowpassAlexNet", "build_lowpass_alexnet", "hann_window2d"]


def hann_window2d(pool_size: int) -> torch.Tensor:
    """The normalised 2-D Hann window of a ``pool_size`` pooling, ``[1, 1, k, k]``.

    ``k = pool_size - 2`` when ``pool_size > 2`` (the window's zero end points are
    dropped), else ``pool_size``. The window is the outer product of the 1-D symmetric
    Hann window with itself, divided by its sum.
    """
    window = np.hanning(pool_size)
    if pool_size > 2:
        window = window[1:-1]
    window2d = np.outer(window, window)
    window2d = window2d / window2d.sum()
    return torch.from_numpy(window2d).float()[None, None]


class HannPooling2d(nn.Module):
    """Depthwise low-pass pooling: each channel is convolved with a Hann window.

    Every channel is filtered with the same normalised window (``hann_window2d``,
    ``pool_size - 2`` taps per axis), with the given stride and symmetric zero padding
    (padded zeros count in the weighted average). No learnable parameters; the window is
    a persistent buffer.
    """

    def __init__(self, stride: int, pool_size: int, padding: int = 0):
        super().__init__()
        self.stride = stride
        self.pool_size = pool_size
        self.padding = padding
        self.register_buffer("hann_window2d", hann_window2d(pool_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        y = F.conv2d(
            x.reshape(batch * channels, 1, height, width),
            self.hann_window2d,
            stride=self.stride,
            padding=self.padding,
        )
        return y.reshape(batch, channels, y.shape[-2], y.shape[-1])

    def extra_repr(self) -> str:
        taps = self.hann_window2d.shape[-1]
        return f"pool_size={self.pool_size} ({taps} taps), stride={self.stride}, padding={self.padding}"


class LowpassAlexNet(nn.Module):
    """LowpassAlexNet: maps a normalised image batch ``[B, 3, 224, 224]`` to 1000 logits.

    ``features`` and ``classifier`` use the module indices of the original, so the
    state-dict keys are those of the published checkpoint without ``module.model.``.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        conv_hpool = nn.Sequential(OrderedDict([
            ("0", nn.Conv2d(3, 64, kernel_size=11, stride=1, padding=5)),
            ("1", nn.ReLU()),
            ("2", HannPooling2d(stride=4, pool_size=17, padding=5)),
        ]))
        self.features = nn.Sequential(
            conv_hpool,                                       # 0  conv0 + Hann pool
            nn.ReLU(),                                        # 1  relu0
            HannPooling2d(stride=2, pool_size=9, padding=2),  # 2  hpool0
            nn.Conv2d(64, 192, kernel_size=5, padding=2),     # 3  conv1
            nn.ReLU(),                                        # 4  relu1
            HannPooling2d(stride=2, pool_size=9, padding=2),  # 5  hpool1
            nn.Conv2d(192, 384, kernel_size=3, padding=1),    # 6  conv2
            nn.ReLU(),                                        # 7  relu2
            nn.Conv2d(384, 256, kernel_size=3, padding=1),    # 8  conv3
            nn.ReLU(),                                        # 9  relu3
            nn.Conv2d(256, 256, kernel_size=3, padding=1),    # 10 conv4
            nn.ReLU(),                                        # 11 relu4
            HannPooling2d(stride=2, pool_size=9, padding=2),  # 12 hpool2
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = alexnet_classifier(256 * 6 * 6, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_lowpass_alexnet(num_classes: int = 1000) -> LowpassAlexNet:
    """Build LowpassAlexNet with random weights (drawn from torch's global RNG)."""
    return LowpassAlexNet(num_classes=num_classes)
