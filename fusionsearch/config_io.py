"""Reading YAML configs safely and turning validation failures into one clear message.

Shared by search spaces and recipes: both are YAML files validated by pydantic, both can be
named by a bundled name (``lomix``) or a path, and both must report errors by file and field.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import yaml

from fusionsearch.errors import ConfigError, UnknownNameError

BUNDLED_PACKAGES = {"space": "fusionsearch.search_spaces", "recipe": "fusionsearch.recipes"}


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping with ``yaml.safe_load``; malformed files raise a located ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read file ({exc})", file=str(path)) from exc
    return parse_yaml_text(text, source=str(path))


def parse_yaml_text(text: str, *, source: str) -> dict[str, Any]:
    """Parse YAML text that must hold a mapping at the top level."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if isinstance(exc, yaml.constructor.ConstructorError):
            problem += " (fusionsearch reads YAML safely and refuses Python object tags)"
        raise ConfigError(
            f"malformed YAML{where}: {problem}",
            file=source,
            fix="Check the indentation and quoting near that line",
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level must be a mapping of fields, got a {type(data).__name__}", file=source
        )
    return data


def bundled_names(kind: str) -> list[str]:
    """Names of the YAML files bundled with the package for ``kind`` ('space' or 'recipe')."""
    root = importlib.resources.files(BUNDLED_PACKAGES[kind])
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_config(name_or_path: str | Path, kind: str) -> tuple[dict[str, Any], str, Path | None]:
    """Find a bundled config by bare name or read one from a path.

    Returns the parsed mapping, a source label for error messages and the folder that relative
    paths inside the file are resolved against (None for bundled files).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = path.suffix in (".yaml", ".yml") or "/" in text or path.exists()
    if looks_like_path:
        if not path.exists():
            raise ConfigError(
                f"{kind} file not found",
                file=str(path),
                fix=f"Give an existing YAML file or one of the bundled {kind}s: {', '.join(bundled_names(kind))}",
            )
        return load_yaml_file(path), str(path), path.resolve().parent
    resource = importlib.resources.files(BUNDLED_PACKAGES[kind]).joinpath(f"{text}.yaml")
    if not resource.is_file():
        import difflib

        known = bundled_names(kind)
        close = difflib.get_close_matches(text, known, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownNameError(
            f"Unknown {kind} '{text}'.{hint} Bundled {kind}s: {', '.join(known)}. "
            f"To use your own, give a path to a YAML file."
        )
    source = f"<bundled {kind} '{text}'>"
    return parse_yaml_text(resource.read_text(encoding="utf-8"), source=source), source, None


def validation_error(exc: Exception, *, source: str) -> ConfigError:
    """Convert a pydantic ValidationError into a ConfigError naming the first failing field."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return ConfigError(str(exc), file=source)
    items = errors()
    if not items:
        return ConfigError(str(exc), file=source)
    messages = []
    first_field = None
    for item in items[:3]:
        loc = ".".join(str(p) for p in item.get("loc", ()) if not _is_union_tag(p))
        first_field = first_field or loc
        kind = item.get("type", "")
        if kind == "extra_forbidden":
            msg = f"'{loc}' is not a known field"
        elif kind == "missing":
            msg = f"'{loc}' is required but missing"
        else:
            got = item.get("input")
            got_text = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
            text = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
            msg = f"'{loc}': {text}{got_text}" if loc else f"{text}{got_text}"
        messages.append(msg)
    more = f" (and {len(items) - 3} more problems)" if len(items) > 3 else ""
    err = ConfigError("; ".join(messages) + more, file=source, field=first_field)
    return err


def _is_union_tag(part: object) -> bool:
    # pydantic puts the union member / function validator names into error locations.
    text = str(part)
    return text.startswith("function-") or text.endswith("]") and "[" in text
