"""``pvt_emcad``: PVTv2 encoder (timm) + EMCAD decoder, the reference LoMix model.

For ``pvt_v2_b2`` the encoder has 24.85M parameters, channels [64, 128, 320, 512] at strides
[4, 8, 16, 32]; the decoder adds about 1.9M, close to EMCAD-B2's published 26.8M in total. The
model returns one logit map per decoder stage, coarsest first: H/32, H/16, H/8, H/4.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fusionsearch.errors import ConfigError
from fusionsearch.models.base import MultiScaleModel
from fusionsearch.models.blocks import check_num_outputs
from fusionsearch.models.emcad import EMCADDecoder
from fusionsearch.models.pretrained import create_timm_encoder
from fusionsearch.registry import register_model

_STAGES = 4  # EMCAD decodes the encoder's last four feature levels


class GreyStem(nn.Sequential):
    """Maps ``in_channels`` (e.g. one grey CT/MR channel) to the 3 channels the encoder was built for:
    a learnable 1x1 convolution (no bias: the BN shifts), BN and ReLU."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, 3, 1, bias=False), nn.BatchNorm2d(3), nn.ReLU(inplace=True))


class PVTEMCAD(MultiScaleModel):
    """PVTv2 + EMCAD with a 1x1 segmentation head per decoder stage (the finest ``num_outputs`` stages)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        encoder: str,
        num_outputs: int,
        kernel_sizes: Sequence[int],
        expansion: int,
        lgag_kernel: int,
        pretrained: bool,
        pretrained_file: str | Path | None,
    ) -> None:
        super().__init__(num_classes=num_classes, num_outputs=num_outputs, spatial_dims=2, in_channels=in_channels)
        self.stem = nn.Identity() if in_channels == 3 else GreyStem(in_channels)
        self.encoder = create_timm_encoder(encoder, in_chans=3, pretrained=pretrained, pretrained_file=pretrained_file)
        channels = self.encoder.feature_info.channels()[-_STAGES:][::-1]  # coarsest first
        self.num_stages = len(channels)
        check_num_outputs(num_outputs, self.num_stages, "pvt_emcad")
        self.decoder = EMCADDecoder(channels, kernel_sizes, expansion, lgag_kernel)
        self.heads = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in channels[-num_outputs:])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.encoder(self.stem(x))[-self.num_stages :][::-1]
        stages = self.decoder(features)[-self.num_outputs :]
        return [head(stage) for head, stage in zip(self.heads, stages, strict=True)]


@register_model("pvt_emcad")
def pvt_emcad(
    num_classes: int,
    in_channels: int = 1,
    pretrained: bool = False,
    *,
    encoder: str = "pvt_v2_b2",
    num_outputs: int = 4,
    kernel_sizes: Sequence[int] = (1, 3, 5),
    expansion: int = 2,
    lgag_kernel: int = 3,
    pretrained_file: str | None = None,
) -> PVTEMCAD:
    """PVTv2 encoder + EMCAD decoder (2D), 4 outputs at H/32..H/4 coarsest first.

    Options: ``encoder`` (any timm features_only model; pvt_v2_b2 is the reference, pvt_v2_b0 is small),
    ``num_outputs`` (1-4, the finest stages are kept), ``kernel_sizes`` of the multi-scale depthwise
    convolutions, ``expansion`` of the MSCB, ``lgag_kernel`` of the attention gates,
    ``pretrained_file`` (local encoder weights).
    """
    if not kernel_sizes or any(
        isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernel_sizes
    ):
        raise ConfigError(f"must be a list of odd positive integers, got {kernel_sizes!r}", field="kernel_sizes")
    for field, value in (("expansion", expansion), ("lgag_kernel", lgag_kernel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"must be a positive integer, got {value!r}", field=field)
    if lgag_kernel % 2 == 0:
        raise ConfigError(f"must be odd to keep the feature size, got {lgag_kernel}", field="lgag_kernel")
    return PVTEMCAD(
        num_classes,
        in_channels,
        encoder=encoder,
        num_outputs=num_outputs,
        kernel_sizes=tuple(kernel_sizes),
        expansion=expansion,
        lgag_kernel=lgag_kernel,
        pretrained=pretrained,
        pretrained_file=pretrained_file,
    )
