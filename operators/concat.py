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
        copies = self.weight.shape[0]
        # The channel concat of the members, laid out [n, B, k*C, S] (member-major, as torch.cat gives).
        stacked_channels = x.reshape(n, k, b, c, -1).transpose(1, 2).reshape(n, b, k * c, -1)
        out = torch.matmul(self.weight.view(copies, 1, c, k * c), stacked_channels)
        out = out.add_(self.bias.view(copies, 1, c, 1))  # in place: matmul's backward does not need its output
        return out.view(n, *x.shape[2:])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", share={self.share!r}"
