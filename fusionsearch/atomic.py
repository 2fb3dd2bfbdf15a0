"""Write files so that readers never see half of one: a temporary sibling, then ``os.replace``.

Run directories are read while they are written (TensorBoard, a sweep driver, a user's ``cat``)
and runs can be killed at any moment, so every artefact goes through here. Checkpoints add fsync
and disk-full reporting on top (see :mod:`fusionsearch.checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffix so that writers choosing a format by extension (savefig, savez) see the real one
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
