"""The Synapse reader on phantoms in both label forms: remapping, lists, splits, detection, alignment."""

from __future__ import annotations

import shutil
import warnings

import h5py
import numpy as np
import pytest

import fusionsearch as fs
from fusionsearch.data.io import DataWarning
from fusionsearch.data.phantoms import make_synapse
from fusionsearch.errors import DataError

# Written here independently of the reader: raw BTCV value -> benchmark class (btcv14 form).
BTCV_TO_BENCHMARK = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 0, 6: 6, 7: 7, 8: 8, 9: 0, 10: 0, 11: 5, 12: 0, 13: 0}
BENCHMARK_NAMES = [
    "background",
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "pancreas",
    "liver",
    "stomach",
    "aorta",
]
TRANSUNET_NAMES = [
    "background",
    "aorta",
    "gallbladder",
    "left kidney",
    "right kidney",
    "liver",
    "pancreas",
    "spleen",
    "stomach",
]
TRAIN_IDS = ["case0005", "case0006", "case0007", "case0009"]
TEST_IDS = ["case0001", "case0002"]
SLICES = 6


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("synapse")
    return {
        form: make_synapse(base / form, cases=4, test_cases=2, slices=SLICES, size=40, labels=form, progress=False)
        for form in ("btcv14", "synapse9")
    }


def naive_remap(raw: np.ndarray) -> np.ndarray:
    out = np.zeros(raw.shape, dtype=np.int64)
    for index, value in np.ndenumerate(raw):
        out[index] = BTCV_TO_BENCHMARK[int(value)]
    return out


def plain(root, split, **options):
    """No augmentation, no resizing: items must equal the files."""
    return fs.build_dataset("synapse", root, split, size=None, augment=False, **options)


@pytest.mark.parametrize("form", ["btcv14", "synapse9"])
def test_training_slices_match_files_value_by_value(roots, form):
    ds = plain(roots[form], "train", labels=form, val_fraction=0.0)
    assert ds.num_classes == 9 and ds.spatial_dims == 2 and not ds.volumes
    assert ds.class_names == (BENCHMARK_NAMES if form == "btcv14" else TRANSUNET_NAMES)
    assert ds.cases == TRAIN_IDS and len(ds) == 4 * SLICES
    for index in (0, 7, len(ds) - 1):
        item = ds[index]
        with np.load(roots[form] / "train_npz" / f"{item['case']}_slice{item['slice']:03d}.npz") as raw:
            expected = naive_remap(raw["label"]) if form == "btcv14" else raw["label"].astype(np.int64)
            np.testing.assert_array_equal(item["image"][0].numpy(), raw["image"])
        np.testing.assert_array_equal(item["label"].numpy(), expected)


@pytest.mark.parametrize("form", ["btcv14", "synapse9"])
def test_test_volumes_match_h5_files(roots, form):
    ds = fs.build_dataset("synapse", roots[form], "test", labels=form)
    assert ds.volumes and ds.cases == TEST_IDS
    item = ds[1]
    with h5py.File(roots[form] / "test_vol_h5" / "case0002.npy.h5") as raw:
        image, label = raw["image"][()], raw["label"][()]
    assert item["case"] == "case0002"
    assert item["image"].dtype == np.float32 and item["label"].dtype == np.int64
    assert item["image"].shape == (SLICES, 40, 40)
    np.testing.assert_array_equal(item["image"], image)
    expected = naive_remap(label) if form == "btcv14" else label.astype(np.int64)
    np.testing.assert_array_equal(item["label"], expected)


def test_btcv14_raw_values_above_8_all_become_background_or_pancreas(roots):
    with h5py.File(roots["btcv14"] / "test_vol_h5" / "case0001.npy.h5") as raw:
        label = raw["label"][()]
    assert {9, 11}.issubset(set(np.unique(label).astype(int)))  # the phantom really holds raw values
    volume = fs.build_dataset("synapse", roots["btcv14"], "test", labels="btcv14")[0]["label"]
    np.testing.assert_array_equal(volume[label == 11], 5)
    for dropped in (5, 9, 10, 12, 13):
        assert (volume[label == dropped] == 0).all()


@pytest.mark.parametrize("form", ["btcv14", "synapse9"])
def test_auto_detects_each_form(roots, form):
    ds = fs.build_dataset("synapse", roots[form], "train", labels="auto", size=32)
    assert ds.label_form == form
    assert ds.class_names == (BENCHMARK_NAMES if form == "btcv14" else TRANSUNET_NAMES)


