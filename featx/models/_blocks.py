"""Pieces shared by several model definitions."""

from __future__ import annotations

from torch import nn

__all__ = ["alexnet_classifier"]


def alexnet_classifier(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """AlexNet's classifier, with the child indices the published checkpoints use:
    0 Dropout, 1 Linear (fc0), 2 ReLU (fc0_relu), 3 Dropout, 4 Linear (fc1),
    5 ReLU (fc1_relu), 6 Linear (final)."""
    return nn.Sequential(
        nn.Dropout(p=dropout),
        nn.Linear(in_features, 4096),
        nn.ReLU(),
        nn.Dropout(p=dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Linear(4096, num_classes),
    )
