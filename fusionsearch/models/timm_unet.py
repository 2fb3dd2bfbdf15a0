"""``timm_unet``: any timm encoder that supports ``features_only`` + a plain UNet decoder.

The decoder starts with a :class:`DoubleConv` on the deepest feature map (the bottleneck stage),
then for every shallower feature map upsamples, concatenates it and applies another
:class:`DoubleConv`. Each stage can carry a 1x1 head; the finest ``num_outputs`` stages do. The
finest output sits at the encoder's finest feature stride (H/2 for ResNets, H/4 for ConvNeXt and
PVTv2); :func:`fusionsearch.models.resize_logits` brings all outputs to the label size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from fusionsearch.errors import ConfigError
from fusionsearch.models.base import MultiScaleModel
from fusionsearch.models.blocks import DoubleConv, UpConcatBlock, check_num_outputs, heads
from fusionsearch.models.pretrained import create_timm_encoder
from fusionsearch.registry import register_model

_DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16, 16)


class TimmUNet(MultiScaleModel):
    """timm encoder + UNet decoder with heads on the finest ``num_outputs`` decoder stages."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        encoder: str,
        decoder_channels: Sequence[int] | None,
        num_outputs: int,
        pretrained: bool,
        pretrained_file: str | Path | None,
    ) -> None:
        super().__init__(num_classes=num_classes, num_outputs=num_outputs, spatial_dims=2, in_channels=in_channels)
        self.encoder = create_timm_encoder(
            encoder, in_chans=in_channels, pretrained=pretrained, pretrained_file=pretrained_file
        )
        skip_channels = self.encoder.feature_info.channels()[::-1]  # coarsest first
        levels = len(skip_channels)
        if decoder_channels is None:
            decoder_channels = _DEFAULT_DECODER_CHANNELS[:levels]
        decoder_channels = list(decoder_channels)
        if len(decoder_channels) != levels or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in decoder_channels
        ):
            raise ConfigError(
                f"encoder '{encoder}' gives {levels} feature levels, so decoder_channels needs {levels} positive "
                f"integers (coarsest stage first), got {decoder_channels!r}",
                field="decoder_channels",
                fix=f"E.g. decoder_channels: {list(_DEFAULT_DECODER_CHANNELS[:levels])}",
            )
        check_num_outputs(num_outputs, levels, "timm_unet")
        self.bottleneck = DoubleConv(2, skip_channels[0], decoder_channels[0])
        self.stages = torch.nn.ModuleList(
            UpConcatBlock(2, decoder_channels[i - 1], skip_channels[i], decoder_channels[i]) for i in range(1, levels)
        )
        self.heads = heads(2, decoder_channels[-num_outputs:], num_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.encoder(x)[::-1]
        decoded = self.bottleneck(features[0])
        stages = [decoded]
        for stage, skip in zip(self.stages, features[1:], strict=True):
            decoded = stage(decoded, skip)
            stages.append(decoded)
        return [head(stage) for head, stage in zip(self.heads, stages[-self.num_outputs :], strict=True)]


@register_model("timm_unet")
def timm_unet(
    num_classes: int,
    in_channels: int = 1,
    pretrained: bool = False,
    *,
    encoder: str = "resnet34",
    decoder_channels: Sequence[int] | None = None,
    num_outputs: int = 4,
    pretrained_file: str | None = None,
) -> TimmUNet:
    """A UNet over any timm ``features_only`` encoder (2D).

    Options: ``encoder`` (timm name: resnet34, convnext_tiny, pvt_v2_b0, ...), ``decoder_channels``
    (one width per encoder level, coarsest first; default 256, 128, 64, ...), ``num_outputs`` (heads on
    the finest stages, at most the number of encoder levels), ``pretrained_file`` (local encoder
    weights). Grey images go straight into the encoder (timm adapts its first convolution).
    """
    return TimmUNet(
        num_classes,
        in_channels,
        encoder=encoder,
        decoder_channels=decoder_channels,
        num_outputs=num_outputs,
        pretrained=pretrained,
        pretrained_file=pretrained_file,
    )
