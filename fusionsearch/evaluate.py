"""Whole-volume inference and per-case, per-class Dice / HD95 tables.

2D models are run slice by slice as the TransUNet family does (each slice resized to ``size`` with
spline order 3, argmax, resized back to the original grid with order 0), batching the slices of a
volume; 3D models go through MONAI's sliding-window inference at the volume's own resolution.
The model's multi-scale outputs are reduced to one logit map by an inference *head*: ``last``
(the finest output, the reference), ``sum`` (all outputs summed at the input size) or ``mixture``
(the learned LoMix terms with the largest effective weights). Scores come from
:func:`fusionsearch.metrics.dice_hd95` under the ``paper`` or ``strict`` protocol.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import zoom
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusionsearch.atomic import atomic_path
from fusionsearch.errors import ConfigError, DataError
from fusionsearch.metrics import PROTOCOLS, dice_hd95
from fusionsearch.models import resize_logits

HEADS = ("last", "sum", "mixture")
# Upper bound on the [K, b, C, *S] tensor the mixture head materialises at once (bytes).
_MIXTURE_CHUNK_BYTES = 256 * 2**20

Head = Callable[[Sequence[Tensor], Sequence[int]], Tensor]


@dataclass(frozen=True)
class EvaluationResult:
    """Dice (fraction in [0, 1]) and HD95 per case and foreground class, with summaries and writers.

    ``dice`` and ``hd95`` have shape [cases, classes]; NaN marks a class excluded from a case (strict
    protocol, class absent from both prediction and truth). Means are taken over cases per class,
    then over classes, ignoring NaN.
    """

    cases: list[str]
    class_names: list[str]
    dice: np.ndarray
    hd95: np.ndarray
    protocol: str
    head: str
    mixture_terms: dict[str, float] = field(default_factory=dict)

    def per_class(self) -> dict[str, dict[str, float]]:
        """Class name -> {"dice", "hd95", "cases"}: means over the cases that count for that class."""
        dice, hd95 = _nanmean(self.dice, axis=0), _nanmean(self.hd95, axis=0)
        counted = np.sum(~np.isnan(self.dice), axis=0)
        return {
            name: {"dice": float(dice[i]), "hd95": float(hd95[i]), "cases": int(counted[i])}
            for i, name in enumerate(self.class_names)
        }

    @property
    def mean_dice(self) -> float:
        """Mean Dice over classes of the per-class means over cases (fraction in [0, 1])."""
        return float(_nanmean(_nanmean(self.dice, axis=0), axis=0))

    @property
    def mean_hd95(self) -> float:
        """Mean HD95 over classes of the per-class means over cases (voxel units)."""
        return float(_nanmean(_nanmean(self.hd95, axis=0), axis=0))

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per case: case, <class>_dice, <class>_hd95 ..., mean_dice, mean_hd95."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        header = ["case"]
        for name in self.class_names:
            header += [f"{name}_dice", f"{name}_hd95"]
        writer.writerow([*header, "mean_dice", "mean_hd95"])
        for row, case in enumerate(self.cases):
            values: list[float] = []
            for column in range(len(self.class_names)):
                values += [self.dice[row, column], self.hd95[row, column]]
            values += [_nanmean(self.dice[row], axis=0), _nanmean(self.hd95[row], axis=0)]
            writer.writerow([case, *(_format_number(v) for v in values)])
        return _write_atomic(path, buffer.getvalue())

    def to_json(self, path: str | Path) -> Path:
        """Write the summary (protocol, head, means, per-class table); NaN is written as null."""
        summary = {
            "protocol": self.protocol,
            "head": self.head,
            "mixture_terms": self.mixture_terms,
            "num_cases": len(self.cases),
            "cases": self.cases,
            "dice_unit": "fraction",
            "hd95_unit": "voxels",
            "mean_dice": _json_number(self.mean_dice),
            "mean_hd95": _json_number(self.mean_hd95),
            "per_class": {
                name: {key: _json_number(value) for key, value in row.items()} for name, row in self.per_class().items()
            },
        }
        return _write_atomic(path, json.dumps(summary, indent=2, allow_nan=False) + "\n")

    def format_table(self) -> str:
        """Aligned text table: one line per class with Dice (%) and HD95, then the mean."""
        rows = [(name, row["dice"], row["hd95"]) for name, row in self.per_class().items()]
        rows.append(("mean", self.mean_dice, self.mean_hd95))
        width = max(len("class"), *(len(name) for name, _, _ in rows))
        lines = [
            f"{self.protocol} protocol, head '{self.head}', {len(self.cases)} cases",
            f"{'class':<{width}}  {'Dice %':>7}  {'HD95':>7}",
        ]
        for index, (name, dice, hd95) in enumerate(rows):
            if index == len(rows) - 1:
                lines.append("-" * (width + 18))
            lines.append(f"{name:<{width}}  {100 * dice:>7.2f}  {hd95:>7.2f}")
        return "\n".join(lines)


def evaluate_volumes(
    model: nn.Module,
    dataset: Any,
    *,
    num_classes: int,
    size: int | Sequence[int] = 224,
    head: str = "last",
    protocol: str = "paper",
    criterion: nn.Module | None = None,
    mixture_top_k: int = 5,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    roi_size: Sequence[int] | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Predict every volume of ``dataset`` and score classes 1..num_classes-1 under ``protocol``.

    ``dataset`` is any sized, indexable collection of ``{"image": float32 [D,H,W], "label": int64
    [D,H,W], "case": str}`` items (optionally with ``class_names``, background first). ``size`` is
    the in-plane size 2D models see; ``roi_size`` the sliding window of 3D models. ``criterion``
    (the trained LoMix criterion) is needed for ``head="mixture"``. The model and criterion are
    moved to ``device`` and left in the train/eval mode they came in.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {protocol!r}", field="protocol", fix=f"Use one of: {PROTOCOLS}")
    if len(dataset) == 0:
        raise DataError("The evaluation split holds no volumes. Check the data root and the split's case list.")
    class_names = _foreground_names(dataset, num_classes)
    if head == "mixture" and criterion is not None:
        criterion.to(device)
    inference_head, mixture_terms = make_head(head, criterion=criterion, top_k=mixture_top_k)

    cases: list[str] = []
    dice = np.empty((len(dataset), num_classes - 1))
    hd95 = np.empty_like(dice)
    bar_off = None if progress else True  # None: shown on a terminal only
    for row in tqdm(range(len(dataset)), desc=f"evaluate ({protocol})", unit="case", disable=bar_off):
        item = dataset[row]
        case = str(item.get("case", row))
        image, label = _check_volume(item, case, num_classes)
        prediction = predict_volume(
            model,
            image,
            num_classes=num_classes,
            head=inference_head,
            size=size,
            device=device,
            batch_size=batch_size,
            roi_size=roi_size,
        )
        for column, class_index in enumerate(range(1, num_classes)):
            dice[row, column], hd95[row, column] = dice_hd95(prediction == class_index, label == class_index, protocol)
        cases.append(case)
    return EvaluationResult(cases, class_names, dice, hd95, protocol, head, mixture_terms)


def make_head(head: str, *, criterion: nn.Module | None = None, top_k: int = 5) -> tuple[Head, dict[str, float]]:
    """Build the inference head ``(outputs, size) -> logits [B, C, *size]``.

    Returns the head and, for ``mixture``, the chosen term names with their renormalised weights
    (ties in weight are broken by term order, so the originals P0..P{L-1} win them).
    """
    if head == "last":
        return (lambda outputs, size: resize_logits([outputs[-1]], size)[0]), {}
    if head == "sum":
        return (lambda outputs, size: torch.stack(resize_logits(outputs, size)).sum(0)), {}
    if head != "mixture":
        raise ConfigError(f"unknown inference head {head!r}", field="head", fix=f"Use one of: {', '.join(HEADS)}")
    if criterion is None:
        raise ConfigError(
            "the 'mixture' head needs the trained criterion (its learned term weights)",
            field="head",
            fix="Pass the run's criterion, or use head 'last' or 'sum'",
        )
    with torch.no_grad():
        weights = criterion.effective_weights().detach().float()
    names = [str(getattr(term, "name", term)) for term in criterion.terms]
    if not 1 <= top_k <= len(names):
        raise ConfigError(
            f"mixture_top_k must be between 1 and the number of terms ({len(names)}), got {top_k}",
            field="mixture_top_k",
        )
    chosen = torch.sort(weights, descending=True, stable=True).indices[:top_k]
    total = weights[chosen].sum()
    if not torch.isfinite(total) or total <= 0:
        raise ConfigError(
            f"the top {top_k} learned term weights sum to {total.item()}, so they cannot be renormalised",
            field="mixture_top_k",
            fix="Check the run's weighting, or use head 'last' or 'sum'",
        )
    mix_weights = weights[chosen] / total
    terms = {names[i]: float(w) for i, w in zip(chosen.tolist(), mix_weights.tolist(), strict=True)}

    def mixture(outputs: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        finest = outputs[-1]
        per_sample = len(names) * finest.shape[1] * math.prod(size) * 4  # float32 [K, 1, C, *size]
        chunk = max(1, _MIXTURE_CHUNK_BYTES // per_sample)
        parts = []
        for start in range(0, finest.shape[0], chunk):
            mixed = criterion.mix([p[start : start + chunk] for p in outputs], size=size)  # [K, b, C, *S]
            selected = mixed[chosen.to(mixed.device)]
            parts.append(torch.einsum("k,k...->...", mix_weights.to(mixed.device, mixed.dtype), selected))
        return torch.cat(parts)

    return mixture, terms


def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    *,
    num_classes: int,
    head: Head | str = "last",
    size: int | Sequence[int] = 224,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    roi_size: Sequence[int] | None = None,
) -> np.ndarray:
    """Label map (int64, the image's [D, H, W] grid) predicted for one volume; see :func:`evaluate_volumes`."""
    if isinstance(head, str):
        head = make_head(head)[0]
    spatial_dims = getattr(model, "spatial_dims", None)
    if spatial_dims not in (2, 3):
        raise ConfigError(
            f"the model must say whether it is 2D or 3D (attribute spatial_dims = 2 or 3), got {spatial_dims!r}",
            field="model",
            fix="Build it with fusionsearch.build_model, or give MultiScaleAdapter spatial_dims=2 or 3",
        )
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad():
            if spatial_dims == 2:
                return _predict_slices(model, image, num_classes, head, _pair(size), device, batch_size)
            return _predict_sliding_window(model, image, num_classes, head, roi_size, device, batch_size)
    finally:
        model.train(was_training)


def _predict_slices(
    model: nn.Module,
    image: np.ndarray,
    num_classes: int,
    head: Head,
    size: tuple[int, int],
    device: str | torch.device,
    batch_size: int,
) -> np.ndarray:
    depth, height, width = image.shape
    prediction = np.zeros(image.shape, dtype=np.int64)
    for start in range(0, depth, batch_size):
        stop = min(depth, start + batch_size)
        batch = np.stack([_resize_image_slice(image[i], size) for i in range(start, stop)])
        x = torch.from_numpy(batch).unsqueeze(1).to(device)
        logits = head(_outputs(model, x, num_classes), size)
        labels = logits.argmax(1).cpu().numpy()
        for offset, index in enumerate(range(start, stop)):
            prediction[index] = _resize_label_slice(labels[offset], (height, width))
    return prediction


def _predict_sliding_window(
    model: nn.Module,
    image: np.ndarray,
    num_classes: int,
    head: Head,
    roi_size: Sequence[int] | None,
    device: str | torch.device,
    batch_size: int,
) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    if roi_size is None or len(roi_size) != 3:
        raise ConfigError(
            f"a 3D model needs a sliding-window size of three numbers, got {roi_size!r}",
            field="roi_size",
            fix="Set the evaluation roi_size, e.g. [96, 96, 96]",
        )
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)

    def predictor(window: Tensor) -> Tensor:
        return head(_outputs(model, window, num_classes), window.shape[2:])

    logits = sliding_window_inference(
        x, roi_size=tuple(roi_size), sw_batch_size=batch_size, predictor=predictor, overlap=0.25, mode="gaussian"
    )
    return logits.argmax(1)[0].cpu().numpy().astype(np.int64)


