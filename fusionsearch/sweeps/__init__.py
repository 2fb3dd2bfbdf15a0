"""Outer-loop sweeps: Ray Tune + Optuna (or Optuna alone) over a recipe's ``tune:`` distributions.

``fs.sweep(recipe, num_samples=8, backend="ray", address=None, ...) -> SweepResult``; see
:func:`fusionsearch.sweeps.api.sweep` and docs/sweeps.md.
"""

from __future__ import annotations

from fusionsearch.sweeps.api import sweep
from fusionsearch.sweeps.results import SweepResult

__all__ = ["sweep", "SweepResult"]

