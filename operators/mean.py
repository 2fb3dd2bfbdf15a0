"""``mean``: the average of the members (``add`` rescaled so the magnitude does not grow with k)."""

from __future__ import annotations

from fusionsearch.operators.add import WeightedStackSum, membership
from torch import Tensor

from fusionsearch.operator_api import StackContext, stack_path
from fusionsearch.registry import register_operator


def mean_from_stack(stack: Tensor, index: Tensor, context: StackContext) -> Tensor:
    """Stack path of ``mean``: ``M @ stack`` with membership weights 1/k."""
    weights = membership(index, stack.shape[0], 1.0 / index.shape[1], stack.dtype)
    return WeightedStackSum.apply(stack, weights, context)


@register_operator("mean")
@stack_path(mean_from_stack)
def mean(x: Tensor) -> Tensor:
    """Mean of the member logits."""
    return x.mean(1)
