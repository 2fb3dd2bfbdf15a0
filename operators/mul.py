"""``mul``: the elementwise product of the members (LoMix's multiplicative fusion).

The stack path multiplies the members straight from the stack of scales, block by block, and
never materialises the gathered members.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from fusionsearch.operator_api import StackContext, pixel_blocks, stack_path
from fusionsearch.registry import register_operator


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


def product_from_stack(stack: Tensor, index: Tensor, context: StackContext) -> Tensor:
    """Stack path of ``mul``."""
    return StackProduct.apply(stack, index, context)


class StackProduct(torch.autograd.Function):
    """``(stack [L, B, C, *S], index [n, k], context) -> [n, B, C, *S]``: the product of each subset.

    Works block by block over the pixels (see :func:`~fusionsearch.operator_api.pixel_blocks`),
    subset by subset, on views of the stack block: the product is written straight into the
    output, and the backward adds ``G * prod_{i<j} x_i * prod_{i>j} x_i`` (prefix and suffix
    products, no division) for every member j straight into the shared stack gradient. No member
    is ever copied.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, stack: Tensor, index: Tensor, context: StackContext) -> Tensor:
        rows = context.rows(index)
        n, (scales, batch, classes) = len(rows), stack.shape[:3]
        source = stack.view(scales, batch, classes, -1)
        out = context.new_output(n).view(n, batch, classes, -1)
        for samples, pixels in pixel_blocks(batch, source.shape[3], n * classes, stack.device):
            block, product = source[:, samples, :, pixels], out[:, samples, :, pixels]
            for s, row in enumerate(rows):
                torch.mul(block[row[0]], block[row[1]], out=product[s])  # subsets have at least two members
                for scale in row[2:]:
                    product[s].mul_(block[scale])
        ctx.save_for_backward(stack)
        ctx.stack_context, ctx.rows = context, rows
        return out.view(n, *stack.shape[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[None, None, None]:
        (stack,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        rows = ctx.rows
        n, (scales, batch, classes) = len(rows), stack.shape[:3]
        source = stack.view(scales, batch, classes, -1)
        upstream = grad.reshape(n, batch, classes, -1)
        accumulator = ctx.stack_context.gradient_buffer().view(source.shape)
        for samples, pixels in pixel_blocks(batch, source.shape[3], n * classes, stack.device):
            block, g = source[:, samples, :, pixels], upstream[:, samples, :, pixels]
            gradient = accumulator[:, samples, :, pixels]
            for s, row in enumerate(rows):
                members = [block[scale] for scale in row]
                suffix: list[Tensor | None] = [None] * len(row)  # suffix[j] = x_{j+1} * ... * x_{k-1}
                for j in range(len(row) - 2, -1, -1):
                    suffix[j] = members[j + 1] if suffix[j + 1] is None else suffix[j + 1] * members[j + 1]
                prefix = g[s]  # G * x_0 * ... * x_{j-1}
                for j, scale in enumerate(row):
                    if suffix[j] is None:
                        gradient[scale].add_(prefix)
                    else:
                        gradient[scale].addcmul_(prefix, suffix[j])
                    if j < len(row) - 1:
                        prefix = prefix * members[j]
        return None, None, None


@register_operator("mul")
@stack_path(product_from_stack)
def mul(x: Tensor) -> Tensor:
    """Elementwise product of the member logits."""
    return MemberProduct.apply(x)
