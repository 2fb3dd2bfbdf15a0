"""Declarative ``tune:`` distributions -> an Optuna define-by-run search space.

A recipe's ``tune:`` section (paths relative to the recipe) and its search space's ``tune:`` section
(paths relative to the space, hence ``space.``-prefixed here) are merged into one
:class:`SweepSpace`. Both backends sample it the same way: Ray Tune's ``OptunaSearch`` accepts a
define-by-run function (``space=callable(trial)``) and the Optuna-only backend calls the same function
on its own trials, so conditional parameters (``when:``) behave identically everywhere: a parameter
is suggested only when its condition holds for the values sampled before it.

Optuna's categorical distribution only holds ``None``/bool/int/float/str, so a choice among lists or
mappings (``operators: {choice: [[add, mul], [add, mul, awf]]}``) is suggested as readable labels
(``"[add, mul]"``) and decoded back to the real values before they are written into the recipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from fusionsearch.errors import ConfigError
from fusionsearch.overrides import get_path, set_path
from fusionsearch.tune_spec import Contains, Distribution

_PRIMITIVE = (str, int, float, bool, type(None))


def format_value(value: Any) -> str:
    """One-line readable text of a searched value (``[add, mul]``, ``0.0003``, ``softplus``)."""
    if isinstance(value, _PRIMITIVE):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()


@dataclass(frozen=True)
class SearchParam:
    """One searched field: its dotted path in the recipe and where it was declared."""

    path: str
    dist: Distribution
    source: str  # file the tune section came from
    field: str  # the field path of the declaration in that file, for error messages
    labels: dict[str, Any] = field(default_factory=dict)  # choice label -> value (non-primitive choices)

    @property
    def uses_labels(self) -> bool:
        return bool(self.labels)

    def encode(self, value: Any) -> Any:
        """The Optuna-side representation of a real value."""
        return format_value(value) if self.uses_labels else value

    def decode(self, encoded: Any) -> Any:
        """The real value of an Optuna-side representation."""
        if not self.uses_labels:
            return encoded
        if encoded not in self.labels:
            raise ConfigError(
                f"the value {encoded!r} is not one of the choices {list(self.labels)}",
                file=self.source,
                field=self.field,
            )
        return self.labels[encoded]

    def describe(self) -> str:
        dist = self.dist
        if dist.kind == "choice":
            text = "choice of " + ", ".join(format_value(v) for v in dist.choice or [])
        else:
            low, high = dist.bounds
            text = f"{dist.kind} [{low}, {high}]" + (f" step {dist.step}" if dist.step is not None else "")
        if dist.when:
            conds = []
            for path, expected in dist.when.items():
                needle = _contains_needle(expected)
                conds.append(f"{path} contains {needle}" if needle is not _NO_NEEDLE else f"{path} == {expected}")
            text += " when " + " and ".join(conds)
        return text


_NO_NEEDLE = object()


def _contains_needle(expected: Any) -> Any:
    if isinstance(expected, Contains):
        return expected.contains
    if isinstance(expected, dict) and set(expected) == {"contains"}:
        return expected["contains"]
    return _NO_NEEDLE


def _related(a: str, b: str) -> bool:
    """Whether one dotted path equals or lies inside the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _make_param(path: str, dist: Distribution, *, source: str, field: str) -> SearchParam:
    if dist.step is not None:
        if dist.kind in ("choice", "loguniform"):
            raise ConfigError(
                f"'step' cannot be used with {dist.kind} (Optuna samples a {dist.kind} without steps)",
                file=source,
                field=field,
                fix="Remove 'step' or use uniform/int",
            )
        if dist.step <= 0:
            raise ConfigError(f"step must be positive, got {dist.step}", file=source, field=field)
        if dist.kind == "int" and dist.step != int(dist.step):
            raise ConfigError(f"an int distribution needs a whole step, got {dist.step}", file=source, field=field)
    labels: dict[str, Any] = {}
    if dist.kind == "choice":
        values = list(dist.choice or [])
        texts = [format_value(v) for v in values]
        duplicated = sorted({t for t in texts if texts.count(t) > 1})
        if duplicated:
            raise ConfigError(f"the choice lists {', '.join(duplicated)} more than once", file=source, field=field)
        if not all(isinstance(v, _PRIMITIVE) for v in values):
            labels = dict(zip(texts, values, strict=True))
    return SearchParam(path=path, dist=dist, source=source, field=field, labels=labels)


