"""One-pass ``beta*CE + gamma*Dice`` for K terms with an analytic backward.

Plain autograd keeps several full-size ``[K,B,C,N]`` intermediates alive for the backward pass
(log-softmax, softmax, squares, products). This ``torch.autograd.Function`` keeps exactly one,
the softmax ``p`` (plus ``p`` at the target class, a C-th of it), and computes the gradient in closed form:

- Cross entropy (mean over the B*N pixels): ``dCE/dz = (p - onehot) / (B*N)``.
- Dice: with ``num = 2*I + eps`` and ``den = P + T + eps`` per Dice bin (``I`` = sum of p*t, ``P`` =
  sum of p^2 for the reference flavour or of p for the MONAI flavour, ``T`` = sum of t; a bin is a
  class over the whole batch (reference) or a (sample, class) pair (MONAI)),
  ``dD/dp = -w * (2*t/den - num * dP/dp / den^2)`` with ``w`` = 1 / number of bins, then the
  softmax Jacobian-vector product ``dz = p * (g - sum_c p*g)``.

The softmax is torch's one-pass kernel; the logsumexp the cross entropy needs comes from it for
the price of two max-reductions (``p`` at the largest logit is ``1 / sum_c exp(z_c - max z)``).
The one-hot target is never built: its contributions enter through a gather of ``p`` at the target
class and a scatter-add into the gradient. By default the backward writes the gradient into the
softmax buffer itself, so the loss needs one full-size buffer in all (the price: one backward per
forward, see :func:`fused_term_loss`).

Forward and backward walk the terms in chunks, the backward with one chunk-sized workspace reused
by all of them, so its temporaries cost a fraction of the softmax instead of a second full-size
buffer. On the CPU a chunk is one term: a term's logits, softmax and workspace then stay in the
last-level cache through the several passes over them, which saves about a sixth of the backward
(and a reused workspace is not page-faulted in afresh). Elsewhere there are ``_CHUNKS`` chunks, few
kernel launches. The loops never depend on data and read nothing back to the host.

The small helpers at the top are shared with the plain autograd path in ``fusionsearch.loss``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fusionsearch.errors import FusionSearchError

SMOOTH = 1e-5  # numerator and denominator smoothing of both Dice flavours
_CHUNKS = 8  # off the CPU, the loss walks the terms in this many chunks (fewer when K is smaller)
_CPU_TERMS_PER_CHUNK = 1  # on the CPU, chunks of this many terms


def flat_views(mixed: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``[K,B,C,N]`` logits and ``[B,N]`` int64 target, N = number of pixels/voxels per sample."""
    k, b, c = mixed.shape[:3]
    return mixed.reshape(k, b, c, -1), target.reshape(b, -1).long()


