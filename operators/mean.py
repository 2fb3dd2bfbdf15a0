"""``mean``: the average of the members (``add`` rescaled so the magnitude does not grow with k)."""

from __future__ import annotations

from torch import Tensor

from fusionsearch.registry import register_operator


@register_operator("mean")
def mean(x: Tensor) -> Tensor:
    """Mean of the member logits."""
    return x.mean(1)
