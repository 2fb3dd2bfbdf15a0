"""The Markdown report of a run directory, with PNG plots (matplotlib, Agg backend).

Everything is read from the files a run writes (``recipe.yaml``, ``history.csv``, ``terms.csv``,
``test_summary.json``, ``qualitative.npz``), so ``fusionsearch report RUN_DIR`` can regenerate the
report at any time, also for a run that is still training (sections without data say so).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusionsearch.atomic import atomic_path, write_text_atomic
from fusionsearch.errors import FusionSearchError

TOP_TERMS = 5
_FUSED = re.compile(r"^(?P<op>[^()]+)\((?P<subset>\d+(?:,\d+)*)\)$")


@dataclass(frozen=True)
class TermLog:
    """Effective weight (and mean loss) of every term per epoch; row 0 holds the initial weights."""

    terms: list[str]
    epochs: list[int]
    weights: np.ndarray  # [epochs, K]
    losses: np.ndarray  # [epochs, K], NaN at epoch 0


def term_group(name: str) -> tuple[str, str]:
    """(operator, subset) of a term name: ``add(0,2)`` -> (``add``, ``0,2``); ``P3`` -> (``original``, ``3``)."""
    match = _FUSED.match(name)
    if match:
        return match.group("op"), match.group("subset")
    return "original", name[1:] if name.startswith("P") else name


def read_terms(path: Path) -> TermLog | None:
    """Parse ``terms.csv`` (long format: epoch, term, weight, loss)."""
    if not path.is_file():
        return None
    rows: dict[int, dict[str, tuple[float, float]]] = {}
    order: list[str] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            epoch = int(row["epoch"])
            if row["term"] not in order:
                order.append(row["term"])
            rows.setdefault(epoch, {})[row["term"]] = (_float(row["weight"]), _float(row["loss"]))
    if not rows:
        return None
    epochs = sorted(rows)
    weights = np.array([[rows[e].get(t, (math.nan, math.nan))[0] for t in order] for e in epochs])
    losses = np.array([[rows[e].get(t, (math.nan, math.nan))[1] for t in order] for e in epochs])
    return TermLog(order, epochs, weights, losses)


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [{key: _float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


# -- plots ------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig: Any, path: Path) -> Path:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def plot_weights_over_epochs(log: TermLog, path: Path, top: int = TOP_TERMS) -> Path:
    """Every term's effective weight per epoch; the ``top`` terms by final weight in colour."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    final = log.weights[-1]
    ranked = list(np.argsort(-np.nan_to_num(final, nan=-np.inf), kind="stable"))
    highlighted = ranked[:top]
    for k in ranked[top:]:
        ax.plot(log.epochs, log.weights[:, k], color="0.75", linewidth=0.8, zorder=1)
    for rank, k in enumerate(highlighted):
        ax.plot(log.epochs, log.weights[:, k], linewidth=2.0, zorder=2, label=f"{rank + 1}. {log.terms[k]}")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("epoch (0 = initial)")
    ax.set_ylabel("effective weight")
    ax.set_title(f"Learned term weights ({len(log.terms)} terms; top {len(highlighted)} by final weight in colour)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_final_weights(log: TermLog, path: Path) -> Path:
    """The final weight of every term (dots, with a stem from its initial weight), grouped by operator.

    Stems rather than bars from zero: LoMix weights often move by a few percent only, and the
    plot must show which terms gained or lost relative to where they started.
    """
    plt = _pyplot()
    groups: dict[str, list[int]] = {}
    for k, name in enumerate(log.terms):
        groups.setdefault(term_group(name)[0], []).append(k)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(log.terms) + 2), 4.2))
    colours = plt.get_cmap("tab10")
    x = 0
    ticks, labels = [], []
    for index, (operator, members) in enumerate(groups.items()):
        positions = np.arange(x, x + len(members))
        colour = colours(index % 10)
        ax.vlines(positions, log.weights[0, members], log.weights[-1, members], color=colour, linewidth=1.2)
        ax.plot(positions, log.weights[-1, members], "o", color=colour, label=operator, markersize=5)
        ticks += list(positions)
        labels += [term_group(log.terms[k])[1] for k in members]
        x += len(members) + 1  # a gap between operators
    ax.plot([], [], color="0.3", linewidth=1.2, label="change from the initial weight")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel("subset of scales (0 = coarsest), grouped by operator")
    ax.set_ylabel(f"effective weight after epoch {log.epochs[-1]}")
    ax.set_title("Final weight of every term")
    ax.legend(fontsize=8, ncol=min(6, len(groups) + 1))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_per_class_dice(per_class: dict[str, dict[str, Any]], mean_dice: float | None, path: Path) -> Path:
    """Test Dice (%) per class, with the mean as a line."""
    plt = _pyplot()
    names = list(per_class)
    values = [_percent_or_nan(per_class[n].get("dice")) for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) + 2), 3.8))
    bars = ax.bar(names, values, color="tab:blue")
    for bar, value in zip(bars, values, strict=True):
        if math.isfinite(value):
            ax.text(bar.get_x() + bar.get_width() / 2, value + 1, f"{value:.1f}", ha="center", fontsize=8)
    if mean_dice is not None and math.isfinite(mean_dice):
        ax.axhline(100 * mean_dice, color="tab:red", linestyle="--", label=f"mean {100 * mean_dice:.2f}")
        ax.legend(fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("Dice %")
    ax.set_title("Test Dice per class")
    ax.tick_params(axis="x", rotation=45)
    return _save(fig, path)


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Training loss and validation Dice per epoch."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(epochs, [row.get("train_loss", math.nan) for row in history], color="tab:blue", label="train loss")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (weighted sum of terms)", color="tab:blue")
    validated = [r for r in history if r.get("validated", 1) == 1 and math.isfinite(r.get("val_dice", math.nan))]
    if validated:
        twin = ax.twinx()
        twin.plot([r["epoch"] for r in validated], [r["val_dice"] for r in validated], "o-", color="tab:green")
        twin.set_ylabel("validation Dice %", color="tab:green")
    ax.set_title("Training curves")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_overlays(npz_path: Path, path: Path, class_names: list[str]) -> Path:
    """Rows of image / ground truth / prediction for the slices saved by the runner.

    ``class_names`` are the foreground classes (label 1 first), shown as a colour legend.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    data = np.load(npz_path, allow_pickle=False)
    names = [str(n) for n in data["names"]]
    rows = len(names)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows + 0.6), squeeze=False)
    count = len(class_names) + 1
    cmap = _label_colours(count)
    for r in range(rows):
        image = data[f"image_{r}"]
        panels = (("image", None), ("ground truth", data[f"truth_{r}"]), ("prediction", data[f"prediction_{r}"]))
        for c, (title, labels) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray")
            if labels is not None:
                masked = np.ma.masked_where(labels <= 0, labels)
                ax.imshow(masked, cmap=cmap, vmin=-0.5, vmax=count - 0.5, alpha=0.55, interpolation="nearest")
            ax.set_title(f"{names[r]}: {title}" if c == 0 else title, fontsize=9)
            ax.axis("off")
    handles = [Patch(color=cmap(i + 1), label=name) for i, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)


def _label_colours(count: int) -> Any:
    """A colour per label value (index 0 unused), skipping greys that vanish on a CT image."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    tab10 = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    extra = [c for i, c in enumerate(colormaps["tab20"].colors) if i % 2 == 1 and i not in (14, 15)]
    palette = [(0.0, 0.0, 0.0), *tab10, *extra]
    while len(palette) < count:
        palette += palette[1:]
    return ListedColormap(palette[: max(count, 2)])


