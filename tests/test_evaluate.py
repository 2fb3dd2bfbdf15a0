"""Whole-volume evaluation against a naive slice-at-a-time reference loop scored with medpy."""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from medpy.metric.binary import dc, hd95
from scipy.ndimage import gaussian_filter, zoom
from torch import nn

import fusionsearch.evaluate as evaluate_module
from fusionsearch.criterion import build_criterion
from fusionsearch.errors import ConfigError, DataError
from fusionsearch.evaluate import evaluate_volumes, predict_volume

C = 4  # background + 3 organs
LEVELS = np.linspace(0.0, 1.0, C)  # intensity that stands for each class in the test images
SCALE = 60.0  # logit scale: the level margins become logit gaps of SCALE / 9 = 6.7


def level_conv(conv: nn.Module, levels: np.ndarray, bias_shift: np.ndarray | None = None) -> nn.Module:
    """A 1x1 conv whose argmax is the class with the nearest intensity level.

    -SCALE * (x - l_c)^2 = SCALE * (2 x l_c - l_c^2) - SCALE * x^2, and the last term is the same
    for every class, so the nearest-level rule is linear in x: weight 2 SCALE l_c, bias -SCALE l_c^2.
    """
    levels_t = torch.tensor(levels, dtype=torch.float32)
    with torch.no_grad():
        conv.weight.copy_((2 * SCALE * levels_t).view(-1, 1, *([1] * (conv.weight.dim() - 2))))
        bias = -SCALE * levels_t**2
        if bias_shift is not None:
            bias = bias + torch.tensor(bias_shift, dtype=torch.float32)
        conv.bias.copy_(bias)
    return conv


