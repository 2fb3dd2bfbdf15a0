"""Search spaces: which terms to build and how to weight and score them, as validated YAML.

A space names the scales to mix, the subset sizes, the fusion operators (with options), whether
the original outputs are supervised too, an optional term budget, the weighting, the per-term loss
and a ``tune:`` section of outer-loop distributions. Every field is checked by pydantic
(``extra="forbid"``), and problems are reported as one ConfigError naming the file and field.
See docs/spaces.md for the reference.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from fusionsearch.config_io import resolve_config, validation_error
from fusionsearch.errors import ConfigError, UnknownNameError
from fusionsearch.loss import LossConfig
from fusionsearch.operator_api import validate_options
from fusionsearch.registry import import_plugins
from fusionsearch.tune_spec import Distribution, parse_tune_section, validate_tune_paths
from fusionsearch.weighting import WeightingConfig

# Beyond this many scales the powerset explodes (2^L subsets per operator); a budget is required.
MAX_SCALES_WITHOUT_BUDGET = 5


class SubsetSizes(BaseModel):
    """Sizes of the fused subsets, inclusive; ``max`` defaults to the number of selected scales."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(2, ge=2)
    max: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _ordered(self) -> SubsetSizes:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is smaller than min ({self.min})")
        return self


class Budget(BaseModel):
    """A cap on the number of terms K; needed beyond five scales."""

    model_config = ConfigDict(extra="forbid")

    max_terms: int = Field(ge=1)
    strategy: Literal["sample", "prune"] = "prune"
    """``prune`` keeps the smallest subsets (pairs first, in combinations order); ``sample`` draws a seeded subset."""
    seed: int = 0


class OperatorChoice(BaseModel):
    """One operator of the space: ``add`` or ``{name: concat, share: size}`` in YAML."""

    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_yaml_form(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        if isinstance(data, dict) and "options" not in data:
            if "name" not in data:
                raise ValueError(f"an operator given as a mapping needs a 'name' (got {data!r})")
            options = {k: v for k, v in data.items() if k != "name"}
            return {"name": data["name"], "options": options}
        return data

    @model_validator(mode="after")
    def _known_with_valid_options(self) -> OperatorChoice:
        try:
            self.options = validate_options(self.name, self.options)
        except UnknownNameError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_serializer
    def _to_yaml_form(self) -> str | dict[str, Any]:
        return {"name": self.name, **self.options} if self.options else self.name


class SearchSpace(BaseModel):
    """A validated search space (see docs/spaces.md); build one with :func:`load_space`."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    plugins: list[str] = Field(default_factory=list)
    """Modules or .py files (relative to the YAML file) imported first, so they can register operators."""
    scales: Any = "all"
    """``all``, a list of scale indices (0 = coarsest), or a count n = the n finest scales."""
    subset_sizes: SubsetSizes | None = None
    """Sizes of fused subsets, default 2..(number of selected scales)."""
    operators: list[OperatorChoice] = Field(default_factory=list)
    include_originals: bool = True
    budget: Budget | None = None
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    tune: dict[str, Distribution] = Field(default_factory=dict)

    _source: str = PrivateAttr(default="<search space>")

    @property
    def source(self) -> str:
        """Where the space came from (file path or bundled name), for error messages."""
        return self._source

    # -- validation -----------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _import_plugins_first(cls, data: Any, info: ValidationInfo) -> Any:
        # Plugins must register their operators before the operator names are checked.
        plugins = data.get("plugins") if isinstance(data, dict) else None
        if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
            context = info.context or {}
            import_plugins(plugins, source=context.get("source"), base_dir=context.get("base_dir"))
        return data

    @field_validator("scales", mode="plain")
    @classmethod
    def _check_scales(cls, value: Any) -> str | list[int] | int:
        if value == "all":
            return "all"
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"a count of finest scales must be >= 1, got {value}")
            return value
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if min(value) < 0:
                raise ValueError(f"scale indices start at 0 (the coarsest), got {value}")
            if len(set(value)) != len(value):
                raise ValueError(f"scale indices must not repeat, got {value}")
            return sorted(value)
        raise ValueError(
            f"expected 'all', a non-empty list of scale indices (0 = coarsest) or a count of finest scales, "
            f"got {value!r}"
        )

    @field_validator("tune", mode="before")
    @classmethod
    def _parse_tune(cls, value: Any, info: ValidationInfo) -> Any:
        source = (info.context or {}).get("source", "<search space>")
        return parse_tune_section(value, source=source)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> SearchSpace:
        source = (info.context or {}).get("source")
        names = [op.name for op in self.operators]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(
                f"operator(s) {', '.join(duplicates)} listed twice; term names would collide",
                file=source,
                field="operators",
                fix="List each operator once",
            )
        if not self.operators and not self.include_originals:
            raise ConfigError(
                "the operator list is empty and include_originals is false, so the space has no terms",
                file=source,
                field="operators",
                fix="List at least one operator (e.g. [add, mul]) or set include_originals: true",
            )
        if not self.operators and self.subset_sizes is not None:
            raise ConfigError(
                "subset_sizes asks for fused terms but the operator list is empty",
                file=source,
                field="operators",
                fix="List the operators to apply to the subsets (e.g. [add, mul, awf, concat]) or remove subset_sizes",
            )
        if self.operators and self.budget is None:
            selected = len(self.scales) if isinstance(self.scales, list) else self.scales
            if isinstance(selected, int) and selected > MAX_SCALES_WITHOUT_BUDGET:
                raise ConfigError(too_many_scales_message(selected), file=source, field="scales", fix=BUDGET_FIX)
        return self

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, source: str = "<search space>", base_dir: Path | None = None
    ) -> SearchSpace:
        """Validate a raw mapping (e.g. parsed YAML); errors become ConfigError naming source and field.

        ``base_dir`` is the folder that relative ``plugins:`` paths are resolved against.
        """
        space = cls._validate(data, source=source, base_dir=base_dir)
        if space.tune:
            base = {k: v for k, v in data.items() if k != "tune"}
            validate_tune_paths(
                space.tune,
                base,
                # inner errors name only the field: the outer message already names the file
                lambda candidate: cls._validate(candidate, source="", base_dir=base_dir),
                source=source,
            )
        return space

    @classmethod
    def _validate(cls, data: dict[str, Any], *, source: str, base_dir: Path | None) -> SearchSpace:
        context = {"source": source, "base_dir": base_dir}
        try:
            space = cls.model_validate(data, context=context)
        except ValidationError as exc:
            raise _config_error(exc, source) from None
        space._source = source
        return space

    def to_dict(self) -> dict[str, Any]:
        """The space as a plain mapping in YAML form (round-trips through :meth:`from_dict`)."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["tune"] = {
            path: dist.model_dump(mode="json", by_alias=True, exclude_none=True) for path, dist in self.tune.items()
        }
        if not data["tune"]:
            del data["tune"]
        return data


