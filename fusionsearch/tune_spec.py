"""Declarative outer-loop distributions (the ``tune:`` section of spaces and recipes).

A ``tune:`` section maps dotted field paths to one distribution each::

    tune:
      loss.ce: {uniform: [0.1, 0.9]}
      optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
      model.num_scales: {int: [2, 4]}
      operators: {choice: [[add, mul], [add, mul, awf, concat]]}
      weighting.kind: {choice: [softplus, uncertainty]}
      # searched only when another field takes a given value (or, for lists, contains it)
      weighting.init: {uniform: [-1.0, 1.0], when: {weighting.kind: softplus}}
      awf_share: {choice: [size, subset], when: {operators: {contains: awf}}}

The paths are checked against the config they belong to before any trial starts (see
:func:`validate_tune_paths`), so a typo is an error, not a silently ignored knob.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fusionsearch.errors import ConfigError, FusionSearchError
from fusionsearch.overrides import get_path, set_path


class Contains(BaseModel):
    """Condition satisfied when a list-valued field contains ``contains``."""

    model_config = ConfigDict(extra="forbid")
    contains: Any


class Distribution(BaseModel):
    """Exactly one of uniform / loguniform / int / choice, optionally conditional via ``when``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int_range: tuple[int, int] | None = Field(default=None, alias="int")
    choice: list[Any] | None = None
    step: float | None = None
    when: dict[str, Any | Contains] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in ("uniform", "loguniform", "int_range", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of uniform: [low, high], loguniform: [low, high], int: [low, high], "
                f"choice: [values...] (found {len(given) or 'none'})"
            )
        kind = self.kind
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice needs at least one value")
        else:
            low, high = self.bounds
            if low > high:
                raise ValueError(f"{kind} low ({low}) is greater than high ({high}); swap them")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {low}")
        return self

    @property
    def kind(self) -> str:
        for key in ("uniform", "loguniform", "choice"):
            if getattr(self, key) is not None:
                return key
        return "int"

    @property
    def bounds(self) -> tuple[float, float]:
        value = self.uniform or self.loguniform or self.int_range
        if value is None:
            raise AttributeError("a choice has no bounds")
        return value[0], value[1]

    def candidate_values(self) -> list[Any]:
        """Values that exercise the distribution's extremes: both bounds, or every choice."""
        if self.kind == "choice":
            return list(self.choice or [])
        low, high = self.bounds
        return [low, high]

    def is_active(self, config: dict[str, Any]) -> bool:
        """Whether the ``when`` condition holds for the (raw) config mapping."""
        for path, expected in (self.when or {}).items():
            actual = get_path(config, path, default=None)
            if isinstance(expected, Contains) or (isinstance(expected, dict) and "contains" in expected):
                needle = expected.contains if isinstance(expected, Contains) else expected["contains"]
                if not isinstance(actual, list | tuple) or not any(_matches(x, needle) for x in actual):
                    return False
            elif actual != expected:
                return False
        return True


def _matches(item: Any, needle: Any) -> bool:
    # operators may be given as names or as {name: ..., options...}
    if isinstance(item, dict) and "name" in item:
        return item["name"] == needle
    return item == needle


def parse_tune_section(raw: Any, *, source: str, prefix: str = "tune") -> dict[str, Distribution]:
    """Validate a raw ``tune:`` mapping into distributions, reporting errors by path."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("must be a mapping of field paths to distributions", file=source, field=prefix)
    parsed: dict[str, Distribution] = {}
    for path, spec in raw.items():
        if isinstance(spec, Distribution):
            parsed[path] = spec
            continue
        if not isinstance(spec, dict):
            raise ConfigError(
                f"expected a distribution such as {{uniform: [0.1, 0.9]}}, got {spec!r}",
                file=source,
                field=f"{prefix}.{path}",
            )
        try:
            parsed[path] = Distribution.model_validate(spec)
        except Exception as exc:  # pydantic.ValidationError
            from fusionsearch.config_io import validation_error

            inner = validation_error(exc, source=source)
            raise ConfigError(inner.reason, file=source, field=f"{prefix}.{path}") from None
    for path, dist in parsed.items():
        for other in dist.when or {}:
            if other == path:
                raise ConfigError(
                    "a distribution cannot be conditional on itself", file=source, field=f"{prefix}.{path}"
                )
    return parsed


def validate_tune_paths(
    tune: dict[str, Distribution],
    base: dict[str, Any],
    validate: Callable[[dict[str, Any]], Any],
    *,
    source: str,
    prefix: str = "tune",
) -> None:
    """Reject a ``tune:`` entry whose path names no field or whose values the config refuses.

    ``validate`` is the config's own validation (raises ConfigError/ValidationError). Each
    distribution's extreme values are written into ``base`` one at a time and validated, so a
    misspelt path, a choice of an unknown operator or an out-of-range bound fails here, before
    any trial starts.
    """
    for path, dist in tune.items():
        for value in dist.candidate_values():
            candidate = set_path(base, path, value)
            # conditions of this entry are made true so that its value is checked in context
            for cond_path, expected in (dist.when or {}).items():
                if cond_path in tune and not isinstance(expected, Contains | dict):
                    candidate = set_path(candidate, cond_path, expected)
            try:
                validate(candidate)
            except FusionSearchError as exc:
                raise ConfigError(
                    f"the value {value!r} is not accepted: {exc}", file=source, field=f"{prefix}.{path}"
                ) from None
            except Exception as exc:
                from fusionsearch.config_io import validation_error

                inner = validation_error(exc, source=source)
                raise ConfigError(
                    f"the value {value!r} is not accepted ({inner.reason})", file=source, field=f"{prefix}.{path}"
                ) from None
