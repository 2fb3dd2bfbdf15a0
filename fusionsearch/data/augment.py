"""Training augmentation and resizing, following the TransUNet/EMCAD/LoMix reference protocol.

2D: with p=0.5 a random rot90 (k in 0..3) then a flip along a random axis; otherwise with p=0.5 a
rotation by a random integer angle in [-20, 20] degrees (``scipy.ndimage.rotate``, order 0 for image
and label, reshape=False, zero fill), as the reference code does. Then the slice is resized to the
training size with ``scipy.ndimage.zoom`` (order 3 image, order 0 label).

All randomness comes from a ``numpy.random.Generator`` made by :func:`rng_for` from
(seed, epoch, index), so the sample an index yields in an epoch never depends on worker count,
sampling order or whether the run was resumed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

MAX_ANGLE = 20


def rng_for(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for sample ``index`` in ``epoch`` of a run seeded with ``seed``."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def random_rot_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """rot90 by k in 0..3 in the (H, W) plane, then a flip along a random axis (2D)."""
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))
    image = np.flip(np.rot90(image, k), axis=axis)
    label = np.flip(np.rot90(label, k), axis=axis)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def random_rotate(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, axes: tuple[int, int] = (1, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by an integer angle in [-20, 20] degrees, nearest neighbour for both arrays, same shape."""
    angle = int(rng.integers(-MAX_ANGLE, MAX_ANGLE + 1))
    image = ndimage.rotate(image, angle, axes=axes, order=0, reshape=False)
    label = ndimage.rotate(label, angle, axes=axes, order=0, reshape=False)
    return image, label


def augment_slice(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The reference 2D augmentation: p=0.5 rot90+flip, else p=0.5 small rotation, else unchanged."""
    if rng.random() < 0.5:
        return random_rot_flip(image, label, rng)
    if rng.random() < 0.5:
        return random_rotate(image, label, rng)
    return image, label


def _square_planes(shape: Sequence[int]) -> list[tuple[int, int]]:
    return [(a, b) for a in range(3) for b in range(a + 1, 3) if shape[a] == shape[b]]


def augment_volume(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """3D variant: p=0.5 rot90 in a random plane (only planes whose sides are equal, so the shape is
    kept) plus a flip along a random axis; else p=0.5 a rotation in [-20, 20] degrees in a random
    plane (nearest neighbour, same shape); else unchanged."""
    if rng.random() < 0.5:
        planes = _square_planes(image.shape)
        k = int(rng.integers(0, 4))
        plane = planes[int(rng.integers(0, len(planes)))] if planes else None
        axis = int(rng.integers(0, 3))
        if plane is not None:
            image, label = np.rot90(image, k, axes=plane), np.rot90(label, k, axes=plane)
        image, label = np.flip(image, axis=axis), np.flip(label, axis=axis)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)
    if rng.random() < 0.5:
        planes = [(0, 1), (0, 2), (1, 2)]
        plane = planes[int(rng.integers(0, 3))]
        return random_rotate(image, label, rng, axes=plane)
    return image, label


def resize_slice(image: np.ndarray, label: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize a 2D image (order 3) and label (order 0) to ``size`` with ``scipy.ndimage.zoom``."""
    height, width = image.shape
    if (height, width) == tuple(size):
        return image, label
    factors = (size[0] / height, size[1] / width)
    image = ndimage.zoom(image, factors, order=3)
    label = ndimage.zoom(label, factors, order=0)
    return image, label


def crop_or_pad(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The window ``array[start : start + size]`` per axis, zero-padded where it leaves the array."""
    out = np.zeros(tuple(size), dtype=array.dtype)
    src, dst = [], []
    for begin, length, extent in zip(start, size, array.shape, strict=True):
        lo, hi = max(begin, 0), min(begin + length, extent)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - begin, lo - begin + max(0, hi - lo)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def sample_patch_start(
    label: np.ndarray, size: Sequence[int], rng: np.random.Generator, foreground_probability: float
) -> list[int]:
    """Corner of a random patch: centred on a random foreground voxel with ``foreground_probability``
    (so small organs are seen often), else uniform over the volume (patches larger than the
    volume are centred and padded)."""
    shape = label.shape
    use_foreground = rng.random() < foreground_probability
    if use_foreground:
        foreground = np.flatnonzero(label > 0)
        if foreground.size:
            centre = np.unravel_index(int(foreground[int(rng.integers(0, foreground.size))]), shape)
            return [_clamp_start(int(c) - s // 2, s, e) for c, s, e in zip(centre, size, shape, strict=True)]
    start = []
    for extent, length in zip(shape, size, strict=True):
        if extent <= length:
            start.append(-((length - extent) // 2))
        else:
            start.append(int(rng.integers(0, extent - length + 1)))
    return start


def _clamp_start(start: int, length: int, extent: int) -> int:
    """Keep a window inside the array when it fits, else centre it."""
    if extent <= length:
        return -((length - extent) // 2)
    return min(max(start, 0), extent - length)