BUDGET_FIX = (
    "Select at most 5 scales (scales: 5 keeps the 5 finest), or add a term budget such as "
    "budget: {max_terms: 120, strategy: prune}"
)


def too_many_scales_message(count: int) -> str:
    return (
        f"{count} scales give {2**count - 1 - count} fused subsets per operator (2^{count} - 1 - {count}); "
        f"more than {MAX_SCALES_WITHOUT_BUDGET} scales are only allowed with a term budget"
    )


def load_space(name_or_path: str | Path | SearchSpace) -> SearchSpace:
    """Load a bundled space by name (``lomix``) or a YAML file by path, validated."""
    if isinstance(name_or_path, SearchSpace):
        return name_or_path
    data, source, base_dir = resolve_config(name_or_path, "space")
    return SearchSpace.from_dict(data, source=source, base_dir=base_dir)


def _config_error(exc: ValidationError, source: str) -> ConfigError:
    """pydantic error -> ConfigError; an unknown field gets the valid names and the closest match."""
    error = validation_error(exc, source=source)
    reason = error.reason.removeprefix(f"'{error.field}': ") if error.field else error.reason
    first = exc.errors()[0]
    if first.get("type") != "extra_forbidden":
        return ConfigError(reason, file=source, field=error.field)
    location = [p for p in first.get("loc", ()) if isinstance(p, str)]
    valid = _field_names_at(location[:-1])
    if not valid:
        return error
    close = difflib.get_close_matches(location[-1], valid, n=1, cutoff=0.5)
    hint = f"Did you mean '{close[0]}'? " if close else ""
    return ConfigError(error.reason, file=source, field=error.field, fix=f"{hint}Valid fields here: {', '.join(valid)}")


def _field_names_at(path: list[str]) -> list[str]:
    """Field names of the (nested) model reached by following ``path`` from SearchSpace."""
    model: type[BaseModel] = SearchSpace
    for part in path:
        field = model.model_fields.get(part)
        if field is None:
            return []
        nested = [a for a in (field.annotation, *typing.get_args(field.annotation)) if _is_model(a)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
