"""The compiler: K, term names in the reference order, scale selection, budgets and their errors."""

from __future__ import annotations

import itertools
import random

import pytest

import fusionsearch as fs
from fusionsearch.compile import compile_space
from fusionsearch.errors import ConfigError
from fusionsearch.spec import SearchSpace

LOMIX_OPS = ["add", "mul", "awf", "concat"]


def reference_names(scales: list[int], operators: list[str], originals: bool = True) -> list[str]:
    """The LoMix reference order, built directly from itertools.combinations."""
    names = [f"P{s}" for s in scales] if originals else []
    for op in operators:
        for size in range(2, len(scales) + 1):
            for subset in itertools.combinations(scales, size):
                names.append(f"{op}({','.join(map(str, subset))})")
    return names


def test_lomix_at_four_scales_has_48_terms_in_reference_order():
    graph = compile_space(fs.load_space("lomix"), 4, 9, 2)
    assert graph.K == 48
    assert graph.names == reference_names([0, 1, 2, 3], LOMIX_OPS)
    assert graph.names[:6] == ["P0", "P1", "P2", "P3", "add(0,1)", "add(0,2)"]
    assert "mul(0,2,3)" in graph.names and graph.names[-1] == "concat(0,1,2,3)"


def test_lomix_at_five_scales_has_109_terms():
    graph = compile_space("lomix", 5, 9, 3)
    assert graph.K == 109
    assert graph.names == reference_names(list(range(5)), LOMIX_OPS)


@pytest.mark.parametrize("num_scales", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("operators", [["add"], ["mul", "max"], LOMIX_OPS])
def test_k_formula(num_scales, operators):
    space = SearchSpace.from_dict({"operators": operators})
    if num_scales == 1:  # no subset of two scales exists: refused rather than silently empty
        with pytest.raises(ConfigError, match="at least 2 scales"):
            compile_space(space, num_scales, 4, 2)
        return
    graph = compile_space(space, num_scales, 4, 2)
    assert graph.K == num_scales + len(operators) * (2**num_scales - 1 - num_scales)


def test_terms_groups_and_breakdown_agree():
    graph = compile_space("lomix", 4, 9, 2)
    assert graph.breakdown == {"original": {1: 4}, **{op: {2: 6, 3: 4, 4: 1} for op in LOMIX_OPS}}
    for group in graph.groups:
        run = graph.terms[group.start : group.start + group.n_subsets]
        assert [t.operator for t in run] == [group.operator] * group.n_subsets
        assert [t.scales for t in run] == list(group.subsets)
        assert group.index().tolist() == [list(s) for s in group.subsets]
    assert graph.originals == (0, 1, 2, 3) and graph.used_scales == (0, 1, 2, 3)


@pytest.mark.parametrize(
    ("scales", "selected"),
    [("all", [0, 1, 2, 3]), (2, [2, 3]), (3, [1, 2, 3]), ([0, 2, 3], [0, 2, 3]), ([3, 1], [1, 3])],
)
def test_scale_selection(scales, selected):
    graph = compile_space(SearchSpace.from_dict({"scales": scales, "operators": ["add", "mul"]}), 4, 3, 2)
    assert graph.names == reference_names(selected, ["add", "mul"])
    assert graph.used_scales == tuple(selected)


def test_subset_sizes_and_no_originals():
    space = SearchSpace.from_dict(
        {"operators": ["mul"], "subset_sizes": {"min": 3, "max": 3}, "include_originals": False}
    )
    graph = compile_space(space, 4, 3, 2)
    assert graph.names == [f"mul({','.join(map(str, c))})" for c in itertools.combinations(range(4), 3)]
    assert graph.originals == ()


def test_baseline_spaces():
    assert compile_space("last_layer", 4, 9, 2).names == ["P3"]
    assert compile_space("last_layer", 4, 9, 2).used_scales == (3,)
    assert compile_space("deep_supervision", 4, 9, 2).names == ["P0", "P1", "P2", "P3"]
    assert compile_space("nnunet", 5, 9, 3).names == ["P0", "P1", "P2", "P3", "P4"]
    assert compile_space("powerset_add", 4, 9, 2).names == reference_names([0, 1, 2, 3], ["add"])


def test_six_scales_refused_without_budget():
    with pytest.raises(ConfigError) as info:
        compile_space("lomix", 6, 9, 2)
    assert info.value.field == "budget" and "lomix" in info.value.file
    assert "57 fused subsets" in str(info.value) and "max_terms" in str(info.value)


def test_six_scales_without_operators_need_no_budget():
    assert compile_space("deep_supervision", 6, 9, 2).K == 6


def test_six_scales_with_prune_budget_keeps_smallest_subsets():
    space = SearchSpace.from_dict({"operators": LOMIX_OPS, "budget": {"max_terms": 100, "strategy": "prune"}})
    graph = compile_space(space, 6, 9, 2)
    room = (100 - 6) // 4  # subsets per operator
    kept = [c for k in range(2, 7) for c in itertools.combinations(range(6), k)][:room]
    assert graph.K == 6 + 4 * room <= 100
    assert graph.names == [f"P{s}" for s in range(6)] + [
        f"{op}({','.join(map(str, c))})" for op in LOMIX_OPS for c in kept
    ]


def test_six_scales_with_sample_budget_is_seeded():
    def compiled(seed):
        space = SearchSpace.from_dict(
            {"operators": ["add", "mul"], "budget": {"max_terms": 30, "strategy": "sample", "seed": seed}}
        )
        return compile_space(space, 6, 9, 2)

    graph = compiled(3)
    all_subsets = [c for k in range(2, 7) for c in itertools.combinations(range(6), k)]
    expected = [all_subsets[i] for i in sorted(random.Random(3).sample(range(len(all_subsets)), (30 - 6) // 2))]
    assert graph.K == 30
    assert [t.scales for t in graph.terms if t.operator == "add"] == expected
    assert [t.scales for t in graph.terms if t.operator == "mul"] == expected
    assert compiled(3).names == graph.names and compiled(4).names != graph.names


def test_budget_larger_than_k_changes_nothing():
    space = SearchSpace.from_dict({"operators": LOMIX_OPS, "budget": {"max_terms": 1000}})
    assert compile_space(space, 4, 9, 2).names == reference_names([0, 1, 2, 3], LOMIX_OPS)


@pytest.mark.parametrize(
    ("data", "num_scales", "field", "message"),
    [
        ({"operators": ["add"], "budget": {"max_terms": 6}}, 6, "budget.max_terms", "no room for fused terms"),
        ({"operators": [], "budget": {"max_terms": 3}}, 4, "budget.max_terms", "4 originals"),
        ({"scales": 5, "operators": []}, 4, "scales", "only 4"),
        ({"scales": [0, 4]}, 4, "scales", "do not exist"),
        ({"operators": ["add"], "subset_sizes": {"min": 4}, "scales": 3}, 4, "subset_sizes", "at least 4 scales"),
    ],
)
def test_compile_errors_name_the_field(data, num_scales, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        compile_space(SearchSpace.from_dict(data, source="space.yaml"), num_scales, 3, 2)
    assert info.value.field == field and info.value.file == "space.yaml"


@pytest.mark.parametrize(("num_classes", "dims"), [(1, 2), (3, 4), (3, 1)])
def test_bad_model_shape(num_classes, dims):
    with pytest.raises(ConfigError):
        compile_space("lomix", 4, num_classes, dims)
