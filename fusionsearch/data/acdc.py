"""ACDC cardiac MRI, in the preprocessed MT-UNet form or the raw challenge NIfTI form.

MT-UNet form (``root``)::

    train/case_001_sliceED_0.npz     keys img, label (H x W), one file per slice of a frame
    valid/case_004_sliceES_3.npz     same, validation patients
    test/case_002_volume_ED.npz      keys img, label (D x H x W), one file per frame
    lists_ACDC/{train,valid,test}.txt  optional: the file names, extension included

Raw challenge form: ``patientXXX/patientXXX_frameYY.nii.gz`` with ``patientXXX_frameYY_gt.nii.gz``
for the annotated ED and ES frames (``Info.cfg`` names which is which), directly under ``root`` or one
or two folders below it (``training/``, ``database/testing/``). Patients are split 70/10/20 by a seeded
rule, or by ``lists_ACDC/{train,valid,test}.txt`` naming patient ids. Each volume is min-max scaled
to [0, 1], as the common ACDC preprocessing does.

A case is one frame of one patient (``case_001_ED``, ``patient001_ES``); splits, the low-data
``fraction`` and the disjointness checks work on patients, so the two frames of a patient always
land in the same split. Classes: 0 background, 1 right ventricle, 2 myocardium, 3 left ventricle.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fusionsearch.data.base import SegmentationDataset, SliceFilesSource, VolumeFileSource, parse_size
from fusionsearch.data.io import (
    as_image,
    as_label,
    check_label_range,
    load_nifti,
    load_npz,
    nifti_shape,
    nifti_stem,
    npz_shape,
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
    split_three,
)
from fusionsearch.errors import ConfigError, DataError
from fusionsearch.registry import register_dataset

CLASS_NAMES = ("background", "right ventricle", "myocardium", "left ventricle")
FORMS = ("auto", "mtunet", "raw")
_LABEL_FIX = "ACDC labels are 0 background, 1 right ventricle, 2 myocardium, 3 left ventricle."

_SLICE_FILE = re.compile(r"^(case_\d+)_slice(ED|ES)_(\d+)\.npz$")
_VOLUME_FILE = re.compile(r"^(case_\d+)_volume_?(ED|ES)\.npz$")
_PATIENT_DIR = re.compile(r"^patient\d+$")
_GT_FILE = re.compile(r"^(patient\d+)_frame(\d+)_gt\.nii(?:\.gz)?$")
_PATIENT_ENTRY = re.compile(r"patient\d+")


def _patient_of(case: str) -> str:
    return case.rsplit("_", 1)[0]


def _minmax(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    return ((image - low) / (high - low) if high > low else np.zeros_like(image)).astype(np.float32)


class AcdcNpzDecoder:
    """Reads MT-UNet files: slices (img, label H x W) and volumes (D x H x W), kept as stored."""

    def slice_file(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        arrays = load_npz(path, ("img", "label"))
        image = as_image(arrays["img"], path, 2)
        label = as_label(arrays["label"], path, image.shape)
        check_label_range(label, 4, path, _LABEL_FIX)
        return image, label

    def volume_file(self, path: Path, z: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        arrays = load_npz(path, ("img", "label"))
        image = as_image(arrays["img"], path, 3)
        label = as_label(arrays["label"], path, image.shape)
        check_label_range(label, 4, path, _LABEL_FIX)
        return (image, label) if z is None else (image[z], label[z])

    @staticmethod
    def depth(path: Path) -> int:
        return npz_shape(path, "img")[0]


class AcdcNiftiDecoder:
    """Reads a raw challenge frame and its ``_gt`` file as [D,H,W] (slices along the NIfTI z axis)."""

    @staticmethod
    def gt_path(image_path: Path) -> Path:
        stem = nifti_stem(image_path)
        return image_path.with_name(image_path.name.replace(stem, f"{stem}_gt", 1))

    def volume_file(self, path: Path, z: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        image = as_image(load_nifti(path), path, 3)
        gt = self.gt_path(path)
        label = as_label(load_nifti(gt), gt, image.shape)
        check_label_range(label, 4, gt, _LABEL_FIX)
        image, label = _minmax(np.transpose(image, (2, 0, 1))), np.transpose(label, (2, 0, 1))
        return (image, label) if z is None else (image[z], label[z])

    @staticmethod
    def depth(path: Path) -> int:
        shape = nifti_shape(path)
        if len(shape) != 3:
            raise DataError(f"{path}: shape {shape}; an ACDC frame must be a 3D volume (use the frame files, not _4d).")
        return shape[2]


# -- MT-UNet form -------------------------------------------------------------------------------------
def _mtunet_files(root: Path, split: str) -> list[Path] | None:
    """The files of one split, from its list file if present, else from its folder; None if neither."""
    list_file = root / "lists_ACDC" / f"{split}.txt"
    folder = root / split
    if list_file.is_file():
        files = []
        for entry in read_list_file(list_file):
            path = folder / (entry if entry.endswith(".npz") else f"{entry}.npz")
            if not path.is_file():
                raise DataError(f"{list_file} lists {entry!r} but {path} does not exist. Fix the list or add the file.")
            files.append(path)
        return files
    if folder.is_dir():
        return sorted(folder.glob("*.npz"))
    return None


def _group_slices(files: list[Path], where: Path) -> dict[str, dict[int, Path]]:
    cases: dict[str, dict[int, Path]] = {}
    ignored = []
    for path in files:
        match = _SLICE_FILE.match(path.name)
        if match is None:
            ignored.append(path.name)
            continue
        cases.setdefault(f"{match.group(1)}_{match.group(2)}", {})[int(match.group(3))] = path
    if ignored:
        warn(f"{where}: ignored file(s) not named case_XXX_slice{{ED,ES}}_N.npz: {', '.join(ignored[:8])}")
    return cases


def _group_volumes(files: list[Path], where: Path) -> dict[str, Path]:
    cases: dict[str, Path] = {}
    ignored = []
    for path in files:
        match = _VOLUME_FILE.match(path.name)
        if match is None:
            ignored.append(path.name)
        else:
            cases[f"{match.group(1)}_{match.group(2)}"] = path
    if ignored:
        warn(f"{where}: ignored file(s) not named case_XXX_volume_{{ED,ES}}.npz: {', '.join(ignored[:8])}")
    return cases


def _check_contiguous(case: str, numbers: list[int], where: Path) -> None:
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        warn(f"{where}: the slices of {case} are not contiguous ({numbers}); its stacked volume skips the gaps.")


def _mtunet_sources(root: Path, split: str, options: dict) -> tuple[list, str]:
    decoder = AcdcNpzDecoder()
    train_files = _mtunet_files(root, "train")
    valid_files = _mtunet_files(root, "valid")
    test_files = _mtunet_files(root, "test")
    train = _group_slices(train_files or [], root / "train")
    valid = _group_slices(valid_files, root / "valid") if valid_files is not None else None
    test = _group_volumes(test_files or [], root / "test")
    patients = {name: {_patient_of(c) for c in group} for name, group in (("train", train), ("test", test))}
    if valid is not None:
        patients["valid"] = {_patient_of(c) for c in valid}
    check_disjoint(patients, str(root))
    if split == "test":
        sources = [VolumeFileSource(c, test[c], decoder.volume_file, decoder.depth) for c in sorted(test)]
        return sources, f"No case_XXX_volume_{{ED,ES}}.npz files were found in {root / 'test'}."
    train_patients = sorted(patients["train"])
    if valid is None and train_patients:  # no valid/ folder: carve validation patients from training
        train_patients, valid_patients = carve(train_patients, options["val_fraction"], options["split_seed"], "valid")
        valid = {c: s for c, s in train.items() if _patient_of(c) in set(valid_patients)}
    if split == "train":
        kept = set(keep_fraction(train_patients, options["fraction"], options["split_seed"])) if train_patients else ()
        groups = {c: s for c, s in train.items() if _patient_of(c) in kept}
    else:
        groups = valid or {}
    sources = []
    for case in sorted(groups):
        numbers = sorted(groups[case])
        if split == "valid" and options["volumes"] is not False:
            _check_contiguous(case, numbers, root / "valid")
        sources.append(SliceFilesSource(case, [groups[case][n] for n in numbers], numbers, decoder.slice_file))
    return sources, f"No case_XXX_slice{{ED,ES}}_N.npz files were found in {root / split}."


# -- raw challenge form --------------------------------------------------------------------------------
def _patient_dirs(root: Path) -> list[Path]:
    found = []
    for pattern in ("*", "*/*", "*/*/*"):
        found.extend(p for p in root.glob(pattern) if p.is_dir() and _PATIENT_DIR.match(p.name))
    return sorted(found, key=lambda p: p.name)


def _frame_names(patient_dir: Path) -> dict[int, str]:
    """{frame number: 'ED'/'ES'} from Info.cfg, empty when there is none."""
    info = patient_dir / "Info.cfg"
    names: dict[int, str] = {}
    if info.is_file():
        for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("ED", "ES") and value.strip().isdigit():
                names[int(value.strip())] = key.strip()
    return names


def _raw_cases(patient_dirs: list[Path]) -> dict[str, Path]:
    """Case id (patient001_ED) -> image path, for every frame that has a ground-truth file."""
    cases: dict[str, Path] = {}
    seen: dict[str, Path] = {}
    for patient_dir in patient_dirs:
        if patient_dir.name in seen:
            raise DataError(
                f"patient folder {patient_dir.name} appears twice: {seen[patient_dir.name]} and "
                f"{patient_dir}. Point root at a folder holding each patient once."
            )
        seen[patient_dir.name] = patient_dir
        frames = _frame_names(patient_dir)
        found = 0
        for gt in sorted(patient_dir.iterdir()):
            match = _GT_FILE.match(gt.name)
            if not match:
                continue
            image = next(
                (
                    gt.with_name(f"{match.group(1)}_frame{match.group(2)}{s}")
                    for s in (".nii.gz", ".nii")
                    if gt.with_name(f"{match.group(1)}_frame{match.group(2)}{s}").is_file()
                ),
                None,
            )
            if image is None:
                warn(f"{gt} has no matching image file {gt.name.replace('_gt', '')}; this frame is skipped.")
                continue
            frame = int(match.group(2))
            cases[f"{patient_dir.name}_{frames.get(frame, f'frame{frame:02d}')}"] = image
            found += 1
        if not found:
            warn(f"{patient_dir} holds no annotated frame (patientXXX_frameYY_gt.nii.gz); the patient is skipped.")
    return cases


def _raw_split(root: Path, patients: list[str], options: dict) -> dict[str, list[str]]:
    list_dir = root / "lists_ACDC"
    listed = {}
    for name in ("train", "valid", "test"):
        list_file = list_dir / f"{name}.txt"
        if list_file.is_file():
            entries = []
            for entry in read_list_file(list_file):
                match = _PATIENT_ENTRY.search(entry)
                if match is None or match.group(0) not in patients:
                    raise DataError(f"{list_file}: entry {entry!r} names no patient folder found under {root}.")
                entries.append(match.group(0))
            listed[name] = sorted(set(entries))
    if not listed:
        return split_three(patients, options["val_fraction"], options["test_fraction"], options["split_seed"])
    if "train" not in listed:
        raise DataError(f"{list_dir} has split lists but no train.txt; add it or remove the lists for a seeded split.")
    if "valid" not in listed:
        listed["train"], listed["valid"] = carve(
            listed["train"], options["val_fraction"], options["split_seed"], "valid"
        )
    listed.setdefault("test", [])
    check_disjoint(listed, str(list_dir))
    return listed


def _raw_sources(root: Path, split: str, patient_dirs: list[Path], options: dict) -> tuple[list, str]:
    decoder = AcdcNiftiDecoder()
    cases = _raw_cases(patient_dirs)
    patients = sorted({_patient_of(c) for c in cases})
    parts = _raw_split(root, patients, options)
    chosen = set(parts[split])
    if split == "train" and chosen:
        chosen = set(keep_fraction(sorted(chosen), options["fraction"], options["split_seed"]))
    sources = [
        VolumeFileSource(c, cases[c], decoder.volume_file, decoder.depth)
        for c in sorted(cases)
        if _patient_of(c) in chosen
    ]
    return sources, f"The seeded split gave no {split} patients from {len(patients)} patient(s); add patients."


# -- the dataset ----------------------------------------------------------------------------------------
def _detect_form(root: Path, form: str) -> tuple[str, list[Path]]:
    has_npz = any((root / d).is_dir() and any((root / d).glob("*.npz")) for d in ("train", "valid", "test"))
    has_lists = (root / "lists_ACDC").is_dir() and any((root / d).is_dir() for d in ("train", "valid", "test"))
    mtunet = has_npz or has_lists
    patient_dirs = _patient_dirs(root) if form != "mtunet" else []
    if form == "mtunet" or (form == "auto" and mtunet and not patient_dirs):
        return "mtunet", []
    if form == "raw" or (form == "auto" and patient_dirs and not mtunet):
        if not patient_dirs:
            raise DataError(f"{root} holds no patientXXX/ folders, so it is not the raw ACDC challenge form.")
        return "raw", patient_dirs
    if mtunet and patient_dirs:
        raise DataError(
            f"{root} holds both MT-UNet npz folders and raw patientXXX/ folders; set form: mtunet or "
            f"form: raw in the data options."
        )
    listing = ", ".join(sorted(p.name for p in root.iterdir())[:12]) or "nothing"
    raise DataError(
        f"{root} is neither ACDC form: it holds {listing}. Expected train/, valid/, test/ with .npz files "
        f"(MT-UNet form, keys img and label) or patientXXX/ folders with patientXXX_frameYY_gt.nii.gz (raw challenge "
        f"form); see docs/data/acdc.md."
    )


@register_dataset("acdc")
def build_acdc(
    root: str | Path,
    split: str = "train",
    *,
    form: str = "auto",
    size: int | list[int] | None = 224,
    volumes: bool | None = None,
    augment: bool | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    fraction: float = 1.0,
    split_seed: int = 0,
    cache_volumes: int = 4,
) -> SegmentationDataset:
    """The ACDC dataset (see module doc). ``form`` is auto, mtunet or raw; ``val_fraction`` and
    ``test_fraction`` apply where the data do not fix the split (raw form, or no valid/ folder)."""
    check_split(split)
    if form not in FORMS:
        raise ConfigError(f"unknown ACDC form {form!r}", field="form", fix=f"Use one of {', '.join(FORMS)}")
    options = {
        "val_fraction": check_fraction(val_fraction, "val_fraction", allow_zero=True, allow_one=False),
        "test_fraction": check_fraction(test_fraction, "test_fraction", allow_zero=True, allow_one=False),
        "fraction": check_fraction(fraction, "fraction", allow_zero=False),
        "split_seed": split_seed,
        "volumes": volumes,
    }
    root = require_dir(
        Path(root).expanduser(),
        "The ACDC root",
        "Set data.root to the ACDC folder (or write phantoms with 'fusionsearch make-data acdc DIR').",
    )
    detected, patient_dirs = _detect_form(root, form)
    if detected == "mtunet":
        sources, empty_hint = _mtunet_sources(root, split, options)
    else:
        sources, empty_hint = _raw_sources(root, split, patient_dirs, options)
    is_train = split == "train"
    dataset = SegmentationDataset(
        name="acdc",
        root=root,
        split=split,
        sources=sources,
        num_classes=4,
        class_names=CLASS_NAMES,
        volumes=(not is_train) if volumes is None else bool(volumes),
        augment=is_train if augment is None else bool(augment),
        seed=seed,
        size=parse_size(size, 2),
        cache_volumes=cache_volumes,
        label_fix=_LABEL_FIX,
        empty_hint=empty_hint,
    )
    dataset.form = detected
    return dataset
