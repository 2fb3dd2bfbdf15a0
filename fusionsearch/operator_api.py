"""The fusion operator interface: write an operator once, get it batched over every subset.

An operator fuses the ``k`` members of a subset of scales into one logit. The mixer gathers all
subsets of one size at once and calls the operator a single time with

    x: Tensor[n_subsets, k, B, C, *S]   ->   Tensor[n_subsets, B, C, *S]

so a stateless operator is one line (``return x.amax(1)``) and is batched for free.

Two kinds can be registered with :func:`fusionsearch.register_operator`:

* **stateless**: a plain function ``fn(x, **options)``; its keyword parameters after ``x`` are
  the options a space may set (``{name: power_mean, p: 3}``).
* **parametric**: a subclass of :class:`FusionOperator` (or any ``nn.Module`` class, or a factory
  function decorated with :func:`parametric`) built as
  ``factory(k, num_classes, spatial_dims, n_subsets, **options)``; one module is built per
  (operator, subset size) and owns the parameters of all subsets of that size.

Options are checked against the factory's signature (and its type hints, with pydantic) when a
space is validated, so a misspelt or mistyped option is reported by file and field before any
training starts.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from fusionsearch.registry import OPERATORS

# The arguments the mixer passes to every parametric factory; everything else is an option.
BUILD_ARGUMENTS = ("k", "num_classes", "spatial_dims", "n_subsets")


class FusionOperator(nn.Module):
    """Base class of parametric operators: one instance serves all subsets of one size.

    Subclasses take ``(k, num_classes, spatial_dims, n_subsets, **options)`` and implement
    ``forward(x: Tensor[n_subsets, k, B, C, *S]) -> Tensor[n_subsets, B, C, *S]``.
    """

    def __init__(self, k: int, num_classes: int, spatial_dims: int, n_subsets: int) -> None:
        super().__init__()
        self.k = k
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.n_subsets = n_subsets

    def extra_repr(self) -> str:
        return f"k={self.k}, num_classes={self.num_classes}, n_subsets={self.n_subsets}"


def parametric(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Mark a factory function (not a class) as building a parametric operator module."""
    factory.__fusion_parametric__ = True  # type: ignore[attr-defined]
    return factory


class StatelessOperator(nn.Module):
    """Wraps a stateless operator function (with its options bound) so the mixer holds only modules."""

    def __init__(self, name: str, fn: Callable[..., Tensor], options: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.options = dict(options)
        self.fn = functools.partial(fn, **options) if options else fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name}" + (f", {opts}" if opts else "")


@dataclass(frozen=True)
class OperatorInfo:
    """What the registry knows about one operator: kind, accepted options and a one-line summary."""

    name: str
    factory: Callable[..., Any]
    parametric: bool
    options: dict[str, inspect.Parameter]
    accepts_any_option: bool
    summary: str


def is_parametric(obj: Any) -> bool:
    """True for nn.Module classes and factories marked with :func:`parametric`."""
    return (isinstance(obj, type) and issubclass(obj, nn.Module)) or bool(getattr(obj, "__fusion_parametric__", False))


def describe_operator(name: str) -> OperatorInfo:
    """Look an operator up by name (unknown names raise with the known names and closest match)."""
    factory = OPERATORS.get(name)
    kind_parametric = is_parametric(factory)
    try:
        signature = inspect.signature(factory, eval_str=True)
    except (NameError, TypeError, ValueError):  # unresolvable hints: fall back to the raw signature
        signature = inspect.signature(factory)
    params = list(signature.parameters.values())
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    if kind_parametric:
        option_params = [p for p in params if p.name not in BUILD_ARGUMENTS]
    else:
        option_params = params[1:]  # the first parameter is the stacked input x
    options = {
        p.name: p
        for p in option_params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    doc = inspect.getdoc(factory) or ""
    summary = doc.strip().splitlines()[0] if doc.strip() else "(no docstring)"
    return OperatorInfo(name, factory, kind_parametric, options, accepts_any, summary)


def validate_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check options against the operator's signature and type hints; return them coerced.

    Raises ``ValueError`` with a message naming the offending option, so that pydantic reports it
    at the right place in the YAML file.
    """
    info = describe_operator(name)
    checked: dict[str, Any] = {}
    for key, value in options.items():
        param = info.options.get(key)
        if param is None:
            if info.accepts_any_option:
                checked[key] = value
                continue
            valid = ", ".join(sorted(info.options)) or "none"
            raise ValueError(f"operator '{name}' has no option '{key}' (its options: {valid})")
        if param.annotation is inspect.Parameter.empty:
            checked[key] = value
            continue
        try:
            checked[key] = TypeAdapter(param.annotation).validate_python(value)
        except ValidationError as exc:
            reason = exc.errors()[0].get("msg", "invalid value")
            raise ValueError(f"operator '{name}' option '{key}': {reason} (got {value!r})") from None
    missing = [p.name for p in info.options.values() if p.default is inspect.Parameter.empty and p.name not in checked]
    if missing:
        raise ValueError(f"operator '{name}' needs the option(s) {', '.join(missing)}")
    return checked


def build_operator(
    name: str, options: dict[str, Any], *, k: int, num_classes: int, spatial_dims: int, n_subsets: int
) -> nn.Module:
    """Build the module that fuses all ``n_subsets`` subsets of size ``k`` for operator ``name``."""
    info = describe_operator(name)
    options = validate_options(name, options)
    if not info.parametric:
        return StatelessOperator(name, info.factory, options)
    module = info.factory(k, num_classes, spatial_dims, n_subsets, **options)
    if not isinstance(module, nn.Module):
        raise TypeError(f"the factory of operator '{name}' returned {type(module).__name__}, not an nn.Module")
    return module
