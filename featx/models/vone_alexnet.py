"""VOneAlexNet with Gaussian noise (Dapello et al. 2020; Feather et al. 2023).

Follows ``vonealexnet_gaussian_fixed_noise_std4`` of the ``robustness`` fork behind the
paper, the code that wrote ``gvonealexnet_std4.pt``. The network has three children,
whose names the checkpoint's keys use:

``vone_block`` (:class:`VOneBlock`)
    A fixed model of primary visual cortex: two banks of 512 Gabor filters 25x25 in
    quadrature (``simple_conv_q0``/``q1``, stride 4, padding 12; 224 -> 56x56). 256
    channels are simple cells, ``relu(q0)``; 256 are complex cells,
    ``sqrt(1e-5 + q0**2 + q1**2) / sqrt(2)`` (the ``1e-5`` inside the square root is
    the fork's; dicarlolab's VOneNet has none). Both are multiplied by ``k_exc = 25``,
    Gaussian noise is added, and a ReLU gives the block's output (stage ``v1_output``,
    512x56x56). The Gabor banks are parameters that are never trained; they are in the
    checkpoint, so loading weights reads them from the file.
``bottleneck``
    A 1x1 convolution 512 -> 64 without bias and without a nonlinearity after it.
``model`` (:class:`AlexNetBackEnd`)
    AlexNet from its second convolution on: Conv 64->192 k5 **stride 2**, max pools with
    padding 1, ``AdaptiveAvgPool2d((7, 7))`` and a classifier whose first layer is
    ``Linear(12544, 4096)`` (256 x 7 x 7). The paper's supplement writes
    ``Linear(256 * 6 * 6, 4096)``; the code and the checkpoint use 12544.

Noise (``build_vone_alexnet(noise=..., noise_seed=...)``):

``noise="on"`` (default)
    The model as published and evaluated: the paper's evaluation fixed the noise, adding
    one tensor of shape ``[1, 512, 56, 56]`` drawn from N(0, 4^2) to every image. featx
    does the same, drawing that tensor from a ``torch.Generator`` seeded with
    ``noise_seed``, so the output is deterministic. The tensor is a non-persistent
    buffer (not in the state dict), and it fixes the input size to 224x224. **The noise
    tensor used in the paper was never stored and cannot be recovered, so featx's
    seeded tensor differs from it**: activations at and after ``v1_output`` match the
    paper's model in distribution, not value for value.
``noise="off"``
    No noise: the deterministic part of the network, which the reference vectors test.

Random weights (``featx.load_model(..., weights="random")``) regenerate the Gabor banks
as the original does (Gabor parameters from neurophysiological distributions with
numpy seed 0, input colour channel of each filter from the torch RNG) and initialise
the rest like the original's layers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import alexnet_classifier

__all__ = [
    "AlexNetBackEnd",
    "GaborFilterBank",
    "VOneAlexNet",
    "VOneBlock",
    "build_vone_alexnet",
    "gabor_kernel",
    "gabor_parameters",
    "vone_gabor_parameters",
]

NOISE_CHOICES = ("on", "off")
NOISE_STD = 4.0
K_EXC = 25.0
IMAGE_SIZE = 224
VISUAL_DEGREES = 8


# ---------------------------------------------------------------------------------------
# Gabor filters (only used to initialise a model that gets no checkpoint)


def gabor_parameters(
    n: int, seed: int = 0, sf_corr: float = 0.75, sf_max: float = 6.0, sf_min: float = 0.0
) -> dict[str, np.ndarray]:
    """Draw ``n`` Gabor parameter sets from the VOneNet's V1 distributions.

    Orientation follows De Valois et al. (1982a), spatial frequency De Valois et al.
    (1982b) limited to ``[sf_min, sf_max]`` cycles/degree, the envelope widths (in
    cycles, ``nx`` along and ``ny`` across the carrier) Ringach (2002), and ``nx`` and
    spatial frequency are correlated by ``sf_corr`` through a Gaussian copula. The draws
    replay numpy's legacy RNG seeded with ``seed`` in the original's order.

    Returns ``sf`` (cycles/degree), ``theta`` and ``phase`` (degrees), ``nx``, ``ny``.
    """
    rng = np.random.RandomState(seed)

    def from_histogram(u, weights, edges):
        return np.interp(u, np.concatenate(([0.0], np.cumsum(weights))), edges)

    ori_edges = np.array([-22.5, 22.5, 67.5, 112.5, 157.5])
    ori_weights = np.array([66, 49, 77, 54]) / 246
    n_edges = np.logspace(-1, 0.2, 6)
    n_joint = np.array([
        [2, 0, 1, 0, 0],
        [8, 9, 4, 1, 0],
        [1, 2, 19, 17, 3],
        [0, 0, 1, 7, 4],
        [0, 0, 0, 0, 0],
    ], dtype=float)
    n_joint /= n_joint.sum()
    nx_weights = n_joint.sum(axis=1)
    nx_weights /= nx_weights.sum()
    sf_edges = np.array([0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8, 11.2])
    sf_weights = np.array([4, 4, 8, 25, 32, 26, 28, 12, 8], dtype=float)
    first = np.flatnonzero(sf_edges >= sf_min)[0]
    last = np.flatnonzero(sf_edges <= sf_max)[-1]
    sf_edges, sf_weights = sf_edges[first:last + 1], sf_weights[first:last]
    sf_weights /= sf_weights.sum()

    phase = from_histogram(rng.rand(n), np.array([1.0]), np.array([0.0, 360.0]))
    theta = from_histogram(rng.rand(n), ori_weights, ori_edges)
    theta[theta < 0] += 180
    normal = rng.multivariate_normal([0, 0], [[1, sf_corr], [sf_corr, 1]], n)
    u = torch.special.ndtr(torch.from_numpy(normal)).numpy()
    nx = 10 ** from_histogram(u[:, 0], nx_weights, np.log10(n_edges))
    v = rng.rand(n)
    ny = np.empty(n)
    for i in range(n):
        row = np.flatnonzero(n_edges < nx[i])[-1]
        ny[i] = 10 ** from_histogram(v[i], n_joint[row] / n_joint[row].sum(), np.log10(n_edges))
    sf = 2 ** from_histogram(u[:, 1], sf_weights, np.log2(sf_edges))
    return {"sf": sf, "theta": theta, "phase": phase, "nx": nx, "ny": ny}


def gabor_kernel(
    frequency: float, sigma_x: float, sigma_y: float, theta: float, phase: float, size: int
) -> torch.Tensor:
    """A ``size`` x ``size`` Gabor: normalised Gaussian envelope times a cosine carrier.

    ``frequency`` in cycles/pixel, ``sigma_x``/``sigma_y`` in pixels along/across the
    carrier, ``theta`` and ``phase`` in radians. The first coordinate runs down the rows.
    """
    half = size // 2
    grid = torch.arange(-half, half + 1, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    along = rows * math.cos(theta) + cols * math.sin(theta)
    across = -rows * math.sin(theta) + cols * math.cos(theta)
    envelope = torch.exp(-0.5 * (along**2 / sigma_x**2 + across**2 / sigma_y**2))
    envelope = envelope / (2 * math.pi * sigma_x * sigma_y)
    return envelope * torch.cos(2 * math.pi * frequency * along + phase)


# ---------------------------------------------------------------------------------------
# modules


class GaborFilterBank(nn.Module):
    """A fixed bank of Gabor filters applied as one bias-free convolution.

    ``weight`` (``[out_channels, 3, k, k]``) is a parameter that is never trained
    (``requires_grad=False``), so it is part of the state dict. Each filter lives in a
    single input colour channel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.stride = stride
        self.padding = kernel_size // 2
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.zeros(shape), requires_grad=False)

    @torch.no_grad()
    def set_gabors(self, params: dict[str, np.ndarray], phase_shift: float = 0.0) -> None:
        """Fill the bank with Gabors, each in a colour channel drawn from torch's RNG."""
        out_channels, in_channels, size, _ = self.weight.shape
        channel = torch.randint(0, in_channels, (out_channels,))
        self.weight.zero_()
        for i in range(out_channels):
            self.weight[i, channel[i]] = gabor_kernel(
                params["sf"][i], params["sigma_x"][i], params["sigma_y"][i],
                params["theta"][i], params["phase"][i] + phase_shift, size,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding)


