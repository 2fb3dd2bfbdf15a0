"""The declarative tune distributions as an Optuna define-by-run space: bounds, kinds, conditions, errors."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from fusionsearch.errors import ConfigError
from fusionsearch.sweeps.space import SweepSpace, format_value
from fusionsearch.tune_spec import parse_tune_section

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE = {
    "optim": {"lr": 1e-4, "weight_decay": 1e-4},
    "epochs": 3,
    "space": {
        "operators": ["add", "mul"],
        "loss": {"ce": 0.3, "dice": 0.7},
        "weighting": {"kind": "softplus"},
    },
}


def build(recipe_tune=None, space_tune=None, base=BASE):
    sections = [("", parse_tune_section(recipe_tune or {}, source="recipe.yaml"), "recipe.yaml")]
    if space_tune is not None:
        sections.append(("space", parse_tune_section(space_tune, source="space.yaml"), "space.yaml"))
    return SweepSpace.build(sections, base)


def sample_many(space, n=40, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    trials = []
    for _ in range(n):
        trial = study.ask()
        space.sample(trial)
        study.tell(trial, 0.0)
        trials.append(trial)
    return trials


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"uniform": [0.1, 0.9]}, FloatDistribution(0.1, 0.9)),
        ({"uniform": [0.0, 1.0], "step": 0.25}, FloatDistribution(0.0, 1.0, step=0.25)),
        ({"loguniform": [1e-5, 1e-3]}, FloatDistribution(1e-5, 1e-3, log=True)),
        ({"int": [2, 6]}, IntDistribution(2, 6)),
        ({"int": [2, 8], "step": 2}, IntDistribution(2, 8, step=2)),
        ({"choice": ["softplus", "uncertainty"]}, CategoricalDistribution(["softplus", "uncertainty"])),
    ],
)
def test_each_kind_becomes_the_matching_optuna_distribution(spec, expected):
    space = build({"optim.lr": spec})
    for trial in sample_many(space, n=25):
        assert trial.distributions["optim.lr"] == expected
        value = trial.params["optim.lr"]
        if isinstance(expected, CategoricalDistribution):
            assert value in expected.choices
        else:
            assert expected.low <= value <= expected.high
            if expected.step:
                ratio = (value - expected.low) / expected.step
                assert math.isclose(ratio, round(ratio), abs_tol=1e-9)


def test_loguniform_samples_spread_over_decades():
    space = build({"optim.lr": {"loguniform": [1e-6, 1e-2]}})
    values = [t.params["optim.lr"] for t in sample_many(space, n=60)]
    decades = {math.floor(math.log10(v)) for v in values}
    assert len(decades) >= 3  # a linear sampler on [1e-6, 1e-2] would almost never go below 1e-4


def test_composite_choices_are_labelled_and_decoded():
    options = [["add", "mul"], ["add", "mul", "awf", "concat"], [{"name": "concat", "share": "size"}]]
    space = build(space_tune={"operators": {"choice": options}})
    (param,) = space.params
    assert param.path == "space.operators"
    labels = [format_value(v) for v in options]
    assert labels == ["[add, mul]", "[add, mul, awf, concat]", "[{name: concat, share: size}]"]
    seen = set()
    for trial in sample_many(space, n=30):
        assert trial.params["space.operators"] in labels
        decoded = space.decode(trial.params)["space.operators"]
        assert decoded == options[labels.index(trial.params["space.operators"])]
        seen.add(trial.params["space.operators"])
    assert seen == set(labels)
    assert space.encode({"space.operators": options[1]}) == {"space.operators": labels[1]}


@pytest.mark.parametrize(
    ("condition", "active_when"),
    [
        ({"space.weighting.kind": "uncertainty"}, lambda p: p["space.weighting.kind"] == "uncertainty"),
        ({"space.operators": {"contains": "awf"}}, lambda p: "awf" in p["space.operators"]),
    ],
)
def test_conditional_parameter_is_sampled_only_when_its_condition_holds(condition, active_when):
    tune = {
        # declared before what it depends on: the space must reorder
        "optim.lr": {"loguniform": [1e-5, 1e-3], "when": condition},
        "space.weighting.kind": {"choice": ["softplus", "uncertainty"]},
        "space.operators": {"choice": [["add", "mul"], ["add", "awf"], ["awf", "concat"]]},
    }
    space = build(tune)
    assert space.paths.index("optim.lr") > space.paths.index(next(iter(condition)))
    active = inactive = 0
    for trial in sample_many(space, n=40):
        decoded = space.decode(trial.params)
        should = active_when(decoded)
        assert ("optim.lr" in trial.params) == should
        active += should
        inactive += not should
    assert active and inactive


def test_condition_on_an_unsearched_field_reads_the_recipe():
    on = build({"optim.lr": {"uniform": [0.1, 0.2], "when": {"space.weighting.kind": "softplus"}}})
    assert all("optim.lr" in t.params for t in sample_many(on, n=5))
    with pytest.raises(ConfigError, match="is softplus in the recipe") as info:
        build({"optim.lr": {"uniform": [0.1, 0.2], "when": {"space.weighting.kind": "uncertainty"}}})
    assert info.value.field == "tune.optim.lr.when"


def test_space_section_conditions_are_relative_to_the_space():
    space = build(
        space_tune={
            "awf_share": {"choice": ["size", "subset"], "when": {"operators": {"contains": "awf"}}},
            "operators": {"choice": [["add"], ["add", "awf"]]},
        },
        base={**BASE, "space": {**BASE["space"], "awf_share": "size"}},
    )
    assert space.paths == ["space.operators", "space.awf_share"]
    for trial in sample_many(space, n=20):
        has_awf = "awf" in space.decode(trial.params)["space.operators"]
        assert ("space.awf_share" in trial.params) == has_awf


@pytest.mark.parametrize(
    ("recipe_tune", "space_tune", "field", "words"),
    [
        ({"optim.lr": {"uniform": [0.1, 0.2], "when": {"optim.typo": 1}}}, None, "tune.optim.lr.when", "neither"),
        (
            {
                "optim.lr": {"uniform": [0.1, 0.2], "when": {"space.weighting.kind": "nope"}},
                "space.weighting.kind": {"choice": ["softplus", "uncertainty"]},
            },
            None,
            "tune.optim.lr.when",
            "never hold",
        ),
        (
            {
                "optim.lr": {"uniform": [0.1, 0.2], "when": {"space.operators": {"contains": "awf"}}},
                "space.operators": {"choice": [["add"], ["mul"]]},
            },
            None,
            "tune.optim.lr.when",
            "never hold",
        ),
        (
            {
                "optim.lr": {"uniform": [0.1, 0.2], "when": {"epochs": 2}},
                "epochs": {"choice": [2, 3], "when": {"optim.lr": 0.1}},
            },
            None,
            "when",
            "cycle",
        ),
        ({"space.loss.ce": {"uniform": [0.1, 0.2]}}, {"loss.ce": {"uniform": [0.2, 0.3]}}, "tune.loss.ce", "twice"),
        ({"space.loss": {"choice": [{"ce": 1.0}]}, "space.loss.ce": {"uniform": [0, 1]}}, None, "tune.", "twice"),
        ({"optim.lr": {"loguniform": [1e-5, 1e-3], "step": 1e-5}}, None, "tune.optim.lr", "step"),
        ({"epochs": {"int": [1, 5], "step": 0.5}}, None, "tune.epochs", "whole step"),
        ({"epochs": {"choice": [1, 2, 1]}}, None, "tune.epochs", "more than once"),
    ],
)
def test_invalid_spaces_are_rejected_with_the_field(recipe_tune, space_tune, field, words):
    with pytest.raises(ConfigError) as info:
        build(recipe_tune, space_tune)
    assert field in (info.value.field or "")
    assert words in str(info.value)


def test_decode_refuses_parameters_the_sweep_does_not_search():
    space = build({"optim.lr": {"uniform": [0.1, 0.2]}})
    with pytest.raises(ConfigError, match="does not search"):
        space.decode({"optim.lr": 0.15, "epochs": 3})
    with pytest.raises(ConfigError, match="not searched"):
        space.encode({"epochs": 3})


def test_define_by_run_space_works_inside_ray_optuna_search():
    from ray.tune.search.optuna import OptunaSearch

    space = build(
        {
            "space.operators": {"choice": [["add", "mul"], ["add", "awf"]]},
            "optim.lr": {"loguniform": [1e-5, 1e-3], "when": {"space.operators": {"contains": "awf"}}},
        }
    )
    searcher = OptunaSearch(space=space.sample, metric="val_dice", mode="max", seed=3)
    for index in range(12):
        config = searcher.suggest(f"t{index}")
        decoded = space.decode(config)
        assert ("optim.lr" in config) == ("awf" in decoded["space.operators"])
        searcher.on_trial_complete(f"t{index}", {"val_dice": float(index), "training_iteration": 1})
