"""The dataset core shared by every reader: cases as sources, and slices, volumes or 3D patches as items.

A reader (synapse, acdc, nifti_folder) only finds its files, decides the split and says how to read
one case; it hands :class:`SegmentationDataset` a list of *sources*, one per case. The dataset turns
them into items following the dataset contract (docs/architecture.md):

- slices (2D training): ``{"image": float32 tensor [1,H,W], "label": int64 tensor [H,W], "case", "slice"}``,
  augmented (train) and resized to ``size`` (zoom order 3 image, order 0 label);
- volumes (evaluation): ``{"image": float32 ndarray [D,H,W], "label": int64 ndarray [D,H,W], "case"}``,
  never resized (the evaluator resizes slice by slice);
- patches (3D training): ``{"image": float32 tensor [1,*patch], "label": int64 tensor [*patch], "case"}``.

Augmentation randomness comes from (seed, epoch, index) only, via :meth:`set_epoch`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fusionsearch.data.augment import (
    augment_slice,
    augment_volume,
    crop_or_pad,
    resize_slice,
    rng_for,
    sample_patch_start,
)
from fusionsearch.data.io import check_label_range
from fusionsearch.errors import ConfigError, DataError

Pair = tuple[np.ndarray, np.ndarray]


@dataclass
class SliceFilesSource:
    """A case stored as one 2D file per slice (Synapse train_npz, ACDC train/valid); stacked in order."""

    case: str
    files: list[Path]
    slice_ids: list[int]
    load_slice: Callable[[Path], Pair]
    partial: bool = field(default=True, init=False)

    @property
    def num_slices(self) -> int:
        return len(self.files)

    def read(self) -> Pair:
        pairs = [self.load_slice(path) for path in self.files]
        first = pairs[0][0].shape
        for path, (image, _) in zip(self.files, pairs, strict=True):
            if image.shape != first:
                raise DataError(
                    f"{path}: slice shape {image.shape} differs from {first} of {self.files[0].name}; the slices "
                    f"of case {self.case} cannot be stacked into one volume."
                )
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def read_slice(self, z: int) -> Pair:
        return self.load_slice(self.files[z])

    def where(self, z: int | None = None) -> str:
        if z is None:
            return f"case {self.case} ({self.files[0].parent})"
        return str(self.files[z])


@dataclass
class VolumeFileSource:
    """A case stored as one 3D file [D,H,W] (h5, npz or NIfTI).

    ``load(path, z)`` reads the whole volume for ``z=None``; for ``z`` an int it reads one slice,
    which formats without partial reads (``partial=False``) never get asked for: the dataset
    caches whole volumes for them instead. ``count(path)`` gives the number of slices from the
    file's header; it is only called when slices are needed.
    """

    case: str
    path: Path
    load: Callable[[Path, int | None], Pair]
    count: Callable[[Path], int]
    partial: bool = False

    @cached_property
    def num_slices(self) -> int:
        return self.count(self.path)

    @property
    def slice_ids(self) -> list[int]:
        return list(range(self.num_slices))

    def read(self) -> Pair:
        return self.load(self.path, None)

    def read_slice(self, z: int) -> Pair:
        return self.load(self.path, z)

    def where(self, z: int | None = None) -> str:
        return str(self.path)


Source = SliceFilesSource | VolumeFileSource


def parse_size(size: int | Sequence[int] | None, ndim: int, field_name: str = "size") -> tuple[int, ...] | None:
    """``224`` -> (224, 224); ``[160, 192]`` kept; None = keep the stored size."""
    if size is None:
        return None
    values = [size] * ndim if isinstance(size, int) else list(size)
    if len(values) != ndim or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ConfigError(
            f"must be a positive integer or a list of {ndim} positive integers, got {size!r}", field=field_name
        )
    return tuple(values)


class SegmentationDataset(Dataset):
    """A torch Dataset of slices, volumes or patches built from per-case sources (see module doc)."""

    def __init__(
        self,
        *,
        name: str,
        root: Path,
        split: str,
        sources: list[Source],
        num_classes: int,
        class_names: Sequence[str],
        volumes: bool,
        augment: bool,
        seed: int = 0,
        size: tuple[int, ...] | None = None,
        spatial_dims: int = 2,
        patch_size: tuple[int, ...] | None = None,
        patches_per_volume: int = 1,
        foreground_probability: float = 0.33,
        cache_volumes: int = 4,
        label_fix: str = "",
        empty_hint: str = "",
    ) -> None:
        if not sources:
            raise DataError(f"the {split} split of the {name} dataset at {root} is empty. {empty_hint}".strip())
        if len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names given for {num_classes} classes", field="class_names")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"must be a non-negative integer, got {seed!r}", field="seed")
        self.name = name
        self.root = Path(root)
        self.split = split
        self.sources = list(sources)
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.volumes = bool(volumes)
        self.augment = bool(augment)
        self.seed = seed
        self.size = size
        self.spatial_dims = spatial_dims
        self.patch_size = patch_size
        self.patches_per_volume = patches_per_volume
        self.foreground_probability = foreground_probability
        self.cache_volumes = cache_volumes
        self.label_fix = label_fix
        self.epoch = 0
        self._cache: OrderedDict[int, Pair] = OrderedDict()
        self._slices: list[tuple[int, int]] = []
        if self.mode == "slices":  # counting slices may open every file: only when slices are used
            self._slices = [(i, z) for i, source in enumerate(self.sources) for z in range(source.num_slices)]

    # -- contract attributes ---------------------------------------------------------------------
    @property
    def cases(self) -> list[str]:
        """Case ids in this split, in item order."""
        return [source.case for source in self.sources]

    @property
    def mode(self) -> str:
        if self.volumes:
            return "volumes"
        return "patches" if self.spatial_dims == 3 else "slices"

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call once per epoch, before iterating).

        DataLoader workers hold copies of the dataset: create the loader (or its iterator) after
        this call, and do not use ``persistent_workers``, or the workers keep the old epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.mode == "volumes":
            return len(self.sources)
        if self.mode == "patches":
            return len(self.sources) * self.patches_per_volume
        return len(self._slices)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, mode={self.mode!r}, "
            f"cases={len(self.sources)}, items={len(self)}, num_classes={self.num_classes})"
        )

    # -- items -------------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"index {index} out of range for {length} items")
        if self.mode == "volumes":
            return self._volume_item(index)
        if self.mode == "patches":
            return self._patch_item(index)
        return self._slice_item(index)

    def _volume_item(self, index: int) -> dict:
        source = self.sources[index]
        image, label = self._read_volume(index)
        return {
            "image": image.astype(np.float32, copy=False),
            "label": label.astype(np.int64, copy=False),
            "case": source.case,
        }

    def _slice_item(self, index: int) -> dict:
        source_index, z = self._slices[index]
        source = self.sources[source_index]
        if source.partial:
            image, label = source.read_slice(z)
            check_label_range(label, self.num_classes, source.where(z), self.label_fix)
        else:
            volume_image, volume_label = self._read_volume(source_index, cache=True)
            image, label = volume_image[z].copy(), volume_label[z].copy()  # never hand out the cache
        if self.augment:
            image, label = augment_slice(image, label, rng_for(self.seed, self.epoch, index))
        if self.size is not None:
            image, label = resize_slice(image, label, self.size)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
            "case": source.case,
            "slice": int(source.slice_ids[z]),
        }

    def _patch_item(self, index: int) -> dict:
        source_index = index // self.patches_per_volume
        image, label = self._read_volume(source_index, cache=True)
        rng = rng_for(self.seed, self.epoch, index)
        start = sample_patch_start(label, self.patch_size, rng, self.foreground_probability)
        image, label = crop_or_pad(image, start, self.patch_size), crop_or_pad(label, start, self.patch_size)
        if self.augment:
            image, label = augment_volume(image, label, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
            "case": self.sources[source_index].case,
        }

    def _read_volume(self, source_index: int, cache: bool = False) -> Pair:
        """Read and check a whole case; with ``cache`` keep the last few (slices/patches of formats
        without partial reads). Evaluation volumes are read once each and never cached."""
        cached = self._cache.get(source_index)
        if cached is not None:
            self._cache.move_to_end(source_index)
            return cached
        source = self.sources[source_index]
        image, label = source.read()
        check_label_range(label, self.num_classes, source.where(), self.label_fix)
        if cache and self.cache_volumes > 0:
            self._cache[source_index] = (image, label)
            while len(self._cache) > self.cache_volumes:
                self._cache.popitem(last=False)
        return image, label