class LevelNet(nn.Module):
    """A tiny real multi-scale network with a known answer (three outputs, coarsest first).

    finest (full resolution): nearest intensity level; middle (1/2): nearest level with the class
    order reversed; coarsest (1/4): nearest level with a strong bias towards class 1. So ``last``
    predicts the encoded labels while ``sum`` and ``mixture`` visibly depart from them.
    """

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.spatial_dims, self.num_classes, self.num_outputs = spatial_dims, C, 3
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.pool = F.avg_pool2d if spatial_dims == 2 else F.avg_pool3d
        self.fine = level_conv(conv(1, C, 1), LEVELS)
        self.middle = level_conv(conv(1, C, 1), LEVELS[::-1].copy())
        self.coarse = level_conv(conv(1, C, 1), LEVELS, bias_shift=np.array([0.0, 12.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.coarse(self.pool(x, 4)), self.middle(self.pool(x, 2)), self.fine(x)]


class Volumes:
    """A tiny dataset of volume items with the dataset contract's optional attributes."""

    def __init__(self, items, class_names=None, num_classes=None):
        self.items, self.class_names, self.num_classes = items, class_names, num_classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def organ_labels(shape, seed, classes=(1, 2, 3)):
    """A label volume with one blobby organ per class (later classes painted over earlier ones)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.int64)
    for c in classes:
        noise = gaussian_filter(rng.random(shape), 1.5)
        label[noise > np.quantile(noise, 0.85)] = c
    return label


def volume_item(case, label, shown=None, noise=0.0, seed=0):
    """The image shows ``shown`` (default: the label) as intensity levels, plus optional noise."""
    shown = label if shown is None else shown
    image = LEVELS[shown] + noise * np.random.default_rng(seed).standard_normal(label.shape)
    return {"image": image.astype(np.float32), "label": label, "case": case}


def medpy_paper(pred, truth):
    if pred.sum() > 0 and truth.sum() > 0:
        return dc(pred, truth), hd95(pred, truth)
    if pred.sum() > 0:
        return 1.0, 0.0
    return 0.0, 0.0


def medpy_strict(pred, truth):
    if pred.any() and truth.any():
        return dc(pred, truth), hd95(pred, truth)
    if not pred.any() and not truth.any():
        return math.nan, math.nan
    return 0.0, float(np.sqrt(np.sum(np.square(truth.shape))))


def up(p, size):
    return F.interpolate(p, size=size, mode="bilinear", align_corners=False)


# Reference heads, written out term by term (independent of the evaluate module).
REFERENCE_HEADS = {
    "last": lambda outs, size: up(outs[2], size),
    "sum": lambda outs, size: up(outs[0], size) + up(outs[1], size) + up(outs[2], size),
}


def reference_prediction(net, image, size, head):
    """TransUNet's test_single_volume, one slice at a time: zoom order 3, net, head, argmax, zoom order 0."""
    prediction = np.zeros(image.shape, dtype=np.int64)
    for index in range(image.shape[0]):
        slice_ = image[index]
        x, y = slice_.shape
        if (x, y) != (size, size):
            slice_ = zoom(slice_, (size / x, size / y), order=3)
        with torch.no_grad():
            outputs = net(torch.from_numpy(slice_).unsqueeze(0).unsqueeze(0).float())
        out = head(outputs, (size, size)).argmax(1)[0].numpy()
        prediction[index] = zoom(out, (x / size, y / size), order=0) if (x, y) != (size, size) else out
    return prediction


def reference_scores(prediction, label, score):
    return [score(prediction == c, label == c) for c in range(1, C)]


def assert_scores_equal(got_dice, got_hd95, expected):
    for column, (dice, dist) in enumerate(expected):
        for got, want in [(got_dice[column], dice), (got_hd95[column], dist)]:
            assert (math.isnan(got) and math.isnan(want)) or got == want


@pytest.fixture(scope="module")
def resized_cases():
    """Two noisy volumes on an odd in-plane grid (37 x 53), so both resizes really happen."""
    shape = (5, 37, 53)
    return [volume_item(f"case{i}", organ_labels(shape, seed=i), noise=0.08, seed=10 + i) for i in range(2)]


@pytest.mark.parametrize("head", ["last", "sum"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_slice_inference_equals_the_reference_loop(resized_cases, head, batch_size):
    net = LevelNet()
    result = evaluate_volumes(
        net, resized_cases, num_classes=C, size=24, head=head, batch_size=batch_size, progress=False
    )
    assert result.cases == ["case0", "case1"] and result.head == head
    for row, item in enumerate(resized_cases):
        expected = reference_prediction(net, item["image"], 24, REFERENCE_HEADS[head])
        assert_scores_equal(result.dice[row], result.hd95[row], reference_scores(expected, item["label"], medpy_paper))


def test_last_head_prediction_is_the_known_answer_and_keeps_the_grid(resized_cases):
    """With the last head, the net picks the nearest intensity level of the resized slice."""
    image = resized_cases[0]["image"]
    prediction = predict_volume(LevelNet(), image, num_classes=C, size=24, batch_size=4)
    assert prediction.shape == image.shape and prediction.dtype == np.int64
    for index in range(image.shape[0]):
        small = zoom(image[index], (24 / 37, 24 / 53), order=3)
        nearest = np.abs(small[..., None] - LEVELS).argmin(-1)
        assert np.array_equal(prediction[index], zoom(nearest, (37 / 24, 53 / 24), order=0))


def test_heads_differ_as_expected(resized_cases):
    image = resized_cases[0]["image"]
    net = LevelNet()
    last = predict_volume(net, image, num_classes=C, size=24, head="last")
    summed = predict_volume(net, image, num_classes=C, size=24, head="sum")
    assert np.mean(last != summed) > 0.05  # the biased coarse output pulls the sum towards class 1
    assert np.sum(summed == 1) > np.sum(last == 1)


def term_names(num_scales, operators):
    names = [f"P{i}" for i in range(num_scales)]
    for op in operators:
        for k in range(2, num_scales + 1):
            names += [f"{op}({','.join(map(str, s))})" for s in itertools.combinations(range(num_scales), k)]
    return names


@pytest.fixture
def fixed_weight_criterion(tmp_path):
    """A real criterion (add + mul over 3 scales, K = 11) with fixed weights: add(1,2) 3, P2 1, rest 0.5."""
    names = term_names(3, ["add", "mul"])
    values = [3.0 if n == "add(1,2)" else 1.0 if n == "P2" else 0.5 for n in names]
    space = {"operators": ["add", "mul"], "weighting": {"kind": "fixed", "values": values}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    criterion = build_criterion(path, num_scales=3, num_classes=C, spatial_dims=2)
    assert criterion.terms == names
    return criterion


MIXTURES = {  # top_k -> (reference head, expected renormalised term weights); ties go to term order (P0 first)
    1: (lambda o, s: up(o[1], s) + up(o[2], s), {"add(1,2)": 1.0}),
    2: (lambda o, s: 0.75 * (up(o[1], s) + up(o[2], s)) + 0.25 * up(o[2], s), {"add(1,2)": 0.75, "P2": 0.25}),
    3: (
        lambda o, s: (3 * (up(o[1], s) + up(o[2], s)) + up(o[2], s) + 0.5 * up(o[0], s)) / 4.5,
        {"add(1,2)": 3 / 4.5, "P2": 1 / 4.5, "P0": 0.5 / 4.5},
    ),
}


@pytest.mark.parametrize("top_k", sorted(MIXTURES))
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_mixture_head_is_the_renormalised_top_k_terms(
    resized_cases, fixed_weight_criterion, monkeypatch, top_k, chunk_bytes
):
    if chunk_bytes is not None:  # force one sample per mix() call: chunking must not change the result
        monkeypatch.setattr(evaluate_module, "_MIXTURE_CHUNK_BYTES", chunk_bytes)
    reference_head, expected_terms = MIXTURES[top_k]
    net = LevelNet()
    result = evaluate_volumes(
        net,
        resized_cases,
        num_classes=C,
        size=24,
        head="mixture",
        criterion=fixed_weight_criterion,
        mixture_top_k=top_k,
        progress=False,
    )
    assert list(result.mixture_terms) == list(expected_terms)
    assert result.mixture_terms == pytest.approx(expected_terms)
    for row, item in enumerate(resized_cases):
        expected = reference_prediction(net, item["image"], 24, reference_head)
        assert_scores_equal(result.dice[row], result.hd95[row], reference_scores(expected, item["label"], medpy_paper))


def known_answer_cases():
    """24 x 24 slices (no resizing), noise-free: the last head predicts exactly what the image shows.

    full: every organ shown as labelled; partial: organ 3 absent from both; missed: organ 3 shown as
    organ 2; hallucinated: organ 3 absent from the label but shown in a corner.
    """
    shape = (4, 24, 24)
    full = organ_labels(shape, 1)
    partial = organ_labels(shape, 2, classes=(1, 2))
    missed = organ_labels(shape, 3)
    hallucinated = organ_labels(shape, 4, classes=(1, 2))
    shown_hallucinated = hallucinated.copy()
    shown_hallucinated[0, :3, :3] = 3
    return [
        volume_item("full", full),
        volume_item("partial", partial),
        volume_item("missed", missed, shown=np.where(missed == 3, 2, missed)),
        volume_item("hallucinated", hallucinated, shown=shown_hallucinated),
    ]


@pytest.mark.parametrize(("protocol", "score"), [("paper", medpy_paper), ("strict", medpy_strict)])
def test_protocols_on_known_answers(tmp_path, protocol, score):
    items = known_answer_cases()
    dataset = Volumes(items, class_names=["background", "liver", "kidney", "spleen"], num_classes=C)
    result = evaluate_volumes(LevelNet(), dataset, num_classes=C, size=24, protocol=protocol, progress=False)
    assert result.class_names == ["liver", "kidney", "spleen"]

    expected = []
    for row, item in enumerate(items):
        shown = np.abs(item["image"][..., None] - LEVELS).argmin(-1)  # what the net must predict
        expected.append(reference_scores(shown, item["label"], score))
        assert_scores_equal(result.dice[row], result.hd95[row], expected[-1])
    # the protocols' rules are really exercised: a miss, a hallucination and an absent organ
    miss, hallucination, absent = expected[2][2], expected[3][2], expected[1][2]
    if protocol == "paper":
        assert (miss, hallucination, absent) == ((0.0, 0.0), (1.0, 0.0), (0.0, 0.0))
    else:
        assert miss == hallucination == (0.0, pytest.approx(math.sqrt(4**2 + 24**2 + 24**2)))
        assert all(math.isnan(v) for v in absent)

    # means: over the cases that count, per class, then over classes (naive loops)
    per_class_dice, per_class_hd95 = [], []
    for column, name in enumerate(result.class_names):
        kept = [scores[column] for scores in expected if not math.isnan(scores[column][0])]
        per_class_dice.append(sum(d for d, _ in kept) / len(kept))
        per_class_hd95.append(sum(h for _, h in kept) / len(kept))
        row = result.per_class()[name]
        assert row["cases"] == len(kept)
        assert row["dice"] == pytest.approx(per_class_dice[-1], rel=1e-12)
        assert row["hd95"] == pytest.approx(per_class_hd95[-1], rel=1e-12)
    assert result.mean_dice == pytest.approx(sum(per_class_dice) / 3, rel=1e-12)
    assert result.mean_hd95 == pytest.approx(sum(per_class_hd95) / 3, rel=1e-12)

    # CSV: one row per case; JSON: strict (no NaN literal) summary
    with open(result.to_csv(tmp_path / "out" / "cases.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["case"] for r in rows] == ["full", "partial", "missed", "hallucinated"]
    for row, scores in zip(rows, expected, strict=True):
        for name, (dice, dist) in zip(result.class_names, scores, strict=True):
            assert float(row[f"{name}_dice"]) == pytest.approx(dice, nan_ok=True, rel=1e-15)
            assert float(row[f"{name}_hd95"]) == pytest.approx(dist, nan_ok=True, rel=1e-15)

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    summary = json.loads(result.to_json(tmp_path / "out" / "summary.json").read_text(), parse_constant=no_nan)
    assert summary["protocol"] == protocol and summary["num_cases"] == 4
    assert summary["mean_dice"] == pytest.approx(result.mean_dice, rel=1e-15)
    assert summary["per_class"]["spleen"]["cases"] == (4 if protocol == "paper" else 3)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cases.csv", "summary.json"]  # no temp files

    table = result.format_table()
    assert "spleen" in table and f"{100 * result.mean_dice:.2f}" in table and protocol in table


class LevelNet3d(LevelNet):
    def __init__(self) -> None:
        super().__init__(spatial_dims=3)


def test_sliding_window_inference_for_3d_models():
    """Pointwise finest output: blending overlapping windows keeps the known per-voxel answer."""
    label = organ_labels((9, 14, 11), 7)
    items = [volume_item("vol", label)]
    net = LevelNet3d()
    result = evaluate_volumes(net, items, num_classes=C, roi_size=(4, 8, 8), batch_size=2, progress=False)
    expected = reference_scores(label, label, medpy_paper)
    assert_scores_equal(result.dice[0], result.hd95[0], expected)
    assert np.array_equal(predict_volume(net, items[0]["image"], num_classes=C, roi_size=(4, 8, 8)), label)
    with pytest.raises(ConfigError, match="roi_size"):
        predict_volume(net, items[0]["image"], num_classes=C)


def test_model_mode_is_restored(resized_cases):
    net = LevelNet().train()
    evaluate_volumes(net, resized_cases[:1], num_classes=C, size=24, progress=False)
    assert net.training


def _bad_label_item():
    item = volume_item("bad", organ_labels((2, 24, 24), 0))
    item["label"] = item["label"] + 1  # values 1..4 with only 4 classes
    return item


class NoDims(nn.Module):
    def forward(self, x):
        return [x]


@pytest.mark.parametrize(
    ("model", "dataset", "kwargs", "error", "match"),
    [
        (LevelNet(), [_bad_label_item()], {}, DataError, "outside the 4 classes"),
        (LevelNet(), [], {}, DataError, "no volumes"),
        (LevelNet(), [{"image": np.zeros((2, 8, 8), np.float32), "label": np.zeros((2, 8, 9)), "case": "x"}], {},
         DataError, "same"),
        (LevelNet(), known_answer_cases()[1:2], {"num_classes": 3}, ConfigError, "num_classes"),
        (LevelNet(), Volumes(known_answer_cases()[:1], num_classes=5), {}, ConfigError, "dataset has 5"),
        (LevelNet(), Volumes(known_answer_cases()[:1], class_names=["bg", "a"]), {}, DataError, "class_names"),
        (LevelNet(), known_answer_cases()[:1], {"head": "mean"}, ConfigError, "head"),
        (LevelNet(), known_answer_cases()[:1], {"head": "mixture"}, ConfigError, "criterion"),
        (LevelNet(), known_answer_cases()[:1], {"protocol": "monai"}, ConfigError, "protocol"),
        (NoDims(), known_answer_cases()[:1], {}, ConfigError, "spatial_dims"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error(model, dataset, kwargs, error, match):
    options = {"num_classes": C, "size": 24, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        evaluate_volumes(model, dataset, **options)


@pytest.mark.parametrize("top_k", [0, 12])
def test_mixture_top_k_out_of_range(fixed_weight_criterion, top_k):
    with pytest.raises(ConfigError, match="mixture_top_k"):
        evaluate_volumes(
            LevelNet(),
            known_answer_cases()[:1],
            num_classes=C,
            size=24,
            head="mixture",
            criterion=fixed_weight_criterion,
            mixture_top_k=top_k,
            progress=False,
        )
