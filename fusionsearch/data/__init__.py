"""Datasets (Synapse, ACDC, generic NIfTI folders), splits, augmentation and synthetic phantoms.

``build_dataset(name, root, split, **options)`` looks the reader up in
``fusionsearch.registry.DATASETS`` (importing this package registers the built-in ones) and
returns a torch Dataset following the dataset contract in docs/architecture.md.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from fusionsearch.data import acdc, nifti_folder, synapse  # noqa: F401  (registers the built-in datasets)
from fusionsearch.data.base import SegmentationDataset
from fusionsearch.data.io import DataWarning
from fusionsearch.errors import ConfigError
from fusionsearch.registry import DATASETS

__all__ = ["DataWarning", "SegmentationDataset", "build_dataset"]


def build_dataset(name: str, root: str | Path, split: str = "train", **options: Any) -> SegmentationDataset:
    """Build the dataset registered as ``name`` reading ``root``, for ``split`` (train, valid or test).

    Options are the reader's keyword arguments (e.g. ``labels``, ``size``, ``fraction``); an unknown
    option is a ConfigError listing the ones the reader accepts.
    """
    factory = DATASETS.get(name)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a plugin factory without an inspectable signature
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if parameters and not takes_any:
        accepted = [p for p in parameters if p not in ("root", "split")]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for dataset '{name}'",
                field="data",
                fix=f"Options of '{name}': {', '.join(accepted)}",
            )
    return factory(root=root, split=split, **options)
