"""Recipes: one YAML file that says everything a training run needs.

A recipe names the data (dataset form and root), the model, the search space of supervised terms
(a bundled name, a path or an inline mapping), the optimiser and schedule, the training length,
the evaluation protocol and an optional ``tune:`` section for sweeps. It is validated by pydantic
with ``extra="forbid"``, so a misspelt key is an error listing the valid keys at that level, and
names of spaces, models and datasets are checked when the recipe is loaded, not hours later.

Overrides (``--set optim.lr=3e-4``) are applied to the raw mapping before validation. An override
under ``space.`` on a recipe that names its space (``space: lomix``) first inlines that space's
mapping, so ``--set space.loss.ce=0.5`` works on bundled spaces too.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fusionsearch.config_io import resolve_config, validation_error
from fusionsearch.errors import ConfigError, FusionSearchError, UnknownNameError
from fusionsearch.overrides import apply_overrides
from fusionsearch.registry import DATASETS, MODELS, import_plugins
from fusionsearch.tune_spec import Distribution, parse_tune_section, validate_tune_paths


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the images come from. ``options`` holds dataset-specific extras passed through verbatim."""

    name: str = Field("synapse", description="registered dataset name (synapse, acdc, nifti_folder, ...)")
    root: str | None = Field(None, description="folder holding the dataset; --data-root overrides it")
    size: int = Field(224, ge=8, description="training slice size (pixels per side)")
    labels: str | None = Field(None, description="label form where the dataset has several (synapse: auto, ...)")
    val_fraction: float | None = Field(
        None, ge=0, lt=1, description="share of training cases held out for validation (0 = none: select last)"
    )
    fraction: float = Field(1.0, gt=0, le=1, description="share of training cases kept (low-data studies)")
    seed: int | None = Field(None, ge=0, description="augmentation seed; defaults to the recipe seed")
    split_seed: int = Field(0, ge=0, description="seed of the validation carve-out and the fraction kept")
    augment: bool = True
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(_Strict):
    """A registered multi-scale model and its options."""

    name: str = "pvt_emcad"
    num_classes: int | None = Field(None, ge=2, description="defaults to the dataset's class count")
    in_channels: int = Field(1, ge=1)
    pretrained: bool = False
    pretrained_file: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class LossWeightOptim(_Strict):
    """Optional separate learning rate / weight decay for the loss-weighting parameters."""

    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)


