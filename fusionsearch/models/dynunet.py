"""``dynunet``: MONAI's DynUNet (nnU-Net style) with deep supervision, 2D and 3D.

How the L outputs are obtained, in train and eval mode alike: DynUNet's forward stacks its
deep-supervision maps into one tensor ``[B, 1+k, C, *S]`` after upsampling them (nearest) to full
resolution, and only in train mode; in eval mode it returns the final map alone. Its recursive
skip layers, however, compute every deep-supervision head in both modes and store them, at their
own resolution, in the network's documented ``heads`` list. The wrapper therefore runs the
network's own layers (``skip_layers`` then ``output_block``, exactly what ``DynUNet.forward``
runs) and reads ``heads``, without touching any ``training`` flag: BN/dropout keep their mode,
eval outputs are deterministic, the finest output equals DynUNet's plain eval output, and in train
mode the outputs equal the stacked ones before MONAI's nearest upsampling. Keeping each map at its
own resolution lets :func:`fusionsearch.models.resize_logits` resize every model's logits the
same way (bilinear/trilinear) and skips the full-resolution stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fusionsearch.errors import ConfigError, FusionSearchError
from fusionsearch.models.base import MultiScaleModel
from fusionsearch.models.blocks import check_spatial_dims
from fusionsearch.registry import register_model

_PLACEHOLDER = torch.empty(0)


class DynUNetMultiScale(MultiScaleModel):
    """Wraps a deep-supervised ``monai.networks.nets.DynUNet``; outputs coarsest first."""

    def __init__(self, net: nn.Module, *, num_classes: int, num_outputs: int, in_channels: int) -> None:
        super().__init__(
            num_classes=num_classes, num_outputs=num_outputs, spatial_dims=net.spatial_dims, in_channels=in_channels
        )
        self.net = net
        self.divisor = 1
        for stride in net.strides:
            self.divisor *= stride

    @property
    def encoder(self) -> nn.ModuleList:
        """The contracting path (input block, downsamplings, bottleneck), for parameter counts."""
        return nn.ModuleList([self.net.input_block, self.net.downsamples, self.net.bottleneck])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        sizes = x.shape[2:]
        if any(size % self.divisor for size in sizes) or max(sizes) < 2 * self.divisor:
            raise FusionSearchError(
                f"dynunet with {len(self.net.strides)} levels needs input sizes divisible by {self.divisor}, one of "
                f"them at least {2 * self.divisor} (so the bottleneck keeps more than one voxel); got an input of "
                f"shape {tuple(x.shape)}. Use a training size (or patch size) that fits, or fewer levels."
            )
        finest = self.net.output_block(self.net.skip_layers(x))
        stored = self.net.heads  # shared with the skip layers: mutate in place, never rebind
        supervision = list(stored)  # stored[0] is the finest deep-supervision map
        # Drop the network's references to this call's maps: frees them with the caller's graph and
        # keeps the module deep-copyable (non-leaf tensors refuse deepcopy).
        stored[:] = [_PLACEHOLDER] * len(stored)
        for head in supervision:
            if head.ndim != finest.ndim or head.shape[:2] != finest.shape[:2]:
                raise RuntimeError("MONAI DynUNet did not fill its deep-supervision heads; unsupported MONAI version")
        return [*supervision[::-1], finest]


@register_model("dynunet")
def dynunet(
    num_classes: int,
    in_channels: int = 1,
    pretrained: bool = False,
    *,
    spatial_dims: int = 2,
    num_outputs: int = 4,
    levels: int | None = None,
    filters: Sequence[int] | None = None,
    res_block: bool = False,
) -> DynUNetMultiScale:
    """MONAI DynUNet with ``deep_supr_num = num_outputs - 1`` (2D or 3D).

    Options: ``spatial_dims``; ``num_outputs`` (L >= 2); ``levels`` (resolution levels, default
    max(5, L + 1), each after the first halves the size, so inputs must be divisible by
    2**(levels - 1)); ``filters`` (one width per level; default 32, 64, ... capped at 320 in 3D and
    512 in 2D, as in MONAI); ``res_block`` (residual conv blocks). Kernels are 3 everywhere.
    """
    from monai.networks.nets import DynUNet

    if pretrained:
        raise ConfigError("dynunet has no pretrained weights", field="pretrained", fix="Set pretrained: false")
    spatial_dims = check_spatial_dims(spatial_dims)
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 2:
        raise ConfigError(
            f"dynunet needs num_outputs >= 2 (deep supervision), got {num_outputs!r}",
            field="num_outputs",
            fix="Use another model (e.g. small_unet) for a single output",
        )
    if levels is None:
        levels = len(filters) if filters is not None else max(5, num_outputs + 1)
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < num_outputs + 1:
        raise ConfigError(
            f"dynunet with num_outputs={num_outputs} needs levels >= {num_outputs + 1}, got {levels!r}",
            field="levels",
        )
    if filters is not None:
        filters = list(filters)
        if len(filters) != levels or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in filters):
            raise ConfigError(
                f"needs {levels} positive integers (one per level), got {filters!r}",
                field="filters",
            )
    if not isinstance(res_block, bool):
        raise ConfigError(f"must be true or false, got {res_block!r}", field="res_block")
    strides = [1] + [2] * (levels - 1)
    net = DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        kernel_size=[3] * levels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=filters,
        deep_supervision=True,
        deep_supr_num=num_outputs - 1,
        res_block=res_block,
    )
    return DynUNetMultiScale(net, num_classes=num_classes, num_outputs=num_outputs, in_channels=in_channels)
