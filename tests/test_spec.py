"""Search-space validation: bundled spaces, YAML forms, plugins, tune sections and located errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import fusionsearch as fs
from fusionsearch.config_io import bundled_names
from fusionsearch.errors import ConfigError, UnknownNameError
from fusionsearch.spec import SearchSpace, load_space

PLUGINS = Path(__file__).parent / "plugins"
BUNDLED = ["deep_supervision", "last_layer", "lomix", "nnunet", "powerset_add"]


def write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_spaces_load_and_round_trip(name):
    assert name in bundled_names("space")
    space = load_space(name)
    assert space.description.strip()
    assert space.source == f"<bundled space '{name}'>"
    again = SearchSpace.from_dict(yaml.safe_load(yaml.safe_dump(space.to_dict())))
    assert again.model_dump() == space.model_dump() and again.to_dict() == space.to_dict()


def test_lomix_is_the_reference_configuration():
    space = load_space("lomix")
    assert [op.name for op in space.operators] == ["add", "mul", "awf", "concat"]
    assert space.include_originals and space.scales == "all" and space.budget is None
    assert space.weighting.kind == "softplus"
    assert (space.loss.ce, space.loss.dice, space.loss.dice_kind) == (0.3, 0.7, "reference")
    assert {"loss.ce", "operators", "weighting.kind"} <= set(space.tune)
    assert space.tune["weighting.init"].when == {"weighting.kind": "softplus"}


def test_baseline_spaces_weightings():
    assert load_space("deep_supervision").weighting.kind == "uniform"
    assert load_space("nnunet").weighting.kind == "halving"
    assert load_space("powerset_add").weighting.kind == "uniform"
    assert [op.name for op in load_space("powerset_add").operators] == ["add"]
    last = load_space("last_layer")
    assert last.scales == 1 and last.operators == []


@pytest.mark.parametrize(
    "entry",
    [
        "concat",
        {"name": "concat"},
        {"name": "concat", "share": "size"},
        {"name": "concat", "options": {"share": "size"}},
    ],
)
def test_operator_yaml_forms(entry):
    space = SearchSpace.from_dict({"operators": [entry]})
    op = space.operators[0]
    assert op.name == "concat"
    assert op.options == ({} if entry in ("concat", {"name": "concat"}) else {"share": "size"})
    assert space.to_dict()["operators"] == ["concat" if not op.options else {"name": "concat", "share": "size"}]


def test_space_from_yaml_file_with_plugin():
    space = load_space(PLUGINS / "gated_space.yaml")
    assert [op.name for op in space.operators] == ["add", "gated_sum"]
    assert space.operators[1].options == {"scale": 0.5}
    assert "gated_sum" in fs.list_operators()


def test_plugin_option_checked_after_import():
    with pytest.raises(ConfigError) as info:
        load_space(PLUGINS / "bad_plugin_option.yaml")
    assert info.value.field == "operators.0"
    assert "has no option 'scael' (its options: scale)" in str(info.value)


def test_missing_plugin_file(tmp_path):
    path = write_space(tmp_path, "plugins: [nowhere.py]\noperators: [add]\n")
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_space(path)
    assert info.value.field == "plugins[0]" and info.value.file == str(path)


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("operators: [add, mull]\n", "operators.1", "Unknown operator 'mull'. Did you mean 'mul'?"),
        ("operators: [{name: awf, share: all}]\n", "operators.0", "Input should be 'size' or 'subset'"),
        ("operators: [{name: concat, shared: size}]\n", "operators.0", "has no option 'shared'"),
        ("operators: [{share: size}]\n", "operators.0", "needs a 'name'"),
        ("operator: [add]\n", "operator", "Did you mean 'operators'?"),
        ("loss: {ce: 0.3, dcie: 0.7}\n", "loss.dcie", "Valid fields here: ce, dice, dice_kind, fused"),
        ("budget: {max_terms: 10, strategy: greedy}\noperators: [add]\n", "budget.strategy", "'sample' or 'prune'"),
        ("include_originals: maybe\n", "include_originals", "valid boolean"),
        ("loss: {ce: lots}\n", "loss.ce", "valid number"),
        ("scales: [0, 0, 1]\n", "scales", "must not repeat"),
        ("scales: 0\n", "scales", ">= 1"),
        ("scales: most\n", "scales", "expected 'all'"),
        ("subset_sizes: {min: 3, max: 2}\noperators: [add]\n", "subset_sizes", "smaller than min"),
        ("subset_sizes: {min: 1}\noperators: [add]\n", "subset_sizes.min", "greater than or equal to 2"),
        ("operators: [add, add]\n", "operators", "listed twice"),
        ("operators: []\ninclude_originals: false\n", "operators", "no terms"),
        ("operators: []\nsubset_sizes: {min: 2}\n", "operators", "operator list is empty"),
        ("scales: 6\noperators: [add]\n", "scales", "only allowed with a term budget"),
        ("weighting: {kind: softplsu}\n", "weighting.kind", "Did you mean 'softplus'?"),
        ("tune: {loss.cee: {uniform: [0.1, 0.9]}}\n", "tune.loss.cee", "not accepted"),
        ("tune: {operators: {choice: [[add], [add, pow]]}}\n", "tune.operators", "Unknown operator 'pow'"),
        ("tune: {loss.ce: {uniform: [0.9, 0.1]}}\n", "tune.loss.ce", "greater than high"),
    ],
)
def test_invalid_spaces_name_file_and_field(tmp_path, text, field, message):
    path = write_space(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    assert info.value.file == str(path)
    assert info.value.field == field
    assert message in str(info.value)


def test_malformed_yaml_names_the_line(tmp_path):
    path = write_space(tmp_path, "operators: [add, mul\nweighting: {kind: softplus}\n")
    with pytest.raises(ConfigError, match="malformed YAML at line") as info:
        load_space(path)
    assert info.value.file == str(path)


def test_unknown_bundled_space():
    with pytest.raises(UnknownNameError, match="Did you mean 'lomix'"):
        load_space("lomx")


def test_tune_section_is_validated_in_context():
    # the conditional entry is checked with its condition made true, and a valid section loads
    data = {
        "operators": ["add", "awf"],
        "weighting": {"kind": "uncertainty"},
        "tune": {
            "weighting.kind": {"choice": ["softplus", "uncertainty"]},
            "weighting.init": {"uniform": [-1.0, 1.0], "when": {"weighting.kind": "softplus"}},
            "operators": {"choice": [["add"], ["add", {"name": "awf", "share": "subset"}]]},
        },
    }
    space = SearchSpace.from_dict(data)
    assert space.tune["operators"].choice[1][1] == {"name": "awf", "share": "subset"}
    bad = {
        **data,
        "tune": {**data["tune"], "weighting.values": {"choice": [[1.0]], "when": {"weighting.kind": "softplus"}}},
    }
    with pytest.raises(ConfigError, match="does not apply to weighting kind 'softplus'") as info:
        SearchSpace.from_dict(bad, source="x.yaml")
    assert info.value.field == "tune.weighting.values"
