"""Sweep results: one record per trial, ranked table (printed + CSV), best recipe YAML, PNG plot.

Both backends describe their trials as :class:`TrialRecord` objects; everything after that (ranking,
files, the :class:`SweepResult` returned to Python callers) is shared, so a Ray sweep and an
Optuna-only sweep of the same recipe produce the same artefacts.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionsearch.sweeps.space import SweepSpace, format_value

COMPLETED = "completed"
STOPPED = "stopped early"
FAILED = "failed"
RUNNING = "running"

RESULTS_CSV = "results.csv"
BEST_RECIPE = "best_recipe.yaml"
PLOT_PNG = "metric_vs_params.png"


@dataclass
class TrialRecord:
    """What a backend knows about one trial."""

    trial_id: str
    status: str  # COMPLETED, STOPPED, FAILED or RUNNING
    params: dict[str, Any]  # recipe overrides sampled for the trial (decoded real values)
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics reported after each epoch
    run_dir: str = ""
    attempts: int = 1
    error: str = ""

    def best(self, metric: str, mode: str) -> dict[str, Any] | None:
        """The reported metrics of the epoch with the best ``metric`` (None if never reported)."""
        scored = [row for row in self.history if _finite(row.get(metric))]
        if not scored:
            return None
        pick = max if mode == "max" else min
        return pick(scored, key=lambda row: float(row[metric]))

    @property
    def epochs_run(self) -> int:
        epochs = [int(row["epoch"]) for row in self.history if row.get("epoch") is not None]
        return max(epochs) if epochs else 0


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def rank(records: Sequence[TrialRecord], space: SweepSpace, metric: str, mode: str) -> list[dict[str, Any]]:
    """Rows ranked by each trial's best ``metric`` (failed and unscored trials last, unranked).

    Columns: rank, trial, status, the metric, ``best_epoch``, every searched path (empty when a
    conditional parameter was inactive), ``epochs``, ``attempts``, ``run_dir``, ``error``.
    """
    rows = []
    for record in records:
        best = record.best(metric, mode)
        row: dict[str, Any] = {
            "rank": None,
            "trial": record.trial_id,
            "status": record.status,
            metric: float(best[metric]) if best else None,
            "best_epoch": int(best["epoch"]) if best and best.get("epoch") is not None else None,
        }
        for path in space.paths:
            row[path] = record.params.get(path)
        row.update(epochs=record.epochs_run, attempts=record.attempts, run_dir=record.run_dir, error=record.error)
        rows.append(row)
    sign = -1.0 if mode == "max" else 1.0
    scored = sorted((r for r in rows if r[metric] is not None), key=lambda r: (sign * r[metric], str(r["trial"])))
    unscored = sorted((r for r in rows if r[metric] is None), key=lambda r: str(r["trial"]))
    for position, row in enumerate(scored, start=1):
        row["rank"] = position
    return scored + unscored


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write the ranked rows as CSV (composite values as one-line YAML, missing values empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else ["rank", "trial", "status"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else _cell(row.get(c)) for c in columns])
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return format_value(value)


def format_table(rows: Sequence[dict[str, Any]], metric: str, paths: Sequence[str], max_width: int = 28) -> str:
    """A plain-text table for the terminal: rank, trial, status, metric, searched values, epochs."""
    columns = ["rank", "trial", "status", metric, *paths, "epochs", "attempts"]
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            text = "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else format_value(value))
            cells.append(text if len(text) <= max_width else text[: max_width - 1] + "~")
        body.append(cells)
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in body]
    failed = [r for r in rows if r["status"] == FAILED and r.get("error")]
    for row in failed:
        lines.append(f"trial {row['trial']} failed: {row['error']}")
    return "\n".join(lines)


def plot_metric(rows: Sequence[dict[str, Any]], space: SweepSpace, metric: str, path: Path) -> Path:
    """PNG with one panel per searched parameter: the metric of every scored trial against its value.

    Numeric parameters get a numeric axis (logarithmic for loguniform), choices one slot per choice.
    Trials stopped early are drawn hollow; failed trials have no metric and are left out.
    """
    import matplotlib.ticker
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    params = space.params or []
    count = max(1, len(params))
    cols = min(3, count)
    nrows = math.ceil(count / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    scored = [r for r in rows if r.get(metric) is not None]
    for index, param in enumerate(params):
        ax = axes[index // cols][index % cols]
        used = [r for r in scored if r.get(param.path) is not None]
        if param.dist.kind == "choice":
            labels = [format_value(v) for v in param.dist.choice or []]
            xs = [labels.index(format_value(r[param.path])) for r in used]
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels([lb if len(lb) <= 18 else lb[:17] + "~" for lb in labels], rotation=20, fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            xs = [float(r[param.path]) for r in used]
            if param.dist.kind == "loguniform":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled decades only
        ys = [float(r[metric]) for r in used]
        done = [r["status"] != STOPPED for r in used]
        ax.scatter([x for x, d in zip(xs, done, strict=True) if d], [y for y, d in zip(ys, done, strict=True) if d],
                   color="tab:blue", label=COMPLETED)
        ax.scatter([x for x, d in zip(xs, done, strict=True) if not d],
                   [y for y, d in zip(ys, done, strict=True) if not d],
                   facecolors="none", edgecolors="tab:orange", label=STOPPED)
        ax.set_xlabel(param.path)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if index == 0:
            ax.legend(fontsize=8)
    for index in range(len(params), nrows * cols):
        axes[index // cols][index % cols].axis("off")
    if not params:
        axes[0][0].text(0.5, 0.5, "nothing searched", ha="center", va="center")
    fig.suptitle(f"{metric} (best epoch) per searched value", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


@dataclass
class SweepResult:
    """The outcome of a sweep.

    ``table``: one dict per trial, ranked (see :func:`rank`). ``best_recipe``: the best trial's full
    recipe (a ``Recipe``; also written to ``best_recipe_path`` and runnable with ``fusionsearch run``).
    ``best_metrics``: the metrics the best trial reported at its best epoch.
    """

    table: list[dict[str, Any]]
    best_recipe: Any
    best_metrics: dict[str, Any] | None
    sweep_dir: Path
    metric: str
    mode: str
    csv_path: Path
    best_recipe_path: Path | None
    plot_path: Path
    searched: list[str] = field(default_factory=list)  # the searched paths, in sampling order
    interrupted: bool = False  # trials were left unfinished (Ctrl-C); --resume continues them

    @property
    def best_trial(self) -> dict[str, Any] | None:
        return self.table[0] if self.table and self.table[0]["rank"] == 1 else None

    def format(self) -> str:
        """The ranked table as plain text (what the CLI prints)."""
        return format_table(self.table, self.metric, self.searched)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.table:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return counts
