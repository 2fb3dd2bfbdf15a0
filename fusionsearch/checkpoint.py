"""Atomic checkpoint files and the random-number state needed to resume a run bit for bit.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then moved
over the old one with ``os.replace`` (atomic on POSIX and Windows). A crash, a kill or a full disk
during the write therefore leaves the previous checkpoint intact; the error says so. Checkpoints are
read with ``torch.load(..., weights_only=True)``, so they hold only tensors and plain containers.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionsearch.errors import FusionSearchError

LAST = "last.pt"
BEST = "best.pt"


class CheckpointWriteError(FusionSearchError):
    """Writing a checkpoint failed (disk full, quota, permissions); the previous file is untouched."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: temp file, flush, fsync, ``os.replace``.

    On failure the temporary file is removed and :class:`CheckpointWriteError` says whether the
    previous checkpoint at ``path`` is still there (it is never touched before the final rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # torch's zip writer reports a failed write (ENOSPC, EFBIG) as a RuntimeError whose context is
        # the OSError; a RuntimeError without one is not a write problem and propagates unchanged.
        cause = _os_error(exc)
        try:
            tmp.unlink()
        except OSError:
            pass
        if cause is None:
            raise
        previous = (
            f"The previous checkpoint {path} is intact"
            if path.exists()
            else f"There was no previous checkpoint at {path}"
        )
        raise CheckpointWriteError(
            f"Could not write the checkpoint {path}: {cause.strerror or cause} (errno {cause.errno}; "
            f"{_free_space(path.parent)}). {previous}. Free disk space (or raise the quota / file-size limit) "
            f"and continue with --resume."
        ) from exc
    _fsync_directory(path.parent)
    return path


def _os_error(exc: BaseException | None) -> OSError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        return "free space unknown"


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FusionSearchError(f"Checkpoint {path} does not exist. Give a run directory or an existing .pt file.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, unsafe pickle
        raise FusionSearchError(
            f"Checkpoint {path} cannot be read ({type(exc).__name__}: {exc}). It may be truncated or not a "
            f"fusionsearch checkpoint; use the other checkpoint in the same folder (last.pt / best.pt)."
        ) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise FusionSearchError(f"{path} is not a fusionsearch checkpoint (no 'model' entry).")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from (torch, CUDA, numpy, python)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        # python's state is a tuple of ints; a tensor keeps it weights_only-loadable
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
