"""``awf``: attention-weighted fusion of the members (LoMix).

Each member position j has a 1x1 convolution C -> 1 that scores every pixel; a softmax over the
members turns the scores into per-pixel weights, and the output is the weighted sum of the
members. As in the reference, one module serves all subsets of a size (its convolutions indexed
by the member's position in the subset); ``share: subset`` gives every subset its own.

The fusion is one autograd Function with a closed-form backward: plain autograd would keep and
allocate several [n, k, B, C, S] intermediates, the analytic gradient needs one.

Stack path: with shared convolutions, subsets that put the same scale at the same member position
share a score map, so a block of pixels needs at most k*L maps (not n*k), one small matrix
product per scale. The weighted sum and the backward then loop over the subsets' members with
views of the stack block (no member is copied), writing straight into the output and the shared
stack gradient; the softmax is recomputed in the backward instead of being stored.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from fusionsearch.operator_api import FusionOperator, StackContext, pixel_blocks
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
        return StackAttentionSum.apply(stack, index, self.weight, self.bias, context)

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
    """``(stack [L,B,C,*S], index [n,k], weight [g,k,C], bias [g,k], context) -> [n,B,C,*S]``, g = n or 1.

    The same fusion as :class:`AttentionWeightedSum`, read straight from the stack block by block
    (see :func:`~fusionsearch.operator_api.pixel_blocks`). The scores need one map per distinct
    (score convolution, scale) pair (:class:`_ScorePlan`), a small matrix product per scale; the
    weighted sum and the backward then loop over the subsets' members with views of the stack
    block, so no member is ever copied. Backward per block, with the scores recomputed:
    ``r_j = sum_c G x_j``, ``ds_j = a_j (r_j - sum_i a_i r_i)``; ``a_j G + ds_j w_j`` is added into
    the shared stack gradient at member j's scale, ``d_weight_j = sum ds_j x_j`` and
    ``d_bias_j = sum ds_j``.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, stack: Tensor, index: Tensor, weight: Tensor, bias: Tensor, context: StackContext
    ) -> Tensor:
        rows = context.rows(index)
        n, c = len(rows), weight.shape[2]
        scales, batch = stack.shape[:2]
        plan = _score_plan(rows, weight.shape[0], scales, stack.device)
        map_weights = weight.reshape(-1, c).index_select(0, plan.weight_row)  # [P, C]
        out = context.new_output(n).view(n, batch, c, -1)
        by_sample = context.channels_by_sample(stack)  # [B, L*C, P]
        for samples, pixels in pixel_blocks(batch, out.shape[3], 2 * n * c, stack.device):
            members = by_sample[samples, :, pixels].unflatten(1, (scales, c))  # [b, L, C, p]
            attention = _attention(plan, map_weights, bias, members)  # [b, n, k, p]
            fused = out[:, samples, :, pixels]
            for s, row in enumerate(rows):
                torch.mul(attention[:, s, 0].unsqueeze(1), members[:, row[0]], out=fused[s])
                for j in range(1, len(row)):  # members, not subsets
                    fused[s].addcmul_(attention[:, s, j].unsqueeze(1), members[:, row[j]])
        ctx.save_for_backward(stack, weight, bias)
        ctx.stack_context, ctx.rows = context, rows
        return out.view(n, *stack.shape[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[None, None, Tensor, Tensor, None]:
        stack, weight, bias = ctx.saved_tensors
        rows = ctx.rows
        copies, k, c = weight.shape
        n, (scales, batch) = len(rows), stack.shape[:2]
        plan = _score_plan(rows, copies, scales, stack.device)
        map_weights = weight.reshape(-1, c).index_select(0, plan.weight_row)  # [P, C]
        upstream = grad.reshape(n, batch, c, -1)
        accumulator = None
        if ctx.needs_input_grad[0]:
            accumulator = ctx.stack_context.gradient_buffer().view(scales, batch, c, -1)
        grad_map_weights = torch.zeros_like(map_weights)
        grad_bias = bias.new_zeros(n, k)
        by_sample = ctx.stack_context.channels_by_sample(stack)  # [B, L*C, P]
        per_pixel = 4 * n * k + len(plan.weight_row) + scales * c
        for samples, pixels in pixel_blocks(batch, upstream.shape[3], per_pixel, stack.device):
            members = by_sample[samples, :, pixels].unflatten(1, (scales, c))  # [b, L, C, p]
            attention = _attention(plan, map_weights, bias, members)  # [b, n, k, p]
            g = upstream[:, samples, :, pixels]  # [n, b, C, p]
            r = torch.empty_like(attention)
            for s, row in enumerate(rows):
                for j, scale in enumerate(row):  # r[:, s, j] = sum_c G x_j, class by class: no temporaries
                    torch.mul(g[s][:, 0], members[:, scale, 0], out=r[:, s, j])
                    for channel in range(1, c):
                        r[:, s, j].addcmul_(g[s][:, channel], members[:, scale, channel])
            d_scores = r.sub_((attention * r).sum(dim=2, keepdim=True)).mul_(attention)
            grad_bias += d_scores.sum(dim=(0, 3))
            d_maps = d_scores.new_zeros(d_scores.shape[0], len(plan.weight_row), d_scores.shape[3])
            d_maps.index_add_(1, plan.member_map, d_scores.flatten(1, 2))  # [b, P, p]
            block_gradient = None if accumulator is None else accumulator[:, samples, :, pixels]  # [L, b, C, p]
            for scale, maps in plan.maps_of_scale:
                d_map = d_maps[:, maps]  # [b, m, p]
                grad_map_weights[maps] += torch.matmul(d_map, members[:, scale].transpose(1, 2)).sum(0)
                if block_gradient is not None:  # the scores' share
                    block_gradient[scale].baddbmm_(map_weights[maps].t().expand(d_map.shape[0], -1, -1), d_map)
            if block_gradient is None:
                continue
            for s, row in enumerate(rows):  # the weighted sum's share
                for j, scale in enumerate(row):
                    block_gradient[scale].addcmul_(attention[:, s, j].unsqueeze(1), g[s])
        grad_weight = torch.zeros_like(weight).view(-1, c).index_add_(0, plan.weight_row, grad_map_weights)
        if copies == 1:
            grad_bias = grad_bias.sum(0, keepdim=True)
        return None, None, grad_weight.view_as(weight), grad_bias, None


@dataclass(frozen=True)
class _ScorePlan:
    """The distinct score maps of a group: one per (score convolution, scale) pair, P in all.

    With shared convolutions several subsets score the same scale with the same convolution (member
    position j), so P is at most k*L instead of n*k. Maps are numbered scale by scale.
    """

    weight_row: Tensor
    """[P]: row of ``weight.view(-1, C)`` (copy * k + position) that map i applies."""
    member_map: Tensor
    """[n*k]: the map that scores member j of subset s, at s*k + j."""
    maps_of_scale: tuple[tuple[int, slice], ...]
    """(scale, maps that read it) for every scale the group uses."""


@functools.lru_cache(maxsize=256)
def _score_plan(rows: tuple[tuple[int, ...], ...], copies: int, num_scales: int, device: torch.device) -> _ScorePlan:
    """The :class:`_ScorePlan` of subsets ``rows`` (positions in the stack) with ``copies`` convolution sets."""
    k = len(rows[0])
    member_keys = [
        (scale, (s if copies > 1 else 0) * k + j) for s, row in enumerate(rows) for j, scale in enumerate(row)
    ]
    keys = sorted(set(member_keys))  # by scale, then weight row
    number = {key: i for i, key in enumerate(keys)}
    maps_of_scale = []
    for scale in range(num_scales):
        maps = [i for i, key in enumerate(keys) if key[0] == scale]
        if maps:
            maps_of_scale.append((scale, slice(maps[0], maps[-1] + 1)))
    return _ScorePlan(
        weight_row=torch.tensor([row for _, row in keys], dtype=torch.long, device=device),
        member_map=torch.tensor([number[key] for key in member_keys], dtype=torch.long, device=device),
        maps_of_scale=tuple(maps_of_scale),
    )


def _attention(plan: _ScorePlan, map_weights: Tensor, bias: Tensor, members: Tensor) -> Tensor:
    """Softmax over the members of the scores ``w_j . x_l + b_j`` of a stack block [b, L, C, p]: [b, n, k, p]."""
    b, p = members.shape[0], members.shape[3]
    maps = members.new_empty(b, len(plan.weight_row), p)
    for scale, chosen in plan.maps_of_scale:
        maps[:, chosen] = torch.matmul(map_weights[chosen], members[:, scale])
    k = bias.shape[1]
    scores = maps.index_select(1, plan.member_map).view(b, -1, k, p)
    return scores.add_(bias.view(1, -1, k, 1)).softmax(dim=2)
