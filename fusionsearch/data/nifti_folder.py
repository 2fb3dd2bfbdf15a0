"""Bring your own data: a folder of NIfTI images and label maps with matching names.

Layouts (``root``)::

    imagesTr/ labelsTr/ [imagesTs/ labelsTs/]     Medical Segmentation Decathlon / nnU-Net style
    images/ labels/                               plain

Names match when equal after dropping ``.nii``/``.nii.gz``, or when the image carries nnU-Net's
channel suffix ``_0000`` (``liver_003_0000.nii.gz`` pairs with ``liver_003.nii.gz``). Training uses 2D
slices along ``axis`` (``spatial_dims=2``) or random 3D patches (``spatial_dims=3``); validation and
test give whole volumes [D,H,W] with the slicing axis first. The test split is ``imagesTs``/``labelsTs``
when both exist, else carved from the training cases by a seeded rule, as is validation.
``num_classes`` is taken from the options, else from ``dataset.json`` (MSD/nnU-Net), else inferred
by scanning every label file (slow for big data: set it to skip the scan).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fusionsearch.data.base import SegmentationDataset, VolumeFileSource, parse_size
from fusionsearch.data.io import (
    as_image,
    as_label,
    is_nifti,
    load_nifti,
    nifti_shape,
    nifti_stem,
    require_dir,
    warn,
)
from fusionsearch.data.splits import carve, check_fraction, check_split, keep_fraction, split_three
from fusionsearch.errors import ConfigError, DataError
from fusionsearch.registry import register_dataset

NORMALIZATIONS = ("minmax", "zscore", "none")
_CHANNEL_SUFFIX = "_0000"

_inferred_classes: dict[tuple, int] = {}


def _volume_array(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{path}: shape {array.shape}; nifti_folder reads single-channel 3D volumes.")
    return array


class NiftiPairDecoder:
    """Reads an image/label NIfTI pair as [D,H,W] arrays (``axis`` first), image normalised per volume."""

    def __init__(self, labels: dict[Path, Path], axis: int, normalize: str, clip: tuple[float, float] | None):
        self.labels = labels
        self.axis = axis
        self.normalize = normalize
        self.clip = clip

    def volume_file(self, path: Path, z: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        image = as_image(_volume_array(load_nifti(path), path), path, 3)
        label_path = self.labels[path]
        label = as_label(_volume_array(load_nifti(label_path), label_path), label_path, image.shape)
        image = self._normalise(np.moveaxis(image, self.axis, 0))
        label = np.moveaxis(label, self.axis, 0)
        return (image, label) if z is None else (image[z], label[z])

    def depth(self, path: Path) -> int:
        return nifti_shape(path)[self.axis]

    def _normalise(self, image: np.ndarray) -> np.ndarray:
        if self.clip is not None:
            image = np.clip(image, *self.clip)
        if self.normalize == "minmax":
            low, high = self.clip if self.clip is not None else (float(image.min()), float(image.max()))
            image = (image - low) / (high - low) if high > low else np.zeros_like(image)
        elif self.normalize == "zscore":
            std = float(image.std())
            image = (image - float(image.mean())) / std if std > 0 else np.zeros_like(image)
        return np.ascontiguousarray(image, dtype=np.float32)


def _pair_folder(images_dir: Path, labels_dir: Path) -> dict[str, tuple[Path, Path]]:
    """Case id -> (image, label); unmatched files and extra channels are skipped with a warning."""
    labels = {nifti_stem(p): p for p in sorted(labels_dir.iterdir()) if is_nifti(p) and not p.name.startswith(".")}
    pairs: dict[str, tuple[Path, Path]] = {}
    extra_channels, unmatched = [], []
    for image in sorted(images_dir.iterdir()):
        if not is_nifti(image) or image.name.startswith("."):  # '._x.nii.gz' are macOS metadata, not images
            continue
        stem = nifti_stem(image)
        base = stem[: -len(_CHANNEL_SUFFIX)] if stem.endswith(_CHANNEL_SUFFIX) else stem
        if base in labels:
            pairs[base] = (image, labels[base])
        elif len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() and stem[:-5] in labels:
            extra_channels.append(image.name)
        else:
            unmatched.append(image.name)
    if extra_channels:
        warn(
            f"{images_dir}: only channel _0000 is read; skipped the other channel file(s) "
            f"{', '.join(extra_channels[:8])}"
        )
    if unmatched:
        warn(f"{images_dir}: image(s) without a label in {labels_dir.name}/ are skipped: {', '.join(unmatched[:8])}")
    orphans = sorted(set(labels) - set(pairs))
    if orphans:
        warn(f"{labels_dir}: label(s) without an image are skipped: {', '.join(orphans[:8])}")
    return pairs


def _find_layout(root: Path) -> tuple[dict[str, tuple[Path, Path]], dict[str, tuple[Path, Path]] | None]:
    """(training pool, test set or None) for the imagesTr/labelsTr or images/labels layout."""
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        pool = _pair_folder(root / "imagesTr", root / "labelsTr")
        if (root / "imagesTs").is_dir() and (root / "labelsTs").is_dir():
            return pool, _pair_folder(root / "imagesTs", root / "labelsTs")
        if (root / "imagesTs").is_dir():
            warn(
                f"{root}/imagesTs has no labelsTs/ folder, so it cannot be evaluated; the test split is carved from "
                f"imagesTr instead."
            )
        return pool, None
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return _pair_folder(root / "images", root / "labels"), None
    listing = ", ".join(sorted(p.name for p in root.iterdir())[:12]) or "nothing"
    raise DataError(
        f"{root} holds {listing}; expected imagesTr/ and labelsTr/ (optionally imagesTs/ and labelsTs/) or images/ "
        f"and labels/ folders of .nii/.nii.gz files with matching names; see docs/data/nifti_folder.md."
    )


def _dataset_json_labels(root: Path) -> list[str] | None:
    """Class names by index from an MSD/nnU-Net dataset.json, or None if there is none."""
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text(encoding="utf-8")).get("labels")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{path} is not valid JSON with a 'labels' mapping ({exc}).") from exc
    if not isinstance(labels, dict) or not labels:
        return None
    by_index: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).isdigit():  # MSD: {"0": "background", "1": "liver"}
            by_index[int(key)] = str(value)
        elif isinstance(value, int):  # nnU-Net v2: {"background": 0, "liver": 1}
            by_index[value] = str(key)
        else:
            raise DataError(
                f"{path}: label entry {key!r}: {value!r} is not an index/name pair (region-based labels "
                f"are not supported); set num_classes and class_names in the data options."
            )
    return [by_index.get(i, f"class{i}") for i in range(max(by_index) + 1)]


def _infer_num_classes(root: Path, label_files: list[Path]) -> int:
    key = (str(root.resolve()), tuple(sorted((str(p), p.stat().st_mtime_ns) for p in label_files)))
    if key not in _inferred_classes:
        warn(
            f"num_classes is not set and {root} has no dataset.json: scanning all {len(label_files)} label files to "
            f"infer it (set num_classes: in the data options to skip this, and to be safe when a class is absent)."
        )
        highest = 0
        for path in tqdm(label_files, desc="scanning labels for num_classes", unit="file"):
            array = load_nifti(path)
            label = as_label(array, path, array.shape)
            if label.size and int(label.min()) < 0:
                raise DataError(f"{path}: negative label values; labels must be class indices 0..C-1.")
            highest = max(highest, int(label.max()) if label.size else 0)
        _inferred_classes[key] = highest + 1
    return _inferred_classes[key]


@register_dataset("nifti_folder")
def build_nifti_folder(
    root: str | Path,
    split: str = "train",
    *,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    spatial_dims: int = 2,
    axis: int = 2,
    size: int | list[int] | None = 224,
    patch_size: int | list[int] = 96,
    volumes: bool | None = None,
    augment: bool | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    fraction: float = 1.0,
    split_seed: int = 0,
    normalize: str = "minmax",
    clip: list[float] | None = None,
    patches_per_volume: int = 1,
    foreground_probability: float = 0.33,
    cache_volumes: int = 4,
) -> SegmentationDataset:
    """A generic NIfTI images/labels folder (see module doc)."""
    check_split(split)
    if spatial_dims not in (2, 3):
        raise ConfigError(f"must be 2 or 3, got {spatial_dims!r}", field="spatial_dims")
    if axis not in (0, 1, 2):
        raise ConfigError(f"must be 0, 1 or 2 (the voxel axis to slice along), got {axis!r}", field="axis")
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalisation {normalize!r}", field="normalize", fix=f"Use one of {NORMALIZATIONS}")
    if clip is not None and (len(clip) != 2 or not float(clip[0]) < float(clip[1])):
        raise ConfigError(f"must be [low, high] with low < high, got {clip!r}", field="clip")
    if not isinstance(patches_per_volume, int) or patches_per_volume < 1:
        raise ConfigError(f"must be a positive integer, got {patches_per_volume!r}", field="patches_per_volume")
    foreground_probability = check_fraction(foreground_probability, "foreground_probability", allow_zero=True)
    val_fraction = check_fraction(val_fraction, "val_fraction", allow_zero=True, allow_one=False)
    test_fraction = check_fraction(test_fraction, "test_fraction", allow_zero=True, allow_one=False)
    fraction = check_fraction(fraction, "fraction", allow_zero=False)
    root = require_dir(
        Path(root).expanduser(),
        "The nifti_folder root",
        "Set data.root to the folder holding imagesTr/ and labelsTr/ (or images/ and labels/).",
    )

    pool, test = _find_layout(root)
    overlap = sorted(set(pool) & set(test or {}))
    if overlap:
        raise DataError(f"{root}: case(s) {', '.join(overlap)} appear in both the training and the test folders.")
    if not pool:
        parts = {"train": [], "valid": [], "test": sorted(test or {})}
    elif test is None:  # no labelled test folder: all three splits carved, fractions of all cases
        parts = split_three(sorted(pool), val_fraction, test_fraction, split_seed)
    else:
        train_ids, valid_ids = carve(sorted(pool), val_fraction, split_seed, "valid")
        parts = {"train": train_ids, "valid": valid_ids, "test": sorted(test)}
    if split == "train" and parts["train"]:
        parts["train"] = keep_fraction(parts["train"], fraction, split_seed)
    chosen = parts[split]

    names = list(class_names) if class_names is not None else None
    if num_classes is None:
        names_from_json = _dataset_json_labels(root)
        if names_from_json is not None:
            num_classes = len(names_from_json)
            names = names or names_from_json
        else:
            every_label = [pair[1] for pair in sorted({**pool, **(test or {})}.values())]
            num_classes = _infer_num_classes(root, every_label) if every_label else 2
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"must be an integer >= 2 (background included), got {num_classes!r}", field="num_classes")
    names = names or ["background", *(f"class{i}" for i in range(1, num_classes))]

    cases = {**pool, **(test or {})}
    decoder = NiftiPairDecoder(
        {cases[c][0]: cases[c][1] for c in chosen},
        axis,
        normalize,
        None if clip is None else (float(clip[0]), float(clip[1])),
    )
    sources = [VolumeFileSource(c, cases[c][0], decoder.volume_file, decoder.depth) for c in chosen]
    is_train = split == "train"
    return SegmentationDataset(
        name="nifti_folder",
        root=root,
        split=split,
        sources=sources,
        num_classes=num_classes,
        class_names=names,
        volumes=(not is_train) if volumes is None else bool(volumes),
        augment=is_train if augment is None else bool(augment),
        seed=seed,
        size=parse_size(size, 2) if spatial_dims == 2 else None,
        spatial_dims=spatial_dims,
        patch_size=parse_size(patch_size, 3, "patch_size") if spatial_dims == 3 else None,
        patches_per_volume=patches_per_volume,
        foreground_probability=foreground_probability,
        cache_volumes=cache_volumes,
        label_fix="Set num_classes to the number of classes the label files hold (background included).",
        empty_hint=f"Found {len(cases)} image/label pair(s) in total; add cases or change the fractions.",
    )
