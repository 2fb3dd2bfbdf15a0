"""``mul``: the elementwise product of the members (LoMix's multiplicative fusion)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from fusionsearch.registry import register_operator


@register_operator("mul")
def mul(x: Tensor) -> Tensor:
    """Elementwise product of the member logits."""
    return MemberProduct.apply(x)


class MemberProduct(torch.autograd.Function):
    """``x [n, k, ...] -> prod_j x[:, j]`` with an exact, division-free backward.

    ``Tensor.prod``'s backward divides by the input (inexact, and undefined at zeros, which it
    detects with a host sync); the chain ``x0 * x1 * ...`` keeps k-1 intermediates and stacks the
    member gradients. Here ``d/dx_j = G * prod_{i<j} x_i * prod_{i>j} x_i`` is written straight into
    one gradient buffer from running suffix and prefix products.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:
        out = x[:, 0] * x[:, 1]  # subsets have at least two members
        for j in range(2, x.shape[1]):  # members, not subsets
            out.mul_(x[:, j])
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        k = x.shape[1]
        grad_x = torch.empty_like(x)
        grad_x[:, k - 1] = grad
        for j in range(k - 2, -1, -1):  # suffix products: grad_x[:, j] = G * x_{j+1} * ... * x_{k-1}
            torch.mul(grad_x[:, j + 1], x[:, j + 1], out=grad_x[:, j])
        prefix = x[:, 0].clone()
        for j in range(1, k):  # times the prefix products x_0 * ... * x_{j-1}
            grad_x[:, j].mul_(prefix)
            if j < k - 1:
                prefix.mul_(x[:, j])
        return grad_x
