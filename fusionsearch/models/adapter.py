"""``MultiScaleAdapter``: turn any user network with several logit outputs into a fusionsearch model.

The wrapped module may return a list or tuple of logits (in ``order``), or a dict (``keys`` name the
entries to use, coarsest first). Every call checks what comes back, because a wrong order or a
missing scale would otherwise train silently on the wrong supervision: one tensor instead of a
collection, a wrong count, differing class counts, or sizes that shrink towards the end (the
sign of a finest-first network declared coarsest first) are clear errors.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fusionsearch.errors import ConfigError, FusionSearchError
from fusionsearch.models.base import MultiScaleModel
from fusionsearch.registry import register_model

_ORDERS = ("coarsest_first", "finest_first")


class MultiScaleAdapter(MultiScaleModel):
    """Wrap ``module`` so that ``forward`` returns a list of logits, coarsest first.

    ``num_outputs``, ``num_classes`` and ``spatial_dims`` may be given (then every call is checked
    against them) or left None, in which case the first forward fills them in; ``keys`` fixes
    ``num_outputs``. Give them when a recipe's search space must be checked before training.
    """

    def __init__(
        self,
        module: nn.Module,
        order: str = "coarsest_first",
        keys: Sequence[Hashable] | None = None,
        *,
        num_outputs: int | None = None,
        num_classes: int | None = None,
        spatial_dims: int | None = None,
        in_channels: int | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ConfigError(f"MultiScaleAdapter needs a torch nn.Module, got {type(module).__name__}", field="module")
        if order not in _ORDERS:
            raise ConfigError(f"must be one of {', '.join(_ORDERS)}, got {order!r}", field="order")
        if keys is not None:
            keys = list(keys)
            if not keys or len(set(keys)) != len(keys):
                raise ConfigError(f"must be a non-empty list of distinct keys, got {keys!r}", field="keys")
            if num_outputs is not None and num_outputs != len(keys):
                raise ConfigError(
                    f"num_outputs={num_outputs} contradicts the {len(keys)} keys {keys}", field="num_outputs"
                )
            num_outputs = len(keys)
        super().__init__(
            num_classes=num_classes, num_outputs=num_outputs, spatial_dims=spatial_dims, in_channels=in_channels
        )
        self.module = module
        self.order = order
        self.keys = keys

    def forward(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        outputs = self.module(*args, **kwargs)
        logits = self._collect(outputs)
        if self.order == "finest_first":
            logits = logits[::-1]
        self._check(logits)
        return logits

    def _collect(self, outputs: Any) -> list[torch.Tensor]:
        name = type(self.module).__name__
        if isinstance(outputs, torch.Tensor):
            raise FusionSearchError(
                f"{name} returned a single tensor of shape {tuple(outputs.shape)}, but a multi-scale model must "
                f"return one logit map per decoder scale (a list, tuple or dict of tensors). Return the "
                f"deep-supervision outputs too, e.g. 'return [p_coarse, ..., p_fine]'."
            )
        if isinstance(outputs, Mapping):
            if self.keys is None:
                raise FusionSearchError(
                    f"{name} returned a dict with keys {list(outputs)}; pass keys=[...] to MultiScaleAdapter to "
                    f"say which entries are the logits and in which order (coarsest first)."
                )
            missing = [key for key in self.keys if key not in outputs]
            if missing:
                raise FusionSearchError(
                    f"{name} returned a dict without the key(s) {missing}; it has {list(outputs)}. Fix the keys "
                    f"given to MultiScaleAdapter."
                )
            logits = [outputs[key] for key in self.keys]
        elif isinstance(outputs, list | tuple):
            if self.keys is not None:
                raise FusionSearchError(
                    f"MultiScaleAdapter was given keys={self.keys}, but {name} returned a {type(outputs).__name__}, "
                    f"not a dict. Drop keys= for list/tuple outputs."
                )
            logits = list(outputs)
        else:
            raise FusionSearchError(
                f"{name} returned {type(outputs).__name__}; expected a list, tuple or dict of logit tensors."
            )
        for index, logit in enumerate(logits):
            if not isinstance(logit, torch.Tensor) or logit.ndim not in (4, 5):
                shown = tuple(logit.shape) if isinstance(logit, torch.Tensor) else type(logit).__name__
                raise FusionSearchError(
                    f"{name} output {index} is {shown}; every logit map must be a [B, C, H, W] or [B, C, D, H, W] "
                    f"tensor."
                )
        return logits

    def _check(self, logits: list[torch.Tensor]) -> None:
        name = type(self.module).__name__
        shapes = [tuple(p.shape) for p in logits]
        if self.num_outputs is not None and len(logits) != self.num_outputs:
            raise FusionSearchError(f"{name} returned {len(logits)} logit maps, expected {self.num_outputs}.")
        if len({p.shape[:2] for p in logits}) != 1 or len({p.ndim for p in logits}) != 1:
            raise FusionSearchError(
                f"{name} returned logit maps with differing batch size, class count or dimension: {shapes}."
            )
        if self.num_classes is not None and logits[0].shape[1] != self.num_classes:
            raise FusionSearchError(
                f"{name} returned {logits[0].shape[1]} channels per logit map, expected num_classes="
                f"{self.num_classes}: {shapes}."
            )
        dims = logits[0].ndim - 2
        if self.spatial_dims is not None and dims != self.spatial_dims:
            raise FusionSearchError(f"{name} returned {dims}D logits, expected spatial_dims={self.spatial_dims}.")
        for coarse, fine in zip(logits, logits[1:], strict=False):
            if any(c > f for c, f in zip(coarse.shape[2:], fine.shape[2:], strict=True)):
                other = "finest_first" if self.order == "coarsest_first" else "coarsest_first"
                raise FusionSearchError(
                    f"{name}'s logit maps are not coarsest first after applying order='{self.order}' (shapes "
                    f"{shapes}): a map is larger than the next one. Pass order='{other}' (or reorder keys)."
                )
        self.num_outputs = self.num_outputs or len(logits)
        self.num_classes = self.num_classes or int(logits[0].shape[1])
        self.spatial_dims = self.spatial_dims or dims


@register_model("adapter")
def adapter(
    num_classes: int,
    in_channels: int = 1,
    pretrained: bool = False,
    *,
    module: nn.Module | Callable[..., nn.Module],
    order: str = "coarsest_first",
    keys: Sequence[Hashable] | None = None,
    num_outputs: int | None = None,
    spatial_dims: int | None = None,
) -> MultiScaleAdapter:
    """Adapt a user network: ``module`` is an nn.Module, or a callable building one from
    ``num_classes=`` and ``in_channels=``. Recipes (YAML) cannot hold Python objects: a plugin module
    registers its own model name with :func:`fusionsearch.register_model` and returns an adapter."""
    if pretrained:
        raise ConfigError(
            "the adapter cannot load pretrained weights for a user module",
            field="pretrained",
            fix="Load weights into your module before wrapping it, and set pretrained: false",
        )
    if isinstance(module, str):
        raise ConfigError(
            f"module must be a Python nn.Module, not the string {module!r}",
            field="module",
            fix="From YAML, list a plugin file under 'plugins:' that registers your model with register_model",
        )
    if not isinstance(module, nn.Module):
        if not callable(module):
            raise ConfigError(f"must be an nn.Module or a callable returning one, got {module!r}", field="module")
        module = module(num_classes=num_classes, in_channels=in_channels)
    return MultiScaleAdapter(
        module,
        order=order,
        keys=keys,
        num_outputs=num_outputs,
        num_classes=num_classes,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
    )
