"""Per-class, per-volume Dice and HD95 under the two scoring protocols fusionsearch reports.

``paper`` reproduces the TransUNet family's evaluation (DESIGN.md) so that our numbers can be set
beside the published ones: Dice and HD95 exactly as ``medpy.metric.binary.dc`` / ``hd95`` compute
them (voxel units, surface connectivity 1, the 95th percentile of the *pooled* directed surface
distances), with the reference's rules for empty masks (prediction without truth -> (1, 0),
otherwise (0, 0)). Those rules reward a hallucinated organ and hide a missed one, so ``strict``
scores both as failures: Dice 0 and HD95 equal to the volume diagonal; a class absent from both
prediction and truth is excluded (NaN) instead of counted.

medpy is not a runtime dependency: the distances are computed here with scipy.ndimage, and the
tests check the result against medpy bit for bit. MONAI's ``compute_hausdorff_distance`` is not a
substitute (see docs/evaluation.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from fusionsearch.errors import ConfigError, DataError

PROTOCOLS = ("paper", "strict")


def dice_hd95(
    pred: np.ndarray,
    truth: np.ndarray,
    protocol: str = "paper",
    *,
    spacing: float | Sequence[float] | None = None,
) -> tuple[float, float]:
    """Dice and HD95 of one class in one volume (2D or 3D boolean masks of the same shape).

    ``protocol="paper"``: medpy's ``dc`` and ``hd95`` in voxel units when both masks are non-empty;
    (1.0, 0.0) when only the prediction is non-empty; (0.0, 0.0) otherwise.
    ``protocol="strict"``: as ``paper`` when both are non-empty; (0.0, volume diagonal) when exactly
    one is empty; (nan, nan) when both are empty (the class is excluded from the means).
    ``spacing`` (strict only; per-axis voxel size or one number for all axes) gives HD95 and the
    diagonal in physical units; None means voxel units.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"unknown evaluation protocol {protocol!r}",
            field="protocol",
            fix=f"Use one of: {', '.join(PROTOCOLS)}",
        )
    pred = _as_mask(pred, "pred")
    truth = _as_mask(truth, "truth")
    if pred.shape != truth.shape:
        raise DataError(
            f"Prediction and ground truth masks differ in shape: {pred.shape} vs {truth.shape}. Resize the "
            f"prediction back to the label's grid before scoring."
        )
    if protocol == "paper" and spacing is not None:
        raise ConfigError(
            "the 'paper' protocol measures HD95 in voxel units, as the TransUNet family does, so it takes no spacing",
            field="spacing",
            fix="Drop spacing, or use protocol='strict' for physical distances",
        )
    sampling = _normalise_spacing(spacing, pred.ndim)

    pred_any = bool(pred.any())
    truth_any = bool(truth.any())
    if pred_any and truth_any:
        return _dice(pred, truth), _hd95(pred, truth, sampling)
    if protocol == "paper":
        return (1.0, 0.0) if pred_any else (0.0, 0.0)
    if not pred_any and not truth_any:
        return math.nan, math.nan
    return 0.0, volume_diagonal(pred.shape, sampling)


def volume_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Length of the diagonal of the volume's extent, sqrt(sum((n_i * s_i)^2)).

    It bounds every distance between two voxels of the grid, so a missed or hallucinated organ
    always scores worse than any prediction that overlaps the right region.
    """
    steps = [1.0] * len(shape) if spacing is None else list(spacing)
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, steps, strict=True))))


def _as_mask(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise DataError(
            f"'{name}' must be a 2D or 3D mask of one class, got an array with shape {array.shape}. Pass "
            f"(label_map == class_index) for one volume."
        )
    if array.dtype == np.bool_:
        return array
    values = np.unique(array)
    if not np.isin(values, (0, 1)).all():
        raise DataError(
            f"'{name}' must be a boolean mask of one class, got a {array.dtype} array with values "
            f"{values[:6].tolist()}. Pass (label_map == class_index), not the label map itself."
        )
    return array.astype(bool)


def _normalise_spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    values = (float(spacing),) * ndim if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ConfigError(
            f"spacing must be one positive number or {ndim} positive numbers (one per axis), got {spacing!r}",
            field="spacing",
        )
    return values


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|A n B| / (|A| + |B|), the same float operations as medpy's ``dc``."""
    intersection = np.count_nonzero(pred & truth)
    return float(2.0 * intersection / float(np.count_nonzero(pred) + np.count_nonzero(truth)))


def _hd95(pred: np.ndarray, truth: np.ndarray, sampling: tuple[float, ...] | None) -> float:
    """95th percentile of both directed surface-distance sets pooled together (medpy's ``hd95``).

    Both masks are first cropped to the bounding box of their union: erosion treats the outside as
    background either way and Euclidean distances do not depend on the grid's extent, so the result
    is unchanged while whole CT volumes are scored in a fraction of the time.
    """
    window = _bounding_box(pred | truth)
    pred, truth = pred[window], truth[window]
    structure = generate_binary_structure(pred.ndim, 1)
    pred_surface = pred ^ binary_erosion(pred, structure=structure, iterations=1)
    truth_surface = truth ^ binary_erosion(truth, structure=structure, iterations=1)
    pred_to_truth = distance_transform_edt(~truth_surface, sampling=sampling)[pred_surface]
    truth_to_pred = distance_transform_edt(~pred_surface, sampling=sampling)[truth_surface]
    return float(np.percentile(np.hstack((pred_to_truth, truth_to_pred)), 95))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    window = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other_axes))
        window.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(window)
