"""Builders for the four registry models that torchvision defines.

Each builder returns torchvision's own network with random initial weights, so that
its state dict matches the published torchvision files key for key. The paper's
code used the same parameter layout (spec section 2.1); its ReLUs were not in-place,
torchvision's are, which is why the extractor copies activations at capture time.
"""

from __future__ import annotations

from torch import nn
from torchvision import models

__all__ = ["build_alexnet", "build_resnet50", "build_resnet101", "build_vgg19"]


def build_alexnet() -> nn.Module:
    """torchvision's AlexNet, randomly initialised."""
    return models.alexnet(weights=None)


def build_vgg19() -> nn.Module:
    """torchvision's VGG19 (no batch norm), randomly initialised."""
    return models.vgg19(weights=None)


def build_resnet50() -> nn.Module:
    """torchvision's ResNet50, randomly initialised."""
    return models.resnet50(weights=None)


def build_resnet101() -> nn.Module:
    """torchvision's ResNet101, randomly initialised."""
    return models.resnet101(weights=None)
