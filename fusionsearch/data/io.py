"""Reading array files (npz, h5, NIfTI) with checks that turn bad files into clear DataErrors.

Every reader in ``fusionsearch.data`` goes through these helpers, so that a missing key, a corrupt
file, a shape mismatch or a label value the dataset cannot hold is reported with the file's path
and a fix, instead of surfacing later as a wrong Dice score or an opaque numpy error.
"""

from __future__ import annotations

import re
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusionsearch.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


class DataWarning(UserWarning):
    """A recoverable problem with data on disk: a skipped file or case, a gap in slice numbers."""


def warn(message: str) -> None:
    """Emit a :class:`DataWarning` (nothing is ever skipped without one)."""
    warnings.warn(message, DataWarning, stacklevel=3)


def require_dir(path: Path, what: str, fix: str) -> Path:
    """Return ``path`` if it is a directory, else raise a DataError saying what was expected there."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist. {fix}")
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a directory. {fix}")
    return path


def natural_key(text: str) -> list[object]:
    """Sort key that orders embedded numbers numerically (slice2 before slice10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def nifti_stem(path: Path) -> str:
    """File name without its .nii/.nii.gz suffix."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES)


def load_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Load the arrays ``keys`` from an .npz file (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise DataError(f"{path} is a plain .npy array, not an .npz archive with keys {list(keys)}.")
            missing = [key for key in keys if key not in archive.files]
            if missing:
                raise DataError(
                    f"{path} has no {', '.join(repr(k) for k in missing)} array (it holds {archive.files}). "
                    f"This dataset form expects the keys {list(keys)}; check that the file belongs to this "
                    f"dataset form or re-export it with those keys."
                )
            return {key: np.asarray(archive[key]) for key in keys}
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path} does not exist (it is named by the dataset's file list).") from None
    except _READ_ERRORS as exc:
        raise DataError(f"{path} cannot be read as an .npz archive ({exc}); the file is corrupt or not npz.") from exc


def h5_depth(path: Path, keys: Sequence[str] = ("image", "label")) -> int:
    """Number of slices (first axis) in an h5 volume, checking that ``keys`` exist and agree in shape."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            shapes = {}
            for key in keys:
                if key not in handle:
                    raise DataError(
                        f"{path} has no '{key}' dataset (it holds {sorted(handle.keys())}); an h5 volume "
                        f"needs the datasets {list(keys)}."
                    )
                shapes[key] = tuple(handle[key].shape)
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{path} cannot be read as an HDF5 file ({exc}); the file is corrupt or truncated.") from exc
    first = shapes[keys[0]]
    for key, shape in shapes.items():
        if len(shape) != 3:
            raise DataError(f"{path}: '{key}' has shape {shape}; a volume must be 3D (slices x height x width).")
        if shape != first:
            raise DataError(f"{path}: image and label shapes differ ({shapes}); they must match voxel for voxel.")
    return first[0]


def load_h5(path: Path, keys: Sequence[str], index: int | list[int] | None = None) -> dict[str, np.ndarray]:
    """Read datasets ``keys`` of an h5 file: whole, one slice ``index``, or increasing slices ``index``."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            out = {}
            for key in keys:
                if key not in handle:
                    raise DataError(f"{path} has no '{key}' dataset (it holds {sorted(handle.keys())}).")
                out[key] = np.asarray(handle[key][()] if index is None else handle[key][index])
            return out
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{path} cannot be read as an HDF5 file ({exc}); the file is corrupt or truncated.") from exc


def nifti_shape(path: Path) -> tuple[int, ...]:
    """Shape from the NIfTI header, without reading the voxels."""
    import nibabel

    try:
        return tuple(int(n) for n in nibabel.load(str(path)).shape)
    except Exception as exc:  # nibabel raises its own ImageFileError and assorted others
        raise DataError(f"{path} cannot be read as a NIfTI file ({exc}); the file is corrupt or not NIfTI.") from exc


def load_nifti(path: Path) -> np.ndarray:
    """Voxel array of a NIfTI file (scaled by the header's slope/intercept, as nibabel does)."""
    import nibabel

    try:
        return np.asanyarray(nibabel.load(str(path)).dataobj)
    except Exception as exc:  # nibabel's errors do not share a narrower base class
        raise DataError(f"{path} cannot be read as a NIfTI file ({exc}); the file is corrupt or truncated.") from exc


def as_image(array: np.ndarray, path: Path | str, ndim: int) -> np.ndarray:
    """Check an image array's rank and values and return it as float32."""
    if array.ndim != ndim:
        raise DataError(f"{path}: the image has shape {array.shape}; this dataset form expects a {ndim}D array.")
    image = np.asarray(array, dtype=np.float32)
    if not np.isfinite(image).all():
        raise DataError(f"{path}: the image holds NaN or infinite values; fix or re-export the file.")
    return image


def as_label(array: np.ndarray, path: Path | str, image_shape: tuple[int, ...]) -> np.ndarray:
    """Check a label array against its image and return it as int64 (integral values only)."""
    if tuple(array.shape) != tuple(image_shape):
        raise DataError(
            f"{path}: image shape {tuple(image_shape)} and label shape {tuple(array.shape)} differ; a label map "
            f"must match its image voxel for voxel."
        )
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise DataError(
                f"{path}: the label holds non-integer values; labels must be class indices (was it resized "
                f"with interpolation instead of nearest neighbour?)."
            )
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        raise DataError(f"{path}: the label has dtype {array.dtype}; expected integer class indices.")
    return np.asarray(array, dtype=np.int64)


def check_label_range(label: np.ndarray, num_classes: int, path: Path | str, fix: str) -> None:
    """Raise a DataError when ``label`` holds values outside ``0 .. num_classes - 1``."""
    if label.size == 0:
        return
    low, high = int(label.min()), int(label.max())
    if low < 0 or high >= num_classes:
        bad = np.unique(label[(label < 0) | (label >= num_classes)])
        shown = ", ".join(str(int(v)) for v in bad[:10])
        raise DataError(
            f"{path}: label values {shown} are out of range for {num_classes} classes (0..{num_classes - 1}). {fix}"
        )


def npz_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of array ``key`` in an .npz archive, read from its header without loading the data."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = reader(member)
            return tuple(int(n) for n in shape)
    except _READ_ERRORS as exc:
        raise DataError(f"{path} has no readable '{key}' array ({exc}); the file is corrupt or not npz.") from exc
