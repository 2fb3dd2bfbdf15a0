"""Seeded, reproducible case splits: validation carved from training, low-data fractions, 70/10/20.

Cases are ordered by a keyed hash of (seed, purpose, case id) rather than by a permutation of the
case list, so the rule is stable across machines and Python versions, and adding or removing one
case never reshuffles the others. Validation is always carved from training cases only, before a
low-data ``fraction`` is applied, so changing the fraction never changes the validation set.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from fusionsearch.errors import ConfigError, DataError

SPLITS = ("train", "valid", "test")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(
            f"unknown split {split!r}",
            field="split",
            fix=f"Use one of {', '.join(SPLITS)}",
        )
    return split


def check_fraction(value: float, field: str, *, allow_zero: bool, allow_one: bool = True) -> float:
    """Validate a fraction option (``fraction``, ``val_fraction``, ``test_fraction``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"must be a number, got {value!r}", field=field) from None
    low_ok = number >= 0 if allow_zero else number > 0
    high_ok = number <= 1 if allow_one else number < 1
    if not (low_ok and high_ok and math.isfinite(number)):
        low = "[0" if allow_zero else "(0"
        high = "1]" if allow_one else "1)"
        raise ConfigError(f"must be in {low}, {high}, got {value!r}", field=field)
    return number


def seeded_order(cases: Iterable[str], seed: int, purpose: str) -> list[str]:
    """Cases sorted by a keyed hash: a deterministic pseudo-random order for ``seed`` and ``purpose``."""

    def key(case: str) -> str:
        return hashlib.sha256(f"{seed}:{purpose}:{case}".encode()).hexdigest()

    return sorted(set(cases), key=lambda case: (key(case), case))


def carve(cases: Sequence[str], fraction: float, seed: int, purpose: str) -> tuple[list[str], list[str]]:
    """Split ``cases`` into (kept, carved): ``round(fraction * n)`` cases, at least one when fraction > 0.

    At least one case is always kept; both lists come back sorted.
    """
    if fraction <= 0:
        return sorted(cases), []
    count = max(1, round(fraction * len(cases)))
    if count >= len(cases):
        raise DataError(
            f"cannot carve a {purpose} split of {fraction:g} from {len(cases)} case(s) and keep at least one "
            f"case for training ({', '.join(sorted(cases)) or 'no cases'}). Add cases or lower the fraction."
        )
    order = seeded_order(cases, seed, purpose)
    carved = set(order[:count])
    return sorted(c for c in cases if c not in carved), sorted(carved)


def keep_fraction(cases: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded ``fraction`` of ``cases`` (at least one), for the low-data regime; sorted."""
    if fraction >= 1:
        return sorted(cases)
    count = max(1, round(fraction * len(cases)))
    return sorted(seeded_order(cases, seed, "fraction")[:count])


def split_three(cases: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded train/valid/test split of cases (e.g. 70/10/20 patients); both fractions are shares of
    all cases (at least one case each when above 0); each list sorted."""
    rest, test = carve(cases, test_fraction, seed, "test")
    if val_fraction <= 0 or not rest:
        return {"train": rest, "valid": [], "test": test}
    share = max(1, round(val_fraction * len(cases))) / len(rest)
    if share >= 1:
        raise DataError(
            f"cannot split {len(cases)} case(s) into train, valid ({val_fraction:g}) and test ({test_fraction:g}) "
            f"with at least one training case. Add cases or lower the fractions."
        )
    train, valid = carve(rest, share, seed, "valid")
    return {"train": train, "valid": valid, "test": test}


def read_list_file(path: Path) -> list[str]:
    """Entries of a split list file (one per line; blank lines and '#' comments ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the list file {path} ({exc}).") from exc
    entries = [line.split("#", 1)[0].strip() for line in lines]
    entries = [entry for entry in entries if entry]
    if not entries:
        raise DataError(f"the list file {path} is empty; list one entry per line or delete the file.")
    return entries


def check_disjoint(groups: dict[str, Iterable[str]], where: str) -> None:
    """Raise a DataError if any two splits share a case (validation must never touch train or test)."""
    names = list(groups)
    sets = {name: set(groups[name]) for name in names}
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = sorted(sets[first] & sets[second])
            if shared:
                raise DataError(
                    f"{where}: the {first} and {second} splits share case(s) {', '.join(shared)}. Splits must "
                    f"be disjoint; fix the split lists or folders so each case appears in one split only."
                )
