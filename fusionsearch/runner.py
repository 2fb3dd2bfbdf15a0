"""One training run from a recipe: data, model, criterion, training, selection, test, report.

``fs.run(recipe)`` is the product's main job and the unit a sweep trial executes. It writes a run
directory that holds everything needed to inspect, resume or re-evaluate the run::

    recipe.yaml          the resolved recipe (space inlined, absolute data root)
    checkpoints/         last.pt (every epoch, resumable), best.pt (best validation Dice)
    history.csv          per epoch: train loss, learning rate, validation Dice/HD95, seconds
    terms.csv            per epoch and term: effective weight and mean loss (epoch 0 = initial weights)
    tb/                  TensorBoard scalars (the same numbers)
    test_cases.csv       per test case and class: Dice, HD95 (selected checkpoint, evaluated once)
    test_summary.json    per-class and mean test metrics + which checkpoint/epoch was selected
    qualitative.npz      a few test slices: image, truth, prediction (for the report's overlays)
    report.md + *.png    the report (``fusionsearch report RUN_DIR`` regenerates it)

Model selection uses the validation split; the test split is evaluated once, at the end, on the
selected checkpoint (the reference code picks its checkpoint by test Dice; we do not).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fusionsearch.atomic import atomic_path, write_text_atomic
from fusionsearch.checkpoint import BEST, LAST, load_checkpoint
from fusionsearch.errors import ConfigError, DataError, FusionSearchError
from fusionsearch.recipe import Recipe, load_recipe
from fusionsearch.train import Trainer, resolve_device, seed_everything

# Fields a resumed run may change (longer training, a moved data root, other hardware).
RESUMABLE_CHANGES = ("epochs", "iterations", "num_workers", "device", "data.root", "output_dir", "evaluation", "name")


@dataclass
class RunResult:
    """The outcome of :func:`run`."""

    run_dir: Path
    metrics: dict[str, Any]
    """Test metrics of the selected checkpoint: ``mean_dice`` (%), ``mean_hd95``, ``per_class`` {name: {dice, hd95}}."""
    best_checkpoint: Path
    best_epoch: int | None
    val_dice: float | None
    """Validation mean Dice (%) of the selected checkpoint."""
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluation: Any = None
    """The test :class:`fusionsearch.evaluate.EvaluationResult` (None when the recipe skips the test)."""


# -- building blocks (shared with `fusionsearch evaluate`) ----------------------------------------
def check_data_root(recipe: Recipe) -> Path:
    """The recipe's data root, or a clear error when it is unset or missing."""
    root = recipe.data.root
    if not root:
        raise ConfigError(
            "no data root is set",
            file=recipe.source,
            field="data.root",
            fix="Pass --data-root /path/to/data (or --set data.root=PATH, or set it in the recipe)",
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataError(
            f"The data root {path} (field data.root of {recipe.source}) {what}. If the data moved, pass "
            f"--data-root NEW_PATH; a {recipe.data.name} root must be the folder the dataset form expects "
            f"(see docs/data/{recipe.data.name}.md)."
        )
    return path


def dataset_options(recipe: Recipe, split: str) -> dict[str, Any]:
    """Keyword arguments for ``build_dataset`` from the recipe's ``data`` section.

    The seeds and fraction are always meant; they are passed only if the reader accepts them, so a
    plugin dataset without those options still works. Fields the user set are always passed.
    """
    import inspect

    from fusionsearch.registry import DATASETS

    data = recipe.data
    implicit: dict[str, Any] = {"seed": recipe.data_seed(), "split_seed": data.split_seed, "fraction": data.fraction}
    explicit: dict[str, Any] = {}
    if split == "train":
        explicit.update(size=data.size, augment=data.augment)
    if data.labels is not None:
        explicit["labels"] = data.labels
    if data.val_fraction is not None:
        explicit["val_fraction"] = data.val_fraction
    try:
        parameters = inspect.signature(DATASETS.get(data.name)).parameters
        accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        implicit = {k: v for k, v in implicit.items() if accepts_all or k in parameters}
    except (TypeError, ValueError):
        pass
    return {**implicit, **explicit, **data.options}


def build_split(recipe: Recipe, split: str) -> Any:
    """Build one split of the recipe's dataset, naming the recipe in any data error."""
    from fusionsearch.data import build_dataset

    root = check_data_root(recipe)
    try:
        return build_dataset(recipe.data.name, root=str(root), split=split, **dataset_options(recipe, split))
    except DataError as exc:
        raise DataError(f"{exc} (while reading the {split} split for recipe {recipe.source})") from None


def build_model_for(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's model for ``num_classes`` classes."""
    from fusionsearch.models import build_model

    cfg = recipe.model
    options = dict(cfg.options)
    if cfg.pretrained_file:
        options["pretrained_file"] = cfg.pretrained_file
    return build_model(
        cfg.name, num_classes=num_classes, in_channels=cfg.in_channels, pretrained=cfg.pretrained, **options
    )


def build_criterion_for(recipe: Recipe, model: nn.Module, num_classes: int) -> nn.Module:
    """The recipe's criterion for ``model``; a space that needs more scales than the model has is an error."""
    from fusionsearch.criterion import build_criterion

    num_outputs = int(getattr(model, "num_outputs", 0))
    spatial_dims = int(getattr(model, "spatial_dims", 2))
    if num_outputs < 1:
        raise FusionSearchError(
            f"The model '{recipe.model.name}' does not say how many outputs it gives (attribute num_outputs)."
        )
    try:
        return build_criterion(recipe.search_space(), num_outputs, num_classes, spatial_dims)
    except FusionSearchError as exc:
        raise ConfigError(
            f"the space cannot be compiled for model '{recipe.model.name}', which gives {num_outputs} output(s): {exc}",
            file=recipe.source,
            field="space",
            fix="Choose a space whose scales fit the model's outputs, or a model with more decoder outputs",
        ) from None


def check_model_outputs(model: nn.Module, criterion: nn.Module, sample: torch.Tensor, recipe: Recipe) -> None:
    """Run one sample through the model and check it gives as many outputs as the space expects."""
    expected = int(criterion.graph.num_scales)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(sample)
    finally:
        model.train(was_training)
    count = len(outputs) if isinstance(outputs, list | tuple) else 1
    if count != expected:
        raise FusionSearchError(
            f"The model '{recipe.model.name}' returned {count} output(s) but the space of {recipe.source} was "
            f"compiled for {expected} scales (model.num_outputs = {getattr(model, 'num_outputs', '?')}). Fix the "
            f"model's num_outputs attribute or its decoder outputs."
        )


def _num_classes(recipe: Recipe, dataset: Any) -> int:
    found = int(dataset.num_classes)
    wanted = recipe.model.num_classes
    if wanted is not None and wanted != found:
        raise ConfigError(
            f"model.num_classes is {wanted} but the {recipe.data.name} data has {found} classes (background included)",
            file=recipe.source,
            field="model.num_classes",
            fix=f"Remove model.num_classes (it defaults to the dataset's) or set it to {found}",
        )
    return found


def _prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    last = run_dir / "checkpoints" / LAST
    if resume:
        if not last.is_file():
            raise FusionSearchError(
                f"Nothing to resume in {run_dir}: {last} does not exist. Run without --resume to start it."
            )
        stored = run_dir / "recipe.yaml"
        if stored.is_file():
            _check_same_recipe(load_recipe(stored).resolved_dict(), recipe.resolved_dict(), stored)
    elif last.is_file():
        raise FusionSearchError(
            f"{run_dir} already holds a run ({last} exists). Continue it with --resume, or choose another "
            f"directory with --output DIR."
        )
    run_dir.mkdir(parents=True, exist_ok=True)


def _check_same_recipe(old: dict[str, Any], new: dict[str, Any], stored: Path) -> None:
    def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(data, dict):
            out: dict[str, Any] = {}
            for key, value in data.items():
                out.update(flatten(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: data}

    flat_old, flat_new = flatten(old), flatten(new)
    changed = sorted(
        key
        for key in set(flat_old) | set(flat_new)
        if flat_old.get(key) != flat_new.get(key)
        and not any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_CHANGES)
    )
    if changed:
        raise ConfigError(
            f"the recipe differs from the one the run was started with in {', '.join(changed[:8])}"
            + (f" and {len(changed) - 8} more" if len(changed) > 8 else ""),
            file=str(stored),
            fix="Resume with the run's own recipe (fusionsearch run RUN_DIR --resume) or start a new run directory",
        )


# -- the run ------------------------------------------------------------------------------------------
def run(
    recipe: Recipe | str | Path,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[int, dict[str, Any], Path], None] | None = None,
    progress: bool = True,
) -> RunResult:
    """Train, select on validation, test once, report. See the module docstring for the outputs.

    ``on_epoch_end(epoch, metrics, checkpoint_dir)`` is called after each epoch's validation and
    checkpoint; ``metrics`` holds ``epoch``, ``val_dice`` (%), ``train_loss`` and more.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    run_dir = Path(run_dir) if run_dir is not None else Path(recipe.output_dir) / recipe.run_name
    check_data_root(recipe)
    _prepare_run_dir(recipe, run_dir, resume)

    seed_everything(recipe.seed)
    if recipe.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    device = resolve_device(recipe.device)

    train_set = build_split(recipe, "train")
    valid_set = None if recipe.data.val_fraction == 0 else build_split(recipe, "valid")
    test_set = build_split(recipe, "test") if recipe.evaluation.test else None
    num_classes = _num_classes(recipe, train_set)
    class_names = list(getattr(train_set, "class_names", [str(i) for i in range(num_classes)]))

    torch.manual_seed(recipe.seed)  # model and criterion initialisation do not depend on data loading
    # a resumed run takes every weight from its checkpoint: no pretrained download needed
    model = build_model_for(_without_pretrained(recipe) if resume else recipe, num_classes)
    criterion = build_criterion_for(recipe, model, num_classes)
    check_model_outputs(model, criterion, train_set[0]["image"].unsqueeze(0), recipe)

    resolved = recipe.resolved_dict()
    write_text_atomic(run_dir / "recipe.yaml", _yaml(resolved))
    extra = {"recipe": resolved, "num_classes": num_classes, "class_names": class_names}

    def validate(model: nn.Module, criterion: nn.Module) -> dict[str, float]:
        # the training bar already shows progress; a bar per validation would flood logs
        result = _evaluate(recipe, model, criterion, valid_set, num_classes, device, progress=False)
        return {"val_dice": 100.0 * result.mean_dice, "val_hd95": result.mean_hd95}

    trainer = Trainer(
        recipe=recipe,
        model=model,
        criterion=criterion,
        train_set=train_set,
        run_dir=run_dir,
        device=device,
        validate=validate if valid_set is not None else None,
        on_epoch_end=on_epoch_end,
        checkpoint_extra=extra,
    )
    outcome = trainer.fit(resume=resume)

    selected = load_checkpoint(outcome.best_checkpoint, map_location=device)
    model.load_state_dict(selected["model"])
    criterion.load_state_dict(selected["criterion"])
    metrics: dict[str, Any] = {}
    evaluation = None
    if test_set is not None:
        evaluation = _evaluate(recipe, model, criterion, test_set, num_classes, device, progress)
        metrics = write_test_results(
            evaluation,
            run_dir,
            prefix="test",
            info={
                "checkpoint": str(outcome.best_checkpoint),
                "best_epoch": outcome.best_epoch,
                "val_dice": outcome.best_val,
                "epochs": outcome.epochs,
            },
        )
        save_qualitative(recipe, model, criterion, test_set, evaluation, num_classes, device, run_dir)
    from fusionsearch.report import write_report

    write_report(run_dir)
    return RunResult(
        run_dir=run_dir,
        metrics=metrics,
        best_checkpoint=outcome.best_checkpoint,
        best_epoch=outcome.best_epoch,
        val_dice=outcome.best_val,
        history=outcome.history,
        evaluation=evaluation,
    )


def _without_pretrained(recipe: Recipe) -> Recipe:
    if not recipe.model.pretrained and not recipe.model.pretrained_file:
        return recipe
    return recipe.with_overrides({"model.pretrained": False, "model.pretrained_file": None})


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _evaluate(
    recipe: Recipe,
    model: nn.Module,
    criterion: nn.Module,
    dataset: Any,
    num_classes: int,
    device: torch.device,
    progress: bool,
    *,
    head: str | None = None,
    protocol: str | None = None,
) -> Any:
    from fusionsearch.evaluate import evaluate_volumes

    ev = recipe.evaluation
    return evaluate_volumes(
        model,
        dataset,
        num_classes=num_classes,
        size=ev.size or recipe.data.size,
        head=head or ev.head,
        protocol=protocol or ev.protocol,
        criterion=criterion,
        mixture_top_k=min(ev.mixture_top_k, len(getattr(criterion, "terms", [])) or 1),
        device=device,
        batch_size=ev.batch_size,
        roi_size=ev.roi_size,
        progress=progress,
    )


def write_test_results(evaluation: Any, folder: Path, *, prefix: str, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``<prefix>_cases.csv`` and ``<prefix>_summary.json`` (Dice in %); return the summary."""
    folder.mkdir(parents=True, exist_ok=True)
    evaluation.to_csv(folder / f"{prefix}_cases.csv")
    summary_path = evaluation.to_json(folder / f"{prefix}_summary.json")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary.update({key: value for key, value in info.items()})
    summary["mean_dice_percent"] = _percent(summary.get("mean_dice"))
    for row in summary.get("per_class", {}).values():
        row["dice_percent"] = _percent(row.get("dice"))
    write_text_atomic(summary_path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return {
        "mean_dice": summary["mean_dice_percent"],
        "mean_hd95": summary.get("mean_hd95"),
        "per_class": {
            name: {"dice": row["dice_percent"], "hd95": row.get("hd95")} for name, row in summary["per_class"].items()
        },
        "protocol": summary.get("protocol"),
        "head": summary.get("head"),
    }


def _percent(value: Any) -> float | None:
    return None if value is None else 100.0 * float(value)


def save_qualitative(
    recipe: Recipe,
    model: nn.Module,
    criterion: nn.Module,
    dataset: Any,
    evaluation: Any,
    num_classes: int,
    device: torch.device,
    run_dir: Path,
) -> Path | None:
    """Predict the most-foreground slice of a few test cases and keep image/truth/prediction for the report."""
    from fusionsearch.evaluate import make_head, predict_volume

    count = min(recipe.evaluation.overlays, len(dataset))
    if count == 0 or getattr(model, "spatial_dims", 2) != 2:
        return None
    head, _ = make_head(
        recipe.evaluation.head,
        criterion=criterion,
        top_k=min(recipe.evaluation.mixture_top_k, len(getattr(criterion, "terms", [])) or 1),
    )
    # spread the examples over the cases (first, middle, last, ...)
    rows = sorted({int(round(i)) for i in np.linspace(0, len(dataset) - 1, count)})
    images, truths, predictions, names = [], [], [], []
    for row in rows:
        item = dataset[row]
        label = np.asarray(item["label"])
        z = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(1)))
        volume = np.asarray(item["image"], dtype=np.float32)[z : z + 1]
        pred = predict_volume(
            model,
            volume,
            num_classes=num_classes,
            head=head,
            size=recipe.evaluation.size or recipe.data.size,
            device=device,
            batch_size=1,
        )
        images.append(volume[0])
        truths.append(label[z])
        predictions.append(pred[0])
        names.append(f"{item.get('case', row)} slice {z}")
    path = run_dir / "qualitative.npz"
    arrays: dict[str, np.ndarray] = {"names": np.array(names)}
    for i, (image, truth, prediction) in enumerate(zip(images, truths, predictions, strict=True)):
        # one entry per example: cases may differ in slice size
        arrays.update({f"image_{i}": image, f"truth_{i}": truth, f"prediction_{i}": prediction})
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)
    return path


