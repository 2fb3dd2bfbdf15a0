"""Outer-loop sweeps: Ray Tune + Optuna (or Optuna alone) over a recipe's ``tune:`` distributions.

``fs.sweep(recipe, num_samples=8, backend="ray", address=None, ...) -> SweepResult``; see
:func:`fusionsearch.sweep.api.sweep` and docs/sweeps.md.

``fusionsearch.sweep`` names both this package and the function: importing a submodule
(``fusionsearch.sweep.space``) makes Python bind the package to ``fusionsearch.sweep``, which
would shadow the lazily exported function. The package is therefore made callable, so that
``fs.sweep(...)`` works whichever of the two it resolves to.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from fusionsearch.sweep.api import sweep
from fusionsearch.sweep.results import SweepResult

__all__ = ["sweep", "SweepResult"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> SweepResult:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