@dataclass
class SweepSpace:
    """The searched fields of a recipe, ordered so that every condition is sampled after what it reads.

    ``base`` is the recipe as a plain mapping (its search space resolved inline) into which sampled
    values are written; it supplies the fixed values that conditions on unsearched fields read.
    """

    params: list[SearchParam]
    base: dict[str, Any]

    @classmethod
    def build(
        cls,
        sections: list[tuple[str, Mapping[str, Distribution], str]],
        base: dict[str, Any],
    ) -> SweepSpace:
        """Merge ``(prefix, tune section, source file)`` triples and check them against ``base``.

        ``prefix`` is ``""`` for the recipe's own section and ``"space"`` for the space's section.
        Rejects duplicated paths, conditions on fields that do not exist, conditions that can
        never hold, and circular conditions -- each with the file and field of the declaration.
        """
        params: list[SearchParam] = []
        seen: dict[str, SearchParam] = {}
        for prefix, section, source in sections:
            for rel_path, dist in section.items():
                path = f"{prefix}.{rel_path}" if prefix else rel_path
                field_name = f"tune.{rel_path}"
                if dist.when and prefix:
                    # conditions in a space's section are relative to the space too
                    dist = dist.model_copy(update={"when": {f"{prefix}.{k}": v for k, v in dist.when.items()}})
                for other in seen.values():
                    if _related(other.path, path):
                        raise ConfigError(
                            f"'{path}' is searched twice (also as '{other.path}' in {other.source})",
                            file=source,
                            field=field_name,
                            fix="Keep one declaration: the recipe's tune section or the space's",
                        )
                param = _make_param(path, dist, source=source, field=field_name)
                seen[path] = param
                params.append(param)
        space = cls(params=params, base=base)
        space._check_conditions()
        space.params = space._ordered()
        return space

    # ------------------------------------------------------------------ checks and ordering
    def _searched(self, path: str) -> SearchParam | None:
        for param in self.params:
            if _related(param.path, path):
                return param
        return None

    def _check_conditions(self) -> None:
        for param in self.params:
            for cond_path, expected in (param.dist.when or {}).items():
                searched = self._searched(cond_path)
                needle = _contains_needle(expected)
                probe = Distribution(choice=[None], when={cond_path: expected})
                wanted = f"contains {needle!r}" if needle is not _NO_NEEDLE else f"== {expected!r}"
                if searched is None:
                    fixed = get_path(self.base, cond_path, default=_NO_NEEDLE)
                    if fixed is _NO_NEEDLE:
                        raise ConfigError(
                            f"the condition reads '{cond_path}', which is neither searched nor a field of the recipe",
                            file=param.source,
                            field=f"{param.field}.when",
                            fix="Check the spelling of the path (space fields start with 'space.')",
                        )
                    if not probe.is_active(self.base):
                        raise ConfigError(
                            f"the condition '{cond_path} {wanted}' can never hold: '{cond_path}' is not searched and "
                            f"is {format_value(fixed)} in the recipe, so '{param.path}' would never be searched",
                            file=param.source,
                            field=f"{param.field}.when",
                            fix=f"Search '{cond_path}' too, change the condition, or remove it",
                        )
                    continue
                if searched.path != cond_path or searched.dist.kind != "choice":
                    continue  # a condition on part of a searched value, or on a numeric one: checked when sampled
                choices = list(searched.dist.choice or [])
                if not any(probe.is_active(set_path(self.base, cond_path, value)) for value in choices):
                    raise ConfigError(
                        f"the condition '{cond_path} {wanted}' can never hold: '{cond_path}' is searched over "
                        f"{[format_value(v) for v in choices]}",
                        file=param.source,
                        field=f"{param.field}.when",
                        fix="Use one of the searched choices in the condition",
                    )

    def _ordered(self) -> list[SearchParam]:
        """Declaration order, except that a parameter comes after every parameter its condition reads."""
        deps = {
            p.path: [q.path for q in self.params if q is not p and any(_related(q.path, c) for c in p.dist.when or {})]
            for p in self.params
        }
        by_path = {p.path: p for p in self.params}
        ordered: list[SearchParam] = []
        state: dict[str, str] = {}

        def visit(path: str, chain: list[str]) -> None:
            if state.get(path) == "done":
                return
            if state.get(path) == "visiting":
                cycle = " -> ".join([*chain[chain.index(path) :], path])
                param = by_path[path]
                raise ConfigError(
                    f"conditions form a cycle ({cycle}), so none of them can be sampled first",
                    file=param.source,
                    field=f"{param.field}.when",
                )
            state[path] = "visiting"
            for dep in deps[path]:
                visit(dep, [*chain, path])
            state[path] = "done"
            ordered.append(by_path[path])

        for param in self.params:
            visit(param.path, [])
        return ordered

    # ------------------------------------------------------------------ sampling
    def __bool__(self) -> bool:
        return bool(self.params)

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.params]

    def sample(self, trial: Any) -> None:
        """Define-by-run sampling on an Optuna trial (or Ray's wrapper of one).

        Every active parameter is suggested under its dotted path; inactive conditional ones are
        not suggested at all, so Optuna's samplers see a conditional space, not dummy values.
        """
        config = self.base
        for param in self.params:
            if not param.dist.is_active(config):
                continue
            value = param.decode(self._suggest(trial, param))
            config = set_path(config, param.path, value)

    @staticmethod
    def _suggest(trial: Any, param: SearchParam) -> Any:
        dist = param.dist
        if dist.kind == "choice":
            return trial.suggest_categorical(param.path, [param.encode(v) for v in dist.choice or []])
        low, high = dist.bounds
        if dist.kind == "int":
            step = int(dist.step) if dist.step is not None else 1
            return trial.suggest_int(param.path, int(low), int(high), step=step)
        if dist.kind == "loguniform":
            return trial.suggest_float(param.path, float(low), float(high), log=True)
        return trial.suggest_float(param.path, float(low), float(high), step=dist.step)

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna-side parameters (labels for composite choices) -> recipe overrides, in sampling order.

        Unknown names are refused (a config from another sweep must not be half applied).
        """
        known = {p.path: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(
                f"the trial has values for {unknown}, which this sweep does not search",
                fix="Resume a sweep only with the recipe it was started with",
            )
        return {p.path: p.decode(params[p.path]) for p in self.params if p.path in params}

    def encode(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Real values -> Optuna-side parameters (used to enqueue given points)."""
        known = {p.path: p for p in self.params}
        encoded = {}
        for path, value in overrides.items():
            if path not in known:
                raise ConfigError(
                    f"'{path}' is not searched by this sweep (searched: {', '.join(known) or 'nothing'})",
                    field=path,
                )
            encoded[path] = known[path].encode(value)
        return encoded

    def describe(self) -> list[tuple[str, str]]:
        """``(path, human description)`` per parameter, in sampling order."""
        return [(p.path, p.describe()) for p in self.params]

