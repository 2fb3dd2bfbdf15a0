"""The shared registry type: duplicates, helpful misses, entry points, plugin files."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from fusionsearch.errors import ConfigError, FusionSearchError, UnknownNameError
from fusionsearch.registry import Registry, import_plugins


def make_registry() -> Registry:
    return Registry("widget", (), "fusionsearch.test_widgets")


def test_register_and_lookup_with_decorator():
    reg = make_registry()

    @reg.register("alpha")
    def alpha():
        return 1

    assert reg.get("alpha") is alpha
    assert "alpha" in reg
    assert reg.names() == ["alpha"]


@pytest.mark.parametrize("override", [False, True])
def test_duplicate_name_raises_unless_override(override):
    reg = make_registry()
    reg.register("alpha", object())
    replacement = object()
    if override:
        reg.register("alpha", replacement, override=True)
        assert reg.get("alpha") is replacement
    else:
        with pytest.raises(FusionSearchError, match="already registered.*override=True"):
            reg.register("alpha", replacement)


def test_registering_the_same_object_twice_is_harmless():
    reg = make_registry()
    value = object()
    reg.register("alpha", value)
    reg.register("alpha", value)
    assert reg.get("alpha") is value


@pytest.mark.parametrize(
    ("query", "closest"),
    [("concta", "concat"), ("ad", "add"), ("zzzzzz", None)],
)
def test_unknown_name_lists_known_names_and_closest(query, closest):
    reg = make_registry()
    for name in ("add", "concat", "mul"):
        reg.register(name, object())
    with pytest.raises(UnknownNameError) as info:
        reg.get(query)
    message = str(info.value)
    assert "add, concat, mul" in message
    if closest:
        assert f"Did you mean '{closest}'" in message
    else:
        assert "Did you mean" not in message


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_bad_names_are_refused(bad):
    with pytest.raises(FusionSearchError):
        make_registry().register(bad, object())


def test_entry_point_plugins_are_discovered(monkeypatch):
    marker = object()
    module = type(sys)("fusionsearch_test_ep_module")
    module.widget = marker
    monkeypatch.setitem(sys.modules, "fusionsearch_test_ep_module", module)
    entry_point = importlib.metadata.EntryPoint(
        name="from_ep", value="fusionsearch_test_ep_module:widget", group="fusionsearch.test_widgets"
    )
    real = importlib.metadata.entry_points

    def fake_entry_points(**kwargs):
        if kwargs.get("group") == "fusionsearch.test_widgets":
            return importlib.metadata.EntryPoints([entry_point])
        return real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    reg = make_registry()
    assert reg.get("from_ep") is marker


def test_plugin_file_registers_on_import(tmp_path):
    reg_name = "widget_from_file_test"
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from fusionsearch.registry import OPERATORS\n"
        f"OPERATORS.register({reg_name!r}, lambda x: x.sum(1), override=True)\n"
    )
    from fusionsearch.registry import OPERATORS

    try:
        import_plugins(["my_plugin.py"], source="space.yaml", base_dir=tmp_path)
        assert reg_name in OPERATORS
    finally:
        OPERATORS.unregister(reg_name)


@pytest.mark.parametrize(
    ("plugin", "match"),
    [("missing_file.py", "does not exist"), ("no_such_module_xyz", "cannot be imported"), ("broken.py", "raised")],
)
def test_bad_plugins_name_the_field(tmp_path, plugin, match):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=match) as info:
        import_plugins([plugin], source="space.yaml", base_dir=tmp_path)
    assert "space.yaml" in str(info.value) and "plugins[0]" in str(info.value)
