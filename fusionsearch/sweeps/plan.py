"""What a sweep searches and where it keeps things: the plan both backends and every trial share.

The plan is built once in the driver from the recipe: the recipe as a plain mapping with its search
space inlined and both ``tune:`` sections removed (a trial is a fixed recipe), the merged
:class:`SweepSpace`, the metric and the sweep folder. It is picklable, so Ray ships it to the
trials, and it is written to ``sweep.yaml`` so that ``--resume`` and extra Optuna workers can
check that they continue the same sweep.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fusionsearch.config_io import load_yaml_file
from fusionsearch.errors import ConfigError
from fusionsearch.overrides import apply_overrides
from fusionsearch.sweeps.space import SweepSpace

PLAN_FILE = "sweep.yaml"
RUNS_DIR = "runs"


@dataclass
class SweepPlan:
    """Everything a trial needs besides its sampled values."""

    base: dict[str, Any]  # the recipe mapping: space inlined, no tune sections
    source: str  # where the recipe came from, for messages
    base_dir: str | None  # folder that relative paths of the recipe resolve against
    space: SweepSpace
    tune_sections: dict[str, dict[str, Any]]  # {"recipe": {...}, "space": {...}} as declared, for the plan file
    metric: str
    mode: str
    sweep_dir: str

    @classmethod
    def from_recipe(cls, recipe: Any, *, metric: str, mode: str, sweep_dir: Path) -> SweepPlan:
        """Merge the recipe's and its space's ``tune:`` sections and check them before any trial starts."""
        base = recipe.resolved_dict()
        base.pop("tune", None)
        if isinstance(base.get("space"), dict):
            base["space"].pop("tune", None)
        recipe_tune = dict(recipe.tune)
        space_tune = {
            path: dist
            for path, dist in dict(recipe.search_space().tune or {}).items()
            if f"space.{path}" not in recipe_tune  # the recipe's own entry for a field wins
        }
        space_source = f"{recipe.source} (search space)"
        space = SweepSpace.build([("", recipe_tune, recipe.source), ("space", space_tune, space_source)], base)
        if not space:
            raise ConfigError(
                "nothing to search: neither the recipe nor its search space has a tune: section",
                file=recipe.source,
                field="tune",
                fix="Add e.g. 'tune: {optim.lr: {loguniform: [1.0e-5, 1.0e-3]}}' to the recipe",
            )
        sections = {
            "recipe": {p: _dump(d) for p, d in recipe_tune.items()},
            "space": {p: _dump(d) for p, d in space_tune.items()},
        }
        return cls(
            base=base,
            source=recipe.source,
            base_dir=str(recipe.base_dir) if recipe.base_dir else None,
            space=space,
            tune_sections=sections,
            metric=metric,
            mode=mode,
            sweep_dir=str(sweep_dir),
        )

    # ------------------------------------------------------------------ folders
    @property
    def path(self) -> Path:
        return Path(self.sweep_dir)

    @property
    def runs_dir(self) -> Path:
        return self.path / RUNS_DIR

    def run_dir(self, trial_id: str) -> Path:
        return self.runs_dir / f"trial_{trial_id}"

    # ------------------------------------------------------------------ recipes of trials
    def trial_mapping(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The raw recipe mapping of a trial: the base with the sampled values written in."""
        data = apply_overrides(copy.deepcopy(self.base), overrides)
        if self.base.get("name"):
            data["name"] = self.base["name"]
        return data

    def trial_recipe(self, overrides: dict[str, Any], *, label: str = "trial") -> Any:
        """A validated Recipe for the sampled values (checked by the same validation as a hand-written file)."""
        from fusionsearch.recipe import Recipe

        base_dir = Path(self.base_dir) if self.base_dir else None
        return Recipe.from_dict(self.trial_mapping(overrides), source=f"{self.source} ({label})", base_dir=base_dir)

    # ------------------------------------------------------------------ the plan file
    def identity(self) -> dict[str, Any]:
        """What must match for a sweep to be continued by another process or a --resume."""
        return {"recipe": self.base, "tune": self.tune_sections, "metric": self.metric, "mode": self.mode}

    def write(self, extra: dict[str, Any]) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / PLAN_FILE
        text = yaml.safe_dump({**self.identity(), **extra}, sort_keys=False, allow_unicode=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
        return target

    def check_same_as_saved(self) -> dict[str, Any]:
        """Refuse to continue a sweep with a different recipe, search space or metric."""
        target = self.path / PLAN_FILE
        saved = load_yaml_file(target)
        # compare through YAML so that tuples/lists and number forms agree
        mine = yaml.safe_load(yaml.safe_dump(self.identity(), sort_keys=True))
        for key in ("recipe", "tune", "metric", "mode"):
            if saved.get(key) != mine[key]:
                raise ConfigError(
                    f"this sweep was started with a different {key} than the one given now",
                    file=str(target),
                    field=key,
                    fix="Continue it with the same recipe, --set and --data-root values, or start a new sweep "
                    "with another --name",
                )
        return saved


def _dump(dist: Any) -> dict[str, Any]:
    return dist.model_dump(mode="json", by_alias=True, exclude_none=True)