def sample_class_counts(target: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``[B, C]`` pixels of each class in each sample (the sums of the one-hot target), no host sync."""
    ones = torch.ones((), dtype=dtype, device=target.device).expand(target.shape)
    return torch.zeros(target.shape[0], num_classes, dtype=dtype, device=target.device).scatter_add_(1, target, ones)


def dice_from_bins(intersect: Tensor, pred: Tensor, counts: Tensor, per_sample: bool) -> tuple[Tensor, Tensor]:
    """Numerator and denominator per Dice bin from per-(term, sample, class) sums ``[K,B,C]``.

    Per sample (MONAI) every (sample, class) is a bin: ``[K, B*C]``; otherwise (reference) the sums
    are pooled over the batch first: ``[K, C]``.
    """
    if per_sample:
        k = intersect.shape[0]
        return 2 * intersect.reshape(k, -1) + SMOOTH, (pred + counts).reshape(k, -1) + SMOOTH
    return 2 * intersect.sum(1) + SMOOTH, pred.sum(1) + counts.sum(0) + SMOOTH


def _flat_target_index(target: Tensor) -> Tensor:
    """``[1, B, N]``: where each pixel's target class sits in its sample's logits flattened to ``C*N``."""
    n = target.shape[1]
    return (target * n + torch.arange(n, device=target.device)).unsqueeze(0)


def _term_chunks(k: int, device: torch.device) -> list[slice]:
    """Contiguous slices covering the K terms: one term each on the CPU, about ``_CHUNKS`` elsewhere."""
    step = _CPU_TERMS_PER_CHUNK if device.type == "cpu" else -(-k // _CHUNKS)
    return [slice(i, i + step) for i in range(0, k, step)]


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
            at_target = t.view(1, b, 1, n).expand(k, b, 1, n)
            flat_target = _flat_target_index(t)  # [1, B, N]: gathers along one dimension are faster
            p = torch.empty(z.shape, dtype=z.dtype, device=z.device)
            log_normaliser = z.new_empty(k, b, 1, n)
            z_target = z.new_empty(k, b, 1, n)
            pred = z.new_empty(k, b, c)
            for terms in _term_chunks(k, z.device):
                z_chunk, p_chunk, norm_chunk = z[terms], p[terms], log_normaliser[terms]
                torch.softmax(z_chunk, dim=2, out=p_chunk)
                # logsumexp over the classes without a pass of its own: p at the largest logit is
                # 1 / sum_c exp(z_c - max z), never below 1/C, so its log is exact to rounding
                torch.amax(z_chunk, dim=2, keepdim=True, out=norm_chunk)
                norm_chunk.sub_(p_chunk.amax(dim=2, keepdim=True).log_())
                kc = z_chunk.shape[0]
                torch.gather(
                    z_chunk.reshape(kc, b, c * n), 2, flat_target.expand(kc, b, n), out=z_target[terms].view(kc, b, n)
                )
                if per_sample:
                    torch.sum(p_chunk, dim=3, out=pred[terms])
                else:
                    torch.linalg.vector_norm(p_chunk, dim=3, out=pred[terms]).square_()
            ce = (log_normaliser - z_target).mean(dim=(1, 2, 3))
            p_target = z_target.sub_(log_normaliser).exp_()  # p at the target class, [K,B,1,N], saved too
            intersect = z.new_zeros(k, b, c).scatter_add_(2, at_target.view(k, b, n), p_target.view(k, b, n))
            numerator, denominator = dice_from_bins(intersect, pred, sample_class_counts(t, c, z.dtype), per_sample)
            dice = 1 - (numerator / denominator).mean(dim=1)

        ctx.save_for_backward(p, p_target, t, numerator, denominator)
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
        p, p_target, t, numerator, denominator = ctx.saved_tensors
        with torch.autocast(device_type=p.device.type, enabled=False):
            k, b, c, n = p.shape
            per_sample = ctx.per_sample
            g = grad_out.to(p.dtype).view(k, 1)
            ce_scale = (ctx.beta / (b * n)) * g.view(k, 1, 1, 1)
            bin_weight = ctx.gamma / numerator.shape[1]
            # dD/dp = dense * p^e + onehot * target_coef per (term, sample, class), already times grad_out,
            # with e = 1 (reference: dP/dp = 2p) or e = 0 (MONAI: dP/dp = 1).
            dense = g * bin_weight * numerator / denominator.square()
            target_coef = -2 * bin_weight * g / denominator
            if per_sample:
                dense, target_coef = dense.view(k, b, c), target_coef.view(k, b, c)
            else:
                dense, target_coef = (2 * dense).unsqueeze(1).expand(k, b, c), target_coef.unsqueeze(1).expand(k, b, c)

            flat_target = _flat_target_index(t)
            # p * target_coef at the target class of every pixel, [K,B,1,N] (a ninth of p)
            coef_at_target = target_coef.contiguous().gather(2, t.view(1, b, n).expand(k, b, n))
            p_target_coefs = p_target * coef_at_target.view(k, b, 1, n)
            grad = p if ctx.reuse_buffer else torch.empty_like(p)
            chunks = _term_chunks(k, p.device)
            workspace = torch.empty_like(p[chunks[0]])  # reused by every chunk
            for terms in chunks:
                p_chunk, grad_chunk = p[terms], grad[terms]
                kc = p_chunk.shape[0]
                work = workspace[:kc]
                dense_chunk, ce_chunk = dense[terms], ce_scale[terms]
                p_target_coef = p_target_coefs[terms]
                # grad = p * (g_p - sum_c p * g_p) + (beta / (B*N)) * (p - onehot)
                if per_sample:
                    dot = torch.matmul(dense_chunk.unsqueeze(2), p_chunk) + p_target_coef
                    torch.add(dense_chunk.unsqueeze(3), ce_chunk - dot, out=work)
                    torch.mul(p_chunk, work, out=grad_chunk)
                else:
                    torch.square(p_chunk, out=work)
                    dot = torch.matmul(dense_chunk.unsqueeze(2), work) + p_target_coef
                    torch.mul(p_chunk, ce_chunk - dot, out=grad_chunk).addcmul_(work, dense_chunk.unsqueeze(3))
                grad_chunk.view(kc, b, c * n).scatter_add_(
                    2, flat_target.expand(kc, b, n), (p_target_coef - ce_chunk).view(kc, b, n)
                )
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
