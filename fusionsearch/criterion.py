"""The criterion: mixer + per-term loss + weighting, as one nn.Module the trainer calls.

``crit(logits, target)`` resizes the used logits to the label size (bilinear/trilinear,
align_corners=False), mixes them into the K terms, scores every term with ``beta*CE + gamma*Dice``
in one batched pass and combines the K losses with the space's weighting. Its parameters are the
operators' and the weighting's, so the network's optimiser trains them together with the model.
Everything after the model runs with autocast disabled, in float32 (float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionsearch.compile import Graph, compile_space
from fusionsearch.errors import ConfigError, FusionSearchError
from fusionsearch.loss import build_term_loss
from fusionsearch.mixer import REDUCED_PRECISION, Mixer, check_logits
from fusionsearch.spec import SearchSpace, load_space
from fusionsearch.weighting import build_weighting

_RESIZE_MODES = {2: "bilinear", 3: "trilinear"}


@dataclass
class CriterionOutput:
    """The result of one criterion call."""

    total: Tensor
    """Scalar to backpropagate: weights . losses (+ the weighting's regulariser)."""
    terms: list[str]
    """The K term names, e.g. ``P0``, ``add(0,1)``, ``mul(0,2,3)``."""
    losses: Tensor
    """Tensor[K]: per-term beta*CE + gamma*Dice."""
    weights: Tensor
    """Tensor[K]: the effective weights used (detached)."""


class Criterion(nn.Module):
    """Mixer, term loss and weighting of one compiled search space."""

    def __init__(self, space: SearchSpace, graph: Graph) -> None:
        super().__init__()
        self.space = space
        self.graph = graph
        self.mixer = Mixer(graph)
        self.term_loss = build_term_loss(space.loss)
        try:
            self.weighting = build_weighting(space.weighting, graph.terms, graph.num_scales)
        except ConfigError as exc:  # name the space file the weighting came from
            if exc.file:
                raise
            raise ConfigError(exc.reason, file=space.source, field=exc.field, fix=exc.fix) from None

    @property
    def terms(self) -> list[str]:
        """The K term names in order."""
        return self.graph.names

    def forward(self, logits: Sequence[Tensor], target: Tensor) -> CriterionOutput:
        resized = self._resized(logits, self._target_size(target))
        stacked, context = self.mixer.stack(resized, recycle_outputs=True)
        with torch.autocast(device_type=stacked.device.type, enabled=False):
            # Each block of terms is scored as soon as it is mixed: the same per-term losses as
            # term_loss(mix(logits)), without the whole [K, B, C, *S] tensor; the loss keeps nothing
            # of a block, so the operators write every block into the same recycled memory.
            blocks = [self.term_loss(block, target) for block in self.mixer.iter_parts(stacked, context)]
            losses = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
            total, weights = self.weighting(losses)
        return CriterionOutput(total=total, terms=self.terms, losses=losses, weights=weights)

    def mix(self, logits: Sequence[Tensor], size: Sequence[int] | None = None) -> Tensor:
        """All K terms, Tensor[K, B, C, *S]; the used logits are first resized to ``size`` if given."""
        return self.mixer(self._resized(logits, size))

    def _resized(self, logits: Sequence[Tensor], size: Sequence[int] | None) -> list[Tensor]:
        items = check_logits_count(logits, self.graph)
        if size is None:
            return items
        return [
            resize_logits(item, size) if scale in self.mixer.used_scales else item for scale, item in enumerate(items)
        ]

    @torch.no_grad()
    def effective_weights(self) -> Tensor:
        """The weights [K] the weighting currently applies (detached), for logging."""
        return self.weighting.effective_weights()

    def _target_size(self, target: Tensor) -> tuple[int, ...]:
        dims = self.graph.spatial_dims
        if target.dim() != dims + 1:
            raise FusionSearchError(
                f"The target must have shape [B, *spatial] with {dims} spatial dimensions (class indices, no "
                f"channel dimension), got shape {tuple(target.shape)}."
            )
        return tuple(target.shape[1:])


def check_logits_count(logits: Sequence[Tensor], graph: Graph) -> list[Tensor]:
    """The logits as a list, after checking that there is one per scale (shapes are checked later)."""
    return check_logits(logits, graph, used_scales=())


def resize_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Resize ``[B, C, *S]`` logits to ``size`` (bilinear/trilinear, align_corners=False); no-op if equal."""
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    if logits.dim() - 2 != len(size):
        raise FusionSearchError(
            f"Cannot resize logits of shape {tuple(logits.shape)} to a label of spatial size {tuple(size)}: "
            f"their spatial dimensions differ."
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if logits.dtype in REDUCED_PRECISION:
            logits = logits.float()
        return F.interpolate(logits, size=tuple(size), mode=_RESIZE_MODES[len(size)], align_corners=False)


def build_criterion(
    space: SearchSpace | str | Path, num_scales: int, num_classes: int, spatial_dims: int = 2
) -> Criterion:
    """Compile ``space`` (a SearchSpace, bundled name or YAML path) into a ready criterion."""
    space = load_space(space)
    return Criterion(space, compile_space(space, num_scales, num_classes, spatial_dims))
