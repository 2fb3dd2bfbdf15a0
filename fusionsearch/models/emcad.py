"""EMCAD decoder blocks, written from the paper's description.

Rahman, Munir, Marculescu, "EMCAD: Efficient Multi-scale Convolutional Attention Decoding for
Medical Image Segmentation", CVPR 2024. The decoder walks the encoder's feature maps from the
coarsest up. At each stage a multi-scale convolutional attention module (MSCAM = channel attention,
then spatial attention, then a multi-scale convolution block) refines the features; an efficient
up-convolution block (EUCB) brings them to the next finer scale, where a large-kernel grouped
attention gate (LGAG) filters the encoder skip before it is added. Everything is depthwise or
pointwise except two tiny convolutions, which keeps the decoder near 1.9M parameters for PVTv2-B2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` channel groups: channel ``g * n + i`` moves to ``i * groups + g``."""
    batch, channels = x.shape[:2]
    return x.reshape(batch, groups, channels // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


class MSCB(nn.Module):
    """Multi-scale convolution block (an inverted residual with parallel depthwise kernels).

    Pointwise expansion by ``expansion`` (BN, ReLU6); parallel depthwise convolutions with
    ``kernel_sizes`` (each BN, ReLU6) whose outputs are summed; channel shuffle; pointwise projection
    (BN). A residual connection (1x1 projected when the widths differ) eases optimisation.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_sizes: Sequence[int] = (1, 3, 5), expansion: int = 2
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)
        )
        self.depthwise = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            )
            for k in kernel_sizes
        )
        self.shuffle_groups = math.gcd(hidden, out_channels)
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.expand(x)
        hidden = sum(branch(hidden) for branch in self.depthwise)
        hidden = channel_shuffle(hidden, self.shuffle_groups)
        return self.shortcut(x) + self.project(hidden)


class ChannelAttention(nn.Module):
    """CAB: ``x * sigmoid(mlp(avgpool(x)) + mlp(maxpool(x)))`` with a shared bottleneck MLP (1x1 convs)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        reduced = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, reduced, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(reduced, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        peak = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """SAB: ``x * sigmoid(conv7x7([max over channels, mean over channels]))``."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class MSCAM(nn.Sequential):
    """Multi-scale convolutional attention module: ``MSCB(SAB(CAB(x)))``."""

    def __init__(self, channels: int, kernel_sizes: Sequence[int] = (1, 3, 5), expansion: int = 2) -> None:
        super().__init__(
            ChannelAttention(channels), SpatialAttention(), MSCB(channels, channels, kernel_sizes, expansion)
        )


class LGAG(nn.Module):
    """Large-kernel grouped attention gate on a skip connection.

    ``gate`` (decoder features) and ``skip`` (encoder features) each go through a grouped
    ``kernel_size`` convolution + BN to ``channels // 2`` maps; their ReLU'd sum gives, through a 1x1
    convolution + BN + sigmoid, one attention map that scales the skip.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        inner = max(1, channels // 2)
        groups = inner  # each group sees channels // inner inputs: cheap, yet spatially wide
        padding = kernel_size // 2
        # no convolution biases: each is followed by a BatchNorm, whose shift makes them redundant
        self.gate_conv = nn.Sequential(
            nn.Conv2d(channels, inner, kernel_size, padding=padding, groups=groups, bias=False), nn.BatchNorm2d(inner)
        )
        self.skip_conv = nn.Sequential(
            nn.Conv2d(channels, inner, kernel_size, padding=padding, groups=groups, bias=False), nn.BatchNorm2d(inner)
        )
        self.attention = nn.Sequential(nn.Conv2d(inner, 1, 1, bias=False), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        mixed = F.relu(self.gate_conv(gate) + self.skip_conv(skip))
        return skip * self.attention(mixed)


class EUCB(nn.Module):
    """Efficient up-convolution: upsample (nearest) to the skip size, depthwise 3x3 + BN + ReLU, pointwise conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode="nearest")  # x2 for the usual strides, exact for odd sizes
        return self.pointwise(self.depthwise(x))


class EMCADDecoder(nn.Module):
    """The EMCAD decoder over encoder features given coarsest first; returns one map per stage, coarsest first."""

    def __init__(
        self,
        channels: Sequence[int],
        kernel_sizes: Sequence[int] = (1, 3, 5),
        expansion: int = 2,
        lgag_kernel: int = 3,
    ) -> None:
        super().__init__()
        self.channels = list(channels)
        self.attention = nn.ModuleList(MSCAM(c, kernel_sizes, expansion) for c in self.channels)
        pairs = zip(self.channels, self.channels[1:], strict=False)
        self.up = nn.ModuleList(EUCB(c_in, c_out) for c_in, c_out in pairs)
        self.gates = nn.ModuleList(LGAG(c, lgag_kernel) for c in self.channels[1:])
        self.apply(_init_weights)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        decoded = self.attention[0](features[0])
        stages = [decoded]
        for up, gate, attention, skip in zip(self.up, self.gates, self.attention[1:], features[1:], strict=True):
            upsampled = up(decoded, skip.shape[2:])
            decoded = attention(upsampled + gate(upsampled, skip))
            stages.append(decoded)
        return stages


def _init_weights(module: nn.Module) -> None:
    """He initialisation (fan-out) for convolutions, unit/zero for BN, as usual for ReLU-family decoders."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
