"""CochCNN9 (Feather et al. 2023; ``kell2018`` in the original code), with its front end.

The network of ``robustness/audio_models/kell2018.py`` (spec/original_models.md section 8),
applied to the cochleagram (``[B, 1, 211, 390]``, frequency x time):

====  ==================  =========================================  ===============
 #    child               operation                                   output C x F x T
====  ==================  =========================================  ===============
 1    ``batchnorm0``      BatchNorm2d(1)                              1 x 211 x 390
 2    ``conv0``           conv 1->96, k [7, 14], s [3, 3]             96 x 71 x 130
 3    ``relu0``           ReLU
 4    ``maxpool0``        max pool k [2, 5], s [2, 2]                 96 x 36 x 65
 5    ``batchnorm1``      BatchNorm2d(96)
 6    ``conv1``           conv 96->256, k [4, 8], s [2, 2]            256 x 18 x 33
 7    ``relu1``           ReLU
 8    ``maxpool1``        max pool k [2, 5], s [2, 2]                 256 x 9 x 17
 9    ``batchnorm2``      BatchNorm2d(256)
 10   ``conv2``           conv 256->512, k [2, 5]                     512 x 9 x 17
 11   ``relu2``           ReLU
 12   ``conv3``           conv 512->1024, k [2, 5]                    1024 x 9 x 17
 13   ``relu3``           ReLU
 14   ``conv4``           conv 1024->512, k [2, 5]                    512 x 9 x 17
 15   ``relu4``           ReLU
 16   ``avgpool``         average pool k [2, 5], s [2, 2]             512 x 5 x 9
 17   (flatten)           C, F, T order                               23040
 18   ``fullyconnected``  Linear(23040, 4096)
 19   ``relufc``          ReLU
 20   ``dropout``         Dropout(0.5)
 21   ``classification``  Linear(4096, 794)                           794
====  ==================  =========================================  ===============

Details that decide the values:

* every convolution and pool pads like TensorFlow's ``'SAME'``, computed per call and
  per axis: ``out = ceil(in / stride)``, total padding ``max((out - 1) * stride + k - in,
  0)``, the smaller half (floor) before (top/left), the rest after. This holds for
  stride 1 too;
* max pools pad with ``-inf`` (padding never wins); the average pool pads with zeros that
  **count** in the mean (PyTorch ``count_include_pad=True``, unlike TensorFlow);
* the five convolutions have no bias; only the two Linear layers do;
* the 512 x 5 x 9 map is flattened in C, F, T order (the original code writes the size
  as ``512*9*5``).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .cochleagram import with_front_end

__all__ = ["AvgPool2dSame", "Conv2dSame", "CochCNN9", "MaxPool2dSame", "build_coch_cnn9", "same_padding"]

N_CLASSES = 794


def same_padding(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, ...]:
    """TensorFlow 'SAME' padding for ``F.pad``: ``(left, right, top, bottom)``.

    ``size``, ``kernel`` and ``stride`` are ``(height, width)``.
    """
    pads = []
    for n, k, s in zip(size, kernel, stride):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` (no built-in padding) with TensorFlow 'SAME' zero padding per call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, same_padding(x.shape[-2:], self.kernel_size, self.stride))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MaxPool2dSame(nn.MaxPool2d):
    """``nn.MaxPool2d`` with TensorFlow 'SAME' padding by ``-inf``.

    ``kernel_size`` and ``stride`` are ``(height, width)`` pairs.
    """

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int]):
        super().__init__(tuple(kernel_size), stride=tuple(stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, same_padding(x.shape[-2:], self.kernel_size, self.stride), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class AvgPool2dSame(nn.AvgPool2d):
    """``nn.AvgPool2d`` with TensorFlow 'SAME' zero padding that counts in the mean.

    ``kernel_size`` and ``stride`` are ``(height, width)`` pairs.
    """

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int]):
        super().__init__(tuple(kernel_size), stride=tuple(stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, same_padding(x.shape[-2:], self.kernel_size, self.stride))
        return F.avg_pool2d(x, self.kernel_size, self.stride)


class CochCNN9(nn.Module):
    """The CochCNN9 network on a cochleagram ``[B, 1, F, T]`` (table in the module docstring)."""

    def __init__(self, num_classes: int = N_CLASSES):
        super().__init__()
        # registration order gives the checkpoint's key order
        layers = OrderedDict([
            ("batchnorm0", nn.BatchNorm2d(1)),
            ("conv0", Conv2dSame(1, 96, (7, 14), (3, 3))),
            ("relu0", nn.ReLU()),
            ("maxpool0", MaxPool2dSame((2, 5), (2, 2))),
            ("batchnorm1", nn.BatchNorm2d(96)),
            ("conv1", Conv2dSame(96, 256, (4, 8), (2, 2))),
            ("relu1", nn.ReLU()),
            ("maxpool1", MaxPool2dSame((2, 5), (2, 2))),
            ("batchnorm2", nn.BatchNorm2d(256)),
            ("conv2", Conv2dSame(256, 512, (2, 5), (1, 1))),
            ("relu2", nn.ReLU()),
            ("conv3", Conv2dSame(512, 1024, (2, 5), (1, 1))),
            ("relu3", nn.ReLU()),
            ("conv4", Conv2dSame(1024, 512, (2, 5), (1, 1))),
            ("relu4", nn.ReLU()),
            ("avgpool", AvgPool2dSame((2, 5), (2, 2))),
        ])
        for name, layer in layers.items():
            self.add_module(name, layer)
        self._conv_stack = tuple(layers)
        self.fullyconnected = nn.Linear(512 * 5 * 9, 4096)
        self.relufc = nn.ReLU()
        self.dropout = nn.Dropout(p=0.5)
        self.classification = nn.Linear(4096, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._conv_stack:
            x = getattr(self, name)(x)
        x = torch.flatten(x, 1)  # C, F, T order, as the FC weights expect
        x = self.dropout(self.relufc(self.fullyconnected(x)))
        return self.classification(x)


def build_coch_cnn9() -> nn.Module:
    """CochCNN9 behind the cochleagram, randomly initialised.

    Children ``0`` (the front end, :func:`featx.models.cochleagram.build_front_end`) and
    ``1`` (:class:`CochCNN9`), so that the state dict has the published file's keys
    without their ``module.model.`` prefix. Takes a waveform ``[B, 40000]`` or
    ``[B, 1, 40000]`` (20 kHz, demeaned, RMS 0.1) and returns the 794 word logits.
    """
    return with_front_end(CochCNN9())
