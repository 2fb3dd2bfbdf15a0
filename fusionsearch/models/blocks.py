"""Plain convolution blocks shared by the UNet-style decoders (2D and 3D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusionsearch.errors import ConfigError

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORMS = {
    "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "instance": {2: lambda c: nn.InstanceNorm2d(c, affine=True), 3: lambda c: nn.InstanceNorm3d(c, affine=True)},
}


def check_spatial_dims(spatial_dims: object) -> int:
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ConfigError(f"must be 2 or 3, got {spatial_dims!r}", field="spatial_dims")
    return int(spatial_dims)  # type: ignore[call-overload]


def check_norm(norm: object) -> str:
    if norm not in _NORMS:
        raise ConfigError(f"unknown normalisation {norm!r}", field="norm", fix=f"Use one of {', '.join(_NORMS)}")
    return str(norm)


def conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = True) -> nn.Module:
    """A stride-1 convolution with 'same' padding."""
    return _CONV[spatial_dims](in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


class DoubleConv(nn.Sequential):
    """Two (3x3 conv, normalisation, ReLU) layers: the basic UNet stage."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        make_norm = _NORMS[norm][spatial_dims]
        super().__init__(
            conv(spatial_dims, in_channels, out_channels, 3, bias=False),
            make_norm(out_channels),
            nn.ReLU(inplace=True),
            conv(spatial_dims, out_channels, out_channels, 3, bias=False),
            make_norm(out_channels),
            nn.ReLU(inplace=True),
        )


class UpConcatBlock(nn.Module):
    """Upsample to the skip's size (nearest), concatenate the skip, then a :class:`DoubleConv`.

    Upsampling to the skip's exact size (not a fixed x2) keeps odd input sizes working.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int, norm: str = "batch"
    ) -> None:
        super().__init__()
        self.block = DoubleConv(spatial_dims, in_channels + skip_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.block(torch.cat([x, skip], dim=1))


def heads(spatial_dims: int, channels: list[int], num_classes: int) -> nn.ModuleList:
    """One 1x1 segmentation head per decoder stage."""
    return nn.ModuleList([conv(spatial_dims, c, num_classes, 1) for c in channels])


def check_num_outputs(num_outputs: object, available: int, model: str) -> int:
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or not 1 <= num_outputs <= available:
        raise ConfigError(
            f"model '{model}' can give 1 to {available} outputs with these settings, got num_outputs={num_outputs!r}",
            field="num_outputs",
            fix="Lower num_outputs or make the network deeper (depth/levels option where the model has one)",
        )
    return num_outputs