class VOneBlock(nn.Module):
    """Simple and complex V1 cells, gain, fixed Gaussian noise, ReLU.

    Maps a normalised image batch ``[B, 3, 224, 224]`` to ``[B, 512, 56, 56]``: the first
    256 channels are simple cells ``relu(q0)``, the last 256 complex cells
    ``sqrt(1e-5 + q0**2 + q1**2) / sqrt(2)``, both times 25; then ``fixed_noise`` (if
    any) is added and a ReLU applied. Children ``simple`` (ReLU), ``complex``,
    ``gabors`` and ``noise`` (identities) mark the intermediate values for hooks.
    Without ``gabor_params`` (see :func:`vone_gabor_parameters`) the banks start as zeros.
    """

    def __init__(
        self,
        simple_channels: int = 256,
        complex_channels: int = 256,
        kernel_size: int = 25,
        stride: int = 4,
        k_exc: float = K_EXC,
        fixed_noise: torch.Tensor | None = None,
        gabor_params: dict[str, np.ndarray] | None = None,
    ):
        super().__init__()
        channels = simple_channels + complex_channels
        self.simple_channels = simple_channels
        self.k_exc = k_exc
        self.simple_conv_q0 = GaborFilterBank(3, channels, kernel_size, stride)
        self.simple_conv_q1 = GaborFilterBank(3, channels, kernel_size, stride)
        self.simple = nn.ReLU()
        self.complex = nn.Identity()
        self.gabors = nn.Identity()
        self.noise = nn.Identity()
        self.output = nn.ReLU()
        if gabor_params is not None:
            self.simple_conv_q0.set_gabors(gabor_params)
            self.simple_conv_q1.set_gabors(gabor_params, phase_shift=math.pi / 2)
        # not part of the state dict: the published checkpoint holds no noise
        self.register_buffer("fixed_noise", fixed_noise, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q0 = self.simple_conv_q0(x)
        q1 = self.simple_conv_q1(x)
        n = self.simple_channels
        simple = self.simple(q0[:, :n])
        complex_ = self.complex(torch.sqrt(1e-5 + q0[:, n:] ** 2 + q1[:, n:] ** 2) / math.sqrt(2))
        x = self.gabors(self.k_exc * torch.cat((simple, complex_), dim=1))
        if self.fixed_noise is not None:
            if x.shape[1:] != self.fixed_noise.shape[1:]:
                raise ValueError(
                    f"VOneAlexNet's fixed noise has shape {list(self.fixed_noise.shape[1:])} "
                    f"but the V1 response has shape {list(x.shape[1:])}; with noise='on' "
                    f"the input must be {IMAGE_SIZE}x{IMAGE_SIZE} (or build with noise='off')"
                )
            x = x + self.fixed_noise
        return self.output(self.noise(x))

    def extra_repr(self) -> str:
        noise = "none" if self.fixed_noise is None else f"fixed {list(self.fixed_noise.shape)}"
        return f"simple_channels={self.simple_channels}, k_exc={self.k_exc}, noise={noise}"


class AlexNetBackEnd(nn.Module):
    """AlexNet after its first convolution, for a 64-channel 56x56 input -> logits.

    ``features``: Conv 64->192 k5 s2 p2, ReLU, MaxPool k3 s2 p1, three Conv k3 p1 with
    ReLUs, MaxPool k3 s2 p1 (-> 256x7x7); ``avgpool`` to 7x7; ``classifier``: Dropout,
    Linear(12544, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Linear(4096, classes).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(64, 192, kernel_size=5, stride=2, padding=2),  # 0 conv1
            nn.ReLU(),                                                # 1 relu1
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),         # 2 maxpool1
            nn.Conv2d(192, 384, kernel_size=3, padding=1),            # 3 conv2
            nn.ReLU(),                                                # 4 relu2
            nn.Conv2d(384, 256, kernel_size=3, padding=1),            # 5 conv3
            nn.ReLU(),                                                # 6 relu3
            nn.Conv2d(256, 256, kernel_size=3, padding=1),            # 7 conv4
            nn.ReLU(),                                                # 8 relu4
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),         # 9 maxpool2
        )
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = alexnet_classifier(256 * 7 * 7, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class VOneAlexNet(nn.Module):
    """VOneAlexNet: maps a normalised image batch ``[B, 3, 224, 224]`` to 1000 logits.

    ``vone_block`` -> ``bottleneck`` (1x1 conv 512->64, no bias) -> ``model`` (the AlexNet
    back end). ``noise`` records the noise setting (``"on"`` or ``"off"``).
    """

    def __init__(
        self,
        fixed_noise: torch.Tensor | None = None,
        gabor_params: dict[str, np.ndarray] | None = None,
        num_classes: int = 1000,
    ):
        super().__init__()
        # construction order replays the original's use of torch's RNG
        self.vone_block = VOneBlock(fixed_noise=fixed_noise, gabor_params=gabor_params)
        self.bottleneck = nn.Conv2d(512, 64, kernel_size=1, stride=1, bias=False)
        nn.init.kaiming_normal_(self.bottleneck.weight, mode="fan_out", nonlinearity="relu")
        self.model = AlexNetBackEnd(num_classes=num_classes)
        self.noise = "off" if fixed_noise is None else "on"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.bottleneck(self.vone_block(x)))


def build_vone_alexnet(noise: str = "on", noise_seed: int = 0, num_classes: int = 1000) -> VOneAlexNet:
    """Build VOneAlexNet with Gabor front end and random back end.

    Args:
        noise: ``"on"`` adds a fixed Gaussian noise tensor (std 4) after the V1 block, as
            the published model; ``"off"`` leaves it out. See the module docstring.
        noise_seed: seed of the ``torch.Generator`` that draws the fixed noise.
        num_classes: size of the last layer.

    The Gabor banks' colour channels and the back end's weights come from torch's
    global RNG; the noise does not touch it.
    """
    if noise not in NOISE_CHOICES:
        raise ValueError(f"noise must be one of {NOISE_CHOICES}, got {noise!r}")
    if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
        raise TypeError(f"noise_seed must be an int, got {noise_seed!r}")

    fixed_noise = None
    if noise == "on":
        side = IMAGE_SIZE // 4
        generator = torch.Generator().manual_seed(noise_seed)
        fixed_noise = NOISE_STD * torch.randn((1, 512, side, side), generator=generator)

    return VOneAlexNet(fixed_noise=fixed_noise, gabor_params=vone_gabor_parameters(),
                       num_classes=num_classes)


def vone_gabor_parameters(seed: int = 0) -> dict[str, np.ndarray]:
    """The VOneBlock's 512 Gabor parameter sets in pixel units, as the original builds them.

    Draws :func:`gabor_parameters` (cycles/degree, degrees) and converts them for a
    224-pixel image spanning 8 degrees (28 pixels per degree): ``sf`` in cycles/pixel,
    ``sigma_x``/``sigma_y`` in pixels, ``theta``/``phase`` in radians.
    """
    raw = gabor_parameters(512, seed=seed)
    sf = raw["sf"] / (IMAGE_SIZE / VISUAL_DEGREES)
    return {
        "sf": sf,
        "sigma_x": raw["nx"] / sf,
        "sigma_y": raw["ny"] / sf,
        "theta": raw["theta"] / 180 * np.pi,
        "phase": raw["phase"] / 180 * np.pi,
    }
