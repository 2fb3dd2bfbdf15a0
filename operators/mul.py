"""``mul``: the elementwise product of the members (LoMix's multiplicative fusion)."""

from __future__ import annotations

from torch import Tensor

from fusionsearch.registry import register_operator


@register_operator("mul")
def mul(x: Tensor) -> Tensor:
    """Elementwise product of the member logits."""
    # A chain of multiplications rather than Tensor.prod: prod's backward divides by the input
    # (inexact) and checks for zeros with a host sync. unbind (not x[:, j]) so that the backward
    # stacks the member gradients once instead of zero-filling a full-size buffer per member.
    first, *rest = x.unbind(1)
    out = first
    for member in rest:
        out = out * member
    return out
