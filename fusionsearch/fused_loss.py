"""One-pass ``beta*CE + gamma*Dice`` for K terms with an analytic backward.

Plain autograd keeps several full-size ``[K,B,C,N]`` intermediates alive for the backward pass
(log-softmax, softmax, squares, products). This ``torch.autograd.Function`` keeps exactly one,
the softmax ``p``, and computes the gradient in closed form:

- Cross entropy (mean over the B*N pixels): ``dCE/dz = (p - onehot) / (B*N)``.
- Dice: with ``num_c = 2*I_c + eps`` and ``den_c = P_c + T_c + eps`` (``I`` = sum of p*t, ``P`` = sum of
  p^2 for the reference flavour or of p for the MONAI flavour, ``T`` = sum of t),
  ``dD/dp = -(w) * (2*t/den - num * dP/dp / den^2)`` with ``w = 1/C`` (reference, one bin per class)
  or ``1/(B*C)`` (MONAI, one bin per sample and class), then the softmax Jacobian-vector product
  ``dz = p * (g - sum_c p*g)``.

The one-hot target is never built: its contributions enter through a gather of ``p`` at the target
class and a scatter-add into the gradient. By default the backward writes the gradient into the
softmax buffer itself, chunk by chunk over the terms, so the whole loss needs one full-size buffer
plus temporaries of about 1/8 of it (the price: one backward per forward, see ``fused_term_loss``).

The small index helpers below are shared with the plain autograd path in ``fusionsearch.loss``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fusionsearch.errors import FusionSearchError

SMOOTH = 1e-5  # numerator and denominator smoothing of both Dice flavours
_CHUNKS = 8  # the backward's temporaries are about 1/_CHUNKS of the softmax buffer


def flat_views(mixed: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``[K,B,C,N]`` logits and ``[B,N]`` int64 target, N = number of pixels/voxels per sample."""
    k, b, c = mixed.shape[:3]
    return mixed.reshape(k, b, c, -1), target.reshape(b, -1).long()


def class_index(target: Tensor, num_classes: int, per_sample: bool) -> Tensor:
    """Flat ``[B*N]`` index of each pixel's Dice bin: its class, or ``b*C + class`` per sample."""
    if not per_sample:
        return target.reshape(-1)
    offsets = torch.arange(target.shape[0], device=target.device).unsqueeze(1) * num_classes
    return (target + offsets).reshape(-1)


def target_counts(index: Tensor, bins: int, dtype: torch.dtype) -> Tensor:
    """Pixels per Dice bin (= sum of the one-hot target; ``t^2 = t``), with no host sync."""
    return torch.zeros(bins, dtype=dtype, device=index.device).index_add_(
        0, index, torch.ones((), dtype=dtype, device=index.device).expand(index.numel())
    )


