"""Synapse multi-organ CT (BTCV, 30 cases) in the TransUNet release layout.

On disk (``root``)::

    train_npz/case0005_slice000.npz      keys image, label (H x W), one file per training slice
    test_vol_h5/case0001.npy.h5          datasets image, label (D x H x W), one file per test case
    lists/lists_Synapse/train.txt        optional: slice names (case0005_slice000), one per line
    lists/lists_Synapse/test_vol.txt     optional: test case ids (case0001), one per line

Label forms (``labels=``): ``btcv14`` holds the raw BTCV labels 0..13, remapped to the 8 organs of
the benchmark (5, 9, 10, 12, 13 -> 0 and 11 -> 5); ``synapse9`` holds the TransUNet release's
already-remapped 9 classes in its own organ order (indices kept); ``auto`` looks at the data and
refuses to guess when it cannot tell (the dataset's ``label_form`` attribute says which form was
read). Images that look like raw Hounsfield units are clipped to [-125, 275] and scaled to [0, 1],
as the release's preprocessing did.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from fusionsearch.data.base import SegmentationDataset, SliceFilesSource, VolumeFileSource, parse_size
from fusionsearch.data.io import (
    as_image,
    as_label,
    check_label_range,
    h5_depth,
    load_h5,
    load_npz,
    require_dir,
    warn,
)
from fusionsearch.data.splits import (
    carve,
    check_disjoint,
    check_fraction,
    check_split,
    keep_fraction,
    read_list_file,
)
from fusionsearch.errors import ConfigError, DataError
from fusionsearch.registry import register_dataset

logger = logging.getLogger(__name__)

TRAIN_CASES = tuple(f"case{n:04d}" for n in (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40))
TEST_CASES = tuple(f"case{n:04d}" for n in (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38))

# Raw BTCV label values 0..13.
BTCV14_NAMES = (
    "background",
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic vein",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
)
# The 8 benchmark organs after remapping the raw values (btcv14 form).
BTCV8_NAMES = (
    "background",
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "pancreas",
    "liver",
    "stomach",
    "aorta",
)
# The TransUNet release's 9-class order (synapse9 form).
SYNAPSE9_NAMES = (
    "background",
    "aorta",
    "gallbladder",
    "left kidney",
    "right kidney",
    "liver",
    "pancreas",
    "spleen",
    "stomach",
)
# raw value -> benchmark class (btcv14 form): 5, 9, 10, 12, 13 -> 0 and 11 -> 5.
BTCV14_REMAP = np.array([0, 1, 2, 3, 4, 0, 6, 7, 8, 0, 0, 5, 0, 0], dtype=np.int64)

LABEL_FORMS = ("auto", "btcv14", "synapse9")
HU_WINDOW = (-125.0, 275.0)
_SCAN_SLICES_PER_CASE = 16

_TRAIN_FILE = re.compile(r"^(case\d+)_slice(\d+)\.npz$")
_TEST_FILE = re.compile(r"^(case\d+)(?:\.npy)?\.h5$")
_TRAIN_ENTRY = re.compile(r"^(case\d+)_slice(\d+)(?:\.npz)?$")
_TEST_ENTRY = re.compile(r"^(case\d+)(?:\.npy\.h5|\.h5)?$")

_detected_forms: dict[tuple, str] = {}


def normalise_ct(image: np.ndarray) -> np.ndarray:
    """Clip raw HU to [-125, 275] and scale to [0, 1]; leave already-normalised images alone.

    An image counts as raw HU when it leaves [-2, 2] (max > 2, or min < -2 as in air at -1000).
    """
    if image.size and (float(image.max()) > 2.0 or float(image.min()) < -2.0):
        low, high = HU_WINDOW
        return ((np.clip(image, low, high) - low) / (high - low)).astype(np.float32)
    return image


class SynapseDecoder:
    """Reads one Synapse file and returns (image in [0,1], label in the benchmark's 9 classes)."""

    def __init__(self, form: str) -> None:
        self.form = form

    def map_label(self, label: np.ndarray, path: Path) -> np.ndarray:
        if self.form == "btcv14":
            check_label_range(label, 14, path, "Raw BTCV labels are 0..13; check the file.")
            return BTCV14_REMAP[label]
        check_label_range(
            label,
            9,
            path,
            "The synapse9 form holds classes 0..8; values above 8 mean raw BTCV labels: set labels: btcv14.",
        )
        return label

    def slice_file(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        arrays = load_npz(path, ("image", "label"))
        image = as_image(arrays["image"], path, 2)
        label = as_label(arrays["label"], path, image.shape)
        return normalise_ct(image), self.map_label(label, path)

    def volume_file(self, path: Path, z: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        arrays = load_h5(path, ("image", "label"), z)
        image = as_image(arrays["image"], path, 3 if z is None else 2)
        label = as_label(arrays["label"], path, image.shape)
        return normalise_ct(image), self.map_label(label, path)


# -- discovery ----------------------------------------------------------------------------------------
def _scan_train_dir(train_dir: Path) -> dict[str, dict[int, Path]]:
    cases: dict[str, dict[int, Path]] = {}
    ignored = []
    for path in sorted(train_dir.iterdir()):
        match = _TRAIN_FILE.match(path.name)
        if not match:
            ignored.append(path.name)
            continue
        cases.setdefault(match.group(1), {})[int(match.group(2))] = path
    if ignored:
        warn(f"{train_dir}: ignored {len(ignored)} file(s) not named caseXXXX_sliceNNN.npz: {_preview(ignored)}")
    return cases


def _scan_test_dir(test_dir: Path) -> dict[str, Path]:
    cases: dict[str, Path] = {}
    ignored = []
    for path in sorted(test_dir.iterdir()):
        match = _TEST_FILE.match(path.name)
        if match:
            cases[match.group(1)] = path
        else:
            ignored.append(path.name)
    if ignored:
        warn(f"{test_dir}: ignored {len(ignored)} file(s) not named caseXXXX.npy.h5: {_preview(ignored)}")
    return cases


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _find_list_dir(root: Path, list_dir: str | Path | None) -> Path | None:
    if list_dir is not None:
        path = Path(list_dir).expanduser()
        path = path if path.is_absolute() else root / path
        return require_dir(path, "The Synapse list folder (list_dir)", "Point list_dir at lists/lists_Synapse.")
    for candidate in (root / "lists" / "lists_Synapse", root / "lists_Synapse"):
        if candidate.is_dir():
            return candidate
    return None


def _train_from_list(list_file: Path, train_dir: Path) -> dict[str, dict[int, Path]]:
    cases: dict[str, dict[int, Path]] = {}
    for entry in read_list_file(list_file):
        match = _TRAIN_ENTRY.match(entry)
        if not match:
            raise DataError(f"{list_file}: entry {entry!r} is not a slice name like case0005_slice000.")
        path = train_dir / f"{match.group(1)}_slice{match.group(2)}.npz"
        if not path.is_file():
            raise DataError(f"{list_file} lists {entry!r} but {path} does not exist. Fix the list or add the file.")
        cases.setdefault(match.group(1), {})[int(match.group(2))] = path
    return cases


def _test_from_list(list_file: Path, test_dir: Path) -> dict[str, Path]:
    cases: dict[str, Path] = {}
    for entry in read_list_file(list_file):
        match = _TEST_ENTRY.match(entry)
        if not match:
            raise DataError(f"{list_file}: entry {entry!r} is not a case id like case0001.")
        case = match.group(1)
        candidates = [test_dir / f"{case}.npy.h5", test_dir / f"{case}.h5"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise DataError(f"{list_file} lists {case!r} but {candidates[0]} does not exist. Fix the list or add it.")
        cases[case] = path
    return cases


def _standard_split(
    train_found: dict[str, dict[int, Path]], test_found: dict[str, Path], root: Path
) -> tuple[dict[str, dict[int, Path]], dict[str, Path]]:
    """Apply the standard 18/12 case split to the files found; warn about every case not used as-is."""
    leaked = sorted(c for c in train_found if c in TEST_CASES)
    if leaked:
        warn(
            f"{root}/train_npz holds standard TEST case(s) {', '.join(leaked)}; they are skipped for training "
            f"(add lists/lists_Synapse/train.txt to choose training slices yourself)."
        )
    extra_train = sorted(c for c in train_found if c not in TRAIN_CASES and c not in TEST_CASES)
    if extra_train:
        warn(
            f"{root}/train_npz holds case(s) {', '.join(extra_train)} outside the standard Synapse split; they "
            f"are used as training cases because they are in train_npz."
        )
    misplaced = sorted(c for c in test_found if c in TRAIN_CASES)
    if misplaced:
        warn(
            f"{root}/test_vol_h5 holds standard TRAINING case(s) {', '.join(misplaced)}; they are skipped for "
            f"testing (add lists/lists_Synapse/test_vol.txt to choose test cases yourself)."
        )
    extra_test = sorted(c for c in test_found if c not in TRAIN_CASES and c not in TEST_CASES)
    if extra_test:
        warn(
            f"{root}/test_vol_h5 holds case(s) {', '.join(extra_test)} outside the standard Synapse split; they "
            f"are used as test cases because they are in test_vol_h5."
        )
    train = {c: s for c, s in train_found.items() if c not in TEST_CASES}
    test = {c: p for c, p in test_found.items() if c not in TRAIN_CASES}
    return train, test


# -- label form detection -----------------------------------------------------------------------------
def _evenly(count: int, limit: int) -> list[int]:
    if count <= limit:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, limit)})


def _case_values_train(slices: dict[int, Path]) -> tuple[set[int], Path]:
    numbers = sorted(slices)
    values: set[int] = set()
    for i in _evenly(len(numbers), _SCAN_SLICES_PER_CASE):
        path = slices[numbers[i]]
        label = load_npz(path, ("label",))["label"]
        values.update(int(v) for v in np.unique(as_label(label, path, label.shape)))
    return values, slices[numbers[0]]


def _case_values_test(path: Path) -> tuple[set[int], Path]:
    depth = h5_depth(path)
    label = load_h5(path, ("label",), _evenly(depth, _SCAN_SLICES_PER_CASE))["label"]
    return {int(v) for v in np.unique(as_label(label, path, label.shape))}, path


def detect_label_form(train: dict[str, dict[int, Path]], test: dict[str, Path], root: Path) -> str:
    """Decide btcv14 vs synapse9 from the label values of every case (up to 16 slices each).

    Cases with values above 8 are raw BTCV; cases whose foreground stays within 1..8 are the
    9-class release. A mix of both, or no foreground at all, cannot be decided: refuse.
    """
    files = [p for slices in train.values() for p in slices.values()] + list(test.values())
    key = (str(root.resolve()), tuple(sorted((str(p), p.stat().st_mtime_ns) for p in files)))
    if key in _detected_forms:
        return _detected_forms[key]
    per_case = {case: _case_values_train(slices) for case, slices in sorted(train.items())}
    per_case.update({case: _case_values_test(path) for case, path in sorted(test.items())})
    raw, nine, empty = [], [], []
    for case, (values, path) in per_case.items():
        if min(values) < 0 or max(values) > 13:
            raise DataError(f"{path}: label values {sorted(values)} fit neither Synapse form (0..13 raw BTCV or 0..8).")
        (raw if max(values) > 8 else nine if max(values) > 0 else empty).append(case)
    fix = "Set labels: btcv14 (raw BTCV 0..13) or labels: synapse9 (TransUNet 9-class release) in the data options."
    if raw and nine:
        raise DataError(
            f"cannot detect the Synapse label form under {root}: case(s) {_preview(raw)} hold raw BTCV values above 8 "
            f"but case(s) {_preview(nine)} stay within 0..8, so the data look inconsistent. {fix}"
        )
    if not raw and not nine:
        raise DataError(f"cannot detect the Synapse label form under {root}: no foreground label seen. {fix}")
    form = "btcv14" if raw else "synapse9"
    if empty:
        warn(f"Synapse case(s) {_preview(empty)} under {root} show no foreground in the scanned slices.")
    logger.info("Synapse labels under %s detected as %s", root, form)
    _detected_forms[key] = form
    return form


# -- the dataset ----------------------------------------------------------------------------------------
def _check_contiguous(case: str, slice_ids: list[int], where: Path) -> None:
    expected = list(range(slice_ids[0], slice_ids[0] + len(slice_ids)))
    if slice_ids != expected:
        missing = sorted(set(range(slice_ids[0], slice_ids[-1] + 1)) - set(slice_ids))
        gaps = _preview([str(m) for m in missing])
        warn(
            f"{where}: the slices of {case} are not contiguous (missing slice numbers {gaps}); "
            f"its stacked volume skips them, so 3D metrics such as HD95 for this case are distorted."
        )


@register_dataset("synapse")
def build_synapse(
    root: str | Path,
    split: str = "train",
    *,
    labels: str = "auto",
    size: int | list[int] | None = 224,
    volumes: bool | None = None,
    augment: bool | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    fraction: float = 1.0,
    split_seed: int = 0,
    list_dir: str | Path | None = None,
    cache_volumes: int = 4,
) -> SegmentationDataset:
    """The Synapse dataset (see module doc). ``split`` is train, valid (carved from the training
    cases by ``split_seed``) or test; ``fraction`` keeps a seeded share of the training cases."""
    check_split(split)
    if labels not in LABEL_FORMS:
        raise ConfigError(f"unknown Synapse label form {labels!r}", field="labels", fix=f"Use one of {LABEL_FORMS}")
    val_fraction = check_fraction(val_fraction, "val_fraction", allow_zero=True, allow_one=False)
    fraction = check_fraction(fraction, "fraction", allow_zero=False)
    size = parse_size(size, 2)
    root = require_dir(
        Path(root).expanduser(),
        "The Synapse root",
        "Set data.root to the folder holding train_npz/ "
        "and test_vol_h5/ (or write phantoms with 'fusionsearch make-data synapse DIR').",
    )
    train_dir, test_dir = root / "train_npz", root / "test_vol_h5"
    if not train_dir.is_dir() and not test_dir.is_dir():
        raise DataError(
            f"{root} holds neither train_npz/ nor test_vol_h5/ (it holds: "
            f"{_preview(sorted(p.name for p in root.iterdir())) or 'nothing'}); expected the TransUNet "
            f"Synapse layout, see docs/data/synapse.md."
        )
    if split in ("train", "valid"):
        require_dir(train_dir, "The training slice folder", f"The {split} split reads caseXXXX_sliceNNN.npz from it.")
    if split == "test":
        require_dir(test_dir, "The test volume folder", "The test split reads caseXXXX.npy.h5 from it.")

    list_root = _find_list_dir(root, list_dir)
    train_list = list_root / "train.txt" if list_root and (list_root / "train.txt").is_file() else None
    test_list = list_root / "test_vol.txt" if list_root and (list_root / "test_vol.txt").is_file() else None
    train_found = _scan_train_dir(train_dir) if train_dir.is_dir() and train_list is None else {}
    test_found = _scan_test_dir(test_dir) if test_dir.is_dir() and test_list is None else {}
    train_cases, test_cases = _standard_split(train_found, test_found, root)
    if train_list is not None and train_dir.is_dir():
        train_cases = _train_from_list(train_list, train_dir)
    if test_list is not None and test_dir.is_dir():
        test_cases = _test_from_list(test_list, test_dir)
    check_disjoint({"train": train_cases, "test": test_cases}, str(root))

    form = labels if labels != "auto" else detect_label_form(train_cases, test_cases, root)
    decoder = SynapseDecoder(form)
    class_names = BTCV8_NAMES if form == "btcv14" else SYNAPSE9_NAMES
    label_fix = f"The data were read in the {form} label form; set labels: to the form the files hold."

    if split == "test":
        chosen = sorted(test_cases)
        sources = [VolumeFileSource(c, test_cases[c], decoder.volume_file, h5_depth, partial=True) for c in chosen]
        empty_hint = f"No caseXXXX.npy.h5 volumes were found in {test_dir}."
    else:
        pool = sorted(train_cases)
        train_ids, valid_ids = carve(pool, val_fraction, split_seed, "valid") if pool else ([], [])
        chosen = valid_ids if split == "valid" else keep_fraction(train_ids, fraction, split_seed) if train_ids else []
        sources = []
        for case in chosen:
            numbers = sorted(train_cases[case])
            if split == "valid" and volumes is not False:
                _check_contiguous(case, numbers, train_dir)
            files = [train_cases[case][n] for n in numbers]
            sources.append(SliceFilesSource(case, files, numbers, decoder.slice_file))
        empty_hint = (
            f"No validation cases: val_fraction is {val_fraction:g}; set it above 0."
            if split == "valid"
            else f"No caseXXXX_sliceNNN.npz slices were found in {train_dir}."
        )
    is_train = split == "train"
    dataset = SegmentationDataset(
        name="synapse",
        root=root,
        split=split,
        sources=sources,
        num_classes=9,
        class_names=class_names,
        volumes=(not is_train) if volumes is None else bool(volumes),
        augment=is_train if augment is None else bool(augment),
        seed=seed,
        size=size,
        cache_volumes=cache_volumes,
        label_fix=label_fix,
        empty_hint=empty_hint,
    )
    dataset.label_form = form
    return dataset
