"""Synthetic phantoms written in the exact Synapse and ACDC (MT-UNet) on-disk forms.

The phantoms stand in for the real benchmarks in tests, the CPU demo and tutorials. They are small
but not trivial: organs of very different sizes and shapes (a large liver-like blob, a small
gallbladder-like ellipsoid, thin tube-like vessels, a ring-shaped myocardium), each with its own
intensity, plus noise, a smooth bias field and a smooth random deformation, so that coarse decoder
scales see the large organs and only fine scales resolve the thin ones: multi-scale supervision
matters on them as on real data.

Everything is deterministic given ``seed``; each case draws from its own generator
(``default_rng([seed, case number])``), so a case looks the same whatever number of cases is
written. Use :func:`make_synapse` / :func:`make_acdc` or ``fusionsearch make-data``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from fusionsearch.data.splits import split_three
from fusionsearch.data.synapse import BTCV14_NAMES, HU_WINDOW, SYNAPSE9_NAMES, TEST_CASES, TRAIN_CASES
from fusionsearch.errors import ConfigError, FusionSearchError

# Abdominal organs: (name, centre x, y, z, radii x, y, z, mean HU), in [-1, 1] coordinates; painted in
# this order, so later (smaller) structures overwrite earlier ones.
_BLOBS = (
    ("liver", -0.38, -0.08, 0.25, 0.40, 0.34, 0.75, 105.0),
    ("liver", -0.08, -0.28, 0.40, 0.26, 0.15, 0.45, 105.0),
    ("stomach", 0.30, -0.28, 0.45, 0.22, 0.16, 0.40, 10.0),
    ("spleen", 0.56, 0.12, 0.30, 0.13, 0.19, 0.35, 80.0),
    ("right kidney", -0.36, 0.38, -0.35, 0.11, 0.15, 0.35, 185.0),
    ("left kidney", 0.36, 0.38, -0.30, 0.11, 0.15, 0.35, 185.0),
    ("gallbladder", -0.22, -0.02, -0.10, 0.07, 0.09, 0.22, -10.0),
    ("right adrenal gland", -0.25, 0.28, 0.20, 0.05, 0.04, 0.12, 45.0),
    ("left adrenal gland", 0.28, 0.28, 0.25, 0.05, 0.04, 0.12, 45.0),
)
# Tubes running along z: (name, centre x, y, radius, z from, z to, mean HU).
_TUBES = (
    ("aorta", 0.05, 0.34, 0.05, -1.0, 1.0, 230.0),
    ("inferior vena cava", -0.13, 0.33, 0.055, -1.0, 1.0, 150.0),
    ("portal and splenic vein", -0.14, 0.12, 0.035, -0.15, 0.55, 165.0),
    ("esophagus", 0.10, 0.22, 0.035, 0.45, 1.0, 35.0),
)
_PANCREAS_HU = 60.0


def _grid(depth: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axis_z = np.linspace(-1.0, 1.0, depth) if depth > 1 else np.zeros(1)
    axis = np.linspace(-1.0, 1.0, size)
    return np.meshgrid(axis_z, axis, axis, indexing="ij")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """A smooth random field with values in [-amplitude, amplitude]."""
    sigma = tuple(max(1.0, n / 4.0) for n in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    return amplitude * field / max(float(np.abs(field).max()), 1e-8)


def _deformed_grid(rng: np.random.Generator, depth: int, size: int, amplitude: float):
    z, y, x = _grid(depth, size)
    shape = z.shape
    return z, y + _smooth_field(rng, shape, amplitude), x + _smooth_field(rng, shape, amplitude)


def _jitter(rng: np.random.Generator, value: float, spread: float) -> float:
    return value + float(rng.uniform(-spread, spread))


def synapse_phantom(
    seed: int, case_number: int, depth: int, size: int, *, labels: str = "btcv14"
) -> tuple[np.ndarray, np.ndarray]:
    """One abdominal CT phantom: (image in HU, float32 [D,H,W]; label, uint8 [D,H,W]).

    ``labels='btcv14'`` writes the raw BTCV values 0..13; ``'synapse9'`` the TransUNet release's
    9-class order (structures outside the 8 organs become background).
    """
    codes = _label_codes(labels)
    rng = np.random.default_rng([seed, case_number])
    z, y, x = _deformed_grid(rng, depth, size, amplitude=0.06)
    image = np.full(z.shape, -1000.0)
    label = np.zeros(z.shape, dtype=np.uint8)
    body = ((x / 0.92) ** 2 + ((y - 0.05) / 0.72) ** 2) <= 1.0
    image[body] = -90.0  # fat
    muscle = body & (((x / 0.8) ** 2 + ((y - 0.05) / 0.6) ** 2) <= 1.0)
    image[muscle] = 30.0
    for name, cx, cy, cz, rx, ry, rz, hu in _BLOBS:
        scale = float(rng.uniform(0.85, 1.15))
        inside = (
            ((x - _jitter(rng, cx, 0.04)) / (rx * scale)) ** 2
            + ((y - _jitter(rng, cy, 0.04)) / (ry * scale)) ** 2
            + ((z - _jitter(rng, cz, 0.08)) / rz) ** 2
        ) <= 1.0
        _paint(image, label, inside & body, hu, codes.get(name, 0))
    # pancreas: a thin curved band across the middle of the abdomen
    bend = float(rng.uniform(0.2, 0.5))
    centre_line = 0.08 + bend * (x - 0.1) ** 2
    band = (np.abs(y - centre_line) <= 0.045) & (x > -0.12) & (x < 0.45) & (z > -0.25) & (z < 0.35)
    _paint(image, label, band & body, _PANCREAS_HU, codes.get("pancreas", 0))
    for name, cx, cy, radius, z_from, z_to, hu in _TUBES:
        drift = 0.03 * z  # vessels drift slightly across slices
        inside = ((x - cx - drift) ** 2 + (y - cy) ** 2) <= (radius * float(rng.uniform(0.9, 1.1))) ** 2
        _paint(image, label, inside & (z >= z_from) & (z <= z_to), hu, codes.get(name, 0))
    image += _smooth_field(rng, image.shape, 15.0) + rng.normal(0.0, 18.0, image.shape)
    return image.astype(np.float32), label


def _paint(image: np.ndarray, label: np.ndarray, mask: np.ndarray, hu: float, code: int) -> None:
    image[mask] = hu
    label[mask] = code


def _label_codes(labels: str) -> dict[str, int]:
    if labels == "btcv14":
        return {name: index for index, name in enumerate(BTCV14_NAMES) if index}
    if labels == "synapse9":
        return {name: index for index, name in enumerate(SYNAPSE9_NAMES) if index}
    raise ConfigError(f"unknown label form {labels!r}", field="labels", fix="Use btcv14 or synapse9")


def acdc_phantom(seed: int, patient: int, depth: int, size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One cardiac short-axis phantom per frame: {'ED': (image, label), 'ES': (image, label)}.

    Images are float32 [D,H,W] in [0, 1]; labels uint8 with 1 RV, 2 myocardium (a ring), 3 LV.
    Slices run from base to apex (the heart shrinks); at ES the LV cavity is smaller and the
    myocardium thicker, as in a contracting heart. Both frames share the patient's anatomy.
    """
    rng = np.random.default_rng([seed, patient])
    cx, cy = _jitter(rng, 0.05, 0.1), _jitter(rng, 0.0, 0.1)
    lv_radius, wall = float(rng.uniform(0.2, 0.26)), float(rng.uniform(0.06, 0.08))
    rv_offset, rv_radius = float(rng.uniform(0.3, 0.38)), float(rng.uniform(0.24, 0.3))
    deformation = [_smooth_field(rng, (depth, size, size), 0.05) for _ in range(2)]
    frames = {}
    for frame, cavity, thickening in (("ED", 1.0, 1.0), ("ES", 0.65, 1.35)):
        z, y, x = _grid(depth, size)
        y, x = y + deformation[0], x + deformation[1]
        taper = 1.0 - 0.45 * (z + 1.0) / 2.0  # base (z=-1) to apex (z=1)
        radius = np.hypot(x - cx, y - cy)
        lv = radius <= lv_radius * cavity * taper
        epicardium = radius <= (lv_radius * cavity + wall * thickening) * taper
        rv_centre_x = cx - rv_offset * taper
        rv = (np.hypot(x - rv_centre_x, (y - cy) / 1.2) <= rv_radius * (0.6 + 0.4 * cavity) * taper) & ~epicardium
        rv &= z < 0.6  # the RV does not reach the apex
        label = np.zeros(z.shape, dtype=np.uint8)
        label[epicardium] = 2
        label[lv] = 3
        label[rv] = 1
        chest = (x / 0.95) ** 2 + (y / 0.8) ** 2 <= 1.0
        image = np.where(chest, 0.45, 0.05) + _smooth_field(rng, z.shape, 0.08)
        image[label == 2] = 0.25
        image[(label == 1) | (label == 3)] = 0.85
        image += rng.normal(0.0, 0.05, z.shape)
        image = (image - image.min()) / (image.max() - image.min())
        frames[frame] = (image.astype(np.float32), label)
    return frames