def _percent_or_nan(value: Any) -> float:
    return 100.0 * float(value) if value is not None else math.nan


# -- the report -------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def metrics_table(summary: dict[str, Any]) -> list[str]:
    """Markdown rows of the per-class table (Dice %, HD95) and the mean."""
    lines = ["| class | Dice % | HD95 |", "|---|---:|---:|"]
    for name, row in summary.get("per_class", {}).items():
        lines.append(f"| {name} | {_fmt(_percent_or_nan(row.get('dice')))} | {_fmt(row.get('hd95'))} |")
    mean_dice = summary.get("mean_dice")
    lines.append(f"| **mean** | **{_fmt(_percent_or_nan(mean_dice))}** | **{_fmt(summary.get('mean_hd95'))}** |")
    return lines


def write_report(run_dir: str | Path) -> Path:
    """(Re)write ``report.md`` and its PNGs in ``run_dir``; returns the report path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (run_dir / "recipe.yaml").is_file():
        raise FusionSearchError(f"{run_dir} is not a fusionsearch run directory (no recipe.yaml).")
    from fusionsearch.config_io import load_yaml_file

    recipe = load_yaml_file(run_dir / "recipe.yaml")
    history = read_history(run_dir / "history.csv")
    log = read_terms(run_dir / "terms.csv")
    summary_path = run_dir / "test_summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None

    model = recipe.get("model", {})
    data = recipe.get("data", {})
    lines = [f"# Run report: {recipe.get('name') or run_dir.name}", ""]
    if recipe.get("description"):
        lines += [str(recipe["description"]).strip(), ""]
    lines += [
        f"- model: `{model.get('name')}`; data: `{data.get('name')}` at `{data.get('root')}` (size {data.get('size')})",
        f"- supervised terms: {len(log.terms) if log else 'n/a'}; weighting: "
        f"`{(recipe.get('space') or {}).get('weighting', {}).get('kind', 'n/a')}`",
        f"- epochs run: {len(history)}; seed {recipe.get('seed')}; batch {recipe.get('batch_size')}; "
        f"AdamW lr {recipe.get('optim', {}).get('lr')}",
    ]
    if summary:
        lines += [
            f"- selected checkpoint: epoch {summary.get('best_epoch')} (validation mean Dice "
            f"{_fmt(summary.get('val_dice'))} %), tested once",
            "",
            f"## Test metrics ({summary.get('protocol')} protocol, head `{summary.get('head')}`, "
            f"{summary.get('num_cases')} cases)",
            "",
            *metrics_table(summary),
            "",
        ]
    else:
        lines += ["", "## Test metrics", "", "No test evaluation yet (the run is in progress or skips the test).", ""]

    if history:
        plot_training_curves(history, run_dir / "curves.png")
        lines += ["## Training", "", "![training curves](curves.png)", ""]
    if log is not None and len(log.epochs) > 0:
        plot_weights_over_epochs(log, run_dir / "weights.png")
        plot_final_weights(log, run_dir / "final_weights.png")
        lines += _weights_section(log)
    if summary and summary.get("per_class"):
        plot_per_class_dice(summary["per_class"], summary.get("mean_dice"), run_dir / "per_class_dice.png")
        lines += ["## Per-class Dice", "", "![per-class Dice](per_class_dice.png)", ""]
    if (run_dir / "qualitative.npz").is_file():
        class_names = list(summary.get("per_class", {})) if summary else []
        plot_overlays(run_dir / "qualitative.npz", run_dir / "overlays.png", class_names)
        lines += ["## Qualitative examples", "", "![image, truth, prediction](overlays.png)", ""]

    return write_text_atomic(run_dir / "report.md", "\n".join(lines))


def _weights_section(log: TermLog) -> list[str]:
    final, initial = log.weights[-1], log.weights[0]
    order = np.argsort(-np.nan_to_num(final, nan=-np.inf), kind="stable")
    lines = [
        "## Learned term weights",
        "",
        "![weights over epochs](weights.png)",
        "",
        f"Top terms by final effective weight (of {len(log.terms)}):",
        "",
        "| rank | term | initial | final | change |",
        "|---:|---|---:|---:|---:|",
    ]
    for rank, k in enumerate(order[: min(10, len(order))]):
        lines.append(
            f"| {rank + 1} | `{log.terms[k]}` | {_fmt(initial[k], 4)} | {_fmt(final[k], 4)} | "
            f"{_fmt(final[k] - initial[k], 4)} |"
        )
    lines += ["", "![final weight of every term](final_weights.png)", ""]
    return lines
