"""dice_hd95 against medpy (the paper protocol's definition), the strict rules, and the MONAI trap."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from medpy.metric.binary import dc, hd95
from scipy.ndimage import gaussian_filter

from fusionsearch.errors import ConfigError, DataError
from fusionsearch.metrics import dice_hd95

SHAPES = [(24, 31), (48, 40), (7, 19, 23), (12, 16, 10)]


def blob(shape: tuple[int, ...], seed: int, density: float, sigma: float = 1.5) -> np.ndarray:
    """A random blobby mask covering about ``density`` of the grid (smoothed noise, thresholded)."""
    noise = gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return noise > np.quantile(noise, 1.0 - density)


def medpy_paper(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The TransUNet family's calculate_metric_percase, written out with medpy."""
    if pred.sum() > 0 and truth.sum() > 0:
        return dc(pred, truth), hd95(pred, truth)
    if pred.sum() > 0:
        return 1.0, 0.0
    return 0.0, 0.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("density", [0.03, 0.2, 0.6])
def test_paper_equals_medpy_on_random_blobs(shape, seed, density):
    pred = blob(shape, seed, density)
    truth = blob(shape, seed + 100, density * 1.3)
    assert dice_hd95(pred, truth, "paper") == medpy_paper(pred, truth)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_paper_equals_medpy_on_speckle_and_overlapping_masks(shape, seed):
    """Scattered single voxels (many tiny surfaces) and a prediction that shares most of the truth."""
    rng = np.random.default_rng(seed)
    speckle = rng.random(shape) < 0.05
    truth = blob(shape, seed, 0.3)
    pred = truth ^ (rng.random(shape) < 0.1)
    for a, b in [(speckle, truth), (pred, truth), (truth, speckle)]:
        assert dice_hd95(a, b) == medpy_paper(a, b)


@pytest.mark.parametrize("ndim", [2, 3])
def test_masks_touching_the_grid_edge_equal_medpy(ndim):
    """The bounding-box crop must not change surfaces that lie on the volume's border."""
    shape = (9, 11, 13)[:ndim]
    full = np.ones(shape, dtype=bool)
    corner = np.zeros(shape, dtype=bool)
    corner[(slice(0, 4),) * ndim] = True
    single = np.zeros(shape, dtype=bool)
    single[(4,) * ndim] = True
    for a, b in [(full, corner), (corner, full), (single, corner), (single, single), (full, full)]:
        assert dice_hd95(a, b) == medpy_paper(a, b)


@pytest.mark.parametrize("shape", [(20, 30), (6, 10, 14)])
@pytest.mark.parametrize(("pred_empty", "truth_empty"), [(False, False), (False, True), (True, False), (True, True)])
def test_paper_rules_for_every_emptiness_combination(shape, pred_empty, truth_empty):
    pred = np.zeros(shape, bool) if pred_empty else blob(shape, 1, 0.2)
    truth = np.zeros(shape, bool) if truth_empty else blob(shape, 2, 0.2)
    expected = {(False, True): (1.0, 0.0), (True, False): (0.0, 0.0), (True, True): (0.0, 0.0)}
    got = dice_hd95(pred, truth, "paper")
    assert got == expected.get((pred_empty, truth_empty), medpy_paper(pred, truth))


@pytest.mark.parametrize("shape", [(20, 30), (6, 10, 14)])
@pytest.mark.parametrize("spacing", [None, 0.7, "per-axis"])
@pytest.mark.parametrize(("pred_empty", "truth_empty"), [(False, False), (False, True), (True, False), (True, True)])
def test_strict_rules(shape, spacing, pred_empty, truth_empty):
    if spacing == "per-axis":
        spacing = tuple(0.5 + 0.75 * i for i in range(len(shape)))
    pred = np.zeros(shape, bool) if pred_empty else blob(shape, 3, 0.25)
    truth = np.zeros(shape, bool) if truth_empty else blob(shape, 4, 0.25)
    dice, dist = dice_hd95(pred, truth, "strict", spacing=spacing)
    steps = np.ones(len(shape)) if spacing is None else np.broadcast_to(np.asarray(spacing, float), (len(shape),))
    diagonal = float(np.linalg.norm(np.asarray(shape) * steps))
    if pred_empty and truth_empty:
        assert math.isnan(dice) and math.isnan(dist)
    elif pred_empty or truth_empty:
        assert (dice, dist) == (0.0, pytest.approx(diagonal, rel=1e-12))
    else:
        assert (dice, dist) == (dc(pred, truth), hd95(pred, truth, voxelspacing=spacing))


def test_strict_scores_a_miss_worse_than_any_overlap():
    shape = (16, 16)
    truth = np.zeros(shape, bool)
    truth[0, 0] = True
    far = np.zeros(shape, bool)
    far[-1, -1] = True
    _, miss = dice_hd95(np.zeros(shape, bool), truth, "strict")
    _, worst_overlap = dice_hd95(far, truth, "strict")
    assert miss > worst_overlap == pytest.approx(15 * math.sqrt(2))


def test_integer_zero_one_masks_are_accepted():
    pred, truth = blob((20, 20), 5, 0.3), blob((20, 20), 6, 0.3)
    assert dice_hd95(pred.astype(np.uint8), truth.astype(np.int64)) == dice_hd95(pred, truth)


@pytest.mark.parametrize(
    ("pred", "truth", "kwargs", "error", "match"),
    [
        (np.zeros((4, 4), bool), np.zeros((4, 5), bool), {}, DataError, "differ in shape"),
        (np.full((4, 4), 3), np.zeros((4, 4), bool), {}, DataError, "not the label map"),
        (np.zeros(4, bool), np.zeros(4, bool), {}, DataError, "2D or 3D"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), bool), {"protocol": "monai"}, ConfigError, "protocol"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), bool), {"spacing": 1.0}, ConfigError, "voxel units"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), bool), {"protocol": "strict", "spacing": (1, 2, 3)}, ConfigError,
         "spacing"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), bool), {"protocol": "strict", "spacing": -1.0}, ConfigError,
         "spacing"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error(pred, truth, kwargs, error, match):
    with pytest.raises(error, match=match):
        dice_hd95(pred, truth, **kwargs)


def _monai_hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    from monai.metrics import compute_hausdorff_distance

    def as_batch(mask):
        return torch.from_numpy(mask)[None, None]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about deprecated arguments and empty masks
        distance = compute_hausdorff_distance(as_batch(pred), as_batch(truth), include_background=True, percentile=95)
    return distance.item()


def test_monai_hd95_is_not_the_paper_hd95():
    """The documented trap: MONAI takes the 95th percentile of each directed set and then the max;
    medpy (the paper protocol) pools both sets before taking the percentile. A small far-away
    false-positive island is enough to tell them apart, and MONAI turns a missed organ into NaN."""
    truth = np.zeros((32, 32), bool)
    truth[4:12, 4:12] = True
    pred = truth.copy()
    pred[25:27, 25:27] = True

    ours = dice_hd95(pred, truth)[1]
    assert ours == hd95(pred, truth)
    assert _monai_hd95(pred, truth) != pytest.approx(ours, abs=0.1)

    missed = np.zeros_like(truth)
    assert math.isnan(_monai_hd95(missed, truth))
    assert dice_hd95(missed, truth, "paper") == (0.0, 0.0)
    assert dice_hd95(missed, truth, "strict") == (0.0, pytest.approx(32 * math.sqrt(2)))