class FusedTermLoss(torch.autograd.Function):
    """``(logits [K,B,C,*S], target [B,*S], beta, gamma, dice_kind, reuse_buffer) -> Tensor[K]``."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, target: Tensor, beta: float, gamma: float, dice_kind: str, reuse_buffer: bool
    ) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z, t = flat_views(logits, target)
            k, b, c, n = z.shape
            per_sample = dice_kind == "monai"
            gather_index = t.view(1, b, 1, n).expand(k, b, 1, n)

            peak = z.amax(dim=2, keepdim=True)
            p = (z - peak).exp_()
            normaliser = p.sum(dim=2, keepdim=True)
            p.div_(normaliser)
            log_normaliser = normaliser.log_().add_(peak)  # logsumexp of z over classes, [K,B,1,N]
            ce = (log_normaliser - z.gather(2, gather_index)).mean(dim=(1, 2, 3))

            index = class_index(t, c, per_sample)
            bins = b * c if per_sample else c
            p_target = p.gather(2, gather_index).reshape(k, b * n)
            intersect = torch.zeros(k, bins, dtype=z.dtype, device=z.device).index_add_(1, index, p_target)
            if per_sample:
                pred = p.sum(dim=3).reshape(k, bins)
            else:
                pred = torch.linalg.vector_norm(p, dim=(1, 3)).square()
            numerator = 2 * intersect + SMOOTH
            denominator = pred + target_counts(index, bins, z.dtype) + SMOOTH
            dice = 1 - (numerator / denominator).mean(dim=1)

        ctx.save_for_backward(p, t, numerator, denominator)
        ctx.beta, ctx.gamma, ctx.per_sample = beta, gamma, per_sample
        ctx.reuse_buffer, ctx.consumed = reuse_buffer, False
        ctx.logits_shape = logits.shape
        return beta * ce + gamma * dice

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.consumed and ctx.reuse_buffer:
            raise FusionSearchError(
                "The fused per-term loss computes its gradient in the buffer of its saved softmax, so it can "
                "be backpropagated only once per forward pass. To backpropagate twice through one graph "
                "(retain_graph=True), set 'loss.fused: false' in the search space."
            )
        ctx.consumed = True
        p, t, numerator, denominator = ctx.saved_tensors
        with torch.autocast(device_type=p.device.type, enabled=False):
            k, b, c, n = p.shape
            per_sample = ctx.per_sample
            g = grad_out.to(p.dtype).view(k, 1)
            gather_index = t.view(1, b, 1, n).expand(k, b, 1, n)
            index = class_index(t, c, per_sample)

            ce_scale = (ctx.beta / (b * n)) * g.view(k, 1, 1, 1)
            bin_weight = ctx.gamma / (b * c if per_sample else c)
            # dD/dp = dense_coef * dP/dp + onehot * target_coef   (per Dice bin, already times grad_out)
            dense_coef = g * bin_weight * numerator / denominator.square()
            target_coef = -2 * bin_weight * g / denominator
            p_target_coef = p.gather(2, gather_index) * target_coef.index_select(1, index).view(k, b, 1, n)
            if per_sample:  # dP/dp = 1: g_p = dense[b, c] + onehot * target_coef
                dense = dense_coef.view(k, b, c)
                dense_row, dense_col = dense.unsqueeze(2), dense.unsqueeze(3)
            else:  # dP/dp = 2p: g_p = dense[c] * p + onehot * target_coef
                dense = 2 * dense_coef
                dense_row, dense_col = dense.view(k, 1, 1, c), dense.view(k, 1, c, 1)

            # grad = p * (g_p - sum_c p*g_p) + ce part, a few terms at a time (the temporaries stay a
            # fraction of p), written into p's own buffer unless the graph may be reused. The Python
            # loop runs over _CHUNKS chunks, not over terms.
            grad = p if ctx.reuse_buffer else torch.empty_like(p)
            step = max(1, -(-k // _CHUNKS))
            for start in range(0, k, step):
                rows = slice(start, start + step)
                p_rows, grad_rows = p[rows], grad[rows]
                if per_sample:
                    dot = torch.matmul(dense_row[rows], p_rows) + p_target_coef[rows]
                    torch.mul(p_rows, dense_col[rows] + (ce_scale[rows] - dot), out=grad_rows)
                else:
                    square = p_rows.square()
                    dot = torch.matmul(dense_row[rows], square) + p_target_coef[rows]
                    torch.mul(p_rows, ce_scale[rows] - dot, out=grad_rows).add_(square.mul_(dense_col[rows]))
            grad.scatter_add_(2, gather_index, p_target_coef - ce_scale)
        return grad.view(ctx.logits_shape), None, None, None, None, None


def fused_term_loss(
    logits: Tensor, target: Tensor, beta: float, gamma: float, dice_kind: str, *, reuse_buffer: bool = True
) -> Tensor:
    """Per-term ``beta*CE + gamma*Dice`` [K] of ``logits`` [K,B,C,*S] (float32/64) against ``target`` [B,*S].

    ``reuse_buffer=True`` (what the criterion uses) writes the gradient into the saved softmax and
    saves one full-size buffer, at the price of allowing one backward per forward; ``False`` allows
    repeated backward passes (``retain_graph=True``, ``gradcheck``).
    """
    return FusedTermLoss.apply(logits, target, float(beta), float(gamma), dice_kind, reuse_buffer)