# -- re-evaluation ------------------------------------------------------------------------------------
def locate_run(target: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) for a run directory (-> best.pt) or a checkpoint file inside one."""
    path = Path(target).expanduser()
    if path.is_dir():
        checkpoint = path / "checkpoints" / BEST
        if not checkpoint.is_file():
            checkpoint = path / "checkpoints" / LAST
        if not checkpoint.is_file():
            raise FusionSearchError(
                f"{path} holds no checkpoints/best.pt or last.pt: is it a fusionsearch run directory?"
            )
        return path, checkpoint
    if path.is_file():
        for folder in (path.parent, path.parent.parent):
            if (folder / "recipe.yaml").is_file():
                return folder, path
        raise FusionSearchError(
            f"No recipe.yaml found next to {path} or one folder up: give a checkpoint inside a run directory."
        )
    raise FusionSearchError(f"{path} does not exist: give a run directory or a checkpoint file (.pt).")


def evaluate_run(
    target: str | Path,
    *,
    data_root: str | Path | None = None,
    head: str | None = None,
    protocol: str | None = None,
    split: str = "test",
    progress: bool = True,
) -> tuple[Any, Path]:
    """Re-evaluate a run's checkpoint on ``split``; results go to ``RUN_DIR/evaluations/``.

    Returns the EvaluationResult and the folder the CSV/JSON were written to.
    """
    run_dir, checkpoint_path = locate_run(target)
    overrides = {"data.root": str(Path(data_root).expanduser().resolve())} if data_root else None
    recipe = load_recipe(run_dir / "recipe.yaml", overrides=overrides)
    device = resolve_device(recipe.device)
    dataset = build_split(recipe, split)
    checkpoint = load_checkpoint(checkpoint_path, map_location=device)
    num_classes = int(checkpoint.get("num_classes") or _num_classes(recipe, dataset))
    if int(dataset.num_classes) != num_classes:
        raise DataError(
            f"The {split} data at {recipe.data.root} has {dataset.num_classes} classes but {checkpoint_path} was "
            f"trained for {num_classes}. Point --data-root at the dataset the run was trained on."
        )
    torch.manual_seed(recipe.seed)
    model = build_model_for(_without_pretrained(recipe), num_classes)  # the checkpoint holds the weights
    criterion = build_criterion_for(recipe, model, num_classes)
    model.load_state_dict(checkpoint["model"])
    criterion.load_state_dict(checkpoint["criterion"])
    head = head or recipe.evaluation.head
    protocol = protocol or recipe.evaluation.protocol
    result = _evaluate(recipe, model, criterion, dataset, num_classes, device, progress, head=head, protocol=protocol)
    folder = run_dir / "evaluations" / f"{checkpoint_path.stem}-{split}-{head}-{protocol}"
    write_test_results(
        result, folder, prefix=split, info={"checkpoint": str(checkpoint_path), "epoch": checkpoint.get("epoch")}
    )
    return result, folder
