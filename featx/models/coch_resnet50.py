"""CochResNet50 (Feather et al. 2023), with its cochleagram front end.

The original (``robustness/audio_models/resnet.py``, spec/original_models.md section 7) is
the ImageNet ResNet50 with the same module names and Bottleneck blocks (stride on the
3x3 convolution, "v1.5") except for two layers: ``conv1`` takes one input channel
(the cochleagram) and ``fc`` has 794 outputs (words). Square kernels run over the
rectangular ``1 x 211 x 390`` cochleagram (frequency x time). featx uses torchvision's
ResNet with those two layers replaced, which has exactly this parameter layout and
forward pass.

Shapes for one 2 s clip: conv1/relu 64 x 106 x 195, maxpool 64 x 53 x 98, layer1 256 x 53
x 98, layer2 512 x 27 x 49, layer3 1024 x 14 x 25, layer4 2048 x 7 x 13, avgpool 2048 x
1 x 1, fc 794.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from .cochleagram import with_front_end

__all__ = ["build_coch_resnet50", "coch_resnet50_network"]

N_CLASSES = 794


def coch_resnet50_network(num_classes: int = N_CLASSES) -> ResNet:
    """The ResNet50 of CochResNet50 (one input channel, ``num_classes`` outputs), random init."""
    net = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
    # replaces the 3-channel stem; initialised like torchvision initialises its convs
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


def build_coch_resnet50() -> nn.Module:
    """CochResNet50 behind the cochleagram, randomly initialised.

    Children ``0`` (the front end, :func:`featx.models.cochleagram.build_front_end`) and
    ``1`` (the ResNet50), so that the state dict has the published file's keys without
    their ``module.model.`` prefix. Takes a waveform ``[B, 40000]`` or ``[B, 1, 40000]``
    (20 kHz, demeaned, RMS 0.1) and returns the 794 word logits.

    The stem's ReLU (``1.relu``) runs once per forward pass (the blocks have their own),
    so it is the stage ``conv1_relu1``.
    """
    return with_front_end(coch_resnet50_network())