class OptimConfig(_Strict):
    """AdamW over the model and the criterion together, as in the reference code."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm; None = no clipping")
    loss_weights: LossWeightOptim = Field(default_factory=LossWeightOptim)


class ScheduleConfig(_Strict):
    """Learning-rate schedule over iterations: constant (reference), cosine or poly."""

    kind: Literal["constant", "cosine", "poly"] = "constant"
    warmup_iterations: int = Field(0, ge=0)
    power: float = Field(0.9, gt=0, description="poly exponent")
    min_lr: float = Field(0.0, ge=0, description="floor of cosine/poly")


class EvaluationConfig(_Strict):
    """Validation during training and the single test evaluation at the end."""

    head: Literal["last", "sum", "mixture"] = "last"
    protocol: Literal["paper", "strict"] = "paper"
    size: int | None = Field(None, ge=8, description="inference size; defaults to data.size")
    every: int = Field(1, ge=1, description="validate every N epochs (and always after the last)")
    test: bool = True
    mixture_top_k: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    roi_size: list[int] | None = None
    overlays: int = Field(3, ge=0, description="qualitative overlays in the report")


class Recipe(_Strict):
    """A validated training recipe. Build with :func:`load_recipe` or :meth:`Recipe.from_dict`."""

    name: str | None = None
    description: str = ""
    plugins: list[str] = Field(default_factory=list)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    space: str | dict[str, Any] = "lomix"
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    epochs: int | None = Field(None, ge=1)
    iterations: int | None = Field(None, ge=1)
    batch_size: int = Field(6, ge=1)
    seed: int = Field(2222, ge=0)
    num_workers: int = Field(0, ge=0)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    device: str = "auto"
    deterministic: bool = True
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output_dir: str = "runs"
    tune: dict[str, Distribution] = Field(default_factory=dict)

    _source: str = PrivateAttr("<recipe>")
    _base_dir: Path | None = PrivateAttr(None)
    _space: Any = PrivateAttr(None)

    @field_validator("tune", mode="before")
    @classmethod
    def _parse_tune(cls, value: Any, info: ValidationInfo) -> Any:
        source = (info.context or {}).get("source", "<recipe>")
        return parse_tune_section(value, source=source) if value is not None else {}

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        head = value.split(":")[0]
        if head not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got '{value}'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _length(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("epochs") is not None and data.get("iterations") is not None:
                raise ValueError("give either 'epochs' or 'iterations', not both")
            if data.get("epochs") is None and data.get("iterations") is None:
                data = {**data, "epochs": 1}
        return data

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        *,
        source: str = "<recipe>",
        base_dir: Path | None = None,
        check_tune: bool = True,
    ) -> Recipe:
        """Validate a raw mapping: fields, plugin imports, space, model and dataset names, tune paths."""
        data = copy.deepcopy(data)
        plugins = data.get("plugins") or []
        if plugins:
            if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
                raise ConfigError("must be a list of module names or .py paths", file=source, field="plugins")
            import_plugins(plugins, source=source, base_dir=base_dir)
        try:
            recipe = cls.model_validate(data, context={"source": source})
        except ValidationError as exc:
            raise _recipe_validation_error(exc, source=source) from None
        recipe._source = source
        recipe._base_dir = base_dir
        recipe._resolve_paths()
        recipe._check_names()
        recipe._space = _load_recipe_space(recipe.space, source=source, base_dir=base_dir)
        if check_tune and recipe.tune:
            base = recipe.to_dict()
            if any(path == "space" or path.startswith("space.") for path in recipe.tune):
                base = inline_space(base, base_dir=base_dir)
            validate_tune_paths(
                recipe.tune,
                base,
                lambda candidate: cls.from_dict(candidate, source=source, base_dir=base_dir, check_tune=False),
                source=source,
            )
        return recipe

    def _resolve_paths(self) -> None:
        # Relative data and weight paths in a recipe file are relative to that file's folder.
        if self._base_dir is None:
            return
        if self.data.root and not Path(self.data.root).expanduser().is_absolute():
            self.data.root = str((self._base_dir / self.data.root).resolve())
        if self.model.pretrained_file and not Path(self.model.pretrained_file).expanduser().is_absolute():
            self.model.pretrained_file = str((self._base_dir / self.model.pretrained_file).resolve())
        if isinstance(self.space, str) and _looks_like_path(self.space):
            path = Path(self.space).expanduser()
            if not path.is_absolute():
                self.space = str((self._base_dir / path).resolve())

    def _check_names(self) -> None:
        for field, registry, name in (("model.name", MODELS, self.model.name), ("data.name", DATASETS, self.data.name)):
            try:
                registry.get(name)
            except UnknownNameError as exc:
                raise ConfigError(str(exc), file=self._source, field=field) from None
        from fusionsearch.models import model_options

        valid = model_options(self.model.name)  # None: the factory checks its own **options
        unknown = sorted(set(self.model.options) - set(valid)) if valid is not None else []
        if unknown:
            raise ConfigError(
                f"model '{self.model.name}' has no option '{unknown[0]}'",
                file=self._source,
                field=f"model.options.{unknown[0]}",
                fix=f"Valid keys under model.options: {', '.join(sorted(valid or {})) or '(none)'}",
            )

    # -- accessors ------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """Where this recipe came from (file path or bundled name), for messages."""
        return self._source

    @property
    def base_dir(self) -> Path | None:
        return self._base_dir

    @property
    def run_name(self) -> str:
        return self.name or "run"

    def search_space(self) -> Any:
        """The validated :class:`fusionsearch.spec.SearchSpace` the recipe names or inlines."""
        if self._space is None:
            self._space = _load_recipe_space(self.space, source=self._source, base_dir=self._base_dir)
        return self._space

    def data_seed(self) -> int:
        return self.seed if self.data.seed is None else self.data.seed

    def max_iterations(self, iterations_per_epoch: int) -> int:
        """Total optimiser steps: ``iterations`` if given, else ``epochs`` full passes."""
        if self.iterations is not None:
            return self.iterations
        return int(self.epochs or 1) * iterations_per_epoch

    def num_epochs(self, iterations_per_epoch: int) -> int:
        return math.ceil(self.max_iterations(iterations_per_epoch) / max(1, iterations_per_epoch))

    # -- export ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain mapping that :meth:`from_dict` turns back into an equal recipe."""
        data = self.model_dump(mode="json", exclude={"tune"})
        data["tune"] = {
            path: dist.model_dump(mode="json", by_alias=True, exclude_none=True) for path, dist in self.tune.items()
        }
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def resolved_dict(self) -> dict[str, Any]:
        """Like :meth:`to_dict` with the space inlined, so a run directory records exactly what ran."""
        return inline_space(self.to_dict(), base_dir=self._base_dir)

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        """A new recipe with dotted-path overrides applied (``{"space.loss.ce": 0.5}`` works on named spaces)."""
        data = apply_recipe_overrides(self.to_dict(), overrides, base_dir=self._base_dir)
        return Recipe.from_dict(data, source=self._source, base_dir=self._base_dir)


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text


