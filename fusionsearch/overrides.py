"""Dotted-path access to nested config mappings (``optim.lr``, ``space.loss.ce``).

Used by ``--set`` overrides on the command line, by ``tune:`` sections, and by sweeps that write
sampled values into a recipe. Values are set on the raw mapping before pydantic validation, so a
wrong path or type is reported by the same validation that checks a hand-written file.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from fusionsearch.errors import ConfigError


def split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for part in path.split("."):
        if part == "":
            raise ConfigError(f"'{path}' is not a valid dotted path (empty part)", field=path)
        parts.append(int(part) if part.lstrip("-").isdigit() else part)
    return parts


def get_path(data: Any, path: str, default: Any = KeyError) -> Any:
    """Read ``path`` from nested dicts/lists; missing -> ``default`` (KeyError raises)."""
    node = data
    for part in split_path(path):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            if default is KeyError:
                raise KeyError(path) from None
            return default
    return node


def set_path(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Return a deep copy of ``data`` with ``path`` set to ``value`` (creating mappings on the way)."""
    result = copy.deepcopy(data)
    parts = split_path(path)
    node: Any = result
    for index, part in enumerate(parts[:-1]):
        nxt = parts[index + 1]
        try:
            child = node[part]
        except (KeyError, IndexError, TypeError):
            child = None
        if child is None or not isinstance(child, dict | list):
            if isinstance(node, list):
                raise ConfigError(f"list index {part} out of range", field=".".join(map(str, parts[: index + 1])))
            child = [] if isinstance(nxt, int) else {}
            node[part] = child
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or not -len(node) <= last < len(node):
            raise ConfigError(f"list index {last} out of range", field=path)
    node[last] = value
    return result


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply several dotted-path overrides in order."""
    for path, value in overrides.items():
        data = set_path(data, path, value)
    return data


def parse_set_arguments(items: list[str]) -> dict[str, Any]:
    """Parse ``--set a.b=value`` strings; values are read as YAML (``3e-4``, ``[add, mul]``, ``true``)."""
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"--set expects KEY=VALUE, got '{item}'",
                fix="Write it like --set optim.lr=3e-4",
            )
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        overrides[key.strip()] = value
    return overrides
