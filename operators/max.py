"""``max``: the elementwise maximum over the members."""

from __future__ import annotations

from torch import Tensor

from fusionsearch.registry import register_operator


@register_operator("max")
def max_(x: Tensor) -> Tensor:
    """Elementwise maximum of the member logits."""
    return x.amax(1)
