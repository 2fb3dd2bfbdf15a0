"""Synthetic phantoms: exact on-disk forms, determinism, organ shapes, and the make-data command."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy import ndimage

from fusionsearch.cli import main
from fusionsearch.data.phantoms import acdc_phantom, make_acdc, make_synapse, synapse_phantom
from fusionsearch.errors import ConfigError, FusionSearchError


def test_synapse_layout_is_the_transunet_release(tmp_path):
    root = make_synapse(tmp_path, cases=3, test_cases=2, slices=5, size=32, progress=False)
    names = sorted(p.name for p in (root / "train_npz").iterdir())
    assert names == [f"case{c:04d}_slice{z:03d}.npz" for c in (5, 6, 7) for z in range(5)]
    assert sorted(p.name for p in (root / "test_vol_h5").iterdir()) == ["case0001.npy.h5", "case0002.npy.h5"]
    with np.load(root / "train_npz" / "case0006_slice003.npz") as npz:
        assert sorted(npz.files) == ["image", "label"]
        assert npz["image"].shape == (32, 32) and npz["image"].dtype == np.float32
        assert 0.0 <= npz["image"].min() and npz["image"].max() <= 1.0
    with h5py.File(root / "test_vol_h5" / "case0002.npy.h5") as h5:
        assert sorted(h5.keys()) == ["image", "label"] and h5["image"].shape == (5, 32, 32)
    lists = root / "lists" / "lists_Synapse"
    assert (lists / "train.txt").read_text().split() == [n[:-4] for n in names]
    assert (lists / "test_vol.txt").read_text().split() == ["case0001", "case0002"]


def test_acdc_layout_is_the_mtunet_form(tmp_path):
    root = make_acdc(tmp_path, cases=10, slices=3, size=24, progress=False)
    lists = {s: (root / "lists_ACDC" / f"{s}.txt").read_text().split() for s in ("train", "valid", "test")}
    for split, names in lists.items():
        assert sorted(names) == sorted(p.name for p in (root / split).iterdir())
    assert len(lists["train"]) == 7 * 2 * 3 and len(lists["valid"]) == 1 * 2 * 3 and len(lists["test"]) == 2 * 2
    assert all(n.endswith(".npz") and "_slice" in n for n in lists["train"] + lists["valid"])
    with np.load(root / "test" / lists["test"][0]) as npz:
        assert sorted(npz.files) == ["img", "label"] and npz["img"].shape == (3, 24, 24)
        assert set(np.unique(npz["label"])) <= {0, 1, 2, 3}


def test_phantoms_are_deterministic_and_seeded():
    a = synapse_phantom(1, 5, 6, 32)
    b = synapse_phantom(1, 5, 6, 32)
    c = synapse_phantom(2, 5, 6, 32)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_a_case_does_not_depend_on_how_many_are_written(tmp_path):
    small = make_synapse(tmp_path / "a", cases=1, test_cases=1, slices=3, size=24, progress=False)
    large = make_synapse(tmp_path / "b", cases=3, test_cases=2, slices=3, size=24, progress=False)
    for name in ("train_npz/case0005_slice001.npz",):
        with np.load(small / name) as x, np.load(large / name) as y:
            np.testing.assert_array_equal(x["image"], y["image"])


def test_synapse9_codes_are_the_btcv_organs_in_transunet_order():
    _, raw = synapse_phantom(0, 5, 8, 48, labels="btcv14")
    _, nine = synapse_phantom(0, 5, 8, 48, labels="synapse9")
    btcv_to_nine = {1: 7, 2: 4, 3: 3, 4: 2, 6: 5, 7: 8, 8: 1, 11: 6}  # spleen->7, right kidney->4, ...
    for btcv, code in btcv_to_nine.items():
        assert (raw == btcv).any(), btcv
        np.testing.assert_array_equal(nine[raw == btcv], code)
    for dropped in (5, 9, 10, 12, 13):
        np.testing.assert_array_equal(nine[raw == dropped], 0)


def test_organs_have_very_different_sizes_and_shapes():
    _, label = synapse_phantom(0, 5, 12, 80, labels="btcv14")
    counts = np.bincount(label.ravel(), minlength=14)
    liver, gallbladder, aorta = counts[6], counts[4], counts[8]
    assert liver > 10 * gallbladder > 0 and liver > 10 * aorta > 0
    # the aorta is a thin tube: present in every slice, a few pixels across
    assert all((label[z] == 8).any() for z in range(12))
    widths = [np.ptp(np.nonzero(label[z] == 8)[1]) + 1 for z in range(12)]
    assert max(widths) <= 6
    # the gallbladder is small in extent along z as well
    assert sum((label[z] == 4).any() for z in range(12)) < 8


def test_acdc_myocardium_is_a_ring_around_the_left_ventricle():
    frames = acdc_phantom(0, 3, 6, 64)
    for frame in ("ED", "ES"):
        label = frames[frame][1]
        for z in range(3):
            myo, lv = label[z] == 2, label[z] == 3
            assert lv.any() and myo.any()
            filled = ndimage.binary_fill_holes(myo)
            assert filled[lv].all()  # the LV sits in the hole of the ring
            assert not ndimage.binary_dilation(lv)[label[z] == 0].any()  # LV never touches background
    ed, es = (frames["ED"][1] == 3).sum(), (frames["ES"][1] == 3).sum()
    assert ed > es  # the cavity contracts at end-systole


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="field 'cases'"):
        make_synapse(tmp_path, cases=19, progress=False)
    with pytest.raises(ConfigError, match="field 'labels'"):
        make_synapse(tmp_path, labels="btcv13", progress=False)
    with pytest.raises(ConfigError, match="field 'size'"):
        make_acdc(tmp_path, size=4, progress=False)


def test_existing_phantoms_are_not_mixed_without_overwrite(tmp_path):
    make_synapse(tmp_path, cases=2, test_cases=1, slices=2, size=16, progress=False)
    with pytest.raises(FusionSearchError, match="already holds train_npz.*overwrite"):
        make_synapse(tmp_path, cases=1, test_cases=1, slices=2, size=16, progress=False)
    make_synapse(tmp_path, cases=1, test_cases=1, slices=2, size=16, overwrite=True, progress=False)
    assert len(list((tmp_path / "train_npz").iterdir())) == 2


@pytest.mark.parametrize("form", ["synapse", "acdc"])
def test_make_data_command(tmp_path, capsys, form):
    out = tmp_path / form
    assert main(["make-data", form, str(out), "--cases", "3", "--slices", "2", "--size", "16", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"name: {form}" in printed and str(out) in printed
    expected = out / ("train_npz" if form == "synapse" else "train")
    assert len(list(expected.iterdir())) > 0
    assert main(["make-data", form, str(out)]) == 2  # refuses to mix with the existing set
    assert "overwrite" in capsys.readouterr().err
