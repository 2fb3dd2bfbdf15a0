"""A third-party operator living outside the package, registered when a space lists this file."""

from __future__ import annotations

import torch
from torch import Tensor

from fusionsearch import register_operator
from fusionsearch.operator_api import FusionOperator


@register_operator("gated_sum")
class GatedSum(FusionOperator):
    """Sum of the members, each scaled by a learnable gate per subset (initialised to ``scale``)."""

    def __init__(self, k: int, num_classes: int, spatial_dims: int, n_subsets: int, scale: float = 1.0) -> None:
        super().__init__(k, num_classes, spatial_dims, n_subsets)
        self.gate = torch.nn.Parameter(torch.full((n_subsets, k), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        gates = self.gate.view(*self.gate.shape, *([1] * (x.dim() - 2)))
        return (gates * x).sum(1)
