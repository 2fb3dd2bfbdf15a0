"""``add``: the sum of the members (the additive fusion of EMCAD/MERIT and LoMix)."""

from __future__ import annotations

from torch import Tensor

from fusionsearch.registry import register_operator


@register_operator("add")
def add(x: Tensor) -> Tensor:
    """Sum of the member logits."""
    return x.sum(1)
