"""Per-term segmentation loss: ``beta * CE + gamma * Dice`` for all K mixed terms at once.

The mixer hands over one tensor ``[K, B, C, *S]`` (K terms sharing one target). Computing the K
losses separately would rebuild the same one-hot target K times and launch K times as many small
kernels; here the target is indexed once and every reduction runs over the K terms together.

Two Dice flavours are offered:

- ``reference`` (LoMix/EMCAD code): softmax, per class over the whole batch,
  ``1 - (2*sum(p*t) + 1e-5) / (sum(p^2) + sum(t^2) + 1e-5)``, background included, mean over classes.
- ``monai`` (``monai.losses.DiceCELoss(softmax=True, to_onehot_y=True)``): per sample and per class,
  ``1 - (2*sum(p*t) + 1e-5) / (sum(p) + sum(t) + 1e-5)``, background included, mean over samples
  and classes.

Cross entropy is the mean over all pixels of ``-log softmax(z)[target]`` in both cases.

The losses are always computed in float32 (float64 for float64 input), with autocast disabled, so
that half-precision training cannot overflow a softmax of large fused logits (a ``mul`` of five
logits of magnitude 30 is about 2.4e7). Nothing here reads a value back to the host.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from torch import Tensor, nn

from fusionsearch.errors import FusionSearchError
from fusionsearch.fused_loss import dice_from_bins, flat_views, fused_term_loss, sample_class_counts


class LossConfig(BaseModel):
    """The per-term loss of a search space: ``ce * CrossEntropy + dice * Dice``."""

    model_config = ConfigDict(extra="forbid")

    ce: float = 0.3
    """beta: weight of the cross-entropy part."""
    dice: float = 0.7
    """gamma: weight of the Dice part."""
    dice_kind: Literal["reference", "monai"] = "reference"
    """``reference``: batch-global Dice with squared denominators; ``monai``: MONAI DiceCELoss semantics."""
    fused: bool = True
    """Use the single-pass kernel with an analytic backward (less memory, faster); False = plain autograd."""

    @field_validator("ce", "dice")
    @classmethod
    def _non_negative(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"must be a finite number >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _not_both_zero(self) -> LossConfig:
        if self.ce == 0 and self.dice == 0:
            raise ValueError("'ce' and 'dice' are both 0, so the loss would be identically zero; make one positive")
        return self


class TermLoss(nn.Module):
    """``forward(mixed [K,B,C,*S], target [B,*S]) -> Tensor[K]`` of ``ce * CE + dice * Dice`` per term."""

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config

    def extra_repr(self) -> str:
        c = self.config
        return f"ce={c.ce}, dice={c.dice}, dice_kind={c.dice_kind}, fused={c.fused}"

    def forward(self, mixed: Tensor, target: Tensor) -> Tensor:
        check_inputs(mixed, target)
        with torch.autocast(device_type=mixed.device.type, enabled=False):
            logits = mixed.to(compute_dtype(mixed.dtype))
            if self.config.fused:
                return fused_term_loss(logits, target, self.config.ce, self.config.dice, self.config.dice_kind)
            return plain_term_loss(logits, target, self.config.ce, self.config.dice, self.config.dice_kind)


def build_term_loss(config: LossConfig) -> TermLoss:
    """The per-term loss module a criterion applies to the mixer's ``[K,B,C,*S]`` output."""
    return TermLoss(config)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(mixed: Tensor, target: Tensor) -> None:
    """Shape and dtype checks (no host sync): a mismatch must never give a silently wrong loss."""
    if mixed.dim() < 4:
        raise FusionSearchError(
            f"The per-term loss expects mixed logits of shape [K, B, C, *spatial] (at least 4 dimensions), "
            f"got shape {tuple(mixed.shape)}."
        )
    if not mixed.is_floating_point():
        raise FusionSearchError(f"The mixed logits must be a floating-point tensor, got {mixed.dtype}.")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise FusionSearchError(
            f"The target must hold integer class indices (torch.long), got {target.dtype}. "
            f"Convert one-hot or float masks with .argmax(1) or .long()."
        )
    expected = (mixed.shape[1], *mixed.shape[3:])
    if tuple(target.shape) != expected:
        raise FusionSearchError(
            f"The target has shape {tuple(target.shape)} but the logits [K, B, C, *spatial] = "
            f"{tuple(mixed.shape)} need a target of shape [B, *spatial] = {expected}. Resize the logits to "
            f"the label size and drop any channel dimension of the target."
        )
    if mixed.shape[2] < 2:
        raise FusionSearchError(
            f"The per-term loss needs at least 2 classes (background included), got C={mixed.shape[2]}."
        )


def plain_term_loss(logits: Tensor, target: Tensor, beta: float, gamma: float, dice_kind: str) -> Tensor:
    """Batched ``beta*CE + gamma*Dice`` per term with ordinary autograd (the readable fallback)."""
    z, t = flat_views(logits, target)
    k, b, c, n = z.shape
    log_p = torch.log_softmax(z, dim=2)
    at_target = t.view(1, b, 1, n).expand(k, b, 1, n)
    ce = -log_p.gather(2, at_target).mean(dim=(1, 2, 3))
    p = log_p.exp()
    # per (term, sample, class) sums; the one-hot target enters only through the class index
    zeros = z.new_zeros(k, b, c)
    intersect = zeros.scatter_add(2, at_target.view(k, b, n), p.gather(2, at_target).view(k, b, n))
    per_sample = dice_kind == "monai"
    pred = p.sum(dim=3) if per_sample else p.square().sum(dim=3)
    numerator, denominator = dice_from_bins(intersect, pred, sample_class_counts(t, c, z.dtype), per_sample)
    dice = 1 - (numerator / denominator).mean(dim=1)
    return beta * ce + gamma * dice
