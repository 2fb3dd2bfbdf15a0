"""Recipes: bundled ones validate, overrides (also into named spaces), located errors, round trips."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import yaml

import fusionsearch as fs
from fusionsearch.cli import main
from fusionsearch.config_io import bundled_names
from fusionsearch.errors import ConfigError
from fusionsearch.recipe import Recipe, load_recipe

EXPECTED_BUNDLED = {
    "demo",
    "lomix_synapse",
    "lomix_acdc",
    "ll_synapse",
    "ds_synapse",
    "powerset_synapse",
    "lomix_synapse_5pct",
}


def _bundled_yaml(kind_package: str, name: str) -> dict:
    text = importlib.resources.files(kind_package).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def test_every_expected_recipe_is_bundled() -> None:
    assert EXPECTED_BUNDLED <= set(bundled_names("recipe"))


@pytest.mark.parametrize("name", sorted(EXPECTED_BUNDLED))
def test_bundled_recipe_validates_and_round_trips(name: str) -> None:
    recipe = load_recipe(name)
    raw = _bundled_yaml("fusionsearch.recipes", name)
    # the values written in the file are the values validated
    assert recipe.model.name == raw["model"]["name"]
    assert recipe.space == raw["space"]
    assert recipe.batch_size == raw["batch_size"]
    assert recipe.seed == raw["seed"]
    assert recipe.epochs == raw["epochs"]
    assert recipe.optim.lr == pytest.approx(raw["optim"]["lr"])
    # to_dict -> from_dict and to_yaml -> safe_load -> from_dict give the same recipe
    again = Recipe.from_dict(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()
    from_yaml = Recipe.from_dict(yaml.safe_load(recipe.to_yaml()))
    assert from_yaml.to_dict() == recipe.to_dict()


@pytest.mark.parametrize(
    ("name", "model", "space", "batch", "epochs", "fraction"),
    [
        ("lomix_synapse", "pvt_emcad", "lomix", 6, 300, 1.0),
        ("lomix_acdc", "pvt_emcad", "lomix", 12, 150, 1.0),
        ("ll_synapse", "pvt_emcad", "last_layer", 6, 300, 1.0),
        ("ds_synapse", "pvt_emcad", "deep_supervision", 6, 300, 1.0),
        ("powerset_synapse", "pvt_emcad", "powerset_add", 6, 300, 1.0),
        ("lomix_synapse_5pct", "pvt_emcad", "lomix", 6, 300, 0.05),
        ("demo", "small_unet", "lomix", 4, 8, 1.0),
    ],
)
def test_bundled_recipes_carry_the_paper_settings(name, model, space, batch, epochs, fraction) -> None:
    recipe = load_recipe(name)
    assert (recipe.model.name, recipe.space, recipe.batch_size, recipe.epochs) == (model, space, batch, epochs)
    assert recipe.data.fraction == fraction
    if name != "demo":
        assert recipe.seed == 2222
        assert (recipe.optim.lr, recipe.optim.weight_decay, recipe.schedule.kind) == (1e-4, 1e-4, "constant")
        assert recipe.data.size == 224 and recipe.data.root is None


def test_override_of_a_plain_field() -> None:
    recipe = load_recipe("lomix_synapse", overrides={"optim.lr": 3e-4, "batch_size": 2})
    assert recipe.optim.lr == 3e-4
    assert recipe.batch_size == 2
    assert recipe.space == "lomix"  # untouched: stays a name


def test_override_into_a_named_space_inlines_it() -> None:
    recipe = load_recipe("lomix_synapse", overrides={"space.loss.ce": 0.5})
    bundled_space = _bundled_yaml("fusionsearch.search_spaces", "lomix")
    assert isinstance(recipe.space, dict)
    expected = dict(bundled_space)
    expected["loss"] = {**bundled_space["loss"], "ce": 0.5}
    assert recipe.space == expected
    assert recipe.search_space().loss.ce == 0.5
    assert recipe.search_space().loss.dice == bundled_space["loss"]["dice"]
    assert [op.name for op in recipe.search_space().operators] == bundled_space["operators"]


def test_with_overrides_matches_load_with_overrides() -> None:
    direct = load_recipe("demo", overrides={"space.weighting.kind": "uncertainty", "epochs": 3})
    later = load_recipe("demo").with_overrides({"space.weighting.kind": "uncertainty", "epochs": 3})
    assert direct.to_dict() == later.to_dict()
    assert later.search_space().weighting.kind == "uncertainty"


def test_replacing_the_space_by_name() -> None:
    recipe = load_recipe("demo", overrides={"space": "last_layer"})
    assert recipe.space == "last_layer"
    assert recipe.search_space().operators == []


@pytest.mark.parametrize(
    ("key", "level", "valid"),
    [
        ("optim.lrr", "optim", {"name", "lr", "weight_decay", "betas", "eps", "grad_clip", "loss_weights"}),
        ("data.rooot", "data", {"name", "root", "size", "labels", "val_fraction", "fraction", "seed", "split_seed",
                                "augment", "options"}),
        ("evaluation.heads", "evaluation", {"head", "protocol", "size", "every", "test", "mixture_top_k",
                                            "batch_size", "roi_size", "overlays"}),
        ("optim.loss_weights.lrr", "optim.loss_weights", {"lr", "weight_decay"}),
        ("epoch", "the top level", {"name", "description", "plugins", "data", "model", "space", "optim", "schedule",
                                    "epochs", "iterations", "batch_size", "seed", "num_workers", "amp", "device",
                                    "deterministic", "evaluation", "output_dir", "tune"}),
    ],
)
def test_wrong_key_lists_the_valid_keys_at_that_level(key: str, level: str, valid: set[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe("demo", overrides={key: 1})
    error = info.value
    assert error.field == key
    assert f"Valid keys under {level}:" in str(error)
    listed = str(error).split(f"Valid keys under {level}:")[1].rstrip(".").split(",")
    assert {item.strip() for item in listed} == valid


def test_wrong_key_inside_a_named_space_names_the_space_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe("demo", overrides={"space.loss.cee": 0.5})
    assert info.value.field == "space.loss.cee"
    assert "ce" in str(info.value) and "dice" in str(info.value)


def test_wrong_model_option_lists_the_model_options() -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe("demo", overrides={"model.options.base_chanels": 4})
    assert info.value.field == "model.options.base_chanels"
    assert "base_channels" in str(info.value) and "depth" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "field", "fragment"),
    [
        ("space", "no_such_space", "space", "Unknown space 'no_such_space'"),
        ("model.name", "no_such_model", "model.name", "Unknown model 'no_such_model'"),
        ("data.name", "no_such_data", "data.name", "Unknown dataset 'no_such_data'"),
        ("space.operators", ["add", "no_such_op"], "space", "no_such_op"),
        ("optim.lr", -1.0, "optim.lr", "greater than 0"),
        ("amp", "fp8", "amp", "fp8"),
        ("device", "tpu", "device", "tpu"),
    ],
)
def test_bad_names_and_values_are_located(key, value, field, fragment) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe("demo", overrides={key: value})
    assert info.value.field is not None and info.value.field.startswith(field)
    assert fragment in str(info.value)
    assert "demo" in str(info.value)  # the file (bundled recipe) is named


def test_epochs_and_iterations_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="either 'epochs' or 'iterations'"):
        load_recipe("demo", overrides={"iterations": 10})
    recipe = load_recipe("demo", overrides={"epochs": None, "iterations": 10})
    assert recipe.iterations == 10 and recipe.epochs is None
    assert recipe.max_iterations(4) == 10 and recipe.num_epochs(4) == 3


def test_recipe_file_relative_paths_and_name(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "mine.yaml"
    path.write_text("data: {name: synapse, root: ../data}\nmodel: {name: small_unet}\nspace: last_layer\n")
    recipe = load_recipe(path)
    assert recipe.name == "mine"
    assert Path(recipe.data.root) == data.resolve()
    assert recipe.epochs == 1 and recipe.optim.lr == 1e-4 and recipe.optim.weight_decay == 1e-4


def test_space_given_as_a_relative_path(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text("scales: all\noperators: [add]\nweighting: {kind: uniform}\n")
    (tmp_path / "recipe.yaml").write_text("model: {name: small_unet}\nspace: space.yaml\n")
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert Path(recipe.space) == (tmp_path / "space.yaml").resolve()
    assert [op.name for op in recipe.search_space().operators] == ["add"]
    # overriding into a space given by path inlines that file's mapping
    tuned = recipe.with_overrides({"space.loss.ce": 0.2})
    assert tuned.space["operators"] == ["add"] and tuned.space["loss"] == {"ce": 0.2}


def test_tune_section_is_parsed_and_checked() -> None:
    recipe = load_recipe("demo")
    assert set(recipe.tune) == {"optim.lr", "space.loss.ce", "space.weighting.kind"}
    assert recipe.tune["optim.lr"].kind == "loguniform"
    assert recipe.tune["space.weighting.kind"].choice == ["softplus", "uncertainty"]


@pytest.mark.parametrize(
    ("tune", "field", "fragment"),
    [
        ({"optim.lrr": {"uniform": [1e-4, 1e-3]}}, "tune.optim.lrr", "not a known field"),
        ({"optim.lr": {"uniform": [1e-3, 1e-4]}}, "tune.optim.lr", "greater than high"),
        ({"space.operators": {"choice": [["add"], ["add", "nope"]]}}, "tune.space.operators", "nope"),
        ({"batch_size": {"int": [0, 4]}}, "tune.batch_size", "batch_size"),
    ],
)
def test_bad_tune_entries_are_rejected_with_their_path(tmp_path: Path, tune, field, fragment) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "small_unet"}, "space": "lomix", "tune": tune}))
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_load_recipe_from_a_run_directory(tmp_path: Path) -> None:
    recipe = load_recipe("demo", overrides={"epochs": 2})
    run_dir = tmp_path / "my_run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved_dict()))
    again = load_recipe(run_dir)
    assert again.epochs == 2
    assert again.search_space().to_dict() == recipe.search_space().to_dict()


def test_public_api_names() -> None:
    assert fs.load_recipe is load_recipe
    assert fs.Recipe is Recipe


def test_cli_set_with_a_wrong_key_is_one_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "demo", "--set", "optim.lrr=3e-4"])
    err = " ".join(capsys.readouterr().err.split())  # the CLI wraps long messages
    assert code == 2
    assert "optim.lrr" in err and "Valid keys under optim" in err and "weight_decay" in err
    assert "Traceback" not in err


def test_cli_set_with_a_malformed_pair(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "demo", "--set", "optim.lr"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
