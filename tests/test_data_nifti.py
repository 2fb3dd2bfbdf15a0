"""The generic nifti_folder reader: layouts, name matching, axis, 2D slices, 3D patches, num_classes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import fusionsearch as fs
from fusionsearch.data.io import DataWarning
from fusionsearch.data.phantoms import synapse_phantom
from fusionsearch.errors import ConfigError

SHAPE = (20, 24, 6)  # x, y, z of the stored volumes


def phantom_pair(number):
    """An (image, label) pair in NIfTI (x, y, z) order, labels 0..8."""
    image, label = synapse_phantom(3, number, SHAPE[2], SHAPE[0], labels="synapse9")
    image = image.transpose(1, 2, 0)[:, : SHAPE[1] - 4]  # non-square in-plane: x 20, y 16
    label = label.transpose(1, 2, 0)[:, : SHAPE[1] - 4]
    return image, label


def write_folder(root, images, labels, numbers, suffix="_0000"):
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / labels).mkdir(parents=True, exist_ok=True)
    arrays = {}
    for n in numbers:
        image, label = phantom_pair(n)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / images / f"abd_{n:03d}{suffix}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / labels / f"abd_{n:03d}.nii.gz")
        arrays[f"abd_{n:03d}"] = (image, label)
    return arrays


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti") / "msd"
    arrays = write_folder(root, "imagesTr", "labelsTr", range(1, 8))
    arrays.update(write_folder(root, "imagesTs", "labelsTs", range(20, 22)))
    (root / "dataset.json").write_text(json.dumps({"labels": {str(i): f"organ{i}" for i in range(9)}}))
    return root, arrays


def minmax(volume):
    volume = volume.astype(np.float64)
    return (volume - volume.min()) / (volume.max() - volume.min())


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volumes_put_the_slicing_axis_first(msd, axis):
    root, arrays = msd
    test = fs.build_dataset("nifti_folder", root, "test", axis=axis)
    assert test.cases == ["abd_020", "abd_021"]
    item = test[1]
    image, label = arrays["abd_021"]
    np.testing.assert_allclose(item["image"], np.moveaxis(minmax(image), axis, 0), atol=1e-6)
    np.testing.assert_array_equal(item["label"], np.moveaxis(label, axis, 0))


def test_dataset_json_gives_classes_and_names(msd):
    root, _ = msd
    ds = fs.build_dataset("nifti_folder", root, "valid")
    assert ds.num_classes == 9 and ds.class_names == [f"organ{i}" for i in range(9)]


def test_training_slices_and_split_properties(msd):
    root, arrays = msd
    train = fs.build_dataset("nifti_folder", root, "train", size=16, val_fraction=0.3)
    valid = fs.build_dataset("nifti_folder", root, "valid", val_fraction=0.3)
    assert len(valid.cases) == 2 and len(train.cases) == 5
    assert sorted(train.cases + valid.cases) == [f"abd_{n:03d}" for n in range(1, 8)]
    assert len(train) == 5 * SHAPE[2]
    item = train[SHAPE[2] + 1]
    assert item["image"].shape == (1, 16, 16) and item["case"] == train.cases[1] and item["slice"] == 1
    plain = fs.build_dataset("nifti_folder", root, "train", size=None, augment=False, val_fraction=0.3)
    image, label = arrays[plain.cases[0]]
    np.testing.assert_array_equal(plain[3]["label"].numpy(), label[:, :, 3])
    np.testing.assert_allclose(plain[3]["image"][0].numpy(), minmax(image)[:, :, 3], atol=1e-6)


def test_patches_3d(msd):
    root, _ = msd
    ds = fs.build_dataset("nifti_folder", root, "train", spatial_dims=3, patch_size=[4, 8, 8], patches_per_volume=3)
    assert ds.spatial_dims == 3 and len(ds) == 3 * len(ds.cases)
    ds.set_epoch(1)
    item = ds[4]
    assert item["image"].shape == (1, 4, 8, 8) and item["label"].shape == (4, 8, 8)
    assert item["case"] == ds.cases[1]
    assert ds[4]["image"].equal(item["image"])  # deterministic per (seed, epoch, index)
    big = fs.build_dataset("nifti_folder", root, "train", spatial_dims=3, patch_size=[8, 32, 32], augment=False)
    assert big[0]["image"].shape == (1, 8, 32, 32)  # larger than the volume: padded
    volume = fs.build_dataset("nifti_folder", root, "test", spatial_dims=3)[0]
    assert volume["image"].shape == (SHAPE[2], SHAPE[0], SHAPE[1] - 4)


def test_plain_layout_with_inferred_classes_and_clip(tmp_path):
    arrays = write_folder(tmp_path, "images", "labels", range(1, 6), suffix="")
    with pytest.warns(DataWarning, match="scanning all 5 label files"):
        ds = fs.build_dataset("nifti_folder", tmp_path, "test", clip=[-125, 275])
    highest = max(int(label.max()) for _, label in arrays.values())
    assert ds.num_classes == highest + 1 and ds.class_names[0] == "background" and len(ds.cases) == 1
    image, _ = arrays[ds.cases[0]]
    expected = (np.clip(image, -125, 275) + 125) / 400
    np.testing.assert_allclose(ds[0]["image"], np.moveaxis(expected, 2, 0), atol=1e-6)
    zscore = fs.build_dataset("nifti_folder", tmp_path, "test", num_classes=9, normalize="zscore")[0]["image"]
    assert abs(float(zscore.mean())) < 1e-4 and abs(float(zscore.std()) - 1) < 1e-3


def test_unmatched_files_and_extra_channels_are_named(tmp_path):
    write_folder(tmp_path, "imagesTr", "labelsTr", range(1, 5))
    image, _ = phantom_pair(1)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "imagesTr" / "abd_001_0001.nii.gz")
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "imagesTr" / "lonely_0000.nii.gz")
    (tmp_path / "labelsTr" / "abd_004.nii.gz").rename(tmp_path / "labelsTr" / "orphan.nii.gz")
    with pytest.warns(DataWarning) as record:
        ds = fs.build_dataset("nifti_folder", tmp_path, "train", num_classes=9, val_fraction=0, test_fraction=0)
    messages = " ".join(str(w.message) for w in record)
    for name in ("abd_001_0001", "lonely_0000", "orphan", "abd_004_0000"):
        assert name in messages
    assert ds.cases == ["abd_001", "abd_002", "abd_003"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"axis": 3}, "axis"),
        ({"normalize": "robust"}, "normalize"),
        ({"clip": [5, 1]}, "clip"),
        ({"num_classes": 1}, "num_classes"),
        ({"fraction": 0}, "fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"size": [16]}, "size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_name_their_field(msd, options, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        fs.build_dataset("nifti_folder", msd[0], "train", **options)
