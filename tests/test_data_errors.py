"""Bad input: every broken dataset is a clear DataError naming the file, never a silent wrong result."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

import fusionsearch as fs
from fusionsearch.data.phantoms import make_acdc, make_synapse
from fusionsearch.errors import ConfigError, DataError, UnknownNameError


@pytest.fixture(scope="module")
def synapse_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("errors")
    return make_synapse(base / "s", cases=3, test_cases=1, slices=3, size=16, labels="synapse9", progress=False)


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    return make_acdc(tmp_path_factory.mktemp("errors") / "a", cases=4, slices=2, size=16, progress=False)


@pytest.fixture()
def synapse_copy(synapse_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synapse_root, root)
    return root


def first_item(root, split="train", name="synapse", **options):
    ds = fs.build_dataset(name, root, split, **options)
    return ds[0]


@pytest.mark.parametrize("name", ["synapse", "acdc", "nifti_folder"])
def test_missing_directory(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}.*does not exist.*data.root"):
        fs.build_dataset(name, missing, "train")


def test_missing_split_folder(synapse_copy):
    shutil.rmtree(synapse_copy / "test_vol_h5")
    with pytest.raises(DataError, match="test_vol_h5.*does not exist"):
        fs.build_dataset("synapse", synapse_copy, "test")


def test_empty_training_split(tmp_path):
    (tmp_path / "train_npz").mkdir()
    with pytest.raises(DataError, match=r"train split of the synapse dataset.*is empty.*train_npz"):
        fs.build_dataset("synapse", tmp_path, "train", labels="synapse9")


def test_empty_validation_split(synapse_root):
    with pytest.raises(DataError, match="valid split.*is empty.*val_fraction is 0"):
        fs.build_dataset("synapse", synapse_root, "valid", val_fraction=0)


def test_empty_nifti_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError, match="is empty.*Found 0 image/label pair"):
        fs.build_dataset("nifti_folder", tmp_path, "train", num_classes=2)


def test_npz_without_expected_keys(synapse_copy):
    path = synapse_copy / "train_npz" / "case0005_slice000.npz"
    np.savez(path, img=np.zeros((16, 16), np.float32), label=np.zeros((16, 16), np.float32))
    with pytest.raises(DataError, match=r"case0005_slice000\.npz has no 'image' array"):
        first_item(synapse_copy, labels="synapse9", val_fraction=0)


def test_acdc_npz_without_img_key(acdc_root, tmp_path):
    root = tmp_path / "acdc"
    shutil.copytree(acdc_root, root)
    path = sorted((root / "test").iterdir())[0]
    np.savez(path, image=np.zeros((2, 16, 16), np.float32), label=np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(DataError, match=f"{path.name} has no 'img' array"):
        first_item(root, "test", name="acdc")


@pytest.mark.parametrize(
    ("label_value", "labels", "match"),
    [(12, "synapse9", "values 12 are out of range for 9 classes.*labels: btcv14"), (14, "btcv14", "values 14")],
)
def test_synapse_labels_out_of_range(synapse_copy, label_value, labels, match):
    path = synapse_copy / "train_npz" / "case0005_slice000.npz"
    label = np.zeros((16, 16), np.float32)
    label[3, 3] = label_value
    np.savez(path, image=np.zeros((16, 16), np.float32), label=label)
    with pytest.raises(DataError, match=rf"case0005_slice000\.npz.*{match}"):
        first_item(synapse_copy, labels=labels, val_fraction=0)


def test_acdc_label_out_of_range(acdc_root, tmp_path):
    root = tmp_path / "acdc"
    shutil.copytree(acdc_root, root)
    path = sorted((root / "valid").iterdir())[0]
    label = np.zeros((16, 16), np.uint8)
    label[0, 0] = 5
    np.savez(path, img=np.zeros((16, 16), np.float32), label=label)
    with pytest.raises(DataError, match=f"{path.name}: label values 5 are out of range for 4 classes"):
        ds = fs.build_dataset("acdc", root, "valid")
        [ds[i] for i in range(len(ds))]


def test_nifti_label_out_of_declared_classes(tmp_path):
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for n in range(3):
        label = np.zeros((8, 8, 2), np.uint8)
        label[1, 1, 1] = 4
        nib.save(
            nib.Nifti1Image(np.random.rand(8, 8, 2).astype(np.float32), np.eye(4)), tmp_path / "images" / f"c{n}.nii"
        )
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "labels" / f"c{n}.nii")
    with pytest.raises(DataError, match=r"c\d\.nii: label values 4 are out of range for 3 classes.*num_classes"):
        first_item(tmp_path, "test", name="nifti_folder", num_classes=3, test_fraction=0.4)


def test_image_label_shape_mismatch(synapse_copy):
    path = synapse_copy / "train_npz" / "case0006_slice001.npz"
    np.savez(path, image=np.zeros((16, 16), np.float32), label=np.zeros((16, 15), np.float32))
    ds = fs.build_dataset("synapse", synapse_copy, "train", labels="synapse9", val_fraction=0, size=None)
    with pytest.raises(DataError, match=r"case0006_slice001\.npz: image shape \(16, 16\) and label shape \(16, 15\)"):
        [ds[i] for i in range(len(ds))]


def test_nifti_shape_mismatch(tmp_path):
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    for n in range(2):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), tmp_path / "imagesTr" / f"c{n}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), np.eye(4)), tmp_path / "labelsTr" / f"c{n}.nii.gz")
    with pytest.raises(DataError, match=r"labelsTr/c\d\.nii\.gz: image shape .* and label shape .* differ"):
        first_item(tmp_path, "valid", name="nifti_folder", num_classes=2, val_fraction=0.5, test_fraction=0)


def test_corrupt_h5_file(synapse_copy):
    path = synapse_copy / "test_vol_h5" / "case0001.npy.h5"
    path.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(DataError, match=r"case0001\.npy\.h5 cannot be read as an HDF5 file"):
        first_item(synapse_copy, "test", labels="synapse9")


def test_truncated_h5_file(synapse_copy):
    path = synapse_copy / "test_vol_h5" / "case0001.npy.h5"
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(DataError, match=r"case0001\.npy\.h5 cannot be read"):
        first_item(synapse_copy, "test", labels="synapse9")


def test_corrupt_npz_file(synapse_copy):
    path = synapse_copy / "train_npz" / "case0005_slice000.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=r"case0005_slice000\.npz cannot be read as an \.npz archive"):
        first_item(synapse_copy, labels="synapse9", val_fraction=0)


def test_corrupt_nifti_file(tmp_path):
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for n in range(2):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), tmp_path / "images" / f"c{n}.nii.gz")
        (tmp_path / "labels" / f"c{n}.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=r"c\d\.nii\.gz cannot be read as a NIfTI file"):
        first_item(tmp_path, "test", name="nifti_folder", num_classes=2, test_fraction=0.5, val_fraction=0)


def test_non_integer_labels(synapse_copy):
    path = synapse_copy / "train_npz" / "case0005_slice000.npz"
    np.savez(path, image=np.zeros((16, 16), np.float32), label=np.full((16, 16), 0.5, np.float32))
    with pytest.raises(DataError, match=r"case0005_slice000\.npz: the label holds non-integer values"):
        first_item(synapse_copy, labels="synapse9", val_fraction=0)


def test_nan_image(synapse_copy):
    path = synapse_copy / "train_npz" / "case0005_slice000.npz"
    np.savez(path, image=np.full((16, 16), np.nan, np.float32), label=np.zeros((16, 16), np.float32))
    with pytest.raises(DataError, match=r"case0005_slice000\.npz: the image holds NaN"):
        first_item(synapse_copy, labels="synapse9", val_fraction=0)


def test_root_of_the_wrong_form(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(DataError, match="neither train_npz/ nor test_vol_h5/.*random"):
        fs.build_dataset("synapse", tmp_path, "train")
    with pytest.raises(DataError, match="expected imagesTr/ and labelsTr/"):
        fs.build_dataset("nifti_folder", tmp_path, "train")


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("synapse", {"labels": "btcv13"}, "field 'labels'"),
        ("synapse", {"colour": "red"}, "unknown option.*colour.*labels"),
        ("synapse", {"size": 0}, "field 'size'"),
        ("acdc", {"form": "nnunet"}, "field 'form'"),
        ("acdc", {"split_seed": 0, "val_fraction": -1}, "field 'val_fraction'"),
    ],
)
def test_bad_options_are_config_errors(synapse_root, acdc_root, name, options, match):
    root = synapse_root if name == "synapse" else acdc_root
    with pytest.raises(ConfigError, match=match):
        fs.build_dataset(name, root, "train", **options)


def test_unknown_split_and_dataset(synapse_root):
    with pytest.raises(ConfigError, match="unknown split 'training'"):
        fs.build_dataset("synapse", synapse_root, "training")
    with pytest.raises(UnknownNameError, match="Unknown dataset 'synaps'.*Did you mean 'synapse'"):
        fs.build_dataset("synaps", synapse_root, "train")


def test_builtin_datasets_are_registered():
    assert {"synapse", "acdc", "nifti_folder"} <= set(fs.DATASETS.names())
