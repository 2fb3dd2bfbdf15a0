"""``add``: the sum of the members (the additive fusion of EMCAD/MERIT and LoMix).

Stack path: the sums of all subsets are one matrix product ``M @ stack`` with the 0/1 membership
matrix ``M [n, L]`` (and ``M^T @ grad`` backwards), so no member is ever copied.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from fusionsearch.operator_api import StackContext, stack_path
from fusionsearch.registry import register_operator


class WeightedStackSum(torch.autograd.Function):
    """``(stack [L, B, C, *S], weights [n, L], context) -> weights @ stack`` as ``[n, B, C, *S]``.

    The gradient of the stack, ``weights^T @ grad``, is added into the context's gradient buffer
    (see :class:`~fusionsearch.operator_api.StackContext`); ``weights`` is a constant.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, stack: Tensor, weights: Tensor, context: StackContext) -> Tensor:
        ctx.save_for_backward(weights)
        ctx.stack_context = context
        out = context.new_output(weights.shape[0])
        torch.mm(weights, stack.reshape(stack.shape[0], -1), out=out.view(weights.shape[0], -1))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[None, None, None]:
        (weights,) = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            accumulator = ctx.stack_context.gradient_buffer()
            accumulator.view(weights.shape[1], -1).addmm_(weights.t(), grad.reshape(weights.shape[0], -1))
        return None, None, None


def membership(index: Tensor, num_scales: int, value: float, dtype: torch.dtype) -> Tensor:
    """``[n, L]``: ``value`` where scale l is a member of subset n, 0 elsewhere."""
    weights = torch.zeros(index.shape[0], num_scales, dtype=dtype, device=index.device)
    return weights.scatter_(1, index, value)


def sum_from_stack(stack: Tensor, index: Tensor, context: StackContext) -> Tensor:
    """Stack path of ``add``."""
    return WeightedStackSum.apply(stack, membership(index, stack.shape[0], 1.0, stack.dtype), context)


@register_operator("add")
@stack_path(sum_from_stack)
def add(x: Tensor) -> Tensor:
    """Sum of the member logits."""
    return x.sum(1)
