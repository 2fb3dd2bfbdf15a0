"""The ACDC reader: MT-UNet npz form (phantoms) and raw challenge NIfTI form (written here with nibabel)."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

import fusionsearch as fs
from fusionsearch.data.io import DataWarning
from fusionsearch.data.phantoms import acdc_phantom, make_acdc
from fusionsearch.errors import DataError

SLICES = 4
NAMES = ["background", "right ventricle", "myocardium", "left ventricle"]


@pytest.fixture(scope="module")
def mtunet(tmp_path_factory):
    return make_acdc(tmp_path_factory.mktemp("acdc") / "mtunet", cases=10, slices=SLICES, size=32, progress=False)


def write_raw_patient(folder, number, info=True, frames=((1, "ED"), (7, "ES"))):
    """One raw-challenge patient: int16 frames in (x, y, z) order, uint8 ground truth, Info.cfg."""
    patient = folder / f"patient{number:03d}"
    patient.mkdir(parents=True)
    if info:
        lines = [f"{name}: {frame}" for frame, name in frames] + ["Group: NOR", "NbFrame: 30"]
        (patient / "Info.cfg").write_text("\n".join(lines) + "\n")
    written = {}
    volumes = acdc_phantom(5, number, 3, 24)
    for frame, name in frames:
        image, label = volumes[name]
        stored = np.round(image.transpose(1, 2, 0) * 800 + 20).astype(np.int16)
        nib.save(nib.Nifti1Image(stored, np.eye(4)), patient / f"patient{number:03d}_frame{frame:02d}.nii.gz")
        nib.save(
            nib.Nifti1Image(label.transpose(1, 2, 0), np.eye(4)),
            patient / f"patient{number:03d}_frame{frame:02d}_gt.nii.gz",
        )
        written[name] = (stored, label.transpose(1, 2, 0))
    return written


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("acdc") / "raw"
    arrays = {n: write_raw_patient(root / "training", n) for n in range(1, 11)}
    return root, arrays


def read_list(path):
    return [line for line in path.read_text().splitlines() if line]


def test_mtunet_training_slices_match_their_files(mtunet):
    ds = fs.build_dataset("acdc", mtunet, "train", size=None, augment=False)
    assert ds.form == "mtunet" and ds.num_classes == 4 and ds.class_names == NAMES
    listed = read_list(mtunet / "lists_ACDC" / "train.txt")
    assert len(ds) == len(listed)
    for index in (0, 5, len(ds) - 1):
        item = ds[index]
        patient, frame = item["case"].rsplit("_", 1)
        with np.load(mtunet / "train" / f"{patient}_slice{frame}_{item['slice']}.npz") as raw:
            np.testing.assert_array_equal(item["image"][0].numpy(), raw["img"])
            np.testing.assert_array_equal(item["label"].numpy(), raw["label"])


def test_mtunet_valid_volumes_stack_the_valid_slices_by_case_and_frame(mtunet):
    ds = fs.build_dataset("acdc", mtunet, "valid")
    listed = read_list(mtunet / "lists_ACDC" / "valid.txt")
    patients = sorted({name.split("_slice")[0] for name in listed})
    assert ds.cases == [f"{p}_{f}" for p in patients for f in ("ED", "ES")]
    for index, case in enumerate(ds.cases):
        item = ds[index]
        patient, frame = case.rsplit("_", 1)
        assert item["image"].shape == (SLICES, 32, 32)
        for z in range(SLICES):
            with np.load(mtunet / "valid" / f"{patient}_slice{frame}_{z}.npz") as raw:
                np.testing.assert_array_equal(item["image"][z], raw["img"])
                np.testing.assert_array_equal(item["label"][z], raw["label"])


def test_mtunet_test_volumes_match_files_whole_and_sliced(mtunet):
    volumes = fs.build_dataset("acdc", mtunet, "test")
    assert [f"{c.rsplit('_', 1)[0]}_volume_{c.rsplit('_', 1)[1]}.npz" for c in volumes.cases] == sorted(
        read_list(mtunet / "lists_ACDC" / "test.txt")
    )
    slices = fs.build_dataset("acdc", mtunet, "test", volumes=False, size=None)
    assert len(slices) == SLICES * len(volumes)
    for index, case in enumerate(volumes.cases):
        patient, frame = case.rsplit("_", 1)
        with np.load(mtunet / "test" / f"{patient}_volume_{frame}.npz") as raw:
            image, label = raw["img"], raw["label"]
        item = volumes[index]
        assert item["image"].dtype == np.float32 and item["label"].dtype == np.int64
        np.testing.assert_array_equal(item["image"], image)
        np.testing.assert_array_equal(item["label"], label)
        piece = slices[index * SLICES + 2]
        assert piece["case"] == case and piece["slice"] == 2
        np.testing.assert_array_equal(piece["label"].numpy(), label[2])


def test_mtunet_splits_are_patient_disjoint_70_10_20(mtunet):
    patients = {
        s: {c.rsplit("_", 1)[0] for c in fs.build_dataset("acdc", mtunet, s).cases} for s in ("train", "valid", "test")
    }
    assert [len(patients[s]) for s in ("train", "valid", "test")] == [7, 1, 2]
    assert not (
        patients["train"] & patients["valid"]
        or patients["train"] & patients["test"]
        or patients["valid"] & patients["test"]
    )


def test_mtunet_list_files_are_honoured(mtunet, tmp_path):
    root = tmp_path / "listed"
    shutil.copytree(mtunet, root)
    chosen = read_list(root / "lists_ACDC" / "train.txt")[2:5]
    (root / "lists_ACDC" / "train.txt").write_text("\n".join(chosen) + "\n")
    ds = fs.build_dataset("acdc", root, "train", size=None, augment=False)
    got = sorted(
        f"{ds[i]['case'].rsplit('_', 1)[0]}_slice{ds[i]['case'].rsplit('_', 1)[1]}_{ds[i]['slice']}.npz"
        for i in range(len(ds))
    )
    assert got == sorted(chosen)


def test_mtunet_without_valid_folder_carves_validation_patients(mtunet, tmp_path):
    root = tmp_path / "novalid"
    shutil.copytree(mtunet, root)
    shutil.rmtree(root / "valid")
    (root / "lists_ACDC" / "valid.txt").unlink()
    for seed in (0, 1):
        valid = {c.rsplit("_", 1)[0] for c in fs.build_dataset("acdc", root, "valid", split_seed=seed).cases}
        train = {c.rsplit("_", 1)[0] for c in fs.build_dataset("acdc", root, "train", split_seed=seed).cases}
        assert len(valid) == 1 and len(train) == 6 and not valid & train
        assert valid == {c.rsplit("_", 1)[0] for c in fs.build_dataset("acdc", root, "valid", split_seed=seed).cases}


def test_mtunet_fraction_keeps_whole_patients(mtunet):
    cases = fs.build_dataset("acdc", mtunet, "train", fraction=0.3).cases
    patients = {c.rsplit("_", 1)[0] for c in cases}
    assert len(patients) == 2 and len(cases) == 4  # both frames of each kept patient


def test_mtunet_overlapping_splits_are_refused(mtunet, tmp_path):
    root = tmp_path / "overlap"
    shutil.copytree(mtunet, root)
    shutil.rmtree(root / "lists_ACDC")
    leaked = sorted((root / "train").glob("*.npz"))[0]
    shutil.copy(leaked, root / "valid" / leaked.name)
    with pytest.raises(DataError, match=f"train and valid splits share.*{leaked.name.split('_slice')[0]}"):
        fs.build_dataset("acdc", root, "train")


def test_raw_volumes_are_transposed_and_minmax_scaled(raw):
    root, arrays = raw
    test = fs.build_dataset("acdc", root, "test")
    assert test.form == "raw"
    for index, case in enumerate(test.cases):
        patient, frame = case.split("_")
        stored, label = arrays[int(patient[7:])][frame]
        item = test[index]
        expected = np.transpose(stored.astype(np.float64), (2, 0, 1))
        expected = (expected - expected.min()) / (expected.max() - expected.min())
        np.testing.assert_allclose(item["image"], expected, atol=1e-6)
        np.testing.assert_array_equal(item["label"], np.transpose(label, (2, 0, 1)))


def test_raw_split_is_seeded_70_10_20_by_patient(raw):
    root, _ = raw
    splits = {s: fs.build_dataset("acdc", root, s).cases for s in ("train", "valid", "test")}
    patients = {s: {c.split("_")[0] for c in cases} for s, cases in splits.items()}
    assert [len(patients[s]) for s in ("train", "valid", "test")] == [7, 1, 2]
    assert set().union(*patients.values()) == {f"patient{n:03d}" for n in range(1, 11)}
    assert all(c.endswith(("_ED", "_ES")) for cases in splits.values() for c in cases)
    assert splits == {s: fs.build_dataset("acdc", root, s).cases for s in ("train", "valid", "test")}
    other = {s: {c.split("_")[0] for c in fs.build_dataset("acdc", root, s, split_seed=5).cases} for s in splits}
    assert other != patients  # a different seed gives a different (still 7/1/2) split
    assert [len(other[s]) for s in ("train", "valid", "test")] == [7, 1, 2]


def test_raw_training_slices_come_from_the_volumes(raw):
    root, _ = raw
    train = fs.build_dataset("acdc", root, "train", size=16, augment=False)
    assert len(train) == 3 * len(train.cases)
    item = train[4]
    assert item["image"].shape == (1, 16, 16) and item["case"] == train.cases[1] and item["slice"] == 1


def test_raw_lists_name_patients(raw, tmp_path):
    root, _ = raw
    listed = tmp_path / "listed"
    shutil.copytree(root, listed)
    (listed / "lists_ACDC").mkdir()
    (listed / "lists_ACDC" / "train.txt").write_text("patient001\npatient002\npatient003\n")
    (listed / "lists_ACDC" / "valid.txt").write_text("patient004\n")
    (listed / "lists_ACDC" / "test.txt").write_text("patient009\npatient010\n")
    assert fs.build_dataset("acdc", listed, "valid").cases == ["patient004_ED", "patient004_ES"]
    assert {c.split("_")[0] for c in fs.build_dataset("acdc", listed, "test").cases} == {"patient009", "patient010"}
    assert len(fs.build_dataset("acdc", listed, "train").cases) == 6


def test_raw_without_info_cfg_names_frames_and_warns_about_skips(tmp_path):
    for n in range(1, 6):
        write_raw_patient(tmp_path, n, info=False, frames=((1, "ED"), (9, "ES")))
    (tmp_path / "patient002" / "patient002_frame09.nii.gz").unlink()
    (tmp_path / "patient006").mkdir()
    with pytest.warns(DataWarning) as record:
        ds = fs.build_dataset("acdc", tmp_path, "train", val_fraction=0, test_fraction=0)
    messages = " ".join(str(w.message) for w in record)
    assert "patient002_frame09_gt" in messages and "patient006" in messages
    assert "patient002_frame01" in ds.cases and "patient002_frame09" not in ds.cases
    assert len(ds.cases) == 9


def test_neither_form_is_a_clear_error(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DataError, match="neither ACDC form.*something.*Expected train/"):
        fs.build_dataset("acdc", tmp_path, "train")


def test_both_forms_need_an_explicit_choice(mtunet, raw, tmp_path):
    root = tmp_path / "both"
    shutil.copytree(mtunet, root)
    shutil.copytree(raw[0] / "training", root / "training")
    shutil.rmtree(root / "lists_ACDC")  # MT-UNet lists name npz files, which the raw form cannot use
    with pytest.raises(DataError, match="form: mtunet or form: raw"):
        fs.build_dataset("acdc", root, "train")
    assert fs.build_dataset("acdc", root, "test", form="raw").form == "raw"
    assert fs.build_dataset("acdc", root, "test", form="mtunet").form == "mtunet"
