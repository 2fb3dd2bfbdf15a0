"""``awf``: attention-weighted fusion of the members (LoMix).

Each member position j has a 1x1 convolution C -> 1 that scores every pixel; a softmax over the
members turns the scores into per-pixel weights, and the output is the weighted sum of the
members. As in the reference, one module serves all subsets of a size (its convolutions indexed
by the member's position in the subset); ``share: subset`` gives every subset its own.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

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
        flat = x.reshape(n, k, b, c, -1)  # [n, k, B, C, S]
        copies = self.weight.shape[0]
        # scores[n, j, b, s] = sum_c weight[j, c] * x[n, j, b, c, s] + bias[j]: one batched GEMV, no copy of x
        scores = torch.matmul(self.weight.view(copies, k, 1, 1, c), flat).squeeze(3)
        scores = scores + self.bias.view(copies, k, 1, 1)
        attention = scores.softmax(dim=1).unsqueeze(3)  # over the members, per pixel: [n, k, B, 1, S]
        # weighted sum, accumulated in place so that no [n, k, B, C, S] temporary is allocated
        weights, members = attention.unbind(1), flat.unbind(1)
        out = weights[0] * members[0]
        for weight, member in zip(weights[1:], members[1:], strict=True):
            out = out.addcmul_(weight, member)
        return out.view(n, *x.shape[2:])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", share={self.share!r}"
