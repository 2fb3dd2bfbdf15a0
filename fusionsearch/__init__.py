"""fusionsearch: searchable multi-scale logit mixing for medical image segmentation.

The public API is imported lazily, so that ``import fusionsearch`` and the CLI start fast and
only the parts in use pay for torch, Ray or MONAI.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# operators/, search_spaces/ and recipes/ sit at the top of the repository and are installed as
# fusionsearch.operators, .search_spaces and .recipes. A process that imports this package from a
# source checkout instead of the installed copy (a subprocess or Ray worker started in the
# repository root, `python -m` there) must find them too: let the package search the checkout.
_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).resolve().parent / "operators").is_dir() and (_checkout / "operators" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821  (__path__ is set for packages)

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # errors and registries
    "FusionSearchError": "fusionsearch.errors",
    "ConfigError": "fusionsearch.errors",
    "DataError": "fusionsearch.errors",
    "UnknownNameError": "fusionsearch.errors",
    "Registry": "fusionsearch.registry",
    "register_operator": "fusionsearch.registry",
    "register_weighting": "fusionsearch.registry",
    "register_model": "fusionsearch.registry",
    "register_dataset": "fusionsearch.registry",
    "list_operators": "fusionsearch.registry",
    "OPERATORS": "fusionsearch.registry",
    "WEIGHTINGS": "fusionsearch.registry",
    "MODELS": "fusionsearch.registry",
    "DATASETS": "fusionsearch.registry",
    # core: spaces, compiler, criterion
    "SearchSpace": "fusionsearch.spec",
    "load_space": "fusionsearch.spec",
    "compile_space": "fusionsearch.compile",
    "Graph": "fusionsearch.compile",
    "Mixer": "fusionsearch.mixer",
    "Criterion": "fusionsearch.criterion",
    "CriterionOutput": "fusionsearch.criterion",
    "build_criterion": "fusionsearch.criterion",
    # models and data
    "build_model": "fusionsearch.models",
    "build_dataset": "fusionsearch.data",
    # runner, evaluation, sweeps
    "Recipe": "fusionsearch.recipe",
    "load_recipe": "fusionsearch.recipe",
    "run": "fusionsearch.runner",
    "RunResult": "fusionsearch.runner",
    "evaluate_volumes": "fusionsearch.evaluate",
    "EvaluationResult": "fusionsearch.evaluate",
    "sweep": "fusionsearch.sweeps",
    "SweepResult": "fusionsearch.sweeps",
}

_SUBMODULES = {"evaluate", "metrics", "models", "data", "registry", "errors", "operators", "weighting", "loss"}

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"fusionsearch.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fusionsearch' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
