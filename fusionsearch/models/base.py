"""The multi-scale model contract shared by every model in fusionsearch.

A model maps an image ``[B, in_channels, *S]`` to a list of L logits ``[B, C, *S_i]``, coarsest
first, each at its own resolution. The criterion mixes them at the label resolution, so this module
also holds :func:`resize_logits`, the single place where logits are brought to the label size, and
:func:`parameter_counts`, used by ``inspect-model`` and reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionsearch.errors import FusionSearchError

_INTERPOLATION = {2: "bilinear", 3: "trilinear"}


class MultiScaleModel(nn.Module):
    """Base class of the built-in models.

    Subclasses implement ``forward(x) -> list[Tensor]`` (coarsest first) and may expose an ``encoder``
    submodule so that parameter counts can be split into encoder and decoder parts. The attributes
    are None only in :class:`~fusionsearch.models.MultiScaleAdapter` before its first forward.
    """

    def __init__(
        self, *, num_classes: int | None, num_outputs: int | None, spatial_dims: int | None, in_channels: int | None
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_outputs = num_outputs
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_outputs={self.num_outputs}, "
            f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}"
        )


def resize_logits(logits: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
    """Resize every logit map to ``size`` (the label's spatial shape).

    Uses bilinear (2D) or trilinear (3D) interpolation with ``align_corners=False``, the reference
    behaviour; maps that already have the target size are returned unchanged (no copy).
    """
    target = tuple(int(s) for s in size)
    resized = []
    for index, logit in enumerate(logits):
        dims = logit.ndim - 2
        if dims not in _INTERPOLATION:
            raise FusionSearchError(
                f"Logit map P{index} has shape {tuple(logit.shape)}; expected [B, C, H, W] or [B, C, D, H, W]. "
                f"Check that the model returns one logit tensor per scale."
            )
        if len(target) != dims:
            raise FusionSearchError(
                f"Cannot resize {dims}D logits (P{index}, shape {tuple(logit.shape)}) to the {len(target)}D label "
                f"size {target}. The model's spatial_dims must match the data: use a 2D model for slices and a "
                f"3D model for volume patches."
            )
        if tuple(logit.shape[2:]) == target:
            resized.append(logit)
        else:
            resized.append(F.interpolate(logit, size=target, mode=_INTERPOLATION[dims], align_corners=False))
    return resized


def parameter_counts(model: nn.Module) -> dict[str, int | None]:
    """Trainable-or-not parameter counts: ``encoder``, ``decoder`` (everything else) and ``total``.

    ``encoder`` and ``decoder`` are None for models without an ``encoder`` attribute (e.g. an adapted
    user module), where the split is unknown.
    """
    total = sum(p.numel() for p in model.parameters())
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        return {"encoder": None, "decoder": None, "total": total}
    encoder_ids = {id(p) for p in encoder.parameters()}
    encoder_count = sum(p.numel() for p in model.parameters() if id(p) in encoder_ids)
    return {"encoder": encoder_count, "decoder": total - encoder_count, "total": total}