def test_auto_refuses_inconsistent_data(roots, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(roots["btcv14"], root)
    for path in (root / "train_npz").glob("case0006_*.npz"):  # one case in the 9-class form
        shutil.copy(roots["synapse9"] / "train_npz" / path.name, path)
    with pytest.raises(DataError, match=r"(?s)inconsistent.*case0006.*labels: btcv14"):
        fs.build_dataset("synapse", root, "train", labels="auto")
    # an explicit form still reads the raw cases; the 9-class case is then caught only if out of range
    assert fs.build_dataset("synapse", root, "train", labels="btcv14", val_fraction=0).label_form == "btcv14"


def test_auto_refuses_data_without_foreground(tmp_path):
    (tmp_path / "train_npz").mkdir()
    for z in range(2):
        np.savez(
            tmp_path / "train_npz" / f"case0005_slice{z:03d}.npz",
            image=np.zeros((8, 8), np.float32),
            label=np.zeros((8, 8), np.float32),
        )
    with pytest.raises(DataError, match="(?i)no foreground.*set labels"):
        fs.build_dataset("synapse", tmp_path, "train", labels="auto", val_fraction=0)


def test_declared_synapse9_on_raw_data_is_refused(roots):
    ds = fs.build_dataset("synapse", roots["btcv14"], "test", labels="synapse9")
    with pytest.raises(DataError, match=r"case0001\.npy\.h5.*out of range.*labels: btcv14"):
        ds[0]


def test_list_files_are_honoured(roots, tmp_path):
    root = tmp_path / "listed"
    shutil.copytree(roots["synapse9"], root)
    chosen = ["case0009_slice001", "case0009_slice002", "case0006_slice004"]
    (root / "lists" / "lists_Synapse" / "train.txt").write_text("\n".join(chosen) + "\n")
    (root / "lists" / "lists_Synapse" / "test_vol.txt").write_text("case0002\n")
    train = plain(root, "train", val_fraction=0)
    assert train.cases == ["case0006", "case0009"]
    got = sorted(f"{item['case']}_slice{item['slice']:03d}" for item in (train[i] for i in range(len(train))))
    assert got == sorted(chosen)
    assert fs.build_dataset("synapse", root, "test").cases == ["case0002"]


def test_list_naming_a_missing_file_is_an_error(roots, tmp_path):
    root = tmp_path / "badlist"
    shutil.copytree(roots["synapse9"], root)
    (root / "lists" / "lists_Synapse" / "train.txt").write_text("case0005_slice000\ncase0005_slice099\n")
    with pytest.raises(DataError, match=r"train\.txt.*case0005_slice099"):
        fs.build_dataset("synapse", root, "train")


def test_without_lists_the_standard_split_is_used_and_odd_cases_are_named(roots, tmp_path):
    root = tmp_path / "nolists"
    shutil.copytree(roots["synapse9"], root)
    shutil.rmtree(root / "lists")
    shutil.copy(root / "train_npz" / "case0005_slice000.npz", root / "train_npz" / "case0099_slice000.npz")
    shutil.copy(root / "train_npz" / "case0005_slice000.npz", root / "train_npz" / "case0001_slice000.npz")
    with pytest.warns(DataWarning) as record:
        train = plain(root, "train", val_fraction=0)
    messages = " ".join(str(w.message) for w in record)
    assert "case0099" in messages and "outside the standard" in messages
    assert "case0001" in messages and "TEST case" in messages
    assert train.cases == sorted([*TRAIN_IDS, "case0099"])  # the test case is never trained on
    with pytest.warns(DataWarning) as record:
        assert fs.build_dataset("synapse", root, "test").cases == TEST_IDS
    assert any("case0099" in str(w.message) for w in record)


@pytest.mark.parametrize("form", ["btcv14", "synapse9"])
def test_valid_volume_is_the_stack_of_its_slice_files(roots, form):
    valid = fs.build_dataset("synapse", roots[form], "valid", labels=form, val_fraction=0.25)
    assert valid.volumes and len(valid.cases) == 1
    item = valid[0]
    assert item["image"].shape == (SLICES, 40, 40)
    for z in range(SLICES):
        with np.load(roots[form] / "train_npz" / f"{item['case']}_slice{z:03d}.npz") as raw:
            np.testing.assert_array_equal(item["image"][z], raw["image"])
            expected = naive_remap(raw["label"]) if form == "btcv14" else raw["label"]
            np.testing.assert_array_equal(item["label"][z], expected)


def test_valid_train_and_test_are_disjoint_and_seeded(roots):
    root = roots["synapse9"]
    for split_seed in (0, 1, 2):
        valid = fs.build_dataset("synapse", root, "valid", val_fraction=0.25, split_seed=split_seed).cases
        train = fs.build_dataset("synapse", root, "train", val_fraction=0.25, split_seed=split_seed).cases
        again = fs.build_dataset("synapse", root, "valid", val_fraction=0.25, split_seed=split_seed).cases
        assert valid == again and len(valid) == 1
        assert sorted(valid + train) == TRAIN_IDS and not set(valid) & set(TEST_IDS)


def test_gap_in_valid_slices_is_named_in_a_warning(roots, tmp_path):
    root = tmp_path / "gap"
    shutil.copytree(roots["synapse9"], root)
    shutil.rmtree(root / "lists")
    case = fs.build_dataset("synapse", root, "valid", val_fraction=0.25).cases[0]
    (root / "train_npz" / f"{case}_slice002.npz").unlink()
    with pytest.warns(DataWarning, match=f"{case}.*not contiguous.*2"):
        valid = fs.build_dataset("synapse", root, "valid", val_fraction=0.25)
    assert valid[0]["image"].shape[0] == SLICES - 1


def test_raw_hu_images_are_windowed_and_scaled(tmp_path):
    root = make_synapse(
        tmp_path / "hu", cases=2, test_cases=1, slices=3, size=24, labels="synapse9", hu=True, progress=False
    )
    with np.load(root / "train_npz" / "case0005_slice001.npz") as raw:
        hu = raw["image"]
    assert hu.min() < -500  # really raw: air
    expected = (np.minimum(np.maximum(hu, -125.0), 275.0) + 125.0) / 400.0
    ds = plain(root, "train", val_fraction=0)
    np.testing.assert_allclose(ds[1]["image"][0].numpy(), expected, rtol=0, atol=1e-6)


def test_training_items_are_resized_and_typed(roots):
    ds = fs.build_dataset("synapse", roots["btcv14"], "train", size=[32, 48], seed=3)
    item = ds[2]
    assert item["image"].shape == (1, 32, 48) and item["label"].shape == (32, 48)
    assert str(item["image"].dtype) == "torch.float32" and str(item["label"].dtype) == "torch.int64"
    assert set(item["label"].unique().tolist()) <= set(range(9))


def test_augmentation_is_a_function_of_seed_epoch_index(roots):
    def items(epoch, seed=7):
        ds = fs.build_dataset("synapse", roots["btcv14"], "train", size=32, seed=seed)
        ds.set_epoch(epoch)
        return [ds[i] for i in range(0, len(ds), 3)]

    first, resumed, other_epoch, other_seed = items(2), items(2), items(3), items(2, seed=8)
    for a, b in zip(first, resumed, strict=True):
        assert a["image"].equal(b["image"]) and a["label"].equal(b["label"])
    assert any(not a["image"].equal(b["image"]) for a, b in zip(first, other_epoch, strict=True))
    assert any(not a["image"].equal(b["image"]) for a, b in zip(first, other_seed, strict=True))


def test_fraction_keeps_a_seeded_subset_of_training_cases(roots):
    root = roots["synapse9"]
    full = fs.build_dataset("synapse", root, "train", val_fraction=0.25).cases
    small = fs.build_dataset("synapse", root, "train", val_fraction=0.25, fraction=0.05).cases
    valid = fs.build_dataset("synapse", root, "valid", val_fraction=0.25, fraction=0.05).cases
    assert len(small) == 1 and set(small) <= set(full) and not set(valid) & set(small)
    assert valid == fs.build_dataset("synapse", root, "valid", val_fraction=0.25).cases  # fraction never moves valid


def test_slices_of_test_volumes_and_a_dataloader_batch(roots):
    import torch

    ds = fs.build_dataset("synapse", roots["btcv14"], "test", volumes=False, size=32)
    assert len(ds) == 2 * SLICES and not ds.augment
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["label"].shape == (4, 32, 32)
    assert batch["case"] == ["case0001"] * 4 and batch["slice"].tolist() == [0, 1, 2, 3]


def test_no_warnings_on_clean_phantoms(roots):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        for split in ("train", "valid", "test"):
            fs.build_dataset("synapse", roots["btcv14"], split)
