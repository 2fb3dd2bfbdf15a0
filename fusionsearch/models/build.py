"""``build_model``: look a model up by name, check its options, build it and check the contract.

Factories registered with :func:`fusionsearch.register_model` take ``num_classes``, ``in_channels``
and ``pretrained`` plus their own keyword options. Options are checked against the factory's
signature before the call, so a misspelt option in a recipe is reported by name with the valid
ones, instead of surfacing as a ``TypeError`` deep inside a constructor.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from fusionsearch.errors import ConfigError, FusionSearchError
from fusionsearch.registry import MODELS

_COMMON_ARGUMENTS = ("num_classes", "in_channels", "pretrained")


def model_options(name: str) -> dict[str, Any] | None:
    """The options model ``name`` accepts, mapped to their defaults (``inspect.Parameter.empty`` if required).

    None means the factory takes arbitrary ``**options`` and checks them itself.
    """
    return _factory_options(MODELS.get(name))


def _factory_options(factory: Callable[..., Any]) -> dict[str, Any] | None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        return None
    options: dict[str, Any] = {}
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL or parameter.name in _COMMON_ARGUMENTS:
            continue
        options[parameter.name] = parameter.default
    return options


def _check_options(name: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    valid = _factory_options(factory)
    if valid is None:
        return
    listing = ", ".join(sorted(valid)) or "(none)"
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
            hint = f"Did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"model '{name}' has no option '{key}'",
                field=key,
                fix=f"{hint}Valid options of '{name}': {listing}",
            )
    missing = [key for key, default in valid.items() if default is inspect.Parameter.empty and key not in options]
    if missing:
        raise ConfigError(
            f"model '{name}' needs the option(s) {', '.join(missing)}",
            field=missing[0],
            fix=f"Set them in the model options. Valid options of '{name}': {listing}",
        )


def _check_positive_int(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"must be a positive integer, got {value!r}", field=field)


def _check_contract(name: str, model: Any, num_classes: int) -> None:
    if not isinstance(model, nn.Module):
        raise FusionSearchError(
            f"The factory of model '{name}' returned {type(model).__name__}, not a torch nn.Module. A model "
            f"factory must return a module whose forward gives a list of logits."
        )
    missing = [attr for attr in ("num_outputs", "num_classes", "spatial_dims") if not hasattr(model, attr)]
    if missing:
        raise FusionSearchError(
            f"Model '{name}' lacks the attribute(s) {', '.join(missing)} that fusionsearch reads. Wrap the "
            f"module in fusionsearch.models.MultiScaleAdapter, which adds them and orders its outputs."
        )
    if model.num_classes is not None and model.num_classes != num_classes:
        raise FusionSearchError(
            f"Model '{name}' was asked for {num_classes} classes but reports num_classes={model.num_classes}; "
            f"its factory must honour the num_classes argument."
        )


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 1,
    pretrained: bool = False,
    **options: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    Returns an ``nn.Module`` with ``num_outputs`` (L), ``num_classes`` and ``spatial_dims`` whose
    forward maps ``[B, in_channels, *S]`` to a list of L logits, coarsest first. ``pretrained=True``
    loads the encoder's published weights through timm (online or from its cache); the
    ``pretrained_file`` option of timm-based models loads a local file instead.
    """
    factory = MODELS.get(name)
    _check_positive_int(num_classes, "num_classes")
    _check_positive_int(in_channels, "in_channels")
    if not isinstance(pretrained, bool):
        raise ConfigError(f"must be true or false, got {pretrained!r}", field="pretrained")
    _check_options(name, factory, options)
    model = factory(num_classes=num_classes, in_channels=in_channels, pretrained=pretrained, **options)
    _check_contract(name, model, num_classes)
    return model
