"""``concat``: channel concatenation of the members, then a learnable 1x1 convolution k*C -> C.

LoMix means this convolution to be learnt with the network (the public reference code builds a
fresh random convolution at every call, which cannot learn; we keep one per subset). With
``share: size`` one convolution serves every subset of the same size.

Stack path: the weights are zero-padded to ``[n*C, L*C]`` (a subset's block of scale l is zero
when l is not a member), so all subsets of a size are one matrix product with the stack of scales
per sample, ``[n*C, L*C] @ [L*C, pixels]``, with the long pixel dimension on the large side and
no gathered copy of the members.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from fusionsearch.operator_api import (
    FusionOperator,
    StackContext,
    matmul_per_sample,
    pixel_blocks,
    sample_major,
)
from fusionsearch.registry import register_operator


@register_operator("concat")
class Concat(FusionOperator):
    """Concatenate the members' channels, then a learnable 1x1 conv k*C -> C with bias."""

    def __init__(
        self,
        k: int,
        num_classes: int,
        spatial_dims: int,
        n_subsets: int,
        share: Literal["subset", "size"] = "subset",
    ) -> None:
        super().__init__(k, num_classes, spatial_dims, n_subsets)
        self.share = share
        copies = n_subsets if share == "subset" else 1
        # weight[g, c_out, member, c_in] is the 1x1 conv weight[c_out, member * C + c_in] of copy g;
        # initialised like torch's Conv default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = k*C.
        bound = 1.0 / math.sqrt(k * num_classes)
        self.weight = nn.Parameter(torch.empty(copies, num_classes, k, num_classes).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(copies, num_classes).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        n, k, b, c = x.shape[:4]
        out = ConcatConv.apply(x.reshape(n, k, b, c, -1), self.weight, self.bias)
        return out.view(n, *x.shape[2:])

    def mix_stack(self, stack: Tensor, index: Tensor, context: StackContext) -> Tensor:
        """All subsets straight from the stack ``[L, B, C, *S]`` (see ``operator_api``)."""
        n, c = index.shape[0], self.num_classes
        weight = self.weight.expand(n, -1, -1, -1)  # [n, C_out, k, C_in]; a view when shared
        # padded[n, l] = weight[n, :, j, :] where l = index[n, j]; zero for scales outside subset n
        rows = torch.arange(n, device=index.device).unsqueeze(1)
        padded = weight.new_zeros(n, stack.shape[0], c, c).index_put((rows, index), weight.transpose(1, 2))
        padded = padded.transpose(1, 2).reshape(n * c, stack.shape[0] * c)  # [(n, C_out), (l, C_in)]
        return StackConcatConv.apply(stack, padded, self.bias.expand(n, -1), context)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", share={self.share!r}"


class ConcatConv(torch.autograd.Function):
    """``(x [n,k,B,C,S], weight [g,C,k,C], bias [g,C]) -> [n,B,C,S]``, g = n (per subset) or 1 (shared).

    The members' channels are laid out once as ``[n, B, k*C, S]`` (member-major, as torch.cat gives)
    and multiplied by the ``[C, k*C]`` weight in one batched matmul. The backward returns the input
    gradient in that same layout, viewed as ``[n, k, B, C, S]``, instead of copying it back.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        n, k, b, c, s = x.shape
        copies = weight.shape[0]
        channels = x.transpose(1, 2).reshape(n, b, k * c, s)
        out = torch.matmul(weight.view(copies, 1, c, k * c), channels)
        out.add_(bias.view(copies, 1, c, 1))
        ctx.save_for_backward(channels, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        channels, weight = ctx.saved_tensors
        n, b, kc, s = channels.shape
        copies, c, k = weight.shape[:3]
        flat_weight = weight.view(copies, 1, c, kc)
        grad_channels = torch.matmul(flat_weight.transpose(2, 3), grad)  # [n, B, k*C, S]
        grad_x = grad_channels.view(n, b, k, c, s).transpose(1, 2)  # a view: no copy back
        grad_weight = torch.matmul(grad, channels.transpose(2, 3)).sum(dim=1)  # [n, C, k*C]
        grad_bias = grad.sum(dim=(1, 3))  # [n, C]
        if copies == 1:
            grad_weight, grad_bias = grad_weight.sum(0, keepdim=True), grad_bias.sum(0, keepdim=True)
        return grad_x, grad_weight.view_as(weight) if copies > 1 else grad_weight.view(weight.shape), grad_bias


class StackConcatConv(torch.autograd.Function):
    """``(stack [L,B,C,*S], weight [n*C, L*C], bias [n, C], context) -> [n, B, C, *S]``.

    Per block of pixels (see :func:`~fusionsearch.operator_api.pixel_blocks`), the stack laid out
    per sample as ``[L*C, pixels]`` (once per call, by the context) is multiplied by the zero-padded
    weight. Backward:
    ``d_weight = sum G_b @ S_b^T`` and ``d_stack_b = weight^T @ G_b`` (added into the shared stack
    gradient buffer); ``d_bias`` is the sum of G over samples and pixels.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, stack: Tensor, weight: Tensor, bias: Tensor, context: StackContext) -> Tensor:
        n, c = bias.shape
        scales, batch = stack.shape[:2]
        source = stack.view(scales, batch, c, -1)
        out = context.new_output(n).view(n, batch, c, -1)
        by_sample = context.channels_by_sample(stack)  # [B, L*C, P]
        for samples, pixels in pixel_blocks(batch, source.shape[3], n * c, stack.device):
            fused = matmul_per_sample(weight, by_sample[samples, :, pixels])
            fused = fused.view(fused.shape[0], n, c, -1).add_(bias.view(1, n, c, 1))
            out[:, samples, :, pixels] = fused.transpose(0, 1)
        ctx.save_for_backward(stack, weight)
        ctx.stack_context = context
        return out.view(n, *stack.shape[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[None, Tensor, Tensor, None]:
        stack, weight = ctx.saved_tensors
        scales, batch, c = stack.shape[:3]
        n = weight.shape[0] // c
        source = stack.view(scales, batch, c, -1)
        upstream = grad.reshape(n, batch, c, -1)
        accumulator = ctx.stack_context.gradient_buffer().view(source.shape) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight)
        grad_bias = upstream.sum(dim=(1, 3))
        by_sample = ctx.stack_context.channels_by_sample(stack)  # [B, L*C, P]
        for samples, pixels in pixel_blocks(batch, source.shape[3], (n + scales) * c, stack.device):
            channels = by_sample[samples, :, pixels]  # [b, L*C, p]
            g = sample_major(upstream[:, samples, :, pixels])  # [b, n*C, p]
            grad_weight += torch.bmm(g, channels.transpose(1, 2)).sum(0)
            if accumulator is not None:
                d_stack = matmul_per_sample(weight.t(), g)  # [b, L*C, p]
                accumulator[:, samples, :, pixels] += d_stack.view(g.shape[0], scales, c, -1).transpose(0, 1)
        return None, grad_weight, grad_bias, None
