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

    Works block by block over the pixels (see :func:`~fusionsearch.operator_api.pixel_blocks`):
    each block gathers its members (small, cache-resident copies), multiplies them in member
    order and writes the block of the output. The backward regathers them and adds
    ``G * prod_{i<j} x_i * prod_{i>j} x_j`` (prefix and suffix products, no division) for every
    member j into the shared stack gradient.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, stack: Tensor, index: Tensor, context: StackContext) -> Tensor:
        n, k = index.shape
        scales, batch, classes = stack.shape[:3]
        source = stack.view(scales, batch, classes, -1)
        out = context.new_output(n).view(n, batch, classes, -1)
        for samples, pixels in pixel_blocks(batch, source.shape[3], n * classes, stack.device):
            block = source[:, samples, :, pixels]
            product = block.index_select(0, index[:, 0])
            for j in range(1, k):  # members, not subsets
                product.mul_(block.index_select(0, index[:, j]))
            out[:, samples, :, pixels] = product
        ctx.save_for_backward(stack, index)
        ctx.stack_context = context
        return out.view(n, *stack.shape[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[None, None, None]:
        stack, index = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        n, k = index.shape
        scales, batch, classes = stack.shape[:3]
        source = stack.view(scales, batch, classes, -1)
        upstream = grad.reshape(n, batch, classes, -1)
        accumulator = ctx.stack_context.gradient_buffer().view(source.shape)
        for samples, pixels in pixel_blocks(batch, source.shape[3], 2 * k * n * classes, stack.device):
            block = source[:, samples, :, pixels]
            members = [block.index_select(0, index[:, j]) for j in range(k)]
            suffix: list[Tensor | None] = [None] * k  # suffix[j] = x_{j+1} * ... * x_{k-1}
            running = None
            for j in range(k - 1, 0, -1):
                running = members[j] if running is None else running * members[j]
                suffix[j - 1] = running
            g = upstream[:, samples, :, pixels]
            local = torch.zeros_like(block, memory_format=torch.contiguous_format)  # index_add_ is fast on these
            prefix = None  # x_0 * ... * x_{j-1}
            for j in range(k):
                factors = [f for f in (prefix, suffix[j]) if f is not None]
                term = g * factors[0]
                for factor in factors[1:]:
                    term.mul_(factor)
                local.index_add_(0, index[:, j], term)
                if j < k - 1:
                    prefix = members[j] if prefix is None else prefix * members[j]
            accumulator[:, samples, :, pixels] += local
        return None, None, None


@register_operator("mul")
@stack_path(product_from_stack)
def mul(x: Tensor) -> Tensor:
    """Elementwise product of the member logits."""
    return MemberProduct.apply(x)
