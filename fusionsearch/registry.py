"""One small registry type shared by operators, weightings, models and datasets.

Registries map names to factories. Built-ins are imported lazily on first lookup, and other
packages contribute plugins through entry points (group ``fusionsearch.<kind>s``), so that
``pip install my-fusion-ops`` is all a user needs to make a new operator available by name.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from fusionsearch.errors import ConfigError, FusionSearchError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with duplicate protection, helpful misses and plugin discovery."""

    def __init__(self, kind: str, builtin_modules: tuple[str, ...] = (), entry_point_group: str | None = None):
        self.kind = kind
        self._builtin_modules = builtin_modules
        self._entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._loaded = False
        self._lock = threading.RLock()

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str, obj: T | None = None, *, override: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator that does so."""
        if not isinstance(name, str) or not name.strip():
            raise FusionSearchError(f"A {self.kind} name must be a non-empty string, got {name!r}.")

        def decorator(value: T) -> T:
            with self._lock:
                existing = self._items.get(name)
                if existing is not None and existing is not value and not override:
                    raise FusionSearchError(
                        f"A {self.kind} named '{name}' is already registered ({_describe(existing)}). "
                        f"Pick another name, or pass override=True to replace it on purpose."
                    )
                self._items[name] = value
            return value

        if obj is None:
            return decorator
        return decorator(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (mainly for tests and interactive sessions)."""
        with self._lock:
            self._items.pop(name, None)

    # -- lookup ---------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise an error listing the known names."""
        self._ensure_loaded()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            pass
        known = sorted(self._items)
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownNameError(
            f"Unknown {self.kind} '{name}'.{hint} Known {self.kind}s: {', '.join(known) or '(none)'}. "
            f"A third-party {self.kind} must be registered first: list its module under 'plugins:' "
            f"or install a package that declares the '{self._entry_point_group}' entry point."
        )

    def names(self) -> list[str]:
        """Sorted registered names."""
        self._ensure_loaded()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._ensure_loaded()
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    # -- discovery ------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True  # set first: built-in modules call register() while importing
            for module in self._builtin_modules:
                importlib.import_module(module)
            if self._entry_point_group:
                for entry_point in importlib.metadata.entry_points(group=self._entry_point_group):
                    try:
                        loaded = entry_point.load()
                    except Exception as exc:  # a broken plugin must not hide the others
                        raise FusionSearchError(
                            f"The {self.kind} plugin '{entry_point.name}' ({entry_point.value}) from entry "
                            f"point group '{self._entry_point_group}' failed to import: {exc}. Fix or "
                            f"uninstall that package."
                        ) from exc
                    # An entry point may name a module (which registers on import) or an object.
                    if not isinstance(loaded, type(sys)) and entry_point.name not in self._items:
                        self._items[entry_point.name] = loaded


def _describe(obj: object) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or type(obj).__name__
    return f"{module}.{qualname}" if module else qualname


def import_plugins(plugins: list[str], *, source: str | None = None, base_dir: Path | None = None) -> None:
    """Import the plugin modules a config names, so that they register their objects.

    Each entry is a dotted module name (``my_pkg.ops``) or a path to a ``.py`` file, relative to
    ``base_dir`` (the folder of the YAML file that named it). Only modules the user named are
    imported: configs never import code on their own.
    """
    for index, plugin in enumerate(plugins):
        field = f"plugins[{index}]"
        looks_like_path = plugin.endswith(".py") or "/" in plugin or "\\" in plugin
        if looks_like_path:
            path = Path(plugin).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise ConfigError(
                    f"plugin file '{plugin}' does not exist (looked at {path})",
                    file=source,
                    field=field,
                    fix="Give a path relative to the YAML file, an absolute path, or a dotted module name",
                )
            module_name = f"fusionsearch_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
            if module_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise ConfigError(f"cannot import plugin file {path}", file=source, field=field)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except FusionSearchError:
                sys.modules.pop(module_name, None)
                raise
            except Exception as exc:
                sys.modules.pop(module_name, None)
                raise ConfigError(
                    f"plugin file {path} raised {type(exc).__name__}: {exc}", file=source, field=field
                ) from exc
        else:
            try:
                importlib.import_module(plugin)
            except ModuleNotFoundError as exc:
                raise ConfigError(
                    f"plugin module '{plugin}' cannot be imported ({exc})",
                    file=source,
                    field=field,
                    fix="Install the package that provides it, or give the path to a .py file",
                ) from exc


OPERATORS: Registry[Callable[..., Any]] = Registry(
    "operator", ("fusionsearch.operators",), "fusionsearch.operators"
)
WEIGHTINGS: Registry[Callable[..., Any]] = Registry(
    "weighting", ("fusionsearch.weighting",), "fusionsearch.weightings"
)
MODELS: Registry[Callable[..., Any]] = Registry("model", ("fusionsearch.models",), "fusionsearch.models")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", ("fusionsearch.data",), "fusionsearch.datasets")


def register_operator(name: str, obj: Any = None, *, override: bool = False) -> Any:
    """Register a fusion operator by name (usable as ``@register_operator("name")``)."""
    return OPERATORS.register(name, obj, override=override)


def register_weighting(name: str, obj: Any = None, *, override: bool = False) -> Any:
    """Register a loss-weighting scheme by name."""
    return WEIGHTINGS.register(name, obj, override=override)


def register_model(name: str, obj: Any = None, *, override: bool = False) -> Any:
    """Register a multi-scale model factory by name."""
    return MODELS.register(name, obj, override=override)


def register_dataset(name: str, obj: Any = None, *, override: bool = False) -> Any:
    """Register a dataset factory by name."""
    return DATASETS.register(name, obj, override=override)


def list_operators() -> list[str]:
    """Names of all registered fusion operators (built-ins and plugins)."""
    return OPERATORS.names()
