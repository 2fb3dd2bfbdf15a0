"""Compile a search space for a model into the graph of K named terms, in the reference order.

Order (the LoMix reference's): the originals ``P0..P{L-1}`` first (when included), then for each
operator in the order the space lists them, every subset of size 2..L in ``itertools.combinations``
order. K = L + |ops| * (2^L - 1 - L) when every scale and size is used: 48 at L=4 with 4 operators,
109 at L=5. Beyond five scales a term budget is required; it then keeps the same subsets for every
operator, chosen by pruning (smallest subsets first) or seeded sampling.

The graph also groups the fused terms by (operator, subset size): the mixer gathers each group
with one index op and calls its operator once.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusionsearch.errors import ConfigError
from fusionsearch.spec import BUDGET_FIX, MAX_SCALES_WITHOUT_BUDGET, SearchSpace, load_space, too_many_scales_message
from fusionsearch.terms import Term, fused_name, original_name

SUPPORTED_SPATIAL_DIMS = (2, 3)


@dataclass(frozen=True)
class TermGroup:
    """All fused terms of one operator and one subset size: a contiguous run of the term list."""

    operator: str
    options: dict[str, Any]
    size: int
    subsets: tuple[tuple[int, ...], ...]
    start: int
    """Position of the group's first term in the term list."""

    @property
    def n_subsets(self) -> int:
        return len(self.subsets)

    def index(self) -> torch.Tensor:
        """Scale indices of the members, LongTensor [n_subsets, size]."""
        return torch.tensor(self.subsets, dtype=torch.long).view(self.n_subsets, self.size)


@dataclass(frozen=True)
class Graph:
    """The compiled terms of a space for (num_scales, num_classes, spatial_dims)."""

    terms: list[Term]
    num_scales: int
    num_classes: int
    spatial_dims: int
    originals: tuple[int, ...]
    """Scales supervised as originals, in term order (the first ``len(originals)`` terms)."""
    groups: tuple[TermGroup, ...]

    @property
    def K(self) -> int:  # noqa: N802  (the paper's symbol)
        return len(self.terms)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    @property
    def used_scales(self) -> tuple[int, ...]:
        """Scales read by at least one term, ascending (the mixer never touches the others)."""
        used = set(self.originals)
        for group in self.groups:
            used.update(s for subset in group.subsets for s in subset)
        return tuple(sorted(used))

    @property
    def breakdown(self) -> dict[str, dict[int, int]]:
        """Term counts by operator and subset size; the originals are listed as ``original`` (size 1)."""
        table: dict[str, dict[int, int]] = {}
        if self.originals:
            table["original"] = {1: len(self.originals)}
        for group in self.groups:
            table.setdefault(group.operator, {})[group.size] = group.n_subsets
        return table


def compile_space(space: SearchSpace | str | Path, num_scales: int, num_classes: int, spatial_dims: int = 2) -> Graph:
    """Build the term graph of ``space`` (a SearchSpace, bundled name or YAML path) for ``num_scales`` outputs."""
    space = load_space(space)
    source = space.source
    _check_dimensions(num_scales, num_classes, spatial_dims, source)
    selected = _selected_scales(space, num_scales)
    originals = tuple(selected) if space.include_originals else ()
    subsets = _eligible_subsets(space, selected)
    if space.operators and len(selected) > MAX_SCALES_WITHOUT_BUDGET and space.budget is None:
        raise ConfigError(
            f"the model has {num_scales} scales and the space mixes {len(selected)} of them; "
            + too_many_scales_message(len(selected)),
            file=source,
            field="budget",
            fix=BUDGET_FIX,
        )
    if space.budget is not None:
        subsets = _apply_budget(space, subsets, len(originals))

    terms = [Term(original_name(s), None, (s,)) for s in originals]
    groups = []
    for op in space.operators:
        for size, members in itertools.groupby(subsets, key=len):
            members = tuple(members)
            groups.append(TermGroup(op.name, dict(op.options), size, members, start=len(terms)))
            terms.extend(Term(fused_name(op.name, m), op.name, m) for m in members)
    return Graph(terms, num_scales, num_classes, spatial_dims, originals, tuple(groups))


def _check_dimensions(num_scales: int, num_classes: int, spatial_dims: int, source: str) -> None:
    if not isinstance(num_scales, int) or num_scales < 1:
        raise ConfigError(f"the number of scales must be a positive integer, got {num_scales!r}", file=source)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(
            f"the number of classes must be an integer >= 2 (background included), got {num_classes!r}", file=source
        )
    if spatial_dims not in SUPPORTED_SPATIAL_DIMS:
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}", file=source)


def _selected_scales(space: SearchSpace, num_scales: int) -> list[int]:
    scales = space.scales
    if scales == "all":
        return list(range(num_scales))
    if isinstance(scales, int):
        if scales > num_scales:
            raise ConfigError(
                f"asks for the {scales} finest scales but the model has only {num_scales}",
                file=space.source,
                field="scales",
                fix=f"Use a count of at most {num_scales}, or 'all'",
            )
        return list(range(num_scales - scales, num_scales))
    out_of_range = [s for s in scales if s >= num_scales]
    if out_of_range:
        raise ConfigError(
            f"scale indices {out_of_range} do not exist: the model has {num_scales} scales (0..{num_scales - 1})",
            file=space.source,
            field="scales",
        )
    return list(scales)


def _eligible_subsets(space: SearchSpace, selected: list[int]) -> list[tuple[int, ...]]:
    """All subsets within the size range, by size then in combinations order."""
    if not space.operators:
        return []
    sizes = space.subset_sizes
    low = sizes.min if sizes else 2
    high = min(sizes.max or len(selected), len(selected)) if sizes else len(selected)
    if low > len(selected):
        raise ConfigError(
            f"fused subsets need at least {low} scales but only {len(selected)} are selected ({selected}), "
            f"so the operators {[op.name for op in space.operators]} would build no terms",
            file=space.source,
            field="subset_sizes" if sizes else "scales",
            fix="Select more scales (or use a model with more outputs), lower subset_sizes.min, or use a space "
            "without operators such as deep_supervision",
        )
    return [subset for size in range(low, high + 1) for subset in itertools.combinations(selected, size)]


def _apply_budget(space: SearchSpace, subsets: list[tuple[int, ...]], n_originals: int) -> list[tuple[int, ...]]:
    """Keep at most ``(max_terms - originals) // |ops|`` subsets, the same for every operator."""
    budget = space.budget
    assert budget is not None
    n_ops = len(space.operators)
    if n_originals + n_ops * len(subsets) <= budget.max_terms:
        return subsets
    room = (budget.max_terms - n_originals) // n_ops if n_ops else 0
    if room < 1:
        raise ConfigError(
            f"max_terms={budget.max_terms} leaves no room for fused terms ({n_originals} originals + at least "
            f"one subset for each of {n_ops} operators = {n_originals + n_ops} terms)",
            file=space.source,
            field="budget.max_terms",
            fix=f"Raise max_terms to at least {n_originals + n_ops}, or select fewer scales",
        )
    if budget.strategy == "prune":
        return subsets[:room]
    chosen = sorted(random.Random(budget.seed).sample(range(len(subsets)), room))
    return [subsets[i] for i in chosen]
