"""``awf``: attention-weighted fusion of the members (LoMix).

Each member position j has a 1x1 convolution C -> 1 that scores every pixel; a softmax over the
members turns the scores into per-pixel weights, and the output is the weighted sum of the
members. As in the reference, one module serves all subsets of a size (its convolutions indexed
by the member's position in the subset); ``share: subset`` gives every subset its own.

The fusion is one autograd Function with a closed-form backward: plain autograd would keep and
allocate several [n, k, B, C, S] intermediates, the analytic gradient needs one.

Stack path: the score convolutions are zero-padded to ``[n*k, L*C]`` (row (n, j) reads only the
scale of member j), so all scores of a block of pixels are one matrix product with the stack
block laid out per sample; the weighted sum and the backward then work on small per-block copies
of the members, and the softmax is recomputed in the backward instead of being stored.
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
)
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

    def mix_stack(self, stack: Tensor, index: Tensor, context: StackContext) -> Tensor:
        """All subsets straight from the stack ``[L, B, C, *S]`` (see ``operator_api``)."""
        n = index.shape[0]
        return StackAttentionSum.apply(stack, index, self.weight.expand(n, -1, -1), self.bias.expand(n, -1), context)

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


class StackAttentionSum(torch.autograd.Function):
    """``(stack [L,B,C,*S], index [n,k], weight [n,k,C], bias [n,k], context) -> [n,B,C,*S]``.

    The same fusion as :class:`AttentionWeightedSum`, read straight from the stack block by block
    (see :func:`~fusionsearch.operator_api.pixel_blocks`). Backward per block, with the scores
    recomputed: ``r_j = sum_c G x_j``, ``ds_j = a_j (r_j - sum_i a_i r_i)``; ``a_j G + ds_j w_j`` is
    added into the shared stack gradient at member j's scale, ``d_weight_j = sum ds_j x_j`` and
    ``d_bias_j = sum ds_j``.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, stack: Tensor, index: Tensor, weight: Tensor, bias: Tensor, context: StackContext
    ) -> Tensor:
        n, k, c = weight.shape
        scales, batch = stack.shape[:2]
        source = stack.view(scales, batch, c, -1)
        padded = _padded_score_weights(weight, index, scales)
        out = context.new_output(n).view(n, batch, c, -1)
        by_sample = context.channels_by_sample(stack)  # [B, L*C, P]
        for samples, pixels in pixel_blocks(batch, source.shape[3], 2 * n * c, stack.device):
            channels = by_sample[samples, :, pixels]  # [b, L*C, p]
            attention = _attention(padded, bias, channels)  # [b, n, k, p]
            members = channels.view(channels.shape[0], scales, c, -1)
            fused = attention[:, :, 0].unsqueeze(2) * members.index_select(1, index[:, 0])  # [b, n, C, p]
            for j in range(1, k):  # members, not subsets
                fused.addcmul_(attention[:, :, j].unsqueeze(2), members.index_select(1, index[:, j]))
            out[:, samples, :, pixels] = fused.transpose(0, 1)
        ctx.save_for_backward(stack, index, weight, bias)
        ctx.stack_context = context
        return out.view(n, *stack.shape[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[None, None, Tensor, Tensor, None]:
        stack, index, weight, bias = ctx.saved_tensors
        n, k, c = weight.shape
        scales, batch = stack.shape[:2]
        source = stack.view(scales, batch, c, -1)
        upstream = grad.reshape(n, batch, c, -1)
        accumulator = ctx.stack_context.gradient_buffer().view(source.shape) if ctx.needs_input_grad[0] else None
        padded = _padded_score_weights(weight, index, scales)
        grad_padded = torch.zeros_like(padded)  # [n*k, L*C]; only the members' blocks are kept
        grad_bias = torch.zeros_like(bias)
        by_sample = ctx.stack_context.channels_by_sample(stack)  # [B, L*C, P]
        for samples, pixels in pixel_blocks(batch, source.shape[3], (k + 3) * n * c + scales * c, stack.device):
            channels = by_sample[samples, :, pixels]  # [b, L*C, p]
            attention = _attention(padded, bias, channels)  # [b, n, k, p]
            members = channels.view(channels.shape[0], scales, c, -1)
            gathered = [members.index_select(1, index[:, j]) for j in range(k)]  # k x [b, n, C, p]
            g = upstream[:, samples, :, pixels].transpose(0, 1)  # [b, n, C, p]
            r = torch.stack([(g * x).sum(dim=2) for x in gathered], dim=2)  # [b, n, k, p]
            d_scores = (attention * (r - (attention * r).sum(dim=2, keepdim=True))).view(r.shape[0], n * k, -1)
            grad_bias += d_scores.sum(dim=(0, 2)).view(n, k)
            grad_padded += torch.bmm(d_scores, channels.transpose(1, 2)).sum(0)
            if accumulator is None:
                continue
            local = matmul_per_sample(padded.t(), d_scores).view(members.shape)  # the scores' share, [b, L, C, p]
            for j in range(k):
                local.index_add_(1, index[:, j], attention[:, :, j].unsqueeze(2) * g)
            accumulator[:, samples, :, pixels] += local.transpose(0, 1)
        rows = torch.arange(n, device=index.device).unsqueeze(1)
        columns = torch.arange(k, device=index.device).unsqueeze(0)
        grad_weight = grad_padded.view(n, k, scales, c)[rows, columns, index]
        return None, None, grad_weight, grad_bias, None


def _padded_score_weights(weight: Tensor, index: Tensor, num_scales: int) -> Tensor:
    """``[n*k, L*C]``: row (n, j) holds ``weight[n, j]`` in the block of scale ``index[n, j]``, zeros elsewhere."""
    n, k, c = weight.shape
    padded = weight.new_zeros(n, k, num_scales, c)
    rows = torch.arange(n, device=index.device).unsqueeze(1)
    columns = torch.arange(k, device=index.device).unsqueeze(0)
    padded[rows, columns, index] = weight
    return padded.view(n * k, num_scales * c)


def _attention(padded: Tensor, bias: Tensor, channels: Tensor) -> Tensor:
    """Softmax over the members of the scores ``padded @ channels + bias``: ``[b, n, k, p]``."""
    n, k = bias.shape
    scores = matmul_per_sample(padded, channels).view(channels.shape[0], n, k, -1)
    return scores.add_(bias.view(1, n, k, 1)).softmax(dim=2)