def _load_recipe_space(space: str | dict[str, Any], *, source: str, base_dir: Path | None) -> Any:
    from fusionsearch.spec import SearchSpace, load_space

    try:
        if isinstance(space, str):
            return load_space(space)
        return SearchSpace.from_dict(space, source=f"{source} (inline space)", base_dir=base_dir)
    except ConfigError as exc:
        field = "space" + (f".{exc.field}" if exc.field else "")
        raise ConfigError(exc.reason, file=exc.file or source, field=field, fix=exc.fix) from None
    except FusionSearchError as exc:
        raise ConfigError(str(exc), file=source, field="space") from None


def inline_space(data: dict[str, Any], *, base_dir: Path | None = None) -> dict[str, Any]:
    """Replace a named space (``space: lomix`` or a path) by its YAML mapping.

    Plugin paths inside the space file are made absolute so that they still resolve once the
    mapping lives inside another file.
    """
    space = data.get("space", "lomix")
    if not isinstance(space, str):
        return data
    target: str | Path = space
    if base_dir is not None and _looks_like_path(space) and not Path(space).expanduser().is_absolute():
        target = base_dir / space
    mapping, _, space_dir = resolve_config(target, "space")
    plugins = mapping.get("plugins")
    if space_dir is not None and isinstance(plugins, list):
        mapping["plugins"] = [
            str((space_dir / p).resolve()) if isinstance(p, str) and _looks_like_path(p) and not Path(p).is_absolute()
            else p
            for p in plugins
        ]
    result = copy.deepcopy(data)
    result["space"] = mapping
    return result


def apply_recipe_overrides(
    data: dict[str, Any], overrides: dict[str, Any], *, base_dir: Path | None = None
) -> dict[str, Any]:
    """Apply dotted-path overrides to a raw recipe mapping, inlining a named space when needed."""
    if any(key.startswith("space.") for key in overrides):
        data = inline_space(data, base_dir=base_dir)
    return apply_overrides(data, overrides)


def load_recipe(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a bundled recipe by name (``lomix_synapse``) or a YAML file, then apply ``overrides``.

    A run directory (holding ``recipe.yaml``) is accepted too, which is how ``--resume`` and
    ``fusionsearch evaluate`` read the recipe a run used.
    """
    target = Path(str(name_or_path)).expanduser()
    if target.is_dir() and (target / "recipe.yaml").is_file():
        target = target / "recipe.yaml"
    data, source, base_dir = resolve_config(target if target.exists() else name_or_path, "recipe")
    if base_dir is None:
        data.setdefault("name", str(name_or_path))
    elif target.name == "recipe.yaml":
        data.setdefault("name", target.parent.name)
    else:
        data.setdefault("name", target.stem)
    if overrides:
        data = apply_recipe_overrides(data, overrides, base_dir=base_dir)
    return Recipe.from_dict(data, source=source, base_dir=base_dir)


# -- error messages ---------------------------------------------------------------------------------
def _recipe_validation_error(exc: ValidationError, *, source: str) -> ConfigError:
    """Turn pydantic's error into one message; unknown keys list the valid keys at their level."""
    for item in exc.errors():
        if item.get("type") == "extra_forbidden":
            loc = tuple(item.get("loc", ()))
            valid = _valid_keys(Recipe, loc[:-1])
            if valid is not None:
                level = ".".join(str(p) for p in loc[:-1]) or "the top level"
                dotted = ".".join(str(p) for p in loc)
                return ConfigError(
                    f"'{dotted}' is not a known field",
                    file=source,
                    field=dotted,
                    fix=f"Valid keys under {level}: {', '.join(valid)}",
                )
    return validation_error(exc, source=source)


def _valid_keys(model: type[BaseModel], path: tuple[Any, ...]) -> list[str] | None:
    current: Any = model
    for part in path:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return None
        annotation = fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if current is None:
            return None
    return list(current.model_fields)