def _check_counts(value: int, field: str, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"must be an integer {bound}, got {value!r}", field=field)
    return value


def _prepare(out_dir: Path, parts: tuple[str, ...], overwrite: bool) -> Path:
    out_dir = Path(out_dir).expanduser()
    existing = [out_dir / part for part in parts if (out_dir / part).exists()]
    if existing and not overwrite:
        raise FusionSearchError(
            f"{out_dir} already holds {', '.join(p.name for p in existing)}; refusing to mix a new phantom set "
            f"with old files. Choose an empty folder or pass overwrite=True (--overwrite) to replace them."
        )
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def make_synapse(
    out_dir: str | Path,
    *,
    cases: int = 4,
    test_cases: int = 2,
    slices: int = 12,
    size: int = 80,
    labels: str = "btcv14",
    seed: int = 0,
    hu: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a Synapse phantom set in the TransUNet layout under ``out_dir`` and return it.

    ``cases`` training cases and ``test_cases`` test cases take the real Synapse case ids in order
    (case0005, case0006, ... and case0001, case0002, ...). Slices go to ``train_npz/`` (float32
    image and label, H x W), volumes to ``test_vol_h5/`` and the case lists to
    ``lists/lists_Synapse/``. Images are in [0, 1] like the release, or raw HU with ``hu=True``.
    """
    import h5py

    _check_counts(cases, "cases", 1, len(TRAIN_CASES))
    _check_counts(test_cases, "test_cases", 1, len(TEST_CASES))
    _check_counts(slices, "slices", 1)
    _check_counts(size, "size", 16)
    _label_codes(labels)
    out = _prepare(Path(out_dir), ("train_npz", "test_vol_h5", "lists"), overwrite)
    train_dir, test_dir, list_dir = out / "train_npz", out / "test_vol_h5", out / "lists" / "lists_Synapse"
    for folder in (train_dir, test_dir, list_dir):
        folder.mkdir(parents=True)
    chosen = [(case, "train") for case in TRAIN_CASES[:cases]] + [(case, "test") for case in TEST_CASES[:test_cases]]
    slice_names = []
    for case, part in tqdm(chosen, desc="synapse phantoms", unit="case", disable=not progress):
        image, label = synapse_phantom(seed, int(case[4:]), slices, size, labels=labels)
        if not hu:
            low, high = HU_WINDOW
            image = ((np.clip(image, low, high) - low) / (high - low)).astype(np.float32)
        if part == "train":
            for z in range(slices):
                name = f"{case}_slice{z:03d}"
                np.savez(train_dir / f"{name}.npz", image=image[z], label=label[z].astype(np.float32))
                slice_names.append(name)
        else:
            with h5py.File(test_dir / f"{case}.npy.h5", "w") as handle:
                handle.create_dataset("image", data=image)
                handle.create_dataset("label", data=label.astype(np.float32))
    (list_dir / "train.txt").write_text("\n".join(slice_names) + "\n", encoding="utf-8")
    (list_dir / "test_vol.txt").write_text("\n".join(TEST_CASES[:test_cases]) + "\n", encoding="utf-8")
    return out


def make_acdc(
    out_dir: str | Path,
    *,
    cases: int = 10,
    slices: int = 8,
    size: int = 80,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write an ACDC phantom set in the preprocessed MT-UNet form under ``out_dir`` and return it.

    ``cases`` patients (case_001, ...) are split 70/10/20 by a seeded rule (at least one each).
    Train and valid patients are written as slices ``{train,valid}/case_001_sliceED_0.npz``, test
    patients as volumes ``test/case_002_volume_ED.npz`` (keys ``img``, ``label``), with the lists
    ``lists_ACDC/{train,valid,test}.txt`` naming the files (extension included).
    """
    _check_counts(cases, "cases", 3, 999)
    _check_counts(slices, "slices", 1)
    _check_counts(size, "size", 16)
    out = _prepare(Path(out_dir), ("train", "valid", "test", "lists_ACDC"), overwrite)
    patients = [f"case_{n:03d}" for n in range(1, cases + 1)]
    parts = split_three(patients, 0.1, 0.2, seed)
    lists: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for part in lists:
        (out / part).mkdir()
    (out / "lists_ACDC").mkdir()
    for patient in tqdm(patients, desc="acdc phantoms", unit="patient", disable=not progress):
        part = next(name for name, members in parts.items() if patient in members)
        for frame, (image, label) in acdc_phantom(seed, int(patient[5:]), slices, size).items():
            if part == "test":
                name = f"{patient}_volume_{frame}.npz"
                np.savez(out / part / name, img=image, label=label)
                lists[part].append(name)
                continue
            for z in range(slices):
                name = f"{patient}_slice{frame}_{z}.npz"
                np.savez(out / part / name, img=image[z], label=label[z])
                lists[part].append(name)
    for part, names in lists.items():
        (out / "lists_ACDC" / f"{part}.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return out
