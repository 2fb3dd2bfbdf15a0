"""Seeded split rules: carve, fraction, three-way split, list files, disjointness."""

from __future__ import annotations

import hashlib

import pytest

from fusionsearch.data.splits import (
    carve,
    check_disjoint,
    check_fraction,
    check_split,
    keep_fraction,
    read_list_file,
    seeded_order,
    split_three,
)
from fusionsearch.errors import ConfigError, DataError

CASES = [f"case{n:04d}" for n in (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)]


def test_seeded_order_is_the_sha256_rank_of_each_case():
    expected = sorted(CASES, key=lambda c: hashlib.sha256(f"3:valid:{c}".encode()).hexdigest())
    assert seeded_order(CASES, 3, "valid") == expected
    assert seeded_order(reversed(CASES), 3, "valid") == expected  # independent of the input order


@pytest.mark.parametrize("fraction", [0.01, 0.15, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2222])
def test_carve_sizes_disjointness_and_determinism(fraction, seed):
    kept, carved = carve(CASES, fraction, seed, "valid")
    assert len(carved) == max(1, round(fraction * len(CASES)))
    assert sorted(kept + carved) == CASES and not set(kept) & set(carved)
    assert (kept, carved) == carve(list(reversed(CASES)), fraction, seed, "valid")
    assert carved == sorted(seeded_order(CASES, seed, "valid")[: len(carved)])


def test_carve_depends_on_the_seed_and_is_stable_when_cases_are_added():
    carved = {seed: carve(CASES, 0.15, seed, "valid")[1] for seed in range(6)}
    assert len({tuple(c) for c in carved.values()}) > 1
    # adding a case never moves an existing case from valid to train unless the new one takes its place
    _, bigger = carve([*CASES, "case0099"], 0.15, 0, "valid")
    assert len(set(bigger) & set(carved[0])) >= len(carved[0]) - 1


def test_carve_zero_and_impossible_carves():
    assert carve(CASES, 0.0, 0, "valid") == (CASES, [])
    with pytest.raises(DataError, match="keep at least one case"):
        carve(["case0005"], 0.15, 0, "valid")


@pytest.mark.parametrize(("fraction", "count"), [(0.05, 1), (0.25, 4), (0.5, 9), (1.0, 18)])
def test_keep_fraction_counts_subset_and_seed(fraction, count):
    kept = keep_fraction(CASES, fraction, 0)
    assert len(kept) == count and set(kept) <= set(CASES) and kept == sorted(kept)
    assert kept == keep_fraction(CASES, fraction, 0)


def test_keep_fraction_is_nested_as_the_fraction_grows():
    small, large = keep_fraction(CASES, 0.1, 4), keep_fraction(CASES, 0.5, 4)
    assert set(small) <= set(large)


@pytest.mark.parametrize(("n", "sizes"), [(100, (70, 10, 20)), (10, (7, 1, 2)), (5, (3, 1, 1))])
def test_split_three_proportions(n, sizes):
    patients = [f"patient{i:03d}" for i in range(1, n + 1)]
    parts = split_three(patients, 0.1, 0.2, 0)
    assert tuple(len(parts[s]) for s in ("train", "valid", "test")) == sizes
    assert sorted(parts["train"] + parts["valid"] + parts["test"]) == patients
    check_disjoint(parts, "here")


def test_check_disjoint_names_shared_cases():
    with pytest.raises(DataError, match="train and test splits share case.*b"):
        check_disjoint({"train": ["a", "b"], "valid": ["c"], "test": ["b"]}, "somewhere")


def test_read_list_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("case0005_slice000\n\n  case0005_slice001  \n# a comment\ncase0006_slice000 # trailing\n")
    assert read_list_file(path) == ["case0005_slice000", "case0005_slice001", "case0006_slice000"]
    path.write_text("\n\n")
    with pytest.raises(DataError, match="train.txt is empty"):
        read_list_file(path)


@pytest.mark.parametrize(
    ("value", "allow_zero", "ok"),
    [
        (0.0, True, True),
        (0.0, False, False),
        (1.0, False, True),
        (1.5, True, False),
        ("x", True, False),
        (float("nan"), True, False),
        (-0.1, True, False),
    ],
)
def test_check_fraction(value, allow_zero, ok):
    if ok:
        assert check_fraction(value, "fraction", allow_zero=allow_zero) == float(value)
    else:
        with pytest.raises(ConfigError, match="field 'fraction'"):
            check_fraction(value, "fraction", allow_zero=allow_zero)


def test_check_split():
    assert check_split("valid") == "valid"
    with pytest.raises(ConfigError, match="unknown split 'val'.*train, valid, test"):
        check_split("val")
