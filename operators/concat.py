"""``concat``: channel concatenation of the members, then a learnable 1x1 convolution k*C -> C.

LoMix means this convolution to be learnt with the network (the public reference code builds a
fresh random convolution at every call, which cannot learn; we keep one per subset). With
``share: size`` one convolution serves every subset of the same size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from fusionsearch.operator_api import FusionOperator
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