def _outputs(model: nn.Module, x: Tensor, num_classes: int) -> list[Tensor]:
    outputs = model(x)
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    for index, p in enumerate(outputs):
        if p.ndim != x.ndim or p.shape[1] != num_classes:
            raise ConfigError(
                f"model output {index} has shape {tuple(p.shape)}, expected [B, {num_classes}, ...] "
                f"(one logit channel per class)",
                field="num_classes",
                fix="Evaluate with the number of classes the model was built for",
            )
    return outputs


def _resize_image_slice(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.shape == size:
        return image
    return zoom(image, (size[0] / image.shape[0], size[1] / image.shape[1]), order=3)


def _resize_label_slice(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if labels.shape == shape:
        return labels
    resized = zoom(labels, (shape[0] / labels.shape[0], shape[1] / labels.shape[1]), order=0)
    if resized.shape != shape:  # scipy rounds the output shape; guard the grid the metrics rely on
        raise RuntimeError(f"resizing a {labels.shape} prediction to {shape} gave {resized.shape}")
    return resized


def _check_volume(item: dict[str, Any], case: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    image, label = np.asarray(item["image"]), np.asarray(item["label"])
    if image.ndim != 3 or image.shape != label.shape:
        raise DataError(
            f"Case '{case}': evaluation needs whole volumes with image and label of the same [D, H, W] shape, got "
            f"image {image.shape} and label {label.shape}. Load the split with volumes=True."
        )
    low, high = int(label.min()), int(label.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"Case '{case}': label values span {low}..{high}, outside the {num_classes} classes being evaluated. "
            f"Check num_classes and the dataset's label mapping."
        )
    return image, label


def _foreground_names(dataset: Any, num_classes: int) -> list[str]:
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    declared = getattr(dataset, "num_classes", None)
    if declared is not None and declared != num_classes:
        raise ConfigError(
            f"num_classes is {num_classes} but the dataset has {declared} classes",
            field="num_classes",
            fix="Evaluate with the dataset's number of classes",
        )
    names = getattr(dataset, "class_names", None)
    if names is None:
        return [f"class{i}" for i in range(1, num_classes)]
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise DataError(
            f"The dataset names {len(names)} classes ({', '.join(names)}) but {num_classes} are evaluated; "
            f"class_names must list every class, background first."
        )
    return names[1:]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (int(size), int(size)) if isinstance(size, int | np.integer) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ConfigError(f"size must be one positive number or two (height, width), got {size!r}", field="size")
    return pair


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():  # an all-NaN column (class never present) stays NaN on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _format_number(value: float) -> str:
    return "nan" if math.isnan(value) else repr(float(value))


def _json_number(value: float) -> float | int | None:
    if isinstance(value, int):
        return value
    return None if math.isnan(value) else float(value)


def _write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` so that readers never see half a file (CSV rows keep their own newlines)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    return Path(path)
