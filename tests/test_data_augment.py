"""Augmentation and resizing against naive re-implementations of the reference protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from fusionsearch.data.augment import (
    augment_slice,
    augment_volume,
    crop_or_pad,
    random_rot_flip,
    random_rotate,
    resize_slice,
    rng_for,
    sample_patch_start,
)


def labels_2d(seed=0, shape=(12, 10)):
    """A label map with several classes and no symmetry."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.int64)
    label[2:6, 1:4] = 1
    label[7:11, 5:9] = 2
    label[1, 8] = 3
    label[rng.random(shape) < 0.05] = 4
    return label


def naive_rot90(array, k):
    """Counter-clockwise rotation by k quarter turns, one element at a time."""
    for _ in range(k % 4):
        rows, cols = array.shape
        out = np.empty((cols, rows), dtype=array.dtype)
        for i in range(rows):
            for j in range(cols):
                out[cols - 1 - j, i] = array[i, j]
        array = out
    return array


def dihedral_reflections(array):
    """The four mirror images of a 2D array (flip after any rotation), computed with naive loops."""
    out = []
    for k in range(4):
        rotated = naive_rot90(array, k)
        out.append(rotated[::-1, :])
        out.append(rotated[:, ::-1])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_rot_flip_gives_a_reflection_and_keeps_alignment(seed):
    label = labels_2d(seed)
    image = label.astype(np.float32)
    out_image, out_label = random_rot_flip(image, label, np.random.default_rng(seed))
    assert any(out_label.shape == r.shape and np.array_equal(out_label, r) for r in dihedral_reflections(label))
    np.testing.assert_array_equal(out_image, out_label.astype(np.float32))


@pytest.mark.parametrize("seed", range(8))
def test_rotation_keeps_values_alignment_and_turns_by_at_most_20_degrees(seed):
    size = 41
    label = np.zeros((size, size), dtype=np.int64)
    label[4:9, 18:23] = 7  # an off-centre block: its centroid turns about the centre
    image = label.astype(np.float32)
    out_image, out_label = random_rotate(image, label, np.random.default_rng(seed))
    assert out_label.shape == label.shape
    assert set(np.unique(out_label)) <= {0, 7}
    np.testing.assert_array_equal(out_image, out_label.astype(np.float32))
    centre = (size - 1) / 2
    before = np.argwhere(label == 7).mean(0) - centre
    after = np.argwhere(out_label == 7).mean(0) - centre
    turn = math.degrees(math.atan2(after[0], after[1]) - math.atan2(before[0], before[1]))
    assert abs(turn) <= 20.5
    assert abs(np.hypot(*after) - np.hypot(*before)) < 1.0  # a rotation, not a shift


def test_branch_frequencies_follow_the_reference_protocol():
    # random classes everywhere, large enough that even a 1 degree turn moves some pixels
    label = np.random.default_rng(1).integers(0, 5, (61, 57))
    counts = {"reflection": 0, "unchanged": 0, "rotated": 0}
    reflections = dihedral_reflections(label)
    trials = 400
    for index in range(trials):
        _, out = augment_slice(label.astype(np.float32), label, rng_for(11, 0, index))
        if any(out.shape == r.shape and np.array_equal(out, r) for r in reflections):
            counts["reflection"] += 1
        elif np.array_equal(out, label):
            counts["unchanged"] += 1
        else:
            counts["rotated"] += 1
    # p=0.5 rot90+flip; else p=0.5 rotation (an angle of 0 leaves it unchanged: 1/41); else unchanged
    assert abs(counts["reflection"] / trials - 0.5) < 0.08
    assert abs(counts["unchanged"] / trials - 0.25 * (1 + 1 / 41)) < 0.08
    assert abs(counts["rotated"] / trials - 0.25 * (1 - 1 / 41)) < 0.08


def test_augmentation_depends_only_on_seed_epoch_index():
    label = labels_2d(2, (16, 16))
    image = np.random.default_rng(0).random((16, 16)).astype(np.float32)

    def run(seed, epoch, index):
        return augment_slice(image, label, rng_for(seed, epoch, index))

    for key in [(0, 0, 0), (5, 3, 17), (2222, 299, 2210)]:
        a, b = run(*key), run(*key)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    outputs = [run(5, epoch, 17)[0] for epoch in range(8)]
    assert len({o.tobytes() for o in outputs}) > 1


@pytest.mark.parametrize(("shape", "size"), [((8, 8), (16, 16)), ((7, 9), (14, 10)), ((20, 12), (5, 6))])
def test_resize_labels_nearest_like_a_naive_loop_and_images_cubic(shape, size):
    label = np.random.default_rng(3).integers(0, 5, shape)
    image = np.random.default_rng(4).random(shape)
    out_image, out_label = resize_slice(image, label, size)
    assert out_label.shape == size and out_image.shape == size
    # scipy's zoom (grid_mode=False) maps output o to input o * (n_in - 1) / (n_out - 1)
    expected = np.empty(size, dtype=label.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            si = i * (shape[0] - 1) / (size[0] - 1)
            sj = j * (shape[1] - 1) / (size[1] - 1)
            expected[i, j] = label[int(math.floor(si + 0.5)), int(math.floor(sj + 0.5))]
    np.testing.assert_array_equal(out_label, expected)
    reference = ndimage.zoom(image, (size[0] / shape[0], size[1] / shape[1]), order=3)
    np.testing.assert_allclose(out_image, reference)
    np.testing.assert_allclose(out_image[0, 0], image[0, 0], atol=1e-9)  # corners are kept exactly
    np.testing.assert_allclose(out_image[-1, -1], image[-1, -1], atol=1e-9)


def test_resize_to_the_same_size_is_a_no_op():
    label = labels_2d()
    image = label.astype(np.float32)
    out_image, out_label = resize_slice(image, label, label.shape)
    assert out_image is image and out_label is label


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("shape", [(6, 6, 6), (4, 8, 8), (5, 7, 9)])
def test_volume_augmentation_keeps_shape_values_and_alignment(seed, shape):
    rng = np.random.default_rng(seed)
    label = (rng.random(shape) < 0.2).astype(np.int64) * rng.integers(1, 4, shape)
    image = label.astype(np.float32)
    out_image, out_label = augment_volume(image, label, rng_for(seed, 1, 2))
    assert out_label.shape == shape
    assert set(np.unique(out_label)) <= set(np.unique(label))
    np.testing.assert_array_equal(out_image, out_label.astype(np.float32))
    again = augment_volume(image, label, rng_for(seed, 1, 2))[1]
    np.testing.assert_array_equal(again, out_label)


def test_crop_or_pad_against_explicit_indexing():
    array = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    start, size = (-2, 3, 4), (4, 5, 6)
    out = crop_or_pad(array, start, size)
    for index in np.ndindex(*size):
        source = tuple(s + i for s, i in zip(start, index, strict=True))
        inside = all(0 <= p < n for p, n in zip(source, array.shape, strict=True))
        assert out[index] == (array[source] if inside else 0)


def test_foreground_patches_contain_foreground():
    label = np.zeros((20, 20, 20), dtype=np.int64)
    label[15, 3, 17] = 1
    hits = 0
    for index in range(40):
        start = sample_patch_start(label, (6, 6, 6), rng_for(0, 0, index), foreground_probability=1.0)
        patch = crop_or_pad(label, start, (6, 6, 6))
        assert all(0 <= s <= 14 for s in start)  # windows that fit stay inside the volume
        hits += int(patch.any())
    assert hits == 40
