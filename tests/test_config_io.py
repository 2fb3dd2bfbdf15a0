"""Safe YAML reading, dotted-path overrides and declarative tune distributions."""

from __future__ import annotations

import pytest

from fusionsearch.config_io import load_yaml_file, parse_yaml_text
from fusionsearch.errors import ConfigError
from fusionsearch.overrides import apply_overrides, get_path, parse_set_arguments, set_path
from fusionsearch.tune_spec import parse_tune_section


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: [1, 2\nb: 3\n", "malformed YAML at line"),
        ("- 1\n- 2\n", "top level must be a mapping"),
        ("a: !!python/object:os.system ls\n", "malformed YAML"),
    ],
)
def test_bad_yaml_is_located(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_yaml_file(path)
    assert str(path) in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml_file(tmp_path / "nope.yaml")


def test_empty_yaml_is_an_empty_mapping():
    assert parse_yaml_text("", source="x") == {}


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("a.b", 1, {"a": {"b": 1}, "l": [1, 2]}),
        ("a.c.d", "x", {"a": {"b": 0, "c": {"d": "x"}}, "l": [1, 2]}),
        ("l.1", 5, {"a": {"b": 0}, "l": [1, 5]}),
        ("new", [1], {"a": {"b": 0}, "l": [1, 2], "new": [1]}),
    ],
)
def test_set_path_copies_and_sets(path, value, expected):
    base = {"a": {"b": 0}, "l": [1, 2]}
    result = set_path(base, path, value)
    assert result == expected
    assert base == {"a": {"b": 0}, "l": [1, 2]}  # untouched
    assert get_path(result, path) == value


def test_list_index_out_of_range_is_an_error():
    with pytest.raises(ConfigError, match="out of range"):
        set_path({"l": [1]}, "l.3", 0)


def test_parse_set_arguments_reads_yaml_values():
    parsed = parse_set_arguments(["optim.lr=0.0003", "space.operators=[add, mul]", "amp=true", "name=run 1"])
    assert parsed == {"optim.lr": 0.0003, "space.operators": ["add", "mul"], "amp": True, "name": "run 1"}
    assert apply_overrides({"optim": {"lr": 1}}, {"optim.lr": 2}) == {"optim": {"lr": 2}}


def test_parse_set_arguments_requires_equals():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set_arguments(["optim.lr"])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"uniform": [0.9, 0.1]}, "greater than high"),
        ({"loguniform": [0.0, 1.0]}, "low > 0"),
        ({"uniform": [0.1, 0.9], "choice": [1]}, "exactly one"),
        ({}, "exactly one"),
        ({"choice": []}, "at least one"),
        ({"normal": [0, 1]}, "not a known field"),
    ],
)
def test_bad_distributions_name_the_path(spec, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_tune_section({"loss.ce": spec}, source="r.yaml")
    assert "tune.loss.ce" in str(info.value) and "r.yaml" in str(info.value)


def test_conditions_follow_the_config():
    tune = parse_tune_section(
        {
            "share": {"choice": ["size", "subset"], "when": {"operators": {"contains": "awf"}}},
            "init": {"uniform": [-1, 1], "when": {"weighting.kind": "softplus"}},
        },
        source="x",
    )
    with_awf = {"operators": ["add", {"name": "awf"}], "weighting": {"kind": "uniform"}}
    assert tune["share"].is_active(with_awf)
    assert not tune["share"].is_active({"operators": ["add"]})
    assert not tune["init"].is_active(with_awf)
    assert tune["init"].is_active({"weighting": {"kind": "softplus"}})
    assert tune["init"].candidate_values() == [-1, 1]
    assert tune["share"].candidate_values() == ["size", "subset"]
