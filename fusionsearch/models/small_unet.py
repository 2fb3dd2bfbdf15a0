"""``small_unet``: a compact plain-convolution UNet for 2D and 3D, with no timm dependency.

Widths double at every level (``base_channels * 2**level``) over ``depth`` max-pool downsamplings.
The decoder has ``depth + 1`` stages (the bottleneck, then one per upsampling) and the finest
``num_outputs`` carry a 1x1 head, so the default (depth 4, 4 outputs) gives logits at 1/8, 1/4,
1/2 and full resolution. Cheap enough to train on a laptop CPU: the demo and most tests use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusionsearch.errors import ConfigError, FusionSearchError
from fusionsearch.models.base import MultiScaleModel
from fusionsearch.models.blocks import (
    DoubleConv,
    UpConcatBlock,
    check_norm,
    check_num_outputs,
    check_spatial_dims,
    heads,
)
from fusionsearch.registry import register_model

_POOL = {2: F.max_pool2d, 3: F.max_pool3d}


class SmallUNet(MultiScaleModel):
    """Plain UNet with a head on each of the finest ``num_outputs`` decoder stages."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        spatial_dims: int,
        base_channels: int,
        depth: int,
        num_outputs: int,
        norm: str,
    ) -> None:
        super().__init__(
            num_classes=num_classes, num_outputs=num_outputs, spatial_dims=spatial_dims, in_channels=in_channels
        )
        self.depth = depth
        widths = [base_channels * 2**level for level in range(depth + 1)]
        inputs = [in_channels, *widths[:-1]]
        self.encoder = nn.ModuleList(
            DoubleConv(spatial_dims, c_in, c_out, norm) for c_in, c_out in zip(inputs, widths, strict=True)
        )
        self.stages = nn.ModuleList(
            UpConcatBlock(spatial_dims, widths[level + 1], widths[level], widths[level], norm)
            for level in reversed(range(depth))
        )
        decoder_widths = widths[::-1]  # bottleneck first
        self.heads = heads(spatial_dims, decoder_widths[-num_outputs:], num_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if min(x.shape[2:]) < 2**self.depth:
            raise FusionSearchError(
                f"small_unet with depth {self.depth} needs at least {2**self.depth} pixels per side, got an input "
                f"of shape {tuple(x.shape)}. Use a larger input size or a smaller depth."
            )
        pool = _POOL[self.spatial_dims]
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else pool(x, 2))
            skips.append(x)
        decoded = skips.pop()
        stages = [decoded]
        for stage, skip in zip(self.stages, reversed(skips), strict=True):
            decoded = stage(decoded, skip)
            stages.append(decoded)
        return [head(stage) for head, stage in zip(self.heads, stages[-self.num_outputs :], strict=True)]


@register_model("small_unet")
def small_unet(
    num_classes: int,
    in_channels: int = 1,
    pretrained: bool = False,
    *,
    spatial_dims: int = 2,
    base_channels: int = 16,
    depth: int = 4,
    num_outputs: int = 4,
    norm: str = "batch",
) -> SmallUNet:
    """A compact UNet (2D or 3D) without pretrained weights.

    Options: ``spatial_dims`` (2 or 3), ``base_channels`` (width of the first level, e.g. 8),
    ``depth`` (number of downsamplings; inputs need at least ``2**depth`` pixels per side),
    ``num_outputs`` (1 to depth+1, finest stages), ``norm`` (batch or instance).
    """
    if pretrained:
        raise ConfigError("small_unet has no pretrained weights", field="pretrained", fix="Set pretrained: false")
    spatial_dims = check_spatial_dims(spatial_dims)
    norm = check_norm(norm)
    for field, value in (("base_channels", base_channels), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"must be a positive integer, got {value!r}", field=field)
    check_num_outputs(num_outputs, depth + 1, "small_unet")
    return SmallUNet(
        num_classes,
        in_channels,
        spatial_dims=spatial_dims,
        base_channels=base_channels,
        depth=depth,
        num_outputs=num_outputs,
        norm=norm,
    )
