"""``awf``: attention-weighted fusion of the members (LoMix).

Each member position j has a 1x1 convolution C -> 1 that scores every pixel; a softmax over the
members turns the scores into per-pixel weights, and the output is the weighted sum of the
members. As in the reference, one module serves all subsets of a size (its convolutions indexed
by the member's position in the subset); ``share: subset`` gives every subset its own.

The fusion is one autograd Function with a closed-form backward: plain autograd would keep and
allocate several [n, k, B, C, S] intermediates, the analytic gradient needs one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from fusionsearch.operator_api import FusionOperator
from fusionsearch.registry import register_operator


@register_operator("awf")
class AttentionWeightedFusion(FusionOperator):
    """Per-member 1x1 conv C -> 1 scores, softmax over members per pixel, weighted sum."""

    def __init__(
        self,
        k: int,
        num_classes: int,
        spatial_dims: int,
        n_subsets: int,
        share: Literal["size", "subset"] = "size",
    ) -> None:
        super().__init__(k, num_classes, spatial_dims, n_subsets)
        self.share = share
        copies = n_subsets if share == "subset" else 1
        # weight[g, j, c] is the score conv of member position j in copy g; Conv default init.
        bound = 1.0 / math.sqrt(num_classes)
        self.weight = nn.Parameter(torch.empty(copies, k, num_classes).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(copies, k).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        n, k, b, c = x.shape[:4]
        out = AttentionWeightedSum.apply(x.reshape(n, k, b, c, -1), self.weight, self.bias)
        return out.view(n, *x.shape[2:])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", share={self.share!r}"


class AttentionWeightedSum(torch.autograd.Function):
    """``(x [n,k,B,C,S], weight [g,k,C], bias [g,k]) -> [n,B,C,S]``, g = n (per subset) or 1 (shared).

    Forward: ``s_j = weight_j . x_j + bias_j`` per pixel, ``a = softmax_j(s)``, ``out = sum_j a_j x_j``.
    Backward, with ``G = dL/dout`` and ``r_j = sum_c G x_j``:
    ``ds_j = a_j (r_j - sum_i a_i r_i)``, ``dx_j = a_j G + ds_j weight_j``,
    ``dweight_j = sum_{b,s} ds_j x_j``, ``dbias_j = sum_{b,s} ds_j`` (also summed over n when shared).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        copies, k, c = weight.shape
        # scores[n, j, b, s]: one batched GEMV over the contiguous x, no copy of it
        scores = torch.matmul(weight.view(copies, k, 1, 1, c), x).squeeze(3) + bias.view(copies, k, 1, 1)
        attention = scores.softmax(dim=1)  # over the members, per pixel
        out = attention[:, 0].unsqueeze(2) * x[:, 0]
        for j in range(1, k):  # members, not subsets: accumulate in place
            out.addcmul_(attention[:, j].unsqueeze(2), x[:, j])
        ctx.save_for_backward(x, weight, attention)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, weight, attention = ctx.saved_tensors
        copies, k, c = weight.shape
        # r[n, j, b, s] = sum_c grad[n, b, c, s] * x[n, j, b, c, s], accumulated class by class in place
        r = torch.zeros_like(attention)
        for channel in range(c):
            r.addcmul_(grad[:, None, :, channel], x[:, :, :, channel])
        d_scores = attention * (r - (attention * r).sum(dim=1, keepdim=True))
        grad_x = attention.unsqueeze(3) * grad.unsqueeze(1)
        grad_x.addcmul_(d_scores.unsqueeze(3), weight.view(copies, k, 1, c, 1))
        # d_weight[j, c] = sum_{b, s} d_scores[n, j, b, s] * x[n, j, b, c, s]: batched GEMV against x^T
        grad_weight = torch.matmul(d_scores.unsqueeze(3), x.transpose(3, 4)).squeeze(3).sum(dim=2)  # [n, k, C]
        grad_bias = d_scores.sum(dim=(2, 3))  # [n, k]
        if copies == 1:
            grad_weight, grad_bias = grad_weight.sum(0, keepdim=True), grad_bias.sum(0, keepdim=True)
        return grad_x, grad_weight, grad_bias
